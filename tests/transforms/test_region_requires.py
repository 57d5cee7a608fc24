"""``modality_dropout.region_requires``: a region trained as empty in the samples without its modalities."""

import json

import numpy as np
import pytest
import torch

from nnunet_missingmod.config import OVERRIDE_ENV
from nnunet_missingmod.trainers import ModalityDropoutTrainer
from nnunet_missingmod.trainers.base import MissingModTrainerBase
from nnunet_missingmod.transforms.modality_dropout import check_region_requires, empty_unobservable_regions

REGIONS = ["whole tumor", "tumor core", "enhancing tumor"]
ET_NEEDS_T1CE = {"enhancing tumor": ["t1ce"]}


def test_the_region_is_emptied_in_exactly_the_samples_without_its_modalities():
    requirements = check_region_requires({"region_requires": ET_NEEDS_T1CE}, REGIONS, 4)
    assert list(requirements) == [2] and requirements[2].tolist() == [False, True, False, False]
    target = [torch.ones(3, 3, 4, 4, 4), torch.ones(3, 3, 2, 2, 2)]  # two deep-supervision levels
    available = torch.tensor([[True, True, False, False],    # has T1ce: unchanged
                              [True, False, True, True],     # no T1ce: ET emptied
                              [False, False, False, True]])  # no T1ce: ET emptied
    out = empty_unobservable_regions(target, available, requirements)
    for level, original in zip(out, target, strict=True):
        expected = torch.ones_like(original)
        expected[1, 2] = 0
        expected[2, 2] = 0
        assert torch.equal(level, expected)
        assert torch.equal(original, torch.ones_like(original))  # the input is left as it is


def test_any_one_of_the_listed_modalities_is_enough():
    requirements = check_region_requires({"region_requires": {"tumor core": ["t1ce", 3]}}, REGIONS, 4)
    target = torch.ones(3, 3, 2, 2, 2, dtype=torch.bool)
    available = torch.tensor([[False, False, False, True], [False, True, False, False], [True, False, True, False]])
    out = empty_unobservable_regions(target, available, requirements)
    assert [bool(out[b, 1].any()) for b in range(3)] == [True, True, False]
    assert bool(out[:, 0].all()) and bool(out[:, 2].all())


def test_null_changes_nothing():
    assert check_region_requires({"region_requires": None}, REGIONS, 4) == {}
    target = torch.ones(2, 3, 2, 2, 2)
    assert empty_unobservable_regions(target, torch.zeros(2, 4, dtype=torch.bool), {}) is target


@pytest.mark.parametrize("value, message", [
    ({}, "must be null or"),
    (["t1ce"], "must be null or"),
    ({"enhancing": ["t1ce"]}, "'enhancing' is not a region of dataset.json"),
    ({"enhancing tumor": "t1ce"}, r"region_requires.enhancing tumor must be a non-empty list"),
    ({"enhancing tumor": []}, r"region_requires.enhancing tumor must be a non-empty list"),
    ({"enhancing tumor": ["t1c3"]}, r"region_requires.enhancing tumor: unknown modality 't1c3'"),
    ({"enhancing tumor": [4]}, r"region_requires.enhancing tumor: 4 is channel 4"),
])
def test_bad_entries_name_the_key(value, message):
    with pytest.raises(ValueError, match=message):
        check_region_requires({"region_requires": value}, REGIONS, 4)


def _trainer(tmp_path, monkeypatch, region_requires, dataset_json=None, **modality_dropout):
    from tests.conftest import make_tiny_trainer

    override = tmp_path / "override.json"
    override.write_text(json.dumps({"modality_dropout": {"region_requires": region_requires, **modality_dropout}}))
    monkeypatch.setenv(OVERRIDE_ENV, str(override))
    return make_tiny_trainer(ModalityDropoutTrainer, tmp_path, monkeypatch, dataset_json=dataset_json)


