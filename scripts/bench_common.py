"""Shared helpers of the benchmark scripts: a phantom work folder and budgeted training of any trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nnunet_missingmod.demo import nnunet_environment, prepare_phantom_dataset

DATASET_ID = 990
DATASET_NAME = f"Dataset{DATASET_ID:03d}_BraTSPhantom"
CONFIGURATION = "3d_cpu"


def prepare(work: Path, *, num_cases: int = 40, num_test: int = 10) -> dict[str, str]:
    """Phantoms + plans + 3d_cpu in ``work``; sets the nnU-Net variables in this process; returns the env."""
    work.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(work)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                            "nnUNet_extTrainer", "nnUNet_def_n_proc", "nnUNet_n_proc_DA",
                                            "nnUNet_compile")})
    prepare_phantom_dataset(work, env, dataset_id=DATASET_ID, num_cases=num_cases, num_test=num_test)
    return env


def model_dir(work: Path, trainer: str) -> Path:
    return work / "nnUNet_results" / DATASET_NAME / f"{trainer}__nnUNetPlans__{CONFIGURATION}"


def train_with_budget(trainer: str, epochs: int, iterations: int, device: str = "cpu") -> None:
    """Train fold 0 of any trainer (plain nnUNetTrainer too) for ``epochs`` x ``iterations``, in this process.

    The budget is set on the trainer object before training, so every trainer gets exactly the same one.
    Mirroring TTA stays as the trainer configures it; evaluations below switch it off for all trainers alike.
    """
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    instance = get_trainer_from_args(str(DATASET_ID), CONFIGURATION, 0, trainer, device=torch.device(device))
    instance.num_epochs = epochs
    instance.num_iterations_per_epoch = iterations
    instance.num_val_iterations_per_epoch = max(1, iterations // 5)
    instance.save_every = epochs
    instance.run_training()


def run_worker(script: str, args: list[str], env: dict[str, str]) -> dict:
    """Run ``script --worker ...`` in a fresh interpreter; its last stdout line is a JSON result."""
    completed = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])
