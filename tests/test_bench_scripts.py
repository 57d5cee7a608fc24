"""The benchmark scripts' logic without training: resuming, the plateau check, aggregation over runs, interleaving."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.config import OVERRIDE_ENV, load_trainer_config
from nnunet_missingmod.trainers import ModalityDropoutTrainer
from nnunet_missingmod.transforms.modality_dropout import transform_from_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_inference_plans as inference_plans  # noqa: E402
import bench_robustness as robustness  # noqa: E402
import bench_train_step as train_step  # noqa: E402
from bench_common import REGIMES  # noqa: E402

NAMES = [mods.combination_name(c) for c in mods.all_combinations()]
FULL = "t1+t1ce+t2+flair"
T975_3 = 4.302652729911275  # t(0.975, 2), from a printed table


# ---------------------------------------------------------------- plateau check


def test_plateau_of_a_flat_curve():
    check = robustness.plateau_check([0.8] * 20)
    assert check["plateaued"] is True and check["gain"] == pytest.approx(0.0) and check["epochs"] == 20


def test_plateau_threshold_by_hand():
    # 8 epochs: quarters of 2; the last quarter's mean (0.505 + 0.513) / 2 = 0.509 is 0.9 points above 0.5
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.505, 0.513]
    check = robustness.plateau_check(rising)
    assert check["gain"] == pytest.approx(0.009) and check["plateaued"] is True
    assert check["last_quarter"] == pytest.approx(0.509) and check["previous_quarter"] == pytest.approx(0.5)
    # 1.2 points: not a plateau
    assert robustness.plateau_check([*rising[:6], 0.51, 0.514])["plateaued"] is False
    # 10 epochs: quarters of 2 epochs at the end (epochs 7-8 against 9-10)
    curve = [0.0] * 6 + [0.4, 0.4, 0.45, 0.45]
    assert robustness.plateau_check(curve)["gain"] == pytest.approx(0.05)


def test_plateau_undecided_for_short_curves():
    assert robustness.plateau_check([0.1, 0.2, 0.3])["plateaued"] is None
    assert robustness.plateau_check([])["epochs"] == 0


def _fake_checkpoint(path: Path, ema: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"logging": {"ema_fg_dice": ema, "mean_fg_dice": ema, "epoch_start_timestamps": [0.0, 10.0],
                            "epoch_end_timestamps": [4.0, 15.0]}}, path)


def test_learning_curve_from_the_final_checkpoint_else_the_latest(tmp_path):
    fold = tmp_path / "fold_0"
    assert robustness.read_learning_curve(fold) is None
    _fake_checkpoint(fold / "checkpoint_latest.pth", [0.1, 0.2])
    assert robustness.read_learning_curve(fold)["ema_fg_dice"] == [0.1, 0.2]
    _fake_checkpoint(fold / "checkpoint_final.pth", [0.1, 0.2, 0.3])
    log = robustness.read_learning_curve(fold)
    assert log["ema_fg_dice"] == [0.1, 0.2, 0.3] and log["epoch_s"] == [4.0, 5.0]
    assert robustness.curve_label("MD_keepAll25__seed2", "MD_keepAll25") == "seed2"
    assert robustness.curve_label("dedicated_t1+t1ce__seed0", "dedicated") == "t1+t1ce"
    assert robustness.curve_label("nnUNetTrainer", "nnUNetTrainer") == "nnUNetTrainer"
    png = tmp_path / "curves.png"
    robustness.plot_learning_curves({"a__seed0": ("A", [0.1, 0.2]), "d__seed0": ("dedicated", [0.3, 0.4])}, png)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_the_fifteen_dedicated_curves_have_fifteen_colours(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    names = [robustness.mods.combination_name(c) for c in robustness.mods.all_combinations()]
    curves = {f"dedicated_{name}__seed0": ("dedicated", [0.1, 0.2]) for name in names}
    curves.update({f"A__seed{s}": ("A", [0.3, 0.4]) for s in range(3)})
    robustness.plot_learning_curves(curves, tmp_path / "curves.png")
    dedicated, seeds = (ax for ax in saved[0].axes if ax.get_title())
    assert len({line.get_color() for line in dedicated.get_lines()}) == 15
    assert len({line.get_color() for line in seeds.get_lines()}) == 3
    assert [t.get_text() for t in dedicated.get_legend().get_texts()][:2] == ["t1", "t1ce"]


# ---------------------------------------------------------------- resuming a partly finished benchmark


def test_training_action_from_the_files_in_the_fold(tmp_path):
    fold = tmp_path / "fold_0"
    assert robustness.training_action(fold) == "train"  # no folder at all
    fold.mkdir()
    (fold / "training_log.txt").write_text("interrupted before the first checkpoint")
    assert robustness.training_action(fold) == "train"
    (fold / "checkpoint_latest.pth").write_bytes(b"x")
    assert robustness.training_action(fold) == "continue"
    (fold / "checkpoint_final.pth").write_bytes(b"x")
    assert robustness.training_action(fold) == "reuse"


def test_plan_keeps_the_short_regimes_folders_and_separates_seeds(tmp_path):
    runs = robustness.plan_runs(tmp_path, REGIMES["short"], ["nnUNetTrainer"], seeds=2, dedicated_seeds=1)
    assert len(runs) == 2 + 15 and len({r.name for r in runs}) == len(runs)
    legacy, second = runs[0], runs[1]
    assert legacy.model == tmp_path / "nnUNet_results" / "Dataset990_BraTSPhantom" / \
        "nnUNetTrainer__nnUNetPlans__3d_cpu"
    assert legacy.evaluation == tmp_path / "robustness" / "nnUNetTrainer"
    assert second.name == "nnUNetTrainer__seed1" and second.seed == 1
    assert second.model.is_relative_to(tmp_path / "robustness" / "models" / "nnUNetTrainer__seed1")
    dedicated = runs[2:]
    assert [r.combination for r in dedicated] == mods.all_combinations()
    assert {r.group for r in dedicated} == {"dedicated"}
    assert {r.trainer for r in dedicated} == {"ModalityDropoutTrainer"}
    converged = robustness.plan_runs(tmp_path, REGIMES["converged"], ["nnUNetTrainer"], seeds=1)
    assert converged[0].name == "nnUNetTrainer__seed0"
    assert converged[0].model.parent.name == "Dataset991_BraTSPhantom"
    assert converged[0].evaluation == tmp_path / "robustness_converged" / "eval" / "nnUNetTrainer__seed0"


def test_resuming_trains_continues_or_reuses_each_run(tmp_path, monkeypatch):
    """A benchmark stopped part-way: one run finished, one interrupted, the rest not started."""
    regime = REGIMES["converged"]
    runs = robustness.plan_runs(tmp_path, regime, ["nnUNetTrainer", "D2NetTrainer"], seeds=2, dedicated_seeds=1)
    (runs[0].fold).mkdir(parents=True)
    (runs[0].fold / "checkpoint_final.pth").write_bytes(b"x")
    (runs[1].fold).mkdir(parents=True)
    (runs[1].fold / "checkpoint_latest.pth").write_bytes(b"x")
    assert [robustness.training_action(r.fold) for r in runs[:4]] == ["reuse", "continue", "train", "train"]

    calls, logs = [], []

    def fake_worker(script, args, env, log=None):
        calls.append((args, env))
        logs.append(log)
        return {"train_s": 10.0}

    monkeypatch.setattr(robustness, "run_worker", fake_worker)
    args = type("Args", (), {"iterations": 60, "device": "cpu"})()
    timings = {runs[1].name: {"train_s": 100.0, "sittings": 1}}  # the first sitting of the interrupted run
    for run in [*runs[:3], runs[4]]:  # runs[4]: the first dedicated model
        robustness.train_run(run, regime, 60, args, {"nnUNet_raw": "raw"}, timings)
    assert len(calls) == 3, "the finished run was trained again"
    (continued, env1), (fresh, env2), (dedicated, env3) = calls
    assert "--resume" in continued and "--resume" not in fresh
    assert logs[0] == runs[1].results.parent / "train_nnUNetTrainer.log"  # the worker's progress, one log per run
    assert continued[continued.index("--seed") + 1] == "1" and continued[continued.index("--worker") + 1] == \
        "nnUNetTrainer"
    assert env1["nnUNet_results"] == str(runs[1].results) and env2["nnUNet_results"] == str(runs[2].results)
    assert OVERRIDE_ENV not in env1
    assert timings[runs[1].name] == {"train_s": 110.0, "sittings": 2}  # summed over sittings
    assert timings[runs[2].name] == {"train_s": 10.0, "sittings": 1}
    # the dedicated model trains ModalityDropoutTrainer with the fixed scheme through the override file
    assert dedicated[dedicated.index("--worker") + 1] == "ModalityDropoutTrainer"
    assert dedicated[dedicated.index("--keep") + 1:] == ["0"]  # t1 alone: the first combination
    override = json.loads(Path(env3[OVERRIDE_ENV]).read_text())
    assert override == {"modality_dropout": {"scheme": "fixed", "keep": ["t1"], "p_keep_all": 0.0}}


def test_training_seconds_and_epochs_cover_the_same_sittings(tmp_path, monkeypatch):
    """A sitting cut off by the end of a session records nothing; the resumed one records its own seconds and the
    epochs it trained, so the dry run's speed is seconds / epochs of the same sittings (not / all epochs)."""
    regime = REGIMES["converged"]
    (run,) = robustness.plan_runs(tmp_path, regime, ["nnUNetTrainer"], seeds=1)
    run.fold.mkdir(parents=True)
    (run.fold / "checkpoint_latest.pth").write_bytes(b"x")  # the cut-off sitting left its checkpoint only
    monkeypatch.setattr(robustness, "run_worker", lambda script, args, env, log=None: {"train_s": 275.0,
                                                                                       "epochs": 275})
    args = type("Args", (), {"iterations": 40, "device": "cpu"})()
    timings = {}
    robustness.train_run(run, regime, 480, args, {}, timings)
    assert timings[run.name] == {"train_s": 275.0, "train_epochs": 275, "sittings": 1}
    robustness.train_run(run, regime, 480, args, {}, timings)  # another sitting that finished: both add up
    assert timings[run.name] == {"train_s": 550.0, "train_epochs": 550, "sittings": 2}
    # a record from before the epochs were kept: its seconds cover sittings whose epochs are unknown
    legacy = {run.name: {"train_s": 100.0, "sittings": 1}}
    robustness.train_run(run, regime, 480, args, {}, legacy)
    assert legacy[run.name] == {"train_s": 375.0, "sittings": 2}  # no train_epochs: speed falls back to all epochs
    (run.fold / "checkpoint_latest.pth").unlink()
    robustness.train_run(run, regime, 480, args, {}, legacy)  # trained anew: both start again
    assert legacy[run.name] == {"train_s": 275.0, "train_epochs": 275, "sittings": 1}

    archive = tmp_path / "runs"
    for name, timing in {"resumed__seed0": {"train_s": 275.0 * 40 * 2.0, "train_epochs": 275},  # 2.0 s/iteration
                         "legacy__seed0": {"train_s": 480.0 * 40 * 3.0}}.items():           # 3.0 over all epochs
        (archive / name).mkdir(parents=True)
        (archive / name / "run.json").write_text(json.dumps(
            {"name": name, "trainer": "nnUNetTrainer" if name.startswith("resumed") else "SharedLatentTrainer",
             "epochs": 480, "iterations": 40, "timings": timing, "pretrain_epochs": None}))
    assert robustness.archived_speeds(archive) == pytest.approx({"nnUNetTrainer": 2.0, "SharedLatentTrainer": 3.0})


