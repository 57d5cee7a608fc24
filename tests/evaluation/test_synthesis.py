"""evaluate-synthesis: metrics against hand computations, both baselines, the outputs, and bad input.

The synthesis model is the stand-in of ``tests/inference/test_synthesize.py`` (``translate`` = a fixed affine map
per target), so for a target whose map is increasing the synthesised image is an affine copy of its source, and
every metric of that row can be computed independently from the two real images.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from skimage.metrics import structural_similarity

from nnunet_missingmod import cli
from nnunet_missingmod import modalities as mods
from nnunet_missingmod.evaluation import synthesis as evaluation
from nnunet_missingmod.evaluation.synthesis import (
    bounding_box,
    brasyn_percentile_clip,
    evaluate_synthesis,
    histogram_matched,
    image_metrics,
    scale_to_unit,
)
from nnunet_missingmod.inference import synthesize as synthesis
from tests.inference.test_synthesize import (
    SCALE,
    SHIFT,
    StandInSynthesisTrainer,
    brain_mask,
    make_model,
    write_case,
    write_image,
    write_labels,
)


def _percentile(values: np.ndarray, q: float) -> float:
    """Linear-interpolation percentile written out (numpy's default method)."""
    ordered = np.sort(values.ravel())
    position = q / 100 * (len(ordered) - 1)
    low = int(np.floor(position))
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (position - low) * (ordered[high] - ordered[low]))


def _unit(image, region):
    low, high = _percentile(image[region], 0.5), _percentile(image[region], 99.5)
    out = np.zeros(image.shape)
    for index in zip(*np.nonzero(region), strict=True):
        out[index] = (min(max(image[index], low), high) - low) / (high - low)
    return out


def _ssim_full(a, b):
    return structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, full=True)[1]


def _region_mean(values, region):
    total, count = 0.0, 0
    for index in zip(*np.nonzero(region), strict=True):
        total += values[index]
        count += 1
    return total / count


def _images(seed=0, pad=0):
    """A noisy brain box and a related synthetic image (``pad`` voxels of background added on every side)."""
    rng = np.random.default_rng(seed)
    shape = (14 + 2 * pad, 16 + 2 * pad, 15 + 2 * pad)
    brain = np.zeros(shape, dtype=bool)
    brain[2 + pad:12 + pad, 3 + pad:14 + pad, 2 + pad:13 + pad] = True
    real = np.where(brain, rng.normal(100, 20, shape), 0.0)
    synthetic = np.where(brain, real * 0.8 + rng.normal(0, 10, shape) + 30, 0.0)
    tumour = np.zeros(shape, dtype=bool)
    tumour[6 + pad:9 + pad, 7 + pad:10 + pad, 5 + pad:7 + pad] = True
    return real, synthetic, brain, tumour


# ---------------------------------------------------------------------------------------------- metrics


def test_scale_to_unit_against_a_written_out_percentile():
    real, _, brain, _ = _images()
    np.testing.assert_allclose(scale_to_unit(real, brain), _unit(real, brain), atol=1e-12)
    assert not scale_to_unit(np.zeros_like(real), brain).any()  # a constant image gives zeros


def test_brain_psnr_by_formula_and_ssim_over_the_brain():
    real, synthetic, brain, tumour = _images()
    metrics = image_metrics(real, synthetic, brain, tumour)
    a, b = _unit(real, brain), _unit(synthetic, brain)
    squared = [(a[i] - b[i]) ** 2 for i in zip(*np.nonzero(brain), strict=True)]
    assert metrics["psnr_brain"] == pytest.approx(10 * math.log10(1.0 / (sum(squared) / len(squared))), rel=1e-4)
    assert metrics["ssim_brain"] == pytest.approx(_region_mean(_ssim_full(a, b), brain), rel=1e-4)
    same = image_metrics(real, real, brain, tumour)
    assert same["ssim_brain"] == pytest.approx(1.0) and same["psnr_brain"] == math.inf
    assert same["brasyn_ssim_tumour"] == pytest.approx(1.0) and same["ssim_wt_bbox"] == pytest.approx(1.0)


def test_bounding_box_by_hand():
    mask = np.zeros((30, 30, 12), dtype=bool)
    mask[10:13, 4:20, 0:2] = True  # 3 x 16 x 2 voxels
    # axis 0: widened to 11 around 10..12 -> 6..16; axis 1 kept; axis 2: from 0, cannot go below -> 0..10
    assert bounding_box(mask) == (slice(6, 17), slice(4, 20), slice(0, 11))
    mask[:] = False
    mask[28:30, 5, 11] = True  # at the far edges
    assert bounding_box(mask) == (slice(19, 30), slice(0, 11), slice(1, 12))
    assert bounding_box(np.zeros((12, 12, 12), dtype=bool)) is None


