"""The BraTS post-processing of the enhancing tumour, in nnU-Net's ``postprocessing.pkl`` format.

BraTS scores enhancing tumour (ET) Dice 1 on a case without ET only when the prediction has none, and 0 for any
false voxel. nnU-Net's BraTS entries (Isensee et al., BraTS 2018 and 2020) therefore relabel a predicted ET smaller
than a volume threshold as non-enhancing tumour core (necrosis), with the threshold chosen on cross-validation
predictions. Tumour core and whole tumour are unchanged by it.

:func:`determine_postprocessing` chooses the threshold on an ``evaluate-missing --split val --save-predictions``
output, so on every modality combination of the fold's validation cases: of nnU-Net's candidates
(:data:`NNUNET_BRATS_THRESHOLDS`, those of its BraTS 2020 entry) the one with the highest mean ET Dice over all
(case, combination) predictions, the smallest of a tie, as nnU-Net's ``determine_brats_postprocessing`` (nnU-Net v1,
``Task082_BraTS_2020``) chooses it; the coarse grid keeps the choice from fitting the few validation cases' volumes.
It writes

* ``postprocessing.pkl``: ``(functions, kwargs)`` as nnU-Net's ``determine_postprocessing`` writes it, so that
  ``nnUNetv2_apply_postprocessing -pp_pkl_file`` applies it to any prediction folder, ``predict --postprocessing``
  while predicting, and ``evaluate-missing --postprocessing`` scores a model with it (an empty list when no
  threshold helps);
* ``postprocessing.json``: the threshold and the mean ET Dice before and after, overall and per combination;
* ``postprocessing.png``: the mean ET Dice of the validation predictions against every threshold, the candidates
  marked.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.evaluation.metrics import dice
from nnunet_missingmod.evaluation.missing_combinations import dataset_folders, read_summary
from nnunet_missingmod.inference.predict import model_file_ending

#: The volume thresholds (voxels) that nnU-Net's BraTS 2020 entry tried.
NNUNET_BRATS_THRESHOLDS = (0, 10, 50, 100, 200, 500, 750, 1000, 1500, 2500, 10000)


def relabel_small_label(segmentation: np.ndarray, label: int, replace_with: int, min_voxels: int) -> np.ndarray:
    """``segmentation`` with every voxel of ``label`` set to ``replace_with`` when there are fewer than
    ``min_voxels`` of them (a new array; the input is left as it is).

    A post-processing function for nnU-Net's ``apply_postprocessing``, which calls ``fn(segmentation, **kwargs)``.
    """
    mask = segmentation == label
    if not 0 < int(mask.sum()) < min_voxels:
        return segmentation
    relabelled = segmentation.copy()
    relabelled[mask] = replace_with
    return relabelled


@dataclass(frozen=True)
class Prediction:
    """One saved prediction of one case with one modality combination, as the threshold search needs it."""
    case: str
    combination: str
    volume: int  # predicted voxels of the label
    reference_volume: int
    dice: float  # of the label, as predicted

    def dice_after(self, threshold: int) -> float:
        """The label's Dice once a predicted volume below ``threshold`` is relabelled (BraTS: 1 if both empty)."""
        if self.volume < threshold:
            return 1.0 if self.reference_volume == 0 else 0.0
        return self.dice


def mean_dice(predictions: Sequence[Prediction], threshold: int) -> float:
    """Mean Dice of the label over ``predictions`` once a predicted volume below ``threshold`` is relabelled."""
    return float(np.mean([p.dice_after(threshold) for p in predictions]))


def threshold_curve(predictions: Sequence[Prediction]) -> tuple[list[int], list[float]]:
    """Every threshold that changes the outcome (0, and each predicted volume + 1) with its mean Dice."""
    thresholds = sorted({0} | {p.volume + 1 for p in predictions if p.volume})
    return thresholds, [mean_dice(predictions, t) for t in thresholds]


def checked_candidates(candidates: Sequence[int]) -> list[int]:
    """``candidates`` sorted, without repeats.

    Raises:
        ValueError: none, or one that is not a whole number of voxels, 0 or more.
    """
    candidates = sorted(set(candidates))
    if not candidates or any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0
                             for t in candidates):
        raise ValueError(f"thresholds must be whole numbers of voxels, 0 or more, got {list(candidates)}")
    return candidates


