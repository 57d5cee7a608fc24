"""Score a trained model on every non-empty subset of the four modalities (15 combinations).

Each case is read and preprocessed once by nnU-Net's preprocessor; every combination is then
predicted from that tensor with the missing channels set to zero in normalised space (nnU-Net's
sliding window), converted back to the original geometry, and scored with Dice and HD95 per region
(WT, TC, ET; :mod:`nnunet_missingmod.evaluation.metrics`). Zeroing after preprocessing equals
zero-filling the files when nnU-Net's crop and normalisation mask do not depend on the dropped
channels, as for skull-stripped BraTS data and the phantoms, whose channels share one brain mask.

Outputs (in ``<fold folder>/missing_modalities_<split>`` or ``output``):
``per_case.csv``, ``summary.json``, ``table.md`` (the layout of Table I of D²-Net: rows WT/TC/ET, one
column per combination marked ✓/– for FLAIR, T1, T1ce, T2, plus the average) and ``heatmap.png``.

Filling the missing channels with synthesised ones (``fill="synthesize"``, ``--fill synthesize -m MODEL``): the
downstream experiment of UTAD-Net (Huang, Wei, Li; Sec. IV, Table II) and the BraSyn setting (exactly one sequence
missing: ``--combinations one-missing``). For every combination, each channel outside it is synthesised from the
channels in it by a synthesis model (:mod:`nnunet_missingmod.inference.synthesize`: the same weighting of sources,
back-resampling and intensity rule as ``synthesize``), the completed case is preprocessed by the segmentation
model's preprocessor and predicted with all four channels. Each case is read and preprocessed once for the
synthesis model and every source -> target translation is computed once and shared by all combinations, which
rests on the same assumption as zeroing after preprocessing (the non-zero region does not depend on the dropped
channels). The default output folder is ``missing_modalities_<split>_synthesized``; ``summary.json`` records
``fill`` (``zero`` or ``synthesize``) and the synthesis model, and ``table.md``'s title names the fill.

Post-processing (``postprocessing``, ``--postprocessing postprocessing.pkl``): nnU-Net's post-processing functions
applied to every segmentation before it is scored, such as the enhancing-tumour volume threshold that
:mod:`nnunet_missingmod.evaluation.postprocessing` chooses on the validation cases.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.data.nifti import check_image_file
from nnunet_missingmod.evaluation.metrics import region_metrics
from nnunet_missingmod.inference.predict import (
    CaseInput,
    MissingModalityPredictor,
    check_case_files,
    check_checkpoints,
    check_writable,
    find_cases,
    model_file_ending,
)

if TYPE_CHECKING:
    from nnunet_missingmod.inference.synthesize import SynthesisModel

METRICS = ("Dice", "HD95")
#: How the channels outside a combination are filled.
FILLS = ("zero", "synthesize")
#: Marker order of the D²-Net table header.
TABLE_ORDER = (3, 0, 1, 2)  # FLAIR, T1, T1ce, T2


def dataset_folders(model: Path) -> tuple[Path, Path]:
    dataset = model.parent.name
    raw, preprocessed = os.environ.get("nnUNet_raw"), os.environ.get("nnUNet_preprocessed")
    if not raw:
        raise RuntimeError("nnUNet_raw is not set; evaluate-missing reads the images and labels from it")
    return Path(raw) / dataset, Path(preprocessed) / dataset if preprocessed else model


def validation_cases(splits_file: Path, fold: int) -> list[str]:
    """The ``val`` cases of one fold of nnU-Net's ``splits_final.json``.

    Raises:
        FileNotFoundError: no splits file.
        ValueError: the fold is not in the file, or the file is not a list of {"train", "val"} objects
            (the message names the file and the key).
    """
    if not splits_file.is_file():
        raise FileNotFoundError(f"{splits_file} not found; set nnUNet_preprocessed to the folder used in training")
    try:
        splits = json.loads(splits_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{splits_file} is not valid JSON: {error}") from None
    if not isinstance(splits, list):
        raise ValueError(f"{splits_file} must hold a list of folds, got {type(splits).__name__}")
    if not 0 <= fold < len(splits):
        raise ValueError(f"fold {fold} is not in {splits_file}, which has folds 0-{len(splits) - 1}")
    entry = splits[fold]
    if not isinstance(entry, dict) or not isinstance(entry.get("val"), list):
        raise ValueError(f"{splits_file}: fold {fold} has no 'val' list of cases")
    return entry["val"]


def evaluation_cases(model: Path, fold: int | str, split: str, file_ending: str) -> tuple[list[CaseInput], Path]:
    """The fold's validation cases (``val``) or ``imagesTs`` (``test``) with their label folder."""
    raw, preprocessed = dataset_folders(model)
    availability = raw / "modality_availability.json"
    availability = availability if availability.is_file() else None
    if split == "test":
        cases = find_cases(raw / "imagesTs", file_ending, availability_file=availability)
        labels = raw / "labelsTs"
    elif split == "val":
        if fold == "all":
            raise ValueError("fold 'all' has no validation cases; use --split test")
        validation = set(validation_cases(preprocessed / "splits_final.json", int(fold)))
        cases = [c for c in find_cases(raw / "imagesTr", file_ending, availability_file=availability)
                 if c.identifier in validation]
        labels = raw / "labelsTr"
    else:
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    missing_labels = [c.identifier for c in cases if not (labels / f"{c.identifier}{file_ending}").is_file()]
    if missing_labels:
        raise FileNotFoundError(f"no reference label in {labels} for {missing_labels}")
    if not cases:
        raise FileNotFoundError(f"no cases to evaluate for split {split!r}")
    return cases, labels


