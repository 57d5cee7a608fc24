"""Fill in missing MRI sequences with a trained UTAD-Net student generator.

Method: Huang, Wei, Li, "Unsupervised Tumor-Aware Distillation for Multi-Modal Brain Image Translation"
(UTAD-Net). At inference the paper uses the student network alone, without a tumour mask: ``(I_target, T_target) =
G(I_source, t)`` (Sec. III-A); the whole target image ``I_target`` is the synthesised sequence. The generator is
restored from an nnU-Net model folder as nnU-Net's predictor does and must offer ``translate(source (B, 1, X, Y),
target_modality (B,)) -> (B, 1, X, Y)``, ``total_stride`` and ``num_modalities`` (the inference contract of
:mod:`nnunet_missingmod.trainers.utad`).

:func:`synthesize` reads a raw dataset (``dataset.json`` with ``imagesTr``/``imagesTs``) or a folder of
``<case>_XXXX`` files, and writes a new one in which every case has all four channel files:

1. Which sequences a case has comes from ``--available`` (one list for all cases), else from
   ``modality_availability.json`` (per case; beside the case folder or in the dataset folder, as ``convert-brats``
   writes it), else from the channel files present that are not all zero.
2. The case is read and preprocessed by nnU-Net's own preprocessor for the model's 2d(-derived) configuration
   (transpose, crop to the non-zero region, z-score normalisation, in-plane resampling to the configuration's
   spacing) with the missing channels zero-filled, then translated slice by slice along the axis nnU-Net's 2d
   configuration slices (the first axis after ``transpose_forward``); slices outside the brain are not run.
3. With several acquired sequences, the model's validation SSIM of each source -> target pair decides how to
   use them (``fold_F/synthesis_validation.json``, averaged over folds: its ``ssim_brain``, the SSIM over the
   brain, or for a model validated before that existed its whole-slice ``ssim``; the manifest's
   ``validation_metric`` says which). ``combine``: ``ssim`` (default) translates from every acquired sequence and
   averages in normalised space with ``w_s = max(SSIM[s][t], 0) / sum_s' max(SSIM[s'][t], 0)`` (an inverted
   contrast scores below 0 and gets no weight); ``best`` takes the source with the highest SSIM only (as the
   paper, which translates from one source); ``mean`` equal weights. Without the file, where an entry is null, or
   (``ssim``) where none is positive, the rule falls back to equal weights and says so in the manifest. On the
   phantoms ``ssim`` gave the better segmentation downstream and ``best`` the better images (docs/RESULTS.md,
   "Combining sources").

   Histogram fallback (off by default; ``histogram_fallback=True``, ``--histogram-fallback``): a model validated
   since it exists also records, per pair, the validation SSIM over the brain of plain histogram matching (the
   source's brain voxels given the target sequence's histogram, pooled from the fold's training cases and stored as
   quantiles in the same file: ``histogram_ssim_brain``, ``histogram_quantiles``). Where histogram matching scored
   higher than the model on a pair, that pair's translation is the histogram-matched source instead of the
   generator's output, and its weight in ``ssim`` / ``best`` is histogram matching's SSIM. The manifest lists these
   pairs (``histogram_fallback``); models whose validation file lacks the two entries are used as before. On the
   phantoms it raised the image SSIM but lowered the downstream tumour-core and enhancing-tumour Dice (a T1
   histogram-matched from T1ce carries the enhancement), hence off by default (docs/RESULTS.md).
4. The result is resampled back (nnU-Net's resampling of the configuration), put back into the uncropped image,
   transposed back, and set to exactly 0 outside the brain (the union of the non-zero voxels of the acquired
   sequences). Intensity rule: inside the brain the synthesised z-scores ``z`` become ``mean + sd * z``, where
   ``mean`` and ``sd`` are the averages over the acquired sequences of their mean and standard deviation in the
   brain. The map is affine, so nnU-Net's z-score normalisation of a later model sees exactly the synthesised
   contrast; it only puts the file on the intensity scale of the case's own images. Written as float32.

Acquired channel files are copied byte for byte; nothing in the input is ever modified. An existing output is
refused, and the output appears atomically (built under a hidden name and renamed when complete). Labels and
``dataset.json`` of a raw dataset are copied, so the result is a normal nnU-Net raw dataset. The written
``modality_availability.json`` lists, per case, every sequence now usable (``cases``), the acquired ones
(``acquired``) and the synthesised ones (``synthetic``), with the model and the combination rule used.

Large cohorts: ``num_parts``/``part_id`` (as ``nnUNetv2_predict``) split the cases of a case folder over several
processes writing into one output folder; each part stages its files in a hidden folder and moves them in when
complete, records its cases in ``synthesis_part_<k>_of_<n>.json``, and the part that completes last merges these
into ``modality_availability.json`` (:func:`merge_parts`, also callable by hand).

Deviations from the paper:

* Several sources are combined (weighted average, see 3.); the paper translates from a single source image.
* Pairs that the model renders worse than histogram matching on its validation cases use histogram matching
  (3., histogram fallback).
* Slices keep the resolution of nnU-Net's 2d configuration instead of being resized to 128 x 128, and are padded
  to a multiple of the generator's ``total_stride`` rather than cropped.
* Several folds are ensembled by averaging their outputs (nnU-Net's convention for segmentation logits).
* The intensity rule (4.) is ours: the paper evaluates in its own normalised space and never writes volumes.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.data.nifti import (
    InputImageError,
    atomic_output_folder,
    check_image_file,
    raise_on_sigterm,
)
from nnunet_missingmod.data.raw_dataset import AVAILABILITY_FILE, read_availability
from nnunet_missingmod.inference.predict import (
    check_case_geometry,
    check_checkpoints,
    check_output_folder,
    check_writable,
    find_cases,
)

#: Per-fold file of the model's validation SSIM/PSNR per source -> target pair (written by the trainer).
VALIDATION_FILE = "synthesis_validation.json"
#: Rules for combining the translations of several acquired sequences, and the default.
COMBINE_RULES = ("ssim", "best", "mean")
DEFAULT_COMBINE = "ssim"
#: The matrix of ``VALIDATION_FILE`` the rules read when the file has it (else ``ssim``, whole slices).
BRAIN_SSIM = "ssim_brain"
#: ``VALIDATION_FILE`` entries of the histogram fallback (module docstring, 3.): histogram matching's SSIM over the
#: brain per pair, and the quantiles of each target sequence's pooled training histogram (a row per sequence).
HISTOGRAM_SSIM = "histogram_ssim_brain"
HISTOGRAM_QUANTILES = "histogram_quantiles"
#: Folders of a raw dataset that hold cases.
IMAGE_FOLDERS = ("imagesTr", "imagesTs")
LABEL_FOLDERS = ("labelsTr", "labelsTs")
_PART_FILE = re.compile(r"^synthesis_part_(\d+)_of_(\d+)\.json$")


class SynthesisModelError(ValueError):
    """A model folder cannot be used for synthesis; the message names the folder or file and what is wrong."""


# ---------------------------------------------------------------------------------------------- the model


def check_channels(dataset_json: dict, where: str | os.PathLike) -> None:
    """The four BraTS channels in nnU-Net's order, as :mod:`nnunet_missingmod.modalities` defines them.

    Raises:
        SynthesisModelError: other channels or another order (the message names ``where``).
    """
    names = dataset_json.get("channel_names") if isinstance(dataset_json, dict) else None
    if not isinstance(names, dict):
        raise SynthesisModelError(f"{where} has no 'channel_names' object")
    try:
        indices = [mods.modality_index(str(names[str(i)])) for i in range(len(names))]
    except (KeyError, ValueError):
        indices = []
    if indices != list(range(mods.NUM_MODALITIES)):
        raise SynthesisModelError(f"{where} has channels {list(names.values())}, but synthesis needs the BraTS "
                                  f"channels in nnU-Net's order {list(mods.CHANNEL_NAMES.values())}")


def _read_json(file: Path, what: str) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; is {file.parent} a trained nnU-Net model folder ({what})?")
    try:
        content = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SynthesisModelError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise SynthesisModelError(f"{file} must hold a JSON object, got {type(content).__name__}")
    return content


def check_model_folder(folder: str | os.PathLike, folds: Sequence[int | str] | None = None,
                       checkpoint_name: str = "checkpoint_final.pth") -> dict:
    """Check a synthesis model folder without loading the network; return its ``dataset.json``.

    Raises:
        FileNotFoundError: the folder, ``dataset.json``, ``plans.json`` or a checkpoint is missing.
        SynthesisModelError: a corrupt JSON file, or a model trained on other channels.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"synthesis model folder {folder} does not exist")
    dataset_json = _read_json(folder / "dataset.json", "dataset.json")
    check_channels(dataset_json, folder / "dataset.json")
    _read_json(folder / "plans.json", "plans.json")
    check_checkpoints(folder, folds, checkpoint_name)
    return dataset_json


