"""Run a trainer's real ``initialize`` and ``train_step`` under DistributedDataParallel on CPU (gloo backend).

nnU-Net's DDP path needs CUDA (NCCL, ``device_ids=[rank]``). :func:`run_ddp_steps` reproduces it on CPU in
spawned processes: ``torch.distributed`` is initialised with gloo *before* the trainer is created (so the
trainer sees ``is_ddp`` and its rank, as under ``nnUNetv2_train -num_gpus 2``), the device is set back to
the CPU, and nnU-Net's own ``initialize`` wraps the network in ``DistributedDataParallel`` with its own
arguments (``find_unused_parameters`` left at False) minus ``device_ids``. The DDP-aware parts of nnU-Net
(batch size split over ranks, Dice loss with ``ddp=True``, deep-supervision weights) are the real ones.

Every callable passed in must be picklable (a module-level function, class or ``functools.partial``), as
``torch.multiprocessing.spawn`` sends it to the workers. To add a trainer (e.g. a D²-Net variant), call
:func:`run_ddp_steps` with its class and a batch factory; pass ``network_factory`` / ``loss_fn`` only to
replace the trainer's network or ``compute_losses``.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tests.conftest import PLAIN_UNET, tiny_dataset_json, tiny_plans


def _cpu_ddp(module: torch.nn.Module, device_ids=None, **kwargs) -> DistributedDataParallel:
    """nnU-Net's ``DDP(network, device_ids=[rank])`` for a CPU module (gloo needs ``device_ids=None``)."""
    return DistributedDataParallel(module, **kwargs)


def _worker(rank: int, world_size: int, workdir: str, trainer_class: type, network_class_name: str,
            batch_factory: Callable, network_factory: Callable | None, loss_fn: Callable | None, steps: int) -> None:
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world_size)
    try:
        nnunet_trainer_module.DDP = _cpu_ddp
        plans = tiny_plans(network_class_name, batch_size=world_size)
        plans["continue_training"] = False
        trainer = trainer_class(plans, "3d_tiny", 0, tiny_dataset_json(), torch.device("cpu"))
        assert trainer.is_ddp and trainer.local_rank == rank
        trainer.device, trainer.grad_scaler = torch.device("cpu"), None  # nnU-Net assumes one GPU per rank
        if network_factory is not None:
            def build(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                      enable_deep_supervision=True):
                return network_factory()
            trainer.build_network_architecture = build
        torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway; equal seeds make that a no-op
        trainer.initialize()
        assert isinstance(trainer.network, DistributedDataParallel)
        if loss_fn is not None:
            trainer.compute_losses = types.MethodType(loss_fn, trainer)
        trainer.network.train()
        for step in range(steps):
            np.random.seed(1000 * step + rank)  # different dropout draws on each rank, as in real training
            trainer.train_step(batch_factory(rank, step))
        torch.save({k: v.detach().clone() for k, v in trainer.network.module.state_dict().items()},
                   Path(workdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ddp_steps(trainer_class: type, batch_factory: Callable[[int, int], dict], workdir: Path, *,
                  network_factory: Callable[[], torch.nn.Module] | None = None,
                  loss_fn: Callable | None = None, network_class_name: str = PLAIN_UNET,
                  world_size: int = 2, steps: int = 2) -> list[dict[str, torch.Tensor]]:
    """Train ``steps`` steps of ``trainer_class`` on ``world_size`` CPU processes under DDP.

    Two steps by default: DDP (``find_unused_parameters=False``) reports a parameter that got no gradient
    only when the *next* forward pass starts.

    Args:
        trainer_class: a trainer of the package (module-level class), built on :func:`tiny_plans`.
        batch_factory: ``(rank, step) -> {"data": (B, 4, 16, 16, 16), "target": ...}``, B = 1 per rank.
        workdir: empty folder for the rendezvous file, nnU-Net's results and each rank's final weights.
        network_factory: replaces ``build_network_architecture`` (the network before DDP wrapping).
        loss_fn: replaces ``compute_losses``; called as ``loss_fn(trainer, data, target)``.
        network_class_name: plans' network class (plain or residual-encoder U-Net).
        world_size: number of processes.
        steps: optimisation steps per process.

    Returns:
        Each rank's final state dict (in rank order).

    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank failed (its traceback is in the message).
    """
    workdir = Path(workdir)
    data_folder = workdir / "preprocessed" / tiny_plans()["dataset_name"] / "nnUNetPlans_3d_tiny"
    data_folder.mkdir(parents=True, exist_ok=True)
    (data_folder / "placeholder.b2nd").touch()  # lets initialize() infer the dataset class; never read
    paths = {"nnUNet_results": str(workdir / "results"), "nnUNet_preprocessed": str(workdir / "preprocessed")}
    saved = {name: os.environ.get(name) for name in paths}
    os.environ.update(paths)  # inherited by the spawned workers
    try:
        mp.spawn(_worker, args=(world_size, str(workdir), trainer_class, network_class_name, batch_factory,
                                network_factory, loss_fn, steps), nprocs=world_size, join=True)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return [torch.load(workdir / f"rank{rank}.pt") for rank in range(world_size)]


def assert_same_parameters(states: list[dict[str, torch.Tensor]]) -> None:
    """Every rank ends with bit-identical weights."""
    reference = states[0]
    for rank, state in enumerate(states[1:], start=1):
        assert state.keys() == reference.keys()
        different = [k for k in reference if not torch.equal(state[k], reference[k])]
        assert not different, f"rank {rank} differs from rank 0 in {different[:5]}"