def test_local_metrics_in_the_whole_tumour_box():
    real, synthetic, brain, tumour = _images()
    metrics = image_metrics(real, synthetic, brain, tumour)
    a, b = _unit(real, brain), _unit(synthetic, brain)
    box = (slice(2, 13), slice(3, 14), slice(1, 12))  # 6..8 -> 2..12, 7..9 -> 3..13, 5..6 -> 1..11 (11 voxels)
    assert bounding_box(tumour) == box
    mse = np.mean((a[box] - b[box]) ** 2)
    assert metrics["psnr_wt_bbox"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-4)
    assert metrics["ssim_wt_bbox"] == pytest.approx(_ssim_full(a[box], b[box]).mean(), rel=1e-4)
    no_tumour = image_metrics(real, synthetic, brain, np.zeros_like(tumour))
    assert math.isnan(no_tumour["ssim_wt_bbox"]) and math.isnan(no_tumour["brasyn_ssim_tumour"])


def test_brasyn_protocol_by_hand():
    real, synthetic, brain, tumour = _images()
    real = real - 5.0  # negative background: the lower bound is raised to 0
    low, high = max(_percentile(real, 0.5), 0.0), _percentile(real, 99.5)
    assert low == 0.0
    expected_real = np.clip(real, low, high) / high
    np.testing.assert_allclose(brasyn_percentile_clip(real), expected_real)
    metrics = image_metrics(real, synthetic, brain, tumour)
    r, s = expected_real, brasyn_percentile_clip(synthetic)
    inside = tumour.astype(float)
    assert metrics["brasyn_ssim_tumour"] == pytest.approx(_region_mean(_ssim_full(r * inside, s * inside), tumour),
                                                          rel=1e-4)
    outside = 1 - inside
    assert metrics["brasyn_ssim_non_tumour"] == pytest.approx(
        _region_mean(_ssim_full(r * outside, s * outside), ~tumour), rel=1e-4)


def _reference_metrics(real, synthetic, brain, tumour):
    """Every metric on the whole volumes, straight from the definitions (no cropping)."""
    a, b = _unit(real, brain), _unit(synthetic, brain)
    box = bounding_box(tumour)
    r = np.clip(real, max(_percentile(real, 0.5), 0), _percentile(real, 99.5))
    r = (r - max(_percentile(real, 0.5), 0)) / (_percentile(real, 99.5) - max(_percentile(real, 0.5), 0))
    s = np.clip(synthetic, max(_percentile(synthetic, 0.5), 0), _percentile(synthetic, 99.5))
    s = (s - max(_percentile(synthetic, 0.5), 0)) / (_percentile(synthetic, 99.5) - max(_percentile(synthetic, 0.5), 0))
    inside = tumour.astype(float)
    return {"ssim_brain": _region_mean(_ssim_full(a, b), brain),
            "psnr_brain": 10 * math.log10(1 / np.mean((a[brain] - b[brain]) ** 2)),
            "ssim_wt_bbox": _ssim_full(a[box], b[box]).mean(),
            "psnr_wt_bbox": 10 * math.log10(1 / np.mean((a[box] - b[box]) ** 2)),
            "brasyn_ssim_tumour": _region_mean(_ssim_full(r * inside, s * inside), tumour),
            "brasyn_ssim_non_tumour": _region_mean(_ssim_full(r * (1 - inside), s * (1 - inside)), ~tumour)}


def test_metrics_on_the_cropped_brain_equal_the_whole_volume():
    """image_metrics works on the brain's box grown by the window radius; a wide empty margin changes nothing."""
    real, synthetic, brain, tumour = _images(seed=1, pad=9)
    metrics = image_metrics(real, synthetic, brain, tumour)
    for name, value in _reference_metrics(real, synthetic, brain, tumour).items():
        assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_histogram_matching_takes_the_reference_histogram_and_keeps_the_order():
    real, synthetic, brain, _ = _images()
    reference = np.random.default_rng(3).gamma(2.0, 50.0, 5000)
    matched = histogram_matched(synthetic, brain, reference)
    assert not matched[~brain].any()
    values, source = matched[brain], synthetic[brain]
    order = np.argsort(source, kind="stable")
    assert np.all(np.diff(values[order]) >= -1e-9)  # monotone in the source intensity
    for q in (10, 50, 90):  # the matched values follow the reference's quantiles
        assert _percentile(values, q) == pytest.approx(_percentile(reference, q), rel=0.05)


def test_small_images_are_refused():
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        evaluation.ssim_map(np.zeros((5, 20, 20)), np.zeros((5, 20, 20)))


# ---------------------------------------------------------------------------------------------- the evaluation


@pytest.fixture
def evaluation_setup(tmp_path):
    images, labels = tmp_path / "raw" / "imagesTs", tmp_path / "raw" / "labelsTs"
    arrays = {}
    for index, case in enumerate(("E1", "E2", "E3")):
        channels = (0, 1, 2, 3) if case != "E3" else (0, 1, 3)
        arrays[case] = write_case(images, case, channels, seed=30 + index)
        write_labels(labels / f"{case}.nii.gz")
    model = synthesis.load_synthesis_model(make_model(tmp_path / "results"), trainer_class=StandInSynthesisTrainer)
    return images, labels, arrays, model


def _rows(out):
    with open(out / "per_case.csv") as f:
        return list(csv.DictReader(f))


