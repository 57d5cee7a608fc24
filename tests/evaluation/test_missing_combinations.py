"""evaluate-missing and compare on the session's trained model, checked against independent computations."""

import csv
import json
import pickle

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from medpy.metric import binary as medpy_binary

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.cli import ERROR_EXIT_CODE, main
from nnunet_missingmod.evaluation.missing_combinations import CombinationMismatchWarning, compare, evaluate_missing
from nnunet_missingmod.inference.predict import predict_folder
from tests.conftest import E2E_NAME

TRAINER_FOLDER = "ModalityDropoutTrainer__nnUNetPlans__3d_cpu"


@pytest.fixture(scope="module")
def evaluated(trained_model, tmp_path_factory):
    work, _, _ = trained_model
    env = json.loads((work / "env.json").read_text())
    with pytest.MonkeyPatch.context() as mp:
        for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(key, env[key])
        out = evaluate_missing(work / "nnUNet_results" / E2E_NAME / TRAINER_FOLDER, 0, split="test",
                               output=tmp_path_factory.mktemp("eval") / "test", save_predictions=True,
                               use_mirroring=False, progress=False)
    return work, env, out


def _rows(out):
    with open(out / "per_case.csv") as f:
        return list(csv.DictReader(f))


def _read(file):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(file)))


def _assert_dice_is_medpys(row, reference, prediction):
    """Each region's Dice in a per_case.csv row equals medpy's on the label maps (1 when both are empty)."""
    for region, members in mods.REGIONS.items():
        ref, pred = np.isin(reference, members), np.isin(prediction, members)
        expected = 1.0 if not ref.any() and not pred.any() else medpy_binary.dc(pred, ref)
        assert float(row[f"{region}_Dice"]) == pytest.approx(expected)


def test_all_fifteen_combinations_per_case_and_averages(evaluated):
    _, _, out = evaluated
    rows = _rows(out)
    assert len(rows) == 2 * 15
    assert {r["combination"] for r in rows} == {mods.combination_name(c) for c in mods.all_combinations()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == 2 and len(summary["per_combination"]) == 15
    for name, values in summary["per_combination"].items():
        dice_wt = [float(r["WT_Dice"]) for r in rows if r["combination"] == name]
        assert values["WT_Dice"] == pytest.approx(sum(dice_wt) / len(dice_wt))
    average_et_hd = np.mean([v["ET_HD95"] for v in summary["per_combination"].values()])
    assert summary["average"]["ET_HD95"] == pytest.approx(average_et_hd)
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_table_has_paper_layout(evaluated):
    _, _, out = evaluated
    table = (out / "table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| |"))
    assert header.split("|")[2].strip() == "1" and header.rstrip(" |").endswith("Avg")
    flair = next(line for line in table.splitlines() if line.startswith("| FLAIR |"))
    marks = [c.strip() for c in flair.split("|")[2:-2]]
    assert marks[:4] == ["–", "–", "–", "✓"]  # single modalities in channel order: t1, t1ce, t2, flair
    assert marks.count("✓") == 8  # FLAIR is in 8 of the 15 combinations
    for region in ("WT", "TC", "ET"):
        assert any(line.startswith(f"| {region} |") for line in table.splitlines())


def test_scores_match_an_independent_prediction_and_medpy(evaluated, tmp_path):
    work, env, out = evaluated
    source = work / "nnUNet_raw" / E2E_NAME / "imagesTs"
    predict_folder(source, tmp_path / "pred", work / "nnUNet_results" / E2E_NAME / TRAINER_FOLDER, folds=[0],
                   use_mirroring=False, available=(1, 3), progress=False)
    rows = {r["case"]: r for r in _rows(out) if r["combination"] == "t1ce+flair"}
    for case, row in rows.items():
        predicted = _read(tmp_path / "pred" / f"{case}.nii.gz")
        saved = _read(out / "predictions" / "t1ce+flair" / f"{case}.nii.gz")
        # batched windows differ from nnU-Net's one-at-a-time path only by float rounding
        assert np.mean(saved == predicted) > 0.999
        _assert_dice_is_medpys(row, _read(work / "nnUNet_raw" / E2E_NAME / "labelsTs" / f"{case}.nii.gz"), saved)