def test_train_with_budget_returns_the_epochs_it_trained(monkeypatch):
    """Resuming at nnU-Net's checkpoint epoch 205 of 480 trains 275 epochs in this process; a fresh run all 480."""
    import bench_common
    import nnunetv2.run.run_training as run_training

    class FakeTrainer:
        current_epoch = 0

        def run_training(self):
            self.current_epoch = self.num_epochs

    def fake_load(instance, continue_training, validation_only):
        if continue_training:
            instance.current_epoch = 205  # nnU-Net's load_checkpoint: the checkpoint's next epoch

    monkeypatch.setattr(run_training, "get_trainer_from_args", lambda *a, **k: FakeTrainer())
    monkeypatch.setattr(run_training, "maybe_load_checkpoint", fake_load)
    assert bench_common.train_with_budget("nnUNetTrainer", 480, 40, continue_training=True) == 275
    assert bench_common.train_with_budget("nnUNetTrainer", 480, 40) == 480


def test_two_phase_run_trains_its_pretraining_first_in_the_same_results(tmp_path, monkeypatch):
    """CMFFTrainer: CMFTPretrainer first (same seed, same nnUNet_results), reused once finished; _random: none."""
    regime = REGIMES["converged"]
    with_pretraining, random_init = robustness.plan_runs(tmp_path, regime, ["CMFFTrainer", "CMFFTrainer_random"],
                                                         seeds=1)
    assert with_pretraining.pretrainer == "CMFTPretrainer" and random_init.pretrainer is None
    pretraining = with_pretraining.pretraining_fold(regime)
    assert pretraining.parent.parent == with_pretraining.model.parent  # where cmff "auto" looks
    assert pretraining.parent.name == "CMFTPretrainer__nnUNetPlans__3d_cpu"

    calls = []

    def fake_worker(script, args, env, log=None):
        calls.append((args, env))
        trainer = args[args.index("--worker") + 1]
        fold = Path(env["nnUNet_results"]) / regime.dataset_name / f"{trainer}__nnUNetPlans__3d_cpu" / "fold_0"
        fold.mkdir(parents=True, exist_ok=True)
        (fold / "checkpoint_final.pth").write_bytes(b"x")
        return {"train_s": 7.0 if trainer == "CMFTPretrainer" else 20.0}

    monkeypatch.setattr(robustness, "run_worker", fake_worker)
    args = type("Args", (), {"iterations": 40, "device": "cpu"})()
    timings = {}
    robustness.train_run(with_pretraining, regime, 30, args, {}, timings, pretrain_epochs=12)
    robustness.train_run(random_init, regime, 30, args, {}, timings)
    trainers = [a[a.index("--worker") + 1] for a, _ in calls]
    assert trainers == ["CMFTPretrainer", "CMFFTrainer", "CMFFTrainer_random"]
    (pre_args, pre_env), (cmff_args, cmff_env) = calls[:2]
    assert pre_env["nnUNet_results"] == cmff_env["nnUNet_results"] == str(with_pretraining.results)
    assert pre_args[pre_args.index("--epochs") + 1] == "12" and cmff_args[cmff_args.index("--epochs") + 1] == "30"
    assert pre_args[pre_args.index("--seed") + 1] == cmff_args[cmff_args.index("--seed") + 1] == "0"
    assert timings[with_pretraining.name] == {"pretrain_s": 7.0, "train_s": 20.0, "sittings": 1}
    assert "pretrain_s" not in timings[random_init.name]

    # a later CMFF run in a folder whose first phase is finished reuses it
    shutil.rmtree(with_pretraining.model)
    calls.clear()
    robustness.train_run(with_pretraining, regime, 30, args, {}, timings, pretrain_epochs=12)
    assert [a[a.index("--worker") + 1] for a, _ in calls] == ["CMFFTrainer"]


def test_variant_trains_its_trainer_with_its_settings_and_refuses_other_settings_on_resume(tmp_path, monkeypatch):
    regime = REGIMES["converged"]
    settings_file = tmp_path / "keep_all.json"
    settings_file.write_text(json.dumps({"modality_dropout": {"p_keep_all": 0.25}}))
    variants = robustness.read_variants([["MD_keepAll25", "ModalityDropoutTrainer", str(settings_file)]])
    runs = robustness.plan_runs(tmp_path, regime, ["ModalityDropoutTrainer"], seeds=2, variants=variants)
    assert [(r.name, r.group, r.trainer) for r in runs] == [
        ("ModalityDropoutTrainer__seed0", "ModalityDropoutTrainer", "ModalityDropoutTrainer"),
        ("ModalityDropoutTrainer__seed1", "ModalityDropoutTrainer", "ModalityDropoutTrainer"),
        ("MD_keepAll25__seed0", "MD_keepAll25", "ModalityDropoutTrainer"),
        ("MD_keepAll25__seed1", "MD_keepAll25", "ModalityDropoutTrainer")]
    assert runs[2].results != runs[0].results  # its own model folder

    calls = []
    monkeypatch.setattr(robustness, "run_worker", lambda script, args, env, log=None: calls.append((args, env)) or
                        {"train_s": 1.0})
    args = type("Args", (), {"iterations": 40, "device": "cpu"})()
    robustness.train_run(runs[0], regime, 30, args, {}, {})
    robustness.train_run(runs[2], regime, 30, args, {}, {})
    assert OVERRIDE_ENV not in calls[0][1]
    override = Path(calls[1][1][OVERRIDE_ENV])
    assert json.loads(override.read_text()) == {"modality_dropout": {"p_keep_all": 0.25}}
    assert "--keep" not in calls[1][0]
    # the settings the override file received are really applied to the trainer's configuration
    monkeypatch.setenv(OVERRIDE_ENV, str(override))
    assert load_trainer_config(ModalityDropoutTrainer)["modality_dropout"]["p_keep_all"] == 0.25

    # an interrupted variant resumed with other settings is refused; with the same ones it continues
    runs[2].fold.mkdir(parents=True)
    (runs[2].fold / "checkpoint_latest.pth").write_bytes(b"x")
    other = robustness.plan_runs(tmp_path, regime, [], seeds=1,
                                 variants=[("MD_keepAll25", "ModalityDropoutTrainer", {"modality_dropout": {}})])[0]
    with pytest.raises(SystemExit, match="MD_keepAll25__seed0 was started with the settings"):
        robustness.train_run(other, regime, 30, args, {}, {})
    robustness.train_run(runs[2], regime, 30, args, {}, {})
    assert "--resume" in calls[-1][0]


VARIANTS = sorted((Path(__file__).resolve().parents[1] / "scripts" / "variants").glob("*.json"))


@pytest.mark.parametrize("path", VARIANTS, ids=lambda p: p.name)
def test_shipped_variant_files_apply_to_their_trainer(path, monkeypatch):
    """Every override file in scripts/variants names only keys its trainers have, and its values are applied."""
    from nnunet_missingmod.trainers import (
        CMFFTrainer,
        CMFFTrainer_random,
        D2NetTrainer,
        UTADNetStudentTrainer,
        UTADNetTeacherTrainer,
    )

    assert path.name in (path.parent / "README.md").read_text(), "describe the file in scripts/variants/README.md"
    if path.name == "defaults.json":  # any trainer under a label of its own (another budget): it must change nothing
        assert json.loads(path.read_text()) == {}
        return
    by_prefix = {"d2net_": [D2NetTrainer], "md_": [ModalityDropoutTrainer], "cmff_": [CMFFTrainer, CMFFTrainer_random],
                 "utad_": [UTADNetTeacherTrainer, UTADNetStudentTrainer]}
    prefix = next((p for p in by_prefix if path.name.startswith(p)), None)
    assert prefix, f"name variant files after their trainer ({', '.join(by_prefix)})"
    for trainer in by_prefix[prefix]:
        monkeypatch.setenv(OVERRIDE_ENV, str(path))
        resolved = load_trainer_config(trainer)  # strict merge: an unknown key raises KeyError
        assert robustness._flatten(json.loads(path.read_text())).items() <= robustness._flatten(resolved).items()


@pytest.mark.parametrize("content, message", [(None, "cannot read"), ("{", "is not valid JSON"),
                                              ("[1]", "must hold a JSON object")])
def test_variant_settings_errors_name_the_file(content, message, tmp_path):
    path = tmp_path / "settings.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=f"--variant V: .*{message}"):
        robustness.read_variants([["V", "ModalityDropoutTrainer", str(path)]])


def test_variant_labels_must_be_unique(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        robustness.plan_runs(tmp_path, REGIMES["converged"], ["ModalityDropoutTrainer"], seeds=1,
                             variants=[("ModalityDropoutTrainer", "ModalityDropoutTrainer", {})])


@pytest.mark.parametrize("combination", mods.all_combinations(), ids=mods.combination_name)
def test_dedicated_override_selects_its_combination(combination, tmp_path, monkeypatch):
    override = tmp_path / "override.json"
    override.write_text(json.dumps(robustness.dedicated_override(combination)))
    monkeypatch.setenv(OVERRIDE_ENV, str(override))
    transform = transform_from_settings(load_trainer_config(ModalityDropoutTrainer)["modality_dropout"], 4)
    assert tuple(np.flatnonzero(transform.keep)) == combination


def test_evaluation_reused_only_when_current(tmp_path):
    checkpoint = tmp_path / "fold_0" / "checkpoint_final.pth"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"x")
    evaluation = tmp_path / "eval"
    assert not robustness.evaluation_is_current(evaluation, checkpoint, 10)
    evaluation.mkdir()
    (evaluation / "summary.json").write_text(json.dumps({"num_cases": 10, "per_combination": {"t1": {}}}))
    os.utime(checkpoint, (1000, 1000))
    os.utime(evaluation / "summary.json", (2000, 2000))
    assert robustness.evaluation_is_current(evaluation, checkpoint, 10)
    assert robustness.evaluation_is_current(evaluation, checkpoint, 10, ["t1"])
    assert not robustness.evaluation_is_current(evaluation, checkpoint, 5)  # other cases
    assert not robustness.evaluation_is_current(evaluation, checkpoint, 10, ["t2"])  # other combinations
    os.utime(checkpoint, (3000, 3000))  # retrained after the evaluation
    assert not robustness.evaluation_is_current(evaluation, checkpoint, 10)
    assert not robustness.evaluation_is_current(evaluation, tmp_path / "missing.pth", 10)


# ---------------------------------------------------------------- aggregation over runs