def test_evaluation_rows_metrics_and_baselines(evaluation_setup, tmp_path):
    images, labels, arrays, model = evaluation_setup
    out = evaluate_synthesis(images, model, tmp_path / "eval", progress=False)
    rows = _rows(out)
    brain = brain_mask()
    tumour = np.isin(sitk.GetArrayFromImage(sitk.ReadImage(str(labels / "E1.nii.gz"))), mods.REGIONS["WT"])
    # per case: each acquired target from each other one (M (M - 1) pairs) and from all others (M rows)
    for case, count in (("E1", 4), ("E2", 4), ("E3", 3)):
        selected = [r for r in rows if r["case"] == case]
        assert len([r for r in selected if r["method"] == "synthesis"]) == count * (count - 1) + count
        assert len([r for r in selected if r["method"] == "histogram_matching"]) == count * (count - 1) + count
        assert len([r for r in selected if r["method"] == "zero_fill"]) == count * (count - 1) + count
    # t1 is the stand-in's identity target (scale 1, shift 0): t1ce -> t1 is an affine copy of t1ce
    assert SCALE[0] == 1.0 and SHIFT[0] == 0.0
    row = next(r for r in rows if r["case"] == "E1" and r["method"] == "synthesis" and r["source"] == "t1ce"
               and r["target"] == "t1")
    expected = image_metrics(arrays["E1"][0].astype(float), arrays["E1"][1].astype(float), brain, tumour)
    for metric in ("ssim_brain", "psnr_brain", "ssim_wt_bbox", "psnr_wt_bbox"):
        assert float(row[metric]) == pytest.approx(expected[metric], rel=1e-4), metric
    # zero fill, by hand: every brain voxel of the scaled real image against 0
    zero = next(r for r in rows if r["case"] == "E1" and r["method"] == "zero_fill" and r["target"] == "t2")
    a = _unit(arrays["E1"][2].astype(float), brain)
    assert float(zero["psnr_brain"]) == pytest.approx(10 * math.log10(1 / np.mean(a[brain] ** 2)), rel=1e-4)
    # the matching baseline of the all -> target rows is the source with the best mean brain SSIM
    for target in mods.MODALITIES:
        single = [r for r in rows if r["method"] == "histogram_matching" and r["target"] == target
                  and r["source"] != "all"]
        means = {s: np.mean([float(r["ssim_brain"]) for r in single if r["source"] == s])
                 for s in {r["source"] for r in single}}
        best = max(means, key=means.get)
        for row in (r for r in rows if r["method"] == "histogram_matching" and r["target"] == target
                    and r["source"] == "all"):
            source = best if best in [r["source"] for r in single if r["case"] == row["case"]] else None
            if source:
                assert row["matched_from"] == source
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == 3 and summary["histogram_reference"] == "leave-one-out pool of z-scores"
    assert summary["combine"] == "ssim" and summary["validation_metric"] == "ssim"  # the stand-in's whole slices
    assert summary["histogram_fallback"] == []
    pair = summary["per_pair"]["t1ce->t1"]["synthesis"]
    values = [float(r["ssim_brain"]) for r in rows if r["method"] == "synthesis" and r["source"] == "t1ce"
              and r["target"] == "t1"]
    assert pair["ssim_brain"] == pytest.approx(np.mean(values)) and pair["num_cases"] == 3
    single_pairs = [n for n in summary["per_pair"] if not n.startswith("all->")]
    assert len(single_pairs) == 12
    assert summary["average_over_pairs"]["zero_fill"]["psnr_brain"] == pytest.approx(
        np.mean([summary["per_pair"][n]["zero_fill"]["psnr_brain"] for n in single_pairs]))
    table = (out / "table.md").read_text()
    assert "### BraSyn protocol" in table and "| **average over pairs** |" in table and "| t1ce → t1 |" in table
    assert (out / "examples.png").read_bytes()[:4] == b"\x89PNG"


