"""Helpers for writing nnU-Net raw datasets with the BraTS conventions of :mod:`nnunet_missingmod.modalities`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from nnunet_missingmod import modalities as mods

AVAILABILITY_FILE = "modality_availability.json"
#: ``dataset.json['converted_by']`` of every dataset the package writes starts with this.
WRITER_MARK = "nnunet_missingmod"
#: Top-level entries of a dataset folder the package writes; anything else there is foreign content.
DATASET_ENTRIES = frozenset({"dataset.json", AVAILABILITY_FILE, "phantom_cases.json",
                             "imagesTr", "labelsTr", "imagesTs", "labelsTs"})


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


def dataset_overwrite_problem(folder: str | os.PathLike) -> str | None:
    """None if ``folder`` is a dataset folder this package wrote (and may replace), else the reason it is not.

    A folder qualifies when its ``dataset.json`` has ``converted_by`` starting with ``nnunet_missingmod``
    and it holds nothing but the entries the package writes (:data:`DATASET_ENTRIES`).
    """
    folder = Path(folder)
    meta_file = folder / "dataset.json"
    try:
        converted_by = json.loads(meta_file.read_text()).get("converted_by")
    except FileNotFoundError:
        return "it has no dataset.json, so it is not a dataset written by nnunet_missingmod"
    except (OSError, ValueError, AttributeError) as error:
        return f"its dataset.json cannot be read ({error})"
    if converted_by is None:
        return "its dataset.json has no converted_by, so it was not written by nnunet_missingmod"
    if not str(converted_by).startswith(WRITER_MARK):
        return f"its dataset.json says converted_by {converted_by!r}, not nnunet_missingmod"
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in DATASET_ENTRIES)
    if foreign:
        return f"it also holds {foreign}, which nnunet_missingmod did not write"
    return None


def read_availability(file: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Read a ``modality_availability.json``: case -> channel indices of the modalities it really has.

    Raises:
        ValueError: not JSON, no ``cases`` object, or a case whose value is not a list of known modality
            names; the message names the file and the key.
        FileNotFoundError: the file does not exist.
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"availability file {file} not found")
    try:
        content = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"availability file {file} is not valid JSON: {error}") from None
    cases = content.get("cases") if isinstance(content, dict) else None
    if not isinstance(cases, dict):
        raise ValueError(f"availability file {file} has no 'cases' object (expected "
                         f'{{"cases": {{"<case>": ["t1ce", "flair"], ...}}}})')
    availability = {}
    for case, names in cases.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"availability file {file}: cases[{case!r}] must be a list of modality names, "
                             f"got {names!r}")
        try:
            availability[case] = tuple(sorted({mods.modality_index(n) for n in names}))
        except ValueError as error:
            raise ValueError(f"availability file {file}: cases[{case!r}]: {error}") from None
    return availability
