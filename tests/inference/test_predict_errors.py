"""predict: faulty inputs and options end in one-line errors before the model is loaded or anything is written."""

import json
from pathlib import Path

import pytest

from nnunet_missingmod import cli
from nnunet_missingmod.data.nifti import InputImageError
from nnunet_missingmod.inference.predict import predict_folder
from tests.inference.helpers import fake_model, put_non_finite, snapshot, truncate, write_case


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A results folder with a stand-in model, and an input folder of two complete cases."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    model = fake_model(tmp_path / "results")
    inputs = tmp_path / "in"
    write_case(inputs, "Case_A", seed=1)
    write_case(inputs, "Case_B", channels=(1, 3), seed=2)
    return model, inputs


def _predict(capsys, inputs, output, *options):
    """Run ``nnunet_missingmod predict``; (exit code, stderr)."""
    argv = ["predict", "-i", str(inputs), "-o", str(output), "-d", "961", "-c", "3d_cpu", "-device", "cpu", *options]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


def _one_line_error(err, text):
    assert err.startswith("nnunet_missingmod predict: error: ") and err.count("\n") == 1, err
    assert text in err, err
    assert "Traceback" not in err


def test_output_equal_to_input_is_refused(setup, capsys):
    _, inputs = setup
    before = snapshot(inputs)
    code, err = _predict(capsys, inputs, inputs)
    assert code == 2
    _one_line_error(err, f"output folder {inputs} is the input folder {inputs}")
    assert snapshot(inputs) == before


def test_output_inside_input_is_refused_also_through_a_symlink(setup, tmp_path, capsys):
    model, inputs = setup
    before = snapshot(inputs)
    alias = tmp_path / "alias"
    alias.symlink_to(inputs, target_is_directory=True)
    for output in (inputs / "predictions", alias / "predictions", alias, inputs / "a" / ".." / "b"):
        with pytest.raises(ValueError, match="the input folder"):
            predict_folder(inputs, output, model, progress=False)
    code, err = _predict(capsys, alias, inputs / "predictions")  # input given through the link
    assert code == 2
    _one_line_error(err, "lies inside the input folder")
    assert snapshot(inputs) == before


def test_input_that_is_a_file_or_missing(setup, tmp_path, capsys):
    _, inputs = setup
    file = inputs / "Case_A_0000.nii.gz"
    code, err = _predict(capsys, file, tmp_path / "out")
    assert code == 2
    _one_line_error(err, f"input {file} is a file, not a folder")
    code, err = _predict(capsys, tmp_path / "nowhere", tmp_path / "out")
    assert code == 2
    _one_line_error(err, f"input {tmp_path / 'nowhere'} does not exist")
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint(setup, tmp_path, capsys):
    model, inputs = setup
    code, err = _predict(capsys, inputs, tmp_path / "out", "-chk", "checkpoint_best.pth", "-f", "0")
    assert code == 2
    _one_line_error(err, f"checkpoint not found: {model / 'fold_0' / 'checkpoint_best.pth'}; checkpoints in "
                         f"{model}: ['fold_0/checkpoint_final.pth']")
    code, err = _predict(capsys, inputs, tmp_path / "out", "-chk", "checkpoint_best.pth")  # folds auto-detected
    assert code == 2
    _one_line_error(err, f"checkpoint not found: {model / 'fold_*' / 'checkpoint_best.pth'}")
    code, err = _predict(capsys, inputs, tmp_path / "out", "-f", "3")
    _one_line_error(err, f"checkpoint not found: {model / 'fold_3' / 'checkpoint_final.pth'}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, message", [
    (truncate, "cannot read {file} (unreadable or truncated)"),
    (put_non_finite, "{file} has 2 NaN/Inf voxel(s)"),
])
def test_truncated_or_non_finite_image_is_refused(setup, tmp_path, capsys, damage, message):
    """Both were read without complaint (zero-padded, or NaN through the network) and predicted with exit code 0."""
    model, inputs = setup
    file = inputs / "Case_B_0003.nii.gz"
    damage(file)
    with pytest.raises(InputImageError) as error:
        predict_folder(inputs, tmp_path / "out", model, progress=False)
    assert str(error.value).startswith(f"case Case_B: {message.format(file=file)}"), str(error.value)
    code, err = _predict(capsys, inputs, tmp_path / "out")
    assert code == 2
    _one_line_error(err, f"case Case_B: {message.format(file=file)}")
    assert not (tmp_path / "out").exists()


