"""Helpers for writing nnU-Net raw datasets with the BraTS conventions of :mod:`nnunet_missingmod.modalities`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from nnunet_missingmod import modalities as mods

AVAILABILITY_FILE = "modality_availability.json"


def dataset_folder(raw_folder: str | os.PathLike | None, dataset_id: int, name: str) -> Path:
    """``$nnUNet_raw/DatasetNNN_name``, refusing an id that another dataset name already uses.

    Raises:
        ValueError: invalid id or name.
        RuntimeError: no raw folder given and ``nnUNet_raw`` is not set.
        FileExistsError: the id belongs to a dataset of another name (nnU-Net needs unique ids).
    """
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id must be between 1 and 999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"dataset name {name!r} may only contain letters, digits, '_' and '-'")
    raw = raw_folder or os.environ.get("nnUNet_raw")
    if not raw:
        raise RuntimeError("nnUNet_raw is not set; export nnUNet_raw=/path/to/nnUNet_raw (see nnU-Net's "
                           "documentation/set_environment_variables.md)")
    final = Path(raw) / f"Dataset{dataset_id:03d}_{name}"
    if Path(raw).is_dir():
        clashes = [p.name for p in Path(raw).glob(f"Dataset{dataset_id:03d}_*")
                   if p.is_dir() and p.name != final.name]
        if clashes:
            raise FileExistsError(f"dataset id {dataset_id} is already used by {clashes[0]} in {raw}; "
                                  f"nnU-Net needs ids to be unique, choose another --dataset-id")
    return final


def find_dataset_folder(base: str | os.PathLike, dataset: int | str) -> str:
    """Name of the ``DatasetNNN_*`` folder in ``base`` for a dataset id or name (nnU-Net's naming).

    Raises:
        FileNotFoundError: no folder, or more than one, matches the id.
    """
    if isinstance(dataset, str) and dataset.startswith("Dataset"):
        return dataset
    matches = sorted(p.name for p in Path(base).glob(f"Dataset{int(dataset):03d}_*") if p.is_dir())
    if len(matches) != 1:
        raise FileNotFoundError(f"expected one folder Dataset{int(dataset):03d}_* in {base}, found {matches or 'none'}")
    return matches[0]


def write_dataset_json(folder: Path, *, dataset_name: str, num_training: int, **metadata: str) -> None:
    """``dataset.json`` with the BraTS channels, regions and ``regions_class_order`` (via nnU-Net's own writer)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(
        str(folder), channel_names=dict(mods.CHANNEL_NAMES),
        labels={k: tuple(v) if isinstance(v, list) else v for k, v in mods.DATASET_LABELS.items()},
        num_training_cases=num_training, file_ending=".nii.gz", regions_class_order=tuple(mods.REGIONS_CLASS_ORDER),
        dataset_name=dataset_name, **metadata)


def write_availability(dataset: str | os.PathLike, cases: dict[str, list[str]]) -> None:
    """Write ``modality_availability.json``: which sequences each case really has."""
    with open(Path(dataset) / AVAILABILITY_FILE, "w") as f:
        json.dump({"modalities": list(mods.MODALITIES), "cases": cases}, f, indent=2)
