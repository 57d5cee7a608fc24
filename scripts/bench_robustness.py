"""Train several trainers with the same budget on the phantoms, evaluate all 15 modality combinations, compare.

    python scripts/bench_robustness.py [--work-dir bench_work] [--regime {short,converged}]
        [--trainers nnUNetTrainer ModalityDropoutTrainer SharedLatentTrainer D2NetTrainer] [--seeds 1]
        [--dedicated] [--dedicated-seeds 1] [--epochs E] [--iterations I] [--epochs-for GROUP=EPOCHS ...]
        [--variant LABEL TRAINER SETTINGS.json ...] [--eval-cases 10] [--step-size 1.0] [--device cpu]
        [--retrain [GROUP ...]] [--archive DIR] [--first RUN ...] [--postprocessing] [--dry-run] [--report-only]

Regimes (defaults written in ``bench_common.REGIMES``; ``--epochs`` / ``--iterations`` override them):

* ``short`` (default): 2 mm phantoms (dataset 990), patch 48³, features 16-128, batch 2, 20 epochs x 25
  iterations: the equal-budget comparison of docs/RESULTS.md. Output in ``<work-dir>/robustness``.
* ``converged``: 3 mm phantoms (dataset 991), patch 32³, features 16-128, batch 2, 120 epochs x 40
  iterations: about 20 minutes for plain nnUNetTrainer on 2 CPU cores, not its plateau (three seeds gained +1.9
  to +4.6 points in their last quarter, and 480 epochs still changed its held-out Dice): read the plateau column
  and the report's "What a longer budget changed". Output in ``<work-dir>/robustness_converged``.

Every trainer (plain nnUNetTrainer included) trains fold 0 of the regime's configuration for exactly
``epochs x iterations`` iterations (set on the trainer object), in its own process, seeded with its seed
(``--seeds N``: seeds 0..N-1, each in its own model folder ``models/<trainer>__seed<k>/nnUNet_results``;
the short regime's seed 0 keeps the original folders ``<work-dir>/nnUNet_results`` and
``robustness/<trainer>``). ``--dedicated`` adds the upper limit: 15 plain nnU-Net models, one per modality
combination, each trained with the ``fixed`` dropout scheme (``ModalityDropoutTrainer``, whose network and
loss are nnUNetTrainer's, with ``{"modality_dropout": {"scheme": "fixed", "keep": [...], "p_keep_all": 0}}`` in the
``nnUNet_missingmod_config`` override file) and evaluated on its own combination only. ``--epochs-for``
gives one group (a trainer name, a variant label, or ``dedicated``) another number of epochs, e.g. one that has not
plateaued; a run's name, with or without its seed (``dedicated_t1ce=960``), gives one model its own.
``--first RUN ...`` trains the named runs (e.g. ``dedicated_t1+t2+flair__seed0``; ``--dry-run`` lists the names)
before the others, in the order given; the rest keep theirs.

Variants: ``--variant LABEL TRAINER SETTINGS.json`` (repeatable) adds a group ``LABEL`` that trains ``TRAINER``
with the settings of ``SETTINGS.json`` as its ``nnUNet_missingmod_config`` override file (e.g.
``--variant MD_keepAll25 ModalityDropoutTrainer keep_all.json`` with ``{"modality_dropout": {"p_keep_all":
0.25}}``, or D²-Net with other loss weights), with ``--seeds`` runs like the trainers. A copy of the settings is
kept with each run; resuming with other settings than that copy is refused.

Two-phase trainers (``PRETRAINERS``): ``--trainers CMFFTrainer CMFFTrainer_random`` compares CMFF with and
without the cross-modality transition pretraining. Before each ``CMFFTrainer`` run, ``CMFTPretrainer`` is
trained (or continued, or reused) with the same seed into the run's own ``nnUNet_results``, where CMFFTrainer's
``cmff.pretrained_checkpoint: "auto"`` finds it; ``--epochs-for CMFTPretrainer=E`` sets its epochs, and its time
is reported apart ("+N first phase"). ``--retrain CMFTPretrainer`` deletes the first phases too.

Resumable: a finished model (``checkpoint_final.pth``) is reused, an interrupted one continues from its
``checkpoint_latest.pth`` (written every few epochs) as ``nnUNetv2_train --c`` does, and an evaluation newer
than its model on the same cases and combinations is reused; so the tables can be built over several
sittings. ``--retrain`` (all groups, or the named groups or runs) deletes models (and their archived records) first;
``--dry-run`` prints what would be done (with ``--archive``, an estimate of each training's minutes and of
the hours left: at this machine's speed where nnU-Net's checkpoints in the work folder time the trainer,
else at the speed of the archived runs of the same trainer; an interrupted run counts the epochs its checkpoint
has left); ``--report-only`` writes the report of
what is finished or archived, training nothing. Each training's output (nnU-Net's per-epoch lines) goes to
``models/<run>/train_<trainer>.log``.

Across machines: model folders stay on the machine that trained them, so ``--archive DIR`` keeps each finished,
evaluated run as small text in ``DIR/<run>/`` (``run.json``: settings, budget, cases, learning curve, timings;
and the evaluation's ``summary.json``, ``per_case.csv``, ``table.md``), meant to be committed. A later sitting on
another machine with the same ``--archive`` takes those runs from it instead of training them again, and the
report counts them with the runs trained there. A run archived with other settings (epochs, iterations, seed,
override, the trainer's resolved configuration, so also a shipped default changed since, held-out cases, step
size) is refused rather than mixed in; ``--retrain GROUP`` deletes its record.
The converged regime's runs are archived in ``docs/converged/runs``.

Each model is scored by ``evaluate-missing`` on the first ``eval-cases`` held-out phantoms without mirroring
TTA. Outputs in the regime's folder:

* ``comparison.md`` / ``.png``: ``compare`` of the trainers (mean ± sd over seeds, error bars);
* ``report.md`` / ``report.json``: the runs (epochs, final EMA pseudo-Dice, plateau check, wall-clock),
  15-combination averages with sd and 95% intervals over seeds, Dice by number of available modalities,
  each trainer's Dice ÷ the dedicated models' (and ÷ the best of them on the combination or a subset of its
  sequences, a stricter limit where a model is below a subset's) and its full-input Dice ÷ plain nnU-Net's (the
  plain group trained for as many epochs, e.g. a ``defaults.json`` variant, where there is one), what a longer budget
  changed (groups of one trainer and configuration at different epochs), and, for a region that some held-out
  case lacks (the phantoms' non-enhancing tumours have no ET), the Dice over the cases with it apart from the
  share of the cases without it that were left empty;
* ``learning_curves.png``: nnU-Net's EMA pseudo-Dice per epoch of every run;
* ``timings.json``: training (summed over sittings) and evaluation seconds per run.

``--postprocessing`` adds nnU-Net's BraTS post-processing, chosen for each run on its own validation cases:
evaluate-missing on fold 0's validation cases with saved predictions (``eval/<run>_val``),
``determine-postprocessing`` there, and the held-out evaluation again with the chosen ``postprocessing.pkl``
(``eval/<run>_postprocessed``), each step reused while newer than what it is made from (``--dry-run`` says for each
run whether it is current, archived or to do; a run taken from the archive cannot get one, its model being
elsewhere). The same report of the post-processed evaluations, with each run's threshold, goes to
``postprocessed/report.md`` / ``.json`` (and ``comparison.md``); the archive keeps them in ``<run>/postprocessed/``
with the choice (``postprocessing.json``). The tables above stay as predicted, so that every trainer is compared on
its raw output.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import REGIMES, Regime, prepare, results_model_dir, run_worker, train_with_budget  # noqa: E402

from nnunet_missingmod import modalities as mods  # noqa: E402
from nnunet_missingmod.config import OVERRIDE_ENV  # noqa: E402
from nnunet_missingmod.evaluation.missing_combinations import aggregate_summaries, read_per_case, run_statistics  # noqa: E402

BASELINE = "nnUNetTrainer"
DEDICATED = "dedicated"
#: The trainer that trains the dedicated models: nnUNetTrainer's network and loss plus the ``fixed`` scheme.
DEDICATED_TRAINER = "ModalityDropoutTrainer"
#: Plateau criterion: the last quarter of training improves the EMA pseudo-Dice by less than this.
PLATEAU_GAIN = 0.01
DEFAULT_TRAINERS = ["nnUNetTrainer", "ModalityDropoutTrainer", "SharedLatentTrainer", "D2NetTrainer"]
#: Two-phase trainers: they start from the final checkpoint of another trainer in the same ``nnUNet_results``
#: folder (CMFFTrainer's ``cmff.pretrained_checkpoint: "auto"``). The first phase trains just before, with the
#: run's seed, and is reused like any model; it is not evaluated. ``CMFFTrainer_random`` has no first phase.
PRETRAINERS = {"CMFFTrainer": "CMFTPretrainer", "CMFFTrainer_noMaskGuidance": "CMFTPretrainer",
               "CMFFTrainer_channelAttention": "CMFTPretrainer"}
REGIONS = list(mods.REGIONS)
FULL_INPUT = mods.combination_name(tuple(range(mods.NUM_MODALITIES)))


@dataclass(frozen=True)
class Run:
    """One training run of the benchmark: where its model and evaluation live.

    Attributes:
        name: unique name (``<trainer>__seed<k>``, ``dedicated_<combination>__seed<k>``, or the trainer name
            for the short regime's original seed-0 folders).
        group: row of the tables: the trainer name, or ``dedicated``.
        trainer: nnU-Net trainer class name.
        seed: torch/numpy seed of the training process.
        results: the ``nnUNet_results`` folder the model is trained into.
        model: nnU-Net's model folder (``results/<dataset>/<trainer>__nnUNetPlans__<configuration>``).
        evaluation: the evaluate-missing output folder.
        combination: channel indices a dedicated model keeps (None: every combination).
        pretrainer: the trainer of the first phase (:data:`PRETRAINERS`), trained into ``results`` first.
        settings: a variant's ``nnUNet_missingmod_config`` override (None: the trainer's own configuration).
    """

    name: str
    group: str
    trainer: str
    seed: int
    results: Path
    model: Path
    evaluation: Path
    combination: tuple[int, ...] | None = None
    pretrainer: str | None = None
    settings: Mapping | None = None

    @property
    def fold(self) -> Path:
        return self.model / "fold_0"

    @property
    def validation(self) -> Path:
        """``--postprocessing``: the evaluation of fold 0's validation cases, with saved predictions, where the
        post-processing is chosen (``postprocessing.pkl``, ``.json``, ``.png``)."""
        return self.evaluation.with_name(self.evaluation.name + "_val")

    @property
    def postprocessed(self) -> Path:
        """``--postprocessing``: the held-out evaluation again, post-processed with the run's own choice."""
        return self.evaluation.with_name(self.evaluation.name + "_postprocessed")

    def pretraining_fold(self, regime: Regime) -> Path | None:
        """The first phase's fold folder (None for a one-phase run)."""
        return None if self.pretrainer is None else results_model_dir(self.results, self.pretrainer, regime) / "fold_0"