def evaluate_missing(model: str | os.PathLike, fold: int | str = 0, *, split: str = "val",
                     combinations: Sequence[Sequence[int]] | None = None, output: str | os.PathLike | None = None,
                     save_predictions: bool = False, checkpoint_name: str = "checkpoint_final.pth",
                     device: str = "cpu", tile_step_size: float = 0.5, use_mirroring: bool = True,
                     case_filter: set[str] | None = None, batch_size: int = 5, progress: bool = True,
                     fill: str = "zero", synthesis_model: str | os.PathLike | SynthesisModel | None = None,
                     synthesis_folds: Sequence[int | str] | None = None,
                     synthesis_checkpoint: str = "checkpoint_final.pth", combine: str = "ssim",
                     num_parts: int = 1, part_id: int = 0, histogram_fallback: bool = False,
                     postprocessing: str | os.PathLike | None = None) -> Path:
    """Evaluate a trained model on all (or the given) modality combinations; see the module docstring.

    ``num_parts`` / ``part_id`` split the cases as ``nnUNetv2_predict`` does (every ``num_parts``-th case, starting
    at ``part_id``), so a cohort can be evaluated on several machines; each part writes its outputs to
    ``<output>/part_<part_id>_of_<num_parts>``, and :func:`merge_parts` combines the parts into ``<output>``.

    ``case_filter`` restricts the evaluation to the named cases of the split. ``batch_size`` combinations are
    predicted per forward pass (1: nnU-Net's own sliding window, one combination at a time; with
    ``fill="synthesize"`` every combination is its own input, so one at a time).

    ``fill``: ``zero`` (default) or ``synthesize``, which needs ``synthesis_model`` (a model folder or a
    :class:`~nnunet_missingmod.inference.synthesize.SynthesisModel`), with its ``synthesis_folds``,
    ``synthesis_checkpoint``, ``combine`` rule and ``histogram_fallback`` (as for ``synthesize``).

    ``postprocessing``: a ``postprocessing.pkl`` (nnU-Net's format, e.g. from
    :func:`~nnunet_missingmod.evaluation.postprocessing.determine_postprocessing`) applied to every segmentation
    before it is scored and saved; the default output folder then ends in ``_postprocessed``.

    Returns:
        The output folder.

    Raises:
        ValueError: a fold outside the splits, a corrupt splits or availability file, no case has the
            modalities of any requested combination, or ``postprocessing`` is not a post-processing pickle.
        InputImageError: a case's image or label is truncated, has NaN/Inf voxels or mismatching geometry.
        FileNotFoundError: a missing checkpoint, splits file, reference label or post-processing file.
    """
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing

    from nnunet_missingmod.evaluation.postprocessing import load_postprocessing
    from nnunet_missingmod.inference import synthesize as synthesis

    model = Path(model)
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"part_id must lie in 0..num_parts-1 and num_parts be at least 1, got part_id {part_id} "
                         f"of num_parts {num_parts}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    if fill == "synthesize" and synthesis_model is None:
        raise ValueError("fill 'synthesize' needs a synthesis model (-m MODEL_FOLDER)")
    if fill == "zero" and synthesis_model is not None:
        raise ValueError("a synthesis model (-m) is only used with --fill synthesize")
    if combine not in synthesis.COMBINE_RULES:
        raise ValueError(f"combine rule must be one of {', '.join(synthesis.COMBINE_RULES)}, got {combine!r}")
    combinations = [tuple(sorted(c)) for c in (combinations or mods.all_combinations())]
    file_ending = model_file_ending(model)
    cases, label_folder = evaluation_cases(model, fold, split, file_ending)
    check_checkpoints(model, [fold], checkpoint_name)
    if case_filter is not None:
        cases = [c for c in cases if c.identifier in case_filter]
    if num_parts > 1:
        cases = sorted(cases, key=lambda c: c.identifier)[part_id::num_parts]
        if not cases:
            raise ValueError(f"part {part_id} of {num_parts} has no case: the split has fewer cases than parts")
    check_evaluation_inputs(cases, label_folder, file_ending, combinations)
    if fill == "synthesize" and not isinstance(synthesis_model, synthesis.SynthesisModel):
        synthesis.check_model_folder(synthesis_model, synthesis_folds, synthesis_checkpoint)
    pp_functions, pp_kwargs = load_postprocessing(postprocessing) if postprocessing else ([], [])
    suffix = ("_synthesized" if fill == "synthesize" else "") + ("_postprocessed" if postprocessing else "")
    out = Path(output) if output else model / f"fold_{fold}" / f"missing_modalities_{split}{suffix}"
    if num_parts > 1:
        out = out / part_folder_name(part_id, num_parts)
    check_writable(out)
    predictor = MissingModalityPredictor(model, folds=[fold], checkpoint_name=checkpoint_name, device=device,
                                         tile_step_size=tile_step_size, use_mirroring=use_mirroring)
    if fill == "synthesize" and not isinstance(synthesis_model, synthesis.SynthesisModel):
        synthesis_model = synthesis.load_synthesis_model(synthesis_model, synthesis_folds, synthesis_checkpoint,
                                                         device, histogram_fallback=histogram_fallback)
    if fill == "synthesize" and type(predictor.reader) is not type(synthesis_model.reader):
        raise ValueError(f"the segmentation model reads images with {type(predictor.reader).__name__}, the "
                         f"synthesis model with {type(synthesis_model.reader).__name__}; they must agree")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        # read and preprocessed once; combinations needing a modality the case really lacks are skipped
        image, properties = predictor.read_case(case, check=False)
        reference, _ = predictor.reader.read_seg(str(label_folder / f"{case.identifier}{predictor.file_ending}"))
        spacing = properties["spacing"]
        usable = [c for c in combinations if set(c) <= set(case.available)]
        if fill == "synthesize":
            filled = SynthesizedCombinations(synthesis_model, image, properties, case.available, combine)
        else:
            data, data_properties = predictor.preprocess(image, properties)
        if batch_size > 1 and fill == "zero":
            all_logits = predictor.predict_logits_many(data, usable, batch_size, progress=progress)
        for index, combination in enumerate(tqdm(usable, desc=case.identifier, unit="combination",
                                                 disable=not progress, leave=False)):
            if fill == "synthesize":
                data, data_properties = predictor.preprocess(filled.image(combination), properties)
                logits = predictor.predict_logits(data, range(mods.NUM_MODALITIES))
            else:
                logits = all_logits[index] if batch_size > 1 else predictor.predict_logits(data, combination)
            segmentation = apply_postprocessing(predictor.logits_to_segmentation(logits, data_properties),
                                                pp_functions, pp_kwargs)
            metrics = region_metrics(reference[0], segmentation, spacing)
            rows.append({"case": case.identifier, "combination": mods.combination_name(combination),
                         **{f"{region}_{metric}": metrics[region][metric]
                            for region in mods.REGIONS for metric in METRICS}})
            if save_predictions:
                folder = out / "predictions" / mods.combination_name(combination)
                folder.mkdir(parents=True, exist_ok=True)
                predictor.reader.write_seg(segmentation, str(folder / f"{case.identifier}{predictor.file_ending}"),
                                           properties)
        if progress:
            print(f"{case.identifier}: {len(usable)} combinations, mean WT Dice "
                  f"{np.mean([r['WT_Dice'] for r in rows if r['case'] == case.identifier]):.3f}", flush=True)
    summary = summarise(rows, combinations)
    summary.update({"model": str(model), "fold": fold, "split": split, "num_cases": len(cases),
                    "checkpoint": checkpoint_name, "step_size": tile_step_size, "mirroring": use_mirroring,
                    "fill": fill, "combinations": [mods.combination_name(c) for c in combinations],
                    "postprocessing": {"file": str(postprocessing), "functions": [f.__name__ for f in pp_functions],
                                       "kwargs": pp_kwargs} if postprocessing else None})
    if num_parts > 1:
        summary["part"] = {"part_id": part_id, "num_parts": num_parts}
    title = f"{model.name}, fold {fold}, {split} ({len(cases)} cases)" + (", post-processed" if postprocessing else "")
    if fill == "synthesize":
        summary["synthesis"] = {"model": str(synthesis_model.folder or "in-memory model"),
                                "folds": [str(f) for f in synthesis_folds] if synthesis_folds else "all",
                                "checkpoint": synthesis_checkpoint, "combine": combine,
                                "validation_metric": synthesis_model.validation_metric,
                                "histogram_fallback": synthesis_model.fallback_names}
        title += f", missing channels synthesized by {Path(summary['synthesis']['model']).name}"
    write_outputs(out, rows, summary, title=title)
    return out