def summary(wt_by_name: dict[str, float], tc: float = 0.5, et: float = 0.4) -> dict:
    per_combination = {name: {"WT_Dice": wt, "TC_Dice": tc, "ET_Dice": et, "WT_HD95": 5.0, "TC_HD95": 6.0,
                              "ET_HD95": 7.0, "num_cases": 3} for name, wt in wt_by_name.items()}
    keys = ["WT_Dice", "TC_Dice", "ET_Dice", "WT_HD95", "TC_HD95", "ET_HD95"]
    return {"per_combination": per_combination,
            "average": {k: float(np.mean([v[k] for v in per_combination.values()])) for k in keys}}


def uniform(wt: float, full: float | None = None, **kwargs) -> dict:
    return summary({name: (full if name == FULL and full is not None else wt) for name in NAMES}, **kwargs)


def test_dedicated_summary_takes_each_combination_from_its_own_model():
    models = [summary({name: 0.5 + i / 100}) for i, name in enumerate(NAMES)]
    combined = robustness.dedicated_summary(models[::-1])  # any order
    assert list(combined["per_combination"]) == NAMES
    assert combined["per_combination"]["t1"]["WT_Dice"] == pytest.approx(0.5)
    assert combined["average"]["WT_Dice"] == pytest.approx(0.5 + 7 / 100)  # mean of 0..14 is 7


def test_by_num_modalities_by_hand():
    per_k = robustness.by_num_modalities(summary({name: len(name.split("+")) / 10 for name in NAMES}))
    assert {k: v["WT_Dice"] for k, v in per_k.items()} == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4})


def test_aggregate_benchmark_by_hand():
    # dropout: WT 0.6 / 0.7 / 0.8 everywhere; plain: 0.5 everywhere but full input 0.9 / 0.7; dedicated: 0.8
    dropout = [uniform(0.6), uniform(0.7), uniform(0.8)]
    plain = [uniform(0.5, full=0.9), uniform(0.5, full=0.7)]
    dedicated = [robustness.dedicated_summary([summary({name: 0.8}, tc=0.4) for name in NAMES])]
    result = robustness.aggregate_benchmark({"ModalityDropoutTrainer": dropout, "nnUNetTrainer": plain}, dedicated)
    groups = result["groups"]
    assert set(groups) == {"ModalityDropoutTrainer", "nnUNetTrainer", "dedicated"}
    wt = groups["ModalityDropoutTrainer"]["average"]["WT_Dice"]
    assert (wt["mean"], wt["sd"], wt["n"]) == (pytest.approx(0.7), pytest.approx(0.1), 3)
    assert wt["ci95"] == pytest.approx(T975_3 * 0.1 / math.sqrt(3))
    k2 = groups["ModalityDropoutTrainer"]["by_num_modalities"][2]["WT_Dice"]
    assert (k2["mean"], k2["sd"]) == (pytest.approx(0.7), pytest.approx(0.1))
    assert groups["dedicated"]["num_runs"] == 1 and groups["dedicated"]["average"]["WT_Dice"]["sd"] is None

    ratios = result["ratios"]["ModalityDropoutTrainer"]
    assert ratios["to_dedicated"]["t1ce+flair"] == pytest.approx({"WT": 0.7 / 0.8, "TC": 0.5 / 0.4, "ET": 1.0})
    assert ratios["to_dedicated"]["average"] == pytest.approx({"WT": 0.875, "TC": 1.25, "ET": 1.0})
    # full input: dropout 0.7 against plain (0.9 + 0.7) / 2 = 0.8
    assert ratios["full_input_to_baseline"] == pytest.approx({"WT": 0.875, "TC": 1.0, "ET": 1.0})
    plain_ratios = result["ratios"]["nnUNetTrainer"]
    assert plain_ratios["full_input_to_baseline"] == pytest.approx({"WT": 1.0, "TC": 1.0, "ET": 1.0})
    # plain's 15-combination average WT: (14 * 0.5 + 0.8) / 15
    assert plain_ratios["to_dedicated"]["average"]["WT"] == pytest.approx((14 * 0.5 + 0.8) / 15 / 0.8)
    assert "dedicated" not in result["ratios"]


def test_aggregate_without_dedicated_or_baseline():
    result = robustness.aggregate_benchmark({"ModalityDropoutTrainer": [uniform(0.6)]})
    assert result["ratios"] == {"ModalityDropoutTrainer": {}}


def test_report_tables(tmp_path):
    dropout = [uniform(0.6), uniform(0.7), uniform(0.8)]
    dedicated = [robustness.dedicated_summary([summary({name: 0.8}) for name in NAMES])]
    aggregate = robustness.aggregate_benchmark({"nnUNetTrainer": [uniform(0.5)], "ModalityDropoutTrainer": dropout},
                                               dedicated)
    rows = [{"name": "nnUNetTrainer__seed0", "iterations": 60, "curve": [0.1, 0.5, 0.7, 0.8],
             "plateau": robustness.plateau_check([0.1, 0.5, 0.7, 0.8]), "train_s": 612.0, "epochs_s": 580.4},
            {"name": "ModalityDropoutTrainer__seed0", "iterations": 60, "curve": [],
             "plateau": robustness.plateau_check([])}]
    text = robustness.report_markdown(aggregate, rows, REGIMES["converged"])
    assert "| nnUNetTrainer__seed0 | 4 x 60 | 0.800 | +10.00 | **no** | 612 | 580 | – |" in text
    assert "| ModalityDropoutTrainer | 3 | 70.0 ± 10.0 [45.2, 94.8] |" in text  # 70 ± 24.84
    assert "| **average** |" in text and "0.875 / 1.000 / 1.000" in text
    assert "## Full input (t1+t1ce+t2+flair) ÷ plain nnU-Net" in text
    assert "| ModalityDropoutTrainer | nnUNetTrainer | – ÷ – | 1.400 | 1.000 | 1.000 |" in text  # 0.7 / 0.5
    assert "What a longer budget changed" not in text and "| nnUNetTrainer | nnUNetTrainer |" not in text


def _identity(trainer: str, config: dict | None, epochs: int | None, seeds: list[int]) -> dict:
    return {"trainer": trainer, "config": config, "epochs": epochs, "iterations": 40, "seeds": seeds}


def test_longer_budgets_and_baselines_of_equal_epochs_by_hand():
    """Plain nnU-Net at 480 epochs is the full-input baseline of the 480-epoch groups; groups of one trainer and
    configuration at two budgets are paired (whatever their order), other configurations and equal budgets are
    not; the same-seed differences use only the seeds both groups have."""
    md = {"p": 0.25}
    identities = {"MD_e480": _identity("ModalityDropoutTrainer", md, 480, [0]),  # the longer one first
                  "nnUNetTrainer": _identity("nnUNetTrainer", None, 120, [0]),
                  "plain_e480": _identity("nnUNetTrainer", None, 480, [0]),
                  "MD": _identity("ModalityDropoutTrainer", md, 240, [0, 1]),
                  "MD_again": _identity("ModalityDropoutTrainer", md, 240, [2]),  # same budget as MD: no pair
                  "MD_half": _identity("ModalityDropoutTrainer", {"p": 0.5}, 480, [0]),
                  "mixed": _identity("ModalityDropoutTrainer", md, None, [0])}
    baselines = robustness.equal_budget_baselines(identities)
    assert baselines == {"nnUNetTrainer": "nnUNetTrainer", "plain_e480": "plain_e480", "MD_e480": "plain_e480",
                         "MD_half": "plain_e480"}
    by_seed = {"nnUNetTrainer": {0: uniform(0.5, full=0.8)}, "plain_e480": {0: uniform(0.5, full=0.96)},
               "MD": {0: uniform(0.6, full=0.7), 1: uniform(0.62, full=0.74)}, "MD_again": {2: uniform(0.6)},
               "MD_e480": {0: uniform(0.7, full=0.9)}, "MD_half": {0: uniform(0.6, full=0.9)},
               "mixed": {0: uniform(0.6)}}
    aggregate = robustness.aggregate_benchmark({k: list(v.values()) for k, v in by_seed.items()},
                                               baseline_for=baselines)
    ratios = aggregate["ratios"]
    assert ratios["MD"]["baseline"] == "nnUNetTrainer" and ratios["MD"]["full_input_to_baseline"]["WT"] == \
        pytest.approx(0.72 / 0.8)
    assert ratios["MD_e480"]["baseline"] == "plain_e480" and ratios["MD_e480"]["full_input_to_baseline"]["WT"] == \
        pytest.approx(0.9 / 0.96)

    pairs = robustness.budget_pairs(identities, aggregate["groups"], by_seed)
    assert [(p["shorter"], p["longer"], p["epochs"], p["runs"], p["seeds"]) for p in pairs] == [
        ("MD", "MD_e480", (240, 480), (2, 1), [0]), ("MD_again", "MD_e480", (240, 480), (1, 1), []),
        ("nnUNetTrainer", "plain_e480", (120, 480), (1, 1), [0])]
    pair = pairs[0]
    # 15-combination WT averages: MD (14 * 0.61 + 0.72) / 15 over its two runs, MD_e480 (14 * 0.7 + 0.9) / 15
    assert pair["average"]["WT"] == pytest.approx((14 * 0.7 + 0.9) / 15 - (14 * 0.61 + 0.72) / 15)
    assert pair["full_input"] == pytest.approx({"WT": 0.9 - 0.72, "TC": 0.0, "ET": 0.0})
    # seed 0 of both only: 0.6 -> 0.7 everywhere but full input 0.7 -> 0.9
    assert pair["same_seeds"]["average"]["WT"] == pytest.approx((14 * 0.1 + 0.2) / 15)
    assert pair["same_seeds"]["full_input"] == pytest.approx({"WT": 0.2, "TC": 0.0, "ET": 0.0})
    runs_wt = [(14 * 0.6 + 0.7) / 15, (14 * 0.62 + 0.74) / 15]
    assert pair["spread"]["WT"] == pytest.approx(float(np.std(runs_wt, ddof=1)))
    assert pairs[1]["same_seeds"] == {"average": None, "full_input": None}  # no seed in common
    assert pairs[2]["spread"] == {"WT": None, "TC": None, "ET": None}  # one run each

    aggregate["identities"], aggregate["budget_pairs"] = identities, pairs
    text = robustness.report_markdown(aggregate, [], REGIMES["converged"])
    assert "| MD_e480 | plain_e480 | 480 ÷ 480 | 0.938 | 1.000 | 1.000 |" in text
    assert "| MD | nnUNetTrainer | 240 ÷ 120 | 0.900 | 1.000 | 1.000 |" in text
    sd = 100 * float(np.std(runs_wt, ddof=1))
    assert (f"| MD | MD_e480 | 240 → 480 | 2, 1 | +{100 * pair['average']['WT']:.1f} / +0.0 / +0.0 | "
            f"+{100 * 1.6 / 15:.1f} / +0.0 / +0.0 (seeds 0) | +18.0 / +0.0 / +0.0 | +20.0 / +0.0 / +0.0 | "
            f"{sd:.1f} / 0.0 / 0.0 |") in text
    # MD_again 0.6 everywhere, MD_e480 (14 * 0.7 + 0.9) / 15
    assert "| MD_again | MD_e480 | 240 → 480 | 1, 1 | +11.3 / +0.0 / +0.0 | – (seeds none) |" in text
    # the 15-combination average moves by the full-input change / 15: 16 / 15 points
    assert ("| nnUNetTrainer | plain_e480 | 120 → 480 | 1, 1 | +1.1 / +0.0 / +0.0 | +1.1 / +0.0 / +0.0 (seeds 0) | "
            "+16.0 / +0.0 / +0.0 | +16.0 / +0.0 / +0.0 | – |") in text