def output_dir(work: Path, regime: Regime) -> Path:
    return work / ("robustness" if regime.name == "short" else f"robustness_{regime.name}")


def plan_runs(work: Path, regime: Regime, trainers: Sequence[str], seeds: int, dedicated_seeds: int = 0,
              variants: Sequence[tuple[str, str, Mapping]] = ()) -> list[Run]:
    """Every run of the benchmark: ``seeds`` per trainer and per variant ``(label, trainer, settings)``, then
    ``dedicated_seeds`` per modality combination."""
    out = output_dir(work, regime)
    runs = []
    labels = [*trainers, *(label for label, _, _ in variants)]
    if len(set(labels)) != len(labels) or DEDICATED in labels:
        raise ValueError(f"group labels must be unique and not {DEDICATED!r}, got {labels}")
    for trainer in trainers:
        for seed in range(seeds):
            if regime.name == "short" and seed == 0:  # the original layout, so existing models are reused
                name, results, evaluation = trainer, work / "nnUNet_results", out / trainer
            else:
                name = f"{trainer}__seed{seed}"
                results, evaluation = out / "models" / name / "nnUNet_results", out / "eval" / name
            runs.append(Run(name, trainer, trainer, seed, results, results_model_dir(results, trainer, regime),
                            evaluation, pretrainer=PRETRAINERS.get(trainer)))
    for label, trainer, settings in variants:
        for seed in range(seeds):
            name = f"{label}__seed{seed}"
            results = out / "models" / name / "nnUNet_results"
            runs.append(Run(name, label, trainer, seed, results, results_model_dir(results, trainer, regime),
                            out / "eval" / name, pretrainer=PRETRAINERS.get(trainer), settings=settings))
    for combination in mods.all_combinations():
        for seed in range(dedicated_seeds):
            name = f"{DEDICATED}_{mods.combination_name(combination)}__seed{seed}"
            results = out / "models" / name / "nnUNet_results"
            runs.append(Run(name, DEDICATED, DEDICATED_TRAINER, seed, results,
                            results_model_dir(results, DEDICATED_TRAINER, regime), out / "eval" / name, combination))
    return runs


def order_runs(runs: Sequence[Run], first: Sequence[str]) -> list[Run]:
    """``runs`` with the runs named in ``first`` moved to the front, in that order; the others keep theirs.

    Raises:
        ValueError: a name in ``first`` is not a run of this benchmark, or is given twice.
    """
    by_name = {run.name: run for run in runs}
    unknown = [name for name in first if name not in by_name]
    if unknown:
        raise ValueError(f"--first: no run named {', '.join(unknown)} in this benchmark (its runs: "
                         f"{', '.join(by_name)})")
    if len(set(first)) != len(first):
        raise ValueError(f"--first names a run twice: {list(first)}")
    return [by_name[name] for name in first] + [run for run in runs if run.name not in set(first)]


def training_action(fold: Path) -> str:
    """What a run needs, from the files in its fold folder.

    Returns:
        ``"reuse"`` (``checkpoint_final.pth``: finished), ``"continue"`` (only ``checkpoint_latest.pth``: an
        interrupted run, resumed as ``nnUNetv2_train --c`` does) or ``"train"`` (nothing to resume from).
    """
    if (fold / "checkpoint_final.pth").is_file():
        return "reuse"
    if (fold / "checkpoint_latest.pth").is_file():
        return "continue"
    return "train"


def evaluation_is_current(evaluation: Path, checkpoint: Path, num_cases: int | None,
                          combinations: Sequence[str] | None = None) -> bool:
    """Whether ``evaluation/summary.json`` is newer than ``checkpoint`` (or whichever file it was made from) and
    covers the same number of cases (None: any) and combinations."""
    summary_file = evaluation / "summary.json"
    if not summary_file.is_file() or not checkpoint.is_file():
        return False
    if summary_file.stat().st_mtime <= checkpoint.stat().st_mtime:
        return False
    summary = json.loads(summary_file.read_text())
    if num_cases is not None and summary.get("num_cases") != num_cases:
        return False
    return combinations is None or set(summary["per_combination"]) == set(combinations)


def dedicated_override(combination: Sequence[int]) -> dict:
    """The ``nnUNet_missingmod_config`` override that trains a model on ``combination`` only."""
    return {"modality_dropout": {"scheme": "fixed", "keep": [mods.MODALITIES[c] for c in combination],
                                 "p_keep_all": 0.0}}


# ---------------------------------------------------------------- the archive: finished runs kept in the repository

#: Files of an evaluate-missing output that the archive keeps (small text; the heat map is left out).
ARCHIVE_FILES = ("summary.json", "per_case.csv", "table.md")
#: ``--postprocessing``: the archive's subfolder for the post-processed evaluation (the same files) and the choice
#: (``postprocessing.json``).
POSTPROCESSED = "postprocessed"
#: The record keys a run must match to be taken from the archive instead of trained.
ARCHIVE_KEYS = ("regime", "trainer", "seed", "combination", "settings", "config", "epochs", "iterations",
                "pretrain_epochs", "cases", "step_size")


def run_settings(run: Run) -> dict | None:
    """The ``nnUNet_missingmod_config`` override a run trains with (None: the trainer's own configuration)."""
    if run.combination is not None:
        return dedicated_override(run.combination)
    return None if run.settings is None else dict(run.settings)


def resolved_config(run: Run) -> dict | None:
    """The configuration a run trains with: its trainer's shipped ``trainer_configs`` merged with the run's
    override (None for a trainer without one, e.g. nnU-Net's own). Kept in the archive, so that a run trained
    before a shipped default changed is not taken for a run of the new default."""
    from nnunet_missingmod import trainers
    from nnunet_missingmod.config import deep_merge, shipped_trainer_config

    trainer_class = getattr(trainers, run.trainer, None)
    if not isinstance(trainer_class, type):
        return None
    return deep_merge(shipped_trainer_config(trainer_class), run_settings(run) or {}, strict=True)


def archive_identity(run: Run, regime: Regime, epochs: int, iterations: int, pretrain_epochs: int | None,
                     cases: Sequence[str], step_size: float) -> dict:
    """What defines a run's result: an archived record is reused only if all of it is the same."""
    return {"regime": regime.name, "trainer": run.trainer, "seed": run.seed,
            "combination": None if run.combination is None else list(run.combination),
            "settings": run_settings(run), "config": resolved_config(run), "epochs": epochs, "iterations": iterations,
            "pretrain_epochs": (pretrain_epochs or epochs) if run.pretrainer else None,
            "cases": sorted(cases), "step_size": step_size}


def read_archive(folder: Path) -> dict | None:
    """An archived run's ``run.json`` (None when the run is not archived)."""
    record = folder / "run.json"
    return json.loads(record.read_text()) if record.is_file() else None


