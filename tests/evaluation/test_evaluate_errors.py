"""evaluate-missing and compare: faulty inputs give one-line errors before any prediction; mismatches are flagged."""

import json
import warnings

import pytest

from nnunet_missingmod import cli
from nnunet_missingmod import modalities as mods
from nnunet_missingmod.data.nifti import InputImageError
from nnunet_missingmod.evaluation.missing_combinations import (
    CombinationMismatchWarning,
    compare,
    evaluate_missing,
)
from tests.inference.helpers import DATASET, fake_model, put_non_finite, truncate, write_case, write_label


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """nnU-Net folders with a stand-in model (fold 0), two training cases in two folds and one test case."""
    for key in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{key}", str(tmp_path / key))
    model = fake_model(tmp_path / "results")
    raw = tmp_path / "raw" / DATASET
    for index, case in enumerate(("Case_1", "Case_2")):
        write_case(raw / "imagesTr", case, seed=index)
        write_label(raw / "labelsTr", case)
    write_case(raw / "imagesTs", "Case_9", seed=9)
    write_label(raw / "labelsTs", "Case_9")
    splits = tmp_path / "preprocessed" / DATASET / "splits_final.json"
    splits.parent.mkdir(parents=True)
    splits.write_text(json.dumps([{"train": ["Case_2"], "val": ["Case_1"]}, {"train": ["Case_1"], "val": ["Case_2"]}]))
    return model, raw, splits


def _evaluate(capsys, *options):
    argv = ["evaluate-missing", "-d", "961", "-c", "3d_cpu", "-device", "cpu", *options]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.err


def _one_line_error(err, text):
    assert err.startswith("nnunet_missingmod evaluate-missing: error: ") and err.count("\n") == 1, err
    assert text in err and "Traceback" not in err, err


def test_fold_outside_the_splits(setup, tmp_path, capsys):
    _, _, splits = setup
    code, err = _evaluate(capsys, "-f", "5", "-o", str(tmp_path / "out"))
    assert code == 2
    _one_line_error(err, f"fold 5 is not in {splits}, which has folds 0-1")
    code, err = _evaluate(capsys, "-f", "-1")
    assert code == 2 and "argument -f: must be 0 or more, got -1" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    ("[{", "is not valid JSON"),
    (json.dumps({"0": {"val": []}}), "must hold a list of folds, got dict"),
    (json.dumps([{"train": ["Case_2"]}]), "fold 0 has no 'val' list of cases"),
])
def test_corrupt_splits_file_names_the_file(setup, capsys, content, message):
    _, _, splits = setup
    splits.write_text(content)
    code, err = _evaluate(capsys)
    assert code == 2
    _one_line_error(err, str(splits))
    assert message in err