def test_group_identities_from_the_runs():
    """A group's budget is its runs' epochs (learning-curve length) and iterations, None when they differ or a
    curve is missing; unevaluated runs and the dedicated models are left out; the configuration is the one given
    per run (the archived record's)."""
    regime = REGIMES["converged"]
    runs = robustness.plan_runs(Path("/nowhere"), regime, ["nnUNetTrainer", "ModalityDropoutTrainer"], seeds=3,
                                dedicated_seeds=1)
    curves = {"nnUNetTrainer__seed0": 120, "nnUNetTrainer__seed1": 120, "nnUNetTrainer__seed2": 60,
              "ModalityDropoutTrainer__seed0": 240, "ModalityDropoutTrainer__seed1": 240}
    rows = [{"name": run.name, "iterations": 40, "plateau": robustness.plateau_check([0.5] * curves.get(run.name, 0))}
            for run in runs]
    evaluated = {*curves, "dedicated_t1__seed0"}  # ModalityDropoutTrainer__seed2 has no evaluation
    configs = {run.name: {"p": 0.25} if run.trainer == "ModalityDropoutTrainer" else None for run in runs}
    identities = robustness.group_identities(runs, rows, configs, evaluated)
    assert identities == {
        "nnUNetTrainer": {"trainer": "nnUNetTrainer", "config": None, "epochs": None, "iterations": None,
                          "seeds": [0, 1, 2]},
        "ModalityDropoutTrainer": {"trainer": "ModalityDropoutTrainer", "config": {"p": 0.25}, "epochs": 240,
                                   "iterations": 40, "seeds": [0, 1]}}
    rows[0]["plateau"] = robustness.plateau_check([])  # an evaluated run without a curve: no budget either
    rows[2]["plateau"] = robustness.plateau_check([0.5] * 120)
    assert robustness.group_identities(runs, rows, configs, evaluated)["nnUNetTrainer"]["epochs"] is None


def test_report_of_the_dedicated_models_trained_so_far():
    """Before all 15 dedicated models exist: ratios for the combinations that have one, no average, and the
    dedicated row says how many it covers."""
    done = ["t1", "t1ce", "t1+t1ce"]
    dedicated = [robustness.dedicated_summary([summary({name: 0.8}) for name in done])]
    aggregate = robustness.aggregate_benchmark({"ModalityDropoutTrainer": [uniform(0.6), uniform(0.7)]}, dedicated)
    ratios = aggregate["ratios"]["ModalityDropoutTrainer"]["to_dedicated"]
    assert set(ratios) == set(done) and ratios["t1+t1ce"]["WT"] == pytest.approx(0.65 / 0.8)
    text = robustness.report_markdown(aggregate, [], REGIMES["converged"])
    assert "| dedicated (3 of 15 combinations so far) | 1 |" in text
    assert "12 dedicated models are still to be trained: no average yet." in text
    assert "| t1+t1ce | 0.812 / 1.000 / 1.000 |" in text and "| **average** | – / – / – |" in text


def test_subset_bound_is_the_best_dedicated_model_on_a_subset_by_hand():
    """WT of the dedicated models: T1 0.9, T1 + FLAIR 0.8, FLAIR 0.6, every other 0.5 (TC 0.5, ET 0.4). Every
    combination with T1 is bounded by the T1 model (0.9), the other four with FLAIR by the FLAIR model (0.6), and
    T1ce, T2, T1ce + T2 by their own (0.5): average (8 * 0.9 + 4 * 0.6 + 3 * 0.5) / 15 = 0.74."""
    wt = {"t1": 0.9, "t1+flair": 0.8, "flair": 0.6}
    dedicated = [robustness.dedicated_summary([summary({name: wt.get(name, 0.5)}) for name in NAMES])]
    aggregate = robustness.aggregate_benchmark({"ModalityDropoutTrainer": [uniform(0.6), uniform(0.8)]}, dedicated)
    bound = aggregate["subset_bound"]
    assert {name: bound[name]["WT"] for name in ["t1", "t1+flair", FULL, "t1ce+flair", "t2+flair", "t1ce+t2"]} == \
        pytest.approx({"t1": 0.9, "t1+flair": 0.9, FULL: 0.9, "t1ce+flair": 0.6, "t2+flair": 0.6, "t1ce+t2": 0.5})
    assert bound["t1+flair"]["TC"] == pytest.approx(0.5) and bound["t1+flair"]["ET"] == pytest.approx(0.4)
    ratios = aggregate["ratios"]["ModalityDropoutTrainer"]
    assert ratios["to_subset_bound"]["t1+flair"]["WT"] == pytest.approx(0.7 / 0.9)  # own model: 0.7 / 0.8
    assert ratios["to_dedicated"]["t1+flair"]["WT"] == pytest.approx(0.7 / 0.8)
    assert ratios["to_subset_bound"]["average"] == pytest.approx({"WT": 0.7 / 0.74, "TC": 1.0, "ET": 1.0})
    text = robustness.report_markdown(aggregate, [], REGIMES["converged"])
    assert "| t1+flair | 90.0* / 50.0 / 40.0 | 0.778 / 1.000 / 1.000 |" in text  # * : a subset's model, above its own
    assert "| t1 | 90.0 / 50.0 / 40.0 | 0.778 / 1.000 / 1.000 |" in text
    assert "| **average** | 74.0 / 50.0 / 40.0 | 0.946 / 1.000 / 1.000 |" in text


def test_subset_bound_of_the_dedicated_models_trained_so_far():
    """Only the models trained so far bound a combination; no average until all 15 exist."""
    dedicated = [robustness.dedicated_summary([summary({"t1": 0.9}), summary({"t1+t1ce": 0.66})])]
    aggregate = robustness.aggregate_benchmark({"ModalityDropoutTrainer": [uniform(0.6)]}, dedicated)
    assert aggregate["subset_bound"]["t1+t1ce"]["WT"] == pytest.approx(0.9)
    assert "average" not in aggregate["ratios"]["ModalityDropoutTrainer"]["to_subset_bound"]
    text = robustness.report_markdown(aggregate, [], REGIMES["converged"])
    assert "| t1+t1ce | 90.0* / 50.0 / 40.0 | 0.667 / 1.000 / 1.000 |" in text
    assert "| **average** | – / – / – | – / – / – |" in text


# ---------------------------------------------------------------- the archive: runs kept across machines


def _finished_run(run, epochs: int, evaluation: dict) -> None:
    """A trained and evaluated run: a final checkpoint with ``epochs`` logged epochs and an evaluation folder."""
    _fake_checkpoint(run.fold / "checkpoint_final.pth", [(i + 1) / (10 * epochs) for i in range(epochs)])
    run.evaluation.mkdir(parents=True)
    (run.evaluation / "summary.json").write_text(json.dumps(evaluation))
    (run.evaluation / "per_case.csv").write_text("case,combination,WT_Dice\n")
    (run.evaluation / "heatmap.png").write_bytes(b"\x89PNG")


def test_a_run_still_training_gets_no_plateau_verdict(tmp_path):
    """Its first epochs are flat (the plateau rule would say yes), but only nnU-Net's latest checkpoint is there."""
    regime = REGIMES["converged"]
    finished, training = robustness.plan_runs(tmp_path, regime, ["nnUNetTrainer"], seeds=2)
    _finished_run(finished, 8, uniform(0.5))
    _fake_checkpoint(training.fold / "checkpoint_latest.pth", [0.24] * 5)
    assert robustness.plateau_check([0.24] * 5)["plateaued"] is True
    out = tmp_path / "report"
    out.mkdir()
    robustness.write_report([finished, training], regime, out, {}, 40)
    text = (out / "report.md").read_text()
    assert "| nnUNetTrainer__seed1 | 5 x 40 | 0.240 | +0.00 | unfinished |" in text
    # epochs at 1/80 ... 8/80: the last quarter's mean 7.5/80, the quarter before 5.5/80
    assert "| nnUNetTrainer__seed0 | 8 x 40 | 0.100 | +2.50 | **no** |" in text


def test_archived_runs_stand_in_for_their_models_on_another_machine(tmp_path):
    regime = REGIMES["converged"]
    archive = tmp_path / "repository" / "runs"
    cases = ["phantom_011", "phantom_010"]
    first = robustness.plan_runs(tmp_path / "machine1", regime, ["nnUNetTrainer", "ModalityDropoutTrainer"], seeds=1)
    for run, evaluation in zip(first, (uniform(0.5, full=0.9), uniform(0.6, full=0.8)), strict=True):
        _finished_run(run, 4, evaluation)
        identity = robustness.archive_identity(run, regime, 4, 40, None, cases, 1.0)
        assert not robustness.archived_run(run, archive / run.name, identity)  # nothing archived yet
        robustness.write_archive(run, archive / run.name, identity, {run.name: {"train_s": 60.0, "sittings": 1}})
        # archived, but the model is on this machine: it is reused (and re-archived), not skipped
        assert not robustness.archived_run(run, archive / run.name, identity)
    assert sorted(p.name for p in (archive / first[0].name).iterdir()) == ["per_case.csv", "run.json", "summary.json"]
    assert not list(archive.glob("*.partial"))

    second = robustness.plan_runs(tmp_path / "machine2", regime, ["nnUNetTrainer", "ModalityDropoutTrainer"], seeds=1)
    for run in second:
        assert not run.model.exists()
        identity = robustness.archive_identity(run, regime, 4, 40, None, cases[::-1], 1.0)  # case order is free
        assert robustness.archived_run(run, archive / run.name, identity)
    out = tmp_path / "machine2" / "report"
    out.mkdir(parents=True)
    robustness.write_report(second, regime, out, {}, 40, archive)
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["runs"]}
    assert rows["nnUNetTrainer__seed0"]["curve"] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert rows["nnUNetTrainer__seed0"]["train_s"] == 60.0 and rows["nnUNetTrainer__seed0"]["iterations"] == 40
    assert report["ratios"]["ModalityDropoutTrainer"]["full_input_to_baseline"]["WT"] == pytest.approx(0.8 / 0.9)
    # dropout's 15-combination average: 14 combinations at 0.6, full input 0.8
    assert report["groups"]["ModalityDropoutTrainer"]["average"]["WT_Dice"]["mean"] == pytest.approx(
        (14 * 0.6 + 0.8) / 15)
    assert "| nnUNetTrainer__seed0 | 4 x 40 | 0.100 |" in (out / "report.md").read_text()
    assert "ModalityDropoutTrainer" in (out / "comparison.md").read_text()


