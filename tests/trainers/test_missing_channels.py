"""A sequence the case lacks stays an exactly-zero, unavailable channel through every trainer's training batches.

Batches come from nnU-Net's own data loader (cropping, padding, per-sample transforms, collation) over an
in-memory dataset shaped like a preprocessed BraTS case (z-scored inside the brain, 0 outside, seg -1
outside the brain), with the trainer's real training transforms.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_missingmod import trainers
from nnunet_missingmod.trainers import ModalityDropoutTrainer, SharedLatentTrainer
from nnunet_missingmod.trainers.base import MultiTermLossTrainer
from nnunet_missingmod.transforms import (
    ModalityDropoutTransform,
    RecordAvailabilityTransform,
    ZeroMissingModalitiesTransform,
    acquired_modalities,
)
from tests.conftest import make_tiny_trainer

MISSING = 2  # T2 is missing from case "gappy"
SHAPE = (24, 24, 24)


class InMemoryCases:
    """The part of nnU-Net's dataset interface its data loader uses (``identifiers``, ``load_case``)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        grid = np.indices(SHAPE) - np.array(SHAPE)[:, None, None, None] / 2
        brain = (grid ** 2).sum(0) < 10 ** 2
        self.cases = {}
        for name in ("complete", "gappy"):
            data = np.where(brain, rng.normal(size=(4, *SHAPE)), 0).astype(np.float32)
            if name == "gappy":
                data[MISSING] = 0  # zero-filled sequence: exactly 0 after nnU-Net's z-score
            seg = np.where(brain, rng.integers(0, 4, size=SHAPE), -1)[None].astype(np.int16)
            self.cases[name] = (data, seg)
        self.identifiers = list(self.cases)

    def load_case(self, identifier: str):
        data, seg = self.cases[identifier]
        return data, seg, None, {"class_locations": {}}


def training_batches(trainer, transforms, num_batches: int, seed: int = 0) -> list[dict]:
    """Batches of nnU-Net's data loader with ``transforms`` (as in ``get_dataloaders``, without worker processes)."""
    _, _, initial_patch_size, _ = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    loader = nnUNetDataLoader(InMemoryCases(), 4, initial_patch_size, trainer.configuration_manager.patch_size,
                              trainer.label_manager, oversample_foreground_percent=0.0, transforms=transforms)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return [loader.generate_train_batch() for _ in range(num_batches)]


def training_transforms(trainer, pipeline=None):
    """``pipeline`` (default: the trainer's get_training_transforms) called with get_dataloaders' arguments."""
    rotation, dummy_2d, _, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    pipeline = pipeline or trainer.get_training_transforms
    return pipeline(trainer.configuration_manager.patch_size, rotation, trainer._get_deep_supervision_scales(),
                    mirror_axes, dummy_2d, use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm,
                    is_cascaded=trainer.is_cascaded, foreground_labels=trainer.label_manager.foreground_labels,
                    regions=trainer.label_manager.foreground_regions, ignore_label=trainer.label_manager.ignore_label)


def gappy_rows(batch: dict) -> list[int]:
    return [j for j, key in enumerate(batch["keys"]) if key == "gappy"]


@pytest.mark.parametrize("trainer_name", trainers.__all__)
def test_every_trainer_records_and_restores_availability(trainer_name, tmp_path, monkeypatch):
    trainer = make_tiny_trainer(getattr(trainers, trainer_name), tmp_path, monkeypatch)
    steps = training_transforms(trainer).transforms
    assert isinstance(steps[0], RecordAvailabilityTransform) and steps[0].num_modalities == 4
    zeroing = [i for i, t in enumerate(steps) if isinstance(t, ZeroMissingModalitiesTransform)]
    assert len(zeroing) == 1
    # only transforms that zero channels may follow the re-zeroing
    assert all(isinstance(t, ModalityDropoutTransform) for t in steps[zeroing[0] + 1:])


