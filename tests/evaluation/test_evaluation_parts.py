"""evaluate-missing split across processes (-num_parts/-part_id) and merge-evaluation: the merged result equals one
run over all cases; missing parts, mixed settings and cases evaluated twice are refused."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from nnunet_missingmod.cli import main
from nnunet_missingmod.evaluation.missing_combinations import evaluate_missing, merge_parts
from tests.conftest import E2E_NAME

TRAINER_FOLDER = "ModalityDropoutTrainer__nnUNetPlans__3d_cpu"
COMBINATIONS = [(1, 3), (0, 1, 2, 3)]


@pytest.fixture(scope="module")
def parts_and_whole(trained_model, tmp_path_factory):
    work, _, _ = trained_model
    env = json.loads((work / "env.json").read_text())
    base = tmp_path_factory.mktemp("parts")
    model = work / "nnUNet_results" / E2E_NAME / TRAINER_FOLDER
    with pytest.MonkeyPatch.context() as mp:
        for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(key, env[key])
        whole = evaluate_missing(model, 0, split="test", combinations=COMBINATIONS, output=base / "whole",
                                 tile_step_size=1.0, use_mirroring=False, progress=False)
        for part in (0, 1):
            written = evaluate_missing(model, 0, split="test", combinations=COMBINATIONS, output=base / "split",
                                       tile_step_size=1.0, use_mirroring=False, progress=False, num_parts=2,
                                       part_id=part)
            assert written == base / "split" / f"part_{part}_of_2"
    return base, whole, env


def _rows(folder):
    with open(folder / "per_case.csv") as f:
        return sorted((r["case"], r["combination"], round(float(r["WT_Dice"]), 6), round(float(r["ET_HD95"]), 4))
                      for r in csv.DictReader(f))


def test_each_part_holds_its_share_of_the_cases(parts_and_whole):
    base, _, _ = parts_and_whole
    cases = [{r[0] for r in _rows(base / "split" / f"part_{k}_of_2")} for k in (0, 1)]
    assert cases == [{"Phantom_0005"}, {"Phantom_0006"}]  # every 2nd case, as nnUNetv2_predict splits


def test_merged_parts_equal_one_run_over_all_cases(parts_and_whole, capsys):
    base, whole, env = parts_and_whole
    assert main(["merge-evaluation", str(base / "split")]) == 0
    assert "merged 2 parts (2 cases)" in capsys.readouterr().out
    merged = base / "split"
    assert _rows(merged) == _rows(whole)
    summary, reference = (json.loads((f / "summary.json").read_text()) for f in (merged, whole))
    assert summary["num_cases"] == reference["num_cases"] == 2
    # the sliding-window step and mirroring the fixture asked for, not evaluate_missing's defaults (0.5, True)
    assert (summary["step_size"], summary["mirroring"]) == (reference["step_size"], reference["mirroring"]) == \
        (1.0, False)
    assert summary["average"] == pytest.approx(reference["average"])
    assert summary["per_combination"].keys() == reference["per_combination"].keys()
    assert (merged / "heatmap.png").read_bytes()[:4] == b"\x89PNG" and (merged / "table.md").is_file()


def test_missing_part_mixed_settings_and_duplicated_cases_are_refused(parts_and_whole, tmp_path, capsys):
    base, _, _ = parts_and_whole
    source = base / "split"

    def copy(parts):
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        for k in parts:
            shutil.copytree(source / f"part_{k}_of_2", folder / f"part_{k}_of_2")
        return folder

    only_one = copy([0])
    assert main(["merge-evaluation", str(only_one)]) == 2
    assert "missing part(s) ['part_1_of_2']" in capsys.readouterr().err
    assert not (only_one / "summary.json").exists()

    for key, other in (("checkpoint", "checkpoint_best.pth"), ("step_size", 0.5)):
        mixed = copy([0, 1])
        summary = json.loads((mixed / "part_1_of_2" / "summary.json").read_text())
        summary[key] = other
        (mixed / "part_1_of_2" / "summary.json").write_text(json.dumps(summary))
        with pytest.raises(ValueError, match=f"part_1_of_2 was evaluated with other settings .*{key}"):
            merge_parts(mixed)

    twice = copy([0, 1])
    shutil.copyfile(twice / "part_0_of_2" / "per_case.csv", twice / "part_1_of_2" / "per_case.csv")
    with pytest.raises(ValueError, match="case Phantom_0005 was evaluated in part_0_of_2 and in part_1_of_2"):
        merge_parts(twice)

    assert main(["merge-evaluation", str(tmp_path / "nothing_here")]) == 2


@pytest.mark.parametrize("arguments, message", [
    (["-num_parts", "0"], "must be at least 1"),
    (["-num_parts", "2", "-part_id", "2"], "part_id must lie in 0..num_parts-1"),
])
def test_bad_part_options(arguments, message, trained_model, capsys, monkeypatch):
    work, _, _ = trained_model
    env = json.loads((work / "env.json").read_text())
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, env[key])
    try:  # argparse exits by SystemExit(2), the package's own errors return 2
        code = main(["evaluate-missing", "-d", E2E_NAME, "-c", "3d_cpu", "-tr", "ModalityDropoutTrainer", "--split",
                     "test", *arguments])
    except SystemExit as stop:
        code = stop.code
    assert code == 2 and message in capsys.readouterr().err