def choose_threshold(predictions: Sequence[Prediction], candidates: Sequence[int] = NNUNET_BRATS_THRESHOLDS) -> int:
    """The candidate threshold with the highest mean Dice over ``predictions``; the smallest of a tie."""
    if not predictions:
        raise ValueError("no predictions to choose a threshold on")
    candidates = checked_candidates(candidates)
    scores = [mean_dice(predictions, t) for t in candidates]
    return int(candidates[int(np.argmax(scores))])  # argmax returns the first (smallest) of equal maxima


def prediction_files(folder: Path) -> list[Path]:
    """The segmentations saved by ``evaluate-missing --save-predictions`` in ``folder`` (or in its parts)."""
    roots = [folder / "predictions", *sorted(folder.glob("part_*_of_*/predictions"))]
    return sorted(f for root in roots if root.is_dir() for f in root.glob("*/*") if f.is_file())


def read_predictions(folder: Path, label_folder: Path, reader, file_ending: str, label: int) -> list[Prediction]:
    """:class:`Prediction` of every saved segmentation in ``folder`` against its reference in ``label_folder``.

    Raises:
        FileNotFoundError: no saved prediction, or a case without a reference label (named).
        ValueError: a prediction whose shape differs from its reference (named).
    """
    files = [f for f in prediction_files(folder) if f.name.endswith(file_ending)]
    if not files:
        raise FileNotFoundError(f"{folder} holds no predictions/<combination>/*{file_ending}: run evaluate-missing "
                                f"with --save-predictions (and --split val) first")
    references: dict[str, np.ndarray] = {}
    predictions = []
    for file in files:
        case = file.name[: -len(file_ending)]
        if case not in references:
            reference_file = label_folder / file.name
            if not reference_file.is_file():
                raise FileNotFoundError(f"no reference label for case {case}: {reference_file} does not exist")
            references[case] = reader.read_seg(str(reference_file))[0][0] == label
        reference = references[case]
        predicted = reader.read_seg(str(file))[0][0] == label
        if predicted.shape != reference.shape:
            raise ValueError(f"{file} has shape {predicted.shape}, its reference {label_folder / file.name} "
                             f"{reference.shape}")
        predictions.append(Prediction(case, file.parent.name, int(predicted.sum()), int(reference.sum()),
                                      dice(reference, predicted)))
    return predictions