def read_validation_file(file: str | os.PathLike) -> dict:
    """The JSON object of a ``synthesis_validation.json``.

    Raises:
        SynthesisModelError: not JSON, or not a JSON object (the message names the file).
    """
    file = Path(file)
    try:
        content = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SynthesisModelError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise SynthesisModelError(f"{file} must hold a JSON object with an 'ssim' matrix")
    return content


def read_validation_matrix(file: str | os.PathLike, channel_names: dict | None = None,
                           key: str | None = None, content: dict | None = None) -> tuple[np.ndarray, str]:
    """An M x M SSIM matrix ``[source][target]`` of a ``synthesis_validation.json`` (NaN where null), and its key.

    ``key`` None: ``ssim_brain`` (the SSIM over the brain, written since it exists) if the file has it, else
    ``ssim`` (whole slices, the only one of older models). ``content``: the file's object when already read
    (:func:`read_validation_file`); ``file`` then only names it in messages.

    Raises:
        SynthesisModelError: not JSON, no such matrix of M x M numbers or nulls, or channel names that differ
            from the model's (the message names the file and the key).
    """
    file = Path(file)
    if content is None:
        content = read_validation_file(file)
    if channel_names is not None and "channel_names" in content and content["channel_names"] != channel_names:
        raise SynthesisModelError(f"{file}: 'channel_names' {content['channel_names']} differ from the model's "
                                  f"{channel_names}")
    key = key or (BRAIN_SSIM if BRAIN_SSIM in content else "ssim")
    matrix = content.get(key)
    size = mods.NUM_MODALITIES
    valid = (isinstance(matrix, list) and len(matrix) == size
             and all(isinstance(row, list) and len(row) == size for row in matrix)
             and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for row in matrix
                     for v in row))
    if not valid:
        raise SynthesisModelError(f"{file}: {key!r} must be a {size} x {size} list of numbers or nulls "
                                  f"([source][target]), got {matrix!r}")
    return np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float), key


def read_histogram_quantiles(file: str | os.PathLike, content: dict | None = None) -> np.ndarray | None:
    """The (M, Q) ``histogram_quantiles`` of a ``synthesis_validation.json`` (a NaN row where null); None if absent.

    ``content``: the file's object when already read (:func:`read_validation_file`).

    Raises:
        SynthesisModelError: not a JSON object, or not M rows of null or the same number (at least 2) of finite
            non-decreasing numbers.
    """
    file = Path(file)
    rows = (read_validation_file(file) if content is None else content).get(HISTOGRAM_QUANTILES)
    if rows is None:
        return None
    lengths = {len(row) for row in rows if isinstance(row, list)} if isinstance(rows, list) else set()
    valid = (isinstance(rows, list) and len(rows) == mods.NUM_MODALITIES and len(lengths) <= 1
             and all(row is None or (isinstance(row, list) and len(row) >= 2
                                     and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row))
                     for row in rows))
    if valid:
        quantiles = np.full((mods.NUM_MODALITIES, max(lengths, default=2)), np.nan)
        for m, row in enumerate(rows):
            if row is not None:
                quantiles[m] = row
        valid = all(np.isnan(row).all() or (np.isfinite(row).all() and np.all(np.diff(row) >= 0))
                    for row in quantiles)
    if not valid:
        raise SynthesisModelError(f"{file}: {HISTOGRAM_QUANTILES!r} must be {mods.NUM_MODALITIES} rows, each null or "
                                  f"the same number (at least 2) of finite non-decreasing numbers")
    return quantiles


def fallback_pairs(model_ssim: np.ndarray, histogram_ssim: np.ndarray,
                   quantiles: np.ndarray) -> frozenset[tuple[int, int]]:
    """The (source, target) pairs the histogram fallback takes over: histogram matching's validation SSIM over the
    brain above the model's, and a stored histogram of the target (NaN never counts; never the diagonal)."""
    with np.errstate(invalid="ignore"):
        better = (histogram_ssim > model_ssim) & np.isfinite(quantiles).all(axis=1)[None, :]
    return frozenset((int(s), int(t)) for s, t in zip(*np.nonzero(better), strict=True) if s != t)


def histogram_matched(source: np.ndarray, brain: np.ndarray, reference_values: np.ndarray) -> np.ndarray:
    """``source``'s brain voxels with the histogram of ``reference_values`` (scikit-image); 0 outside the brain."""
    from skimage.exposure import match_histograms

    output = np.zeros(source.shape, dtype=np.float32)
    if brain.any() and reference_values.size:
        output[brain] = match_histograms(source[brain].astype(np.float64), reference_values.astype(np.float64))
    return output


