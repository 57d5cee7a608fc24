"""Median time and peak memory of a training iteration per trainer, as ratios to plain nnUNetTrainer.

    python scripts/bench_train_step.py [--work-dir bench_work] [--trainers nnUNetTrainer ModalityDropoutTrainer
        SharedLatentTrainer D2NetTrainer] [--steps 15] [--device cpu]

Same plans (3d_cpu on the phantoms) and the same batch for every trainer: one batch is drawn once
from nnU-Net's data loader and saved, then each trainer runs in a fresh process, builds its network,
loss and optimiser (``initialize``), runs 3 warm-up steps and times ``train_step`` on that batch.
Also timed: the training augmentation pipeline per sample (ModalityDropoutTrainer's dropout is a
transform, so its cost is there). Peak memory: the process's maximum RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import CONFIGURATION, DATASET_ID, prepare, run_worker  # noqa: E402


def _trainer(name: str, device: str):
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(DATASET_ID), CONFIGURATION, 0, name, device=torch.device(device))
    trainer.initialize()
    return trainer


def make_batch(path: Path, device: str) -> None:
    import torch

    trainer = _trainer("nnUNetTrainer", device)
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    batch = next(trainer.dataloader_train)
    torch.save({"data": batch["data"], "target": batch["target"]}, path)


def time_inference(trainer, data, steps: int, device: str) -> float:
    """Median time of one forward pass of the inference network (as nnUNetv2_predict builds it) on ``data``."""
    import torch

    network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                 trainer.num_input_channels,
                                                 trainer.label_manager.num_segmentation_heads, False)
    network.load_state_dict(trainer.network.state_dict())
    network.to(trainer.device).eval()
    data = data.to(trainer.device)
    times = []
    with torch.no_grad():
        for step in range(steps + 2):
            start = time.perf_counter()
            network(data)
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= 2:  # warm-up
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, batch_file: Path, steps: int, device: str) -> dict:
    import numpy as np
    import torch

    trainer = _trainer(name, device)
    batch = torch.load(batch_file, weights_only=False)
    trainer.network.train()
    for _ in range(3):
        trainer.train_step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    inference_s = time_inference(trainer, batch["data"], steps, device)
    configured = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    rotation, dummy_2d, initial_patch, mirror_axes = configured
    transforms = trainer.get_training_transforms(
        trainer.configuration_manager.patch_size, rotation, trainer._get_deep_supervision_scales(), mirror_axes,
        dummy_2d, use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm,
        regions=trainer.label_manager.foreground_regions)
    np.random.seed(0)
    augment = []
    for _ in range(200):  # the pipeline's transforms fire at random: average many samples
        image = torch.randn(4, *initial_patch)
        seg = torch.randint(0, 4, (1, *initial_patch)).to(torch.int16)
        start = time.perf_counter()
        transforms(image=image, segmentation=seg)
        augment.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "peak_mb": peak_mb, "augment_s": statistics.mean(augment),
            "inference_s": inference_s,
            "parameters": sum(p.numel() for p in trainer.network.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="bench_work")
    parser.add_argument("--trainers", nargs="+", default=["nnUNetTrainer", "ModalityDropoutTrainer",
                                                          "SharedLatentTrainer", "D2NetTrainer"])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--make-batch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work_dir).resolve()
    env = prepare(work)
    batch_file = work / "bench_batch.pt"
    if args.make_batch:
        make_batch(batch_file, args.device)
        print(json.dumps({"batch": str(batch_file)}))
        return
    if args.worker:
        print(json.dumps(measure(args.worker, batch_file, args.steps, args.device)))
        return
    if not batch_file.is_file():
        run_worker(__file__, ["--make-batch", "--work-dir", str(work), "--device", args.device], env)
    results = {}
    for name in args.trainers:
        print(f"measuring {name} ...", flush=True)
        results[name] = run_worker(__file__, ["--worker", name, "--work-dir", str(work), "--steps", str(args.steps),
                                              "--device", args.device], env)
    base = results.get("nnUNetTrainer") or next(iter(results.values()))
    print(f"\n{CONFIGURATION} on {args.device}, {args.steps} timed steps (median), same batch for every trainer; "
          f"augment: mean over 200 samples of the training transforms")
    print(f"{'trainer':<28}{'step s':>9}{'ratio':>8}{'infer s':>9}{'ratio':>8}{'peak MB':>10}{'ratio':>8}"
          f"{'augment ms':>12}{'ratio':>8}{'params':>10}")
    for name, r in results.items():
        print(f"{name:<28}{r['step_s']:9.3f}{r['step_s'] / base['step_s']:8.2f}{r['inference_s']:9.3f}"
              f"{r['inference_s'] / base['inference_s']:8.2f}{r['peak_mb']:10.0f}"
              f"{r['peak_mb'] / base['peak_mb']:8.2f}{1000 * r['augment_s']:12.1f}"
              f"{r['augment_s'] / base['augment_s']:8.2f}{r['parameters']:10d}")
    (work / "bench_train_step.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
