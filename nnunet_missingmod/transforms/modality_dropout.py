"""Modality dropout: zero whole input channels per sample to simulate missing MRI sequences.

Schemes:

* ``uniform_subset`` (default, as in U-HVED: Dorent et al., "Hetero-Modal Variational Encoder-Decoder
  for Joint Modality Completion and Segmentation", MICCAI 2019): the number of kept modalities k is
  uniform in 1..M, then a subset of size k is drawn uniformly. P(S) = 1 / (M * C(M, |S|)).
* ``independent``: channel c is dropped with probability ``drop_probabilities[c]``, independently;
  a draw that would drop every channel is redrawn, so P(S) is proportional to
  prod_{c in S} (1 - p_c) * prod_{c not in S} p_c over non-empty S.
* ``fixed``: every sample keeps exactly the modalities listed in ``keep`` (names such as ``"t1ce"`` or
  channel indices), e.g. ``{"modality_dropout": {"scheme": "fixed", "keep": ["t1ce", "flair"], "p_keep_all": 0}}``
  in the ``nnUNet_missingmod_config`` override file trains a model dedicated to one combination (the
  robustness benchmark's upper limit: one model per combination). Nothing is random; ``p_keep_all`` must
  be 0 (ModalityDropoutTrainer's default is 0.25, so the override sets it), since mixing in complete samples
  would no longer train on that combination alone.

With probability ``p_keep_all`` a sample keeps every modality before the scheme is consulted.

Curriculum (``curriculum``: ``{"p_keep_all_start": s, "ramp_fraction": f}``, default ``null``): ``p_keep_all``
starts at ``s`` (e.g. 1: complete samples only) and falls linearly to ``p_keep_all`` over the first fraction
``f`` of the epochs, then stays there (:func:`p_keep_all_at`); easy complete samples first, then ever more
missing sequences. The share changes with the epoch, which nnU-Net's augmentation workers do not know, so
trainers draw the dropout in the training step when a curriculum is set (:func:`drop_modalities_in_batch`,
the settings of the epoch from :func:`settings_at`).

Regions that a modality defines (``region_requires``, default ``null``), e.g. ``{"enhancing tumor": ["t1ce"]}``:
BraTS defines the enhancing tumour by its enhancement on T1ce, so without T1ce it cannot be seen, only guessed
from the tumour's shape. With the key set, a training sample that has none of the listed modalities (dropped, or
not acquired) is trained with that region empty (:func:`empty_unobservable_regions`): the model learns to draw it
only from the modalities that show it, and the tumour's shape is not taught as evidence for it. The regions
are the names of ``dataset.json['labels']`` (region-based training only).

A modality that the sample does not have at all (an all-zero channel: a sequence missing from the
dataset) is never counted as kept: the kept set is the drawn subset AND the acquired modalities, and a
sample whose draw keeps none of its acquired modalities keeps all of them (the transform reads the mask
that :class:`~nnunet_missingmod.transforms.missing_modalities.RecordAvailabilityTransform` stored;
:func:`drop_modalities_in_batch` infers it from the exactly-zero channels).
This holds for ``fixed`` too: a sample that has none of the ``keep`` modalities keeps the ones it has,
so on data with missing sequences leave such cases out of a dedicated model's training split.

Randomness comes from numpy's global stream (or an explicit generator), never from torch: nnU-Net's
augmentation workers reseed numpy per worker but share torch's random stream, which would make
many samples of a batch drop the same channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import ImageOnlyTransform

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.transforms.missing_modalities import AVAILABILITY_KEY, acquired_modalities

SCHEMES = ("uniform_subset", "independent", "fixed")
#: Config key of the kept modalities of the ``fixed`` scheme (named in error messages).
KEEP_KEY = "modality_dropout.keep"


def fixed_keep_mask(keep: Sequence[str | int] | None, num_modalities: int, *, key: str = KEEP_KEY) -> np.ndarray:
    """Boolean mask of the modalities that the ``fixed`` scheme keeps.

    Args:
        keep: modality names or aliases (see :func:`nnunet_missingmod.modalities.modality_index`) or channel
            indices, e.g. ``["t1ce", "flair"]`` or ``[1, 3]``.
        num_modalities: number of modality channels M.
        key: config key named in error messages.

    Returns:
        Boolean mask of length M with at least one True.

    Raises:
        ValueError: ``keep`` is missing or empty, not a list, names an unknown modality, an index outside
            0..M-1, or a modality twice (the message names ``key``).
    """
    if keep is None or isinstance(keep, (str, bytes)) or not isinstance(keep, Sequence) or len(keep) == 0:
        raise ValueError(f"{key} must be a non-empty list of modality names ({', '.join(mods.MODALITIES)}) or "
                         f"channel indices for scheme 'fixed', got {keep!r}")
    indices = []
    for entry in keep:
        if isinstance(entry, str):
            try:
                index = mods.modality_index(entry)
            except ValueError as error:
                raise ValueError(f"{key}: {error}") from None
        elif isinstance(entry, (int, np.integer)) and not isinstance(entry, bool):
            index = int(entry)
        else:
            raise ValueError(f"{key}: entries must be modality names or channel indices, got {entry!r}")
        if not 0 <= index < num_modalities:
            raise ValueError(f"{key}: {entry!r} is channel {index}, but the data has {num_modalities} modality "
                             f"channels (0-{num_modalities - 1})")
        indices.append(index)
    if len(set(indices)) != len(indices):
        raise ValueError(f"{key}: a modality is named twice in {list(keep)!r}")
    mask = np.zeros(num_modalities, dtype=bool)
    mask[indices] = True
    return mask


def _check_fixed_settings(p_keep_all: float) -> None:
    if p_keep_all != 0:
        raise ValueError(f"modality_dropout.p_keep_all must be 0 with scheme 'fixed' (every sample keeps exactly "
                         f"{KEEP_KEY}), got {p_keep_all}: set \"p_keep_all\": 0 beside \"scheme\": \"fixed\" "
                         f"(ModalityDropoutTrainer's default is 0.25)")


#: Config key of the curriculum (named in error messages).
CURRICULUM_KEY = "modality_dropout.curriculum"


def check_curriculum(settings: dict) -> dict | None:
    """The ``curriculum`` of a ``modality_dropout`` section, checked (None: no curriculum).

    Raises:
        ValueError: not an object with exactly ``p_keep_all_start`` in [0, 1] and ``ramp_fraction`` in (0, 1],
            or set with the ``fixed`` scheme (the message names the key).
    """
    curriculum = settings.get("curriculum")
    if curriculum is None:
        return None
    expected = {"p_keep_all_start", "ramp_fraction"}
    if not isinstance(curriculum, dict) or set(curriculum) != expected:
        raise ValueError(f"{CURRICULUM_KEY} must be null or {{\"p_keep_all_start\": S, \"ramp_fraction\": F}}, "
                         f"got {curriculum!r}")
    start, fraction = curriculum["p_keep_all_start"], curriculum["ramp_fraction"]
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0.0 <= start <= 1.0:
        raise ValueError(f"{CURRICULUM_KEY}.p_keep_all_start must be in [0, 1], got {start!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"{CURRICULUM_KEY}.ramp_fraction must be in (0, 1] (a fraction of the epochs), got "
                         f"{fraction!r}")
    if settings.get("scheme") == "fixed":
        raise ValueError(f"{CURRICULUM_KEY} must be null with scheme 'fixed' (every sample keeps exactly "
                         f"{KEEP_KEY}), got {curriculum!r}")
    return curriculum


#: Config key of the regions that need a modality (named in error messages).
REGION_REQUIRES_KEY = "modality_dropout.region_requires"


def check_region_requires(settings: dict, region_names: Sequence[str], num_modalities: int) -> dict[int, np.ndarray]:
    """The ``region_requires`` of a ``modality_dropout`` section, checked: ``{output channel of the region: (M,)
    mask of the modalities it needs}`` (a sample needs one of them), ``{}`` when null.

    Args:
        settings: the ``modality_dropout`` section.
        region_names: the names of the network's output regions, in channel order (from ``dataset.json``).
        num_modalities: number of modality channels M.

    Raises:
        ValueError: not an object of region names to non-empty lists of modality names or channel indices, a
            name that is not one of ``region_names``, or an unknown modality (the message names the key).
    """
    requires = settings.get("region_requires")
    if requires is None:
        return {}
    if not isinstance(requires, dict) or not requires:
        raise ValueError(f'{REGION_REQUIRES_KEY} must be null or {{region name: [modalities]}}, e.g. '
                         f'{{"enhancing tumor": ["t1ce"]}}, got {requires!r}')
    checked = {}
    for name, needed in requires.items():
        key = f"{REGION_REQUIRES_KEY}.{name}"
        if name not in region_names:
            raise ValueError(f"{REGION_REQUIRES_KEY}: {name!r} is not a region of dataset.json; its regions are "
                             f"{list(region_names)}")
        if isinstance(needed, (str, bytes)) or not isinstance(needed, Sequence) or not needed:
            raise ValueError(f"{key} must be a non-empty list of modality names ({', '.join(mods.MODALITIES)}) or "
                             f"channel indices, got {needed!r}")
        checked[list(region_names).index(name)] = fixed_keep_mask(needed, num_modalities, key=key)
    return checked


def empty_unobservable_regions(target: torch.Tensor | list[torch.Tensor], available: torch.Tensor,
                               requirements: dict[int, np.ndarray]) -> torch.Tensor | list[torch.Tensor]:
    """``target`` with each region of ``requirements`` emptied in the samples that have none of the modalities
    the region needs.

    Args:
        target: (B, R, ...) region target, or nnU-Net's deep-supervision list of them (every level is changed).
        available: (B, M) boolean mask of the modalities each sample has after the dropout.
        requirements: from :func:`check_region_requires`.

    Returns:
        New tensors (the input is left as it is) in the structure of ``target``.
    """
    if not requirements:
        return target
    targets = [t.clone() for t in (target if isinstance(target, (list, tuple)) else [target])]
    for region, needed in requirements.items():
        lacking = ~available[:, torch.from_numpy(needed).to(available.device)].any(1)
        for t in targets:
            t[lacking.to(t.device), region] = 0
    return targets if isinstance(target, (list, tuple)) else targets[0]


def p_keep_all_at(settings: dict, progress: float) -> float:
    """``p_keep_all`` at ``progress`` (the epoch ÷ the number of epochs) of training: linear from the curriculum's
    ``p_keep_all_start`` at 0 to ``p_keep_all`` at ``ramp_fraction``, then ``p_keep_all``; without a curriculum
    always ``p_keep_all``.

    Raises:
        ValueError: an invalid curriculum (:func:`check_curriculum`).
    """
    end = settings.get("p_keep_all", 0.0)
    curriculum = check_curriculum(settings)
    if curriculum is None:
        return end
    ramp = min(max(progress, 0.0) / curriculum["ramp_fraction"], 1.0)
    return float(curriculum["p_keep_all_start"] + (end - curriculum["p_keep_all_start"]) * ramp)


def settings_at(settings: dict, progress: float) -> dict:
    """A ``modality_dropout`` section as it applies at ``progress`` of training: ``p_keep_all`` of the curriculum
    (:func:`p_keep_all_at`), the rest unchanged."""
    return {**settings, "p_keep_all": p_keep_all_at(settings, progress)}


def sample_kept_modalities(num_modalities: int, *, scheme: str = "uniform_subset",
                           drop_probabilities: Sequence[float] | None = None, p_keep_all: float = 0.0,
                           rng: np.random.Generator | np.random.RandomState | None = None,
                           keep: Sequence[str | int] | None = None) -> np.ndarray:
    """Draw which modalities a sample keeps.

    Args:
        num_modalities: number of modality channels M.
        scheme: ``uniform_subset``, ``independent`` or ``fixed`` (see the module docstring).
        drop_probabilities: per-channel drop probabilities for ``independent`` (length M, each < 1).
        p_keep_all: probability of keeping every modality regardless of the scheme (0 for ``fixed``).
        rng: random generator; defaults to numpy's global stream (reseeded per augmentation worker).
        keep: the kept modalities of ``fixed`` (names or channel indices).

    Returns:
        Boolean mask of length M with at least one True.

    Raises:
        ValueError: an unknown scheme, or invalid ``fixed`` settings (naming the config key).
    """
    if scheme == "fixed":
        _check_fixed_settings(p_keep_all)
        return fixed_keep_mask(keep, num_modalities)
    rng = np.random if rng is None else rng
    if p_keep_all > 0 and rng.random() < p_keep_all:
        return np.ones(num_modalities, dtype=bool)
    if scheme == "uniform_subset":
        num_kept = int(rng.choice(num_modalities)) + 1
        keep = np.zeros(num_modalities, dtype=bool)
        keep[rng.choice(num_modalities, size=num_kept, replace=False)] = True
        return keep
    if scheme == "independent":
        probabilities = np.asarray(drop_probabilities, dtype=float)
        while True:
            keep = rng.random(num_modalities) >= probabilities
            if keep.any():
                return keep
    raise ValueError(f"unknown modality dropout scheme {scheme!r}; expected one of {SCHEMES}")


class ModalityDropoutTransform(ImageOnlyTransform):
    """Zero a random subset of the first ``num_modalities`` image channels of each sample.

    Append it at the end of nnU-Net's training transforms so that no later intensity transform adds
    noise back into a dropped channel. Channels after ``num_modalities`` (e.g. the one-hot segmentation
    of a cascade) are never touched, and labels are not an input of this transform. When the sample's
    dict holds the availability mask (``modality_availability``), at least one acquired modality is kept.

    Args:
        num_modalities: number of modality channels at the start of the image.
        scheme: ``uniform_subset``, ``independent`` or ``fixed``.
        drop_probabilities: per-channel drop probabilities for ``independent``.
        p_keep_all: probability of keeping every modality (must be 0 for ``fixed``).
        rng: optional generator for reproducible draws (tests); default numpy's global stream.
        keep: the modalities every sample keeps with ``fixed`` (names or channel indices).

    Raises:
        ValueError: invalid ``fixed`` settings (the message names the config key).

    Example:
        >>> transform = ModalityDropoutTransform(num_modalities=4)
        >>> out = transform(image=torch.ones(4, 8, 8, 8))["image"]  # 1 to 4 channels kept, the rest exactly 0
        >>> fixed = ModalityDropoutTransform(num_modalities=4, scheme="fixed", keep=["t1ce", "flair"])
    """

    def __init__(self, *, num_modalities: int, scheme: str = "uniform_subset",
                 drop_probabilities: Sequence[float] | None = None, p_keep_all: float = 0.0,
                 rng: np.random.Generator | None = None, keep: Sequence[str | int] | None = None) -> None:
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be positive, got {num_modalities}")
        if scheme not in SCHEMES:
            raise ValueError(f"modality_dropout.scheme: unknown scheme {scheme!r}; expected one of {SCHEMES}")
        if not 0.0 <= p_keep_all <= 1.0:
            raise ValueError(f"modality_dropout.p_keep_all must be in [0, 1], got {p_keep_all}")
        self.keep = None
        if scheme == "fixed":
            _check_fixed_settings(p_keep_all)
            self.keep = fixed_keep_mask(keep, num_modalities)  # resolved once: the same subset for every sample
        if scheme == "independent":
            if drop_probabilities is None or len(drop_probabilities) != num_modalities:
                raise ValueError(f"modality_dropout.drop_probabilities: independent dropout needs {num_modalities} "
                                 f"drop probabilities, got {drop_probabilities}")
            if not all(0.0 <= p < 1.0 for p in drop_probabilities):
                raise ValueError(f"modality_dropout.drop_probabilities must be in [0, 1), got "
                                 f"{list(drop_probabilities)}")
        self.num_modalities = num_modalities
        self.scheme = scheme
        self.drop_probabilities = None if drop_probabilities is None else [float(p) for p in drop_probabilities]
        self.p_keep_all = p_keep_all
        self.rng = rng

    def get_parameters(self, **data_dict) -> dict:
        image = data_dict["image"]
        if image.shape[0] < self.num_modalities:
            raise ValueError(f"image has {image.shape[0]} channels, fewer than num_modalities={self.num_modalities}")
        if self.keep is not None:
            keep = self.keep.copy()
        else:
            keep = sample_kept_modalities(self.num_modalities, scheme=self.scheme,
                                          drop_probabilities=self.drop_probabilities, p_keep_all=self.p_keep_all,
                                          rng=self.rng)
        acquired = data_dict.get(AVAILABILITY_KEY)
        if acquired is not None:
            acquired = np.asarray(acquired, dtype=bool)
            keep = keep & acquired
            if not keep.any():
                keep = acquired  # never drop every modality the sample has
        return {"keep": keep}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        dropped = np.flatnonzero(~params["keep"]).tolist()
        if dropped:
            img[dropped] = 0
        return img


def transform_from_settings(settings: dict, num_modalities: int) -> ModalityDropoutTransform:
    """The transform of a ``modality_dropout`` config section (``scheme``, ``drop_probabilities``,
    ``p_keep_all``, ``keep``) for ``num_modalities`` channels.

    Raises:
        ValueError: ``independent`` without one drop probability per channel, invalid ``fixed`` settings, or a
            ``curriculum`` (a transform does not know the epoch; see the module docstring) (the messages name the
            config key).
    """
    if check_curriculum(settings) is not None:
        raise ValueError(f"{CURRICULUM_KEY} is set: the dropout changes with the epoch, which an augmentation "
                         f"transform does not know; draw it in the training step (drop_modalities_in_batch with "
                         f"settings_at)")
    scheme = settings["scheme"]
    probabilities = settings.get("drop_probabilities")
    if scheme == "independent" and (probabilities is None or len(probabilities) != num_modalities):
        raise ValueError(f"modality_dropout.drop_probabilities has {0 if probabilities is None else len(probabilities)}"
                         f" values but the dataset has {num_modalities} channels")
    return ModalityDropoutTransform(num_modalities=num_modalities, scheme=scheme,
                                    drop_probabilities=probabilities if scheme == "independent" else None,
                                    p_keep_all=settings.get("p_keep_all", 0.0), keep=settings.get("keep"))


def drop_modalities_in_batch(data: torch.Tensor, settings: dict, acquired: torch.Tensor | None = None,
                             num_modalities: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero a random subset of modalities per sample of a batch (for trainers that drop in ``train_step``).

    ``available = kept AND acquired``: a modality the sample does not have never counts as available, and
    a sample always keeps at least one of its acquired channels.

    Args:
        data: (B, M, ...) batch of images.
        settings: a ``modality_dropout`` config section (``scheme``, ``drop_probabilities``, ``p_keep_all``;
            ``keep`` for ``fixed``).
        acquired: (B, M) boolean mask of the modalities each sample has; default: the channels that are not
            exactly zero (what the training transforms guarantee, see :mod:`.missing_modalities`).
        num_modalities: the first M channels are the modalities; the channels after them (e.g. a cascade's
            segmentation) are never dropped. Default: every channel is a modality.

    Returns:
        The dropped batch (a new tensor) and the (B, M) boolean mask of available modalities.

    Raises:
        ValueError: invalid ``fixed`` settings (the message names the config key).
    """
    num_modalities = data.shape[1] if num_modalities is None else num_modalities
    scheme = settings["scheme"]
    if scheme == "fixed":
        _check_fixed_settings(settings.get("p_keep_all", 0.0))
        keep = np.tile(fixed_keep_mask(settings.get("keep"), num_modalities), (data.shape[0], 1))  # (B, M)
    else:
        independent = scheme == "independent"
        keep = np.stack([sample_kept_modalities(num_modalities, scheme=scheme,
                                                drop_probabilities=settings["drop_probabilities"] if independent
                                                else None, p_keep_all=settings["p_keep_all"])
                         for _ in range(data.shape[0])])  # (B, M)
    keep = torch.from_numpy(keep).to(data.device)
    if acquired is None:
        acquired = acquired_modalities(data[:, :num_modalities], batched=True)  # (B, M)
    acquired = acquired.to(data.device, torch.bool)
    available = keep & acquired
    available |= ~available.any(1, keepdim=True) & acquired  # never drop every acquired modality
    mask = torch.ones(data.shape[:2], dtype=data.dtype, device=data.device)
    mask[:, :num_modalities] = available.to(data.dtype)
    return data * mask.view(*mask.shape, *([1] * (data.ndim - 2))), available
