"""determine-postprocessing: the enhancing-tumour volume threshold, checked against a brute-force search."""

import json
import pickle

import numpy as np
import pytest
from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing

from nnunet_missingmod.cli import main
from nnunet_missingmod.data.nifti import write_nifti
from nnunet_missingmod.evaluation.postprocessing import (
    NNUNET_BRATS_THRESHOLDS,
    Prediction,
    choose_threshold,
    determine_postprocessing,
    load_postprocessing,
    relabel_small_label,
    threshold_curve,
)
from tests.inference.helpers import AFFINE, SHAPE, fake_model

COMBINATIONS = ("t1ce", "t1+t1ce+t2+flair")


def _tumour(et_voxels: int, seed: int) -> np.ndarray:
    """Edema around a core, with ``et_voxels`` enhancing voxels at random places of the core."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1:9, 1:8, 1:7] = 1
    labels[2:8, 2:7, 2:6] = 2  # 120 voxels of core
    core = np.argwhere(labels == 2)
    chosen = np.random.default_rng(seed).choice(len(core), size=et_voxels, replace=False)
    labels[tuple(core[chosen].T)] = 3
    return labels


def _hand_dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    total = 0
    intersection = 0
    for r, p in zip(reference.ravel(), prediction.ravel(), strict=True):
        total += int(r) + int(p)
        intersection += int(r and p)
    return 1.0 if total == 0 else 2 * intersection / total


@pytest.fixture
def evaluation(tmp_path, monkeypatch):
    """A fake evaluate-missing output of the validation cases: 5 cases x 2 combinations, small false ET in the
    cases without ET, true ET of several sizes in the others."""
    model = fake_model(tmp_path / "results")
    (model / "plans.json").write_text(json.dumps({"image_reader_writer": "SimpleITKIO"}))
    raw = tmp_path / "raw" / model.parent.name
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    folder = tmp_path / "eval"
    # case: (reference ET voxels, predicted ET voxels per combination)
    layout = {"Case_0": (0, (6, 14)), "Case_1": (0, (3, 0)), "Case_2": (30, (9, 28)), "Case_3": (50, (40, 55)),
              "Case_4": (20, (17, 25))}
    for index, (case, (reference_et, predicted)) in enumerate(layout.items()):
        reference = _tumour(reference_et, seed=index)
        (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
        write_nifti(raw / "labelsTr" / f"{case}.nii.gz", reference, AFFINE)
        for combination, et in zip(COMBINATIONS, predicted, strict=True):
            (folder / "predictions" / combination).mkdir(parents=True, exist_ok=True)
            write_nifti(folder / "predictions" / combination / f"{case}.nii.gz", _tumour(et, seed=10 + index),
                        AFFINE)
    (folder / "summary.json").write_text(json.dumps({"model": str(model), "fold": 0, "split": "val"}))
    return folder, raw / "labelsTr"


def _brute_force(folder, labels, thresholds):
    """Mean ET Dice for each threshold, by relabelling the arrays and a hand-computed Dice."""
    import nibabel as nib

    pairs = [(np.asarray(nib.load(labels / f.name).dataobj), np.asarray(nib.load(f).dataobj))
             for f in sorted(folder.glob("predictions/*/*.nii.gz"))]
    return {threshold: np.mean([_hand_dice(r == 3, relabel_small_label(p, 3, 2, threshold) == 3) for r, p in pairs])
            for threshold in thresholds}


def test_relabel_small_label_keeps_whole_tumour_and_core():
    segmentation = _tumour(5, seed=0)
    before = segmentation.copy()
    relabelled = relabel_small_label(segmentation, label=3, replace_with=2, min_voxels=6)
    assert np.array_equal(segmentation, before)  # the input is not modified
    assert (relabelled == 3).sum() == 0 and (relabelled == 2).sum() == 120
    assert np.array_equal(relabelled > 0, before > 0) and np.array_equal(relabelled >= 2, before >= 2)
    assert np.array_equal(relabel_small_label(segmentation, 3, 2, min_voxels=5), before)  # 5 is not below 5
    assert np.array_equal(relabel_small_label(_tumour(0, 0), 3, 2, min_voxels=100), _tumour(0, 0))


def test_choose_threshold_by_hand():
    false_14 = Prediction("a", "t1ce", volume=14, reference_volume=0, dice=0.0)
    true_15 = Prediction("b", "t1ce", volume=15, reference_volume=20, dice=0.8)
    # thresholds 0, 15, 16 give mean Dice 0.4, (1 + 0.8) / 2 = 0.9 and (1 + 0) / 2 = 0.5
    thresholds, scores = threshold_curve([false_14, true_15])
    assert thresholds == [0, 15, 16] and scores == pytest.approx([0.4, 0.9, 0.5])
    every = range(0, 20)
    assert choose_threshold([false_14, true_15], every) == 15
    # nnU-Net's candidates: 0 and 10 give 0.4, 50 and above 0.5
    assert choose_threshold([false_14, true_15]) == 50
    missed = Prediction("c", "t1", volume=8, reference_volume=10, dice=0.0)  # removing it changes nothing
    false_5 = Prediction("d", "t1", volume=5, reference_volume=0, dice=0.0)
    assert choose_threshold([false_5, missed], every) == 6  # 6 to 19 all give 0.5: the smallest
    assert choose_threshold([false_5, missed]) == 10
    assert choose_threshold([true_15], every) == 0 and choose_threshold([true_15]) == 0
    with pytest.raises(ValueError, match="no predictions"):
        choose_threshold([])
    for bad in ([], [10, -1], [2.5], [True]):
        with pytest.raises(ValueError, match="whole numbers of voxels"):
            choose_threshold([true_15], bad)


def test_threshold_is_the_smallest_best_of_a_brute_force_search(evaluation, capsys):
    folder, labels = evaluation
    default = _brute_force(folder, labels, NNUNET_BRATS_THRESHOLDS)
    assert main(["determine-postprocessing", str(folder)]) == 0
    best = max(default.values())
    expected = min(t for t, s in default.items() if s == pytest.approx(best))
    assert f"below {expected} voxels" in capsys.readouterr().out
    result = json.loads((folder / "postprocessing.json").read_text())
    assert result["min_voxels"] == expected == 10  # removes the false 3 and 6 and the true 9
    assert result["candidates"] == pytest.approx({str(t): s for t, s in default.items()})
    # every threshold up to the largest predicted volume + 1
    scores = _brute_force(folder, labels, range(57))
    best = max(scores.values())
    expected = min(t for t, s in scores.items() if s == pytest.approx(best))
    assert main(["determine-postprocessing", str(folder), "--thresholds", *map(str, range(57))]) == 0
    result = json.loads((folder / "postprocessing.json").read_text())
    assert result["min_voxels"] == expected == 15  # removes the false 14, keeps the true 17
    assert result["dice_before"] == pytest.approx(scores[0])
    assert result["dice_after"] == pytest.approx(best)
    # the false ET of Case_0 (6, 14 voxels) and Case_1 (3) go, and the true 9 voxels of Case_2 with t1ce
    assert result["relabelled"] == {"without_label_in_reference": 3, "with_label_in_reference": 1}
    assert result["chosen_on"]["predictions"] == 10 and result["chosen_on"]["cases"] == 5
    assert list(result["per_combination"]) == list(COMBINATIONS)
    assert (folder / "postprocessing.png").read_bytes()[:4] == b"\x89PNG"
    # nnU-Net's own apply_postprocessing (nnUNetv2_apply_postprocessing) runs the pickle
    functions, kwargs = pickle.loads((folder / "postprocessing.pkl").read_bytes())
    segmentation = _tumour(14, seed=3)
    assert np.array_equal(apply_postprocessing(segmentation, functions, kwargs),
                          np.where(segmentation == 3, 2, segmentation))
    assert np.array_equal(apply_postprocessing(_tumour(15, 3), functions, kwargs), _tumour(15, 3))


def test_no_threshold_when_none_helps(evaluation, tmp_path):
    folder, labels = evaluation
    for case in ("Case_0", "Case_1"):  # without false ET nothing is gained by removing any
        for combination in COMBINATIONS:
            write_nifti(folder / "predictions" / combination / f"{case}.nii.gz", _tumour(0, 0), AFFINE)
    result = determine_postprocessing(folder, labels)
    assert result["min_voxels"] == 0 and not result["applied"]
    assert result["dice_after"] == pytest.approx(result["dice_before"])
    assert load_postprocessing(folder / "postprocessing.pkl") == ([], [])


def test_refuses_test_split_missing_predictions_labels_and_shapes(evaluation):
    folder, labels = evaluation
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "split": "test"}))
    with pytest.raises(ValueError, match="scored the test cases"):
        determine_postprocessing(folder)
    (folder / "summary.json").write_text(json.dumps({**summary, "postprocessing": {"file": "pp.pkl"}}))
    with pytest.raises(ValueError, match="post-processing already"):
        determine_postprocessing(folder)
    (folder / "summary.json").write_text(json.dumps(summary))
    (labels / "Case_3.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="Case_3"):
        determine_postprocessing(folder)
    write_nifti(labels / "Case_3.nii.gz", np.zeros((4, 4, 4), np.uint8), AFFINE)
    with pytest.raises(ValueError, match=r"Case_3\.nii\.gz has shape"):
        determine_postprocessing(folder)
    assert not (folder / "postprocessing.pkl").exists()  # nothing written before every check passed
    for file in folder.glob("predictions/*/*"):
        file.unlink()
    with pytest.raises(FileNotFoundError, match="--save-predictions"):
        determine_postprocessing(folder)
    with pytest.raises(FileNotFoundError, match="summary.json"):
        determine_postprocessing(folder / "predictions")
    with pytest.raises(ValueError, match="whole numbers of voxels"):  # checked before any file is read
        determine_postprocessing(folder / "predictions", candidates=[10, -5])


def test_a_failure_while_writing_leaves_no_file(evaluation, monkeypatch):
    from nnunet_missingmod.evaluation import postprocessing

    folder, labels = evaluation
    before = sorted(p.name for p in folder.iterdir())

    def broken_plot(result, predictions, png):
        png.write_bytes(b"half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(postprocessing, "curve_png", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        determine_postprocessing(folder, labels)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_load_postprocessing_names_the_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        load_postprocessing(tmp_path / "missing.pkl")
    (tmp_path / "garbage.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="garbage.pkl is not a post-processing pickle"):
        load_postprocessing(tmp_path / "garbage.pkl")
    (tmp_path / "shape.pkl").write_bytes(pickle.dumps(([relabel_small_label], [])))
    with pytest.raises(ValueError, match="shape.pkl must hold"):
        load_postprocessing(tmp_path / "shape.pkl")
    (tmp_path / "kinds.pkl").write_bytes(pickle.dumps((["relabel_small_label"], [{}])))
    with pytest.raises(ValueError, match="kinds.pkl: the first list must hold functions"):
        load_postprocessing(tmp_path / "kinds.pkl")