def part_folder_name(part_id: int, num_parts: int) -> str:
    """Folder of one part of a split evaluation, inside the evaluation's output folder."""
    return f"part_{part_id}_of_{num_parts}"


#: Settings every part of one evaluation must share (``summary.json`` keys).
SHARED_SETTINGS = ("model", "fold", "split", "checkpoint", "step_size", "mirroring", "fill", "combinations",
                   "synthesis", "postprocessing")


def merge_parts(folder: str | os.PathLike) -> Path:
    """Combine the parts of a split evaluation (``evaluate-missing -num_parts N -part_id K``) into ``folder``.

    ``folder`` holds ``part_<k>_of_<N>`` for every k in 0..N-1, each with ``per_case.csv`` and ``summary.json``.
    The merged ``per_case.csv``, ``summary.json``, ``table.md`` and ``heatmap.png`` are those a single run over all
    cases would write; the part folders are kept.

    Raises:
        FileNotFoundError: no part folder, or a part (or its files) is missing; the message lists them.
        ValueError: parts of different splits into parts, or evaluated with different settings (model, fold,
            split, checkpoint, step size, mirroring, fill, combinations, post-processing), or a case evaluated in
            two parts.
    """
    import re

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    parts = {}
    for entry in sorted(folder.iterdir()):
        match = re.fullmatch(r"part_(\d+)_of_(\d+)", entry.name)
        if match and entry.is_dir():
            parts[entry] = (int(match.group(1)), int(match.group(2)))
    if not parts:
        raise FileNotFoundError(f"{folder} holds no part_<k>_of_<N> folder written by evaluate-missing -num_parts")
    counts = sorted({n for _, n in parts.values()})
    if len(counts) > 1:
        raise ValueError(f"{folder} holds parts of different splits ({', '.join(f'of {n}' for n in counts)}); "
                         f"remove the folders of the split you do not want")
    num_parts = counts[0]
    missing = [part_folder_name(k, num_parts) for k in range(num_parts) if (k, num_parts) not in parts.values()]
    incomplete = [p.name for p in parts if not ((p / "per_case.csv").is_file() and (p / "summary.json").is_file())]
    if missing or incomplete:
        raise FileNotFoundError(f"cannot merge {folder}: " + "; ".join(
            ([f"missing part(s) {missing}"] if missing else []) +
            ([f"part(s) {incomplete} have no per_case.csv or summary.json (still running, or failed?)"]
             if incomplete else [])))
    summaries, per_part = {}, {}
    for part in sorted(parts, key=lambda p: parts[p][0]):
        summaries[part] = read_summary(part)
        per_part[part] = read_per_case(part)
    rows = [row for part_rows in per_part.values() for row in part_rows]
    first = next(iter(summaries.values()))
    for part, summary in summaries.items():
        different = [k for k in SHARED_SETTINGS if summary.get(k) != first.get(k)]
        if different:
            raise ValueError(f"{part.name} was evaluated with other settings than {next(iter(summaries)).name} "
                             f"({', '.join(different)}); the parts cannot be merged")
    owners: dict[str, str] = {}
    for part, part_rows in per_part.items():
        for case in {row["case"] for row in part_rows}:
            if case in owners:
                raise ValueError(f"case {case} was evaluated in {owners[case]} and in {part.name}")
            owners[case] = part.name
    names = first.get("combinations") or sorted({r["combination"] for r in rows})
    combinations = [mods.parse_modalities(name.replace("+", ",")) for name in names]
    summary = summarise(rows, combinations)
    settings = {k: first[k] for k in SHARED_SETTINGS if k in first}
    summary.update({**settings, "num_cases": len(owners), "merged_from": [p.name for p in summaries]})
    title = (f"{Path(first['model']).name}, fold {first['fold']}, {first['split']} ({len(owners)} cases, "
             f"{num_parts} parts)")
    write_outputs(folder, rows, summary, title=title)
    return folder