def combination_weights(sources: Sequence[int], target: int, ssim: np.ndarray | None,
                        rule: str = DEFAULT_COMBINE) -> tuple[dict[int, float], str]:
    """Weights of the translations from ``sources`` to ``target`` (see the module docstring, step 3).

    Returns:
        ``({source: weight}, how)``: weights summing to 1, and the rule actually applied (``"single source"``,
        ``"ssim"``, ``"best"``, ``"mean"`` or ``"mean (fallback: ...)"``).
    """
    if rule not in COMBINE_RULES:
        raise ValueError(f"combine rule must be one of {', '.join(COMBINE_RULES)}, got {rule!r}")
    sources = sorted(sources)
    if not sources:
        raise ValueError(f"no source to synthesise {mods.MODALITIES[target]} from")
    if len(sources) == 1:
        return {sources[0]: 1.0}, "single source"
    equal = {s: 1.0 / len(sources) for s in sources}
    if rule == "mean":
        return equal, "mean"
    if ssim is None:
        return equal, f"mean (fallback: no {VALIDATION_FILE})"
    values = np.array([ssim[s, target] for s in sources], dtype=float)
    if not np.all(np.isfinite(values)):
        return equal, "mean (fallback: a validation SSIM is missing)"
    if rule == "best":  # a negative SSIM (an inverted contrast) simply ranks low
        best = sources[int(np.argmax(values))]
        return {s: float(s == best) for s in sources}, "best"
    positive = np.maximum(values, 0.0)
    if positive.sum() <= 0:
        return equal, "mean (fallback: no validation SSIM is positive)"
    return {s: float(v / positive.sum()) for s, v in zip(sources, positive, strict=True)}, "ssim"


@dataclass
class PreparedCase:
    """A case read and preprocessed for the synthesis model.

    Attributes:
        image: (C, ...) the channels in the reader's axis order, original geometry, missing ones zero.
        properties: nnU-Net reader properties (``sitk_stuff`` holds spacing, origin and direction).
        data: (C, S, X, Y) nnU-Net's preprocessed tensor (slices along axis 1).
        brain: (S, X, Y) nnU-Net's non-zero mask in preprocessed space.
        data_properties: nnU-Net's properties after preprocessing (crop box, shapes).
        present: channels that were non-zero input to the preprocessing.
    """

    image: np.ndarray
    properties: dict
    data: np.ndarray
    brain: np.ndarray
    data_properties: dict
    present: tuple[int, ...]
    cache: dict = field(default_factory=dict)  # (source, target) -> (S, X, Y) translation