def _matched_by_hand(source: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Histogram matching written out: each source value goes to the pool's value at the same empirical CDF."""
    values, inverse, counts = np.unique(source, return_inverse=True, return_counts=True)
    source_cdf = np.cumsum(counts) / source.size
    pool_values, pool_counts = np.unique(pool, return_counts=True)
    pool_cdf = np.cumsum(pool_counts) / pool.size
    return np.interp(source_cdf, pool_cdf, pool_values)[inverse]


def test_matching_baseline_pools_z_scores_so_other_cases_gain_does_not_matter(evaluation_setup, tmp_path):
    images, labels, arrays, model = evaluation_setup
    first = _rows(evaluate_synthesis(images, model, tmp_path / "eval", examples=0, progress=False))
    brain = brain_mask()
    tumour = np.isin(sitk.GetArrayFromImage(sitk.ReadImage(str(labels / "E1.nii.gz"))), mods.REGIONS["WT"])

    def z(values):
        return (values - values.mean()) / values.std()

    # by hand: E1's t1ce given the pooled z-scores of E2's and E3's t1 brains, then E1 t1ce's mean + sd x z
    pool = np.concatenate([z(arrays[c][0][brain].astype(float)) for c in ("E2", "E3")])
    t1ce = arrays["E1"][1][brain].astype(float)
    expected = np.zeros(brain.shape)
    expected[brain] = t1ce.mean() + t1ce.std() * _matched_by_hand(t1ce, pool)
    want = image_metrics(arrays["E1"][0].astype(float), expected, brain, tumour)
    row = next(r for r in first if r["case"] == "E1" and r["method"] == "histogram_matching"
               and r["source"] == "t1ce" and r["target"] == "t1")
    for metric in ("ssim_brain", "psnr_brain", "ssim_wt_bbox"):
        assert float(row[metric]) == pytest.approx(want[metric], rel=1e-3), metric
    # E2 scanned at three times the gain: E1's baseline is the same (a pool of raw intensities would be smeared)
    for channel, array in arrays["E2"].items():
        write_image(images / f"E2_{channel:04d}.nii.gz", (3 * array.astype(np.int32)).astype(np.int16))
    second = _rows(evaluate_synthesis(images, model, tmp_path / "eval2", examples=0, progress=False))
    for before, after in zip(first, second, strict=True):
        if before["case"] == "E1" and before["method"] == "histogram_matching" and before["source"] != "all":
            assert float(after["ssim_brain"]) == pytest.approx(float(before["ssim_brain"]), abs=1e-6)


def test_the_hidden_target_never_reaches_the_synthesis(evaluation_setup, tmp_path, monkeypatch):
    images, _, _, model = evaluation_setup
    seen = []
    original = model.prepare

    def prepare(image, properties, present):
        seen.append(tuple(present))
        return original(image, properties, present)

    monkeypatch.setattr(model, "prepare", prepare)
    evaluate_synthesis(images, model, tmp_path / "eval", num_cases=1, combined=False, examples=0, progress=False)
    assert seen == [(1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2)]  # E1: each target hidden in turn
    assert not (tmp_path / "eval" / "examples.png").exists()


def test_single_case_uses_its_own_histogram(evaluation_setup, tmp_path):
    images, _, _, model = evaluation_setup
    out = evaluate_synthesis(images, model, tmp_path / "eval", num_cases=1, examples=1, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["histogram_reference"] == "oracle" and summary["skipped_cases"] == []


# ---------------------------------------------------------------------------------------------- bad input


def _run(capsys, *argv):
    try:
        code = cli.main(["evaluate-synthesis", *argv, "-device", "cpu"])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr()


def _one_line_error(err, text):
    assert err.startswith("nnunet_missingmod evaluate-synthesis: error: ") and err.count("\n") == 1, err
    assert text in err and "Traceback" not in err, err


def test_cli_runs_and_reports(evaluation_setup, tmp_path, capsys, monkeypatch):
    images, _, _, model = evaluation_setup
    monkeypatch.setattr(synthesis, "find_trainer_class", lambda name: StandInSynthesisTrainer)
    code, captured = _run(capsys, "-i", str(images), "-o", str(tmp_path / "eval"), "-m", str(model.folder),
                          "--num-cases", "1", "--no-combined", "--examples", "0")
    assert code == 0, captured.err
    assert "### Over the brain" in captured.out
    assert {r["source"] for r in _rows(tmp_path / "eval")} == {"t1", "t1ce", "t2", "flair"}  # no "all" rows


def test_cli_errors_leave_nothing_behind(evaluation_setup, tmp_path, capsys):
    images, labels, _, model = evaluation_setup
    out = tmp_path / "eval"
    (labels / "E2.nii.gz").unlink()
    code, captured = _run(capsys, "-i", str(images), "-o", str(out), "-m", str(model.folder))
    assert code == 2
    _one_line_error(captured.err, f"case E2: no label file {labels / 'E2.nii.gz'}")
    code, captured = _run(capsys, "-i", str(images), "-l", str(tmp_path / "nowhere"), "-o", str(out), "-m",
                          str(model.folder))
    _one_line_error(captured.err, f"label folder {tmp_path / 'nowhere'} not found")
    code, captured = _run(capsys, "-i", str(images), "-o", str(out), "-m", str(model.folder), "--available", "t1")
    _one_line_error(captured.err, "has two acquired sequences")
    code, captured = _run(capsys, "-i", str(images), "-o", str(images / "eval"), "-m", str(model.folder))
    _one_line_error(captured.err, "lies inside the input folder")
    code, captured = _run(capsys, "-i", str(images), "-o", str(out), "-m", str(model.folder), "-chk", "x.pth")
    _one_line_error(captured.err, f"checkpoint not found: {model.folder / 'fold_*' / 'x.pth'}")
    assert not out.exists() and not (images / "eval").exists()


def test_label_of_another_geometry_and_a_failure_midway(evaluation_setup, tmp_path, capsys):
    import torch

    from tests.inference.test_synthesize import write_image

    images, labels, _, model = evaluation_setup
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(labels / "E1.nii.gz")))
    write_image(labels / "E1.nii.gz", label, spacing=(1.0, 1.0, 3.0))
    code, captured = _run(capsys, "-i", str(images), "-o", str(tmp_path / "eval"), "-m", str(model.folder))
    assert code == 2
    _one_line_error(captured.err, f"case E1: {labels / 'E1.nii.gz'} and E1_0000.nii.gz differ in spacing")
    write_labels(labels / "E1.nii.gz")
    with torch.no_grad():
        model.networks[0].scale[3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/Inf voxels translating t1 to flair"):
        evaluate_synthesis(images, model, tmp_path / "eval", progress=False)
    assert not (tmp_path / "eval").exists()  # the folder this call created is removed again


# ---------------------------------------------------------------------------------------------- the benchmark's tables


def test_benchmark_downstream_ratios_by_hand():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import bench_synthesis

    assert bench_synthesis.one_missing() == [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3), (0, 1, 2, 3)]
    full = {"WT_Dice": 0.8, "TC_Dice": 0.5, "ET_Dice": 0.4}
    zero = {"per_combination": {"t1+t1ce+t2": {"WT_Dice": 0.2, "TC_Dice": 0.3, "ET_Dice": 0.1},
                                "t1+t1ce+t2+flair": full}}
    synthesized = {"per_combination": {"t1+t1ce+t2": {"WT_Dice": 0.76, "TC_Dice": 0.5, "ET_Dice": 0.2},
                                       "t1+t1ce+t2+flair": full}}
    lines, records = bench_synthesis.ratio_table(zero, synthesized)
    assert len(records) == 1 and records[0]["combination"] == "t1+t1ce+t2"
    assert records[0]["WT"]["ratio"] == pytest.approx(0.76 / 0.8) and records[0]["ET"]["ratio"] == pytest.approx(0.5)
    assert lines == ["| t1+t1ce+t2 | 20.0 / 76.0 / 0.950 | 30.0 / 50.0 / 1.000 | 10.0 / 20.0 / 0.500 |"]


