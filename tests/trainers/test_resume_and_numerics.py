"""Every trainer of the package: a NaN/Inf loss stops training with a clear message and no NaN checkpoint, and a
run killed mid-epoch and resumed from nnU-Net's checkpoint (``--c``) ends in the state of an uninterrupted run.

In-process trainers on the tiny hand-written plans; epochs are driven through nnU-Net's hooks in the order of
``run_training`` with fixed synthetic batches and fake validation outputs (no data loaders), seeded per step so that
two runs take identical steps. A run killed mid-epoch leaves only the checkpoint of the last completed epoch on
disk (the steps it took after it die with the process), so a copy of that checkpoint stands for the killed run.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from nnunet_missingmod.trainers import CMFFTrainer, D2NetTrainer, ModalityDropoutTrainer, SharedLatentTrainer
from nnunet_missingmod.trainers import d2net as d2net_module
from nnunet_missingmod.trainers.base import (
    MultiTermLossTrainer,
    NonFiniteLossError,
    NonFiniteWeightsError,
)
from tests.conftest import make_tiny_trainer

TRAINERS = [ModalityDropoutTrainer, SharedLatentTrainer, D2NetTrainer, CMFFTrainer]
TIMESTAMP_KEYS = ("epoch_start_timestamps", "epoch_end_timestamps")


def _batch(epoch: int, iteration: int) -> dict:
    generator = torch.Generator().manual_seed(1000 * epoch + iteration)
    data = torch.randn(2, 4, 16, 16, 16, generator=generator)
    data[0, 1] = 0  # T1ce missing from the first case
    labels = torch.randint(0, 4, (2, 1, 16, 16, 16), generator=generator)
    regions = torch.cat([labels > 0, (labels == 2) | (labels == 3), labels == 3], 1).float()
    return {"data": data, "target": [regions[..., ::s, ::s, ::s].clone() for s in (1, 2)]}


def _trainer(trainer_class, tmp_path, monkeypatch, iterations: int = 2):
    monkeypatch.setattr(d2net_module, "plot_loss_terms", lambda history, filename: None)  # speed only
    trainer = make_tiny_trainer(trainer_class, tmp_path, monkeypatch)
    trainer.num_iterations_per_epoch = iterations
    trainer.save_every = 1
    torch.manual_seed(0)  # equal initial weights in every run
    trainer.initialize()
    trainer.logger.plot_progress_png = lambda folder: None  # speed only
    return trainer


def _train_step(trainer, epoch: int, iteration: int) -> dict:
    np.random.seed(1000 * epoch + iteration)  # modality dropout
    torch.manual_seed(1000 * epoch + iteration)
    return trainer.train_step(_batch(epoch, iteration))


def _run_epochs(trainer, stop: int) -> None:
    """nnU-Net's ``run_training`` loop from ``trainer.current_epoch`` to ``stop``."""
    for epoch in range(trainer.current_epoch, stop):
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        outputs = []
        for iteration in range(trainer.num_iterations_per_epoch):
            outputs.append(_train_step(trainer, epoch, iteration))
        trainer.on_train_epoch_end(outputs)
        trainer.on_validation_epoch_start()
        rate = 0.5 + 0.1 * epoch
        trainer.on_validation_epoch_end([{"tp_hard": np.full(3, 10 * rate), "fp_hard": np.full(3, 2.0),
                                          "fn_hard": np.full(3, 3.0), "loss": np.array(1 - rate)}])
        trainer.on_epoch_end()


def _logs(trainer) -> dict:
    return {k: v for k, v in trainer.logger.local_logger.my_fantastic_logging.items() if k not in TIMESTAMP_KEYS}


