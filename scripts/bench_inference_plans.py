"""Inference cost of each trainer's network at a real configuration's widths, as ratios to plain nnU-Net.

    python scripts/bench_inference_plans.py [--plans nnUNetPlans.json --configuration 3d_fullres]
        [--patch 64 64 64] [--trainers nnUNetTrainer ModalityDropoutTrainer ... CMFFTrainer]
        [--rounds 5] [--steps 3] [--device cpu] [--out inference_plans.json]

``bench_train_step.py`` times the CPU configuration of the phantoms (16 features at full resolution),
where small 3D convolutions are memory-bound and the cost of a network is not its FLOPs. This script
times the forward pass that ``nnUNetv2_predict`` runs, one patch (batch 1, no gradient), of the network
each trainer's static ``build_network_architecture`` builds from a GPU configuration: by default
nnU-Net's BraTS ``3d_fullres`` architecture (PlainConvUNet, 6 stages of 32-64-128-256-320-320
features, patch 128³; the plans nnU-Net makes for BraTS 2021), or any ``--plans``/``--configuration``.
``--patch`` shrinks the patch and keeps the widths (128³ forward passes take tens of seconds on two
CPU cores; every stride must still divide it).

Beside the seconds, the forward FLOPs are counted exactly (``torch.utils.flop_counter``: convolutions
and matrix products), so that the wall-clock ratio can be compared with the ratio of the work done.
Rounds are interleaved as in ``bench_train_step.py`` (every network once per round, order rotated by
one; ratios within a round; median and range over rounds), and ModalityDropoutTrainer, whose network is
nnUNetTrainer's, checks the method: 1.00 should lie within its range. All networks are built once, in
one process, with random weights (weights do not change the cost).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_step import (  # noqa: E402
    BASELINE,
    IDENTICAL_NETWORK,
    forward_seconds,
    ratio_statistics,
    round_order,
)

DEFAULT_TRAINERS = ["nnUNetTrainer", "ModalityDropoutTrainer", "SharedLatentTrainer", "D2NetTrainer",
                    "CMFFTrainer"]

#: nnU-Net's ``3d_fullres`` for BraTS 2021 (1 mm isotropic, four modalities, three regions).
BRATS_3D_FULLRES = {
    "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
    "patch_size": [128, 128, 128], "median_image_size_in_voxels": [140.0, 171.0, 137.0], "spacing": [1.0, 1.0, 1.0],
    "normalization_schemes": ["ZScoreNormalization"] * 4, "use_mask_for_norm": [True] * 4,
    "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
    "architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 6,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_conv_per_stage": [2] * 6,
            "n_conv_per_stage_decoder": [2] * 5, "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
    "batch_dice": False,
}
BRATS_PLANS = {
    "dataset_name": "Dataset137_BraTS2021", "plans_name": "nnUNetPlans",
    "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
    "original_median_shape_after_transp": [140, 171, 137], "image_reader_writer": "SimpleITKIO",
    "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
    "configurations": {"3d_fullres": BRATS_3D_FULLRES}, "experiment_planner_used": "ExperimentPlanner",
    "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
}
NUM_MODALITIES = 4
NUM_REGIONS = 3


def trainer_class(name: str):
    """A trainer class by name, found as ``nnUNetv2_predict`` finds it (this package's first, then nnU-Net's).

    Raises:
        SystemExit: no such trainer.
    """
    from nnunet_missingmod.inference.synthesize import SynthesisModelError, find_trainer_class

    try:
        return find_trainer_class(name)
    except SynthesisModelError:
        raise SystemExit(f"unknown trainer {name!r}: neither this package's, nnU-Net's nor one in "
                         f"nnUNet_extTrainer") from None


def load_configuration(plans_path: str | None, configuration: str, patch: list[int] | None):
    """(PlansManager, ConfigurationManager, patch) of the plans file (default: BraTS 3d_fullres), patch overridden.

    Raises:
        SystemExit: the plans file or configuration does not exist, or the patch is not divisible by the strides.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if plans_path is None:
        plans = copy.deepcopy(BRATS_PLANS)
        if configuration != "3d_fullres":
            raise SystemExit("--configuration needs --plans (the built-in plans have 3d_fullres only)")
    else:
        path = Path(plans_path)
        if not path.is_file():
            raise SystemExit(f"plans file {path} does not exist")
        try:
            plans = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SystemExit(f"plans file {path} is not valid JSON: {error}") from None
        if configuration not in plans.get("configurations", {}):
            raise SystemExit(f"plans file {path} has no configuration {configuration!r} "
                             f"(it has {sorted(plans.get('configurations', {}))})")
    manager = PlansManager(plans)
    config = manager.get_configuration(configuration)
    size = list(patch) if patch else list(config.patch_size)
    if len(size) != len(config.patch_size):
        raise SystemExit(f"--patch has {len(size)} axes, {configuration} is {len(config.patch_size)}D")
    total = [1] * len(size)
    for stride in config.network_arch_init_kwargs["strides"]:
        stride = [stride] * len(size) if isinstance(stride, int) else stride
        total = [t * s for t, s in zip(total, stride, strict=True)]
    if any(s % t for s, t in zip(size, total, strict=True)):
        raise SystemExit(f"--patch {size} is not divisible by the network's total stride {total}")
    if all(s == t for s, t in zip(size, total, strict=True)):
        raise SystemExit(f"--patch {size} leaves one voxel at the bottleneck (total stride {total}); instance "
                         f"normalisation needs more: use at least twice the stride along one axis")
    return manager, config, size