class SynthesisModel:
    """A trained synthesis generator with the plans it was trained on.

    Build it with :func:`load_synthesis_model`, or directly with a network (tests inject stand-ins this way).

    Args:
        networks: one generator per fold (each with ``translate``; outputs are averaged).
        plans: the model's ``plans.json`` content.
        configuration: the 2d(-derived) configuration it was trained with.
        dataset_json: the model's ``dataset.json``.
        device: torch device of the networks.
        validation_ssim: M x M SSIM matrix ``[source][target]`` for combining sources (None: equal weights).
        folder: the model folder (for messages and the manifest).
        validation_metric: which matrix of the validation file ``validation_ssim`` is (``ssim_brain`` or ``ssim``;
            written to the manifest).
        histogram_ssim: M x M validation SSIM over the brain of histogram matching (None: no fallback).
        histogram_quantiles: (M, Q) quantiles of each target's training histogram (None: no fallback).
        histogram_fallback: use histogram matching on the pairs where it validated better than the model
            (``fallback_pairs``; only when ``validation_metric`` is ``ssim_brain`` and both entries are given).
    """

    def __init__(self, networks: Sequence[torch.nn.Module], plans: dict, configuration: str, dataset_json: dict, *,
                 device: torch.device | str = "cpu", validation_ssim: np.ndarray | None = None,
                 folder: str | os.PathLike | None = None, validation_metric: str | None = None,
                 histogram_ssim: np.ndarray | None = None, histogram_quantiles: np.ndarray | None = None,
                 histogram_fallback: bool = False) -> None:
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        where = folder or "the synthesis model"
        check_channels(dataset_json, Path(where) / "dataset.json" if folder else where)
        self.plans_manager = PlansManager(plans)
        if configuration not in self.plans_manager.available_configurations:
            raise SynthesisModelError(f"{where}: configuration {configuration!r} is not in its plans.json "
                                      f"({', '.join(self.plans_manager.available_configurations)})")
        self.configuration_manager = self.plans_manager.get_configuration(configuration)
        self.configuration = configuration
        if len(self.configuration_manager.patch_size) != 2:
            raise SynthesisModelError(f"{where}: configuration {configuration!r} is not 2d (patch size "
                                      f"{self.configuration_manager.patch_size}); synthesis models translate slices")
        if self.plans_manager.image_reader_writer_class is not SimpleITKIO:
            raise SynthesisModelError(f"{where}: its plans read images with "
                                      f"{self.plans_manager.image_reader_writer_class.__name__}; synthesize writes "
                                      f"images with SimpleITK and supports only SimpleITKIO")
        self.dataset_json = dataset_json
        self.device = torch.device(device)
        self.networks = [network.to(self.device).eval() for network in networks]
        if not self.networks:
            raise SynthesisModelError(f"{where}: no network (no fold) to synthesise with")
        for network in self.networks:
            if not callable(getattr(network, "translate", None)):
                raise SynthesisModelError(f"{where}: the network ({type(network).__name__}) has no translate() method; "
                                          f"is this a synthesis model (UTADNetStudentTrainer)?")
            count = getattr(network, "num_modalities", mods.NUM_MODALITIES)
            if count != mods.NUM_MODALITIES:
                raise SynthesisModelError(f"{where}: the generator knows {count} modalities, expected "
                                          f"{mods.NUM_MODALITIES}")
        stride = getattr(self.networks[0], "total_stride", None)
        if stride is None:
            strides = self.configuration_manager.network_arch_init_kwargs.get("strides", [[1, 1]])
            stride = tuple(int(np.prod([s[d] for s in strides])) for d in range(2))
        self.total_stride = tuple(int(s) for s in stride)
        self.validation_ssim = validation_ssim
        self.validation_metric = validation_metric if validation_ssim is not None else None
        self.histogram_quantiles = histogram_quantiles
        self.fallback_pairs: frozenset[tuple[int, int]] = frozenset()
        self.weight_ssim = validation_ssim  # what combination_weights reads: the model's SSIM, or histogram
        if histogram_fallback and histogram_ssim is not None and histogram_quantiles is not None \
                and self.validation_metric == BRAIN_SSIM:  # matching's where that replaces the model
            self.fallback_pairs = fallback_pairs(validation_ssim, histogram_ssim, histogram_quantiles)
            self.weight_ssim = validation_ssim.copy()
            for source, target in self.fallback_pairs:
                self.weight_ssim[source, target] = histogram_ssim[source, target]
        self.folder = Path(folder) if folder else None
        self.reader = self.plans_manager.image_reader_writer_class()

    @property
    def fallback_names(self) -> list[str]:
        """The histogram-fallback pairs as ``source->target`` names (for manifests and summaries)."""
        return [f"{mods.MODALITIES[s]}->{mods.MODALITIES[t]}" for s, t in sorted(self.fallback_pairs)]

    # ----------------------------------------------------------------------------------- reading
    def read_case(self, files: dict[int, Path], channels: Sequence[int], identifier: str = "") -> tuple[np.ndarray,
                                                                                                        dict]:
        """Read ``channels`` (nnU-Net's reader and axis order); every other channel is zero.

        Raises:
            InputImageError: NaN/Inf voxels (naming the case and the file).
        """
        arrays, properties = {}, None
        for channel in channels:
            array, properties = self.reader.read_images([str(files[channel])])
            if not np.isfinite(array).all():
                raise InputImageError(f"case {identifier}: {files[channel]} has NaN/Inf voxels")
            arrays[channel] = array[0]
        shape = next(iter(arrays.values())).shape
        image = np.zeros((mods.NUM_MODALITIES, *shape), dtype=np.float32)
        for channel, array in arrays.items():
            image[channel] = array
        return image, properties

    def prepare(self, image: np.ndarray, properties: dict, present: Sequence[int]) -> PreparedCase:
        """nnU-Net's preprocessing of ``image`` with only ``present`` channels kept (the others set to zero)."""
        visible = np.zeros_like(image)
        visible[list(present)] = image[list(present)]
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        data, seg, data_properties = preprocessor.run_case_npy(visible, None, copy.deepcopy(properties),
                                                                self.plans_manager, self.configuration_manager,
                                                                self.dataset_json)
        return PreparedCase(image=image, properties=properties, data=data, brain=seg[0] >= 0,
                            data_properties=data_properties, present=tuple(sorted(present)))

    # ----------------------------------------------------------------------------------- translating
    @torch.inference_mode()
    def translate_volume(self, prepared: PreparedCase, source: int, target: int, batch_size: int = 16,
                         on_slices: Callable[[int], None] | None = None) -> np.ndarray:
        """(S, X, Y) translation of channel ``source`` to ``target`` in normalised space (0 outside the brain).

        Cached per case; ``on_slices(n)`` is called with the number of slices run per batch (progress). A pair of
        ``fallback_pairs`` is the source histogram-matched to the target's training histogram instead (no network).
        """
        key = (source, target)
        if key in prepared.cache:
            return prepared.cache[key]
        if source not in prepared.present:
            raise ValueError(f"source {mods.MODALITIES[source]} was not among the channels given to prepare()")
        volume = prepared.data[source]  # (S, X, Y)
        if key in self.fallback_pairs:
            prepared.cache[key] = histogram_matched(volume, prepared.brain, self.histogram_quantiles[target])
            return prepared.cache[key]
        output = np.zeros(volume.shape, dtype=np.float32)
        slices = np.flatnonzero(prepared.brain.reshape(prepared.brain.shape[0], -1).any(axis=1))
        pad = [(0, (-n) % s) for n, s in zip(volume.shape[1:], self.total_stride, strict=True)]
        before = [p // 2 for _, p in pad]
        padding = (before[1], pad[1][1] - before[1], before[0], pad[0][1] - before[0])  # F.pad: last axis first
        for start in range(0, len(slices), batch_size):
            chosen = slices[start:start + batch_size]
            batch = torch.from_numpy(np.ascontiguousarray(volume[chosen])).float()[:, None].to(self.device)
            batch = torch.nn.functional.pad(batch, padding)  # (B, 1, X', Y'), divisible by total_stride
            targets = torch.full((len(chosen),), target, dtype=torch.long, device=self.device)
            result = sum(network.translate(batch, targets).float() for network in self.networks) / len(self.networks)
            result = result[:, 0, before[0]:before[0] + volume.shape[1], before[1]:before[1] + volume.shape[2]]
            output[chosen] = result.cpu().numpy()
            if on_slices is not None:
                on_slices(len(chosen))
        if not np.isfinite(output).all():
            raise FloatingPointError(f"the synthesis model produced NaN/Inf voxels translating "
                                     f"{mods.MODALITIES[source]} to {mods.MODALITIES[target]}")
        output[~prepared.brain] = 0
        prepared.cache[key] = output
        return output

    def combine(self, prepared: PreparedCase, sources: Sequence[int], target: int, rule: str = DEFAULT_COMBINE,
                batch_size: int = 16, on_slices: Callable[[int], None] | None = None) -> tuple[np.ndarray, str]:
        """Weighted combination (normalised space) of the translations of ``sources`` to ``target``."""
        weights, how = combination_weights(sources, target, self.weight_ssim, rule)
        combined = np.zeros(prepared.brain.shape, dtype=np.float32)
        for source, weight in weights.items():
            if weight > 0:
                combined += weight * self.translate_volume(prepared, source, target, batch_size, on_slices)
        matched = [mods.MODALITIES[s] for s, w in weights.items() if w > 0 and (s, target) in self.fallback_pairs]
        return combined, how + (f" (histogram matching from {', '.join(matched)})" if matched else "")

    # ----------------------------------------------------------------------------------- back to the image
    def to_original(self, volume: np.ndarray, prepared: PreparedCase) -> np.ndarray:
        """A normalised (S, X, Y) volume back in the geometry and axis order of the input files (zero outside)."""
        from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

        props = prepared.data_properties
        spacing = [prepared.properties["spacing"][i] for i in self.plans_manager.transpose_forward]
        current = list(self.configuration_manager.spacing)
        if len(current) < len(spacing):
            current = [spacing[0], *current]
        resampled = self.configuration_manager.resampling_fn_data(volume[None], props[
            "shape_after_cropping_and_before_resampling"], current, spacing)[0]
        full = np.zeros(props["shape_before_cropping"], dtype=np.float32)
        full = insert_crop_into_image(full, np.asarray(resampled, dtype=np.float32), props["bbox_used_for_cropping"])
        return np.ascontiguousarray(full.transpose(self.plans_manager.transpose_backward))

    def synthesize_channels(self, prepared: PreparedCase, sources: Sequence[int], targets: Sequence[int],
                            rule: str = DEFAULT_COMBINE, batch_size: int = 16,
                            on_slices: Callable[[int], None] | None = None) -> dict[int, tuple[np.ndarray, str]]:
        """Each target synthesised from ``sources`` in the input geometry, intensity-matched (see the docstring).

        Returns:
            ``{target: (array, how the sources were combined)}``.
        """
        brain = np.any(prepared.image[list(sources)] != 0, axis=0)
        results = {}
        for target in targets:
            combined, how = self.combine(prepared, sources, target, rule, batch_size, on_slices)
            results[target] = (match_intensity(self.to_original(combined, prepared), brain,
                                               [prepared.image[s] for s in sources]), how)
        return results


def match_intensity(normalised: np.ndarray, brain: np.ndarray, acquired: Sequence[np.ndarray]) -> np.ndarray:
    """``mean + sd * normalised`` in the brain, 0 outside; ``mean``/``sd``: averages over ``acquired`` in the brain.

    Args:
        normalised: synthesised z-scores in the input geometry.
        brain: boolean brain mask (the union of the acquired sequences' non-zero voxels).
        acquired: the acquired sequences of the case, same shape.
    """
    output = np.zeros(normalised.shape, dtype=np.float32)
    if not brain.any():
        return output
    means = [float(np.mean(image[brain], dtype=np.float64)) for image in acquired]
    sds = [float(np.std(image[brain], dtype=np.float64)) for image in acquired]
    output[brain] = (np.mean(means) + np.mean(sds) * normalised[brain]).astype(np.float32)
    return output


def find_trainer_class(trainer_name: str) -> type:
    """The trainer class named in a checkpoint: this package's trainers first, then nnU-Net's lookup."""
    from nnunet_missingmod import trainers
    from nnunet_missingmod.ext import register

    found = getattr(trainers, trainer_name, None)
    if isinstance(found, type):
        return found
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    register()
    try:
        return recursive_find_trainer_class_by_name(trainer_name)
    except (RuntimeError, AssertionError) as error:
        raise SynthesisModelError(f"the checkpoint's trainer {trainer_name!r} cannot be found: "
                                  f"{str(error).splitlines()[0]}") from None


def load_synthesis_model(folder: str | os.PathLike, folds: Sequence[int | str] | None = None,
                         checkpoint_name: str = "checkpoint_final.pth", device: torch.device | str = "cpu",
                         trainer_class: type | None = None, histogram_fallback: bool = False) -> SynthesisModel:
    """Restore the generator of a trained model folder as nnU-Net's predictor restores a network.

    The trainer class is looked up by the checkpoint's ``trainer_name`` (``trainer_class`` overrides it), its
    ``build_network_architecture(plans_manager, configuration_manager, in, out, False)`` builds the generator and
    the checkpoint's ``network_weights`` are loaded strictly. The validation SSIM matrices of the folds
    (``synthesis_validation.json``: ``ssim_brain`` if every fold's file has it, else the whole-slice ``ssim``) are
    averaged over the folds that have one; so are the histogram fallback's entries when every such file has them
    (``histogram_fallback`` False ignores them).

    Raises:
        FileNotFoundError: a missing folder, file or checkpoint.
        SynthesisModelError: other channels, a configuration that is not 2d, weights that do not fit, a network
            without ``translate``, or a corrupt validation file.
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(folder)
    dataset_json = check_model_folder(folder, folds, checkpoint_name)
    plans = json.loads((folder / "plans.json").read_text())
    if folds is None:
        folds = sorted(int(p.name[5:]) for p in folder.glob("fold_*")
                       if p.name[5:].isdigit() and (p / checkpoint_name).is_file())
        if not folds and (folder / "fold_all" / checkpoint_name).is_file():
            folds = ["all"]
    weights, configuration, trainer_name = [], None, None
    for fold in folds:
        file = folder / f"fold_{fold}" / checkpoint_name
        try:
            checkpoint = torch.load(file, map_location="cpu", weights_only=False)
            weights.append(checkpoint["network_weights"])
            configuration = configuration or checkpoint["init_args"]["configuration"]
            trainer_name = trainer_name or checkpoint["trainer_name"]
        except (KeyError, TypeError) as error:
            raise SynthesisModelError(f"{file} is not an nnU-Net checkpoint (no {error})") from None
        except (RuntimeError, EOFError, OSError) as error:
            raise SynthesisModelError(f"cannot read {file}: {str(error).splitlines()[0]}") from None
    plans_manager = PlansManager(plans)
    if configuration not in plans_manager.available_configurations:
        raise SynthesisModelError(f"{folder}: the checkpoint's configuration {configuration!r} is not in plans.json")
    configuration_manager = plans_manager.get_configuration(configuration)
    trainer_class = trainer_class or find_trainer_class(trainer_name)
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    networks = []
    for fold, state in zip(folds, weights, strict=True):
        network = trainer_class.build_network_architecture(plans_manager, configuration_manager, num_inputs,
                                                           num_outputs, False)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise SynthesisModelError(f"{folder / f'fold_{fold}' / checkpoint_name}: the weights do not fit the "
                                      f"network of {trainer_class.__name__} ({str(error).splitlines()[0]})") from None
        networks.append(network)
    files = [file for f in folds if (file := folder / f"fold_{f}" / VALIDATION_FILE).is_file()]
    contents = [read_validation_file(file) for file in files]  # each file read once
    names = dataset_json["channel_names"]
    key = BRAIN_SSIM if contents and all(BRAIN_SSIM in c for c in contents) else "ssim"  # both versions: the common
    matrices = [read_validation_matrix(file, names, key, content)[0]
                for file, content in zip(files, contents, strict=True)]
    ssim = _fold_mean(matrices) if matrices else None
    histogram_ssim = histogram_quantiles = None
    if histogram_fallback and matrices and key == BRAIN_SSIM and all(
            {HISTOGRAM_SSIM, HISTOGRAM_QUANTILES} <= content.keys() for content in contents):
        quantiles = [read_histogram_quantiles(file, content) for file, content in zip(files, contents, strict=True)]
        if all(q is not None for q in quantiles):  # (null: no fallback)
            histogram_ssim = _fold_mean([read_validation_matrix(file, names, HISTOGRAM_SSIM, content)[0]
                                         for file, content in zip(files, contents, strict=True)])
            if len({q.shape for q in quantiles}) > 1:
                raise SynthesisModelError(f"{folder}: the folds' {HISTOGRAM_QUANTILES!r} have different lengths")
            histogram_quantiles = _fold_mean(quantiles)
    if histogram_fallback and histogram_quantiles is None:
        warnings.warn(f"{folder}: --histogram-fallback has no effect: its synthesis_validation.json lacks the SSIM "
                      f"over the brain or the histogram scores (a model validated before they existed: "
                      f"nnUNetv2_train ... --val adds them)", stacklevel=2)
    return SynthesisModel(networks, plans, configuration, dataset_json, device=device, validation_ssim=ssim,
                          folder=folder, validation_metric=key if matrices else None, histogram_ssim=histogram_ssim,
                          histogram_quantiles=histogram_quantiles, histogram_fallback=histogram_fallback)


def _fold_mean(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Element-wise mean over the folds of the finite values (NaN where no fold has one)."""
    stack = np.stack(arrays)
    counts = np.isfinite(stack).sum(axis=0)
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)


