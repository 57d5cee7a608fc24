"""Trainers under DistributedDataParallel: 2 CPU processes, gloo, nnU-Net's own initialize and our train_step.

Each rank gets different data (and a different modality dropout draw), so equal weights after the steps
mean the gradients were all-reduced. Two steps, because DDP reports a parameter without gradient only
at the next forward pass.
"""

from __future__ import annotations

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch.multiprocessing import ProcessRaisedException

from nnunet_missingmod.trainers import SharedLatentTrainer
from tests.conftest import PLAIN_UNET, RESENC_UNET, tiny_dataset_json, tiny_plans
from tests.trainers.ddp_helpers import assert_same_parameters, run_ddp_steps


def region_batch(rank: int, step: int) -> dict:
    """One (1, 4, 16, 16, 16) sample per rank with BraTS region targets at the two deep-supervision scales.

    Rank 1's case lacks T2 (an all-zero channel), as a case of a dataset with gaps would.
    """
    generator = torch.Generator().manual_seed(100 * step + rank)
    data = torch.randn(1, 4, 16, 16, 16, generator=generator)
    if rank == 1:
        data[:, 2] = 0
    labels = torch.randint(0, 4, (1, 1, 16, 16, 16), generator=generator)
    regions = torch.cat([labels > 0, (labels == 2) | (labels == 3), labels == 3], 1)  # WT, TC, ET
    return {"data": data, "target": [regions[..., ::s, ::s, ::s].clone() for s in (1, 2)]}


def segmentation_only(trainer, data: torch.Tensor, target) -> dict[str, torch.Tensor]:
    """An ablation-like ``compute_losses`` that leaves the reconstruction decoder without gradient."""
    dropped, available = trainer.drop_modalities(data)
    output, _ = trainer.network(dropped, available, return_aux=True)
    seg = trainer.loss(output, target)
    zero = torch.zeros((), device=data.device)
    return {"seg": seg, "sim": zero, "rec": zero, "total": seg}


class SharedLatentTrainerWithoutAnchor(SharedLatentTrainer):
    """The trainer without the zero-weighted parameter sum (what the DDP safety net prevents)."""

    def loss_for_backward(self, total: torch.Tensor) -> torch.Tensor:
        return total


def initial_weights(network_class_name: str) -> dict[str, torch.Tensor]:
    plans_manager = PlansManager(tiny_plans(network_class_name))
    torch.manual_seed(0)
    network = SharedLatentTrainer.build_network_architecture(
        plans_manager, plans_manager.get_configuration("3d_tiny"), 4, 3, enable_deep_supervision=True)
    return network.state_dict()


@pytest.mark.parametrize("network_class_name", [PLAIN_UNET, RESENC_UNET], ids=["plain", "resenc"])
def test_shared_latent_trainer_steps_identically_on_both_ranks(tmp_path, network_class_name):
    states = run_ddp_steps(SharedLatentTrainer, region_batch, tmp_path, network_class_name=network_class_name)
    assert_same_parameters(states)
    before = initial_weights(network_class_name)
    changed = [k for k, v in states[0].items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("encoders.") for k in changed) and any(k.startswith("reconstruction.") for k in changed)
    assert tiny_dataset_json()["channel_names"]  # the tiny dataset is BraTS-like: 4 channels


def test_parameters_without_gradient_are_safe_under_ddp(tmp_path):
    # the reconstruction decoder gets no gradient from this loss; the trainer's zero-weighted sum covers it
    states = run_ddp_steps(SharedLatentTrainer, region_batch, tmp_path, loss_fn=segmentation_only)
    assert_same_parameters(states)


def test_without_the_safety_net_ddp_fails(tmp_path):
    # the harness can fail: the same run without the zero-weighted sum is what nnU-Net's DDP rejects
    with pytest.raises(ProcessRaisedException, match="finished reduction"):
        run_ddp_steps(SharedLatentTrainerWithoutAnchor, region_batch, tmp_path, loss_fn=segmentation_only)


@pytest.mark.parametrize("trainer_name", ["D2NetTrainer_noKD", "D2NetTrainer_logitKDOnly"])
def test_d2net_ablations_step_identically_on_both_ranks(tmp_path, trainer_name):
    """The ablations that leave parameters without gradient (_noKD) or train projections by their own term."""
    import nnunet_missingmod.trainers as trainers

    states = run_ddp_steps(getattr(trainers, trainer_name), region_batch, tmp_path)
    assert_same_parameters(states)
    assert any(k.startswith("code_encoder.") for k in states[0])  # the D²-Net network was trained