def count_flops(network, data) -> int:
    """Forward FLOPs of ``network`` on ``data`` (convolutions and matrix products)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(data)
    return int(counter.get_total_flops())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", default=None, help="nnU-Net plans file (default: BraTS 2021 3d_fullres, built in)")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--patch", type=int, nargs="+", default=None,
                        help="patch to time (default: the configuration's); the widths stay the plans'")
    parser.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed forward passes per network and round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit("--rounds and --steps must be at least 1")

    import torch

    manager, config, patch = load_configuration(args.plans, args.configuration, args.patch)
    trainers = list(dict.fromkeys([BASELINE, IDENTICAL_NETWORK, *args.trainers]))
    torch.manual_seed(0)
    data = torch.randn(1, NUM_MODALITIES, *patch, device=args.device)
    networks, flops, parameters = {}, {}, {}
    for name in trainers:
        network = trainer_class(name).build_network_architecture(manager, config, NUM_MODALITIES, NUM_REGIONS, False)
        networks[name] = network.to(args.device).eval()
        flops[name] = count_flops(networks[name], data)
        parameters[name] = sum(p.numel() for p in network.parameters())
        print(f"built {name}: {parameters[name] / 1e6:.2f} M parameters, {flops[name] / 1e9:.1f} GFLOP per forward",
              flush=True)
    rounds = []
    for round_index in range(args.rounds):
        result = {}
        for name in round_order(trainers, round_index):
            print(f"round {round_index + 1}/{args.rounds}: {name} ...", flush=True)
            result[name] = {"inference_s": forward_seconds(networks[name], data, args.steps, args.device, warmup=1)}
        rounds.append({name: result[name] for name in trainers})
    ratios = ratio_statistics(rounds, keys=("inference_s",))
    summary = {"plans": args.plans or "built-in BraTS 2021 3d_fullres", "configuration": args.configuration,
               "patch": patch, "device": args.device, "rounds": args.rounds, "steps": args.steps,
               "features_per_stage": config.network_arch_init_kwargs["features_per_stage"],
               "trainers": {name: {"inference_s": statistics.median(r[name]["inference_s"] for r in rounds),
                                   "ratio": ratios[name]["inference_s"], "gflop": flops[name] / 1e9,
                                   "flop_ratio": flops[name] / flops[BASELINE], "parameters": parameters[name]}
                            for name in trainers}}
    print(f"\n{summary['plans']}, {args.configuration}, features {summary['features_per_stage']}, patch {patch}, "
          f"batch 1, {args.device}; {args.rounds} interleaved rounds x {args.steps} forward passes (median); "
          f"ratio: median of the per-round ratios (min-max)")
    print(f"{'trainer':<26}{'forward s':>10}{'ratio':>19}{'GFLOP':>9}{'FLOP ratio':>12}{'params (M)':>12}")
    for name, row in summary["trainers"].items():
        cell = f"{row['ratio']['median']:.2f} ({row['ratio']['min']:.2f}-{row['ratio']['max']:.2f})"
        print(f"{name:<26}{row['inference_s']:10.3f}{cell:>19}{row['gflop']:9.1f}{row['flop_ratio']:12.2f}"
              f"{row['parameters'] / 1e6:12.2f}")
    check = ratios[IDENTICAL_NETWORK]["inference_s"]
    verdict = "within" if check["min"] <= 1.0 <= check["max"] else "OUTSIDE"
    print(f"check: {IDENTICAL_NETWORK} ratio {check['median']:.3f} (range {check['min']:.3f}-{check['max']:.3f}): "
          f"1.00 is {verdict} the range")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
