"""Channel order, names, label convention and the 15 modality combinations.

This module is the single owner of the BraTS conventions used across the package. They follow
nnU-Net's own BraTS converter (``nnunetv2/dataset_conversion/Dataset137_BraTS21.py``):

* channels: ``_0000`` T1, ``_0001`` T1ce, ``_0002`` T2, ``_0003`` FLAIR;
* labels: 1 edema, 2 necrosis / non-enhancing tumour core, 3 enhancing tumour;
* regions: whole tumour (1, 2, 3), tumour core (2, 3), enhancing tumour (3), trained with
  ``regions_class_order`` (1, 2, 3).

Nothing else in the package hard-codes these; import them from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import combinations

import numpy as np

#: Short names in channel order (index = nnU-Net channel index).
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: Names written to ``dataset.json['channel_names']`` (as nnU-Net's Dataset137 converter writes them).
CHANNEL_NAMES: dict[str, str] = {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}
#: Display names, in channel order.
DISPLAY_NAMES: tuple[str, ...] = ("T1", "T1ce", "T2", "FLAIR")
NUM_MODALITIES = len(MODALITIES)

#: Integer labels of the nnU-Net dataset.
LABEL_EDEMA = 1
LABEL_NECROSIS = 2  # necrosis / non-enhancing tumour core
LABEL_ENHANCING = 3
#: ``dataset.json['labels']`` for region-based training, exactly as nnU-Net's Dataset137 converter.
DATASET_LABELS: dict[str, int | list[int]] = {
    "background": 0,
    "whole tumor": [1, 2, 3],
    "tumor core": [2, 3],
    "enhancing tumor": [3],
}
REGIONS_CLASS_ORDER: list[int] = [1, 2, 3]
#: Evaluation regions: name -> labels that belong to it.
REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}

#: Aliases accepted wherever a user names a modality (CLI, BraTS file suffixes of 2018-2021 and 2023+).
_ALIASES: dict[str, str] = {
    "t1": "t1", "t1n": "t1", "t1w": "t1", "t1native": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce", "t1post": "t1ce",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair", "t2flair": "flair", "t2-flair": "flair",
}


def modality_index(name: str) -> int:
    """Channel index of a modality given by name or alias (case-insensitive).

    Raises:
        ValueError: if the name is not a known modality.
    """
    key = name.strip().lower().replace("_", "")
    if key not in _ALIASES:
        raise ValueError(f"unknown modality {name!r}; expected one of {', '.join(MODALITIES)} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})")
    return MODALITIES.index(_ALIASES[key])


def parse_modalities(spec: str | Iterable[str]) -> tuple[int, ...]:
    """Parse ``"t1ce,flair"`` (or ``"t1ce+flair"``, or an iterable of names) into sorted channel indices.

    Raises:
        ValueError: on an unknown name, a repeated name or an empty selection.
    """
    names = spec.replace("+", ",").split(",") if isinstance(spec, str) else list(spec)
    names = [n for n in (n.strip() for n in names) if n]
    indices = [modality_index(n) for n in names]
    if not indices:
        raise ValueError("no modality given; at least one of " + ", ".join(MODALITIES) + " is needed")
    if len(set(indices)) != len(indices):
        raise ValueError(f"modality named twice in {spec!r}")
    return tuple(sorted(indices))


def all_combinations(num_modalities: int = NUM_MODALITIES) -> list[tuple[int, ...]]:
    """All non-empty subsets of the channels, smallest first (15 for four modalities)."""
    return [c for k in range(1, num_modalities + 1) for c in combinations(range(num_modalities), k)]


def combination_name(available: Sequence[int]) -> str:
    """``(1, 3)`` -> ``"t1ce+flair"``."""
    return "+".join(MODALITIES[i] for i in sorted(available))


def availability_mask(available: Sequence[int], num_modalities: int = NUM_MODALITIES) -> np.ndarray:
    """Boolean vector of length ``num_modalities`` with True at the available channels."""
    mask = np.zeros(num_modalities, dtype=bool)
    mask[list(available)] = True
    return mask


def infer_available(image: np.ndarray) -> tuple[int, ...]:
    """Channels of a (C, ...) array that are not exactly zero everywhere (a missing modality is all zero)."""
    flat = np.asarray(image).reshape(image.shape[0], -1)
    return tuple(int(i) for i in np.flatnonzero(np.any(flat != 0, axis=1)))
