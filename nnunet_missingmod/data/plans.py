"""A small CPU configuration added to nnU-Net's plans (demo, tests and benchmarks on a laptop).

nnU-Net plans for a GPU: on two CPU cores a ``3d_fullres`` iteration of a BraTS-sized network takes
tens of seconds. :func:`add_cpu_configuration` adds a configuration (default ``3d_cpu``) that
``inherits_from`` an existing one, so it reuses that configuration's preprocessed data (same
``data_identifier``, no new preprocessing), and only shrinks the patch, the batch and the network.
It is a convenience for trying the pipeline on a laptop or in CI, **not** a recommendation for real
data: train real models with the configurations nnU-Net planned.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path

from nnunet_missingmod.data.raw_dataset import find_dataset_folder


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


def cpu_configuration(parent: dict, *, parent_name: str, patch_size: Sequence[int],
                      features_per_stage: Sequence[int], batch_size: int) -> dict:
    """The configuration dict (to put into ``plans['configurations']``) of a small network on ``parent``'s data.

    The number of stages is ``len(features_per_stage)``; every stage after the first halves each axis, so
    each patch dimension must be divisible by ``2 ** (stages - 1)``.
    """
    stages = len(features_per_stage)
    assert stages >= 2, f"need at least two stages, got features_per_stage={list(features_per_stage)}"
    assert batch_size >= 1, f"batch size must be positive, got {batch_size}"
    architecture = copy.deepcopy(parent["architecture"])
    assert architecture["network_class_name"].endswith(("PlainConvUNet", "ResidualEncoderUNet")), \
        f"unsupported network class {architecture['network_class_name']} in configuration {parent_name}"
    dims = len(parent["patch_size"])
    assert len(patch_size) == dims, f"patch size {list(patch_size)} must have {dims} dimensions like {parent_name}"
    factor = 2 ** (stages - 1)
    assert all(p % factor == 0 for p in patch_size), \
        f"every patch dimension must be divisible by {factor} for {stages} stages, got {list(patch_size)}"
    kwargs = architecture["arch_kwargs"]
    kwargs["n_stages"] = stages
    kwargs["features_per_stage"] = [int(f) for f in features_per_stage]
    kwargs["kernel_sizes"] = [[3] * dims for _ in range(stages)]
    kwargs["strides"] = [[1] * dims] + [[2] * dims for _ in range(stages - 1)]
    encoder_convs = kwargs.get("n_conv_per_stage", kwargs.get("n_blocks_per_stage"))
    key = "n_conv_per_stage" if "n_conv_per_stage" in kwargs else "n_blocks_per_stage"
    kwargs[key] = [encoder_convs[min(i, len(encoder_convs) - 1)] for i in range(stages)]
    kwargs["n_conv_per_stage_decoder"] = [kwargs["n_conv_per_stage_decoder"][0]] * (stages - 1)
    return {
        "inherits_from": parent_name,
        "patch_size": [int(p) for p in patch_size],
        "batch_size": int(batch_size),
        "architecture": architecture,
    }


def add_cpu_configuration(dataset: int | str, *, name: str = "3d_cpu", parent: str = "3d_fullres",
                          patch_size: Sequence[int] = (48, 48, 48),
                          features_per_stage: Sequence[int] = (16, 32, 64, 128), batch_size: int = 2,
                          plans_identifier: str = "nnUNetPlans",
                          preprocessed_folder: str | os.PathLike | None = None) -> Path:
    """Add (or replace) a small configuration ``name`` inheriting from ``parent`` in a dataset's plans.

    Args:
        dataset: dataset id or name (``DatasetNNN_Name``).
        name: name of the new configuration.
        parent: existing configuration whose preprocessed data it uses.
        patch_size: patch size of the new configuration.
        features_per_stage: features of each encoder stage (the number of stages follows).
        batch_size: batch size.
        plans_identifier: plans file name without ``.json``.
        preprocessed_folder: nnU-Net preprocessed folder (default ``$nnUNet_preprocessed``).

    Returns:
        The plans file that was updated.

    Raises:
        KeyError: if ``parent`` is not in the plans or ``name`` is a configuration nnU-Net planned itself.
    """
    path = plans_file(dataset, plans_identifier, preprocessed_folder)
    plans = json.loads(path.read_text())
    configurations = plans["configurations"]
    if parent not in configurations:
        raise KeyError(f"configuration {parent!r} is not in {path}; available: {', '.join(configurations)}")
    existing = configurations.get(name)
    if existing is not None and "inherits_from" not in existing:
        raise KeyError(f"{name!r} is a configuration planned by nnU-Net in {path}; choose another --name")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    resolved_parent = PlansManager(plans).get_configuration(parent).configuration
    configurations[name] = cpu_configuration(resolved_parent, parent_name=parent, patch_size=patch_size,
                                             features_per_stage=features_per_stage, batch_size=batch_size)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(plans, indent=4))
    os.replace(tmp, path)
    return path