# ---------------------------------------------------------------------------------------------- cases


@dataclass
class SynthesisCase:
    """One case to complete: its channel files, the acquired sequences and where that came from."""

    identifier: str
    files: dict[int, Path]  # channel -> file (present files only)
    acquired: tuple[int, ...]
    origin: str  # "--available", "manifest" or "files"

    @property
    def missing(self) -> tuple[int, ...]:
        return tuple(c for c in range(mods.NUM_MODALITIES) if c not in self.acquired)


def is_all_zero(file: str | os.PathLike) -> bool:
    """Whether every voxel of an image file is 0 (a zero-filled placeholder for a missing sequence)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(file))  # kept alive while its voxels are viewed
    return not np.any(sitk.GetArrayViewFromImage(image))


def find_synthesis_cases(folder: str | os.PathLike, file_ending: str = ".nii.gz",
                         available: Sequence[int] | None = None,
                         availability_file: str | os.PathLike | None = None) -> list[SynthesisCase]:
    """The cases of a folder with their acquired sequences (see the module docstring, step 1).

    Without ``available`` or a manifest entry for the case, a channel file whose voxels are all zero counts as
    missing (``convert-brats`` writes such files for missing sequences).

    Raises:
        InputImageError: not a folder, bad file names, a case with no acquired sequence, or a sequence named
            available whose file is missing or all zero (the message names the case and the file).
    """
    cases = find_cases(folder, file_ending, available, availability_file)
    per_case = read_availability(availability_file) if availability_file is not None else None
    result = []
    for case in cases:
        if available is not None or (per_case is not None and case.identifier in per_case):
            origin = "--available" if available is not None else "manifest"
            for channel in case.available:
                if is_all_zero(case.files[channel]):
                    where = "--available" if available is not None else f"{availability_file}"
                    raise InputImageError(f"case {case.identifier}: {where} lists {mods.MODALITIES[channel]} as "
                                          f"acquired, but {case.files[channel]} is all zero")
            acquired = case.available
        else:
            origin = "files"
            acquired = tuple(c for c in case.available if not is_all_zero(case.files[c]))
        if not acquired:
            raise InputImageError(f"case {case.identifier}: every modality is missing (the files of "
                                  f"{', '.join(mods.MODALITIES[c] for c in sorted(case.files))} are all zero); "
                                  f"nothing to synthesise from")
        result.append(SynthesisCase(case.identifier, case.files, tuple(sorted(acquired)), origin))
    return result


def check_synthesis_case(case: SynthesisCase) -> None:
    """All channel files share one geometry; every acquired file is complete and finite.

    Raises:
        InputImageError: naming the case and the file.
    """
    from nnunet_missingmod.inference.predict import CaseInput

    check_case_geometry(CaseInput(case.identifier, case.files, case.acquired))
    for channel in case.acquired:
        check_image_file(case.files[channel], case.identifier)


# ---------------------------------------------------------------------------------------------- writing


def write_image(array: np.ndarray, properties: dict, file: str | os.PathLike) -> None:
    """Write an array in SimpleITK's (z, y, x) order with the geometry of nnU-Net's reader properties."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing(properties["sitk_stuff"]["spacing"])
    image.SetOrigin(properties["sitk_stuff"]["origin"])
    image.SetDirection(properties["sitk_stuff"]["direction"])
    sitk.WriteImage(image, str(file), True)


