"""Trainer hyper-parameters from ``trainer_configs/<TrainerName>.json``.

The JSON files ship inside the package (``nnunet_missingmod.trainer_configs``). A trainer's config
is the deep merge of the files of every class in its MRO, base classes first, so a variant such
as ``D2NetTrainer_noSFMC`` only lists the keys it changes. On top of that, the environment
variable ``nnUNet_missingmod_config`` may name a JSON file whose keys override the shipped values
(for every trainer of this package that a process runs); unknown keys are an error, so a typo
does not pass silently. The resolved config is written next to the checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import os
from importlib.resources import files
from pathlib import Path

OVERRIDE_ENV = "nnUNet_missingmod_config"


def is_non_negative_number(value: object) -> bool:
    """True for a finite int or float >= 0 (not a bool, NaN, inf, or an int beyond float's range): the check of
    every loss weight in the configs."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        number = float(value)
    except OverflowError:  # a JSON integer such as 1e400 written out: no loss weight, and no float either
        return False
    return math.isfinite(number) and number >= 0


def config_dir() -> Path:
    """Folder of the shipped trainer configs."""
    return Path(str(files("nnunet_missingmod.trainer_configs")))


def deep_merge(base: dict, override: dict, *, strict: bool, where: str = "") -> dict:
    """Return ``base`` updated recursively with ``override``; with ``strict``, unknown keys raise KeyError."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if strict and key not in merged:
            raise KeyError(f"unknown config key {where + key!r}; valid keys here: {sorted(merged)}")
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value, strict=strict, where=f"{where}{key}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must contain a JSON object, got {type(data).__name__}")
    return data


def shipped_trainer_config(trainer_class: type) -> dict:
    """The shipped config of a trainer class: the files along its MRO, base classes first (no override file).

    Raises:
        FileNotFoundError: no shipped config for any class of the MRO.
    """
    merged: dict = {}
    found = False
    for cls in reversed(trainer_class.__mro__):
        path = config_dir() / f"{cls.__name__}.json"
        if path.is_file():
            merged = deep_merge(merged, _read_json(path), strict=False)
            found = True
    if not found:
        raise FileNotFoundError(f"no trainer config for {trainer_class.__name__} in {config_dir()}")
    return merged


def load_trainer_config(trainer_class: type) -> dict:
    """Resolved config of a trainer class (shipped files along the MRO, then the override file).

    Raises:
        FileNotFoundError: no shipped config for any class of the MRO, or the override file is missing.
        KeyError: the override file names a key the trainer's config does not have.
    """
    merged = shipped_trainer_config(trainer_class)
    override = os.environ.get(OVERRIDE_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"{OVERRIDE_ENV}={override} does not name a file")
        merged = deep_merge(merged, _read_json(path), strict=True)
    return merged
