"""Shared helpers of the benchmark scripts: phantom work folders per regime and budgeted, resumable training.

A *regime* fixes the phantom spacing, the CPU configuration (patch, features, batch) and the training
budget of a benchmark, so that every trainer of one table is trained and scored under the same conditions.
``short`` is the original one (dataset 990, 2 mm, patch 48³, 500 iterations; the tables in docs/RESULTS.md);
``converged`` is meant to let plain nnUNetTrainer converge on two CPU cores (see :data:`REGIMES`).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from nnunet_missingmod.demo import nnunet_environment

DATASET_ID = 990
DATASET_NAME = f"Dataset{DATASET_ID:03d}_BraTSPhantom"
CONFIGURATION = "3d_cpu"


@dataclass(frozen=True)
class Regime:
    """Data, configuration and budget of one benchmark regime.

    Attributes:
        name: regime name (``--regime``).
        dataset_id: phantom dataset id (its own dataset per spacing, so regimes never share preprocessed data).
        spacing: isotropic phantom spacing in mm.
        patch_size: patch of the CPU configuration.
        features: features per stage of the CPU configuration (its number is the number of stages).
        batch_size: batch size of the CPU configuration.
        epochs: training epochs.
        iterations: training iterations per epoch (validation: a fifth of it).
        save_every: epochs between the ``checkpoint_latest.pth`` that an interrupted run continues from.
        note: how the values were chosen.
    """

    name: str
    dataset_id: int
    spacing: float
    patch_size: tuple[int, int, int]
    features: tuple[int, ...]
    batch_size: int
    epochs: int
    iterations: int
    save_every: int
    note: str = ""
    num_cases: int = 40
    num_test: int = 10
    configuration: str = CONFIGURATION

    @property
    def dataset_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_BraTSPhantom"


REGIMES: dict[str, Regime] = {
    "short": Regime("short", DATASET_ID, 2.0, (48, 48, 48), (16, 32, 64, 128), 2, epochs=20, iterations=25,
                    save_every=5, note="500 iterations: the equal-budget comparison of docs/RESULTS.md; "
                                       "no model has converged"),
    # 3 mm phantoms with a 32³ patch see the same 96 mm field of view as 2 mm with 48³ at 30% of the voxels.
    # Measured for plain nnUNetTrainer, seed 0, on two quiet cores (docs/RESULTS.md, "The converged regime"):
    # 40 x 90 iterations (15 min) still gained 8.2 points of EMA pseudo-Dice in its last quarter; 120 x 40
    # (4800 iterations; 10 s per epoch with its validation, about 20 min) gains 2.2, so it is close to, not at, the
    # plateau: nnU-Net's poly schedule keeps improving the model while its learning rate anneals. Short epochs
    # keep nnU-Net's EMA (counted in epochs) from lagging a quarter of training behind. A narrower network
    # (8-64 features) is only 1.5x faster per iteration and would leave the per-modality encoders of the
    # multi-encoder trainers (half or three quarters of the plans' widths) with 4-6 features. Three seeds later
    # gained +1.9, +4.6 and +3.9 points in their last quarter, and 480 epochs (seed 0) changed its held-out Dice
    # with all four sequences from 83.8 / 67.7 / 74.0 to 96.5 / 72.3 / 97.5 while its EMA climbed again in the
    # poly schedule's last 100 epochs (+5.1 in the last quarter): no budget here is a plateau yet, so longer runs
    # are variants with their own label and --epochs-for (docs/RESULTS.md).
    "converged": Regime("converged", 991, 3.0, (32, 32, 32), (16, 32, 64, 128), 2, epochs=120, iterations=40,
                        save_every=5, note="120 x 40 iterations (about 20 min on 2 CPU cores) is not a plateau for "
                                           "plain nnUNetTrainer either (+1.9 to +4.6 points in the last quarter over "
                                           "3 seeds; 480 epochs still changed its held-out Dice): read each run's "
                                           "plateau column and budget"),
}


def prepare(work: Path, *, num_cases: int | None = None, num_test: int | None = None,
            regime: Regime = REGIMES["short"]) -> dict[str, str]:
    """Phantoms + plans + the regime's CPU configuration in ``work`` (finished steps are reused).

    The demo's preparation (``demo.prepare_phantom_dataset``) with the regime's spacing, patch, features and
    batch. Sets the nnU-Net variables in this process and returns the environment for child processes.
    """
    from nnunet_missingmod.demo import prepare_phantom_dataset

    work.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(work)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                            "nnUNet_extTrainer", "nnUNet_def_n_proc", "nnUNet_n_proc_DA",
                                            "nnUNet_compile")})
    prepare_phantom_dataset(work, env, dataset_id=regime.dataset_id,
                            num_cases=regime.num_cases if num_cases is None else num_cases,
                            num_test=regime.num_test if num_test is None else num_test, seed=0,
                            configuration=regime.configuration, patch_size=regime.patch_size,
                            num_processes=int(env["nnUNet_def_n_proc"]), spacing=regime.spacing,
                            features_per_stage=regime.features, batch_size=regime.batch_size, preview=False)
    return env


def model_dir(work: Path, trainer: str) -> Path:
    """Model folder of ``trainer`` in the short regime's (original) layout, ``work/nnUNet_results``."""
    return results_model_dir(work / "nnUNet_results", trainer, REGIMES["short"])