def test_missing_checkpoint(setup, tmp_path, capsys):
    model, _, _ = setup
    code, err = _evaluate(capsys, "-chk", "checkpoint_best.pth", "-o", str(tmp_path / "out"))
    assert code == 2
    _one_line_error(err, f"checkpoint not found: {model / 'fold_0' / 'checkpoint_best.pth'}")
    code, err = _evaluate(capsys, "-f", "1", "-o", str(tmp_path / "out"))  # in the splits, but never trained
    _one_line_error(err, f"checkpoint not found: {model / 'fold_1' / 'checkpoint_final.pth'}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["imagesTs/Case_9_0002.nii.gz", "labelsTs/Case_9.nii.gz"])
@pytest.mark.parametrize("damage, message", [(truncate, "(unreadable or truncated)"),
                                             (put_non_finite, "has 2 NaN/Inf voxel(s)")])
def test_damaged_image_or_label_is_refused(setup, tmp_path, capsys, target, damage, message):
    """A truncated t2 once gave WT Dice 0 with exit code 0 and t2 still listed as used."""
    model, raw, _ = setup
    file = raw / target
    damage(file)
    with pytest.raises(InputImageError, match="case Case_9: .*" + file.name):
        evaluate_missing(model, 0, split="test", output=tmp_path / "out", progress=False)
    code, err = _evaluate(capsys, "--split", "test", "-o", str(tmp_path / "out"))
    assert code == 2
    _one_line_error(err, "case Case_9: ")
    assert str(file) in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_availability_excluding_every_requested_combination(setup, tmp_path, capsys):
    """This used to fail only after every prediction had been computed."""
    _, raw, _ = setup
    (raw / "modality_availability.json").write_text(json.dumps({"modalities": list(mods.MODALITIES),
                                                                "cases": {"Case_9": ["t1", "t2"]}}))
    code, err = _evaluate(capsys, "--split", "test", "--combinations", "flair,t1ce+flair", "-o", str(tmp_path / "out"))
    assert code == 2
    _one_line_error(err, "no case has the modalities of any requested combination (flair, t1ce+flair)")
    (raw / "modality_availability.json").write_text(json.dumps({"cases": {"Case_9": ["t1", "T3"]}}))
    code, err = _evaluate(capsys, "--split", "test", "-o", str(tmp_path / "out"))
    _one_line_error(err, f"availability file {raw / 'modality_availability.json'}: cases['Case_9']: unknown modality")
    assert not (tmp_path / "out").exists()


def test_invalid_batch_size(setup, tmp_path, capsys):
    model, _, _ = setup
    code, err = _evaluate(capsys, "--batch-size", "0")
    assert code == 2 and "argument --batch-size: must be at least 1, got 0" in err
    with pytest.raises(ValueError, match="batch size must be at least 1"):
        evaluate_missing(model, 0, batch_size=0, output=tmp_path / "out", progress=False)


def _summary_run(folder, combinations, dice=0.8):
    """An evaluate-missing output folder holding only summary.json (all that compare reads)."""
    metrics = {f"{r}_{m}": (dice if m == "Dice" else 5.0) for r in mods.REGIONS for m in ("Dice", "HD95")}
    names = [mods.combination_name(c) for c in combinations]
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "model": f"/r/{folder.name}__nnUNetPlans__3d_cpu", "per_combination": {n: dict(metrics) for n in names},
        "average": metrics}))
    return folder


def test_compare_warns_about_different_combination_sets(tmp_path, capsys):
    every = mods.all_combinations()
    full = _summary_run(tmp_path / "full", every)
    partial = _summary_run(tmp_path / "partial", [c for c in every if 0 in c])  # t1 always present
    lacking = [mods.combination_name(c) for c in every if 0 not in c]  # what 'partial' lacks, in table order
    assert lacking[:3] == ["t1ce", "t2", "flair"] and len(lacking) == 7
    with pytest.warns(CombinationMismatchWarning) as caught:
        markdown, _ = compare([full, partial], tmp_path / "cmp", labels=["A", "B"])
    message = str(caught[0].message)
    assert f"B lacks {', '.join(lacking)}" in message and "A lacks" not in message
    text = markdown.read_text()
    assert "| A † (15 of 15 combinations) |" in text and "| B † (8 of 15 combinations) |" in text
    assert f"† **Warning:** {message}" in text

    code = cli.main(["compare", str(full), str(partial), "-o", str(tmp_path / "cli"), "--labels", "A", "B"])
    err = capsys.readouterr().err
    assert code == 0 and err == f"nnunet_missingmod compare: warning: {message}\n"


def test_compare_of_equal_combination_sets_is_silent(tmp_path):
    runs = [_summary_run(tmp_path / name, mods.all_combinations()) for name in ("a", "b")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        markdown, _ = compare(runs, tmp_path / "cmp")
    assert "Warning" not in markdown.read_text() and "†" not in markdown.read_text()


def test_unwritable_output_is_refused_before_any_prediction(setup, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    code, err = _evaluate(capsys, "--split", "test", "-o", str(tmp_path / "a_file" / "out"))
    assert code == 2
    _one_line_error(err, f"cannot write to {tmp_path / 'a_file' / 'out'}: {tmp_path / 'a_file'} is a file")
