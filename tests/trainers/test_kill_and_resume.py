"""Every trainer of the package through ``nnUNetv2_train``: killed with SIGKILL during an epoch, resumed with ``--c``.

The resumed run must end like an uninterrupted one would: every epoch logged exactly once (nnU-Net's losses and each
loss term of the trainer, none missing, none repeated, all finite), the extra state in the final checkpoint, and a
training log that shows the resume. (That the restored state equals an uninterrupted run's, value by value, is
checked in-process in test_resume_and_numerics.py and test_adversarial_base.py, where the steps can be made
deterministic; nnU-Net's data loader processes cannot.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.conftest import E2E_DATASET, E2E_NAME, nnunet_script

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and SIGKILL")

EPOCHS = 3
#: trainer -> loss terms it logs besides nnU-Net's own (read from the class, so new terms are covered)
TRAINERS = ["ModalityDropoutTrainer", "SharedLatentTrainer", "D2NetTrainer", "CMFTPretrainer"]
#: per-trainer additions to the override file (which is strict: only keys the trainer has)
EXTRA_SETTINGS = {"CMFTPretrainer": {"cmft": {"final_validation": False}}}


def _loss_terms(trainer_name: str) -> tuple[str, ...]:
    import nnunet_missingmod.trainers as trainers

    trainer_class = getattr(trainers, trainer_name)
    if hasattr(trainer_class, "discriminator_terms"):  # GAN trainers: generator and discriminator terms
        return (*trainer_class.generator_terms, *trainer_class.discriminator_terms)
    return tuple(getattr(trainer_class, "loss_terms", ()) or ())


def _wait_for(predicate, timeout: float, what: str, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"training ended before {what}:\n{open(log.name).read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


@pytest.mark.parametrize("trainer_name", TRAINERS)
def test_sigkill_mid_epoch_then_continue(trainer_name, trained_model, tmp_path):
    work, _, _ = trained_model
    env = json.loads((work / "env.json").read_text())
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"nnunet": {"num_epochs": EPOCHS, "num_iterations_per_epoch": 3,
                                               "num_val_iterations_per_epoch": 1, "save_every": 1},
                                    "inference": {"test_time_mirroring": False},
                                    **EXTRA_SETTINGS.get(trainer_name, {})}))
    env = {**env, "nnUNet_results": str(tmp_path / "results"), "nnUNet_missingmod_config": str(override)}
    command = [nnunet_script("nnUNetv2_train"), str(E2E_DATASET), "3d_cpu", "0", "-tr", trainer_name,
               "-device", "cpu"]
    fold = tmp_path / "results" / E2E_NAME / f"{trainer_name}__nnUNetPlans__3d_cpu" / "fold_0"

    def in_epoch_one() -> bool:  # the checkpoint of epoch 0 is written and epoch 1 has started
        logs = list(fold.glob("training_log_*.txt"))
        return (fold / "checkpoint_latest.pth").exists() and bool(logs) and "Epoch 1" in logs[0].read_text()

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(in_epoch_one, 300, "epoch 1", first, log)
            time.sleep(1.0)  # inside epoch 1
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # the trainer and its data-augmentation workers
            first.wait()
    assert first.returncode == -signal.SIGKILL
    assert not (fold / "checkpoint_final.pth").exists()
    killed_at = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)["current_epoch"]
    assert killed_at in (1, 2)  # the epoch the kill interrupted starts again

    with open(tmp_path / "second.log", "w") as log:
        second = subprocess.run([*command, "--c"], env=env, stdout=log, stderr=subprocess.STDOUT)
    assert second.returncode == 0, (tmp_path / "second.log").read_text()[-3000:]

    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == EPOCHS
    logging = checkpoint["logging"]
    for key in ["train_losses", "val_losses", "mean_fg_dice", "lrs",
                *[f"loss_{t}" for t in _loss_terms(trainer_name)]]:
        values = np.asarray(logging[key], dtype=float)
        assert values.shape == (EPOCHS,), (key, values)  # each epoch once: nothing lost, nothing repeated
        if key != "loss_sfmc_uninformative":
            assert np.all(np.isfinite(values)), (key, values)
    logs = sorted(fold.glob("training_log_*.txt"))
    assert len(logs) >= 1 and any("Epoch 2" in p.read_text() for p in logs)
    assert json.loads((fold / "trainer_config.json").read_text())["trainer"] == trainer_name
    if trainer_name == "CMFTPretrainer":  # a GAN: its discriminator and optimiser went through the kill
        state = checkpoint["missingmod_state"]
        assert state["discriminator_weights"] and state["discriminator_optimizer_state"]["state"]