def _input_layout(input_path: Path) -> tuple[str, list[tuple[str, Path]]]:
    """``("dataset", [(name, images folder), ...])`` for a raw dataset, else ``("cases", [("", folder)])``."""
    if not input_path.is_dir():
        what = "does not exist" if not input_path.exists() else "is a file, not a folder"
        raise InputImageError(f"input {input_path} {what}; expected a raw dataset or a folder of <case>_XXXX files")
    if (input_path / "dataset.json").is_file():
        folders = [(name, input_path / name) for name in IMAGE_FOLDERS if (input_path / name).is_dir()]
        if not folders:
            raise InputImageError(f"raw dataset {input_path} has neither imagesTr nor imagesTs")
        return "dataset", folders
    return "cases", [("", input_path)]


def _dataset_id_clash(output: Path) -> None:
    """Refuse a ``DatasetNNN_*`` output whose id another dataset beside it already uses (nnU-Net needs unique ids)."""
    match = re.match(r"^Dataset(\d{3})_", output.name)
    if not match or not output.parent.is_dir():
        return
    clashes = [p.name for p in output.parent.glob(f"Dataset{match.group(1)}_*") if p.is_dir() and p != output
               and not p.name.startswith(".")]
    if clashes:
        raise FileExistsError(f"dataset id {match.group(1)} of {output.name} is already used by {clashes[0]} in "
                              f"{output.parent}; nnU-Net needs unique ids, choose another -o")


def _manifest(cases: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], info: dict) -> dict:
    names = lambda channels: [mods.MODALITIES[c] for c in channels]  # noqa: E731
    return {"modalities": list(mods.MODALITIES),
            "cases": {case: names(range(mods.NUM_MODALITIES)) for case in cases},
            "acquired": {case: names(acquired) for case, (acquired, _) in cases.items()},
            "synthetic": {case: names(synthetic) for case, (_, synthetic) in cases.items()},
            "synthesis": info}


#: Keys of a part's ``synthesis`` record that differ between the parts of one run.
_PER_PART = ("part", "combination")


def _part_setting_differences(first: dict, other: dict) -> list[str]:
    """``key: a vs b`` for each setting in which two parts' ``synthesis`` records differ (per-part keys aside)."""
    keys = sorted((set(first) | set(other)) - set(_PER_PART))
    return [f"{key}: {first.get(key)!r} vs {other.get(key)!r}" for key in keys if first.get(key) != other.get(key)]


