"""scripts/synthesis_ceiling.py: the noise-free oracles against hand computations, the histogram-matching baseline
against evaluate-synthesis's own, and bad input."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.data.phantom import generate_case, make_phantom_dataset
from nnunet_missingmod.evaluation.synthesis import evaluate_synthesis
from nnunet_missingmod.inference import synthesize as synthesis
from tests.conftest import FAST_CONFIG
from tests.inference.test_synthesize import StandInSynthesisTrainer, make_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import synthesis_ceiling as ceiling  # noqa: E402

SEED = 5


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Two held-out 4 mm phantoms (and one training case, which the oracles do not read)."""
    return make_phantom_dataset(975, num_cases=1, num_test=2, seed=SEED, config=FAST_CONFIG,
                                raw_folder=tmp_path_factory.mktemp("ceiling") / "raw", progress=False)


@pytest.fixture(scope="module")
def rows(phantoms) -> list[dict]:
    return ceiling.score_cases(phantoms, ceiling.held_out_cases(phantoms, 10), progress=False)


def brain_ssim_by_hand(real: np.ndarray, other: np.ndarray) -> float:
    """SSIM over the brain of two (x, y, z) volumes, each scaled by its own 0.5-99.5 percentiles of the brain."""
    brain = real != 0
    scaled = []
    for image in (real.astype(np.float64), other.astype(np.float64)):
        low, high = np.percentile(image[brain], (0.5, 99.5))
        scaled.append(np.where(brain, (np.clip(image, low, high) - low) / (high - low), 0.0))
    _, full = structural_similarity(*scaled, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, full=True)
    return float(full[brain].mean())


def test_oracles_against_volumes_generated_and_read_independently(phantoms, rows):
    case = "Phantom_0001"  # the first held-out case (index 1, after the one training case)
    for name, changes in ceiling.ORACLES.items():
        oracle = generate_case(SEED, 1, dataclasses.replace(FAST_CONFIG, **changes)).images
        for channel, modality in enumerate(mods.MODALITIES):
            real = np.asarray(nib.load(phantoms / "imagesTs" / f"{case}_{channel:04d}.nii.gz").dataobj)
            brain = real != 0
            assert not np.array_equal(real[brain], oracle[channel][brain])  # the oracle is not the file
            row, = [r for r in rows if r["case"] == case and r["method"] == name and r["target"] == modality]
            assert row["ssim_brain"] == pytest.approx(brain_ssim_by_hand(real, oracle[channel]), abs=1e-6)
    per_target = ceiling.summarise(rows, {})["per_target"]
    for modality in mods.MODALITIES:  # knowing the bias field helps; neither oracle is the image itself
        assert 0 < per_target[modality]["noise_and_bias_free"]["ssim_brain"] < \
            per_target[modality]["noise_free"]["ssim_brain"] < 1


def test_histogram_matching_is_evaluate_synthesis_baseline(phantoms, rows, tmp_path):
    model = synthesis.load_synthesis_model(make_model(tmp_path / "model"), trainer_class=StandInSynthesisTrainer)
    summary = json.loads((evaluate_synthesis(phantoms / "imagesTs", model, tmp_path / "eval", combined=False,
                                             examples=0, progress=False) / "summary.json").read_text())
    ours = ceiling.summarise(rows, {})["per_pair"]
    assert len(ours) == 12
    for pair, cell in ours.items():
        for metric in ("ssim_brain", "psnr_brain", "brasyn_ssim_tumour"):
            assert cell["histogram_matching"][metric] == pytest.approx(
                summary["per_pair"][pair]["histogram_matching"][metric], abs=1e-12), (pair, metric)


def test_main_writes_the_tables_and_the_figure_with_an_evaluation(phantoms, tmp_path, monkeypatch):
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    per_pair = {f"{s}->{t}": {"synthesis": {m: 0.4321 if (s, t) == ("t1", "t1ce") else 0.1 for m in
                                            ceiling.METRICS}}
                for s in mods.MODALITIES for t in mods.MODALITIES if s != t}
    (evaluation / "summary.json").write_text(json.dumps({"num_cases": 2, "per_pair": per_pair}))
    ceiling.main(["--dataset", str(phantoms), "-o", str(tmp_path / "out"), "--evaluation", "student",
                  str(evaluation)])
    table = (tmp_path / "out" / "ceiling.md").read_text()
    assert "| t1->t1ce |" in table and "0.432" in table
    saved = json.loads((tmp_path / "out" / "ceiling.json").read_text())
    assert saved["cases"] == ["Phantom_0001", "Phantom_0002"]
    assert saved["per_pair"]["t1->t1ce"]["student"]["ssim_brain"] == 0.4321
    assert (tmp_path / "out" / "ceiling.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="scored 3 case"):  # an evaluation of other cases
        (evaluation / "summary.json").write_text(json.dumps({"num_cases": 3, "per_pair": per_pair}))
        ceiling.main(["--dataset", str(phantoms), "-o", str(tmp_path / "out2"), "--evaluation", "student",
                      str(evaluation)])


def test_a_modified_case_and_a_dataset_without_its_record_are_refused(phantoms, tmp_path):
    import shutil

    copy = tmp_path / phantoms.name
    shutil.copytree(phantoms, copy)
    with pytest.raises(SystemExit, match="Phantom_0002 .* differs from the phantom generated"):
        file = copy / "imagesTs" / "Phantom_0002_0003.nii.gz"
        image = nib.load(file)
        data = np.asarray(image.dataobj).copy()
        data[data > 0] += 1
        nib.save(nib.Nifti1Image(data, image.affine, image.header), file)
        ceiling.score_cases(copy, ["Phantom_0001", "Phantom_0002"], progress=False)
    (copy / "labelsTs" / "Phantom_0001.nii.gz").unlink()
    with pytest.raises(SystemExit, match="Phantom_0001.nii.gz does not exist: the tumour metrics need the labels"):
        ceiling.score_cases(copy, ["Phantom_0001"], progress=False)
    with pytest.raises(SystemExit, match="Case_7: not a case name the phantom generator writes"):
        ceiling.regenerate(SEED, FAST_CONFIG, "Case_7")
    (copy / "phantom_cases.json").unlink()
    with pytest.raises(SystemExit, match="phantom_cases.json does not exist"):
        ceiling.main(["--dataset", str(copy), "-o", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
