"""The ``p_keep_all`` curriculum: its schedule by hand, its checks, and where the trainers draw it."""

import json

import numpy as np
import pytest
import torch

from nnunet_missingmod.config import OVERRIDE_ENV, load_trainer_config
from nnunet_missingmod.trainers import ModalityDropoutTrainer, SharedLatentTrainer
from nnunet_missingmod.trainers.base import MissingModTrainerBase
from nnunet_missingmod.transforms.modality_dropout import (
    check_curriculum,
    p_keep_all_at,
    settings_at,
    transform_from_settings,
)

RAMP = {"p_keep_all_start": 1.0, "ramp_fraction": 0.5}
#: uniform_subset keeps all four with probability 1/4 (k = 4) x 1 (one subset of size 4)
UNIFORM_ALL_FOUR = 0.25


@pytest.mark.parametrize(("progress", "expected"), [(0.0, 1.0), (0.1, 0.85), (0.25, 0.625), (0.5, 0.25),
                                                     (0.9, 0.25), (1.0, 0.25)])
def test_p_keep_all_falls_linearly_then_stays(progress, expected):
    settings = {"scheme": "uniform_subset", "p_keep_all": 0.25, "curriculum": RAMP}
    # by hand: 1.0 + (0.25 - 1.0) * min(progress / 0.5, 1)
    assert p_keep_all_at(settings, progress) == pytest.approx(expected)
    assert settings_at(settings, progress) == {**settings, "p_keep_all": pytest.approx(expected)}
    assert settings["p_keep_all"] == 0.25  # the section itself is left as it is


def test_without_a_curriculum_p_keep_all_is_constant():
    for settings in ({"p_keep_all": 0.25}, {"p_keep_all": 0.25, "curriculum": None}):
        assert [p_keep_all_at(settings, t) for t in (0.0, 0.5, 1.0)] == [0.25, 0.25, 0.25]
    # a rising curriculum is allowed too (fewer complete samples first)
    rising = {"p_keep_all": 0.5, "curriculum": {"p_keep_all_start": 0.0, "ramp_fraction": 1.0}}
    assert p_keep_all_at(rising, 0.5) == pytest.approx(0.25)


@pytest.mark.parametrize(("curriculum", "scheme", "message"), [
    ({"p_keep_all_start": 1.0}, "uniform_subset", r"must be null or \{"),
    ({"p_keep_all_start": 1.0, "ramp_fraction": 0.5, "epochs": 3}, "uniform_subset", r"must be null or \{"),
    (0.5, "uniform_subset", r"must be null or \{"),
    ({"p_keep_all_start": 1.5, "ramp_fraction": 0.5}, "uniform_subset", r"p_keep_all_start must be in \[0, 1\]"),
    ({"p_keep_all_start": True, "ramp_fraction": 0.5}, "uniform_subset", r"p_keep_all_start must be in \[0, 1\]"),
    ({"p_keep_all_start": 1.0, "ramp_fraction": 0}, "uniform_subset", r"ramp_fraction must be in \(0, 1\]"),
    ({"p_keep_all_start": 1.0, "ramp_fraction": "half"}, "uniform_subset", r"ramp_fraction must be in \(0, 1\]"),
    (RAMP, "fixed", "must be null with scheme 'fixed'"),
])
def test_bad_curricula_name_the_config_key(curriculum, scheme, message):
    with pytest.raises(ValueError, match=r"modality_dropout\.curriculum.*" + message):
        check_curriculum({"scheme": scheme, "p_keep_all": 0.0, "curriculum": curriculum})


def test_a_transform_refuses_a_curriculum():
    shipped = load_trainer_config(ModalityDropoutTrainer)["modality_dropout"]
    assert shipped["curriculum"] is None  # off by default
    with pytest.raises(ValueError, match="modality_dropout.curriculum is set.*training step"):
        transform_from_settings({**shipped, "curriculum": RAMP}, 4)


def _with_curriculum(tmp_path, monkeypatch, trainer_class):
    from tests.conftest import make_tiny_trainer

    override = tmp_path / "override.json"
    override.write_text(json.dumps({"modality_dropout": {"curriculum": RAMP}}))
    monkeypatch.setenv(OVERRIDE_ENV, str(override))
    trainer = make_tiny_trainer(trainer_class, tmp_path, monkeypatch)
    trainer.num_epochs = 10
    return trainer