def test_report_only_trains_nothing_and_reports_the_archived_runs(tmp_path, monkeypatch):
    regime = REGIMES["converged"]
    archive = tmp_path / "runs"
    run = robustness.plan_runs(tmp_path / "machine1", regime, ["nnUNetTrainer"], seeds=1)[0]
    _finished_run(run, 4, uniform(0.5))
    robustness.write_archive(run, archive / run.name, robustness.archive_identity(run, regime, 4, 40, None, ["c"], 1.0),
                             {})
    monkeypatch.setattr(robustness, "prepare", lambda *a, **k: pytest.fail("--report-only prepared data"))
    monkeypatch.setattr(robustness, "run_worker", lambda *a, **k: pytest.fail("--report-only trained"))
    work = tmp_path / "machine2"
    monkeypatch.setattr(sys, "argv", ["bench_robustness.py", "--work-dir", str(work), "--regime", "converged",
                                      "--trainers", "nnUNetTrainer", "--seeds", "2", "--archive", str(archive),
                                      "--report-only"])
    robustness.main()
    report = json.loads((work / "robustness_converged" / "report.json").read_text())
    assert [row["name"] for row in report["runs"]] == ["nnUNetTrainer__seed0", "nnUNetTrainer__seed1"]
    assert report["runs"][1]["curve"] == []  # seed 1: neither trained nor archived
    assert report["groups"]["nnUNetTrainer"]["num_runs"] == 1


def test_archive_refuses_other_settings_and_a_model_of_another_budget(tmp_path):
    regime = REGIMES["converged"]
    run = robustness.plan_runs(tmp_path, regime, [], seeds=1, dedicated_seeds=1)[0]  # the dedicated t1 model
    folder = tmp_path / "runs" / run.name
    _finished_run(run, 4, uniform(0.5))
    identity = robustness.archive_identity(run, regime, 4, 40, None, ["phantom_010"], 1.0)
    assert identity["settings"] == {"modality_dropout": {"scheme": "fixed", "keep": ["t1"], "p_keep_all": 0.0}}
    with pytest.raises(SystemExit, match="has 4 epochs, not the 8 asked for"):
        robustness.write_archive(run, folder, {**identity, "epochs": 8}, {})
    assert not folder.parent.exists() or not list(folder.parent.iterdir())  # nothing half-written
    robustness.write_archive(run, folder, identity, {})
    shutil.rmtree(run.model)
    longer = robustness.archive_identity(run, regime, 8, 40, None, ["phantom_010"], 1.0)
    with pytest.raises(SystemExit, match=r"archived in .*dedicated_t1__seed0 with other settings \(epochs: archived "
                                         r"4, asked 8\).*--retrain dedicated_t1__seed0"):
        robustness.archived_run(run, folder, longer)
    other_cases = robustness.archive_identity(run, regime, 4, 40, None, ["phantom_011"], 1.0)
    with pytest.raises(SystemExit, match="cases: archived"):
        robustness.archived_run(run, folder, other_cases)
    variant = robustness.plan_runs(tmp_path, regime, [], seeds=1, variants=[("MD", "ModalityDropoutTrainer",
                                                                             {"modality_dropout": {"p_keep_all": 1}})])
    with pytest.raises(SystemExit, match="settings: archived"):
        robustness.archived_run(run, folder, robustness.archive_identity(variant[0], regime, 4, 40, None,
                                                                         ["phantom_010"], 1.0))


def test_archive_refuses_a_run_of_an_earlier_shipped_default(tmp_path, monkeypatch):
    """The record keeps the configuration the run trained with: the shipped config merged with its override."""
    regime = REGIMES["converged"]
    plain, dropout = robustness.plan_runs(tmp_path, regime, ["nnUNetTrainer", "ModalityDropoutTrainer"], seeds=1)
    assert robustness.archive_identity(plain, regime, 4, 40, None, ["phantom_010"], 1.0)["config"] is None
    identity = robustness.archive_identity(dropout, regime, 4, 40, None, ["phantom_010"], 1.0)
    shipped = json.loads((Path(__file__).resolve().parents[1] / "trainer_configs" /
                          "ModalityDropoutTrainer.json").read_text())["modality_dropout"]
    assert identity["settings"] is None and identity["config"]["modality_dropout"] == shipped
    assert identity["config"]["nnunet"]["initial_lr"] == 0.01  # from the base class's file
    dedicated = robustness.plan_runs(tmp_path, regime, [], seeds=0, dedicated_seeds=1)[0]
    merged = robustness.archive_identity(dedicated, regime, 4, 40, None, ["phantom_010"], 1.0)["config"]
    assert merged["modality_dropout"] == {**shipped, "scheme": "fixed", "keep": ["t1"], "p_keep_all": 0.0}

    _finished_run(dropout, 4, uniform(0.5))
    folder = tmp_path / "runs" / dropout.name
    robustness.write_archive(dropout, folder, identity, {})
    shutil.rmtree(dropout.model)
    assert robustness.archived_run(dropout, folder, identity)
    # the shipped default changes after the run was archived: the same request no longer matches it
    earlier = shipped["p_keep_all"]
    changed = {"modality_dropout": {**shipped, "p_keep_all": earlier + 0.5}}
    from nnunet_missingmod import config as config_module

    original = config_module.shipped_trainer_config
    monkeypatch.setattr(config_module, "shipped_trainer_config",
                        lambda cls: config_module.deep_merge(original(cls), changed, strict=True))
    now = robustness.archive_identity(dropout, regime, 4, 40, None, ["phantom_010"], 1.0)
    assert now["settings"] == identity["settings"] and now["config"] != identity["config"]
    with pytest.raises(SystemExit, match=rf"config modality_dropout\.p_keep_all: archived {earlier!r}, asked "
                                         rf"{earlier + 0.5!r}\)"):
        robustness.archived_run(dropout, folder, now)


def test_archiving_an_unchanged_run_again_leaves_its_record_as_it_is(tmp_path):
    regime = REGIMES["converged"]
    run = robustness.plan_runs(tmp_path, regime, ["nnUNetTrainer"], seeds=1)[0]
    folder = tmp_path / "runs" / run.name
    _finished_run(run, 4, uniform(0.5))
    identity = robustness.archive_identity(run, regime, 4, 40, None, ["c"], 1.0)
    timings = {run.name: {"train_s": 60.0}}
    robustness.write_archive(run, folder, identity, timings)
    record = folder / "run.json"
    stamped = json.loads(record.read_text())["archived"].replace("2", "1")  # an earlier date
    record.write_text(record.read_text().replace(json.loads(record.read_text())["archived"], stamped))
    robustness.write_archive(run, folder, identity, timings)  # the next sitting reuses the model: nothing new
    assert json.loads(record.read_text())["archived"] == stamped
    (run.evaluation / "summary.json").write_text(json.dumps(uniform(0.6)))  # re-evaluated: refreshed
    robustness.write_archive(run, folder, identity, timings)
    assert json.loads(record.read_text())["archived"] != stamped
    assert json.loads((folder / "summary.json").read_text()) == uniform(0.6)
    robustness.write_archive(run, folder, identity, {run.name: {"train_s": 61.0}})  # other timings: refreshed
    assert json.loads(record.read_text())["timings"] == {"train_s": 61.0}


def test_worker_output_goes_to_its_log_and_the_result_is_its_last_json_line(tmp_path):
    from bench_common import run_worker

    script = tmp_path / "worker.py"
    script.write_text("import json, sys\nprint('epoch 1 of 2', flush=True)\nprint(json.dumps({'train_s': 1.5}))\n"
                      "sys.stdout.flush()\nprint('a warning at shutdown', file=sys.stderr)\n"
                      "sys.exit(int(sys.argv[1]))\n")
    log = tmp_path / "logs" / "train.log"
    assert run_worker(str(script), ["0"], dict(os.environ), log=log) == {"train_s": 1.5}
    assert run_worker(str(script), ["0"], dict(os.environ)) == {"train_s": 1.5}  # captured
    assert "epoch 1 of 2" in log.read_text()
    with pytest.raises(RuntimeError, match=r"exit 3\); the end of .*train.log:\n(.|\n)*epoch 1 of 2"):
        run_worker(str(script), ["3"], dict(os.environ), log=log)
    assert log.read_text().count("epoch 1 of 2") == 2  # appended, a sitting after another


# ---------------------------------------------------------------- interleaved timing


