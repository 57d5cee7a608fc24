"""UTAD-Net on the phantoms: teacher then student, image quality against both baselines, downstream Dice with
synthesised vs zero-filled sequences, and the speed of ``synthesize``.

    python scripts/bench_synthesis.py [--work-dir bench_work] [--regime {short,converged,smoke}]
        [--epochs 40] [--teacher-epochs N] [--iterations 50] [--batch-size 4] [--eval-cases 10]
        [--combinations {one-missing,all}] [--speed-cases 5] [--dropout] [--no-downstream] [--step-size 1.0]
        [-device cpu] [--variant LABEL SETTINGS.json] [--with-fallback] [--segmentation-model LABEL MODEL_FOLDER]
        [--dry-run]

Steps (every one resumable: a finished model, evaluation or timing is reused, an interrupted training goes on
from its ``checkpoint_latest.pth`` with ``nnUNetv2_train --c``):

1. The regime's phantoms, nnU-Net's plans and 3d preprocessing (``bench_common.prepare``), then nnU-Net's ``2d``
   preprocessing and a ``2d_cpu`` configuration (``add-cpu-config --parent 2d``: the planned 2d patch, features
   16-128, batch ``--batch-size``).
2. ``UTADNetTeacherTrainer`` then ``UTADNetStudentTrainer`` on ``2d_cpu``, fold 0, through ``nnUNetv2_train`` with
   the budget ``--epochs`` x ``--iterations`` in an ``nnUNet_missingmod_config`` override file (both trainers the
   same budget, unless ``--teacher-epochs`` gives the teacher its own number of epochs; the final validation
   writes ``synthesis_validation.json``). A finished model is reused whatever the budget asked now: train a
   different budget under a new ``--variant`` label.
3. ``evaluate-synthesis`` of the student on the first ``--eval-cases`` held-out phantoms (zero-fill and
   histogram-matching baselines in the same run).
4. Downstream: a plain full-modality ``nnUNetTrainer`` (the regime's 3d_cpu budget, as in
   ``bench_robustness.py``, whose finished seed-0 model in the same work folder is used when present), scored
   by ``evaluate-missing`` on the held-out phantoms with the missing sequences zero-filled and synthesised by
   the student: ``--combinations one-missing`` (default: the BraSyn setting, the four combinations lacking
   exactly one sequence, plus all four real) or ``all`` (the 15 combinations). ``--dropout`` adds
   ``ModalityDropoutTrainer`` (zero-fill) at the same budget. ``--no-downstream`` skips this step (no
   segmentation model is trained; the report says so): image quality only. ``--segmentation-model LABEL
   MODEL_FOLDER`` scores another finished full-modality model of the same phantoms and configuration instead of the
   regime's ``nnUNetTrainer`` (e.g. a longer-trained one: the 480-epoch all-four dedicated model of
   ``bench_robustness.py --dedicated``, whose ``fixed`` scheme keeping all four sequences trains as plain
   nnU-Net); its evaluations go into ``downstream_<name>_<LABEL>`` beside the default ones, and the report into
   ``report_<LABEL>.md`` / ``.json`` (``figures/downstream_<LABEL>.png``).
5. Speed: ``synthesize`` on ``--speed-cases`` held-out phantoms with one sequence missing (a different one per
   case), and with only FLAIR acquired: slices per second (translation loop) and seconds per case (everything,
   reading and writing included), model loading excluded.

Outputs in ``<work-dir>/synthesis_<regime>``: ``report.md`` and ``report.json`` (budgets, plateau check of the
validation SSIM, teacher vs student validation SSIM per pair over whole slices and, for models validated since it
exists, over the brain, the image-quality table with the goal checks, the
downstream Dice table with synthesis / all-real ratios, speed), and ``figures/``: ``learning_curves.png`` (the
validation SSIM and every loss term per epoch of both trainers), ``synthesis_examples.png``, ``downstream.png``
(Dice per combination and region, zero-fill vs synthesis vs all real). ``--dry-run`` prints the steps and what
each would do (reuse, continue, run) without running anything; ``--regime smoke`` runs the whole pipeline at a
tiny budget (4 mm phantoms, 1 epoch x 2 iterations) to check that it works, with figures that mean nothing.

Every step scores the student itself: ``synthesize``'s histogram fallback (an option, off by default) is off in
``evaluate-synthesis``, the downstream evaluation and the speed runs; the report lists the pairs it would take over.
``--with-fallback`` also runs ``evaluate-synthesis`` and the downstream evaluation with it on (into
``evaluate_synthesis_fallback`` and ``downstream_synthesized_fallback``), and the report compares the two.

``--variant LABEL SETTINGS.json`` trains teacher and student with the settings of ``SETTINGS.json`` (an
``nnUNet_missingmod_config`` override, checked against both trainers' configs; e.g. ``{"utad": {"lambda_cls": 10}}``)
into their own ``nnUNet_results`` in ``<work-dir>/synthesis_<regime>_<LABEL>``, where every output of the steps
above that depends on them goes too; the segmentation models and the zero-filled downstream evaluations are the
default run's (computed there when missing), never redone. A label keeps the
settings it was started with (``variant.json``): other settings under the same label are refused.

Budgets: ``--epochs 40 --iterations 50`` (2000 generator updates per trainer) is a first guess, not a measured
plateau; read the plateau column of the report and raise it if it says "no".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import REGIMES, Regime, prepare, results_model_dir, train_with_budget  # noqa: E402
from bench_robustness import evaluation_is_current, plateau_check, read_variants, training_action  # noqa: E402

from nnunet_missingmod import modalities as mods  # noqa: E402
from nnunet_missingmod.config import OVERRIDE_ENV  # noqa: E402
from nnunet_missingmod.demo import nnunet_environment  # noqa: E402

TEACHER, STUDENT = "UTADNetTeacherTrainer", "UTADNetStudentTrainer"
SEGMENTATION, DROPOUT = "nnUNetTrainer", "ModalityDropoutTrainer"
CONFIGURATION_2D = "2d_cpu"
FEATURES_2D = (16, 32, 64, 128)
#: A tiny regime that runs the whole pipeline in minutes (pipeline check only).
SMOKE = Regime("smoke", 992, 4.0, (32, 32, 32), (8, 16, 32), 2, epochs=1, iterations=2, save_every=1,
               note="pipeline check: figures mean nothing", num_cases=6, num_test=2)
FULL = tuple(range(mods.NUM_MODALITIES))
#: The ``nnunet`` keys the benchmark sets itself from ``--epochs``/``--iterations`` (a variant may not).
BUDGET_KEYS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "save_every")


def one_missing() -> list[tuple[int, ...]]:
    """The BraSyn setting: every combination lacking exactly one sequence, then all four real."""
    return [c for c in mods.all_combinations() if len(c) == mods.NUM_MODALITIES - 1] + [FULL]


def output_dir(work: Path, regime: Regime, variant: str | None = None) -> Path:
    """``<work>/synthesis_<regime>``, or ``<work>/synthesis_<regime>_<label>`` for a ``--variant``."""
    return work / (f"synthesis_{regime.name}" + (f"_{variant}" if variant else ""))


def synthesis_results(work: Path, regime: Regime, variant: str | None = None) -> Path:
    """The ``nnUNet_results`` folder of the UTAD-Net models: the work folder's, or a variant's own (so that the
    student of a variant finds its teacher there, and the default models are never touched)."""
    return work / "nnUNet_results" if variant is None else output_dir(work, regime, variant) / "nnUNet_results"


# ---------------------------------------------------------------------------------------------- steps


def prepare_2d(work: Path, regime: Regime, env: dict, batch_size: int, dry_run: bool) -> str:
    """nnU-Net's 2d preprocessing and the ``2d_cpu`` configuration; returns what was done."""
    from nnunet_missingmod.data.plans import add_cpu_configuration
    from nnunet_missingmod.demo import _console_script, run_step

    preprocessed = work / "nnUNet_preprocessed" / regime.dataset_name
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    done = (preprocessed / "nnUNetPlans_2d").is_dir()
    if dry_run:
        return "reuse 2d preprocessing" if done else "run nnUNetv2_preprocess -c 2d"
    if not done:
        run_step("nnU-Net 2d preprocessing", [_console_script("nnUNetv2_preprocess"), "-d", str(regime.dataset_id),
                                              "-c", "2d", "-np", env["nnUNet_def_n_proc"]], env)
    stride = 2 ** (len(FEATURES_2D) - 1)
    patch = [max(stride, p - p % stride) for p in plans["configurations"]["2d"]["patch_size"]]
    add_cpu_configuration(regime.dataset_id, name=CONFIGURATION_2D, parent="2d", patch_size=patch,
                          features_per_stage=FEATURES_2D, batch_size=batch_size,
                          preprocessed_folder=work / "nnUNet_preprocessed")
    return f"2d_cpu: patch {patch}, features {list(FEATURES_2D)}, batch {batch_size}"


