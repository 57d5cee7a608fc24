"""Image quality of synthesised sequences against the real ones (``evaluate-synthesis``), with two baselines.

Method evaluated: the UTAD-Net student (Huang, Wei, Li, "Unsupervised Tumor-Aware Distillation for Multi-Modal
Brain Image Translation"), used through :mod:`nnunet_missingmod.inference.synthesize`. On every case, each
acquired sequence in turn is hidden (set to zero before nnU-Net's preprocessing) and synthesised from each other
acquired sequence (one row per source -> target pair, as the paper's Table I reports), and, with ``combined``, from
all of them together (source ``all``, the rule of ``synthesize``; with its histogram fallback, the ``synthesis``
rows of the pairs listed in ``summary.json``'s ``histogram_fallback`` are histogram matching to the model's
training histogram, not the generator). Compared in the input geometry, per case:

* ``ssim_brain``, ``psnr_brain`` (the paper's SSIM and PSNR): each image is scaled to [0, 1] by its own 0.5 and
  99.5 percentiles in the brain (values clipped; the brain is the union of the case's acquired sequences'
  non-zero voxels); SSIM is the mean of scikit-image's SSIM map over the brain, PSNR is
  ``10 log10(1 / MSE)`` over the brain voxels (data range 1).
* ``ssim_wt_bbox``, ``psnr_wt_bbox`` (the paper's local metrics): the same scaled images cropped to the whole
  tumour's bounding box (labels of ``modalities.REGIONS['WT']``), widened where needed to the SSIM window
  (11 voxels per axis, centred, inside the image); SSIM is the mean of the map over the box, PSNR over its voxels.
  NaN for a case without tumour (left out of the means, whose counts are reported).
* ``brasyn_ssim_tumour``, ``brasyn_ssim_non_tumour`` (the BraSyn challenge's protocol): each image clipped to its
  own 0.5 and 99.5 percentiles over the whole volume (a negative lower bound raised to 0) and scaled to [0, 1];
  the SSIM map of the two images multiplied by the tumour mask is averaged over the tumour, and that of the two
  images multiplied by its complement over every voxel outside the tumour (background included), as the
  challenge's evaluation code intends.

Every SSIM is scikit-image's ``structural_similarity`` in 3D with Wang et al.'s Gaussian window (sigma 1.5,
11 voxels, population covariances, K1 0.01, K2 0.03, data range 1): the setting of the BraSyn code's
torchmetrics SSIM. PSNR is scikit-image's ``peak_signal_noise_ratio``.

Baselines, scored the same way in the same run:

* ``zero_fill``: the missing sequence left at zero (what segmentation models see without synthesis).
* ``histogram_matching``: the source sequence with its brain histogram matched
  (``skimage.exposure.match_histograms``) to the target sequence's histogram pooled from the *other* evaluated
  cases (a random sample of their brain voxels, numpy's generator seeded with 0, each case's sample z-scored with
  the mean and standard deviation of its brain, so that cases scanned at other gains do not smear the pooled
  histogram), then put back on the source's intensity scale (its brain mean + sd x the matched z-scores); the
  hidden image is never used. With a single evaluated case there is no other case: the case's own target is used
  and ``summary.json`` says ``"histogram_reference": "oracle"``. For the ``all`` rows the baseline is the most
  similar acquired sequence: per target, the source whose histogram-matched copies scored the highest mean
  ``ssim_brain`` over the evaluated cases (a choice made on the evaluation data, so it favours the baseline).

Outputs: ``per_case.csv`` (one row per case, pair and method), ``summary.json`` (means per pair and method, and
their average over the single-source pairs), ``table.md`` and ``examples.png`` (source, synthesis, histogram
matching and real target on the slice with the most tumour, for a few cases and pairs).

Deviations from the paper: metrics on 3D volumes in the input geometry (the paper: 2D slices resized to
128 x 128); percentile scaling per image (the paper does not say how it scales); LPIPS is not computed (it needs
a pretrained 2D network for natural images).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.data.nifti import InputImageError, check_image_file, geometry_mismatch, read_geometry
from nnunet_missingmod.data.raw_dataset import AVAILABILITY_FILE
from nnunet_missingmod.inference.predict import check_output_folder, check_writable
from nnunet_missingmod.inference.synthesize import (
    COMBINE_RULES,
    SynthesisCase,
    SynthesisModel,
    check_model_folder,
    check_synthesis_case,
    find_synthesis_cases,
    histogram_matched,
    load_synthesis_model,
)

METHODS = ("synthesis", "histogram_matching", "zero_fill")
METRICS = ("ssim_brain", "psnr_brain", "ssim_wt_bbox", "psnr_wt_bbox", "brasyn_ssim_tumour", "brasyn_ssim_non_tumour")
#: Gaussian SSIM window of Wang et al. (2004): sigma 1.5, truncated at 3.5 sigma -> 11 voxels.
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
PERCENTILES = (0.5, 99.5)
#: Brain voxels sampled per case for the pooled histogram of the matching baseline.
HISTOGRAM_SAMPLE = 200_000
ALL_SOURCES = "all"


# ---------------------------------------------------------------------------------------------- metrics


def scale_to_unit(image: np.ndarray, region: np.ndarray, percentiles: tuple[float, float] = PERCENTILES
                  ) -> np.ndarray:
    """``image`` clipped to its percentiles within ``region``, scaled to [0, 1]; 0 outside the region.

    A constant image in the region (e.g. all zero) gives zeros.
    """
    output = np.zeros(image.shape, dtype=np.float64)
    if not region.any():
        return output
    values = image[region].astype(np.float64)
    low, high = np.percentile(values, percentiles)
    if high > low:
        output[region] = (np.clip(values, low, high) - low) / (high - low)
    return output


def ssim_map(reference: np.ndarray, image: np.ndarray) -> np.ndarray:
    """scikit-image's SSIM map (Gaussian window, sigma 1.5, data range 1) of two images in [0, 1].

    Raises:
        ValueError: an image smaller than the 11-voxel window along an axis.
    """
    from skimage.metrics import structural_similarity

    if min(reference.shape) < SSIM_WINDOW:
        raise ValueError(f"image of shape {reference.shape} is smaller than the SSIM window ({SSIM_WINDOW} voxels "
                         f"per axis)")
    _, full = structural_similarity(reference, image, data_range=1.0, gaussian_weights=True, sigma=SSIM_SIGMA,
                                    use_sample_covariance=False, full=True)
    return full


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """scikit-image's PSNR with data range 1 (``inf`` for identical images)."""
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(reference, image):
        return math.inf
    return float(peak_signal_noise_ratio(reference, image, data_range=1.0))


