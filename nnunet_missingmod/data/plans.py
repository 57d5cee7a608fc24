"""A small CPU configuration added to nnU-Net's plans (demo, tests and benchmarks on a laptop).

nnU-Net plans for a GPU: on two CPU cores a ``3d_fullres`` iteration of a BraTS-sized network takes
tens of seconds. :func:`add_cpu_configuration` adds a configuration (default ``3d_cpu``) that
``inherits_from`` an existing one, so it reuses that configuration's preprocessed data (same
``data_identifier``, no new preprocessing), and only shrinks the patch, the batch and the network.
It is a convenience for trying the pipeline on a laptop or in CI, **not** a recommendation for real
data: train real models with the configurations nnU-Net planned.

Every setting is checked with an explicit error (:class:`PlansError`, not ``assert``, which ``python -O``
removes), and a damaged plans file gives an error naming the file and the missing or malformed key.
"""

from __future__ import annotations

import copy
import json
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

from nnunet_missingmod.data.raw_dataset import find_dataset_folder

#: Default patch of the CPU configuration by the parent's dimensionality (3D: 48³; 2D slices: 64²).
DEFAULT_CPU_PATCH: dict[int, tuple[int, ...]] = {3: (48, 48, 48), 2: (64, 64)}


class PlansError(ValueError):
    """A plans file cannot be used, or a setting of the new configuration is invalid; the message says which."""


def plans_file(dataset: int | str, plans_identifier: str = "nnUNetPlans",
               preprocessed_folder: str | os.PathLike | None = None) -> Path:
    """Path of ``<plans_identifier>.json`` of a preprocessed dataset given by id or name."""
    base = preprocessed_folder or os.environ.get("nnUNet_preprocessed")
    if not base:
        raise RuntimeError("nnUNet_preprocessed is not set; export nnUNet_preprocessed=/path/to/nnUNet_preprocessed")
    path = Path(base) / find_dataset_folder(base, dataset) / f"{plans_identifier}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run nnUNetv2_plan_and_preprocess -d {dataset} first")
    return path