def results_model_dir(results: Path, trainer: str, regime: Regime) -> Path:
    """nnU-Net's model folder of ``trainer`` under an ``nnUNet_results`` folder."""
    return results / regime.dataset_name / f"{trainer}__nnUNetPlans__{regime.configuration}"


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's streams of this process (initial weights, the main process's draws).

    nnU-Net's augmentation workers draw from their own streams, so two runs with one seed are not
    bit-identical; distinct seeds give distinct, recorded initialisations.
    """
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_with_budget(trainer: str, epochs: int, iterations: int, device: str = "cpu", *,
                      regime: Regime = REGIMES["short"], seed: int | None = None, continue_training: bool = False,
                      save_every: int | None = None) -> int:
    """Train fold 0 of any trainer (plain nnUNetTrainer too) for ``epochs`` x ``iterations``, in this process.

    The budget is set on the trainer object before training, so every trainer gets exactly the same one.
    Mirroring TTA stays as the trainer configures it; evaluations below switch it off for all trainers alike.
    ``continue_training`` resumes from the model folder's latest checkpoint, as ``nnUNetv2_train --c`` does;
    ``checkpoint_latest.pth`` is written every ``save_every`` epochs (default: only the final checkpoint).
    The model folder is under ``nnUNet_results`` as this process sees it.

    Returns:
        The number of epochs this process trained (fewer than ``epochs`` when it resumed a checkpoint).
    """
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    if seed is not None:
        seed_everything(seed)
    instance = get_trainer_from_args(str(regime.dataset_id), regime.configuration, 0, trainer,
                                     device=torch.device(device))
    instance.num_epochs = epochs
    instance.num_iterations_per_epoch = iterations
    instance.num_val_iterations_per_epoch = max(1, iterations // 5)
    instance.save_every = save_every or epochs
    maybe_load_checkpoint(instance, continue_training, False)
    first_epoch = instance.current_epoch  # the checkpoint's next epoch when resuming, else 0
    instance.run_training()
    return epochs - first_epoch


def run_worker(script: str, args: list[str], env: dict[str, str], log: Path | None = None) -> dict:
    """Run ``script --worker ...`` in a fresh interpreter; its last stdout line is a JSON result.

    With ``log``, the worker's output (stdout and stderr, e.g. nnU-Net's per-epoch lines) is appended to that file
    as it comes, so a long run can be followed with ``tail -f``; without, it is captured.
    """
    command = [sys.executable, script, *args]
    if log is None:
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"worker {' '.join(args)} failed:\n{completed.stdout[-2000:]}\n"
                               f"{completed.stderr[-4000:]}")
        return _last_json(completed.stdout)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as stream:
        start = stream.tell()
        stream.write(f"\n$ {' '.join(command)}\n")
        stream.flush()
        returncode = subprocess.run(command, env=env, stdout=stream, stderr=subprocess.STDOUT).returncode
    with log.open() as stream:
        stream.seek(start)
        output = stream.read()
    if returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed (exit {returncode}); the end of {log}:\n{output[-4000:]}")
    return _last_json(output)


def _last_json(output: str) -> dict:
    """The last line of a worker's output that is a JSON object (warnings printed at shutdown may follow it)."""
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise RuntimeError(f"the worker printed no JSON result; its output ended with:\n{output[-2000:]}")