def test_benchmark_teacher_student_table_and_goal(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import bench_synthesis
    from bench_common import REGIMES

    teacher = np.full((4, 4), np.nan)
    teacher[0, 1], teacher[2, 3] = 0.50, -0.10
    student = teacher.copy()
    student[0, 1], student[2, 3] = 0.495, -0.13  # 0.005 and 0.03 below the teacher
    lines = bench_synthesis.teacher_student_table(teacher, student, "over the brain")
    assert lines[0] == "## Teacher vs student (trainers' final validation SSIM, over the brain)"
    assert "| t1 → t1ce | 0.5000 | 0.4950 | -0.0050 |" in lines
    assert "| t2 → flair | -0.1000 | -0.1300 | -0.0300 |" in lines
    assert len([line for line in lines if line.startswith("| t")]) == 2  # NaN pairs (no slices) left out
    assert lines[-2].endswith("not met (largest shortfall 0.0300).")
    assert bench_synthesis.teacher_student_table(teacher, teacher, "x")[-2].endswith("met (largest shortfall 0.0000).")
    regime = REGIMES["converged"]
    for trainer, values in (("UTADNetTeacherTrainer", teacher), ("UTADNetStudentTrainer", student)):
        fold = bench_synthesis.synthesis_model_dir(tmp_path, regime, trainer) / "fold_0"
        fold.mkdir(parents=True)
        rows = [[None if np.isnan(v) else v for v in row] for row in values.tolist()]
        (fold / "synthesis_validation.json").write_text(json.dumps({"ssim": rows}))  # written before ssim_brain
    whole = bench_synthesis.validation_matrices(tmp_path, regime)
    np.testing.assert_array_equal(whole["UTADNetStudentTrainer"], student)
    assert bench_synthesis.validation_matrices(tmp_path, regime, key="ssim_brain") == {
        "UTADNetTeacherTrainer": None, "UTADNetStudentTrainer": None}
    import argparse  # the report lists the pairs synthesize's histogram fallback would take over
    args = argparse.Namespace(epochs=2, teacher_epochs=2, iterations=3, downstream=False)
    assert "Histogram fallback" not in bench_synthesis.write_report(tmp_path, regime, args, {}, {}).read_text()
    histogram = np.full((4, 4), np.nan)
    histogram[0, 1], histogram[2, 3] = 0.45, 0.2  # below the student on t1 -> t1ce, above on t2 -> flair
    for trainer, values in (("UTADNetTeacherTrainer", teacher), ("UTADNetStudentTrainer", student)):
        file = bench_synthesis.synthesis_model_dir(tmp_path, regime, trainer) / "fold_0" / "synthesis_validation.json"
        rows = [[None if np.isnan(v) else v for v in row] for row in values.tolist()]
        file.write_text(json.dumps({"ssim": rows, "ssim_brain": rows, "histogram_ssim_brain": [
            [None if np.isnan(v) else v for v in row] for row in histogram.tolist()],
            "histogram_quantiles": [[0.0, 1.0]] * 4}))
    report = bench_synthesis.write_report(tmp_path, regime, args, {}, {})
    assert "validated better than the student: t2 → flair." in report.read_text()
    assert json.loads(report.with_suffix(".json").read_text())["histogram_fallback_pairs"] == ["t2 → flair"]
    content = json.loads(file.read_text())  # no stored flair histogram: synthesize could not take t2 -> flair over
    file.write_text(json.dumps(content | {"histogram_quantiles": [[0.0, 1.0]] * 3 + [None]}))
    report = bench_synthesis.write_report(tmp_path, regime, args, {}, {})
    assert "validated better than the student: none." in report.read_text()


def test_benchmark_downstream_uses_the_robustness_benchmarks_finished_model(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import bench_synthesis
    from bench_common import REGIMES

    regime = REGIMES["converged"]
    own = tmp_path / "nnUNet_results" / regime.dataset_name / "nnUNetTrainer__nnUNetPlans__3d_cpu"
    shared = (tmp_path / "robustness_converged" / "models" / "nnUNetTrainer__seed0" / "nnUNet_results" /
              regime.dataset_name / "nnUNetTrainer__nnUNetPlans__3d_cpu")
    assert bench_synthesis.segmentation_model(tmp_path, regime, "nnUNetTrainer") == own
    (shared / "fold_0").mkdir(parents=True)
    (shared / "fold_0" / "checkpoint_latest.pth").write_bytes(b"x")  # still training there: not used
    assert bench_synthesis.segmentation_model(tmp_path, regime, "nnUNetTrainer") == own
    (shared / "fold_0" / "checkpoint_final.pth").write_bytes(b"x")
    assert bench_synthesis.segmentation_model(tmp_path, regime, "nnUNetTrainer") == shared
    assert bench_synthesis.segmentation_model(tmp_path, regime, "ModalityDropoutTrainer").is_relative_to(
        tmp_path / "nnUNet_results")


def test_benchmark_variant_trains_into_its_own_folder_and_refuses_bad_settings(tmp_path):
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import bench_synthesis
    from bench_common import REGIMES

    regime = REGIMES["converged"]
    before = os.environ.get(bench_synthesis.OVERRIDE_ENV)
    default = bench_synthesis.synthesis_model_dir(tmp_path, regime, "UTADNetStudentTrainer")
    variant = bench_synthesis.synthesis_model_dir(tmp_path, regime, "UTADNetStudentTrainer", "lcls10")
    assert default.is_relative_to(tmp_path / "nnUNet_results")
    assert variant.is_relative_to(tmp_path / "synthesis_converged_lcls10" / "nnUNet_results")
    assert variant.name == default.name == "UTADNetStudentTrainer__nnUNetPlans__2d_cpu"

    good = tmp_path / "good.json"
    good.write_text('{"utad": {"lambda_cls": 10}}')
    assert bench_synthesis.read_variant("lcls10", str(good)) == {"utad": {"lambda_cls": 10}}
    cases = {"typo": ('{"utad": {"lamda_cls": 10}}', "utad.lamda_cls"),
             "budget": ('{"nnunet": {"num_epochs": 3}}', "nnunet.num_epochs"),
             "list": ("[1, 2]", "JSON object"), "broken": ("{", "not valid JSON")}
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        with pytest.raises(SystemExit, match=message):
            bench_synthesis.read_variant("x", str(path))
    with pytest.raises(SystemExit, match="cannot read"):
        bench_synthesis.read_variant("x", str(tmp_path / "missing.json"))
    with pytest.raises(SystemExit, match="label"):
        bench_synthesis.read_variant("../up", str(good))
    assert os.environ.get(bench_synthesis.OVERRIDE_ENV) == before  # the check leaves the environment as it was


def test_benchmark_dry_run_writes_nothing(tmp_path, monkeypatch, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import bench_synthesis
    from bench_common import REGIMES

    regime = REGIMES["converged"]
    preprocessed = tmp_path / "nnUNet_preprocessed" / regime.dataset_name
    preprocessed.mkdir(parents=True)
    plans = json.dumps({"configurations": {"2d": {"patch_size": [60, 52]}}})
    (preprocessed / "nnUNetPlans.json").write_text(plans)
    teacher = bench_synthesis.synthesis_model_dir(tmp_path, regime, "UTADNetTeacherTrainer") / "fold_0"
    teacher.mkdir(parents=True)
    (teacher / "checkpoint_latest.pth").write_bytes(b"x")  # interrupted: goes on with --c
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    monkeypatch.setattr(bench_synthesis, "prepare", lambda *a, **k: pytest.fail("--dry-run prepared data"))
    bench_synthesis.main(["--work-dir", str(tmp_path), "--regime", "converged", "--epochs", "200", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["2d configuration: run nnUNetv2_preprocess -c 2d", "UTADNetTeacherTrainer: continue",
                         "UTADNetStudentTrainer: train"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing created or rewritten
    assert (preprocessed / "nnUNetPlans.json").read_text() == plans


def _planned_benchmark_folder(work):
    """bench_synthesis and the converged regime, with a work folder that has nnU-Net's plans (so that a dry run
    reports every step instead of stopping at the phantoms)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import bench_synthesis
    from bench_common import REGIMES

    regime = REGIMES["converged"]
    preprocessed = work / "nnUNet_preprocessed" / regime.dataset_name
    preprocessed.mkdir(parents=True)
    (preprocessed / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"2d": {"patch_size": [60, 52]}}}))
    return bench_synthesis, regime


def test_benchmark_without_downstream_trains_no_segmentation_model(tmp_path, monkeypatch, capsys):
    bench_synthesis, regime = _planned_benchmark_folder(tmp_path)
    monkeypatch.setattr(bench_synthesis, "train_segmentation", lambda *a, **k: pytest.fail("segmentation trained"))
    monkeypatch.setattr(bench_synthesis, "run_downstream", lambda *a, **k: pytest.fail("downstream evaluated"))
    bench_synthesis.main(["--work-dir", str(tmp_path), "--regime", "converged", "--no-downstream", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert "downstream: skipped (--no-downstream)" in lines
    assert not any(line.startswith(("nnUNetTrainer", "downstream zero")) for line in lines)
    with pytest.raises(SystemExit):
        bench_synthesis.main(["--work-dir", str(tmp_path), "--no-downstream", "--dropout", "--dry-run"])
    assert "cannot go with --no-downstream" in capsys.readouterr().err


def test_benchmark_teacher_epochs_go_to_the_teacher_only(tmp_path, monkeypatch, capsys):
    import argparse

    bench_synthesis, regime = _planned_benchmark_folder(tmp_path)
    epochs = {}
    monkeypatch.setattr(bench_synthesis, "train_synthesis",
                        lambda work, regime, env, trainer, n, *a, **k: epochs.setdefault(trainer, n) and "run")
    common = ["--work-dir", str(tmp_path), "--regime", "converged", "--no-downstream", "--dry-run"]
    bench_synthesis.main([*common, "--epochs", "30", "--teacher-epochs", "90"])
    assert epochs == {"UTADNetTeacherTrainer": 90, "UTADNetStudentTrainer": 30}
    epochs.clear()
    bench_synthesis.main([*common, "--epochs", "30"])  # without it, both the same
    assert epochs == {"UTADNetTeacherTrainer": 30, "UTADNetStudentTrainer": 30}
    for bad in ("-2", "0"):
        with pytest.raises(SystemExit):
            bench_synthesis.main([*common, "--teacher-epochs", bad])
        assert f"must be at least 1, got 40 and {bad}" in capsys.readouterr().err
    # the report's header and budget record say what each trainer had
    for teacher, header in ((90, "Teacher 90, student 30 epochs x 50 iterations on"),
                            (30, "Teacher and student: 30 epochs x 50 iterations each on")):
        args = argparse.Namespace(epochs=30, teacher_epochs=teacher, iterations=50, downstream=False)
        report = bench_synthesis.write_report(tmp_path, regime, args, {}, {}, variant=f"t{teacher}")
        assert header in report.read_text()
        budget = json.loads(report.with_suffix(".json").read_text())["budget"]
        assert budget == {"epochs": 30, "teacher_epochs": teacher, "iterations": 50}
    # a finished model is reused whatever the budget asked now: the header says what the models were trained with
    for trainer, trained in (("UTADNetTeacherTrainer", 80), ("UTADNetStudentTrainer", 40)):
        fold = bench_synthesis.synthesis_model_dir(tmp_path, regime, trainer, "t30") / "fold_0"
        fold.mkdir(parents=True)
        (fold / "debug.json").write_text(json.dumps({"num_epochs": str(trained), "num_iterations_per_epoch": "50"}))
    args = argparse.Namespace(epochs=30, teacher_epochs=30, iterations=50, downstream=False)
    text = bench_synthesis.write_report(tmp_path, regime, args, {}, {}, variant="t30").read_text()
    assert "Teacher 80, student 40 epochs x 50 iterations on" in text
    assert "this run asked for teacher 30, student 30 epochs x 50 iterations" in text
    budget = json.loads((tmp_path / "synthesis_converged_t30" / "report.json").read_text())["budget"]
    assert budget == {"epochs": 40, "teacher_epochs": 80, "iterations": 50}


def test_benchmark_fallback_section_by_hand(tmp_path, capsys):
    bench_synthesis, _ = _planned_benchmark_folder(tmp_path / "work")

    def pair(synthesis, histogram, zero):
        return {"synthesis": {"ssim_brain": synthesis}, "histogram_matching": {"ssim_brain": histogram},
                "zero_fill": {"ssim_brain": zero}}

    student = {"t1->t1ce": pair(0.40, 0.60, 0.0), "t2->t1": pair(0.50, 0.20, 0.0), "all->t1": pair(0.55, 0.3, 0.0)}
    fallback = {"t1->t1ce": pair(0.62, 0.60, 0.0), "t2->t1": pair(0.50, 0.20, 0.0), "all->t1": pair(0.58, 0.3, 0.0)}
    assert bench_synthesis.fallback_section(tmp_path, {}, {}) == []  # nothing evaluated with the fallback
    for name, per_pair, taken in (("evaluate_synthesis", student, []),
                                  ("evaluate_synthesis_fallback", fallback, ["t1->t1ce"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"per_pair": per_pair, "histogram_fallback": taken}))
    full = "t1+t1ce+t2+flair"
    downstream = {k: {"per_combination": {"t1+t2+flair": {"WT_Dice": w, "TC_Dice": 0.5, "ET_Dice": 0.1},
                                          full: {"WT_Dice": 0.9, "TC_Dice": 0.7, "ET_Dice": 0.8}}}
                  for k, w in (("zero", 0.80), ("synthesized", 0.70), ("synthesized_fallback", 0.85))}
    report = {}
    lines = bench_synthesis.fallback_section(tmp_path, downstream, report)
    assert "Pairs taken over by histogram matching (the student's validation file): t1->t1ce." in lines
    assert "| t1->t1ce | 0.4000 | 0.6200 | 0.6000 | 0.0000 |" in lines
    means = report["fallback"]["single_pair_means"]  # the two single-source pairs, by hand
    assert means == pytest.approx({"student": 0.45, "fallback": 0.56, "histogram": 0.40, "zero": 0.0})
    assert report["fallback"]["pairs_above_both_baselines"] == {"student": 1, "fallback": 2}
    assert "| t1+t2+flair | 80.0 / 50.0 / 10.0 | 70.0 / 50.0 / 10.0 | 85.0 / 50.0 / 10.0 |" in lines
    assert not any(line.startswith(f"| {full}") for line in lines)
    # --with-fallback adds its two steps (dry run)
    bench_synthesis.main(["--work-dir", str(tmp_path / "work"), "--regime", "converged", "--with-fallback",
                          "--dry-run"])
    out = capsys.readouterr().out.splitlines()
    assert "evaluate-synthesis, histogram fallback: run" in out
    assert "downstream synthesised, histogram fallback: run" in out


def test_benchmark_segmentation_model_is_checked_and_gets_its_own_evaluations_and_report(tmp_path, monkeypatch,
                                                                                         capsys):
    import argparse

    bench_synthesis, regime = _planned_benchmark_folder(tmp_path / "work")

    def model_folder(name: str, dataset: str = regime.dataset_name, finished: bool = True):
        folder = tmp_path / "models" / dataset / name
        (folder / "fold_0").mkdir(parents=True)
        (folder / "plans.json").write_text(json.dumps({"dataset_name": dataset}))
        if finished:
            (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"x")
        return folder

    good = model_folder(f"ModalityDropoutTrainer__nnUNetPlans__{regime.configuration}")
    bad = {"does not exist": model_folder(f"Interrupted__nnUNetPlans__{regime.configuration}", finished=False),
           "is a model of Dataset001_Other": model_folder(f"X__nnUNetPlans__{regime.configuration}",
                                                          "Dataset001_Other"),
           f"not of {regime.dataset_name} \\({regime.configuration}\\)": model_folder("Y__nnUNetPlans__2d")}
    for message, folder in bad.items():
        with pytest.raises(SystemExit, match=message):
            bench_synthesis.given_segmentation_model(regime, "e480", str(folder))
    with pytest.raises(SystemExit, match="letters, digits"):
        bench_synthesis.given_segmentation_model(regime, "../up", str(good))
    common = ["--work-dir", str(tmp_path / "work"), "--regime", "converged", "--dry-run"]
    with pytest.raises(SystemExit):
        bench_synthesis.main([*common, "--no-downstream", "--segmentation-model", "e480", str(good)])
    assert "cannot go with --no-downstream" in capsys.readouterr().err
    # a dry run: no segmentation model trained, each downstream evaluation of the full-modality model gets the label
    calls = []
    monkeypatch.setattr(bench_synthesis, "train_segmentation", lambda *a, **k: pytest.fail("segmentation trained"))
    monkeypatch.setattr(bench_synthesis, "run_downstream", lambda *a: calls.append((a[2], a[-1])) or "run")
    bench_synthesis.main([*common, "--segmentation-model", "e480", str(good)])
    assert f"nnUNetTrainer: given: {good}" in capsys.readouterr().out.splitlines()
    assert calls == [("zero", ("e480", good)), ("synthesized", ("e480", good))]
    dirs = {name: bench_synthesis.downstream_dir(tmp_path, regime, name, fill, "v", "e480").name
            for name, (_, fill) in bench_synthesis.DOWNSTREAM.items()}
    assert dirs == {"zero": "downstream_zero_e480", "synthesized": "downstream_synthesized_e480",
                    "dropout": "downstream_dropout", "synthesized_fallback": "downstream_synthesized_fallback_e480"}
    # the report: its own files, from the labelled evaluations only
    full = {"WT_Dice": 0.9, "TC_Dice": 0.8, "ET_Dice": 0.6}
    for name, wt in (("zero", 0.3), ("synthesized", 0.855)):
        folder = bench_synthesis.downstream_dir(tmp_path, regime, name, bench_synthesis.DOWNSTREAM[name][1], None,
                                                "e480")
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"per_combination": {
            "t1+t1ce+t2": {"WT_Dice": wt, "TC_Dice": 0.8, "ET_Dice": 0.6}, "t1+t1ce+t2+flair": full}}))
    args = argparse.Namespace(epochs=40, teacher_epochs=40, iterations=50, downstream=True)
    assert "Downstream" not in bench_synthesis.write_report(tmp_path, regime, args, {}, {}).read_text()
    report = bench_synthesis.write_report(tmp_path, regime, args, {}, {}, segmentation=("e480", good))
    assert report.name == "report_e480.md"
    text = report.read_text()
    assert f"segmentation: `e480` (`{good}`, given with --segmentation-model)." in text
    assert "## Downstream segmentation (`e480` trained on all four sequences)" in text
    assert "| t1+t1ce+t2 | 30.0 / 85.5 / 0.950 | 80.0 / 80.0 / 1.000 | 60.0 / 60.0 / 1.000 |" in text
    assert (report.parent / "figures" / "downstream_e480.png").is_file()
    assert json.loads(report.with_suffix(".json").read_text())["segmentation_model"]["label"] == "e480"