def determine_postprocessing(folder: str | os.PathLike, label_folder: str | os.PathLike | None = None, *,
                             label: int = mods.LABEL_ENHANCING, replace_with: int = mods.LABEL_NECROSIS,
                             candidates: Sequence[int] = NNUNET_BRATS_THRESHOLDS) -> dict:
    """Choose the volume threshold of ``label`` among ``candidates`` on the saved predictions of an evaluate-missing
    output ``folder`` and write ``postprocessing.pkl``, ``.json`` and ``.png`` into it, all three or none (see the
    module docstring).

    ``label_folder`` defaults to ``labelsTr`` of the evaluated model's raw dataset (``$nnUNet_raw``).

    Returns:
        The content of ``postprocessing.json``.

    Raises:
        FileNotFoundError: ``folder`` is not an evaluate-missing output, has no saved predictions, or a case has
            no reference label.
        ValueError: the evaluation scored the test cases (a threshold must not be chosen on them), a prediction
            does not match its reference, or a candidate is not a whole number of voxels.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(folder)
    candidates = checked_candidates(candidates)  # before any file is read
    summary = read_summary(folder)
    if summary.get("split") == "test":
        raise ValueError(f"{folder} scored the test cases; choose the threshold on the validation cases "
                         f"(evaluate-missing --split val --save-predictions) and keep the test cases for scoring it")
    if summary.get("postprocessing"):
        raise ValueError(f"{folder} was evaluated with post-processing already ({summary['postprocessing']['file']});"
                         f" choose the threshold on an evaluation without --postprocessing")
    model = Path(summary["model"])
    if not (model / "plans.json").is_file():
        raise FileNotFoundError(f"{folder}/summary.json names the model {model}, which has no plans.json")
    file_ending = model_file_ending(model)
    label_folder = Path(label_folder) if label_folder else dataset_folders(model)[0] / "labelsTr"
    reader = PlansManager(str(model / "plans.json")).image_reader_writer_class()
    predictions = read_predictions(folder, label_folder, reader, file_ending, label)
    threshold = choose_threshold(predictions, candidates)
    thresholds, scores = threshold_curve(predictions)
    per_combination = {}
    names = {p.combination for p in predictions}
    order = [mods.combination_name(c) for c in mods.all_combinations()]
    for combination in [n for n in order if n in names] + sorted(names - set(order)):
        rows = [p for p in predictions if p.combination == combination]
        per_combination[combination] = {"before": mean_dice(rows, 0), "after": mean_dice(rows, threshold)}
    relabelled = [p for p in predictions if 0 < p.volume < threshold]
    result = {
        "function": relabel_small_label.__name__, "label": label, "replace_with": replace_with,
        "min_voxels": threshold, "applied": threshold > 0,
        "chosen_on": {"folder": str(folder), "labels": str(label_folder), "model": str(model),
                      "fold": summary.get("fold"), "cases": len({p.case for p in predictions}),
                      "predictions": len(predictions)},
        "candidates": {str(t): mean_dice(predictions, t) for t in candidates},
        "dice_before": mean_dice(predictions, 0), "dice_after": mean_dice(predictions, threshold),
        "relabelled": {"without_label_in_reference": sum(p.reference_volume == 0 for p in relabelled),
                       "with_label_in_reference": sum(p.reference_volume > 0 for p in relabelled)},
        "per_combination": per_combination,
        "curve": {"min_voxels": thresholds, "dice": scores},
    }
    functions, kwargs = ([relabel_small_label], [{"label": label, "replace_with": replace_with,
                                                  "min_voxels": threshold}]) if threshold > 0 else ([], [])
    # all three staged, then renamed: a failure while writing leaves the previous files (or none) and no partial one
    staged = {"postprocessing.png": folder / "postprocessing.partial.png",
              "postprocessing.pkl": folder / "postprocessing.pkl.partial",
              "postprocessing.json": folder / "postprocessing.json.partial"}
    try:
        curve_png(result, predictions, staged["postprocessing.png"])
        staged["postprocessing.pkl"].write_bytes(pickle.dumps((functions, kwargs)))
        staged["postprocessing.json"].write_text(json.dumps(result, indent=2))
        for name, temporary in staged.items():
            os.replace(temporary, folder / name)
    finally:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)
    return result


def curve_png(result: dict, predictions: Sequence[Prediction], png: Path) -> None:
    """Mean Dice against the threshold: all predictions, those with the label in the reference, and the share of
    those without it left empty; the chosen threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = result["curve"]["min_voxels"]
    with_label = [p for p in predictions if p.reference_volume > 0]
    without = [p for p in predictions if p.reference_volume == 0]
    fig, ax = plt.subplots(figsize=(7, 4.6))
    ax.step(thresholds, result["curve"]["dice"], where="post", label=f"mean Dice, all {len(predictions)}")
    if with_label:
        ax.step(thresholds, [np.mean([p.dice_after(t) for p in with_label]) for t in thresholds], where="post",
                linestyle="--", label=f"mean Dice, {len(with_label)} with the label in the reference")
    if without:
        ax.step(thresholds, [np.mean([p.dice_after(t) for p in without]) for t in thresholds], where="post",
                linestyle=":", label=f"left empty, {len(without)} without it")
    shown = [int(t) for t in result["candidates"] if int(t) <= thresholds[-1]]
    ax.plot(shown, [result["candidates"][str(t)] for t in shown], "o", color="C0", markersize=4,
            label="candidates")
    ax.axvline(result["min_voxels"], color="black", linewidth=0.8)
    ax.set_xlabel(f"threshold: label {result['label']} below this many voxels becomes {result['replace_with']}")
    ax.set_ylabel("Dice / share")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"chosen: {result['min_voxels']} voxels (mean Dice {result['dice_before']:.3f} -> "
                 f"{result['dice_after']:.3f})", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def load_postprocessing(file: str | os.PathLike) -> tuple[list[Callable], list[dict]]:
    """``(functions, kwargs)`` of a ``postprocessing.pkl`` (nnU-Net's or :func:`determine_postprocessing`'s).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a pickle of two lists of equal length, callables and keyword dicts.
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"post-processing file {file} does not exist")
    try:
        content = pickle.loads(file.read_bytes())
    except Exception as error:  # noqa: BLE001 - unpickling raises many kinds; all mean the same to the user
        raise ValueError(f"{file} is not a post-processing pickle: {type(error).__name__}: {error}") from None
    if not (isinstance(content, (tuple, list)) and len(content) == 2 and all(isinstance(c, list) for c in content)
            and len(content[0]) == len(content[1])):
        raise ValueError(f"{file} must hold (functions, kwargs): two lists of equal length, as nnU-Net's "
                         f"postprocessing.pkl")
    functions, kwargs = content
    if not all(callable(f) for f in functions) or not all(isinstance(k, dict) for k in kwargs):
        raise ValueError(f"{file}: the first list must hold functions and the second keyword dicts")
    return functions, kwargs