def test_round_order_rotates():
    trainers = ["a", "b", "c"]
    assert [train_step.round_order(trainers, r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_ratio_statistics_by_hand():
    def result(step: float) -> dict:
        return {"step_s": step, "inference_s": step, "peak_mb": 100.0, "augment_s": 0.01}

    rounds = [{"nnUNetTrainer": result(1.0), "Other": result(1.1)},
              {"nnUNetTrainer": result(2.0), "Other": result(1.8)},  # the machine slowed down in round 2
              {"nnUNetTrainer": result(1.0), "Other": result(1.3)}]
    stats = train_step.ratio_statistics(rounds)
    step = stats["Other"]["step_s"]
    assert step["values"] == pytest.approx([1.1, 0.9, 1.3])
    assert (step["median"], step["min"], step["max"]) == (pytest.approx(1.1), pytest.approx(0.9), pytest.approx(1.3))
    assert (step["q1"], step["q3"]) == (pytest.approx(1.0), pytest.approx(1.2))
    assert train_step.within_spread(step) and not train_step.within_spread(step, 1.4)
    assert stats["nnUNetTrainer"]["step_s"]["median"] == 1.0 and stats["Other"]["peak_mb"]["max"] == 1.0


def test_median_over_processes_by_hand():
    def result(step: float, inference: float) -> dict:
        return {"step_s": step, "inference_s": inference, "peak_mb": 100.0, "augment_s": 0.01, "parameters": 7}

    combined = train_step.median_over_processes([result(1.3, 0.2), result(0.9, 0.4), result(1.0, 0.3)])
    assert combined["step_s"] == pytest.approx(1.0) and combined["inference_s"] == pytest.approx(0.3)
    assert combined["parameters"] == 7 and [p["step_s"] for p in combined["processes"]] == [1.3, 0.9, 1.0]
    single = train_step.median_over_processes([result(1.3, 0.2)])
    assert single["step_s"] == 1.3 and "processes" not in single
    with pytest.raises(ValueError):
        train_step.median_over_processes([])


def test_the_rerun_is_timed_half_a_round_away_from_the_baseline():
    six = ["nnUNetTrainer", "ModalityDropoutTrainer", "SharedLatentTrainer", "D2NetTrainer", "CMFTPretrainer",
           "CMFFTrainer"]
    assert train_step.measured_trainers(six) == ["nnUNetTrainer", "ModalityDropoutTrainer", "SharedLatentTrainer",
                                                 "nnUNetTrainer (rerun)", "D2NetTrainer", "CMFTPretrainer",
                                                 "CMFFTrainer"]
    assert train_step.measured_trainers(["D2NetTrainer"], rerun=False) == [
        "nnUNetTrainer", "ModalityDropoutTrainer", "D2NetTrainer"]
    assert train_step.measured_trainers([]) == ["nnUNetTrainer", "nnUNetTrainer (rerun)", "ModalityDropoutTrainer"]


def test_rerun_check_compares_the_median_with_the_reruns_symmetric_band():
    rerun = {"median": 1.02, "min": 0.90, "max": 1.12}
    assert train_step.rerun_band(rerun) == pytest.approx((1 / 1.12, 1.12))  # 1/0.90 = 1.111 lies inside
    assert train_step.rerun_check({"median": 1.10, "min": 1.05, "max": 1.20}, rerun)  # 1.00 outside, rerun within
    assert not train_step.rerun_check({"median": 1.15, "min": 1.05, "max": 1.26}, rerun)
    lopsided = {"median": 0.93, "min": 0.80, "max": 1.05}  # one baseline process took 1.25x the other's time
    assert train_step.rerun_band(lopsided) == pytest.approx((0.80, 1.25))
    assert train_step.rerun_check({"median": 1.20, "min": 1.1, "max": 1.3}, lopsided)
    assert not train_step.rerun_check({"median": 0.78, "min": 0.7, "max": 0.9}, lopsided)


def test_rounds_time_a_rerun_of_the_baseline_and_several_processes(tmp_path, monkeypatch, capsys):
    """The orchestration: which classes run, how often, in which order, and the medians the ratios are formed from."""
    calls = []
    steps = {"nnUNetTrainer": iter([1.0, 1.2, 0.8, 1.1, 1.0, 1.0, 1.0, 0.9]),
             "ModalityDropoutTrainer": iter([1.1, 1.3, 1.1, 1.2])}

    def fake_worker(script, args, env, log=None):
        if "--make-batch" in args:
            return {}
        name = args[args.index("--worker") + 1]
        calls.append(name)
        step = next(steps[name])
        return {"step_s": step, "inference_s": step, "peak_mb": 100.0, "augment_s": 0.01, "parameters": 5}

    monkeypatch.setattr(train_step, "prepare", lambda work: {})
    monkeypatch.setattr(train_step, "run_worker", fake_worker)
    monkeypatch.setattr(sys, "argv", ["bench_train_step.py", "--work-dir", str(tmp_path), "--trainers",
                                      "nnUNetTrainer", "--rounds", "2", "--processes", "2"])
    train_step.main()
    # 2 rounds x 2 processes x (baseline, its rerun, the identical network), rotated each pass
    assert calls == ["nnUNetTrainer", "nnUNetTrainer", "ModalityDropoutTrainer",
                     "nnUNetTrainer", "ModalityDropoutTrainer", "nnUNetTrainer",
                     "nnUNetTrainer", "ModalityDropoutTrainer", "nnUNetTrainer",
                     "ModalityDropoutTrainer", "nnUNetTrainer", "nnUNetTrainer"]
    summary = json.loads((tmp_path / "bench_train_step.json").read_text())
    assert summary["processes"] == 2 and summary["rounds"] == 2
    trainers = summary["trainers"]
    # round 1: baseline 1.0, 1.1 (median 1.05); rerun 1.2, 0.8 (1.0); dropout 1.1, 1.3 (1.2)
    # round 2: baseline 1.0, 1.0 (1.0); rerun 1.0, 0.9 (0.95); dropout 1.1, 1.2 (1.15)
    rerun = trainers["nnUNetTrainer (rerun)"]["ratios"]["step_s"]["values"]
    assert rerun == pytest.approx([1.0 / 1.05, 0.95])
    dropout = trainers["ModalityDropoutTrainer"]["ratios"]["step_s"]["values"]
    assert dropout == pytest.approx([1.2 / 1.05, 1.15])
    out = capsys.readouterr().out
    assert "1.00 is OUTSIDE the range" in out and "is OUTSIDE the band of nnUNetTrainer (rerun)" in out
    picture = tmp_path / "bench_train_step.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picture.unlink()
    monkeypatch.setattr(sys, "argv", ["bench_train_step.py", "--work-dir", str(tmp_path), "--plot-only"])
    train_step.main()  # redraws the picture from the JSON, measuring nothing
    assert picture.is_file() and len(calls) == 12
    (tmp_path / "bench_train_step.json").write_text(json.dumps({"nnUNetTrainer": {}}))  # the format before the rerun
    with pytest.raises(SystemExit, match="older version"):
        train_step.main()


# ---------------------------------------------------------------- inference at a real configuration's widths


def _tiny_plans_file(tmp_path: Path) -> Path:
    from tests.conftest import tiny_plans

    path = tmp_path / "nnUNetPlans.json"
    path.write_text(json.dumps(tiny_plans(features_per_stage=(8, 16, 32))))
    return path


def test_inference_plans_default_is_nnunets_brats_network():
    _, config, patch = inference_plans.load_configuration(None, "3d_fullres", None)
    kwargs = config.network_arch_init_kwargs
    assert patch == [128, 128, 128] and kwargs["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert kwargs["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5


@pytest.mark.parametrize("plans, configuration, patch, message", [
    (None, "3d_fullres", [80, 64, 64], r"not divisible by the network's total stride \[32, 32, 32\]"),
    (None, "3d_fullres", [32, 32, 32], "one voxel at the bottleneck"),
    (None, "3d_fullres", [64, 64], "--patch has 2 axes"),
    (None, "2d", None, "needs --plans"),
    ("missing.json", "3d_fullres", None, "missing.json does not exist"),
    ("tiny", "3d_fullres", None, r"no configuration '3d_fullres' \(it has \['3d_tiny'\]\)"),
])
def test_inference_plans_bad_settings_are_refused(plans, configuration, patch, message, tmp_path):
    path = str(_tiny_plans_file(tmp_path)) if plans == "tiny" else (str(tmp_path / plans) if plans else None)
    with pytest.raises(SystemExit, match=message):
        inference_plans.load_configuration(path, configuration, patch)


def test_inference_plans_unknown_trainer_is_refused():
    with pytest.raises(SystemExit, match="unknown trainer 'NoSuchTrainer'"):
        inference_plans.trainer_class("NoSuchTrainer")


def test_inference_plans_flops_by_hand():
    conv = torch.nn.Conv3d(3, 5, 3, padding=1)
    data = torch.zeros(1, 3, 4, 6, 8)
    assert inference_plans.count_flops(conv, data) == 2 * 5 * 3 * 27 * 4 * 6 * 8  # multiply-adds, x2


def test_inference_plans_tiny_run(tmp_path):
    out = tmp_path / "result.json"
    summary = inference_plans.main(["--plans", str(_tiny_plans_file(tmp_path)), "--configuration", "3d_tiny",
                                    "--trainers", "CMFFTrainer", "--rounds", "2", "--steps", "1", "--out", str(out)])
    rows = summary["trainers"]
    assert list(rows) == ["nnUNetTrainer", "ModalityDropoutTrainer", "CMFFTrainer"]  # reference and check added
    assert rows["nnUNetTrainer"]["ratio"]["median"] == 1.0 and rows["ModalityDropoutTrainer"]["flop_ratio"] == 1.0
    assert rows["CMFFTrainer"]["flop_ratio"] > 1  # two branches and the fusion at the plans' narrow widths
    assert json.loads(out.read_text())["patch"] == [16, 16, 16]


# ---------------------------------------------------------------- cases with and without a region


def _label_file(folder: Path, case: str, labels: list[int]) -> None:
    import SimpleITK as sitk

    array = np.zeros((2, 3, 4), dtype=np.uint8)
    array.flat[: len(labels)] = labels
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / f"{case}.nii.gz"))


def test_presence_split_by_hand(tmp_path):
    labels = tmp_path / "labelsTs"
    _label_file(labels, "a", [1, 2, 3])  # edema, core and enhancing tumour
    _label_file(labels, "b", [1, 2])  # no enhancing tumour
    _label_file(labels, "c", [1])  # edema only: no TC, no ET
    presence = robustness.region_presence(labels, ["a", "b", "c", "not_there"])
    assert presence == {"a": {"WT": True, "TC": True, "ET": True}, "b": {"WT": True, "TC": True, "ET": False},
                        "c": {"WT": True, "TC": False, "ET": False}}

    def rows(et_full_a, et_t1_a, et_full_b):
        return [{"case": "a", "combination": FULL, "ET_Dice": str(et_full_a), "TC_Dice": "0.7"},
                {"case": "a", "combination": "t1", "ET_Dice": str(et_t1_a), "TC_Dice": "0.5"},
                {"case": "b", "combination": FULL, "ET_Dice": str(et_full_b), "TC_Dice": "0.9"},
                {"case": "b", "combination": "t1", "ET_Dice": "0.0", "TC_Dice": "0.3"},
                {"case": "c", "combination": FULL, "ET_Dice": "0.0", "TC_Dice": "1.0"},
                {"case": "c", "combination": "t1", "ET_Dice": "0.0", "TC_Dice": "0.0"}]

    split = robustness.presence_split(rows(0.8, 0.4, 1.0), presence, "ET")
    # with ET: case a only; without: b (empty with all four, not with T1) and c (never empty)
    assert split == pytest.approx({"present_full": 0.8, "present_average": 0.6, "absent_full": 0.5,
                                   "absent_average": 0.25})
    tc = robustness.presence_split(rows(0.8, 0.4, 1.0), presence, "TC")
    assert tc == pytest.approx({"present_full": 0.8, "present_average": (0.8 + 0.4) / 2, "absent_full": 1.0,
                                "absent_average": 0.5})

    result = robustness.aggregate_presence({"MD": [rows(0.8, 0.4, 1.0), rows(0.6, 0.2, 0.0)]}, presence)
    assert set(result) == {"TC", "ET"}  # every case has WT: nothing to split
    et = result["ET"]
    assert (et["cases_with"], et["cases_without"]) == (1, 2)
    assert et["groups"]["MD"]["present_full"]["mean"] == pytest.approx(0.7)
    assert et["groups"]["MD"]["present_full"]["sd"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert et["groups"]["MD"]["absent_full"]["mean"] == pytest.approx(0.25)  # 0.5 and 0.0

    aggregate = robustness.aggregate_benchmark({"MD": [uniform(0.6), uniform(0.7)]})
    aggregate["presence"] = result
    text = robustness.report_markdown(aggregate, [], REGIMES["converged"])
    assert "## ET: cases with and without ET in the reference" in text
    # with ET: (0.8 + 0.4) / 2 and (0.6 + 0.2) / 2; left empty: (0.5 + 0) / 2 and 0
    assert "| MD | 2 | 50.0 ± 14.1 | 70.0 ± 14.1 | 12.5 ± 17.7 | 25.0 ± 35.4 |" in text


def test_presence_split_without_cases_of_one_kind():
    presence = {"a": {"WT": True, "TC": True, "ET": True}}
    split = robustness.presence_split([{"case": "a", "combination": "t1", "ET_Dice": "0.5"}], presence, "ET")
    assert split == {"present_average": 0.5, "present_full": None, "absent_average": None, "absent_full": None}


def test_report_reads_the_per_case_files_and_the_labels(tmp_path):
    regime = REGIMES["converged"]
    labels = tmp_path / "labelsTs"
    _label_file(labels, "a", [1, 3])
    _label_file(labels, "b", [1, 2])  # no enhancing tumour
    runs = robustness.plan_runs(tmp_path, regime, ["nnUNetTrainer"], seeds=2)
    for run, (dice_a, dice_b) in zip(runs, ((0.9, 1.0), (0.7, 0.0)), strict=True):
        _finished_run(run, 4, uniform(0.5))
        (run.evaluation / "per_case.csv").write_text(
            f"case,combination,WT_Dice,TC_Dice,ET_Dice\na,{FULL},0.8,0.8,{dice_a}\nb,{FULL},0.8,0.8,{dice_b}\n")
    out = tmp_path / "report"
    out.mkdir()
    robustness.write_report(runs, regime, out, {}, 40, labels=labels)
    et = json.loads((out / "report.json").read_text())["presence"]["ET"]
    assert (et["cases_with"], et["cases_without"]) == (1, 1)
    assert et["groups"]["nnUNetTrainer"]["present_full"]["mean"] == pytest.approx(0.8)
    assert et["groups"]["nnUNetTrainer"]["absent_full"]["mean"] == pytest.approx(0.5)
    assert "## ET: cases with and without ET in the reference" in (out / "report.md").read_text()
    robustness.write_report(runs, regime, out, {}, 40, labels=tmp_path / "no_labels")  # no labels: no split
    assert "presence" not in json.loads((out / "report.json").read_text())


def test_dry_run_estimates_the_time_left_from_the_archived_runs(tmp_path, monkeypatch, capsys):
    archive = tmp_path / "runs"
    records = {  # name: (trainer, epochs, iterations, timings, pretrain_epochs)
        "nnUNetTrainer__seed0": ("nnUNetTrainer", 4, 10, {"train_s": 40.0}, None),  # 1.0 s per iteration
        "nnUNetTrainer__seed1": ("nnUNetTrainer", 4, 10, {"train_s": 200.0}, None),  # 5.0
        "long__seed0": ("nnUNetTrainer", 8, 10, {"train_s": 160.0}, None),  # 2.0: median of 1, 5, 2 is 2 (mean 2.7)
        "CMFFTrainer__seed0": ("CMFFTrainer", 2, 10, {"train_s": 100.0, "pretrain_s": 30.0}, 3),  # 5.0 and 1.0
        "untimed__seed0": ("SharedLatentTrainer", 2, 10, {}, None),  # no timing: no speed
    }
    for name, (trainer, epochs, iterations, timings, pretrain_epochs) in records.items():
        (archive / name).mkdir(parents=True)
        (archive / name / "run.json").write_text(json.dumps(
            {"name": name, "trainer": trainer, "epochs": epochs, "iterations": iterations, "timings": timings,
             "pretrain_epochs": pretrain_epochs}))
    speeds = robustness.archived_speeds(archive)
    assert speeds == pytest.approx({"nnUNetTrainer": 2.0, "CMFFTrainer": 5.0, "CMFTPretrainer": 1.0})
    regime = REGIMES["converged"]
    plain, cmff, shared = robustness.plan_runs(tmp_path / "work", regime,
                                               ["nnUNetTrainer", "CMFFTrainer", "SharedLatentTrainer"], seeds=1)
    assert robustness.estimate_training_s(plain, 6, 10, None, speeds) == pytest.approx(2.0 * 60)
    assert robustness.estimate_training_s(cmff, 6, 10, 4, speeds) == pytest.approx(5.0 * 60 + 1.0 * 40)
    assert robustness.estimate_training_s(shared, 6, 10, None, speeds) is None
    # the first phase interrupted at its epoch 1 of 4; or finished (None): only the second phase is left
    assert robustness.estimate_training_s(cmff, 6, 10, 4, speeds, pretrain_done=1) == pytest.approx(5.0 * 60 + 30)
    assert robustness.estimate_training_s(cmff, 6, 10, 4, speeds, done=2, pretrain_done=None) == \
        pytest.approx(5.0 * 40)

    monkeypatch.setattr(robustness, "prepare", lambda *a, **k: pytest.fail("--dry-run prepared data"))
    monkeypatch.setattr(sys, "argv", ["bench_robustness.py", "--work-dir", str(tmp_path / "work"), "--regime",
                                      "converged", "--trainers", "nnUNetTrainer", "SharedLatentTrainer",
                                      "--seeds", "3", "--iterations", "10", "--epochs-for", "nnUNetTrainer=30",
                                      "--archive", str(archive), "--dry-run"])
    robustness.main()
    lines = capsys.readouterr().out.splitlines()
    assert "archived" in lines[0] and "[~" not in lines[0]  # nnUNetTrainer__seed0, seed1: archived
    assert lines[2].startswith("nnUNetTrainer__seed2") and lines[2].endswith("[~10 min]")  # 30 x 10 x 2.0 s
    assert lines[-1].startswith("left to train: about 0.2 h") and "SharedLatentTrainer__seed2" in lines[-1]


def test_dry_run_times_this_machine_from_the_training_logs_here(tmp_path, monkeypatch, capsys):
    """A run in training here: its trainer's speed is read from nnU-Net's logs in the work folder (the median, so
    an epoch stretched by a pause is left out), and only the epochs its checkpoint has left are counted."""
    archive = tmp_path / "runs"
    (archive / "nnUNetTrainer__seed0").mkdir(parents=True)
    (archive / "nnUNetTrainer__seed0" / "run.json").write_text(json.dumps(
        {"name": "nnUNetTrainer__seed0", "trainer": "nnUNetTrainer", "epochs": 30, "iterations": 10,
         "timings": {"train_s": 300.0}, "pretrain_epochs": None}))  # archived: 1.0 s per iteration
    regime = REGIMES["converged"]
    work = tmp_path / "work"
    plain = robustness.plan_runs(work, regime, ["nnUNetTrainer"], seeds=3)
    fold = plain[1].fold  # nnUNetTrainer__seed1, interrupted at epoch 12 of 30
    fold.mkdir(parents=True)
    (fold / "debug.json").write_text(json.dumps({"num_iterations_per_epoch": "10"}))
    epochs = [95.0, 60.0, 61.5, 900.0, 58.5, 60.0]  # 6.0 s per iteration; the first is warm-up, the 900 s a pause
    starts = [1000.0 * i for i in range(len(epochs))]  # nnU-Net's per-epoch timestamps in the checkpoint
    ends = [a + t for a, t in zip(starts, epochs, strict=True)]
    logging = {"ema_fg_dice": [0.5] * len(epochs), "mean_fg_dice": [0.5] * len(epochs),
               "epoch_start_timestamps": starts, "epoch_end_timestamps": ends}
    torch.save({"current_epoch": 12, "logging": logging}, fold / "checkpoint_latest.pth")
    assert robustness.local_speeds(plain, regime) == pytest.approx({"nnUNetTrainer": 6.0})
    with monkeypatch.context() as patch:
        patch.setattr(robustness, "MIN_LOCAL_EPOCHS", 6)  # five timed epochs after the warm-up: too few now
        assert robustness.local_speeds(plain, regime) == {}
    assert robustness.checkpoint_epoch(fold) == 12
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "checkpoint_latest.pth").write_bytes(b"half a checkpoint")  # being written: counted from scratch
    assert robustness.checkpoint_epoch(broken) == 0
    assert "could not read" in capsys.readouterr().out
    assert robustness.estimate_training_s(plain[1], 30, 10, None, {"nnUNetTrainer": 6.0}, done=12) == \
        pytest.approx(18 * 10 * 6.0)

    monkeypatch.setattr(robustness, "prepare", lambda *a, **k: pytest.fail("--dry-run prepared data"))
    monkeypatch.setattr(sys, "argv", ["bench_robustness.py", "--work-dir", str(work), "--regime", "converged",
                                      "--trainers", "nnUNetTrainer", "--seeds", "3", "--iterations", "10",
                                      "--epochs-for", "nnUNetTrainer=30", "--archive", str(archive), "--dry-run"])
    robustness.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("nnUNetTrainer__seed1") and " continue " in lines[1]
    assert lines[1].endswith("[~18 min for the 18 epochs left, this machine's speed]")  # 18 x 10 x 6.0 s
    assert lines[2].startswith("nnUNetTrainer__seed2") and lines[2].endswith("[~30 min, this machine's speed]")
    assert lines[-1].startswith("left to train: about 0.8 h at this machine's speed for nnUNetTrainer")


def test_first_moves_the_named_runs_to_the_front_and_refuses_unknown_names(tmp_path):
    runs = robustness.plan_runs(tmp_path, REGIMES["converged"], ["nnUNetTrainer"], seeds=2, dedicated_seeds=1)
    ordered = robustness.order_runs(runs, ["dedicated_t1+t2+flair__seed0", "nnUNetTrainer__seed1"])
    names = [r.name for r in ordered]
    assert names[:2] == ["dedicated_t1+t2+flair__seed0", "nnUNetTrainer__seed1"]
    assert names[2:] == [r.name for r in runs if r.name not in names[:2]]  # the rest in the planned order
    assert sorted(names) == sorted(r.name for r in runs)
    assert robustness.order_runs(runs, []) == runs
    with pytest.raises(ValueError, match="no run named dedicated_t5__seed0"):
        robustness.order_runs(runs, ["dedicated_t5__seed0"])
    with pytest.raises(ValueError, match="twice"):
        robustness.order_runs(runs, ["nnUNetTrainer__seed0", "nnUNetTrainer__seed0"])


def test_epochs_for_a_group_a_model_or_one_run_and_retrain_by_run_name(tmp_path):
    runs = robustness.plan_runs(tmp_path, REGIMES["converged"], ["nnUNetTrainer"], seeds=2, dedicated_seeds=2)
    by_name = {r.name: r for r in runs}
    epochs_for = {"dedicated": 480, "dedicated_t1ce": 960, "dedicated_t1ce__seed1": 1200, "nnUNetTrainer__seed1": 7}
    got = {name: robustness.run_epochs(run, epochs_for, 120) for name, run in by_name.items()}
    assert got["dedicated_t1ce__seed0"] == 960 and got["dedicated_t1ce__seed1"] == 1200  # the most specific key
    assert got["dedicated_t2__seed0"] == 480 and got["dedicated_t1+t1ce__seed1"] == 480  # the group
    assert got["nnUNetTrainer__seed0"] == 120 and got["nnUNetTrainer__seed1"] == 7  # the default, one run
    robustness.check_run_names("--epochs-for", epochs_for, runs)
    with pytest.raises(SystemExit, match="dedicated_t5 is not a group, run or first-phase trainer"):
        robustness.check_run_names("--epochs-for", {"dedicated_t5": 10}, runs)
    # --retrain takes the same names: one dedicated model, not the 15
    chosen = [r.name for r in runs if robustness.run_named(r, ["dedicated_t1ce"])]
    assert chosen == ["dedicated_t1ce__seed0", "dedicated_t1ce__seed1"]
    assert [r.name for r in runs if robustness.run_named(r, ["nnUNetTrainer__seed1"])] == ["nnUNetTrainer__seed1"]
    assert len([r for r in runs if robustness.run_named(r, ["dedicated"])]) == 30
    robustness.check_run_names("--retrain", ["dedicated_t1ce", "nnUNetTrainer__seed1", "dedicated"], runs)
    with pytest.raises(SystemExit, match="--retrain: dedicated_t1c is not a group, run"):
        robustness.check_run_names("--retrain", ["dedicated_t1c"], runs)  # a typo deletes nothing, silently: refused


# ---------------------------------------------------------------- --postprocessing


def _fake_postprocessing_steps(monkeypatch, calls: list, threshold: int = 100) -> None:
    """evaluate-missing and determine-postprocessing replaced by stand-ins that write what the real ones do
    (a summary, saved predictions when asked, the choice) and record their calls."""
    from nnunet_missingmod.evaluation import missing_combinations, postprocessing

    def evaluate(model, fold, *, split, output, combinations=None, save_predictions=False, postprocessing=None,
                 **kwargs):
        calls.append(("evaluate", split, Path(output).name, combinations, save_predictions, postprocessing))
        Path(output).mkdir(parents=True, exist_ok=True)
        et = 0.6 if postprocessing else 0.4  # the post-processed evaluation scores higher ET
        names = [mods.combination_name(c) for c in combinations] if combinations else NAMES
        (Path(output) / "summary.json").write_text(json.dumps({**summary(dict.fromkeys(names, 0.5), et=et),
                                                                "num_cases": 2, "split": split}))
        (Path(output) / "per_case.csv").write_text("case,combination,WT_Dice\n")
        if save_predictions:
            (Path(output) / "predictions" / FULL).mkdir(parents=True, exist_ok=True)
            (Path(output) / "predictions" / FULL / "a.nii.gz").write_bytes(b"x")
        return Path(output)

    def determine(folder):
        calls.append(("determine", Path(folder).name))
        choice = {"label": 3, "min_voxels": threshold, "applied": threshold > 0, "dice_before": 0.40,
                  "dice_after": 0.55, "relabelled": {"without_label_in_reference": 3, "with_label_in_reference": 1},
                  "chosen_on": {"predictions": 30}}
        (Path(folder) / "postprocessing.pkl").write_bytes(b"pickle")
        (Path(folder) / "postprocessing.json").write_text(json.dumps(choice))
        return choice

    monkeypatch.setattr(missing_combinations, "evaluate_missing", evaluate)
    monkeypatch.setattr(postprocessing, "determine_postprocessing", determine)


def _age(*files: Path) -> None:
    """Give ``files`` increasing modification times in the past, in that order (made one after another)."""
    for offset, file in enumerate(files):
        os.utime(file, (1000 + offset, 1000 + offset))


def test_postprocessing_is_chosen_on_the_validation_cases_and_redone_only_when_stale(tmp_path, monkeypatch):
    regime = REGIMES["converged"]
    run = robustness.plan_runs(tmp_path, regime, ["nnUNetTrainer"], seeds=1, dedicated_seeds=1)[-1]  # all four
    assert run.combination == (0, 1, 2, 3)
    _finished_run(run, 4, uniform(0.5))
    calls = []
    _fake_postprocessing_steps(monkeypatch, calls)
    args = type("Args", (), {"step_size": 1.0, "device": "cpu"})()
    timings = {}
    robustness.postprocess_run(run, [Path("a"), Path("b")], {"a", "b"}, args, timings)
    pickle_file = run.validation / "postprocessing.pkl"
    # a dedicated model: its own combination; the threshold on the validation split, then the test split with it
    assert calls == [("evaluate", "val", run.evaluation.name + "_val", [(0, 1, 2, 3)], True, None),
                     ("determine", run.evaluation.name + "_val"),
                     ("evaluate", "test", run.evaluation.name + "_postprocessed", [(0, 1, 2, 3)], False, pickle_file)]
    assert "postprocess_s" in timings[run.name]
    checkpoint = run.fold / "checkpoint_final.pth"
    _age(checkpoint, run.validation / "summary.json", pickle_file, run.postprocessed / "summary.json")
    assert robustness.postprocessing_is_current(run)
    calls.clear()
    robustness.postprocess_run(run, [Path("a"), Path("b")], {"a", "b"}, args, {})
    assert calls == []  # everything current: reused
    robustness.postprocess_run(run, [Path("a"), Path("b"), Path("c")], {"a", "b", "c"}, args, {})
    assert [c[:2] for c in calls] == [("evaluate", "test")]  # other held-out cases: only the last step again
    calls.clear()
    _age(checkpoint, run.validation / "summary.json", run.postprocessed / "summary.json", pickle_file)
    assert not robustness.postprocessing_is_current(run)  # chosen again after the held-out evaluation
    robustness.postprocess_run(run, [Path("a"), Path("b")], {"a", "b"}, args, {})
    assert [c[:2] for c in calls] == [("evaluate", "test")]
    calls.clear()
    _age(run.validation / "summary.json", pickle_file, run.postprocessed / "summary.json", checkpoint)  # retrained
    assert not robustness.postprocessing_is_current(run)
    robustness.postprocess_run(run, [Path("a"), Path("b")], {"a", "b"}, args, {})
    assert [c[:2] for c in calls] == [("evaluate", "val"), ("determine", run.validation.name), ("evaluate", "test")]


def test_postprocessed_evaluations_are_archived_and_reported_apart(tmp_path, monkeypatch):
    regime = REGIMES["converged"]
    archive = tmp_path / "repository" / "runs"
    first = robustness.plan_runs(tmp_path / "machine1", regime, ["nnUNetTrainer", "ModalityDropoutTrainer"], seeds=1)
    plain, dropout = first
    calls = []
    _fake_postprocessing_steps(monkeypatch, calls, threshold=50)
    args = type("Args", (), {"step_size": 1.0, "device": "cpu"})()
    for run in first:
        _finished_run(run, 4, uniform(0.5))
    steps = [dropout.fold / "checkpoint_final.pth", dropout.validation / "summary.json",
             dropout.validation / "postprocessing.pkl", dropout.postprocessed / "summary.json"]
    robustness.postprocess_run(dropout, [Path("a"), Path("b")], {"a", "b"}, args, {})  # only dropout post-processed
    _age(*steps)  # one after another (a file system's clock may give them one time)
    for run in first:
        identity = robustness.archive_identity(run, regime, 4, 40, None, ["a", "b"], 1.0)
        robustness.write_archive(run, archive / run.name, identity, {})
    kept = sorted(p.relative_to(archive / dropout.name).as_posix() for p in (archive / dropout.name).rglob("*")
                  if p.is_file())
    assert kept == ["per_case.csv", "postprocessed/per_case.csv", "postprocessed/postprocessing.json",
                    "postprocessed/summary.json", "run.json", "summary.json"]
    assert not (archive / plain.name / "postprocessed").exists()
    record = (archive / dropout.name / "run.json").read_text()
    robustness.write_archive(dropout, archive / dropout.name, robustness.archive_identity(
        dropout, regime, 4, 40, None, ["a", "b"], 1.0), {})
    assert (archive / dropout.name / "run.json").read_text() == record  # unchanged: left as it was
    _age(*steps[1:], steps[0])  # retrained since: its post-processed evaluation is stale
    robustness.write_archive(dropout, archive / dropout.name, robustness.archive_identity(
        dropout, regime, 4, 40, None, ["a", "b"], 1.0), {})
    assert not (archive / dropout.name / "postprocessed").exists()  # not archived as the new model's
    robustness.postprocess_run(dropout, [Path("a"), Path("b")], {"a", "b"}, args, {})
    _age(*steps)
    robustness.write_archive(dropout, archive / dropout.name, robustness.archive_identity(
        dropout, regime, 4, 40, None, ["a", "b"], 1.0), {})

    second = robustness.plan_runs(tmp_path / "machine2", regime, ["nnUNetTrainer", "ModalityDropoutTrainer"], seeds=1)
    out = tmp_path / "machine2" / "report"
    out.mkdir(parents=True)
    robustness.write_report(second, regime, out, {}, 40, archive)
    robustness.write_report(second, regime, out, {}, 40, archive, postprocessed=True)
    raw = json.loads((out / "report.json").read_text())
    assert raw["groups"]["ModalityDropoutTrainer"]["average"]["ET_Dice"]["mean"] == pytest.approx(0.4)
    post = json.loads((out / "postprocessed" / "report.json").read_text())
    assert set(post["groups"]) == {"ModalityDropoutTrainer"}  # plain nnU-Net was not post-processed
    assert post["groups"]["ModalityDropoutTrainer"]["average"]["ET_Dice"]["mean"] == pytest.approx(0.6)
    markdown = (out / "postprocessed" / "report.md").read_text()
    assert markdown.startswith("# Robustness benchmark, regime `converged`, post-processed")
    assert "| ModalityDropoutTrainer__seed0 | 50 | 40.0 → 55.0 | 3 / 1 |" in markdown
    assert not (out / "postprocessed" / "learning_curves.png").exists()
    empty = tmp_path / "nothing"
    empty.mkdir()
    robustness.write_report(first[:1], regime, empty, {}, 40, postprocessed=True)  # no run post-processed
    assert not (empty / "postprocessed").exists()


def test_dry_run_says_where_each_runs_postprocessing_stands(tmp_path, monkeypatch, capsys):
    archive = tmp_path / "runs"
    for seed in (0, 1):
        (archive / f"nnUNetTrainer__seed{seed}").mkdir(parents=True)
        (archive / f"nnUNetTrainer__seed{seed}" / "run.json").write_text(json.dumps(
            {"trainer": "nnUNetTrainer", "epochs": 4, "iterations": 10, "timings": {"train_s": 40.0}}))
    (archive / "nnUNetTrainer__seed0" / "postprocessed").mkdir()
    (archive / "nnUNetTrainer__seed0" / "postprocessed" / "summary.json").write_text("{}")
    monkeypatch.setattr(robustness, "prepare", lambda *a, **k: pytest.fail("--dry-run prepared data"))
    monkeypatch.setattr(sys, "argv", ["bench_robustness.py", "--work-dir", str(tmp_path / "work"), "--regime",
                                      "converged", "--trainers", "nnUNetTrainer", "--seeds", "3", "--iterations",
                                      "10", "--archive", str(archive), "--postprocessing", "--dry-run"])
    robustness.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("[post-processing: archived]")
    assert lines[1].endswith("[post-processing: not archived (the model is not here)]")
    assert lines[2].startswith("nnUNetTrainer__seed2 ") and lines[2].endswith("[post-processing: to do]")