class SynthesizedCombinations:
    """One case with, for any combination of its sequences, the channels outside it synthesised from those in it.

    The case is preprocessed once for the synthesis model with all its sequences, and each source -> target
    translation is computed once (cached) and shared by every combination (see the module docstring).

    Args:
        model: a :class:`~nnunet_missingmod.inference.synthesize.SynthesisModel`.
        image: (C, ...) the case's channels (missing ones zero), as read by the segmentation model's reader.
        properties: the reader's properties.
        available: the sequences the case really has.
        combine: rule for several sources.
    """

    def __init__(self, model: SynthesisModel, image: np.ndarray, properties: dict, available: Sequence[int],
                 combine: str) -> None:
        self.model = model
        self.image_all = image
        self.combine = combine
        self.prepared = model.prepare(image, properties, available)

    def image(self, combination: Sequence[int]) -> np.ndarray:
        """(C, ...) the real channels of ``combination`` and the others synthesised from them."""
        combination = tuple(sorted(combination))
        filled = np.zeros_like(self.image_all)
        filled[list(combination)] = self.image_all[list(combination)]
        targets = [c for c in range(mods.NUM_MODALITIES) if c not in combination]
        if targets:
            for target, (array, _) in self.model.synthesize_channels(self.prepared, combination, targets,
                                                                     self.combine).items():
                filled[target] = array
        return filled


