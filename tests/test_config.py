import json

import pytest

from nnunet_missingmod.config import OVERRIDE_ENV, config_dir, is_non_negative_number, load_trainer_config
from nnunet_missingmod.trainers import MissingModTrainerBase, ModalityDropoutTrainer


def test_configs_ship_with_the_package():
    names = {p.name for p in config_dir().glob("*.json")}
    assert {"MissingModTrainerBase.json", "ModalityDropoutTrainer.json"} <= names


def test_config_merges_along_the_mro():
    base = json.loads((config_dir() / "MissingModTrainerBase.json").read_text())
    own = json.loads((config_dir() / "ModalityDropoutTrainer.json").read_text())
    config = load_trainer_config(ModalityDropoutTrainer)
    assert config["nnunet"] == base["nnunet"]
    assert config["modality_dropout"] == own["modality_dropout"]
    assert "modality_dropout" not in load_trainer_config(MissingModTrainerBase)


def test_override_file_changes_only_named_keys(tmp_path, monkeypatch):
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"nnunet": {"num_epochs": 3}, "modality_dropout": {"p_keep_all": 0.25}}))
    monkeypatch.setenv(OVERRIDE_ENV, str(override))
    config = load_trainer_config(ModalityDropoutTrainer)
    assert config["nnunet"]["num_epochs"] == 3
    assert config["nnunet"]["num_iterations_per_epoch"] == 250
    assert config["modality_dropout"]["p_keep_all"] == 0.25
    assert config["modality_dropout"]["scheme"] == "uniform_subset"


def test_override_with_unknown_key_is_an_error(tmp_path, monkeypatch):
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"nnunet": {"num_epoch": 3}}))
    monkeypatch.setenv(OVERRIDE_ENV, str(override))
    with pytest.raises(KeyError, match="num_epoch"):
        load_trainer_config(ModalityDropoutTrainer)


@pytest.mark.parametrize("value, expected", [
    (0, True), (0.0, True), (10, True), (2.5, True),
    (-1, False), (-1e-9, False), (float("nan"), False), (float("inf"), False), (True, False), (False, False),
    ("1", False), (None, False), ([1], False), (10 ** 400, False), (-(10 ** 400), False),
])
def test_loss_weights_must_be_finite_numbers_at_least_zero(value, expected):
    assert is_non_negative_number(value) is expected