def test_validation_split_cli_and_compare(evaluated, tmp_path, monkeypatch, capsys):
    work, env, test_out = evaluated
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, env[key])
    code = main(["evaluate-missing", "-d", "980", "-c", "3d_cpu", "-tr", "ModalityDropoutTrainer", "-f", "0",
                 "--combinations", "flair,t1+t1ce+t2+flair", "-o", str(tmp_path / "val"), "-device", "cpu",
                 "--disable_tta"])
    assert code == 0
    splits = json.loads((work / "nnUNet_preprocessed" / E2E_NAME / "splits_final.json").read_text())
    rows = _rows(tmp_path / "val")
    assert sorted({r["case"] for r in rows}) == sorted(splits[0]["val"])
    assert sorted({r["combination"] for r in rows}) == ["flair", "t1+t1ce+t2+flair"]
    assert "Dice (%) per modality combination" in capsys.readouterr().out
    with pytest.warns(CombinationMismatchWarning, match="val lacks t1, t1ce, t2, t1[+]t1ce"):  # 2 of the 15 here
        markdown, png = compare([test_out, tmp_path / "val"], tmp_path / "cmp", labels=["test", "val"])
    lines = markdown.read_text().splitlines()
    assert lines[2].startswith("| run | WT Dice") and lines[4].startswith("| test † (15 of 15 combinations) |")
    assert lines[5].startswith("| val † (2 of 15 combinations) |") and lines[-1].startswith("† **Warning:**")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_batched_combinations_match_one_at_a_time(trained_model):
    from nnunet_missingmod.inference.predict import MissingModalityPredictor, find_cases

    work, _, _ = trained_model
    predictor = MissingModalityPredictor(work / "nnUNet_results" / E2E_NAME / TRAINER_FOLDER, folds=[0],
                                         use_mirroring=False)
    case = find_cases(work / "nnUNet_raw" / E2E_NAME / "imagesTs")[0]
    data, _ = predictor.preprocess(*predictor.read_case(case))
    combinations = [(3,), (1, 3), (0, 2), (0, 1, 2, 3)]
    batched = predictor.predict_logits_many(data, combinations, batch_size=3)
    for combination, logits in zip(combinations, batched, strict=True):
        single = predictor.predict_logits(data, combination).float()
        # Both paths accumulate the windows in float16 as nnU-Net does, and divide by the Gaussian weight sum, which
        # is tiny at the image border: there a rounding difference of the convolutions (batched vs single) can grow
        # to a few hundredths. Everywhere else they agree to 1e-2, and the segmentations agree.
        difference = (logits - single).abs()
        assert (difference > 1e-2).float().mean() <= 1e-4, combination
        assert difference.max() <= 0.25, combination
        assert (logits.argmax(0) == single.argmax(0)).float().mean() >= 0.9999, combination
    assert not torch.allclose(batched[0], batched[3])  # the masks reach the network


def test_postprocessing_is_applied_before_scoring_and_saving(evaluated, tmp_path, monkeypatch, capsys):
    from nnunet_missingmod.evaluation.postprocessing import relabel_small_label

    work, env, unprocessed = evaluated
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, env[key])
    pkl = tmp_path / "postprocessing.pkl"  # every edema voxel becomes core: TC changes, WT does not
    pkl.write_bytes(pickle.dumps(([relabel_small_label], [{"label": 1, "replace_with": 2, "min_voxels": 10**9}])))
    names = ["t1ce+flair", "t1+t1ce+t2+flair"]
    assert main(["evaluate-missing", "-d", "980", "-c", "3d_cpu", "-tr", "ModalityDropoutTrainer", "-f", "0",
                 "--split", "test", "--combinations", ",".join(names), "-o", str(tmp_path / "pp"), "-device", "cpu",
                 "--disable_tta", "--save-predictions", "--postprocessing", str(pkl)]) == 0
    assert "per-case CSV" in capsys.readouterr().out
    summary = json.loads((tmp_path / "pp" / "summary.json").read_text())
    assert summary["postprocessing"] == {"file": str(pkl), "functions": ["relabel_small_label"],
                                         "kwargs": [{"label": 1, "replace_with": 2, "min_voxels": 10**9}]}
    edema_seen = False
    for row in _rows(tmp_path / "pp"):
        case, combination = row["case"], row["combination"]
        before = _read(unprocessed / "predictions" / combination / f"{case}.nii.gz")
        after = _read(tmp_path / "pp" / "predictions" / combination / f"{case}.nii.gz")
        edema_seen |= bool((before == 1).any())
        assert not (after == 1).any()
        assert np.mean(after == np.where(before == 1, 2, before)) > 0.999  # up to batched-window rounding
        _assert_dice_is_medpys(row, _read(work / "nnUNet_raw" / E2E_NAME / "labelsTs" / f"{case}.nii.gz"), after)
    assert edema_seen  # the model predicts edema, so the relabelling was put to the test
    code = main(["evaluate-missing", "-d", "980", "-c", "3d_cpu", "-tr", "ModalityDropoutTrainer", "--split", "test",
                 "-o", str(tmp_path / "bad"), "--postprocessing", str(tmp_path / "pp" / "summary.json")])
    assert code == ERROR_EXIT_CODE and "summary.json is not a post-processing pickle" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