def check_evaluation_inputs(cases: Sequence[CaseInput], label_folder: Path, file_ending: str,
                            combinations: Sequence[Sequence[int]]) -> None:
    """Before any prediction: every image and reference label complete and finite, and something to score.

    Raises:
        FileNotFoundError: no case left to evaluate.
        InputImageError: naming the case and the file.
        ValueError: no case has all modalities of any requested combination (e.g. an availability file
            that excludes them all).
    """
    if not cases:
        raise FileNotFoundError("no cases to evaluate (is the case filter right?)")
    for case in cases:
        check_case_files(case)
        check_image_file(label_folder / f"{case.identifier}{file_ending}", case.identifier)
    if not any(set(c) <= set(case.available) for case in cases for c in combinations):
        names = ", ".join(mods.combination_name(c) for c in combinations)
        raise ValueError(f"no case has the modalities of any requested combination ({names}); check "
                         f"--combinations and the cases' modality_availability.json")


def summarise(rows: list[dict], combinations: Sequence[Sequence[int]]) -> dict:
    """Mean of every region/metric per combination, and the average over combinations."""
    per_combination = {}
    for combination in combinations:
        name = mods.combination_name(combination)
        selected = [r for r in rows if r["combination"] == name]
        if selected:
            per_combination[name] = {f"{region}_{metric}": float(np.mean([r[f"{region}_{metric}"] for r in selected]))
                                     for region in mods.REGIONS for metric in METRICS} | {"num_cases": len(selected)}
    keys = [f"{region}_{metric}" for region in mods.REGIONS for metric in METRICS]
    average = {k: float(np.mean([v[k] for v in per_combination.values()])) for k in keys}
    return {"per_combination": per_combination, "average": average}