def _flatten(config: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    return {k: v for key, value in config.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


def archive_mismatch(record: dict, identity: dict) -> list[str]:
    """``key: archived != asked`` for every key of :data:`ARCHIVE_KEYS` that differs (for ``config``, each
    setting that differs, e.g. ``config modality_dropout.p_keep_all: archived 0.0, asked 0.25``)."""
    differences = []
    for key in ARCHIVE_KEYS:
        archived, asked = record.get(key), identity[key]
        if archived == asked:
            continue
        if key == "config" and isinstance(archived, dict) and isinstance(asked, dict):
            old, new = _flatten(archived), _flatten(asked)
            differences += [f"config {name}: archived {old.get(name)!r}, asked {new.get(name)!r}"
                            for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]
        else:
            differences.append(f"{key}: archived {archived!r}, asked {asked!r}")
    return differences


def archive_sources(run: Run) -> dict[str, Path]:
    """The files of this machine the archive keeps of a finished run, by their path in its archive folder: the
    evaluation's :data:`ARCHIVE_FILES`, and those of a current post-processed evaluation with its choice in
    :data:`POSTPROCESSED` (``--postprocessing``)."""
    sources = {name: run.evaluation / name for name in ARCHIVE_FILES}
    if postprocessing_is_current(run):
        sources.update({f"{POSTPROCESSED}/{name}": run.postprocessed / name for name in ARCHIVE_FILES})
        sources[f"{POSTPROCESSED}/postprocessing.json"] = run.validation / "postprocessing.json"
    return {name: file for name, file in sources.items() if file.is_file()}


def _archive_unchanged(run: Run, folder: Path, record: dict) -> bool:
    """Whether ``folder`` already holds ``record`` (its date aside) and the same files as ``run``
    (:func:`archive_sources`), no more and no fewer."""
    previous = read_archive(folder)
    if previous is None or {k: v for k, v in previous.items() if k != "archived"} != json.loads(json.dumps(record)):
        return False
    sources = archive_sources(run)
    archived = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"run.json"}
    return archived == set(sources) and all(filecmp.cmp(file, folder / name, shallow=False)
                                            for name, file in sources.items())


def write_archive(run: Run, folder: Path, identity: dict, timings: dict) -> None:
    """Keep a finished, evaluated run in ``folder``: its evaluation files (and post-processed evaluation, see
    :func:`archive_sources`), learning curve, timings and identity.

    A model folder lives on one machine; the archive is small text meant to be committed, so that the tables can
    be built over several sittings on different machines. Written to a temporary folder, then renamed.
    """
    log = read_learning_curve(run.fold)
    if log is None or len(log["ema_fg_dice"]) != identity["epochs"]:
        raise SystemExit(f"{run.name}: the model in {run.fold} has {0 if log is None else len(log['ema_fg_dice'])} "
                         f"epochs, not the {identity['epochs']} asked for; not archived (--retrain {run.name})")
    if not (run.evaluation / "summary.json").is_file():
        raise SystemExit(f"{run.name}: no evaluation in {run.evaluation}; not archived")
    record = {"name": run.name, "group": run.group, **identity, "curve": log, "timings": timings.get(run.name, {})}
    if _archive_unchanged(run, folder, record):
        return  # keep the record as it is: no new date, no diff to commit
    record["archived"] = time.strftime("%Y-%m-%d %H:%M:%S")
    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for name, file in archive_sources(run).items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, staging / name)
    (staging / "run.json").write_text(json.dumps(record, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


# ---------------------------------------------------------------- learning curves and the plateau check


def read_learning_curve(fold: Path) -> dict | None:
    """nnU-Net's per-epoch log (final checkpoint, else the latest) of a run, or None before the first checkpoint.

    Returns:
        ``{"ema_fg_dice": [...], "mean_fg_dice": [...], "epoch_s": [...]}``, one value per finished epoch.
    """
    import torch

    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        if (fold / name).is_file():
            log = torch.load(fold / name, map_location="cpu", weights_only=False)["logging"]
            starts, ends = log.get("epoch_start_timestamps", []), log.get("epoch_end_timestamps", [])
            return {"ema_fg_dice": [float(v) for v in log["ema_fg_dice"]],
                    "mean_fg_dice": [float(v) for v in log["mean_fg_dice"]],
                    "epoch_s": [float(e - s) for s, e in zip(starts, ends, strict=False)]}
    return None


def plateau_check(curve: Sequence[float], min_gain: float = PLATEAU_GAIN) -> dict:
    """Whether a validation curve has plateaued: its last quarter improves by less than ``min_gain`` on the one before.

    The quarters are compared by their means (the curve is nnU-Net's EMA pseudo-Dice, already smoothed), so
    ``gain = mean(last quarter) - mean(quarter before)``, with quarters of ``len(curve) // 4`` epochs.

    Returns:
        ``{"plateaued": bool | None, "gain": float | None, "last_quarter": ..., "previous_quarter": ...,
        "epochs": n}``; ``plateaued`` is None for fewer than 4 epochs.
    """
    epochs = len(curve)
    quarter = epochs // 4
    if quarter < 1:
        return {"plateaued": None, "gain": None, "last_quarter": None, "previous_quarter": None, "epochs": epochs}
    last = float(np.mean(curve[epochs - quarter:]))
    previous = float(np.mean(curve[epochs - 2 * quarter:epochs - quarter]))
    return {"plateaued": bool(last - previous < min_gain), "gain": last - previous, "last_quarter": last,
            "previous_quarter": previous, "epochs": epochs}


def curve_label(run: str, group: str) -> str:
    """A run's legend entry: its seed in a group's panel, its combination of modalities among the dedicated models."""
    name, _, seed = run.rpartition("__")  # the short regime's seed-0 runs are named by their trainer alone
    return name.removeprefix(f"{DEDICATED}_") if group == DEDICATED else seed


def plot_learning_curves(curves: Mapping[str, tuple[str, Sequence[float]]], png: Path) -> None:
    """All runs' EMA pseudo-Dice per epoch in one PNG: one panel per group, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(group for group, _ in curves.values()))
    if not groups:
        return
    columns = min(3, len(groups))
    rows = -(-len(groups) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False, sharey=True)
    for ax, group in zip(axes.flat, groups, strict=False):
        runs = [(name, curve) for name, (run_group, curve) in curves.items() if run_group == group and curve]
        palette = plt.get_cmap("tab20" if len(runs) > 10 else "tab10")  # the 15 dedicated models, each its own colour
        for i, (name, curve) in enumerate(runs):
            ax.plot(np.arange(1, len(curve) + 1), curve, linewidth=1.2, color=palette(i % palette.N),
                    label=curve_label(name, group))
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6 if group == DEDICATED else 7, ncol=2 if group == DEDICATED else 1)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("EMA pseudo-Dice (validation)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- aggregation over runs


def dedicated_summary(summaries: Sequence[dict]) -> dict:
    """One summary from dedicated models: each combination scored by the model trained on it alone."""
    per_combination = {}
    for summary in summaries:
        per_combination.update(summary["per_combination"])
    order = [mods.combination_name(c) for c in mods.all_combinations()]
    per_combination = {name: per_combination[name] for name in order if name in per_combination}
    keys = [f"{region}_{metric}" for region in REGIONS for metric in ("Dice", "HD95")]
    return {"per_combination": per_combination,
            "average": {k: float(np.mean([v[k] for v in per_combination.values()])) for k in keys}}


def by_num_modalities(summary: dict) -> dict[int, dict[str, float]]:
    """Mean of every region/metric over the combinations with k available modalities, per k."""
    result = {}
    for name, values in summary["per_combination"].items():
        result.setdefault(len(name.split("+")), []).append(values)
    return {k: {key: float(np.mean([v[key] for v in rows])) for key in rows[0] if key != "num_cases"}
            for k, rows in sorted(result.items())}


def _ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else numerator / denominator


def subset_bound(per_combination: Mapping[str, Mapping]) -> dict[str, dict[str, float]]:
    """Per combination and region, the best mean Dice of the dedicated models trained on it or on a subset of its
    sequences (of those in ``per_combination``, a :func:`aggregate_benchmark` group's).

    A model given a combination could ignore the sequences that a subset's model does without, so this is a lower
    bound of what the combination allows: stricter than its own dedicated model where that one, not at a plateau,
    scores below a subset's (e.g. a model with all four below the one on T1 + FLAIR). Region by region, so the
    bound of one combination may come from different models for WT, TC and ET.
    """
    sequences = {name: set(name.split("+")) for name in per_combination}
    return {name: {r: max(per_combination[subset][f"{r}_Dice"]["mean"] for subset in sequences
                          if sequences[subset] <= sequences[name]) for r in REGIONS}
            for name in per_combination}


def aggregate_benchmark(groups: Mapping[str, Sequence[dict]], dedicated: Sequence[dict] = (),
                        baseline: str = BASELINE, baseline_for: Mapping[str, str] | None = None) -> dict:
    """Statistics over seeds per group, and the ratios the benchmark's goals are stated in.

    Args:
        groups: group label -> the evaluate-missing summaries of its runs (one per seed).
        dedicated: per seed, a :func:`dedicated_summary` of the 15 dedicated models.
        baseline: the group of plain nnU-Net (for the full-input ratio).
        baseline_for: group label -> the plain nnU-Net group to divide by instead of ``baseline`` (the one
            trained for as many epochs, :func:`equal_budget_baselines`); its label is kept as ``baseline``.

    Returns:
        ``{"groups": {label: aggregate}, "ratios": {label: {...}}}`` where each aggregate is
        :func:`~nnunet_missingmod.evaluation.missing_combinations.aggregate_summaries` plus
        ``by_num_modalities`` (k -> key -> statistics over runs), and each ratio entry holds
        ``to_dedicated`` (per combination and ``average``: mean Dice over seeds ÷ the dedicated models'
        mean Dice; the average is the ratio of the 15-combination averages), ``to_subset_bound`` (the same ÷
        :func:`subset_bound`, also in the result as ``subset_bound``) and ``full_input_to_baseline``
        (Dice with all modalities ÷ the baseline's) with ``baseline``, the group it divides by (both only when
        that group has been evaluated). Ratios are of means over seeds, per region.
    """
    aggregates = {}
    every = dict(groups) | ({DEDICATED: list(dedicated)} if dedicated else {})
    for label, summaries in every.items():
        if not summaries:
            continue
        aggregate = aggregate_summaries(summaries)
        per_k = [by_num_modalities(s) for s in summaries]
        aggregate["by_num_modalities"] = {k: {key: run_statistics([p[k][key] for p in per_k]) for key in per_k[0][k]}
                                          for k in per_k[0]}
        aggregates[label] = aggregate
    ratios = {}
    reference = aggregates.get(DEDICATED)
    limits = {}  # ratio key -> combination -> region -> the Dice it divides by
    if reference:
        limits["to_dedicated"] = {name: {r: values[f"{r}_Dice"]["mean"] for r in REGIONS}
                                  for name, values in reference["per_combination"].items()}
        limits["to_subset_bound"] = subset_bound(reference["per_combination"])
    for label, aggregate in aggregates.items():
        if label == DEDICATED:
            continue
        entry = {}
        base_label = (baseline_for or {}).get(label, baseline)
        base = aggregates.get(base_label)
        for key, limit in limits.items():
            shared = [n for n in limit if n in aggregate["per_combination"]]
            entry[key] = {name: {r: _ratio(aggregate["per_combination"][name][f"{r}_Dice"]["mean"], limit[name][r])
                                 for r in REGIONS} for name in shared}
            if len(shared) == len(limit) == len(aggregate["per_combination"]):  # the ratio of the averages
                entry[key]["average"] = {r: _ratio(aggregate["average"][f"{r}_Dice"]["mean"],
                                                   float(np.mean([limit[n][r] for n in limit]))) for r in REGIONS}
        if base and FULL_INPUT in aggregate["per_combination"] and FULL_INPUT in base["per_combination"]:
            entry["full_input_to_baseline"] = {r: _ratio(aggregate["per_combination"][FULL_INPUT][f"{r}_Dice"]["mean"],
                                                         base["per_combination"][FULL_INPUT][f"{r}_Dice"]["mean"])
                                               for r in REGIONS}
            entry["baseline"] = base_label
        ratios[label] = entry
    return {"groups": aggregates, "ratios": ratios} | ({"subset_bound": limits["to_subset_bound"]} if limits else {})


def equal_budget_baselines(identities: Mapping[str, Mapping], baseline: str = BASELINE) -> dict[str, str]:
    """group -> the plain nnU-Net group trained for the same epochs and iterations, where there is one (``baseline``
    first, then any other ``nnUNetTrainer`` group, e.g. a ``defaults.json`` variant with ``--epochs-for``).

    Args:
        identities: group -> ``{"trainer", "epochs", "iterations", ...}`` (:func:`group_identities`).
    """
    budget = {label: (i["epochs"], i["iterations"]) for label, i in identities.items() if i["epochs"] is not None}
    plain: dict[tuple, str] = {}
    for label in sorted(budget, key=lambda name: name != baseline):  # the baseline group wins a tie
        if identities[label]["trainer"] == BASELINE:
            plain.setdefault(budget[label], label)
    return {label: plain[b] for label, b in budget.items() if b in plain}


def group_identities(runs: Sequence[Run], rows: Sequence[dict], configs: Mapping[str, dict | None],
                     evaluated: Collection[str]) -> dict[str, dict]:
    """group -> ``{"trainer", "config", "epochs", "iterations", "seeds"}`` of its evaluated runs.

    ``config`` is the configuration the runs trained with (``configs``: run name -> the archived record's, else
    the trainer's shipped configuration merged with the run's override), so a variant that only pins a shipped
    default has the same configuration as the trainer's own group. ``epochs`` (the length of the learning curve)
    and ``iterations`` are None when the group's runs differ in either, or a run has no curve.
    """
    rows_by_name = {row["name"]: row for row in rows}
    identities: dict[str, dict] = {}
    for run in runs:
        if run.name not in evaluated or run.group == DEDICATED:
            continue
        row = rows_by_name[run.name]
        budget = (row["plateau"]["epochs"] or None, row["iterations"])
        entry = identities.setdefault(run.group, {"trainer": run.trainer, "config": configs.get(run.name),
                                                  "epochs": budget[0], "iterations": budget[1], "seeds": []})
        if (entry["epochs"], entry["iterations"]) != budget or budget[0] is None:
            entry["epochs"] = entry["iterations"] = None
        entry["seeds"].append(run.seed)
    return identities


def budget_pairs(identities: Mapping[str, Mapping], groups: Mapping[str, dict],
                 by_seed: Mapping[str, Mapping[int, dict]]) -> list[dict]:
    """What a longer budget changed: pairs of groups that train the same trainer with the same configuration
    (:func:`group_identities`) for different numbers of epochs (same iterations per epoch).

    Each pair holds the difference longer − shorter of the mean Dice, per region, on the 15-combination average
    (``average``) and with all modalities (``full_input``): over all runs of each group, and over the seeds both
    groups have (``same_seeds``: the mean of the per-seed differences, ``seeds`` lists them), so that a group of
    three seeds against one of one is not read as a budget effect; and ``spread``, the larger of the two groups'
    sd over runs of the 15-combination average (None with one run each). A budget is enough when a longer one
    moves the 15-combination average by no more than that spread.

    Args:
        groups: label -> aggregate over runs (:func:`aggregate_benchmark`'s ``groups``).
        by_seed: label -> seed -> that run's evaluate-missing summary.
    """
    def dice(source: dict, key: str) -> dict | None:  # a summary or a group's aggregate: same layout
        return source["average"] if key == "average" else source["per_combination"].get(FULL_INPUT)

    pairs = []
    labels = [label for label in identities if label in groups and identities[label]["epochs"] is not None]
    for i, first in enumerate(labels):
        for second in labels[i + 1:]:
            a, b = identities[first], identities[second]
            if ((a["trainer"], a["config"], a["iterations"]) != (b["trainer"], b["config"], b["iterations"])
                    or a["epochs"] == b["epochs"]):
                continue
            short, long = (first, second) if a["epochs"] < b["epochs"] else (second, first)
            seeds = sorted(set(by_seed.get(short, {})) & set(by_seed.get(long, {})))
            entry = {"shorter": short, "longer": long,
                     "epochs": (identities[short]["epochs"], identities[long]["epochs"]),
                     "runs": (groups[short]["num_runs"], groups[long]["num_runs"]), "seeds": seeds, "same_seeds": {}}
            for key in ("average", "full_input"):
                before, after = dice(groups[short], key), dice(groups[long], key)  # statistics over runs
                entry[key] = None if before is None or after is None else {
                    r: after[f"{r}_Dice"]["mean"] - before[f"{r}_Dice"]["mean"] for r in REGIONS}
                matched = [(dice(by_seed[short][seed], key), dice(by_seed[long][seed], key)) for seed in seeds]
                matched = [(x, y) for x, y in matched if x is not None and y is not None]
                entry["same_seeds"][key] = None if not matched else {
                    r: float(np.mean([y[f"{r}_Dice"] - x[f"{r}_Dice"] for x, y in matched])) for r in REGIONS}
            sds = {r: [groups[g]["average"][f"{r}_Dice"]["sd"] for g in (short, long)] for r in REGIONS}
            entry["spread"] = {r: max((sd for sd in sds[r] if sd is not None), default=None) for r in REGIONS}
            pairs.append(entry)
    return pairs


def region_presence(labels: Path, cases: Sequence[str]) -> dict[str, dict[str, bool]]:
    """case -> region -> whether the case's reference label map (``labels/<case>.nii.gz``) contains the region;
    cases without a label file are left out."""
    import SimpleITK as sitk

    presence = {}
    for case in cases:
        file = labels / f"{case}.nii.gz"
        if file.is_file():
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(file)))
            presence[case] = {region: bool(np.isin(array, members).any()) for region, members in mods.REGIONS.items()}
    return presence


def presence_split(per_case: Sequence[Mapping], presence: Mapping[str, Mapping[str, bool]],
                   region: str) -> dict[str, float | None]:
    """One run's Dice of ``region`` apart for the cases whose reference has it and those whose reference has not.

    BraTS scores a case without the region 1 when nothing is predicted and 0 otherwise, so on such a case one
    false-positive voxel costs as much as missing a whole region; this split shows how much of a run's Dice comes
    from each kind of case. ``per_case``: the rows of ``evaluate-missing``'s ``per_case.csv`` (:func:`read_per_case`).

    Returns:
        ``present_average`` / ``present_full``: mean Dice over the cases with the region, averaged over the
        combinations (mean per combination, then over combinations) / with all modalities; ``absent_average`` /
        ``absent_full``: the share of the cases without the region where nothing was predicted (Dice 1), likewise.
        None where there is no case of that kind.
    """
    values: dict[tuple[bool, str], list[float]] = {}
    for row in per_case:
        if row["case"] in presence:
            values.setdefault((presence[row["case"]][region], row["combination"]), []).append(
                float(row[f"{region}_Dice"]))
    result = {}
    for kind, present in (("present", True), ("absent", False)):
        per_combination = {name: np.mean(v) if present else np.mean(np.asarray(v) == 1.0)
                           for (has, name), v in values.items() if has == present}
        result[f"{kind}_average"] = float(np.mean(list(per_combination.values()))) if per_combination else None
        result[f"{kind}_full"] = float(per_combination[FULL_INPUT]) if FULL_INPUT in per_combination else None
    return result


def aggregate_presence(per_case_by_group: Mapping[str, Sequence[Sequence[Mapping]]],
                       presence: Mapping[str, Mapping[str, bool]]) -> dict:
    """For each region that some evaluated case lacks (the split says nothing where every case has it):
    ``{"cases_with": n, "cases_without": m, "groups": {label: {key: run_statistics over runs}}}`` of the
    :func:`presence_split` values (None where there is no case of that kind)."""
    cases = {row["case"] for runs in per_case_by_group.values() for rows in runs for row in rows} & set(presence)
    result = {}
    for region in REGIONS:
        without = sum(not presence[case][region] for case in cases)
        if not without:
            continue
        groups = {}
        for label, runs in per_case_by_group.items():
            splits = [presence_split(rows, presence, region) for rows in runs]
            if splits:
                groups[label] = {key: None if splits[0][key] is None else run_statistics([s[key] for s in splits])
                                 for key in splits[0]}
        result[region] = {"cases_with": len(cases) - without, "cases_without": without, "groups": groups}
    return result


# ---------------------------------------------------------------- Markdown


def format_stats(stats: dict, scale: float = 100.0, interval: bool = False) -> str:
    """``mean ± sd`` (and the 95% interval) of :func:`run_statistics`, scaled (100: Dice in %)."""
    text = f"{scale * stats['mean']:.1f}"
    if stats["sd"] is not None:
        text += f" ± {scale * stats['sd']:.1f}"
        if interval:
            low, high = stats["mean"] - stats["ci95"], stats["mean"] + stats["ci95"]
            text += f" [{scale * low:.1f}, {scale * high:.1f}]"
    return text


def _ratio_text(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _group_label(label: str, group: dict) -> str:
    """The row label of a group; dedicated models of only some combinations say how many (their averages are
    over those combinations, not comparable with the other rows)."""
    done, every = len(group["per_combination"]), len(mods.all_combinations())
    return label if label != DEDICATED or done == every else f"{label} ({done} of {every} combinations so far)"


def report_markdown(aggregate: dict, run_rows: Sequence[dict], regime: Regime, postprocessed: bool = False) -> str:
    """The benchmark's tables (runs, averages, by number of modalities, ratios) as Markdown; ``postprocessed``:
    of the post-processed evaluations, with each run's choice."""
    lines = [f"# Robustness benchmark, regime `{regime.name}`" + (", post-processed" if postprocessed else ""), "",
             f"{regime.spacing:g} mm phantoms (dataset {regime.dataset_id}), {regime.configuration}: patch "
             f"{'x'.join(map(str, regime.patch_size))}, features {'-'.join(map(str, regime.features))}, batch "
             f"{regime.batch_size}. {regime.note}.", ""]
    if postprocessed:
        lines += ["Every segmentation post-processed as nnU-Net does for BraTS: enhancing tumour smaller than a "
                  "threshold becomes necrosis, the threshold chosen per run among nnU-Net's candidates on fold 0's "
                  "validation cases (`nnunet_missingmod determine-postprocessing`); only the runs evaluated so.", "",
                  "| run | threshold (voxels) | validation Dice of the label: before → after | validation "
                  "predictions relabelled: without / with the label in the reference |", "|---|---|---|---|"]
        for row in run_rows:
            choice = row.get("postprocessing")
            if choice:
                relabelled = choice["relabelled"]
                lines.append(f"| {row['name']} | {choice['min_voxels']} | {100 * choice['dice_before']:.1f} → "
                             f"{100 * choice['dice_after']:.1f} | {relabelled['without_label_in_reference']} / "
                             f"{relabelled['with_label_in_reference']} |")
        lines.append("")
    lines += ["## Runs", "",
             f"Plateau: the EMA pseudo-Dice of the last quarter of epochs improved by less than {100 * PLATEAU_GAIN:g} "
             f"point over the quarter before; unfinished: training under way or interrupted (its curve so far), "
             f"no verdict.", "",
             "train: wall-clock of the training processes that finished (summed over sittings); epochs: the sum "
             "of nnU-Net's logged epoch times (interrupted sittings included up to their last checkpoint).", "",
             "| run | epochs x iterations | final EMA pseudo-Dice | last-quarter gain (points) | plateau | "
             "train (s) | epochs (s) | evaluate (s) |", "|---|---|---|---|---|---|---|---|"]
    for row in run_rows:
        check = row["plateau"]
        verdict = {True: "yes", False: "**no**", None: "–"}[check["plateaued"]]
        plateau = "unfinished" if row.get("unfinished") else verdict
        gain = "–" if check["gain"] is None else f"{100 * check['gain']:+.2f}"
        final = "–" if not row["curve"] else f"{row['curve'][-1]:.3f}"
        train = "–" if row.get("train_s") is None else f"{row['train_s']:.0f}"
        if row.get("pretrain_s") is not None:
            train += f" (+{row['pretrain_s']:.0f} first phase)"
        epochs = "–" if row.get("epochs_s") is None else f"{row['epochs_s']:.0f}"
        evaluate = "–" if row.get("evaluate_s") is None else f"{row['evaluate_s']:.0f}"
        lines.append(f"| {row['name']} | {check['epochs']} x {row['iterations']} | {final} | {gain} | {plateau} | "
                     f"{train} | {epochs} | {evaluate} |")
    groups = aggregate["groups"]
    lines += ["", "## Average over the modality combinations", "",
              "Dice in % as mean ± sd over runs [95% interval of the mean, t-distribution]; HD95 in mm, mean ± sd.",
              "", "| group | runs | " + " | ".join(f"{r} Dice" for r in REGIONS) + " | "
              + " | ".join(f"{r} HD95" for r in REGIONS) + " |", "|---|---|" + "---|" * (2 * len(REGIONS))]
    for label, group in groups.items():
        dice = " | ".join(format_stats(group["average"][f"{r}_Dice"], interval=True) for r in REGIONS)
        hd = " | ".join(format_stats(group["average"][f"{r}_HD95"], scale=1.0) for r in REGIONS)
        lines.append(f"| {_group_label(label, group)} | {group['num_runs']} | {dice} | {hd} |")
    lines += ["", "## Dice by number of available modalities", "",
              "Mean over the combinations with k modalities, then mean ± sd over runs (%), WT / TC / ET.", "",
              "| group | " + " | ".join(f"k = {k}" for k in range(1, mods.NUM_MODALITIES + 1)) + " |",
              "|---|" + "---|" * mods.NUM_MODALITIES]
    for label, group in groups.items():
        cells = [" / ".join(format_stats(group["by_num_modalities"][k][f"{r}_Dice"]) for r in REGIONS)
                 if k in group["by_num_modalities"] else "–" for k in range(1, mods.NUM_MODALITIES + 1)]
        lines.append(f"| {_group_label(label, group)} | " + " | ".join(cells) + " |")
    ratios = aggregate["ratios"]
    with_dedicated = [label for label, entry in ratios.items() if entry.get("to_dedicated")]
    if with_dedicated:
        names = [n for n in groups[DEDICATED]["per_combination"]]
        missing = len(mods.all_combinations()) - len(names)
        lines += ["", "## Dice ÷ the dedicated models", "",
                  "Mean Dice over runs ÷ the mean Dice of the model trained on that combination alone, WT / TC / ET; "
                  "the average row divides the 15-combination averages. Goal: ≥ 0.98 on the average."
                  + (f" {missing} dedicated models are still to be trained: no average yet." if missing else ""), "",
                  "| combination | " + " | ".join(with_dedicated) + " |", "|---|" + "---|" * len(with_dedicated)]
        def ratio_cells(key: str, name: str) -> str:
            return " | ".join(" / ".join(_ratio_text(ratios[label][key].get(name, {}).get(r)) for r in REGIONS)
                              for label in with_dedicated)

        for name in names:
            lines.append(f"| {name} | {ratio_cells('to_dedicated', name)} |")
        lines.append(f"| **average** | {ratio_cells('to_dedicated', 'average')} |")
        bound, own = aggregate["subset_bound"], groups[DEDICATED]["per_combination"]
        lines += ["", "## Dice ÷ the best dedicated model on the combination or a subset of it", "",
                  "A model given a combination could ignore the sequences a subset's model does without, so the best "
                  "dedicated Dice over the combination and its subsets (per region) is also a lower bound of what "
                  "the combination allows; `limit`: that Dice (%), * where it is a subset's, above the "
                  "combination's own model. Mean Dice over runs ÷ the limit, WT / TC / ET.", "",
                  "| combination | limit | " + " | ".join(with_dedicated) + " |",
                  "|---|---|" + "---|" * len(with_dedicated)]
        for name in names:
            limit = " / ".join(f"{100 * bound[name][r]:.1f}" + ("*" if bound[name][r] > own[name][f"{r}_Dice"]["mean"]
                                                                else "") for r in REGIONS)
            lines.append(f"| {name} | {limit} | {ratio_cells('to_subset_bound', name)} |")
        limit = "– / – / –" if missing else " / ".join(f"{100 * np.mean([b[r] for b in bound.values()]):.1f}"
                                                        for r in REGIONS)
        lines.append(f"| **average** | {limit} | {ratio_cells('to_subset_bound', 'average')} |")
    identities = aggregate.get("identities", {})

    def epochs_of(label: str) -> str:
        return str(identities.get(label, {}).get("epochs") or "–")

    with_full = [label for label, entry in ratios.items()
                 if "full_input_to_baseline" in entry and entry["baseline"] != label]
    if with_full:
        lines += ["", f"## Full input ({FULL_INPUT}) ÷ plain nnU-Net", "",
                  f"Mean Dice over runs with all modalities ÷ plain nnU-Net's: the plain group trained for as many "
                  f"epochs where there is one, else {BASELINE} (epochs: the group's ÷ the plain group's). "
                  f"Goal: ≥ 0.99.", "",
                  "| group | ÷ | epochs | " + " | ".join(REGIONS) + " |", "|---|---|---|" + "---|" * len(REGIONS)]
        for label in with_full:
            base = ratios[label]["baseline"]
            lines.append(f"| {label} | {base} | {epochs_of(label)} ÷ {epochs_of(base)} | "
                         + " | ".join(_ratio_text(ratios[label]["full_input_to_baseline"][r]) for r in REGIONS) + " |")
    pairs = aggregate.get("budget_pairs") or []
    if pairs:
        lines += ["", "## What a longer budget changed", "",
                  "Groups that train the same trainer with the same configuration (the shipped one merged with the "
                  "variant's settings) for different epochs: mean Dice of the longer minus the shorter (points), WT / "
                  "TC / ET, over all runs of each and over the seeds both have. A budget is enough when a longer one "
                  "moves the 15-combination average by no more than its sd over runs (the larger of the two groups').",
                  "", "| shorter | longer | epochs | runs | 15-combination average: all runs | same seeds | "
                  "all four: all runs | same seeds | sd of the 15-combination average |", "|---" * 9 + "|"]

        def points(values: Mapping[str, float | None] | None, scale: float = 100.0, sign: str = "+") -> str:
            if values is None or all(v is None for v in values.values()):
                return "–"
            return " / ".join("–" if values[r] is None else f"{scale * values[r]:{sign}.1f}" for r in REGIONS)

        for pair in pairs:
            seeds = ", ".join(map(str, pair["seeds"])) or "none"
            lines.append(f"| {pair['shorter']} | {pair['longer']} | {pair['epochs'][0]} → {pair['epochs'][1]} | "
                         f"{pair['runs'][0]}, {pair['runs'][1]} | {points(pair['average'])} | "
                         f"{points(pair['same_seeds']['average'])} (seeds {seeds}) | {points(pair['full_input'])} | "
                         f"{points(pair['same_seeds']['full_input'])} | {points(pair['spread'], sign='')} |")
    for region, entry in aggregate.get("presence", {}).items():
        lines += ["", f"## {region}: cases with and without {region} in the reference", "",
                  f"{entry['cases_without']} of the {entry['cases_with'] + entry['cases_without']} held-out cases have "
                  f"no {region}. BraTS scores such a case 1 when no {region} is predicted and 0 otherwise, so one "
                  f"false-positive voxel there weighs as much as a whole missed region. Dice (%) over the cases with "
                  f"{region}, and the share (%) of the cases without it where none was predicted; mean ± sd over "
                  f"runs.", "",
                  f"| group | runs | Dice, cases with {region}: 15-combination average | all four | "
                  f"left empty, cases without {region}: 15-combination average | all four |", "|---" * 6 + "|"]
        for label, stats in entry["groups"].items():
            cells = ["–" if stats[key] is None else format_stats(stats[key])
                     for key in ("present_average", "present_full", "absent_average", "absent_full")]
            lines.append(f"| {label} | {groups[label]['num_runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the benchmark


def _parse_epochs_for(items: Sequence[str]) -> dict[str, int]:
    epochs = {}
    for item in items:
        group, _, value = item.partition("=")
        if not group or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--epochs-for expects GROUP=EPOCHS (e.g. D2NetTrainer=120), got {item!r}")
        epochs[group] = int(value)
    return epochs


def run_keys(run: Run) -> tuple[str, str, str]:
    """The names that select ``run`` in ``--epochs-for`` and ``--retrain``, most specific first: the run's name
    (``dedicated_t1ce__seed0``), its name without the seed (``dedicated_t1ce``: every seed), its group."""
    return run.name, run.name.rsplit("__seed", 1)[0], run.group


def run_named(run: Run, names: Sequence[str]) -> bool:
    """Whether ``names`` holds one of :func:`run_keys`."""
    return bool(set(run_keys(run)) & set(names))


def run_epochs(run: Run, epochs_for: Mapping[str, int], default: int) -> int:
    """Epochs of ``run``: ``--epochs-for`` of its most specific :func:`run_keys` given; else ``default``."""
    return next((epochs_for[key] for key in run_keys(run) if key in epochs_for), default)


def check_run_names(option: str, names: Iterable[str], runs: Sequence[Run]) -> None:
    """Every name given to ``option`` (``--epochs-for``, ``--retrain``) is one of a run's :func:`run_keys` or a
    first-phase trainer of this benchmark: a typo would otherwise change nothing, silently."""
    known = {key for run in runs for key in (*run_keys(run), run.pretrainer) if key}
    unknown = sorted(set(names) - known)
    if unknown:
        raise SystemExit(f"{option}: {', '.join(unknown)} is not a group, run or first-phase trainer of this "
                         f"benchmark (e.g. {', '.join(sorted(known)[:6])}; --dry-run lists the runs)")


def read_variants(items: Sequence[Sequence[str]]) -> list[tuple[str, str, dict]]:
    """``--variant LABEL TRAINER SETTINGS.json`` arguments as ``(label, trainer, settings)``.

    Raises:
        ValueError: a settings file that is missing, not JSON, or not a JSON object (named in the message).
    """
    variants = []
    for label, trainer, path in items:
        try:
            settings = json.loads(Path(path).read_text())
        except OSError as error:
            raise ValueError(f"--variant {label}: cannot read {path}: {error.strerror}") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"--variant {label}: {path} is not valid JSON ({error})") from None
        if not isinstance(settings, dict):
            raise ValueError(f"--variant {label}: {path} must hold a JSON object of settings")
        variants.append((label, trainer, settings))
    return variants


def _worker(args: argparse.Namespace) -> None:
    """Train one run in this process (nnUNet_results and the override file come from the environment)."""
    regime = REGIMES[args.regime]
    if args.keep is not None:
        check_dedicated_trainer(args.worker, args.keep, regime, args.device)
    start = time.perf_counter()
    trained = train_with_budget(args.worker, args.epochs, args.iterations, args.device, regime=regime, seed=args.seed,
                                continue_training=args.resume, save_every=regime.save_every)
    print(json.dumps({"train_s": time.perf_counter() - start, "epochs": trained}))


def check_dedicated_trainer(trainer: str, keep: Sequence[int], regime: Regime, device: str) -> None:
    """Before training a dedicated model: its dropout transform keeps exactly ``keep``, for every sample."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    instance = get_trainer_from_args(str(regime.dataset_id), regime.configuration, 0, trainer,
                                     device=torch.device(device))
    try:
        transform = instance.modality_dropout_transform()
    except ValueError as error:
        raise RuntimeError(f"{trainer} could not build the 'fixed' dropout transform ({error}); its "
                           f"modality_dropout_transform must pass the config's 'keep' (see "
                           f"transforms.modality_dropout.transform_from_settings)") from None
    kept = [] if transform.keep is None else np.flatnonzero(transform.keep).tolist()
    if kept != sorted(keep):
        raise RuntimeError(f"{trainer}'s dropout keeps {kept}, expected {sorted(keep)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="bench_work")
    parser.add_argument("--regime", choices=sorted(REGIMES), default="short")
    parser.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    parser.add_argument("--seeds", type=int, default=1, help="training runs per trainer (seeds 0..N-1)")
    parser.add_argument("--dedicated", action="store_true", help="also the 15 dedicated plain nnU-Net models")
    parser.add_argument("--dedicated-seeds", type=int, default=1, help="runs per dedicated model (default 1)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the regime's")
    parser.add_argument("--iterations", type=int, default=None, help="default: the regime's")
    parser.add_argument("--epochs-for", nargs="+", default=[], metavar="GROUP=EPOCHS",
                        help="epochs for one group (a trainer, a variant or 'dedicated') or one run (with or without "
                             "its seed), e.g. D2NetTrainer=120 dedicated_t1ce=960")
    parser.add_argument("--variant", nargs=3, action="append", default=[], metavar=("LABEL", "TRAINER", "SETTINGS"),
                        help="a group LABEL training TRAINER with the override file SETTINGS (JSON); repeatable")
    parser.add_argument("--eval-cases", type=int, default=10)
    parser.add_argument("--step-size", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--retrain", nargs="*", default=None, metavar="GROUP",
                        help="delete the models of these groups or runs (all without names) and train again")
    parser.add_argument("--archive", default=None, metavar="DIR",
                        help="keep each finished run's evaluation, learning curve and timings in DIR/<run> (small "
                             "text files, meant to be committed); a run archived there with the same settings is "
                             "not trained again, also on another machine")
    parser.add_argument("--first", nargs="+", default=[], metavar="RUN",
                        help="train these runs before the others, in this order (names as --dry-run prints them)")
    parser.add_argument("--postprocessing", action="store_true",
                        help="also choose each run's BraTS post-processing on fold 0's validation cases and score "
                             "the held-out cases with it (a second report in <output>/postprocessed; archived "
                             "in <run>/postprocessed)")
    parser.add_argument("--dry-run", action="store_true", help="print each run's action and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="train and evaluate nothing: write the report of the runs that are finished here or "
                             "archived (e.g. the table so far, while other seeds are still to come)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    regime = REGIMES[args.regime]
    args.epochs = args.epochs or regime.epochs
    args.iterations = args.iterations or regime.iterations
    if args.worker:
        _worker(args)
        return
    if args.seeds < 1 or args.dedicated_seeds < 1:
        raise SystemExit("--seeds and --dedicated-seeds must be at least 1")
    work = Path(args.work_dir).resolve()
    epochs_for = _parse_epochs_for(args.epochs_for)
    try:
        runs = plan_runs(work, regime, args.trainers, args.seeds, args.dedicated_seeds if args.dedicated else 0,
                         read_variants(args.variant))
        training_order = order_runs(runs, args.first)  # the report keeps the planned order
    except ValueError as error:
        raise SystemExit(str(error)) from None
    check_run_names("--epochs-for", epochs_for, runs)
    check_run_names("--retrain", args.retrain or (), runs)
    out = output_dir(work, regime)
    archive = Path(args.archive).resolve() if args.archive else None
    if args.dry_run:
        here = local_speeds(runs, regime) if archive is not None else {}
        speeds = {**(archived_speeds(archive) if archive is not None else {}), **here}
        left, unknown, timed_here, timed_archived = 0.0, [], set(), set()
        for run in training_order:
            pretraining = run.pretraining_fold(regime)
            pre_action = None if pretraining is None else training_action(pretraining)
            first = "" if pretraining is None else f" (first phase {run.pretrainer}: {pre_action})"
            action = training_action(run.fold)
            if action != "reuse" and archive is not None and read_archive(archive / run.name) is not None:
                action, first = "archived", f" ({archive / run.name})"
            estimate = ""
            if action in ("train", "continue") and archive is not None:
                epochs = run_epochs(run, epochs_for, args.epochs)
                pretrain_epochs = epochs_for.get(run.pretrainer) if run.pretrainer else None
                done = checkpoint_epoch(run.fold) if action == "continue" else 0
                if pretraining is None or action == "continue" or pre_action == "reuse":
                    pretrain_done = None  # nothing of a first phase left to train
                else:
                    pretrain_done = checkpoint_epoch(pretraining) if pre_action == "continue" else 0
                seconds = estimate_training_s(run, epochs, args.iterations, pretrain_epochs, speeds, done=done,
                                              pretrain_done=pretrain_done)
                if seconds is None:
                    unknown.append(run.name)
                else:
                    left += seconds
                    needed = [t for t in (run.trainer, run.pretrainer if pretrain_done is not None else None) if t]
                    local = [t for t in needed if t in here]
                    timed_here |= set(local)
                    timed_archived |= set(needed) - set(local)
                    speed = "" if not local else "this machine's speed" + (
                        "" if local == needed else f" for {', '.join(local)}")
                    estimate = (f" [~{seconds / 60:.0f} min"
                                + (f" for the {max(epochs - done, 0)} epochs left" if done else "")
                                + (f", {speed}" if speed else "") + "]")
            if args.postprocessing:
                estimate += " [post-processing: " + (
                    "current" if postprocessing_is_current(run) else
                    "archived" if archive is not None and action == "archived" and
                    (archive / run.name / POSTPROCESSED / "summary.json").is_file() else
                    "not archived (the model is not here)" if action == "archived" else "to do") + "]"
            print(f"{run.name:<48} {action:<9} {run.model}{first}{estimate}")
        if archive is not None:
            source = "the archived runs' speed"
            if timed_here:
                source = (f"this machine's speed for {', '.join(sorted(timed_here))} (nnU-Net's checkpoints in "
                          f"{work})" + (", the archived runs' for the others" if timed_archived else ""))
            print(f"left to train: about {left / 3600:.1f} h at {source}"
                  + (f"; no archived run of the trainer of {', '.join(unknown)}" if unknown else ""))
        return
    out.mkdir(parents=True, exist_ok=True)
    labels = work / "nnUNet_raw" / regime.dataset_name / "labelsTs"
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}  # reused runs keep their times
    if args.report_only:
        write_report(runs, regime, out, timings, args.iterations, archive, labels)
        write_report(runs, regime, out, timings, args.iterations, archive, labels, postprocessed=True)
        return
    env = prepare(work, regime=regime)
    cases = sorted(labels.glob("*.nii.gz"))[: args.eval_cases]
    case_names = {c.name[: -len(".nii.gz")] for c in cases}
    if args.retrain is not None:  # all deletions first: two-phase runs of one folder share their first phase
        for run in runs:
            chosen = not args.retrain or run_named(run, args.retrain)
            if chosen and run.model.exists():
                shutil.rmtree(run.model)
            pretraining = run.pretraining_fold(regime)
            if pretraining is not None and (not args.retrain or run.pretrainer in args.retrain) and \
                    pretraining.parent.exists():
                shutil.rmtree(pretraining.parent)
            if archive is not None and chosen and (archive / run.name).exists():
                shutil.rmtree(archive / run.name)
    for run in training_order:
        epochs = run_epochs(run, epochs_for, args.epochs)
        pretrain_epochs = epochs_for.get(run.pretrainer) if run.pretrainer else None
        identity = archive_identity(run, regime, epochs, args.iterations, pretrain_epochs, case_names, args.step_size)
        if archive is not None and archived_run(run, archive / run.name, identity):
            continue
        train_run(run, regime, epochs, args, env, timings, pretrain_epochs=pretrain_epochs)
        timings_file.write_text(json.dumps(timings, indent=2))
        evaluate_run(run, cases, case_names, args, timings)
        timings_file.write_text(json.dumps(timings, indent=2))
        if args.postprocessing:
            postprocess_run(run, cases, case_names, args, timings)
            timings_file.write_text(json.dumps(timings, indent=2))
        if archive is not None:
            write_archive(run, archive / run.name, identity, timings)
    write_report(runs, regime, out, timings, args.iterations, archive, labels)
    write_report(runs, regime, out, timings, args.iterations, archive, labels, postprocessed=True)


def archived_speeds(archive: Path) -> dict[str, float]:
    """Wall-clock seconds per training iteration of each trainer (and each first-phase trainer), from the
    archived runs: the median over runs of ``train_s / (epochs x iterations)`` (``pretrain_s`` and
    ``pretrain_epochs`` for the first phase). ``train_s`` counts only the sittings that finished, so ``epochs`` is
    the number of epochs those sittings trained (``train_epochs``, ``pretrain_train_epochs``) where the record
    has it: a sitting interrupted before its end leaves its seconds and its epochs out alike. Measured on the
    machines that trained them: another machine, or other work beside a run, changes the figure (a planning aid,
    not a benchmark)."""
    per_trainer: dict[str, list[float]] = {}
    for record_file in sorted(archive.glob("*/run.json")):
        record = read_archive(record_file.parent)
        timings, iterations = record.get("timings") or {}, record.get("iterations")
        epochs = timings.get("train_epochs") or record.get("epochs")
        if timings.get("train_s") and epochs and iterations:
            per_trainer.setdefault(record["trainer"], []).append(timings["train_s"] / (epochs * iterations))
        pretrainer = PRETRAINERS.get(record["trainer"])
        pretrain_epochs = timings.get("pretrain_train_epochs") or record.get("pretrain_epochs")
        if pretrainer and timings.get("pretrain_s") and pretrain_epochs and iterations:
            per_trainer.setdefault(pretrainer, []).append(timings["pretrain_s"] / (pretrain_epochs * iterations))
    return {trainer: float(np.median(values)) for trainer, values in per_trainer.items()}


#: Timed epochs a trainer needs in this machine's checkpoints before :func:`local_speeds` gives its speed.
MIN_LOCAL_EPOCHS = 3


def local_speeds(runs: Iterable[Run], regime: Regime) -> dict[str, float]:
    """Wall-clock seconds per training iteration of each trainer (and first-phase trainer) on this machine: the
    median of the epoch times nnU-Net logged in the checkpoints of the runs' fold folders in the work folder
    (:func:`read_learning_curve`), each divided by the iterations per epoch of its fold (``debug.json``). The
    median leaves out the few epochs a pause stretched (a run stopped while other work ran); runs in training
    count as well as finished ones. The first epoch (warm-up) is left out, and a trainer needs
    :data:`MIN_LOCAL_EPOCHS` timed epochs here, else its archived speed is used."""
    per_trainer: dict[str, list[float]] = {}
    folds = {}
    for run in runs:
        folds[run.fold] = run.trainer
        if run.pretrainer:
            folds[run.pretraining_fold(regime)] = run.pretrainer
    for fold, trainer in folds.items():
        try:  # nnU-Net writes debug.json and the checkpoints as it trains: either may be half-written now
            iterations = int(json.loads((fold / "debug.json").read_text()).get("num_iterations_per_epoch", 0))
            curve = read_learning_curve(fold) if iterations >= 1 else None
        except Exception:  # noqa: BLE001 - an estimate only: skip the fold
            continue
        if curve is not None:
            per_trainer.setdefault(trainer, []).extend(seconds / iterations for seconds in curve["epoch_s"][1:])
    return {trainer: float(np.median(values)) for trainer, values in per_trainer.items()
            if len(values) >= MIN_LOCAL_EPOCHS}


def checkpoint_epoch(fold: Path) -> int:
    """The epoch a resumed run starts at: ``current_epoch`` of the fold's ``checkpoint_latest.pth``; 0 (counted
    from scratch) when the file cannot be read, e.g. while the training writes it."""
    import torch

    try:
        checkpoint = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
        return int(checkpoint["current_epoch"])
    except Exception as error:  # noqa: BLE001 - an estimate only: never stop the dry run for it
        print(f"(could not read {fold / 'checkpoint_latest.pth'}: {error}; its run is counted from epoch 0)")
        return 0


def estimate_training_s(run: Run, epochs: int, iterations: int, pretrain_epochs: int | None,
                        speeds: Mapping[str, float], done: int = 0, pretrain_done: int | None = 0) -> float | None:
    """Estimated seconds left to train ``run`` at ``speeds`` (seconds per iteration per trainer: this machine's,
    :func:`local_speeds`, or :func:`archived_speeds`); None when a trainer it needs has no speed.

    Args:
        done: epochs its checkpoint holds already (0: from scratch).
        pretrain_done: the same for its first phase; None when the first phase is finished (or not needed).
    """
    pretraining = run.pretrainer is not None and pretrain_done is not None
    if run.trainer not in speeds or (pretraining and run.pretrainer not in speeds):
        return None
    seconds = speeds[run.trainer] * max(epochs - done, 0) * iterations
    if pretraining:
        seconds += speeds[run.pretrainer] * max((pretrain_epochs or epochs) - pretrain_done, 0) * iterations
    return seconds


def archived_run(run: Run, folder: Path, identity: dict) -> bool:
    """Whether ``run`` is taken from the archive (archived, and its model is not on this machine).

    Raises:
        SystemExit: the run is archived with other settings (named in the message), whether or not its model is
            here: a finished model would otherwise be archived under settings it was not trained with.
    """
    record = read_archive(folder)
    if record is None:
        return False
    differences = archive_mismatch(record, identity)
    if differences:
        raise SystemExit(f"{run.name} is archived in {folder} with other settings ({'; '.join(differences)}): ask "
                         f"for the same ones, use another --archive, or --retrain {run.name}")
    if training_action(run.fold) == "reuse":
        return False  # the model is here: reuse it, evaluate if needed and refresh the archive
    print(f"=== archived: {run.name} ({folder})", flush=True)
    return True


def train_run(run: Run, regime: Regime, epochs: int, args: argparse.Namespace, env: dict[str, str],
              timings: dict, pretrain_epochs: int | None = None) -> None:
    """Train, continue or reuse one run (see :func:`training_action`); training seconds add up over sittings.

    ``train_s`` sums the seconds of the sittings that finished and ``train_epochs`` the epochs they trained (a
    sitting cut off by the end of a session records neither; the next one resumes from its checkpoint).

    A two-phase run first trains, continues or reuses its first phase (``pretrain_epochs``, default ``epochs``)
    in the same ``nnUNet_results`` folder; its seconds are kept apart as ``pretrain_s``.
    """
    action = training_action(run.fold)
    if action == "reuse":
        print(f"=== reusing {run.name} ({run.model})", flush=True)
        return
    run_env = dict(env, nnUNet_results=str(run.results))
    common = ["--regime", regime.name, "--iterations", str(args.iterations), "--device", args.device,
              "--seed", str(run.seed)]
    entry = timings.setdefault(run.name, {})
    pretraining = run.pretraining_fold(regime)
    if pretraining is not None and action == "train":
        pre_action = training_action(pretraining)
        if pre_action == "reuse":
            print(f"=== reusing the first phase of {run.name} ({pretraining.parent})", flush=True)
        else:
            pre_epochs = pretrain_epochs or epochs
            print(f"=== {'continuing' if pre_action == 'continue' else 'training'} the first phase of {run.name} "
                  f"({run.pretrainer}): {pre_epochs} epochs x {args.iterations} iterations, seed {run.seed}",
                  flush=True)
            result = run_worker(__file__, ["--worker", run.pretrainer, "--epochs", str(pre_epochs), *common,
                                           *(["--resume"] if pre_action == "continue" else [])], run_env,
                                log=run.results.parent / f"train_{run.pretrainer}.log")
            _add_sitting(entry, "pretrain_s", "pretrain_train_epochs", result, pre_action == "continue")
    log = run.results.parent / f"train_{run.trainer}.log"
    print(f"=== {'continuing' if action == 'continue' else 'training'} {run.name}: {epochs} epochs x "
          f"{args.iterations} iterations, seed {run.seed} (progress: tail -f {log})", flush=True)
    worker_args = ["--worker", run.trainer, "--epochs", str(epochs), *common]
    if action == "continue":
        worker_args.append("--resume")
    if run.combination is not None or run.settings is not None:
        settings = dedicated_override(run.combination) if run.combination is not None else dict(run.settings)
        override = run.results.parent / "override.json"
        if action == "continue" and override.is_file() and json.loads(override.read_text()) != settings:
            raise SystemExit(f"{run.name} was started with the settings of {override}; they differ from the ones "
                             f"given now: use the same file, another label, or --retrain {run.name}")
        override.parent.mkdir(parents=True, exist_ok=True)
        override.write_text(json.dumps(settings, indent=2))
        run_env[OVERRIDE_ENV] = str(override)
        if run.combination is not None:
            worker_args += ["--keep", *map(str, run.combination)]
    result = run_worker(__file__, worker_args, run_env, log=log)
    _add_sitting(entry, "train_s", "train_epochs", result, action == "continue")
    entry["sittings"] = (entry.get("sittings", 0) if action == "continue" else 0) + 1


def _add_sitting(entry: dict, seconds_key: str, epochs_key: str, result: dict, continued: bool) -> None:
    """Add a finished sitting's seconds (``result["train_s"]``) and epochs (``result["epochs"]``) to a run's
    timings; a fresh training starts both anew. The epochs are left out when they are unknown for any sitting
    counted (a record from before they were kept), so that seconds and epochs always cover the same sittings."""
    epochs_known = "epochs" in result and (not continued or seconds_key not in entry or epochs_key in entry)
    entry[seconds_key] = (entry.get(seconds_key, 0.0) if continued else 0.0) + result["train_s"]
    if epochs_known:
        entry[epochs_key] = (entry.get(epochs_key, 0) if continued else 0) + result["epochs"]
    else:
        entry.pop(epochs_key, None)


def _run_combinations(run: Run) -> tuple[list[tuple[int, ...]] | None, list[str] | None]:
    """The combinations a run is scored on (None: all 15; a dedicated model: its own), as indices and names."""
    combinations = None if run.combination is None else [run.combination]
    return combinations, None if combinations is None else [mods.combination_name(c) for c in combinations]


def evaluate_run(run: Run, cases: list[Path], case_names: set[str], args: argparse.Namespace, timings: dict) -> None:
    """Score a run with evaluate-missing (its own combination only for a dedicated model), unless current."""
    from nnunet_missingmod.evaluation.missing_combinations import evaluate_missing

    combinations, names = _run_combinations(run)
    if evaluation_is_current(run.evaluation, run.fold / "checkpoint_final.pth", len(cases), names):
        print(f"=== reusing the evaluation of {run.name} ({run.evaluation / 'summary.json'})", flush=True)
        return
    print(f"=== evaluating {run.name} on {len(cases)} held-out phantoms x {len(names) if names else 15} "
          f"combinations", flush=True)
    start = time.perf_counter()
    evaluate_missing(run.model, 0, split="test", output=run.evaluation, combinations=combinations,
                     tile_step_size=args.step_size, use_mirroring=False, device=args.device, case_filter=case_names)
    timings.setdefault(run.name, {})["evaluate_s"] = time.perf_counter() - start


def _choice_is_current(run: Run) -> bool:
    """Whether the run's ``postprocessing.pkl`` was chosen on its current validation evaluation."""
    pickle_file, summary_file = run.validation / "postprocessing.pkl", run.validation / "summary.json"
    return pickle_file.is_file() and summary_file.is_file() and \
        pickle_file.stat().st_mtime > summary_file.stat().st_mtime


def postprocessing_is_current(run: Run) -> bool:
    """Whether the run's post-processed evaluation comes from its current model, each step made after the one
    before (see :func:`postprocess_run`)."""
    return evaluation_is_current(run.validation, run.fold / "checkpoint_final.pth", None) and \
        _choice_is_current(run) and \
        evaluation_is_current(run.postprocessed, run.validation / "postprocessing.pkl", None)


def postprocess_run(run: Run, cases: list[Path], case_names: set[str], args: argparse.Namespace,
                    timings: dict) -> None:
    """``--postprocessing``: nnU-Net's BraTS post-processing chosen for this run on fold 0's validation cases, then
    the held-out cases scored with it, each step unless current (made after what it is made from):

    1. evaluate-missing on the validation split with saved predictions (:attr:`Run.validation`; all of fold 0's
       validation cases, the run's own combinations);
    2. determine-postprocessing there (``postprocessing.pkl``, ``.json``, ``.png``);
    3. evaluate-missing on the held-out cases with that ``postprocessing.pkl`` (:attr:`Run.postprocessed`).

    ``postprocess_s``: the seconds of the steps that ran (none ran: unchanged).
    """
    from nnunet_missingmod.evaluation.missing_combinations import evaluate_missing
    from nnunet_missingmod.evaluation.postprocessing import determine_postprocessing, prediction_files

    combinations, names = _run_combinations(run)
    options = {"combinations": combinations, "tile_step_size": args.step_size, "use_mirroring": False,
                "device": args.device}
    start, ran = time.perf_counter(), False
    if not evaluation_is_current(run.validation, run.fold / "checkpoint_final.pth", None, names) or \
            not prediction_files(run.validation):
        print(f"=== {run.name}: evaluating fold 0's validation cases for the post-processing", flush=True)
        evaluate_missing(run.model, 0, split="val", output=run.validation, save_predictions=True, **options)
        ran = True
    pickle_file = run.validation / "postprocessing.pkl"
    if not _choice_is_current(run):
        chosen, ran = determine_postprocessing(run.validation), True
        what = (f"label {chosen['label']} below {chosen['min_voxels']} voxels removed" if chosen["applied"] else
                "none (no threshold raises the Dice)")
        print(f"=== {run.name}: post-processing chosen on {chosen['chosen_on']['predictions']} validation "
              f"predictions: {what} (Dice {chosen['dice_before']:.3f} -> {chosen['dice_after']:.3f}; "
              f"{run.validation / 'postprocessing.png'})", flush=True)
    if not evaluation_is_current(run.postprocessed, pickle_file, len(cases), names):
        print(f"=== {run.name}: evaluating the held-out cases post-processed", flush=True)
        evaluate_missing(run.model, 0, split="test", output=run.postprocessed, case_filter=case_names,
                         postprocessing=pickle_file, **options)
        ran = True
    else:
        print(f"=== reusing the post-processed evaluation of {run.name} ({run.postprocessed / 'summary.json'})",
              flush=True)
    if ran:
        timings.setdefault(run.name, {})["postprocess_s"] = time.perf_counter() - start


def evaluation_folders(run: Run, archive: Path | None, postprocessed: bool = False) -> list[Path]:
    """Where a run's evaluation may be, in order: this machine's, then the archive's. ``postprocessed``: the
    post-processed one (this machine's only when current, :func:`postprocessing_is_current`)."""
    archived = [] if archive is None else [archive / run.name / (POSTPROCESSED if postprocessed else "")]
    if not postprocessed:
        return [run.evaluation, *archived]
    return [*([run.postprocessed] if postprocessing_is_current(run) else []), *archived]


def postprocessing_choice(evaluation: Path, run: Run) -> dict | None:
    """The ``postprocessing.json`` behind a post-processed evaluation folder: this machine's (chosen in
    :attr:`Run.validation`) or the archive's (beside the evaluation)."""
    file = (run.validation if evaluation == run.postprocessed else evaluation) / "postprocessing.json"
    return json.loads(file.read_text()) if file.is_file() else None


def write_report(runs: Sequence[Run], regime: Regime, out: Path, timings: dict, iterations: int,
                 archive: Path | None = None, labels: Path | None = None, postprocessed: bool = False) -> None:
    """comparison.md/.png, report.md/.json and learning_curves.png of the finished runs.

    A run whose model or evaluation is not on this machine is taken from ``archive`` when it is there. With the
    held-out reference ``labels`` (a folder of ``<case>.nii.gz``), the report also splits each region that some
    case lacks by whether the reference has it (:func:`aggregate_presence`).

    ``postprocessed``: the same report of the runs' post-processed evaluations (``--postprocessing``) in
    ``out/postprocessed``, with each run's choice; nothing when no run has one.
    """
    from nnunet_missingmod.evaluation.missing_combinations import compare

    if postprocessed:
        if not any((folder / "summary.json").is_file() for run in runs
                   for folder in evaluation_folders(run, archive, postprocessed=True)):
            return
        out = out / POSTPROCESSED
        out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict[int, list[dict]]] = {}
    rows, curves, evaluations, configs = [], {}, {}, {}
    for run in runs:
        record = read_archive(archive / run.name) if archive is not None else None
        configs[run.name] = record["config"] if record and "config" in record else resolved_config(run)
        log = read_learning_curve(run.fold) or (record or {}).get("curve")
        curve = log["ema_fg_dice"] if log else []
        curves[run.name] = (run.group, curve)
        rows.append({"name": run.name, "group": run.group, "seed": run.seed,
                     "iterations": record["iterations"] if record and not run.fold.is_dir() else iterations,
                     "curve": curve, "plateau": plateau_check(curve), "epochs_s": sum(log["epoch_s"]) if log else None,
                     "unfinished": run.fold.is_dir() and training_action(run.fold) == "continue",
                     **(timings.get(run.name) or (record or {}).get("timings", {}))})
        for folder in evaluation_folders(run, archive if record else None, postprocessed):
            if (folder / "summary.json").is_file():
                evaluations[run.name] = folder
                if postprocessed:
                    rows[-1]["postprocessing"] = postprocessing_choice(folder, run)
                summaries.setdefault(run.group, {}).setdefault(run.seed, []).append(
                    json.loads((folder / "summary.json").read_text()))
                break
    groups = {label: [s for per_seed in by_seed.values() for s in per_seed]
              for label, by_seed in summaries.items() if label != DEDICATED}
    dedicated_by_seed = summaries.get(DEDICATED, {})
    complete = [dedicated_summary(per_seed) for per_seed in dedicated_by_seed.values()
                if len(per_seed) == len(mods.all_combinations())]
    # until a seed has all 15, the first seed's dedicated models so far: ratios per combination, no average
    dedicated = complete or [dedicated_summary(per_seed) for _, per_seed in sorted(dedicated_by_seed.items())[:1]]
    identities = group_identities(runs, rows, configs, evaluations)
    aggregate = aggregate_benchmark(groups, dedicated, baseline_for=equal_budget_baselines(identities))
    aggregate["identities"] = identities
    aggregate["budget_pairs"] = budget_pairs(identities, aggregate["groups"],
                                             {label: {seed: per_seed[0] for seed, per_seed in by_seed.items()}
                                              for label, by_seed in summaries.items() if label != DEDICATED})
    if labels is not None and labels.is_dir():
        per_case = {label: [read_per_case(evaluations[r.name]) for r in runs
                            if r.group == label and r.name in evaluations] for label in groups}
        cases = sorted({row["case"] for rows in per_case.values() for run_rows in rows for row in run_rows})
        aggregate["presence"] = aggregate_presence(per_case, region_presence(labels, cases))
    (out / "report.md").write_text(report_markdown(aggregate, rows, regime, postprocessed))
    (out / "report.json").write_text(json.dumps({"regime": regime.name, "runs": rows, **aggregate}, indent=2))
    if not postprocessed:  # the same curves as the report without post-processing
        plot_learning_curves(curves, out / "learning_curves.png")
    trainer_groups = {label: [evaluations[r.name] for r in runs if r.group == label and r.name in evaluations]
                      for label in groups}
    if trainer_groups:
        markdown, _ = compare(list(trainer_groups.values()), out, labels=list(trainer_groups))
        print(markdown.read_text())
    print((out / "report.md").read_text())
    if postprocessed:
        example = next(run for run in runs if run.name in evaluations)
        print(f"post-processed: {out / 'report.md'} (+ .json); each run's choice: <evaluation folder>_val/"
              f"postprocessing.png (on the machine that chose it), e.g. {example.validation / 'postprocessing.png'}")
    else:
        print(f"report: {out / 'report.md'} (+ .json), curves: {out / 'learning_curves.png'}, "
              f"tables per run: <evaluation folder>/table.md, e.g. {runs[0].evaluation / 'table.md'}")


if __name__ == "__main__":
    main()