def synthesis_model_dir(work: Path, regime: Regime, trainer: str, variant: str | None = None) -> Path:
    return results_model_dir(synthesis_results(work, regime, variant), trainer,
                             dataclasses.replace(regime, configuration=CONFIGURATION_2D))


def read_variant(label: str, file: str) -> dict:
    """A ``--variant``'s settings, checked against both trainers' configs (unknown keys, budget keys)."""
    import re

    from nnunet_missingmod.config import deep_merge, load_trainer_config
    from nnunet_missingmod.inference.synthesize import find_trainer_class

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", label):
        raise SystemExit(f"--variant label {label!r}: use letters, digits, '-' and '_' only")
    path = Path(file)
    try:
        [(_, _, settings)] = read_variants([(label, TEACHER, file)])
    except ValueError as error:
        raise SystemExit(str(error)) from None
    budget = sorted(set(settings.get("nnunet", {})) & set(BUDGET_KEYS))
    if budget:
        raise SystemExit(f"--variant {label}: {path} sets {', '.join('nnunet.' + k for k in budget)}; the budget "
                         f"comes from --epochs/--iterations")
    for trainer in (TEACHER, STUDENT):
        try:  # the strict merge the trainers apply to an nnUNet_missingmod_config file
            deep_merge(load_trainer_config(find_trainer_class(trainer)), settings, strict=True)
        except KeyError as error:
            raise SystemExit(f"--variant {label}: {path}: {error.args[0]}") from None
    return settings