def _check_part_settings(output: Path, info: dict, num_parts: int, part_id: int) -> None:
    """Before a part writes anything: the parts of the same split already finished used the same settings."""
    for file in sorted(output.glob(f"synthesis_part_*_of_{num_parts}.json")):
        match = _PART_FILE.match(file.name)
        if not match or int(match.group(1)) == part_id:
            continue
        try:
            other = json.loads(file.read_text())["synthesis"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # merged away meanwhile, or not a part file of this package: merge_parts decides
        differences = _part_setting_differences(other, info)
        if differences:
            raise ValueError(f"part {part_id} of {num_parts}: {file.name} in {output} was written with other "
                             f"settings ({'; '.join(differences)}); run every part with the same model and options")


def merge_parts(output: str | os.PathLike) -> Path | None:
    """Merge the part files of a split run into ``modality_availability.json`` once every part has finished.

    The manifest's ``synthesis`` record is the parts' common one (model, folds, checkpoint, combine rule, histogram
    fallback, intensity rule, input) with every part's per-channel ``combination`` entries.

    Returns:
        The manifest, or None while parts are missing.

    Raises:
        ValueError: part files of different splits (``num_parts``) in one folder, or parts run with different
            settings (named; the part files are kept).
    """
    output = Path(output)
    parts = {}
    for file in output.glob("synthesis_part_*_of_*.json"):
        match = _PART_FILE.match(file.name)
        if match:
            parts[(int(match.group(1)), int(match.group(2)))] = file
    totals = {total for _, total in parts}
    if not parts:
        return (output / AVAILABILITY_FILE) if (output / AVAILABILITY_FILE).is_file() else None
    if len(totals) != 1:
        raise ValueError(f"{output} holds part files of different splits ({sorted(totals)} parts); run all parts "
                         f"with the same -num_parts")
    total = totals.pop()
    if sorted(k for k, _ in parts) != list(range(total)):
        return None
    merged: dict = {}
    try:
        contents = [json.loads(parts[(k, total)].read_text()) for k in range(total)]
    except FileNotFoundError:  # another part merged them at the same time
        return output / AVAILABILITY_FILE
    for k, content in enumerate(contents[1:], start=1):
        differences = _part_setting_differences(contents[0]["synthesis"], content["synthesis"])
        if differences:
            raise ValueError(f"{output}: part {k} of {total} was run with other settings than part 0 "
                             f"({'; '.join(differences)}); run every part with the same model and options")
    combination: dict = {}
    for content in contents:
        for key in ("cases", "acquired", "synthetic"):
            merged.setdefault(key, {}).update(content[key])
        combination.update(content["synthesis"].get("combination", {}))
    info = {key: value for key, value in contents[0]["synthesis"].items() if key not in _PER_PART}
    manifest = {"modalities": list(mods.MODALITIES), **merged,
                "synthesis": {**info, "combination": combination, "num_parts": total}}
    tmp = output / f".{AVAILABILITY_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, output / AVAILABILITY_FILE)
    for file in parts.values():
        file.unlink(missing_ok=True)
    return output / AVAILABILITY_FILE


def synthesize(input: str | os.PathLike, output: str | os.PathLike, model: str | os.PathLike | SynthesisModel, *,
               folds: Sequence[int | str] | None = None, checkpoint_name: str = "checkpoint_final.pth",
               available: Sequence[int] | None = None, availability_file: str | os.PathLike | None = None,
               device: str = "cpu", combine: str = DEFAULT_COMBINE, batch_size: int = 16, num_parts: int = 1,
               part_id: int = 0, progress: bool = True, histogram_fallback: bool = False) -> dict:
    """Write a copy of a raw dataset or case folder with every missing sequence synthesised (module docstring).

    Everything is checked before the model is loaded and anything is written: the parts, the output (must not
    exist, must not be the input or inside it, must be writable), the model folder (files, channels,
    checkpoints), and every case (names, availability, geometry, complete and finite acquired images).

    Args:
        input: raw dataset folder (``dataset.json``, ``imagesTr``/``imagesTs``) or folder of ``<case>_XXXX`` files.
        output: the new dataset or case folder.
        model: synthesis model folder, or a :class:`SynthesisModel`.
        folds: folds to ensemble (default: all with ``checkpoint_name``).
        checkpoint_name: checkpoint file in each fold folder.
        available: the acquired sequences of every case (overrides the manifest and the files).
        availability_file: a ``modality_availability.json`` (default: found in the dataset folder, or beside the
            case folder).
        device: torch device.
        combine: ``ssim``, ``best`` or ``mean`` (module docstring, step 3).
        batch_size: slices per forward pass.
        num_parts: split the cases of a case folder into this many parts (not for raw datasets).
        part_id: the part this call writes.
        progress: show a progress bar.
        histogram_fallback: histogram matching on the pairs where it validated better (module docstring, step 3;
            ignored for a :class:`SynthesisModel`, which was built with or without it).

    Returns:
        ``{"output", "cases", "synthesized_channels", "slices", "seconds"}``: ``slices`` counts slice translations
        by the network (one slice from one source to one target; pairs of the histogram fallback run none),
        ``seconds`` the processing loop.

    Raises:
        ValueError: invalid parts, rule or batch size; the output equal to or inside the input.
        FileExistsError: the output (or, for a split run, one of this part's files) exists.
        InputImageError: a case cannot be used (the message names the case and the file).
        FileNotFoundError, SynthesisModelError: the model folder cannot be used.
    """
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"need num_parts >= 1 and 0 <= part_id < num_parts, got {num_parts=}, {part_id=}")
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine rule must be one of {', '.join(COMBINE_RULES)}, got {combine!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    input_path, output = Path(input), Path(output)
    layout, image_folders = _input_layout(input_path)
    if layout == "dataset" and num_parts > 1:
        raise ValueError(f"-num_parts splits a folder of cases; {input_path} is a raw dataset, which is written as "
                         f"a whole (split its imagesTr/imagesTs folders instead)")
    check_output_folder(input_path, output)
    if num_parts == 1 and (output.exists() or output.is_symlink()):
        raise FileExistsError(f"output {output} already exists; synthesize never overwrites, choose a new -o")
    check_writable(output)
    if layout == "dataset":
        _dataset_id_clash(output)
    if isinstance(model, SynthesisModel):
        model_json = model.dataset_json
    else:
        model_json = check_model_folder(model, folds, checkpoint_name)
    file_ending = model_json.get("file_ending", ".nii.gz")
    if layout == "dataset":
        dataset_json = _read_json(input_path / "dataset.json", "dataset.json")
        check_channels(dataset_json, input_path / "dataset.json")
        file_ending = dataset_json.get("file_ending", file_ending)
        if availability_file is None and (input_path / AVAILABILITY_FILE).is_file():
            availability_file = input_path / AVAILABILITY_FILE
    elif availability_file is None and (input_path.parent / AVAILABILITY_FILE).is_file():
        availability_file = input_path.parent / AVAILABILITY_FILE
    work: list[tuple[str, SynthesisCase]] = []
    for name, folder in image_folders:
        if layout == "dataset" and not any(folder.glob(f"*{file_ending}")):
            continue  # an empty imagesTs stays an empty folder
        cases = find_synthesis_cases(folder, file_ending, available, availability_file)[part_id::num_parts]
        work.extend((name, case) for case in cases)
    if not work and num_parts == 1:  # a part can be empty (more parts than cases): it records that it is done
        raise InputImageError(f"{input_path} holds no cases (<case>_XXXX{file_ending} files)")
    for _, case in work:
        check_synthesis_case(case)
    if num_parts > 1:
        _check_part_targets(output, [case for _, case in work], file_ending, num_parts, part_id)
    synthesis_model = model if isinstance(model, SynthesisModel) else load_synthesis_model(
        model, folds, checkpoint_name, device, histogram_fallback=histogram_fallback)
    info = {"model": str(synthesis_model.folder.resolve()) if synthesis_model.folder else "in-memory model",
            "configuration": synthesis_model.configuration,
            "folds": [str(f) for f in folds] if folds else "all", "checkpoint": checkpoint_name, "combine": combine,
            "validation_metric": synthesis_model.validation_metric,
            "histogram_fallback": synthesis_model.fallback_names,
            "intensity": "mean + sd * z in the brain (means over the acquired sequences), 0 outside",
            "input": str(input_path.resolve())}
    if num_parts > 1:
        _check_part_settings(output, info, num_parts, part_id)
    with raise_on_sigterm():
        if num_parts == 1:
            with atomic_output_folder(output) as staging:
                stats = _write_all(synthesis_model, input_path, layout, work, staging, file_ending, combine,
                                   batch_size, progress, info, manifest_name=AVAILABILITY_FILE)
        else:
            stats = _write_part(synthesis_model, work, output, file_ending, combine, batch_size, progress, info,
                                num_parts, part_id)
    return {"output": output, **stats}


def _check_part_targets(output: Path, cases: Sequence[SynthesisCase], file_ending: str, num_parts: int,
                        part_id: int) -> None:
    part_file = output / f"synthesis_part_{part_id}_of_{num_parts}.json"
    existing = [part_file] if part_file.exists() else []
    existing += [output / f"{case.identifier}_{c:04d}{file_ending}" for case in cases
                 for c in range(mods.NUM_MODALITIES)
                 if (output / f"{case.identifier}_{c:04d}{file_ending}").exists()]
    if existing:
        raise FileExistsError(f"part {part_id} of {num_parts}: {len(existing)} of its output files already exist in "
                              f"{output} (e.g. {existing[0].name}); synthesize never overwrites, remove them or "
                              f"choose a new -o")


def _process_cases(model: SynthesisModel, work: Sequence[tuple[str, SynthesisCase]], destination: Path,
                   file_ending: str, combine: str, batch_size: int, progress: bool,
                   ) -> tuple[dict[str, tuple[tuple[int, ...], tuple[int, ...]]], dict, dict]:
    """Copy acquired files and write synthesised ones into ``destination/<folder name>``; per-case record."""
    record, combination = {}, {}
    counter = {"slices": 0, "channels": 0}
    start = time.perf_counter()
    bar = tqdm(work, desc="synthesising", unit="case", disable=not progress)

    def on_slices(n: int) -> None:
        counter["slices"] += n
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"{counter['slices'] / max(elapsed, 1e-9):.1f} slices/s", refresh=False)

    for folder_name, case in bar:
        target_folder = destination / folder_name if folder_name else destination
        target_folder.mkdir(parents=True, exist_ok=True)
        for channel in case.acquired:
            shutil.copyfile(case.files[channel], target_folder / f"{case.identifier}_{channel:04d}{file_ending}")
        if case.missing:
            image, properties = model.read_case(case.files, case.acquired, case.identifier)
            prepared = model.prepare(image, properties, case.acquired)
            results = model.synthesize_channels(prepared, case.acquired, case.missing, combine, batch_size, on_slices)
            for channel, (array, how) in results.items():
                write_image(array, properties, target_folder / f"{case.identifier}_{channel:04d}{file_ending}")
                combination[f"{case.identifier}/{mods.MODALITIES[channel]}"] = how
                counter["channels"] += 1
        record[case.identifier] = (case.acquired, case.missing)
    bar.close()
    seconds = time.perf_counter() - start
    return record, combination, {"cases": len(work), "synthesized_channels": counter["channels"],
                                 "slices": counter["slices"], "seconds": seconds}