def _complete_share(data: torch.Tensor) -> float:
    return float((data[:, :4] != 0).all(dim=tuple(range(1, data.ndim))).float().mean())


def test_modality_dropout_trainer_draws_the_curriculum_in_the_training_step(tmp_path, monkeypatch):
    trainer = _with_curriculum(tmp_path, monkeypatch, ModalityDropoutTrainer)
    assert trainer.dropout_in_step
    seen = []
    monkeypatch.setattr(MissingModTrainerBase, "train_step", lambda self, batch: seen.append(batch["data"]) or {})
    np.random.seed(0)
    batch = {"data": torch.ones(4000, 5, 2, 2, 2), "target": "untouched"}  # 4 modalities + a cascade channel
    trainer.current_epoch = 0  # p_keep_all 1: every sample complete
    trainer.train_step(batch)
    assert _complete_share(seen[-1]) == 1.0
    trainer.current_epoch = 5  # half-way: p_keep_all 0.25, the end of the ramp
    trainer.train_step(batch)
    dropped = seen[-1]
    expected = 0.25 + 0.75 * UNIFORM_ALL_FOUR  # complete by p_keep_all, or drawn complete by the scheme
    assert abs(_complete_share(dropped) - expected) < 4 * np.sqrt(expected * (1 - expected) / 4000)
    assert (dropped[:, :4] != 0).flatten(2).any(2).any(1).all()  # every sample keeps a modality
    assert (dropped[:, 4] == 1).all()  # the channel after the modalities is not dropped
    assert (batch["data"] == 1).all()  # the loader's batch is not changed in place
    trainer.current_epoch = 2  # 0.2 of the way: p_keep_all 1 - 0.75 * 0.4 = 0.7
    trainer.train_step(batch)
    expected = 0.7 + 0.3 * UNIFORM_ALL_FOUR
    assert abs(_complete_share(seen[-1]) - expected) < 4 * np.sqrt(expected * (1 - expected) / 4000)


def test_without_a_curriculum_the_dropout_stays_in_the_transforms(tmp_path, monkeypatch):
    from tests.conftest import make_tiny_trainer

    trainer = make_tiny_trainer(ModalityDropoutTrainer, tmp_path, monkeypatch)
    assert not trainer.dropout_in_step
    seen = []
    monkeypatch.setattr(MissingModTrainerBase, "train_step", lambda self, batch: seen.append(batch["data"]) or {})
    trainer.train_step({"data": torch.ones(8, 4, 2, 2, 2)})
    assert (seen[-1] == 1).all()  # nothing dropped in the step


def test_multi_term_trainers_draw_the_curriculum_too(tmp_path, monkeypatch):
    trainer = _with_curriculum(tmp_path, monkeypatch, SharedLatentTrainer)
    np.random.seed(1)
    data = torch.ones(4000, 4, 2, 2, 2)
    trainer.current_epoch = 0
    dropped, available = trainer.drop_modalities(data)
    assert available.all() and _complete_share(dropped) == 1.0
    trainer.current_epoch = 9  # after the ramp: the configured p_keep_all, SharedLatentTrainer's 0
    dropped, available = trainer.drop_modalities(data)
    assert abs(_complete_share(dropped) - UNIFORM_ALL_FOUR) < 4 * np.sqrt(0.25 * 0.75 / 4000)
    assert torch.equal(available, (dropped != 0).flatten(2).any(2))


@pytest.mark.parametrize("curriculum", [True, False])
def test_each_epoch_logs_the_curriculum_p_keep_all(tmp_path, monkeypatch, curriculum):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from tests.conftest import make_tiny_trainer

    trainer = (_with_curriculum(tmp_path, monkeypatch, ModalityDropoutTrainer) if curriculum
               else make_tiny_trainer(ModalityDropoutTrainer, tmp_path, monkeypatch))
    trainer.num_epochs = 10
    monkeypatch.setattr(nnUNetTrainer, "on_train_epoch_start", lambda self: None)  # no network/scheduler needed
    logged = []
    monkeypatch.setattr(trainer, "print_to_log_file", lambda *args, **kwargs: logged.append(" ".join(args)))
    trainer.current_epoch = 2  # 1 - (1 - 0.25) * 0.2 / 0.5
    trainer.on_train_epoch_start()
    expected = ["modality dropout: p_keep_all 0.700 this epoch (curriculum)"] if curriculum else []
    assert logged == expected
