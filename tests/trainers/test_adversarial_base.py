"""The GAN trainer base: alternating updates, the discriminator in the checkpoint, resume, schedule, atomic saves.

A toy generator/discriminator pair on the tiny hand-written plans, driven through nnU-Net's hooks in the order of
``run_training`` with fixed synthetic batches (no data loaders), seeded per step so that two runs take identical
steps.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_missingmod.trainers import base as base_module
from nnunet_missingmod.trainers.adversarial import AdversarialTrainer, ConstantThenLinearLR
from tests.conftest import make_tiny_trainer
from tests.trainers.resume_checks import (
    assert_same_logs,
    assert_same_modules,
    assert_same_optimizer_state,
    logs_without_timestamps,
    run_epochs,
)


class ToyGANTrainer(AdversarialTrainer):
    """Translate channel 0 into channel 1 with a 1-layer generator against a 1-layer LSGAN critic."""

    generator_terms = ("adv", "l1")
    discriminator_terms = ("real", "fake")
    validation_metric_names = ("neg_l1", "l1")
    validation_loss_name = "l1"

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision=True):
        return nn.Conv3d(1, 1, 3, padding=1)

    def build_discriminator(self) -> nn.Module:
        return nn.Sequential(nn.Conv3d(1, 2, 3, stride=2), nn.LeakyReLU(0.2), nn.Conv3d(2, 1, 3))

    def discriminator_losses(self, data, target):
        fake = self.network(data[:, :1]).detach()
        real = self.discriminator(data[:, 1:2])
        losses = {"real": ((real - 1) ** 2).mean(), "fake": (self.discriminator(fake) ** 2).mean()}
        losses["total"] = 0.5 * (losses["real"] + losses["fake"])
        return losses

    def generator_losses(self, data, target):
        fake = self.network(data[:, :1])
        losses = {"adv": ((self.discriminator(fake) - 1) ** 2).mean(), "l1": (fake - data[:, 1:2]).abs().mean()}
        losses["total"] = losses["adv"] + 10 * losses["l1"]
        return losses

    def validation_metrics(self, data, target):
        l1 = (self.network(data[:, :1]) - data[:, 1:2]).abs().flatten(1).mean(1).cpu().numpy()
        return {"neg_l1": -l1, "l1": l1}

    def write_examples(self, filename):
        with open(filename, "w") as f:
            f.write("example")


def _batch(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(2, 4, 16, 16, 16, generator=generator)
    return {"data": data, "target": torch.zeros(2, 3, 16, 16, 16)}


def _trainer(tmp_path, monkeypatch, iterations: int = 1, n_critic: int = 1):
    trainer = make_tiny_trainer(ToyGANTrainer, tmp_path, monkeypatch)
    trainer.num_iterations_per_epoch = iterations
    trainer.save_every = 1
    trainer.n_critic = n_critic
    torch.manual_seed(0)
    trainer.initialize()
    trainer.logger.plot_progress_png = lambda folder: None  # speed only
    counter = iter(range(10**6))
    trainer.dataloader_train = (_batch(10_000 + next(counter)) for _ in iter(int, 1))  # fresh critic batches
    return trainer


def test_each_update_moves_only_its_own_network(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, monkeypatch)
    g_before = [p.detach().clone() for p in trainer.network.parameters()]
    d_before = [p.detach().clone() for p in trainer.discriminator.parameters()]
    d_after_critic = {}

    original = ToyGANTrainer.generator_losses

    def generator_losses(self, data, target):  # runs after the critic update and before the generator update
        d_after_critic["weights"] = [p.detach().clone() for p in self.discriminator.parameters()]
        d_after_critic["frozen"] = all(not p.requires_grad for p in self.discriminator.parameters())
        for a, b in zip(g_before, self.network.parameters(), strict=False):
            torch.testing.assert_close(b, a)  # the critic update leaves the generator alone
        return original(self, data, target)
    monkeypatch.setattr(ToyGANTrainer, "generator_losses", generator_losses)
    outputs = trainer.train_step(_batch(0))

    assert d_after_critic["frozen"]
    assert any(not torch.equal(a, b) for a, b in zip(d_before, d_after_critic["weights"], strict=False))
    for a, b in zip(d_after_critic["weights"], trainer.discriminator.parameters(), strict=False):
        torch.testing.assert_close(b, a)  # the generator update leaves the critic alone
    assert any(not torch.equal(a, b) for a, b in zip(g_before, trainer.network.parameters(), strict=False))
    assert all(p.requires_grad for p in trainer.discriminator.parameters())
    assert {"loss", "loss_adv", "loss_l1", "loss_real", "loss_fake"} == outputs.keys()
    assert outputs["loss"] == pytest.approx(outputs["loss_adv"] + 10 * outputs["loss_l1"], rel=1e-5)


def test_n_critic_updates_use_fresh_batches(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, monkeypatch, n_critic=3)
    seen = []
    original = ToyGANTrainer.discriminator_losses

    def discriminator_losses(self, data, target):
        seen.append(float(data[0, 0, 0, 0, 0]))
        return original(self, data, target)
    monkeypatch.setattr(ToyGANTrainer, "discriminator_losses", discriminator_losses)
    calls = []
    original_generator = ToyGANTrainer.generator_losses
    monkeypatch.setattr(ToyGANTrainer, "generator_losses",
                        lambda self, data, target: calls.append(float(data[0, 0, 0, 0, 0])) or
                        original_generator(self, data, target))
    trainer.train_step(_batch(5))
    assert len(seen) == 3 and len(set(seen)) == 3 and seen[0] == float(_batch(5)["data"][0, 0, 0, 0, 0])
    assert calls == [seen[-1]]  # one generator update, on the last critic batch


def test_resumed_run_restores_the_discriminator_and_its_optimiser(tmp_path, monkeypatch):
    uninterrupted = _trainer(tmp_path, monkeypatch)
    run_epochs(uninterrupted, 2, _batch)
    checkpoint = str(tmp_path / "killed.pth")
    shutil.copyfile(uninterrupted.output_folder + "/checkpoint_latest.pth", checkpoint)
    run_epochs(uninterrupted, 3, _batch)

    resumed = _trainer(tmp_path, monkeypatch)
    resumed.load_checkpoint(checkpoint)
    assert resumed.current_epoch == 2
    run_epochs(resumed, 3, _batch)

    logs_a, logs_b = logs_without_timestamps(uninterrupted), logs_without_timestamps(resumed)
    assert logs_a.keys() == logs_b.keys() >= {"loss_adv", "loss_l1", "loss_real", "loss_fake", "val_l1",
                                              "val_neg_l1", "lrs_discriminator"}
    assert_same_logs(logs_a, logs_b, rtol=1e-5, length=3)
    assert_same_modules(uninterrupted, resumed, ("network", "discriminator"), rtol=1e-5, atol=1e-6)
    assert_same_optimizer_state(uninterrupted, resumed, ("optimizer_d",), "exp_avg", rtol=1e-5, atol=1e-6)
    # nnU-Net's pseudo-Dice slot holds the first validation metric
    np.testing.assert_allclose(logs_b["mean_fg_dice"], logs_b["val_neg_l1"])
    np.testing.assert_allclose(logs_b["val_losses"], logs_b["val_l1"])
    examples = Path(resumed.output_folder) / "examples"
    assert sorted(p.name for p in examples.iterdir()) == ["epoch_0000.png", "epoch_0001.png", "epoch_0002.png"]
    assert (Path(resumed.output_folder) / "progress_adversarial.png").stat().st_size > 0


def test_checkpoint_without_discriminator_state_is_refused(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, monkeypatch)
    run_epochs(trainer, 1, _batch)
    checkpoint = torch.load(trainer.output_folder + "/checkpoint_latest.pth", weights_only=False)
    del checkpoint["missingmod_state"]
    torch.save(checkpoint, tmp_path / "old.pth")
    fresh = _trainer(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match=r"old\.pth has no discriminator state"):
        fresh.load_checkpoint(str(tmp_path / "old.pth"))


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, monkeypatch)
    latest = trainer.output_folder + "/checkpoint_latest.pth"
    trainer.save_checkpoint(latest)
    before = open(latest, "rb").read()

    def killed_mid_write(obj, path):
        with open(path, "wb") as f:
            f.write(b"truncated")
        raise KeyboardInterrupt
    monkeypatch.setattr(base_module.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(latest)
    assert open(latest, "rb").read() == before
    assert not any(name.endswith(".partial") for name in os.listdir(trainer.output_folder))


def test_constant_then_linear_schedule_against_the_formula():
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1e-4)
    schedule = ConstantThenLinearLR(optimizer, 1e-4, max_steps=10, constant_fraction=0.5, final_lr=1e-6)
    got = []
    for epoch in range(10):
        schedule.step(epoch)
        got.append(optimizer.param_groups[0]["lr"])
    expected = [1e-4] * 5 + [1e-4 - (1e-4 - 1e-6) * (k / 4) for k in range(0, 5)]
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    with pytest.raises(ValueError, match="constant_fraction"):
        ConstantThenLinearLR(optimizer, 1e-4, 10, constant_fraction=1.5)


@pytest.mark.parametrize("settings, message", [
    ({"n_critic": 0}, "n_critic must be an integer >= 1"),
    ({"gradient_clip": -1}, "gradient_clip must be null or > 0"),
])
def test_bad_settings_are_refused(settings, message, tmp_path, monkeypatch):
    import json

    from nnunet_missingmod.config import OVERRIDE_ENV
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"adversarial": settings}))
    monkeypatch.setenv(OVERRIDE_ENV, str(override))
    with pytest.raises(ValueError, match=message):
        make_tiny_trainer(ToyGANTrainer, tmp_path, monkeypatch)