@pytest.mark.parametrize("trainer_class", TRAINERS, ids=lambda c: c.__name__)
def test_resumed_run_equals_an_uninterrupted_one(trainer_class, tmp_path, monkeypatch):
    uninterrupted = _trainer(trainer_class, tmp_path, monkeypatch, iterations=1)  # one step per epoch: CPU time
    _run_epochs(uninterrupted, 2)
    # what a run killed during epoch 2 leaves behind: the checkpoint of the end of epoch 1 (the steps it took in
    # epoch 2 are lost with the process, so the uninterrupted run's own epoch 2 can serve as the reference)
    checkpoint = str(tmp_path / "checkpoint_latest_of_the_killed_run.pth")
    shutil.copyfile(uninterrupted.output_folder + "/checkpoint_latest.pth", checkpoint)
    _run_epochs(uninterrupted, 3)

    resumed = _trainer(trainer_class, tmp_path, monkeypatch, iterations=1)  # a new process: nnUNetv2_train ... --c
    resumed.load_checkpoint(checkpoint)
    assert resumed.current_epoch == 2
    _run_epochs(resumed, 3)

    assert resumed.current_epoch == uninterrupted.current_epoch == 3
    expected, got = _logs(uninterrupted), _logs(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert len(got[key]) == 3, key  # one entry per epoch: nothing padded, nothing repeated
        np.testing.assert_allclose(np.asarray(got[key], float), np.asarray(expected[key], float), rtol=1e-5,
                                   err_msg=key)
    if issubclass(trainer_class, MultiTermLossTrainer):
        assert {f"loss_{t}" for t in trainer_class.loss_terms} <= got.keys()
    assert resumed._best_ema == pytest.approx(uninterrupted._best_ema)
    for (name, a), b in zip(uninterrupted.network.state_dict().items(), resumed.network.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    # every tensor of the optimiser state: SGD's momentum buffers, Adam's moments (CMFFTrainer)
    state_a = [t for s in uninterrupted.optimizer.state_dict()["state"].values() for k, t in sorted(s.items())
               if k != "step"]
    state_b = [t for s in resumed.optimizer.state_dict()["state"].values() for k, t in sorted(s.items())
               if k != "step"]
    assert len(state_a) == len(state_b) > 0
    for a, b in zip(state_a, state_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_checkpoint_without_term_logs_is_padded_to_the_epoch(tmp_path, monkeypatch):
    """A checkpoint written before a term was logged: the term gets NaN for the epochs it has no record of."""
    trainer = _trainer(SharedLatentTrainer, tmp_path, monkeypatch, iterations=1)
    _run_epochs(trainer, 1)
    checkpoint = torch.load(trainer.output_folder + "/checkpoint_best.pth", weights_only=False)
    for term in SharedLatentTrainer.loss_terms:
        del checkpoint["logging"][f"loss_{term}"]
    torch.save(checkpoint, trainer.output_folder + "/old.pth")
    resumed = _trainer(SharedLatentTrainer, tmp_path, monkeypatch, iterations=1)
    resumed.load_checkpoint(trainer.output_folder + "/old.pth")
    _run_epochs(resumed, 2)
    logs = resumed.logger.local_logger.my_fantastic_logging
    assert len(logs["train_losses"]) == 2
    for term in SharedLatentTrainer.loss_terms:
        assert len(logs[f"loss_{term}"]) == 2
        assert np.isnan(logs[f"loss_{term}"][0]) and np.isfinite(logs[f"loss_{term}"][1])


def _poison(trainer, monkeypatch, value: float) -> str:
    """Make the trainer's loss (or one term of it) ``value``; return what the message must show."""
    if not isinstance(trainer, MultiTermLossTrainer):
        loss = trainer.loss
        trainer.loss = lambda output, target: loss(output, target) * value
        return "total=nan" if np.isnan(value) else "total=inf"
    trainer_class = type(trainer)
    original_losses = trainer_class.compute_losses

    def compute_losses(self, data, target):
        losses = original_losses(self, data, target)
        losses["seg"] = losses["seg"] * value
        losses["total"] = losses["total"] + losses["seg"]
        return losses
    monkeypatch.setattr(trainer_class, "compute_losses", compute_losses)
    return "seg=nan" if np.isnan(value) else "seg=inf"


@pytest.mark.parametrize("trainer_class, value", [
    (ModalityDropoutTrainer, float("nan")), (ModalityDropoutTrainer, float("inf")),
    (SharedLatentTrainer, float("nan")), (D2NetTrainer, float("inf")),
], ids=["ModalityDropoutTrainer-nan", "ModalityDropoutTrainer-inf", "SharedLatentTrainer-nan", "D2NetTrainer-inf"])
def test_non_finite_loss_stops_training_before_a_checkpoint(trainer_class, value, tmp_path, monkeypatch):
    trainer = _trainer(trainer_class, tmp_path, monkeypatch)
    latest = trainer.output_folder + "/checkpoint_latest.pth"
    trainer.save_checkpoint(latest)  # finite, as at the end of an earlier epoch
    before = torch.load(latest, weights_only=False)
    shown = _poison(trainer, monkeypatch, value)
    with pytest.raises(NonFiniteLossError) as error:
        _run_epochs(trainer, 2)
    message = str(error.value)
    assert "epoch 0, iteration 1 of 2" in message and shown in message and "--c" in message
    after = torch.load(latest, weights_only=False)
    assert after["current_epoch"] == before["current_epoch"] == 1
    assert not os.path.exists(trainer.output_folder + "/checkpoint_best.pth")  # on_epoch_end never ran
    assert all(torch.isfinite(t).all() for t in after["network_weights"].values() if t.is_floating_point())
    assert "non-finite training loss" in open(trainer.log_file).read()


def test_checkpoint_with_non_finite_weights_is_refused(tmp_path, monkeypatch):
    trainer = _trainer(ModalityDropoutTrainer, tmp_path, monkeypatch)
    with torch.no_grad():
        next(trainer.network.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="refusing to write .*bad.pth: .* weight tensor"):
        trainer.save_checkpoint(str(tmp_path / "bad.pth"))
    assert not (tmp_path / "bad.pth").exists()
