"""compare over repeated runs: mean, sd and 95% interval against hand-computed numbers on synthetic summaries."""

import json
import math

import matplotlib.image
import pytest

from nnunet_missingmod import cli
from nnunet_missingmod import modalities as mods
from nnunet_missingmod.evaluation.missing_combinations import aggregate_summaries, compare, run_statistics

NAMES = [mods.combination_name(c) for c in mods.all_combinations()]
#: Student's t quantiles t(0.975, n - 1) from a printed table, independent of scipy.
T975 = {2: 12.706204736174698, 3: 4.302652729911275}


def summary_run(folder, wt_average, *, names=NAMES, trainer="ModalityDropoutTrainer"):
    """An evaluate-missing folder holding only summary.json: WT Dice of combination i is ``wt_average + (i - 7) / 100``.

    The offsets sum to zero over 15 combinations, so ``average`` is consistent with ``per_combination``; TC Dice
    is half the WT Dice and HD95 is ``10 * wt_average`` everywhere.
    """
    per_combination = {}
    for i, name in enumerate(names):
        wt = wt_average + (i - 7) / 100
        per_combination[name] = {"WT_Dice": wt, "TC_Dice": wt / 2, "ET_Dice": 0.3, "WT_HD95": 10 * wt_average,
                                 "TC_HD95": 5.0, "ET_HD95": 7.0, "num_cases": 2}
    keys = [k for k in per_combination[names[0]] if k != "num_cases"]
    average = {k: sum(v[k] for v in per_combination.values()) / len(names) for k in keys}
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "model": f"/r/{trainer}__nnUNetPlans__3d_cpu", "num_cases": 2, "per_combination": per_combination,
        "average": average}))
    return folder


def test_run_statistics_by_hand():
    stats = run_statistics([0.6, 0.7, 0.8])
    assert stats["n"] == 3
    assert stats["mean"] == pytest.approx(0.7)
    assert stats["sd"] == pytest.approx(0.1)  # sqrt(((-0.1)^2 + 0 + 0.1^2) / (3 - 1))
    assert stats["ci95"] == pytest.approx(T975[3] * 0.1 / math.sqrt(3))  # 0.2484
    two = run_statistics([0.5, 0.9])
    assert two["sd"] == pytest.approx(math.sqrt(0.08))  # ((0.2)^2 * 2) / 1
    assert two["ci95"] == pytest.approx(T975[2] * math.sqrt(0.08) / math.sqrt(2))
    one = run_statistics([0.42])
    assert one == {"mean": 0.42, "sd": None, "ci95": None, "n": 1}
    with pytest.raises(ValueError, match="no values"):
        run_statistics([])


def test_aggregate_over_seeds_per_combination_and_average(tmp_path):
    folders = [summary_run(tmp_path / f"s{k}", wt) for k, wt in enumerate((0.6, 0.7, 0.8))]
    summaries = [json.loads((f / "summary.json").read_text()) for f in folders]
    aggregate = aggregate_summaries(summaries)
    assert aggregate["num_runs"] == 3 and list(aggregate["per_combination"]) == NAMES
    average = aggregate["average"]
    assert average["WT_Dice"]["mean"] == pytest.approx(0.7)
    assert average["WT_Dice"]["sd"] == pytest.approx(0.1)
    assert average["WT_Dice"]["ci95"] == pytest.approx(0.24841377, abs=1e-7)
    assert average["TC_Dice"]["sd"] == pytest.approx(0.05)
    assert average["WT_HD95"]["mean"] == pytest.approx(7.0) and average["WT_HD95"]["sd"] == pytest.approx(1.0)
    assert average["ET_Dice"]["sd"] == pytest.approx(0.0)
    first = aggregate["per_combination"][NAMES[0]]["WT_Dice"]  # offset -0.07 in every run
    assert first["mean"] == pytest.approx(0.63) and first["sd"] == pytest.approx(0.1)


def test_runs_of_one_group_must_share_their_combinations(tmp_path):
    full = json.loads((summary_run(tmp_path / "a", 0.7) / "summary.json").read_text())
    partial = json.loads((summary_run(tmp_path / "b", 0.7, names=NAMES[:8]) / "summary.json").read_text())
    with pytest.raises(ValueError, match="different combinations"):
        aggregate_summaries([full, partial])


def test_compare_shows_mean_and_sd_of_groups(tmp_path):
    dropout = [summary_run(tmp_path / f"d{k}", wt) for k, wt in enumerate((0.6, 0.7, 0.8))]
    plain = [summary_run(tmp_path / f"p{k}", wt, trainer="nnUNetTrainer") for k, wt in enumerate((0.5, 0.9))]
    single = summary_run(tmp_path / "single", 0.65, trainer="D2NetTrainer")
    markdown, png = compare([dropout, plain, single], tmp_path / "cmp", labels=["dropout", None, None])
    lines = markdown.read_text().splitlines()
    assert "mean ± sd over runs" in lines[0]
    row = next(line for line in lines if line.startswith("| dropout (3 runs) |"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells == ["70.00 ± 10.00", "35.00 ± 5.00", "30.00 ± 0.00", "7.00 ± 1.00", "5.00 ± 0.00", "7.00 ± 0.00"]
    assert any(line.startswith("| nnUNetTrainer (2 runs) | 70.00 ± 28.28 |") for line in lines)
    assert any(line.startswith("| D2NetTrainer (1 run) | 65.00 ± – |") for line in lines)
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert data["dropout"]["average"]["WT_Dice"]["ci95"] == pytest.approx(T975[3] * 0.1 / math.sqrt(3))
    assert data["dropout"]["runs"] == [str(f) for f in dropout]
    assert matplotlib.image.imread(png).ndim == 3


def test_compare_of_single_runs_keeps_the_plain_table(tmp_path):
    runs = [summary_run(tmp_path / "a", 0.7), summary_run(tmp_path / "b", 0.5, trainer="nnUNetTrainer")]
    markdown, _ = compare(runs, tmp_path / "cmp")
    text = markdown.read_text()
    assert "±" not in text and "| ModalityDropoutTrainer | 70.00 |" in text and "| nnUNetTrainer | 50.00 |" in text


def test_cli_groups(tmp_path, capsys):
    dropout = [summary_run(tmp_path / f"d{k}", wt) for k, wt in enumerate((0.6, 0.7, 0.8))]
    plain = summary_run(tmp_path / "p", 0.5, trainer="nnUNetTrainer")
    code = cli.main(["compare", str(plain), "--labels", "plain", "--group", "dropout", *map(str, dropout),
                     "-o", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert code == 0
    assert "| plain (1 run) | 50.00 ± – |" in out and "| dropout (3 runs) | 70.00 ± 10.00 |" in out


@pytest.mark.parametrize(("argv", "message"), [
    ([], "nothing to compare"),
    (["--group", "lonely"], "--group lonely has no folder"),
    (["RUN", "--labels", "a", "b"], "2 labels for 1 runs"),
])
def test_cli_group_errors(tmp_path, capsys, argv, message):
    run = summary_run(tmp_path / "r", 0.5)
    argv = [str(run) if a == "RUN" else a for a in argv]
    code = cli.main(["compare", *argv, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1