def train_synthesis(work: Path, regime: Regime, env: dict, trainer: str, epochs: int, iterations: int, device: str,
                    dry_run: bool, timings: dict, variant: str | None = None, settings: dict | None = None) -> str:
    """``nnUNetv2_train`` of a UTAD-Net trainer with the budget (and a variant's settings) in an override file;
    resumable."""
    from nnunet_missingmod.config import deep_merge
    from nnunet_missingmod.demo import _console_script, run_step

    model = synthesis_model_dir(work, regime, trainer, variant)
    action = training_action(model / "fold_0")
    validation = (model / "fold_0" / "synthesis_validation.json").is_file()
    if dry_run:
        return action if action != "reuse" or validation else "reuse (final validation missing: --val)"
    budget = {"nnunet": {"num_epochs": epochs, "num_iterations_per_epoch": iterations,
                         "num_val_iterations_per_epoch": max(1, iterations // 5),
                         "save_every": max(1, min(5, epochs))}}
    override = output_dir(work, regime, variant) / f"budget_{trainer}.json"
    override.parent.mkdir(parents=True, exist_ok=True)
    override.write_text(json.dumps(deep_merge(budget, settings or {}, strict=False)))
    command = [_console_script("nnUNetv2_train"), str(regime.dataset_id), CONFIGURATION_2D, "0", "-tr", trainer,
               "-device", device]
    if action == "reuse" and not validation:
        command.append("--val")
    elif action == "continue":
        command.append("--c")
    elif action == "reuse":
        return "reuse"
    seconds = run_step(f"{trainer}: {epochs} x {iterations}", command,
                       {**env, OVERRIDE_ENV: str(override), "nnUNet_results": str(synthesis_results(work, regime,
                                                                                                     variant))})
    timings[f"train_{trainer}_s"] = timings.get(f"train_{trainer}_s", 0.0) + seconds
    return action


def segmentation_model(work: Path, regime: Regime, trainer: str) -> Path:
    """The model folder of a full-modality segmentation trainer in this work folder.

    The robustness benchmark's seed-0 run of the same regime (``bench_robustness.py``: same phantoms, same
    configuration, seed 0, at least the regime's budget) when it has finished, so that one model serves both
    benchmarks; else this benchmark's own, in ``<work>/nnUNet_results``.
    """
    from bench_robustness import plan_runs

    shared = plan_runs(work, regime, [trainer], seeds=1)[0]
    if (shared.fold / "checkpoint_final.pth").is_file():
        return shared.model
    return results_model_dir(work / "nnUNet_results", trainer, regime)


def train_segmentation(work: Path, regime: Regime, trainer: str, device: str, dry_run: bool, timings: dict) -> str:
    """A full-modality segmentation model at the regime's 3d budget (``bench_common.train_with_budget``), unless
    :func:`segmentation_model` finds one."""
    model = segmentation_model(work, regime, trainer)
    action = training_action(model / "fold_0")
    if dry_run or action == "reuse":
        return action if action != "reuse" else f"reuse {model}"
    start = time.perf_counter()
    train_with_budget(trainer, regime.epochs, regime.iterations, device, regime=regime, seed=0,
                      continue_training=action == "continue", save_every=regime.save_every)
    timings[f"train_{trainer}_s"] = timings.get(f"train_{trainer}_s", 0.0) + time.perf_counter() - start
    return action


def test_cases(work: Path, regime: Regime, count: int) -> list[str]:
    labels = sorted((work / "nnUNet_raw" / regime.dataset_name / "labelsTs").glob("*.nii.gz"))
    return [p.name[:-len(".nii.gz")] for p in labels][:count]


def run_evaluate_synthesis(work: Path, regime: Regime, cases: int, device: str, dry_run: bool,
                           variant: str | None = None, histogram_fallback: bool = False) -> str:
    """``evaluate-synthesis`` of the student (into ``evaluate_synthesis``), or with ``synthesize``'s histogram
    fallback on (into ``evaluate_synthesis_fallback``), unless current."""
    from nnunet_missingmod.evaluation.synthesis import evaluate_synthesis

    out = output_dir(work, regime, variant) / ("evaluate_synthesis_fallback" if histogram_fallback
                                               else "evaluate_synthesis")
    student = synthesis_model_dir(work, regime, STUDENT, variant)
    # the combination weights and the fallback pairs come from the validation file, which --val rewrites
    if all(evaluation_is_current_synthesis(out, student / "fold_0" / name, cases)
           for name in ("checkpoint_final.pth", "synthesis_validation.json")):
        return "reuse"
    if dry_run:
        return "run"
    raw = work / "nnUNet_raw" / regime.dataset_name
    # by default the model itself, as every earlier row (the goals are the student's)
    evaluate_synthesis(raw / "imagesTs", student, out, labels=raw / "labelsTs", num_cases=cases, device=device,
                       histogram_fallback=histogram_fallback)
    return "run"


def evaluation_is_current_synthesis(out: Path, checkpoint: Path, cases: int) -> bool:
    summary = out / "summary.json"
    return (summary.is_file() and checkpoint.is_file() and summary.stat().st_mtime > checkpoint.stat().st_mtime
            and json.loads(summary.read_text()).get("num_cases") == cases)


def downstream_dir(work: Path, regime: Regime, name: str, fill: str, variant: str | None = None,
                   segmentation_label: str | None = None) -> Path:
    """Where a downstream evaluation goes: zero-filled ones do not depend on the synthesis model, so a variant
    shares them with the default folder; synthesised ones are the variant's own. The evaluations of a
    ``--segmentation-model`` (``segmentation_label``) have its label appended."""
    suffix = f"_{segmentation_label}" if segmentation_label and DOWNSTREAM[name][0] == SEGMENTATION else ""
    return output_dir(work, regime, variant if fill == "synthesize" else None) / f"downstream_{name}{suffix}"


def given_segmentation_model(regime: Regime, label: str, folder: str) -> tuple[str, Path]:
    """``--segmentation-model LABEL MODEL_FOLDER``, checked: a finished fold-0 model of the regime's dataset and 3d
    configuration (``<trainer>__<plans>__<configuration>`` with ``plans.json`` and ``fold_0/checkpoint_final.pth``)."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", label):
        raise SystemExit(f"--segmentation-model label {label!r}: use letters, digits, '-' and '_' only")
    model = Path(folder).resolve()
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    if not checkpoint.is_file():
        raise SystemExit(f"--segmentation-model {label}: {checkpoint} does not exist (a finished nnU-Net model "
                         f"folder, fold 0)")
    plans_file = model / "plans.json"
    dataset = json.loads(plans_file.read_text()).get("dataset_name") if plans_file.is_file() else None
    if dataset != regime.dataset_name or not model.name.endswith(f"__{regime.configuration}"):
        raise SystemExit(f"--segmentation-model {label}: {model} is a model of {dataset} "
                         f"({model.name.rsplit('__', 1)[-1]}), not of {regime.dataset_name} ({regime.configuration}), "
                         f"the phantoms this benchmark scores")
    return label, model


#: The downstream evaluations: name -> (segmentation trainer, fill); ``synthesized_fallback`` with ``synthesize``'s
#: histogram fallback on (``--with-fallback``), ``synthesized`` the student alone.
DOWNSTREAM = {"zero": (SEGMENTATION, "zero"), "synthesized": (SEGMENTATION, "synthesize"), "dropout": (DROPOUT, "zero"),
              "synthesized_fallback": (SEGMENTATION, "synthesize")}


def run_downstream(work: Path, regime: Regime, name: str, combinations, cases: int, step_size: float, device: str,
                   dry_run: bool, variant: str | None = None, segmentation: tuple[str, Path] | None = None) -> str:
    """One evaluate-missing run of :data:`DOWNSTREAM` (``name``), unless current; ``segmentation``: a
    ``--segmentation-model`` (label, folder) in place of the regime's full-modality model."""
    from nnunet_missingmod.evaluation.missing_combinations import evaluate_missing

    trainer, fill = DOWNSTREAM[name]
    given = segmentation if trainer == SEGMENTATION else None
    out = downstream_dir(work, regime, name, fill, variant, given[0] if given else None)
    model = given[1] if given else segmentation_model(work, regime, trainer)
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    names = [mods.combination_name(c) for c in combinations]
    student_checkpoint = synthesis_model_dir(work, regime, STUDENT, variant) / "fold_0" / "checkpoint_final.pth"
    current = evaluation_is_current(out, checkpoint, cases, names)
    if current and fill == "synthesize":  # (the validation file: see run_evaluate_synthesis)
        current = all(evaluation_is_current(out, student_checkpoint.parent / name, cases, names)
                      for name in ("checkpoint_final.pth", "synthesis_validation.json"))
    if current:
        return "reuse"
    if dry_run:
        return "run"
    extra = {"fill": fill, "synthesis_model": synthesis_model_dir(work, regime, STUDENT, variant),
             "histogram_fallback": name == "synthesized_fallback"} if fill == "synthesize" else {}
    evaluate_missing(model, 0, split="test", combinations=combinations, output=out,
                     case_filter=set(test_cases(work, regime, cases)), tile_step_size=step_size, use_mirroring=False,
                     device=device, **extra)
    return "run"


def run_speed(work: Path, regime: Regime, cases: int, device: str, dry_run: bool, variant: str | None = None) -> str:
    """``synthesize`` on held-out cases with one sequence missing, and with only FLAIR: slices/s and s/case."""
    from nnunet_missingmod.inference.synthesize import load_synthesis_model, synthesize

    out = output_dir(work, regime, variant) / "speed"
    result_file = out / "speed.json"
    student = synthesis_model_dir(work, regime, STUDENT, variant) / "fold_0" / "checkpoint_final.pth"
    if result_file.is_file() and student.is_file() and result_file.stat().st_mtime > student.stat().st_mtime \
            and json.loads(result_file.read_text()).get("cases") == cases:
        return "reuse"
    if dry_run:
        return "run"
    shutil.rmtree(out, ignore_errors=True)  # the benchmark's own folder
    raw = work / "nnUNet_raw" / regime.dataset_name / "imagesTs"
    names = test_cases(work, regime, cases)
    scenarios = {"one_missing": {case: [c for c in range(mods.NUM_MODALITIES) if c != k % mods.NUM_MODALITIES]
                                 for k, case in enumerate(names)},
                 "flair_only": {case: [mods.modality_index("flair")] for case in names}}
    start = time.perf_counter()
    model = load_synthesis_model(student.parent.parent, device=device, histogram_fallback=False)
    results = {"cases": cases, "device": device, "load_s": time.perf_counter() - start}
    for scenario, kept in scenarios.items():
        folder = out / f"input_{scenario}"
        folder.mkdir(parents=True)
        for case, channels in kept.items():
            for channel in channels:
                shutil.copyfile(raw / f"{case}_{channel:04d}.nii.gz", folder / f"{case}_{channel:04d}.nii.gz")
        start = time.perf_counter()
        stats = synthesize(folder, out / f"output_{scenario}", model, device=device)
        wall = time.perf_counter() - start
        results[scenario] = {"channels": stats["synthesized_channels"], "slices": stats["slices"],
                             "translation_s": stats["seconds"], "wall_s": wall,
                             "slices_per_s": stats["slices"] / stats["seconds"] if stats["seconds"] else None,
                             "s_per_case": wall / len(kept)}
    result_file.write_text(json.dumps(results, indent=2))
    return "run"


# ---------------------------------------------------------------------------------------------- report


def learning_log(model: Path) -> dict | None:
    """nnU-Net's per-epoch log of a trainer (final checkpoint, else the latest)."""
    import torch

    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        if (model / "fold_0" / name).is_file():
            return torch.load(model / "fold_0" / name, map_location="cpu", weights_only=False)["logging"]
    return None


def plot_learning_curves(logs: dict[str, dict], png: Path) -> None:
    """Validation SSIM (nnU-Net's pseudo-Dice slot) and every logged loss term per epoch, one column per trainer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):  # nnU-Net's progress plots leave seaborn's large fonts behind
        _learning_curves(plt, logs, png)


def _learning_curves(plt, logs: dict[str, dict], png: Path) -> None:
    fig, axes = plt.subplots(2, len(logs), figsize=(5 * len(logs), 6.5), squeeze=False)
    for column, (trainer, log) in enumerate(logs.items()):
        axes[0][column].plot(log["mean_fg_dice"], marker=".", label="validation SSIM")
        axes[0][column].plot(log["ema_fg_dice"], marker=".", label="EMA")
        axes[0][column].set_title(f"{trainer}: validation SSIM", fontsize=9)
        axes[0][column].legend(fontsize=7)
        for key in sorted(k for k in log if k.startswith("loss_")):
            values = [float(v) for v in log[key]]
            if values:
                axes[1][column].plot(values, marker=".", label=key[5:])
        axes[1][column].set_title("loss terms", fontsize=9)
        axes[1][column].set_xlabel("epoch")
        axes[1][column].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_downstream(summaries: dict[str, dict], png: Path) -> None:
    """Dice per combination and region for each fill (bars side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):
        _downstream(plt, summaries, png)


def _downstream(plt, summaries: dict[str, dict], png: Path) -> None:
    names = list(next(iter(summaries.values()))["per_combination"])
    regions = list(mods.REGIONS)
    fig, axes = plt.subplots(1, len(regions), figsize=(4.5 * len(regions), 3.8), squeeze=False)
    width = 0.8 / len(summaries)
    for ax, region in zip(axes[0], regions, strict=True):
        for k, (label, summary) in enumerate(summaries.items()):
            values = [summary["per_combination"].get(n, {}).get(f"{region}_Dice", np.nan) for n in names]
            ax.bar(np.arange(len(names)) + (k - (len(summaries) - 1) / 2) * width, values, width, label=label)
        ax.set_xticks(range(len(names)), [n.replace("+", "\n+") for n in names], fontsize=6)
        ax.set_ylim(0, 1)
        ax.set_title(f"{region} Dice", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def ratio_table(zero: dict, synthesized: dict) -> tuple[list[str], list[dict]]:
    """Dice of each combination with zero-fill and with synthesis, and the ratio of synthesis to all four real."""
    full = mods.combination_name(FULL)
    reference = synthesized["per_combination"].get(full) or zero["per_combination"].get(full)
    lines, records = [], []
    for name in synthesized["per_combination"]:
        if name == full:
            continue
        record = {"combination": name}
        cells = []
        for region in mods.REGIONS:
            z = zero["per_combination"].get(name, {}).get(f"{region}_Dice")
            s = synthesized["per_combination"][name][f"{region}_Dice"]
            r = reference[f"{region}_Dice"] if reference else None
            ratio = s / r if r else None
            record[region] = {"zero": z, "synthesized": s, "all_real": r, "ratio": ratio}
            cells.append(f"{100 * z:.1f} / {100 * s:.1f} / {'–' if ratio is None else f'{ratio:.3f}'}"
                         if z is not None else f"– / {100 * s:.1f} / –")
        records.append(record)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines, records


#: The matrices of the trainers' ``synthesis_validation.json`` that the report compares, and how each is measured.
VALIDATION_MATRICES = {"ssim": "whole slices, z-score space", "ssim_brain": "over the brain"}


def validation_matrices(work: Path, regime: Regime, variant: str | None = None,
                        key: str = "ssim") -> dict[str, np.ndarray | None]:
    """Teacher's and student's validation matrix ``key`` ([source][target]); None where a file or the key is
    missing (``ssim_brain`` exists only in files written since it was added)."""
    result = {}
    for trainer in (TEACHER, STUDENT):
        file = synthesis_model_dir(work, regime, trainer, variant) / "fold_0" / "synthesis_validation.json"
        matrix = json.loads(file.read_text()).get(key) if file.is_file() else None
        result[trainer] = (None if matrix is None else
                           np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float))
    return result


def teacher_student_table(teacher: np.ndarray, student: np.ndarray, what: str) -> list[str]:
    """Markdown section: the trainers' final validation SSIM per pair, and the goal (student within 0.01)."""
    difference = student - teacher
    lines = [f"## Teacher vs student (trainers' final validation SSIM, {what})", "",
             "| source → target | teacher | student | student − teacher |", "|---|---|---|---|"]
    for s in range(mods.NUM_MODALITIES):
        for t in range(mods.NUM_MODALITIES):
            if s != t and np.isfinite(difference[s, t]):
                lines.append(f"| {mods.MODALITIES[s]} → {mods.MODALITIES[t]} | {teacher[s, t]:.4f} | "
                             f"{student[s, t]:.4f} | {difference[s, t]:+.4f} |")
    worst = float(np.nanmin(difference))
    return lines + ["", f"Goal (student within 0.01 SSIM of its teacher on every pair): "
                        f"{'met' if worst >= -0.01 else 'not met'} (largest shortfall {abs(min(worst, 0.0)):.4f}).", ""]


def fallback_section(out: Path, downstream: dict, report: dict) -> list[str]:
    """Report section of ``--with-fallback``: brain SSIM per pair and downstream Dice, the student alone against
    ``synthesize --histogram-fallback`` (empty when those evaluations do not exist)."""
    files = {"student": out / "evaluate_synthesis" / "summary.json",
             "fallback": out / "evaluate_synthesis_fallback" / "summary.json"}
    if not all(f.is_file() for f in files.values()):
        return []
    student, fallback = (json.loads(f.read_text())["per_pair"] for f in files.values())
    lines = ["## With `synthesize`'s histogram fallback (`--with-fallback`)", "",
             "Pairs taken over by histogram matching (the student's validation file): "
             f"{', '.join(json.loads(files['fallback'].read_text())['histogram_fallback']) or 'none'}.", "",
             "Brain SSIM per pair (held-out phantoms): student alone / with the fallback / the histogram-matching "
             "baseline / zero-fill", "", "| pair | student | with fallback | histogram matching | zero-fill |",
             "|---|---|---|---|---|"]
    records, wins = {}, {"student": 0, "fallback": 0}
    for pair, methods in fallback.items():
        values = {"student": student.get(pair, {}).get("synthesis", {}).get("ssim_brain"),
                  "fallback": methods["synthesis"]["ssim_brain"],
                  "histogram": methods["histogram_matching"]["ssim_brain"], "zero": methods["zero_fill"]["ssim_brain"]}
        records[pair] = values
        if not pair.startswith("all->") and None not in values.values():
            for who in wins:
                wins[who] += values[who] > max(values["histogram"], values["zero"])
        lines.append(f"| {pair} | " + " | ".join("–" if v is None else f"{v:.4f}" for v in values.values()) + " |")
    single = [v for p, v in records.items() if not p.startswith("all->") and None not in v.values()]
    means = {k: float(np.mean([v[k] for v in single])) for k in ("student", "fallback", "histogram", "zero")} \
        if single else {}
    report["fallback"] = {"per_pair": records, "single_pair_means": means, "pairs_above_both_baselines": wins}
    if means:
        lines += ["", f"Average of the {len(single)} single-source pairs: student {means['student']:.4f}, with the "
                      f"fallback {means['fallback']:.4f} (histogram matching {means['histogram']:.4f}, zero-fill "
                      f"{means['zero']:.4f}); pairs above both baselines: student {wins['student']}, with the "
                      f"fallback {wins['fallback']} (a pair taken over equals histogram matching to the training "
                      f"histogram, not to the other evaluated cases', so it can land on either side of the baseline)."]
    if "synthesized_fallback" in downstream and "synthesized" in downstream:
        full = mods.combination_name(FULL)
        lines += ["", "Downstream Dice (%), combinations lacking one sequence, WT / TC / ET: zero-fill / student / "
                      "with the fallback", "", "| combination | zero-fill | student | with fallback |",
                  "|---|---|---|---|"]
        rows = {}
        for name in downstream["synthesized_fallback"]["per_combination"]:
            if name == full:
                continue
            cells = {k: [downstream[k]["per_combination"].get(name, {}).get(f"{r}_Dice") for r in mods.REGIONS]
                     for k in ("zero", "synthesized", "synthesized_fallback") if k in downstream}
            rows[name] = cells
            lines.append(f"| {name} | " + " | ".join(
                " / ".join("–" if v is None else f"{100 * v:.1f}" for v in cells.get(k, [None] * 3))
                for k in ("zero", "synthesized", "synthesized_fallback")) + " |")
        report["fallback"]["downstream"] = rows
    return lines + [""]


def trained_budget(model: Path) -> tuple[int, int] | None:
    """``(epochs, iterations per epoch)`` a model was trained with, from the ``debug.json`` nnU-Net writes in its
    fold folder; None without one (not trained yet)."""
    debug = model / "fold_0" / "debug.json"
    if not debug.is_file():
        return None
    try:
        values = json.loads(debug.read_text())
        return int(values["num_epochs"]), int(values["num_iterations_per_epoch"])
    except (ValueError, KeyError, TypeError):
        return None


def write_report(work: Path, regime: Regime, args: argparse.Namespace, steps: dict, timings: dict,
                 variant: str | None = None, settings: dict | None = None,
                 segmentation: tuple[str, Path] | None = None) -> Path:
    from nnunet_missingmod.inference.synthesize import fallback_pairs, read_histogram_quantiles

    out = output_dir(work, regime, variant)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    suffix = f"_{segmentation[0]}" if segmentation else ""  # another downstream model: its own report beside
    # a finished model is reused whatever the budget asked now: the header says what the models had
    asked = {TEACHER: (args.teacher_epochs, args.iterations), STUDENT: (args.epochs, args.iterations)}
    had = {t: trained_budget(synthesis_model_dir(work, regime, t, variant)) or asked[t] for t in asked}
    (teacher_epochs, teacher_iterations), (epochs, iterations) = had[TEACHER], had[STUDENT]
    report: dict = {"regime": regime.name, "budget": {"epochs": epochs, "teacher_epochs": teacher_epochs,
                                                      "iterations": iterations}
                    | ({} if teacher_iterations == iterations else {"teacher_iterations": teacher_iterations}),
                    "variant": None if variant is None else {"label": variant, "settings": settings},
                    "steps": steps, "timings": timings}
    title = "" if variant is None else f", variant {variant}"
    lines = [f"# UTAD-Net synthesis benchmark ({regime.name} regime, {regime.spacing} mm phantoms{title})", "",
             (f"Teacher and student: {epochs} epochs x {iterations} iterations each"
              if had[TEACHER] == had[STUDENT] else
              f"Teacher {teacher_epochs}, student {epochs} epochs x {iterations} iterations"
              if teacher_iterations == iterations else
              f"Teacher {teacher_epochs} epochs x {teacher_iterations} iterations, student {epochs} epochs x "
              f"{iterations} iterations")
             + f" on `{CONFIGURATION_2D}`; segmentation: "
             + (f"`{segmentation[0]}` (`{segmentation[1]}`, given with --segmentation-model)." if segmentation
                else f"{SEGMENTATION} at {regime.epochs} x {regime.iterations} on `{regime.configuration}`."), ""]
    if segmentation:
        report["segmentation_model"] = {"label": segmentation[0], "folder": str(segmentation[1])}
    if had != asked:
        lines += [f"(Finished models reused: this run asked for teacher {asked[TEACHER][0]}, student "
                  f"{asked[STUDENT][0]} epochs x {args.iterations} iterations.)", ""]
    if variant is not None:
        lines += [f"Settings of both trainers (`nnUNet_missingmod_config` on top of the shipped ones): "
                  f"`{json.dumps(settings)}`.", ""]
    logs = {t: learning_log(synthesis_model_dir(work, regime, t, variant)) for t in (TEACHER, STUDENT)}
    logs = {t: log for t, log in logs.items() if log}
    if logs:
        plot_learning_curves(logs, figures / "learning_curves.png")
        lines += ["## Training", "", "| trainer | epochs | final validation SSIM (EMA) | plateaued (last quarter "
                  "gains < 0.01) |", "|---|---|---|---|"]
        for trainer, log in logs.items():
            check = plateau_check([float(v) for v in log["ema_fg_dice"]])
            report.setdefault("training", {})[trainer] = check
            plateau = {True: "yes", False: "no", None: "too few epochs"}[check["plateaued"]]
            lines.append(f"| {trainer} | {check['epochs']} | {float(log['ema_fg_dice'][-1]):.4f} | {plateau} |")
        lines += ["", "![learning curves](figures/learning_curves.png)", ""]
    for key, what in VALIDATION_MATRICES.items():
        matrices = validation_matrices(work, regime, variant, key)
        if all(m is not None for m in matrices.values()):
            report[f"validation_{key}"] = {t: m.tolist() for t, m in matrices.items()}
            lines += teacher_student_table(matrices[TEACHER], matrices[STUDENT], what)
    histogram = validation_matrices(work, regime, variant, "histogram_ssim_brain")[STUDENT]
    model = validation_matrices(work, regime, variant, "ssim_brain")[STUDENT]
    file = synthesis_model_dir(work, regime, STUDENT, variant) / "fold_0" / "synthesis_validation.json"
    quantiles = read_histogram_quantiles(file) if file.is_file() else None
    if histogram is not None and model is not None and quantiles is not None:
        pairs = [f"{mods.MODALITIES[s]} → {mods.MODALITIES[t]}"
                 for s, t in sorted(fallback_pairs(model, histogram, quantiles))]  # synthesize's own rule
        report["histogram_fallback_pairs"] = pairs
        lines += [f"Histogram fallback: the image-quality, downstream and speed sections below score the student "
                  f"itself (`histogram_fallback` off); `synthesize --histogram-fallback` would use histogram "
                  f"matching on the pairs where it validated better than the student: "
                  f"{', '.join(pairs) if pairs else 'none'}.", ""]
    evaluation = out / "evaluate_synthesis"
    if (evaluation / "summary.json").is_file():
        summary = json.loads((evaluation / "summary.json").read_text())
        report["evaluate_synthesis"] = summary
        failing = [pair for pair, methods in summary["per_pair"].items() if not pair.startswith("all->")
                   and methods["synthesis"]["ssim_brain"] is not None
                   and any(methods[b]["ssim_brain"] is not None and methods[b]["ssim_brain"] >=
                           methods["synthesis"]["ssim_brain"] for b in ("histogram_matching", "zero_fill"))]
        if (evaluation / "examples.png").is_file():
            shutil.copyfile(evaluation / "examples.png", figures / "synthesis_examples.png")
        lines += ["## Image quality (`evaluate-synthesis`, held-out phantoms)", "",
                  (evaluation / "table.md").read_text().split("\n\n", 2)[-1], "",
                  f"Goal (better SSIM over the brain than both baselines on every pair): "
                  f"{'met' if not failing else 'not met on ' + ', '.join(failing)}.", "",
                  "![examples](figures/synthesis_examples.png)", ""]
    downstream = {name: downstream_dir(work, regime, name, fill, variant, segmentation and segmentation[0])
                  / "summary.json"
                  for name, (_, fill) in DOWNSTREAM.items()}
    summaries = {name: json.loads(file.read_text()) for name, file in downstream.items() if file.is_file()}
    if not getattr(args, "downstream", True):
        lines += ["## Downstream segmentation", "", "Not run (`--no-downstream`): image quality only.", ""]
    elif "zero" in summaries and "synthesized" in summaries:
        table, records = ratio_table(summaries["zero"], summaries["synthesized"])
        report["downstream"] = records
        labels = {"zero": "zero-fill", "synthesized": "synthesised", "dropout": DROPOUT,
                  "synthesized_fallback": "synthesised, histogram fallback"}
        plot_downstream({labels[k]: v for k, v in summaries.items()}, figures / f"downstream{suffix}.png")
        below = [f"{r['combination']} {region}" for r in records for region in mods.REGIONS
                 if r[region]["ratio"] is not None and r[region]["ratio"] < 0.95]
        segmenter = f"`{segmentation[0]}`" if segmentation else "plain nnUNetTrainer"
        lines += [f"## Downstream segmentation ({segmenter} trained on all four sequences)", "",
                  "Dice (%) zero-fill / synthesised / ratio synthesised ÷ all four real", "",
                  "| combination | " + " | ".join(mods.REGIONS) + " |", "|---|" + "---|" * len(mods.REGIONS),
                  *table, "", f"Goal (synthesised ≥ 0.95 × all real on WT, TC and ET, one sequence missing): "
                              f"{'met' if not below else 'not met for ' + ', '.join(below)}.", "",
                  f"![downstream](figures/downstream{suffix}.png)", ""]
        if "dropout" in summaries:
            average = summaries["dropout"]["average"]
            lines += [f"{DROPOUT} (zero-fill) average over these combinations: " + ", ".join(
                f"{r} {100 * average[f'{r}_Dice']:.1f}" for r in mods.REGIONS), ""]
    lines += fallback_section(out, summaries, report)
    speed_file = out / "speed" / "speed.json"
    if speed_file.is_file():
        speed = json.loads(speed_file.read_text())
        report["speed"] = speed
        lines += ["## Speed of `synthesize`", "", f"{speed['cases']} case(s), device {speed['device']}, model "
                  f"loading {speed['load_s']:.1f} s (once).", "",
                  "| scenario | channels written | slice translations | slices/s | s/case |", "|---|---|---|---|---|"]
        for scenario in ("one_missing", "flair_only"):
            values = speed[scenario]
            lines.append(f"| {scenario.replace('_', ' ')} | {values['channels']} | {values['slices']} | "
                         f"{values['slices_per_s']:.1f} | {values['s_per_case']:.2f} |")
        lines += ["", "A slice translation is one forward pass of one slice from one acquired sequence to one missing "
                  "one; slices/s counts them over the translation loop, s/case is the wall time per case (reading, "
                  "preprocessing, translating, resampling back and writing).", ""]
    (out / f"report{suffix}.json").write_text(json.dumps(report, indent=2, default=str))
    (out / f"report{suffix}.md").write_text("\n".join(lines))
    return out / f"report{suffix}.md"


# ---------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="bench_work")
    parser.add_argument("--regime", choices=(*REGIMES, "smoke"), default="short")
    parser.add_argument("--epochs", type=int, default=None,
                        help="student epochs, and the teacher's unless --teacher-epochs (default 40; smoke 1)")
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help="the teacher's epochs when they differ from --epochs (a teacher that has not reached "
                             "its plateau; the student starts from it)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="generator updates per epoch (default 50; smoke 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="2d_cpu batch size (at least 2)")
    parser.add_argument("--eval-cases", type=int, default=None, help="held-out phantoms scored (default 10; smoke 2)")
    parser.add_argument("--combinations", choices=("one-missing", "all"), default="one-missing")
    parser.add_argument("--speed-cases", type=int, default=None, help="cases timed (default 5; smoke 2)")
    parser.add_argument("--dropout", action="store_true", help="also ModalityDropoutTrainer (zero-fill)")
    parser.add_argument("--no-downstream", dest="downstream", action="store_false",
                        help="skip the downstream segmentation (step 4): no segmentation model is trained")
    parser.add_argument("--step-size", type=float, default=1.0, help="sliding-window step of evaluate-missing")
    parser.add_argument("-device", default="cpu")
    parser.add_argument("--variant", nargs=2, metavar=("LABEL", "SETTINGS.json"), default=None,
                        help="train teacher and student with these settings (an nnUNet_missingmod_config override, "
                             "e.g. {\"utad\": {\"lambda_cls\": 10}}) into <work-dir>/synthesis_<regime>_<LABEL>, "
                             "beside the default models")
    parser.add_argument("--with-fallback", action="store_true",
                        help="also evaluate-synthesis and the downstream evaluation with synthesize's histogram "
                             "fallback on (an option of synthesize, off by default), beside the student's own "
                             "figures")
    parser.add_argument("--segmentation-model", nargs=2, metavar=("LABEL", "MODEL_FOLDER"), default=None,
                        help="score this finished full-modality 3d model of the same phantoms downstream instead of "
                             "the regime's nnUNetTrainer (evaluations into downstream_<name>_<LABEL>)")
    parser.add_argument("--dry-run", action="store_true", help="print what each step would do, run nothing")
    args = parser.parse_args(argv)
    regime = SMOKE if args.regime == "smoke" else REGIMES[args.regime]
    smoke = regime is SMOKE
    args.epochs = (1 if smoke else 40) if args.epochs is None else args.epochs
    args.teacher_epochs = args.epochs if args.teacher_epochs is None else args.teacher_epochs
    if min(args.epochs, args.teacher_epochs) < 1:
        parser.error(f"--epochs and --teacher-epochs must be at least 1, got {args.epochs} and {args.teacher_epochs}")
    args.iterations = args.iterations or (2 if smoke else 50)
    cases = args.eval_cases or (2 if smoke else 10)
    speed_cases = args.speed_cases or (2 if smoke else 5)
    if args.dropout and not args.downstream:
        parser.error("--dropout is a downstream comparison: it cannot go with --no-downstream")
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2 (UTAD-Net pairs every sample with another of the batch)")
    if args.segmentation_model and not args.downstream:
        parser.error("--segmentation-model is a downstream model: it cannot go with --no-downstream")
    segmentation = given_segmentation_model(regime, *args.segmentation_model) if args.segmentation_model else None
    work = Path(args.work_dir).resolve()
    variant, settings = (args.variant[0], read_variant(*args.variant)) if args.variant else (None, None)
    if variant is not None:
        recorded = output_dir(work, regime, variant) / "variant.json"
        if recorded.is_file() and json.loads(recorded.read_text()) != settings:
            raise SystemExit(f"variant {variant} was started with the settings of {recorded}; they differ from "
                             f"{args.variant[1]}: use the same file or another label")
        if not args.dry_run:
            recorded.parent.mkdir(parents=True, exist_ok=True)
            recorded.write_text(json.dumps(settings, indent=2))
    if args.dry_run and not (work / "nnUNet_preprocessed" / regime.dataset_name / "nnUNetPlans.json").is_file():
        print(f"would generate the {regime.name} phantoms, plan and preprocess in {work}, then run every step")
        return
    # a dry run only reads: no phantoms, plans or configurations are (re)written
    env = nnunet_environment(work) if args.dry_run else prepare(work, regime=regime)
    timings_file = output_dir(work, regime, variant) / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    combinations = one_missing() if args.combinations == "one-missing" else mods.all_combinations()
    steps = {"2d configuration": prepare_2d(work, regime, env, args.batch_size, args.dry_run)}
    for trainer in (TEACHER, STUDENT):
        epochs = args.teacher_epochs if trainer == TEACHER else args.epochs
        steps[trainer] = train_synthesis(work, regime, env, trainer, epochs, args.iterations, args.device,
                                         args.dry_run, timings, variant, settings)
    if args.downstream:
        steps[SEGMENTATION] = (f"given: {segmentation[1]}" if segmentation else
                               train_segmentation(work, regime, SEGMENTATION, args.device, args.dry_run, timings))
    if args.dropout:
        steps[DROPOUT] = train_segmentation(work, regime, DROPOUT, args.device, args.dry_run, timings)
    steps["evaluate-synthesis"] = run_evaluate_synthesis(work, regime, cases, args.device, args.dry_run, variant)
    if not args.downstream:
        steps["downstream"] = "skipped (--no-downstream)"
    for name, step in (("zero", "zero-fill"), ("synthesized", "synthesised"), ("dropout", "dropout")):
        if args.downstream and (name != "dropout" or args.dropout):
            steps[f"downstream {step}"] = run_downstream(work, regime, name, combinations, cases, args.step_size,
                                                         args.device, args.dry_run, variant, segmentation)
    if args.with_fallback:
        steps["evaluate-synthesis, histogram fallback"] = run_evaluate_synthesis(
            work, regime, cases, args.device, args.dry_run, variant, histogram_fallback=True)
        if args.downstream:
            steps["downstream synthesised, histogram fallback"] = run_downstream(
                work, regime, "synthesized_fallback", combinations, cases, args.step_size, args.device, args.dry_run,
                variant, segmentation)
    steps["speed"] = run_speed(work, regime, speed_cases, args.device, args.dry_run, variant)
    for step, action in steps.items():
        print(f"{step}: {action}")
    if args.dry_run:
        return
    timings_file.write_text(json.dumps(timings, indent=2))
    print(f"report: {write_report(work, regime, args, steps, timings, variant, settings, segmentation)}")


if __name__ == "__main__":
    main()