def _write_all(model: SynthesisModel, input_path: Path, layout: str, work: Sequence[tuple[str, SynthesisCase]],
               staging: Path, file_ending: str, combine: str, batch_size: int, progress: bool, info: dict,
               manifest_name: str) -> dict:
    record, combination, stats = _process_cases(model, work, staging, file_ending, combine, batch_size, progress)
    if layout == "dataset":
        shutil.copyfile(input_path / "dataset.json", staging / "dataset.json")
        for name in LABEL_FOLDERS:
            if (input_path / name).is_dir():
                shutil.copytree(input_path / name, staging / name, copy_function=shutil.copyfile)
        for name, _ in _input_layout(input_path)[1]:
            (staging / name).mkdir(exist_ok=True)  # an empty images folder stays an (empty) folder
    (staging / manifest_name).write_text(json.dumps(_manifest(record, {**info, "combination": combination}),
                                                    indent=2))
    return stats


def _write_part(model: SynthesisModel, work: Sequence[tuple[str, SynthesisCase]], output: Path, file_ending: str,
                combine: str, batch_size: int, progress: bool, info: dict, num_parts: int, part_id: int) -> dict:
    from nnunet_missingmod.data.nifti import remove_stale_staging, staging_prefix

    output.mkdir(parents=True, exist_ok=True)
    name = f"synthesis_part_{part_id}_of_{num_parts}.json"
    remove_stale_staging(output / name)  # what a killed run of this part left on this machine
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(output / name, "partial"), dir=output))
    try:
        stats = _write_all(model, output, "cases", work, staging, file_ending, combine, batch_size, progress,
                           {**info, "part": f"{part_id} of {num_parts}"}, manifest_name=name)
        for file in sorted(staging.iterdir()):
            if file.name != name:
                os.replace(file, output / file.name)
        os.replace(staging / name, output / name)  # last: a part file means the part is complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    merge_parts(output)
    return stats