def markdown_table(summary: dict, metric: str = "Dice") -> str:
    """D²-Net Table I layout: marker rows for FLAIR, T1, T1ce, T2, then one row per region, plus the average."""
    names = list(summary["per_combination"])
    combos = [tuple(mods.MODALITIES.index(m) for m in name.split("+")) for name in names]
    scale, fmt = (100.0, "{:.2f}") if metric == "Dice" else (1.0, "{:.2f}")
    lines = ["| | " + " | ".join(str(i + 1) for i in range(len(names))) + " | Avg |",
             "|---|" + "---|" * (len(names) + 1)]
    for channel in TABLE_ORDER:
        marks = ["✓" if channel in combo else "–" for combo in combos]
        lines.append(f"| {mods.DISPLAY_NAMES[channel]} | " + " | ".join(marks) + " | |")
    for region in mods.REGIONS:
        values = [summary["per_combination"][n][f"{region}_{metric}"] * scale for n in names]
        average = summary["average"][f"{region}_{metric}"] * scale
        lines.append(f"| {region} | " + " | ".join(fmt.format(v) for v in values) + f" | **{fmt.format(average)}** |")
    unit = "Dice (%)" if metric == "Dice" else "HD95 (mm)"
    return f"{unit} per modality combination (✓ available, – missing)\n\n" + "\n".join(lines) + "\n"