def test_unused_damaged_channel_is_not_read(setup, tmp_path):
    """Only the files of the modalities used are checked: --available t1ce,flair ignores a bad t1 file."""
    model, inputs = setup
    truncate(inputs / "Case_A_0000.nii.gz")
    with pytest.raises(InputImageError, match="Case_A: cannot read .*Case_A_0000"):
        predict_folder(inputs, tmp_path / "out", model, progress=False)
    with pytest.raises(Exception) as error:  # gets past every input check to the (empty) checkpoint
        predict_folder(inputs, tmp_path / "out", model, available=(1, 3), progress=False)
    assert not isinstance(error.value, InputImageError)


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"Case_A": ["t1"]}), "has no 'cases' object"),
    (json.dumps({"cases": ["Case_A"]}), "has no 'cases' object"),
    (json.dumps({"cases": {"Case_A": "t1ce"}}), "cases['Case_A'] must be a list of modality names, got 't1ce'"),
    (json.dumps({"cases": {"Case_A": ["t1", "pd"]}}), "cases['Case_A']: unknown modality 'pd'"),
])
def test_corrupt_availability_file_names_file_and_key(setup, tmp_path, capsys, content, message):
    _, inputs = setup
    manifest = tmp_path / "availability.json"
    manifest.write_text(content)
    code, err = _predict(capsys, inputs, tmp_path / "out", "--availability", str(manifest))
    assert code == 2
    _one_line_error(err, f"availability file {manifest}")
    assert message in err, err
    code, err = _predict(capsys, inputs, tmp_path / "out", "--availability", str(tmp_path / "absent.json"))
    _one_line_error(err, f"availability file {tmp_path / 'absent.json'} not found")


@pytest.mark.parametrize("options, message", [
    (("-num_parts", "0"), "argument -num_parts: must be at least 1, got 0"),
    (("-part_id", "-1"), "argument -part_id: must be 0 or more, got -1"),
    (("-step_size", "0"), "argument -step_size: must be in (0, 1], got 0.0"),
    (("-f", "x"), "argument -f: invalid fold value: 'x'"),
])
def test_invalid_options(setup, tmp_path, capsys, options, message):
    _, inputs = setup
    code, err = _predict(capsys, inputs, tmp_path / "out", *options)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_part_id_outside_the_parts(setup, tmp_path):
    model, inputs = setup
    for num_parts, part_id in ((2, 2), (0, 0), (3, -1)):
        with pytest.raises(ValueError, match="need num_parts >= 1 and 0 <= part_id < num_parts"):
            predict_folder(inputs, tmp_path / "out", model, num_parts=num_parts, part_id=part_id, progress=False)


def test_genuine_bugs_keep_their_traceback(setup, tmp_path, monkeypatch):
    """Only errors the package raises on purpose become one-line errors; a bug is not hidden."""
    import numpy as np

    from nnunet_missingmod.inference import predict

    _, inputs = setup

    def indexing_bug(*args, **kwargs):
        return {}["cases"]

    def numpy_bug(*args, **kwargs):
        return np.zeros(3).reshape(2, 2)

    for bug, kind in ((indexing_bug, KeyError), (numpy_bug, ValueError)):
        monkeypatch.setattr(predict, "predict_folder", bug)
        with pytest.raises(kind):
            cli.main(["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-d", "961", "-c", "3d_cpu",
                      "-device", "cpu"])


def test_reported_errors_are_recognised():
    from nnunet_missingmod.data.raw_dataset import dataset_folder

    with pytest.raises(ValueError) as raised:
        dataset_folder("/tmp", 0, "X")  # an explicit raise in the package
    assert cli.is_reported_error(raised.value)
    assert cli.is_reported_error(InputImageError("case X: bad"))
    assert cli.is_reported_error(PermissionError(13, "Permission denied", "/read/only"))
    assert cli.error_message(PermissionError(13, "Permission denied", "/read/only")) == "Permission denied: /read/only"
    assert cli.error_message(KeyError("configuration '3d' is not in plans.json")) == \
        "configuration '3d' is not in plans.json"
    with pytest.raises(KeyError) as raised:
        {}["cases"]
    assert not cli.is_reported_error(raised.value)
    assert not cli.is_reported_error(AssertionError("x"))


def test_unwritable_output_is_refused_before_any_work(setup, tmp_path, capsys, monkeypatch):
    """A read-only output folder used to fail only when the first segmentation was exported."""
    import os

    _, inputs = setup
    (tmp_path / "a_file").write_text("x")
    code, err = _predict(capsys, inputs, tmp_path / "a_file" / "out")
    assert code == 2
    _one_line_error(err, f"cannot write to {tmp_path / 'a_file' / 'out'}: {tmp_path / 'a_file'} is a file")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != read_only and real_access(path, mode))
    code, err = _predict(capsys, inputs, read_only / "out")
    assert code == 2
    _one_line_error(err, f"cannot write to {read_only / 'out'}: {read_only} is not writable")
    assert list(read_only.iterdir()) == []


def test_bad_postprocessing_file_is_refused_before_any_work(setup, tmp_path, capsys):
    _, inputs = setup
    (tmp_path / "bad.pkl").write_bytes(b"not a pickle")
    before = snapshot(tmp_path)
    for name, message in (("missing.pkl", "post-processing file"), ("bad.pkl", "is not a post-processing pickle")):
        code, err = _predict(capsys, inputs, tmp_path / "out", "--postprocessing", str(tmp_path / name))
        assert code == cli.ERROR_EXIT_CODE
        _one_line_error(err, f"{name}")
        _one_line_error(err, message)
        assert snapshot(tmp_path) == before