def bounding_box(mask: np.ndarray, min_size: int = SSIM_WINDOW) -> tuple[slice, ...] | None:
    """Slices of the bounding box of ``mask``, each axis widened (centred, inside the image) to ``min_size``.

    Returns:
        None for an empty mask.
    """
    if not mask.any():
        return None
    box = []
    for axis, size in enumerate(mask.shape):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        indices = np.flatnonzero(mask.any(axis=other))
        start, stop = int(indices[0]), int(indices[-1]) + 1
        if stop - start < min_size:
            start = max(0, min(start - (min_size - (stop - start)) // 2, size - min_size))
            stop = min(size, start + min_size)
        box.append(slice(start, stop))
    return tuple(box)


def brasyn_percentile_clip(image: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """BraSyn's normalisation: percentiles over the whole volume, lower bound at least 0, clip, scale to [0, 1]."""
    low, high = np.percentile(image.astype(np.float64), percentiles)
    low = max(low, 0.0)
    if high <= low:
        return np.zeros(image.shape, dtype=np.float64)
    return (np.clip(image.astype(np.float64), low, high) - low) / (high - low)


def _grown_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of a non-empty ``mask`` grown by ``margin`` per side (inside the image), at least the window."""
    box = []
    for axis, size in enumerate(mask.shape):
        indices = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        start, stop = max(0, int(indices[0]) - margin), min(size, int(indices[-1]) + 1 + margin)
        if stop - start < SSIM_WINDOW:
            start = max(0, min(start, size - SSIM_WINDOW))
            stop = min(size, start + SSIM_WINDOW)
        box.append(slice(start, stop))
    return tuple(box)


def _brasyn_bounds(image: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(image, PERCENTILES)
    return max(float(low), 0.0), float(high)


def _brasyn_scale(image: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(image.shape, dtype=np.float32)
    return ((np.clip(image.astype(np.float64), low, high) - low) / (high - low)).astype(np.float32)


def image_metrics(real: np.ndarray, synthetic: np.ndarray, brain: np.ndarray, tumour: np.ndarray) -> dict[str, float]:
    """The six metrics of the module docstring for one synthesised volume against the real one.

    Both images must be 0 outside ``brain`` (as the real sequences and every synthesised or baseline image are).
    For speed the SSIM maps are computed on the brain's bounding box grown by the Gaussian window's radius, and
    in float32: every map value in the brain or the tumour is the same as on the whole volume, and outside the
    grown box both images are 0 in the whole window, where SSIM is exactly 1 (``C1 C2 / (C1 C2)``), which is what
    the BraSyn non-tumour mean counts there.
    """
    box = _grown_box(brain | tumour, (SSIM_WINDOW - 1) // 2)
    r, s, b, t = real[box], synthetic[box], brain[box], tumour[box]
    outside = real.size - r.size  # voxels outside the box: zero in both images, SSIM 1
    real_unit = scale_to_unit(r, b).astype(np.float32)
    synthetic_unit = scale_to_unit(s, b).astype(np.float32)
    metrics = {"ssim_brain": float(ssim_map(real_unit, synthetic_unit)[b].mean(dtype=np.float64)),
               "psnr_brain": psnr(real_unit[b].astype(np.float64), synthetic_unit[b].astype(np.float64))}
    local = bounding_box(t)
    if local is None:
        metrics.update(ssim_wt_bbox=math.nan, psnr_wt_bbox=math.nan)
    else:
        metrics.update(ssim_wt_bbox=float(ssim_map(real_unit[local], synthetic_unit[local]).mean(dtype=np.float64)),
                       psnr_wt_bbox=psnr(real_unit[local].astype(np.float64),
                                         synthetic_unit[local].astype(np.float64)))
    real_b = _brasyn_scale(r, *_brasyn_bounds(real))  # percentiles over the whole volumes
    synthetic_b = _brasyn_scale(s, *_brasyn_bounds(synthetic))
    inside = t.astype(np.float32)
    metrics["brasyn_ssim_tumour"] = (float(ssim_map(real_b * inside, synthetic_b * inside)[t].mean(dtype=np.float64))
                                     if t.any() else math.nan)
    complement = 1.0 - inside
    non_tumour = ssim_map(real_b * complement, synthetic_b * complement)[~t].astype(np.float64)
    metrics["brasyn_ssim_non_tumour"] = float((non_tumour.sum() + outside) / (non_tumour.size + outside))
    return metrics


# ---------------------------------------------------------------------------------------------- evaluation


def _labels_folder(images: Path) -> Path:
    if images.name.startswith("images"):
        return images.parent / ("labels" + images.name[len("images"):])
    raise FileNotFoundError(f"cannot tell the label folder of {images}; pass it with -l")


def _brain_z_scores(values: np.ndarray, brain_values: np.ndarray) -> np.ndarray:
    """``values`` as z-scores of the brain (``brain_values``' mean and standard deviation; 0 for a flat brain)."""
    mean, sd = float(np.mean(brain_values, dtype=np.float64)), float(np.std(brain_values, dtype=np.float64))
    return ((values - mean) / sd if sd > 0 else np.zeros_like(values)).astype(np.float32)


def _brain_sample(image: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded sample of the brain voxels of ``image``, z-scored with the whole brain's mean and sd."""
    brain_values = image[brain]
    values = brain_values
    if values.size > HISTOGRAM_SAMPLE:
        values = rng.choice(values, HISTOGRAM_SAMPLE, replace=False)
    return _brain_z_scores(values, brain_values)


def _matching_baseline(source: np.ndarray, brain: np.ndarray, reference_z: np.ndarray) -> np.ndarray:
    """The ``histogram_matching`` baseline: ``source``'s brain voxels given the histogram of the z-scores
    ``reference_z``, on the source's scale (its brain mean + sd x the matched z-scores); 0 outside the brain."""
    matched = histogram_matched(source, brain, reference_z)
    if brain.any():
        values = source[brain].astype(np.float64)
        matched[brain] = (values.mean() + values.std() * matched[brain]).astype(np.float32)
    return matched


def _pair(source: int | str, target: int) -> str:
    name = source if isinstance(source, str) else mods.MODALITIES[source]
    return f"{name}->{mods.MODALITIES[target]}"


def evaluate_synthesis(images: str | os.PathLike, model: str | os.PathLike | SynthesisModel,
                       output: str | os.PathLike, *, labels: str | os.PathLike | None = None,
                       folds: Sequence[int | str] | None = None, checkpoint_name: str = "checkpoint_final.pth",
                       device: str = "cpu", available: Sequence[int] | None = None,
                       availability_file: str | os.PathLike | None = None, num_cases: int | None = None,
                       combine: str = "ssim", combined: bool = True, batch_size: int = 16, examples: int = 4,
                       progress: bool = True, histogram_fallback: bool = False) -> Path:
    """Score synthesis against the hidden real sequences and both baselines (see the module docstring).

    Args:
        images: folder of ``<case>_XXXX`` files (e.g. a raw dataset's ``imagesTs``).
        model: synthesis model folder, or a :class:`SynthesisModel`.
        output: folder for the results (created; files in it are replaced).
        labels: folder of ``<case>`` label files (default: ``labelsXx`` beside ``imagesXx``).
        folds, checkpoint_name, device, combine, batch_size, histogram_fallback: as for ``synthesize`` (with the
            fallback, ``synthesis`` rows of its pairs are histogram matching to the model's training histogram).
        available, availability_file: which sequences each case has, as for ``synthesize``.
        num_cases: evaluate only the first N usable cases (sorted by name).
        combined: also synthesise each target from all other acquired sequences together (source ``all``).
        examples: number of example rows in ``examples.png`` (0: no figure).
        progress: progress bar.

    Returns:
        The output folder.

    Raises:
        FileNotFoundError: no label folder or label file, or a model file is missing.
        InputImageError: a case cannot be used (the message names the case and the file).
        ValueError: no case has two acquired sequences, invalid options, or the output inside the input.
    """
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine rule must be one of {', '.join(COMBINE_RULES)}, got {combine!r}")
    if num_cases is not None and num_cases < 1:
        raise ValueError(f"the number of cases must be at least 1, got {num_cases}")
    images, output = Path(images), Path(output)
    if not images.is_dir():
        what = "does not exist" if not images.exists() else "is a file, not a folder"
        raise InputImageError(f"input {images} {what}; expected a folder of <case>_XXXX files")
    label_folder = Path(labels) if labels else _labels_folder(images)
    if not label_folder.is_dir():
        raise FileNotFoundError(f"label folder {label_folder} not found; the tumour regions need the labels "
                                f"(pass -l)")
    check_output_folder(images, output)
    check_writable(output)
    model_json = model.dataset_json if isinstance(model, SynthesisModel) else check_model_folder(
        model, folds, checkpoint_name)
    file_ending = model_json.get("file_ending", ".nii.gz")
    if availability_file is None and (images.parent / AVAILABILITY_FILE).is_file():
        availability_file = images.parent / AVAILABILITY_FILE
    cases = find_synthesis_cases(images, file_ending, available, availability_file)
    usable = [c for c in cases if len(c.acquired) >= 2]
    if not usable:
        raise ValueError(f"no case in {images} has two acquired sequences; evaluating synthesis needs a source and "
                         f"a real target")
    usable = sorted(usable, key=lambda c: c.identifier)[:num_cases]
    for case in usable:
        check_synthesis_case(case)
        label = label_folder / f"{case.identifier}{file_ending}"
        if not label.is_file():
            raise FileNotFoundError(f"case {case.identifier}: no label file {label}")
        check_image_file(label, case.identifier)
        reference = case.files[case.acquired[0]]
        problem = geometry_mismatch(read_geometry(reference), read_geometry(label))
        if problem:
            raise InputImageError(f"case {case.identifier}: {label} and {reference.name} differ in {problem}")
    synthesis_model = model if isinstance(model, SynthesisModel) else load_synthesis_model(
        model, folds, checkpoint_name, device, histogram_fallback=histogram_fallback)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    try:
        _evaluate(synthesis_model, images, usable, cases, label_folder, file_ending, output, combine, combined,
                  batch_size, examples, checkpoint_name, progress)
    except BaseException:
        if created:  # a folder this call made holds nothing usable
            shutil.rmtree(output, ignore_errors=True)
        raise
    return output


def _evaluate(synthesis_model: SynthesisModel, images: Path, usable: Sequence[SynthesisCase],
              cases: Sequence[SynthesisCase], label_folder: Path, file_ending: str, output: Path, combine: str,
              combined: bool, batch_size: int, examples: int, checkpoint_name: str, progress: bool) -> None:
    samples = _histogram_samples(synthesis_model, usable, progress)
    rows, example_images = [], []
    bar = tqdm(usable, desc="evaluating synthesis", unit="case", disable=not progress)
    for case in bar:
        image, properties = synthesis_model.read_case(case.files, case.acquired, case.identifier)
        label, _ = synthesis_model.reader.read_seg(str(label_folder / f"{case.identifier}{file_ending}"))
        tumour = np.isin(label[0], mods.REGIONS["WT"])
        brain = np.any(image[list(case.acquired)] != 0, axis=0)
        for target in case.acquired:
            sources = [s for s in case.acquired if s != target]
            rows += _score_target(synthesis_model, case, image, properties, brain, tumour, target, sources, samples,
                                  combine, combined, batch_size, example_images, examples)
    bar.close()
    rows += _combined_histogram_rows(rows)
    reference = "leave-one-out pool of z-scores" if len(usable) > 1 else "oracle"
    summary = summarise(rows)
    skipped = sorted(c.identifier for c in cases if len(c.acquired) < 2)
    summary.update({"model": str(synthesis_model.folder or "in-memory model"), "images": str(images),
                    "num_cases": len(usable), "skipped_cases": skipped,
                    "combine": combine, "validation_metric": synthesis_model.validation_metric,
                    "histogram_fallback": synthesis_model.fallback_names,
                    "histogram_reference": reference, "checkpoint": checkpoint_name})
    write_outputs(output, rows, summary, example_images)


def _histogram_samples(model: SynthesisModel, cases: Sequence[SynthesisCase],
                       progress: bool) -> dict[str, dict[int, np.ndarray]]:
    """Per case and acquired sequence, a seeded sample of its brain voxels (the matching baseline's pool)."""
    rng = np.random.default_rng(0)
    samples: dict[str, dict[int, np.ndarray]] = {}
    for case in tqdm(cases, desc="histograms", unit="case", disable=not progress, leave=False):
        image, _ = model.read_case(case.files, case.acquired, case.identifier)
        brain = np.any(image[list(case.acquired)] != 0, axis=0)
        samples[case.identifier] = {c: _brain_sample(image[c], brain, rng) for c in case.acquired}
    return samples


def _reference_values(samples: dict[str, dict[int, np.ndarray]], case: str, target: int,
                      own: np.ndarray) -> np.ndarray:
    """The other cases' pooled brain z-scores of ``target``; without another case, ``own`` (the case's own brain
    values of the target, z-scored here: the oracle)."""
    pooled = [values[target] for other, values in samples.items() if other != case and target in values]
    return np.concatenate(pooled) if pooled else _brain_z_scores(own, own)


def _score_target(model: SynthesisModel, case: SynthesisCase, image: np.ndarray, properties: dict,
                  brain: np.ndarray, tumour: np.ndarray, target: int, sources: Sequence[int],
                  samples: dict, combine: str, combined: bool, batch_size: int, example_images: list,
                  examples: int) -> list[dict]:
    """Rows of every method for the pairs ``source -> target`` of one case (and ``all -> target``)."""
    prepared = model.prepare(image, properties, sources)  # the target is hidden from the preprocessing
    real = image[target]
    reference = _reference_values(samples, case.identifier, target, real[brain])
    zero = image_metrics(real, np.zeros_like(real), brain, tumour)
    rows = []
    groups = [[s] for s in sources] + ([list(sources)] if combined and len(sources) > 1 else [])
    for group in groups:
        source = group[0] if len(group) == 1 else ALL_SOURCES
        synthetic, how = model.synthesize_channels(prepared, group, [target], combine, batch_size)[target]
        base = {"case": case.identifier, "source": source if isinstance(source, str) else mods.MODALITIES[source],
                "target": mods.MODALITIES[target]}
        rows.append({**base, "method": "synthesis", **image_metrics(real, synthetic, brain, tumour)})
        rows.append({**base, "method": "zero_fill", **zero})
        if len(group) == 1:
            matched = _matching_baseline(image[group[0]], brain, reference)
            rows.append({**base, "method": "histogram_matching", **image_metrics(real, matched, brain, tumour)})
            if len(example_images) < examples:
                example_images.append(_example(case.identifier, _pair(group[0], target), image[group[0]], synthetic,
                                               matched, real, tumour))
    return rows


def _combined_histogram_rows(rows: list[dict]) -> list[dict]:
    """``all -> target`` rows of the matching baseline: per target, the source with the best mean ``ssim_brain``."""
    single = [r for r in rows if r["method"] == "histogram_matching" and r["source"] != ALL_SOURCES]
    ranking: dict[str, list[str]] = {}
    for target in {r["target"] for r in single}:
        scores = {}
        for source in {r["source"] for r in single if r["target"] == target}:
            values = [r["ssim_brain"] for r in single if r["target"] == target and r["source"] == source]
            scores[source] = float(np.mean(values))
        ranking[target] = sorted(scores, key=lambda s: (-scores[s], mods.MODALITIES.index(s)))
    extra = []
    for row in rows:
        if row["method"] != "synthesis" or row["source"] != ALL_SOURCES:
            continue
        options = {r["source"]: r for r in single if r["case"] == row["case"] and r["target"] == row["target"]}
        best = next(s for s in ranking[row["target"]] if s in options)
        extra.append({**options[best], "source": ALL_SOURCES, "matched_from": best})
    return extra


def _finite_mean(values: Sequence[float]) -> tuple[float | None, int]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return None, 0
    return float(np.mean(finite)), len(finite)


def summarise(rows: Sequence[dict]) -> dict:
    """Means per method and pair (NaN left out, with the number of values), and per method over single pairs."""
    pairs = sorted({(r["source"], r["target"]) for r in rows},
                   key=lambda p: (p[0] == ALL_SOURCES, mods.MODALITIES.index(p[1]),
                                  -1 if p[0] == ALL_SOURCES else mods.MODALITIES.index(p[0])))
    per_pair: dict[str, dict] = {}
    for source, target in pairs:
        name = f"{source}->{target}"
        per_pair[name] = {}
        for method in METHODS:
            selected = [r for r in rows if r["source"] == source and r["target"] == target and r["method"] == method]
            if not selected:
                continue
            entry = {"num_cases": len(selected)}
            for metric in METRICS:
                entry[metric], entry[f"{metric}_n"] = _finite_mean([r[metric] for r in selected])
            per_pair[name][method] = entry
    average = {}
    single = [name for name in per_pair if not name.startswith(f"{ALL_SOURCES}->")]
    for method in METHODS:
        entry = {}
        for metric in METRICS:
            entry[metric], entry[f"{metric}_n"] = _finite_mean(
                [per_pair[n][method][metric] for n in single if method in per_pair[n]])
        average[method] = entry
    combined = {}
    combined_names = [name for name in per_pair if name.startswith(f"{ALL_SOURCES}->")]
    for method in METHODS:
        if combined_names:
            combined[method] = {metric: _finite_mean([per_pair[n][method][metric] for n in combined_names
                                                      if method in per_pair[n]])[0] for metric in METRICS}
    return {"per_pair": per_pair, "average_over_pairs": average, "average_over_targets_all_sources": combined,
            "methods": list(METHODS), "metrics": list(METRICS)}


def _cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_tables(summary: dict) -> str:
    """Three tables (brain; whole-tumour box; BraSyn): SSIM and PSNR per pair for synthesis and both baselines."""
    groups = [("Over the brain", "ssim_brain", "psnr_brain", "SSIM", "PSNR (dB)"),
              ("In the whole-tumour bounding box", "ssim_wt_bbox", "psnr_wt_bbox", "SSIM", "PSNR (dB)"),
              ("BraSyn protocol", "brasyn_ssim_tumour", "brasyn_ssim_non_tumour", "SSIM tumour", "SSIM non-tumour")]
    short = {"synthesis": "synth.", "histogram_matching": "hist.", "zero_fill": "zero"}
    text = []
    for title, first, second, first_name, second_name in groups:
        header = " | ".join(f"{first_name} {short[m]}" for m in METHODS) + " | " + " | ".join(
            f"{second_name} {short[m]}" for m in METHODS)
        lines = [f"### {title}", "", f"| source → target | {header} |", "|---|" + "---|" * (2 * len(METHODS))]
        entries = [(name.replace("->", " → "), values) for name, values in summary["per_pair"].items()]
        entries.append(("**average over pairs**", summary["average_over_pairs"]))
        for name, values in entries:
            cells = [_cell(values.get(m, {}).get(first), 4 if "ssim" in first else 2) for m in METHODS]
            cells += [_cell(values.get(m, {}).get(second), 4 if "ssim" in second else 2) for m in METHODS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        text.append("\n".join(lines))
    return "\n\n".join(text) + "\n"


def _example(case: str, pair: str, source: np.ndarray, synthetic: np.ndarray, matched: np.ndarray, real: np.ndarray,
             tumour: np.ndarray) -> dict:
    """The slice (axis 0 of the reader's order) with the most tumour, else the middle one, of every image."""
    index = int(np.argmax(tumour.reshape(tumour.shape[0], -1).sum(axis=1))) if tumour.any() else tumour.shape[0] // 2
    return {"title": f"{case}: {pair}", "images": [source[index], synthetic[index], matched[index], real[index]]}


def write_examples(examples: Sequence[dict], png: Path) -> None:
    """Grid of examples: source, synthesis, histogram matching, real target (each scaled by its percentiles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ("source", "synthesis", "histogram matching", "real target")
    with plt.style.context("default"):  # independent of styles other code (nnU-Net's plots) left behind
        fig, axes = plt.subplots(len(examples), 4, figsize=(8, 2.2 * len(examples)), squeeze=False)
        for row, example in enumerate(examples):
            for column, (ax, picture) in enumerate(zip(axes[row], example["images"], strict=True)):
                ax.imshow(scale_to_unit(picture, picture != 0), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(columns[column], fontsize=9)
            axes[row][0].set_ylabel(example["title"], fontsize=8)
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)


def write_outputs(output: Path, rows: Sequence[dict], summary: dict, examples: Sequence[dict]) -> None:
    """``per_case.csv``, ``summary.json``, ``table.md`` and (with examples) ``examples.png``."""
    fields = ["case", "source", "target", "method", *METRICS, "matched_from"]
    with open(output / "per_case.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    title = (f"# Synthesis quality: {Path(summary.get('model', 'model')).name}, {summary.get('num_cases', '?')} "
             f"case(s), combine rule {summary.get('combine', '?')}\n\n"
             f"synth.: the model; hist.: the source histogram-matched to the target; zero: zero-fill. "
             f"Rows `all → t`: every other acquired sequence combined (hist.: the most similar one).\n\n")
    (output / "table.md").write_text(title + markdown_tables(summary))
    if examples:
        write_examples(examples, output / "examples.png")