@pytest.mark.parametrize("curriculum", [None, {"p_keep_all_start": 1.0, "ramp_fraction": 0.5}])
def test_the_trainer_empties_the_target_of_samples_without_t1ce(tmp_path, monkeypatch, curriculum):
    trainer = _trainer(tmp_path, monkeypatch, ET_NEEDS_T1CE, curriculum=curriculum)
    assert trainer.region_names() == REGIONS
    trainer.num_epochs, trainer.current_epoch = 10, 0  # with the curriculum: p_keep_all 1, nothing dropped in step
    seen = []
    monkeypatch.setattr(MissingModTrainerBase, "train_step", lambda self, batch: seen.append(batch) or {})
    data = torch.ones(2, 4, 4, 4, 4)
    data[1, 1] = 0  # sample 1 without T1ce (dropped by the transforms, or never acquired)
    target = [torch.ones(2, 3, 4, 4, 4), torch.ones(2, 3, 2, 2, 2)]
    trainer.train_step({"data": data, "target": target})
    (batch,) = seen
    assert torch.equal(batch["data"], data)
    for level in batch["target"]:
        assert bool(level[0].all()) and bool(level[1, :2].all()) and not bool(level[1, 2].any())


def test_with_a_curriculum_the_target_follows_the_dropout_drawn_in_the_step(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, monkeypatch, ET_NEEDS_T1CE, p_keep_all=0.0,
                       curriculum={"p_keep_all_start": 1.0, "ramp_fraction": 0.5})
    trainer.num_epochs, trainer.current_epoch = 10, 9  # after the ramp: p_keep_all 0, T1ce dropped in about half
    seen = []
    monkeypatch.setattr(MissingModTrainerBase, "train_step", lambda self, batch: seen.append(batch) or {})
    np.random.seed(0)
    trainer.train_step({"data": torch.ones(64, 4, 2, 2, 2), "target": [torch.ones(64, 3, 2, 2, 2)]})
    (batch,) = seen
    without_t1ce = (batch["data"][:, 1] == 0).flatten(1).all(1)
    assert 10 < int(without_t1ce.sum()) < 54
    et_kept = batch["target"][0][:, 2].flatten(1).all(1)
    assert torch.equal(et_kept, ~without_t1ce)
    assert bool(batch["target"][0][:, :2].all())


def test_fixed_without_the_sequence_warns_that_the_region_is_never_learned(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, monkeypatch, ET_NEEDS_T1CE, scheme="fixed", keep=["t1", "t2"], p_keep_all=0.0)
    logged = []
    monkeypatch.setattr(trainer, "print_to_log_file", lambda *args, **kwargs: logged.append(" ".join(args)))
    assert list(trainer.region_requirements) == [2]
    assert any(line.startswith("WARNING") and "never learned" in line for line in logged)
    trainer = _trainer(tmp_path, monkeypatch, ET_NEEDS_T1CE, scheme="fixed", keep=["t1ce", "t2"], p_keep_all=0.0)
    logged = []
    monkeypatch.setattr(trainer, "print_to_log_file", lambda *args, **kwargs: logged.append(" ".join(args)))
    _ = trainer.region_requirements
    assert logged and not any(line.startswith("WARNING") for line in logged)


def test_without_the_key_the_target_is_unchanged(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, monkeypatch, None)
    seen = []
    monkeypatch.setattr(MissingModTrainerBase, "train_step", lambda self, batch: seen.append(batch) or {})
    data = torch.ones(2, 4, 2, 2, 2)
    data[1, 1] = 0
    target = [torch.ones(2, 3, 2, 2, 2)]
    trainer.train_step({"data": data, "target": target})
    assert seen[0]["target"] is target


def test_a_bad_region_stops_training_before_the_data_loaders(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, monkeypatch, {"necrosis": ["t1ce"]})
    with pytest.raises(ValueError, match="'necrosis' is not a region of dataset.json; its regions are "
                                         r"\['whole tumor', 'tumor core', 'enhancing tumor'\]"):
        trainer.get_training_transforms(np.array([8, 8, 8]), 0.0, None, (0, 1, 2), False)


def test_a_label_based_dataset_is_refused(tmp_path, monkeypatch):
    from tests.conftest import tiny_dataset_json

    labels_only = {**tiny_dataset_json(), "labels": {"background": 0, "edema": 1, "necrosis": 2, "enhancing": 3}}
    labels_only.pop("regions_class_order")
    trainer = _trainer(tmp_path, monkeypatch, {"enhancing": ["t1ce"]}, dataset_json=labels_only)
    with pytest.raises(ValueError, match="needs region-based training .*region_requires"):
        _ = trainer.region_requirements