def _integers(values: Sequence[int], what: str, minimum: int = 1) -> list[int]:
    """``values`` as a list of ints, each at least ``minimum``, or a :class:`PlansError` naming ``what``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise PlansError(f"{what} must be a non-empty list of integers, got {values!r}")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum]
    if bad:
        raise PlansError(f"{what} must be integers of at least {minimum}, got {list(values)}")
    return [int(v) for v in values]


def _key(mapping: object, key: str, where: str) -> object:
    """``mapping[key]``, or a :class:`PlansError` naming ``where`` (file and key path) instead of a bare KeyError."""
    if not isinstance(mapping, dict):
        raise PlansError(f"{where} is not a JSON object (got {type(mapping).__name__})")
    if key not in mapping:
        raise PlansError(f"{where} has no key {key!r}")
    return mapping[key]


def cpu_configuration(parent: dict, *, parent_name: str, patch_size: Sequence[int],
                      features_per_stage: Sequence[int], batch_size: int, source: str = "plans") -> dict:
    """The configuration dict (to put into ``plans['configurations']``) of a small network on ``parent``'s data.

    The number of stages is ``len(features_per_stage)``; every stage after the first halves each axis, so
    each patch dimension must be divisible by ``2 ** (stages - 1)``.

    Args:
        parent: the resolved parent configuration.
        parent_name: its name (for messages and ``inherits_from``).
        patch_size: patch size of the new configuration.
        features_per_stage: features of each stage.
        batch_size: batch size.
        source: where ``parent`` comes from (the plans file), for messages.

    Raises:
        PlansError: an invalid setting, or a key missing from ``parent`` (the message names ``source`` and the key).
    """
    features = _integers(features_per_stage, "features per stage")
    stages = len(features)
    if stages < 2:
        raise PlansError(f"need at least two stages, got features per stage {features}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise PlansError(f"batch size must be an integer of at least 1, got {batch_size!r}")
    patch = _integers(patch_size, "patch size")
    where = f"{source}: configurations[{parent_name!r}]"
    architecture = copy.deepcopy(_key(parent, "architecture", where))
    class_name = _key(architecture, "network_class_name", f"{where}['architecture']")
    if not str(class_name).endswith(("PlainConvUNet", "ResidualEncoderUNet")):
        raise PlansError(f"unsupported network class {class_name} in configuration {parent_name} of {source}; "
                         f"only PlainConvUNet and ResidualEncoderUNet can be shrunk")
    dims = len(_integers(_key(parent, "patch_size", where), f"{where}['patch_size']"))
    if len(patch) != dims:
        raise PlansError(f"patch size {patch} must have {dims} dimensions like {parent_name} (give {dims} numbers, "
                         f"e.g. --patch-size {' '.join(map(str, DEFAULT_CPU_PATCH.get(dims, (48,) * dims)))})")
    factor = 2 ** (stages - 1)
    if any(p % factor for p in patch):
        raise PlansError(f"every patch dimension must be divisible by {factor} for {stages} stages, got {patch}")
    kwargs_where = f"{where}['architecture']['arch_kwargs']"
    kwargs = _key(architecture, "arch_kwargs", f"{where}['architecture']")
    key = "n_conv_per_stage" if isinstance(kwargs, dict) and "n_conv_per_stage" in kwargs else "n_blocks_per_stage"
    encoder_convs = _integers(_key(kwargs, key, kwargs_where), f"{kwargs_where}[{key!r}]")
    decoder_convs = _integers(_key(kwargs, "n_conv_per_stage_decoder", kwargs_where),
                              f"{kwargs_where}['n_conv_per_stage_decoder']")
    kwargs["n_stages"] = stages
    kwargs["features_per_stage"] = features
    kwargs["kernel_sizes"] = [[3] * dims for _ in range(stages)]
    kwargs["strides"] = [[1] * dims] + [[2] * dims for _ in range(stages - 1)]
    kwargs[key] = [encoder_convs[min(i, len(encoder_convs) - 1)] for i in range(stages)]
    kwargs["n_conv_per_stage_decoder"] = [decoder_convs[0]] * (stages - 1)
    return {
        "inherits_from": parent_name,
        "patch_size": patch,
        "batch_size": int(batch_size),
        "architecture": architecture,
    }


def _read_plans(path: Path) -> dict:
    try:
        plans = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PlansError(f"{path} is not a valid JSON plans file ({error}); rerun nnUNetv2_plan_experiment") from None
    configurations = _key(plans, "configurations", str(path))
    if not isinstance(configurations, dict):
        raise PlansError(f"{path}: 'configurations' is not a JSON object")
    return plans


def _ancestors(configurations: dict, name: str, path: Path) -> list[str]:
    """``name`` and the configurations it inherits from, nearest first; a loop or a missing parent is an error."""
    chain = [name]
    while True:
        current = configurations[chain[-1]]
        if not isinstance(current, dict):
            raise PlansError(f"{path}: configurations[{chain[-1]!r}] is not a JSON object")
        if "inherits_from" not in current:
            break
        parent = current["inherits_from"]
        if parent in chain:
            raise PlansError(f"{path}: configurations inherit from each other in a loop: {' -> '.join(chain)} -> "
                             f"{parent}")
        if parent not in configurations:
            raise PlansError(f"{path}: configuration {chain[-1]!r} inherits from {parent!r}, which is not in the file")
        chain.append(parent)
    return chain


def add_cpu_configuration(dataset: int | str, *, name: str | None = None, parent: str = "3d_fullres",
                          patch_size: Sequence[int] | None = None,
                          features_per_stage: Sequence[int] = (16, 32, 64, 128), batch_size: int = 2,
                          plans_identifier: str = "nnUNetPlans",
                          preprocessed_folder: str | os.PathLike | None = None) -> Path:
    """Add (or replace) a small configuration ``name`` inheriting from ``parent`` in a dataset's plans.

    The parent may be 3D (``3d_fullres``) or 2D (``2d``, as the UTAD-Net synthesis trainers need): the new
    configuration keeps the parent's conv/norm ops and dimensionality, with 3x3(x3) kernels and stride-2 stages.

    Args:
        dataset: dataset id or name (``DatasetNNN_Name``).
        name: name of the new configuration (default ``3d_cpu`` for a 3D parent, ``2d_cpu`` for a 2D one).
        parent: existing configuration whose preprocessed data it uses.
        patch_size: patch size of the new configuration, one number per axis of the parent (default
            :data:`DEFAULT_CPU_PATCH`: 48³ for 3D, 64² for 2D).
        features_per_stage: features of each encoder stage (the number of stages follows).
        batch_size: batch size.
        plans_identifier: plans file name without ``.json``.
        preprocessed_folder: nnU-Net preprocessed folder (default ``$nnUNet_preprocessed``).

    Returns:
        The plans file that was updated.

    Raises:
        KeyError: if ``parent`` is not in the plans or ``name`` is a configuration nnU-Net planned itself.
        PlansError: an invalid setting; ``parent`` equal to ``name`` or inheriting from it (circular plans); a
            plans file that is not JSON or lacks a key (the message names the file and the key).
    """
    if name is not None and not name:
        raise PlansError("the name of the new configuration must not be empty")
    if parent == name:
        raise PlansError(f"--parent and --name are both {name!r}: a configuration cannot inherit from itself "
                         f"(nnU-Net would find circular plans); choose another --name")
    path = plans_file(dataset, plans_identifier, preprocessed_folder)
    plans = _read_plans(path)
    configurations = plans["configurations"]
    if parent not in configurations:
        raise KeyError(f"configuration {parent!r} is not in {path}; available: {', '.join(configurations)}")
    chain = _ancestors(configurations, parent, path)
    resolved_parent = _resolve(plans, parent, path)
    if name is None or patch_size is None:  # defaults by the parent's dimensionality
        where = f"{path}: configurations[{parent!r}]"
        dims = len(_integers(_key(resolved_parent, "patch_size", where), f"{where}['patch_size']"))
        name = name if name is not None else f"{dims}d_cpu"
        patch_size = patch_size if patch_size is not None else DEFAULT_CPU_PATCH.get(dims, (48,) * dims)
        if parent == name:
            raise PlansError(f"--parent is {name!r}, the default name of the new configuration; choose a --name")
    existing = configurations.get(name)
    if existing is not None and not (isinstance(existing, dict) and "inherits_from" in existing):
        raise KeyError(f"{name!r} is a configuration planned by nnU-Net in {path}; choose another --name")
    if name in chain:
        raise PlansError(f"{parent!r} inherits from {name!r} in {path} ({' -> '.join(chain)}); replacing {name!r} by "
                         f"a child of {parent!r} would make the plans circular; choose another --name or --parent")
    configurations[name] = cpu_configuration(resolved_parent, parent_name=parent, patch_size=patch_size,
                                             features_per_stage=features_per_stage, batch_size=batch_size,
                                             source=str(path))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(plans, indent=4))
    os.replace(tmp, path)
    return path


def _resolve(plans: dict, configuration: str, path: Path) -> dict:
    """The configuration with its inheritance resolved by nnU-Net's PlansManager; its KeyErrors name the file."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        return PlansManager(copy.deepcopy(plans)).get_configuration(configuration).configuration
    except KeyError as error:
        key = repr(error.args[0])
        if error.args[0] == "UNet_class_name":  # nnU-Net falls back to the old plans format without 'architecture'
            key = "'architecture' (nor the old plans format's 'UNet_class_name')"
        raise PlansError(f"{path}: configuration {configuration!r} (or one it inherits from) has no key {key}; "
                         f"rerun nnUNetv2_plan_experiment") from None
    except (TypeError, AttributeError) as error:
        raise PlansError(f"{path}: configuration {configuration!r} is malformed ({error})") from None