def heatmap(summary: dict, png: Path, title: str) -> None:
    """Combinations × regions heat map of Dice (left) and HD95 (right), with the values written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["per_combination"])
    regions = list(mods.REGIONS)
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.42 * len(names) + 1.8))
    for ax, metric, cmap in zip(axes, METRICS, ("viridis", "magma_r"), strict=True):
        values = np.array([[summary["per_combination"][n][f"{r}_{metric}"] for r in regions] for n in names])
        limits = (0, 1) if metric == "Dice" else (0, max(1.0, float(values.max())))
        shown = ax.imshow(values, cmap=cmap, vmin=limits[0], vmax=limits[1], aspect="auto")
        for (i, j), value in np.ndenumerate(values):
            red, green, blue, _ = shown.cmap(shown.norm(value))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(j, i, f"{value:.2f}" if metric == "Dice" else f"{value:.1f}", ha="center", va="center",
                    color="white" if dark else "black", fontsize=8)
        ax.set_xticks(range(len(regions)), regions)
        ax.set_yticks(range(len(names)), [n.replace("+", " + ") for n in names], fontsize=8)
        ax.set_title(metric if metric == "Dice" else "HD95 (mm)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, rows: list[dict], summary: dict, title: str) -> None:
    with open(out / "per_case.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "table.md").write_text(f"# {title}\n\n{markdown_table(summary, 'Dice')}\n{markdown_table(summary, 'HD95')}")
    heatmap(summary, out / "heatmap.png", title)


class CombinationMismatchWarning(UserWarning):
    """The compared runs were evaluated on different sets of modality combinations."""


def combination_mismatch(labels: Sequence[str], summaries: Sequence[dict]) -> str | None:
    """A sentence naming the runs whose combination sets differ and the combinations each lacks, or None."""
    sets = [set(s["per_combination"]) for s in summaries]
    union = set().union(*sets)
    if all(found == union for found in sets):
        return None
    order = {mods.combination_name(c): i for i, c in enumerate(mods.all_combinations())}
    lacking = [f"{label} lacks {', '.join(sorted(union - found, key=lambda n: order.get(n, len(order))))}"
               for label, found in zip(labels, sets, strict=True) if found != union]
    return (f"the runs were evaluated on different modality combinations ({'; '.join(lacking)}), so their "
            f"averages are over different sets and not directly comparable")


def _metric_keys() -> list[str]:
    return [f"{region}_{metric}" for region in mods.REGIONS for metric in METRICS]


def run_statistics(values: Sequence[float]) -> dict:
    """Mean, standard deviation (n - 1 in the denominator) and the half-width of the 95% interval of the mean.

    The interval is Student's t: ``mean ± t(0.975, n - 1) * sd / sqrt(n)``, the right one for a handful of
    training runs whose spread is estimated from the runs themselves. ``sd`` and ``ci95`` are None for one run.
    """
    from scipy.stats import t as student_t

    values = np.asarray(values, dtype=float)
    n = len(values)
    if n == 0:
        raise ValueError("no values to aggregate")
    mean = float(values.mean())
    if n == 1:
        return {"mean": mean, "sd": None, "ci95": None, "n": 1}
    sd = float(values.std(ddof=1))
    return {"mean": mean, "sd": sd, "ci95": float(student_t.ppf(0.975, n - 1) * sd / np.sqrt(n)), "n": n}


def aggregate_summaries(summaries: Sequence[dict]) -> dict:
    """Statistics over runs (e.g. seeds) of ``evaluate-missing`` summaries.

    Every region/metric of every combination, and of the average over combinations (each run's own
    ``average``), gets :func:`run_statistics` over the runs.

    Returns:
        ``{"num_runs": n, "per_combination": {name: {key: stats}}, "average": {key: stats}}``.

    Raises:
        ValueError: no summary, or the runs were evaluated on different sets of combinations (repeats of one
            experiment must be; their averages would otherwise be over different things).
    """
    if not summaries:
        raise ValueError("no runs to aggregate")
    names = list(summaries[0]["per_combination"])
    for summary in summaries[1:]:
        if set(summary["per_combination"]) != set(names):
            raise ValueError(f"runs of one group were evaluated on different combinations: "
                             f"{sorted(names)} and {sorted(summary['per_combination'])}")
    keys = _metric_keys()
    return {"num_runs": len(summaries),
            "per_combination": {name: {k: run_statistics([s["per_combination"][name][k] for s in summaries])
                                       for k in keys} for name in names},
            "average": {k: run_statistics([s["average"][k] for s in summaries]) for k in keys}}


def read_per_case(folder: str | os.PathLike) -> list[dict]:
    """The rows of an evaluation's ``per_case.csv``: ``case`` and ``combination`` as text, every metric a float."""
    with open(Path(folder) / "per_case.csv", newline="") as f:
        return [{k: (v if k in ("case", "combination") else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def read_summary(run: str | os.PathLike) -> dict:
    file = Path(run) / "summary.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; pass folders written by evaluate-missing")
    return json.loads(file.read_text())


def _cell(stats: dict, scale: float, with_sd: bool) -> str:
    if not with_sd:
        return f"{scale * stats['mean']:.2f}"
    sd = "–" if stats["sd"] is None else f"{scale * stats['sd']:.2f}"
    return f"{scale * stats['mean']:.2f} ± {sd}"


def compare(run_dirs: Sequence[str | os.PathLike | Sequence[str | os.PathLike]], output: str | os.PathLike,
            labels: Sequence[str | None] | None = None) -> tuple[Path, Path]:
    """Side-by-side Markdown table and grouped bar chart of several ``evaluate-missing`` outputs.

    Each entry of ``run_dirs`` is one folder, or a group of folders: repeated runs of one experiment (e.g.
    training seeds), shown as mean ± standard deviation over the runs in the table and as bars with error
    bars (± sd) in the chart. With only single folders the output is as before (means only).
    ``comparison.json`` holds :func:`aggregate_summaries` of every entry (with 95% intervals).

    Runs evaluated on different sets of combinations average over different things: a
    :class:`CombinationMismatchWarning` names the runs and the combinations each lacks, and the
    Markdown marks every row with its number of combinations and repeats the warning below the table.

    Args:
        run_dirs: folders written by evaluate-missing, or lists of such folders (one group each).
        output: folder for ``comparison.md``, ``comparison.png`` and ``comparison.json``.
        labels: one per entry (None: the trainer name read from the first run's summary).

    Returns:
        The Markdown file and the PNG.

    Raises:
        FileNotFoundError: a folder without ``summary.json``.
        ValueError: as many labels as entries are needed; the runs of one group must share their combinations.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [[run] if isinstance(run, (str, os.PathLike)) else list(run) for run in run_dirs]
    if any(not group for group in groups):
        raise ValueError("a group of runs is empty")
    summaries = [[read_summary(run) for run in group] for group in groups]
    labels = list(labels) if labels else [None] * len(groups)
    if len(labels) != len(groups):
        raise ValueError(f"{len(labels)} labels for {len(groups)} runs")
    labels = [label or Path(group[0]["model"]).name.split("__")[0] for label, group in zip(labels, summaries,
                                                                                              strict=True)]
    aggregates = [aggregate_summaries(group) for group in summaries]
    with_sd = any(len(group) > 1 for group in groups)
    mismatch = combination_mismatch(labels, [group[0] for group in summaries])
    if mismatch:
        warnings.warn(mismatch, CombinationMismatchWarning, stacklevel=2)
    regions = list(mods.REGIONS)
    header = "| run | " + " | ".join(f"{r} Dice" for r in regions) + " | " + " | ".join(f"{r} HD95" for r in regions)
    lines = [header + " |", "|---|" + "---|" * (2 * len(regions))]
    every = set().union(*(a["per_combination"] for a in aggregates))
    for label, aggregate in zip(labels, aggregates, strict=True):
        average = aggregate["average"]
        dice = " | ".join(_cell(average[f"{r}_Dice"], 100.0, with_sd) for r in regions)
        hd = " | ".join(_cell(average[f"{r}_HD95"], 1.0, with_sd) for r in regions)
        count = aggregate["num_runs"]
        runs = f" ({count} run{'' if count == 1 else 's'})" if with_sd else ""
        marker = f" † ({len(aggregate['per_combination'])} of {len(every)} combinations)" if mismatch else ""
        lines.append(f"| {label}{runs}{marker} | {dice} | {hd} |")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "comparison.md"
    note = f"\n† **Warning:** {mismatch}\n" if mismatch else ""
    spread = ", mean ± sd over runs" if with_sd else ""
    markdown.write_text(f"Average over the modality combinations (Dice in %, HD95 in mm{spread})\n\n"
                        + "\n".join(lines) + "\n" + note)
    (out / "comparison.json").write_text(json.dumps(
        {label: {"runs": [str(r) for r in group], **aggregate}
         for label, group, aggregate in zip(labels, groups, aggregates, strict=True)}, indent=2))
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(regions), 3.6))
    width = 0.8 / len(groups)
    for k, (label, aggregate) in enumerate(zip(labels, aggregates, strict=True)):
        stats = [aggregate["average"][f"{r}_Dice"] for r in regions]
        errors = [s["sd"] or 0.0 for s in stats] if aggregate["num_runs"] > 1 else None
        bars = ax.bar(np.arange(len(regions)) + (k - (len(groups) - 1) / 2) * width, [s["mean"] for s in stats],
                      width, yerr=errors, capsize=3 if errors else 0, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(regions)), regions)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean Dice over modality combinations")
    if with_sd:
        ax.set_title("mean over runs, error bars ± sd", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = out / "comparison.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return markdown, png
