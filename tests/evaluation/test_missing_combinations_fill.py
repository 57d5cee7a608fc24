"""evaluate-missing --fill synthesize: missing channels synthesised instead of zero-filled, checked against a
separate path (``synthesize`` writing files, then ``predict``), plus its option errors."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_missingmod import cli
from nnunet_missingmod.evaluation.missing_combinations import evaluate_missing
from nnunet_missingmod.inference import synthesize as synthesis
from nnunet_missingmod.inference.predict import MissingModalityPredictor, predict_folder
from tests.conftest import E2E_NAME
from tests.evaluation.test_evaluate_errors import setup  # noqa: F401 (fixture)
from tests.inference.test_synthesize import StandInSynthesisTrainer, make_model, synthesis_plans

TRAINER_FOLDER = "ModalityDropoutTrainer__nnUNetPlans__3d_cpu"


def _evaluate(capsys, *options):
    try:
        code = cli.main(["evaluate-missing", "-d", "961", "-c", "3d_cpu", "-device", "cpu", *options])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _one_line_error(err, text):
    assert err.startswith("nnunet_missingmod evaluate-missing: error: ") and err.count("\n") == 1, err
    assert text in err and "Traceback" not in err, err


def test_fill_options_are_checked_before_any_prediction(setup, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    code, err = _evaluate(capsys, "--split", "test", "--fill", "synthesize", "-o", str(out))
    assert code == 2
    _one_line_error(err, "--fill synthesize needs the synthesis model folder: -m MODEL_FOLDER")
    synth = make_model(tmp_path / "synth")
    code, err = _evaluate(capsys, "--split", "test", "-m", str(synth), "-o", str(out))
    _one_line_error(err, "-m names a synthesis model, which only --fill synthesize uses")
    code, err = _evaluate(capsys, "--split", "test", "--fill", "synthesize", "-m", str(synth), "--synthesis-chk",
                          "checkpoint_best.pth", "-o", str(out))
    _one_line_error(err, f"checkpoint not found: {synth / 'fold_*' / 'checkpoint_best.pth'}")
    other = make_model(tmp_path / "other", channel_names={"0": "T1", "1": "T2"})
    code, err = _evaluate(capsys, "--split", "test", "--fill", "synthesize", "-m", str(other), "-o", str(out))
    _one_line_error(err, f"{other / 'dataset.json'} has channels ['T1', 'T2']")
    code, err = _evaluate(capsys, "--split", "test", "--fill", "nearest")
    assert code == 2 and "argument --fill: invalid choice: 'nearest'" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def phantom_synthesis_model(trained_model, tmp_path_factory):
    """The stand-in synthesis model with a 2d configuration at the phantoms' in-plane spacing."""
    work, _, _ = trained_model
    image = sitk.ReadImage(str(next((work / "nnUNet_raw" / E2E_NAME / "imagesTs").glob("*_0000.nii.gz"))))
    spacing = image.GetSpacing()[::-1]  # nnU-Net's (z, y, x)
    folder = make_model(tmp_path_factory.mktemp("synth"), plans=synthesis_plans(in_plane_spacing=spacing[1:]))
    return synthesis.load_synthesis_model(folder, trainer_class=StandInSynthesisTrainer)


def _rows(out):
    with open(out / "per_case.csv") as f:
        return list(csv.DictReader(f))


def test_synthesized_fill_matches_synthesize_then_predict(trained_model, phantom_synthesis_model, tmp_path,
                                                          monkeypatch):
    work, _, _ = trained_model
    env = json.loads((work / "env.json").read_text())
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, env[key])
    model = work / "nnUNet_results" / E2E_NAME / TRAINER_FOLDER
    images = work / "nnUNet_raw" / E2E_NAME / "imagesTs"
    case = sorted(images.glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    combinations = [(1, 3), (0, 1, 2, 3)]
    fed = []
    original = MissingModalityPredictor.preprocess

    def preprocess(self, image, properties):
        fed.append(image.copy())
        return original(self, image, properties)

    monkeypatch.setattr(MissingModalityPredictor, "preprocess", preprocess)
    out = evaluate_missing(model, 0, split="test", combinations=combinations, output=tmp_path / "synth",
                           save_predictions=True, use_mirroring=False, progress=False, fill="synthesize",
                           synthesis_model=phantom_synthesis_model, combine="mean", case_filter={case})
    zero = evaluate_missing(model, 0, split="test", combinations=combinations, output=tmp_path / "zero",
                            use_mirroring=False, progress=False, batch_size=1, case_filter={case})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fill"] == "synthesize" and summary["synthesis"]["combine"] == "mean"
    assert summary["synthesis"]["validation_metric"] == "ssim"  # the stand-in's file has whole slices only
    assert summary["synthesis"]["histogram_fallback"] == []  # (and no histogram entries)
    assert json.loads((zero / "summary.json").read_text())["fill"] == "zero"
    assert "missing channels synthesized by" in (out / "table.md").read_text().splitlines()[0]
    synth_rows, zero_rows = _rows(out), _rows(zero)
    full = [r for r in synth_rows if r["combination"] == "t1+t1ce+t2+flair"]
    assert full == [r for r in zero_rows if r["combination"] == "t1+t1ce+t2+flair"]  # nothing to fill: same
    # the independent path: write the t1ce + flair files, synthesise t1 and t2 into files, predict from all four
    partial = tmp_path / "partial"
    partial.mkdir()
    for channel in (1, 3):
        shutil.copyfile(images / f"{case}_{channel:04d}.nii.gz", partial / f"{case}_{channel:04d}.nii.gz")
    synthesis.synthesize(partial, tmp_path / "filled", phantom_synthesis_model, combine="mean", progress=False)
    predict_folder(tmp_path / "filled", tmp_path / "pred", model, folds=[0], use_mirroring=False, progress=False)
    assert {r["case"] for r in synth_rows} == {case}
    saved = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predictions" / "t1ce+flair" / f"{case}.nii.gz")))
    independent = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / f"{case}.nii.gz")))
    assert np.mean(saved == independent) > 0.999
    synth_row = next(r for r in synth_rows if r["combination"] == "t1ce+flair")
    zero_row = next(r for r in zero_rows if r["combination"] == "t1ce+flair")
    assert synth_row != zero_row or np.mean(saved != 0) < 0.001  # (equal only if both find no tumour)
    # what the segmentation model was given for t1ce + flair: the real t1ce and flair, the synthesised t1 and t2
    # one preprocessing per combination with synthesis, one for the zero-fill evaluation, one in predict_folder
    assert len(fed) == 2 + 1 + 1
    for channel in range(4):
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "filled" / f"{case}_{channel:04d}.nii.gz")))
        np.testing.assert_allclose(fed[0][channel], written, rtol=1e-4, atol=1e-2)
        assert np.any(fed[0][channel] != 0)
    np.testing.assert_array_equal(fed[1], fed[2])  # all four real channels in both evaluations


def test_one_missing_combinations_keyword(setup, tmp_path, capsys, monkeypatch):  # noqa: F811
    from nnunet_missingmod.data.nifti import InputImageError
    from nnunet_missingmod.evaluation import missing_combinations

    seen = {}

    def fake(model, fold, **kwargs):
        seen.update(kwargs)
        raise InputImageError("stop here")  # a reported error of the package: one line, exit code 2

    monkeypatch.setattr(missing_combinations, "evaluate_missing", fake)
    code, err = _evaluate(capsys, "--combinations", "one-missing")
    assert code == 2 and "stop here" in err
    assert seen["combinations"] == [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)] and seen["fill"] == "zero"