@pytest.mark.parametrize("trainer_class", [SharedLatentTrainer, ModalityDropoutTrainer])
def test_missing_channel_is_exactly_zero_and_unavailable(trainer_class, tmp_path, monkeypatch):
    trainer = make_tiny_trainer(trainer_class, tmp_path, monkeypatch)
    batches = training_batches(trainer, training_transforms(trainer), num_batches=15)
    rows = 0
    for batch in batches:
        data, gappy = batch["data"], gappy_rows(batch)
        rows += len(gappy)
        assert torch.count_nonzero(data[gappy, MISSING]) == 0
        assert not acquired_modalities(data, 4, batched=True)[gappy, MISSING].any()
        if isinstance(trainer, MultiTermLossTrainer):
            dropped, available = trainer.drop_modalities(data)
            assert not available[gappy, MISSING].any()  # never an anchor, a target or a fused modality
            assert available[gappy].any(1).all()  # but every sample keeps one of the sequences it has
            assert torch.count_nonzero(dropped[gappy, MISSING]) == 0
    assert rows >= 20


def test_without_the_fix_augmentation_makes_the_missing_channel_non_zero(tmp_path, monkeypatch):
    # the same loader and seeds with nnU-Net's unmodified pipeline: noise fills the missing channel, which would
    # then count as present (this is what the fix prevents, and what makes the test above able to fail)
    trainer = make_tiny_trainer(SharedLatentTrainer, tmp_path, monkeypatch)
    batches = training_batches(trainer, training_transforms(trainer, nnUNetTrainer.get_training_transforms),
                               num_batches=15)
    filled = [batch["data"][j, MISSING].abs().max() > 0 for batch in batches for j in gappy_rows(batch)]
    assert any(filled)
    data = next(batch["data"] for batch in batches if any(batch["data"][j, MISSING].abs().max() > 0
                                                          for j in gappy_rows(batch)))
    _, available = trainer.drop_modalities(data)
    assert available[:, MISSING].any()  # counted as available by the unfixed pipeline


def test_modality_dropout_transform_keeps_an_acquired_modality(tmp_path, monkeypatch):
    trainer = make_tiny_trainer(ModalityDropoutTrainer, tmp_path, monkeypatch)
    batches = training_batches(trainer, training_transforms(trainer), num_batches=15, seed=1)
    for batch in batches:
        present = acquired_modalities(batch["data"], 4, batched=True)
        assert present[gappy_rows(batch)].any(1).all()


def test_a_region_that_needs_the_missing_sequence_is_trained_as_empty(tmp_path, monkeypatch):
    # modality_dropout.region_requires on real batches (nnU-Net's region targets at every deep-supervision level):
    # with every sample complete after the dropout (p_keep_all 1), only the case that lacks T2 loses the region
    import json

    from nnunet_missingmod.config import OVERRIDE_ENV
    from nnunet_missingmod.trainers.base import MissingModTrainerBase

    override = tmp_path / "override.json"
    override.write_text(json.dumps({"modality_dropout": {"p_keep_all": 1.0,
                                                         "region_requires": {"enhancing tumor": ["t2"]}}}))
    monkeypatch.setenv(OVERRIDE_ENV, str(override))
    trainer = make_tiny_trainer(ModalityDropoutTrainer, tmp_path, monkeypatch)
    seen = []
    monkeypatch.setattr(MissingModTrainerBase, "train_step", lambda self, batch: seen.append(batch) or {})
    batches = training_batches(trainer, training_transforms(trainer), num_batches=6, seed=2)
    for batch in batches:
        trainer.train_step(batch)
        passed, gappy = seen[-1]["target"], gappy_rows(batch)
        without_t2 = [j for j in range(len(batch["keys"])) if not batch["data"][j, MISSING].any()]
        assert set(gappy) <= set(without_t2)  # a patch of the complete case could lie outside its brain
        complete = [j for j in range(len(batch["keys"])) if j not in without_t2]
        assert isinstance(passed, list) and len(passed) == len(batch["target"]) > 1
        for level, original in zip(passed, batch["target"], strict=True):
            assert original[gappy, 2].any() or not gappy  # the random labels hold ET, so emptying is visible
            assert not level[without_t2, 2].any()
            assert torch.equal(level[without_t2, :2], original[without_t2, :2])
            assert torch.equal(level[complete], original[complete])
    assert sum(len(gappy_rows(b)) for b in batches) >= 4
