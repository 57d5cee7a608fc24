"""ModalityDropoutTrainer: nnU-Net's default network and loss, trained with modality dropout.

``nnUNetv2_train D CONFIG FOLD -tr ModalityDropoutTrainer``. Every training sample, every time it is
drawn, loses a random subset of its modalities (zeroed channels), so the network learns to segment
from any non-empty subset. Settings: ``trainer_configs/ModalityDropoutTrainer.json``, section
``modality_dropout`` (``scheme``, ``drop_probabilities``, ``p_keep_all``, and ``keep`` for the ``fixed``
scheme that trains a model on one combination; see :mod:`nnunet_missingmod.transforms.modality_dropout`).

Only the training transforms change: the dropout is appended after all of nnU-Net's augmentations
and after the base class has zeroed the sequences a case lacks (so no noise or brightness change reaches
a dropped or missing channel); it keeps at least one modality that the sample really has. Validation
during training and inference see the complete input; evaluate missing modalities with
``nnunet_missingmod evaluate-missing``.

With a ``curriculum`` in the section (``p_keep_all`` falling from ``p_keep_all_start`` over the first
``ramp_fraction`` of the epochs), the dropout is drawn in the training step instead, on the augmented batch
(the same point of the pipeline: after every augmentation and the re-zeroing), because the augmentation
workers do not know the epoch.
"""

from __future__ import annotations

import numpy as np
from batchgeneratorsv2.helpers.scalar_type import RandomScalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

from nnunet_missingmod.trainers.base import MissingModTrainerBase
from nnunet_missingmod.transforms.modality_dropout import (
    ModalityDropoutTransform,
    check_curriculum,
    drop_modalities_in_batch,
    transform_from_settings,
)


class ModalityDropoutTrainer(MissingModTrainerBase):
    """nnUNetTrainer plus :class:`ModalityDropoutTransform` at the end of the training transforms."""

    def modality_dropout_transform(self) -> ModalityDropoutTransform:
        return transform_from_settings(self.trainer_config["modality_dropout"], self.num_modalities)

    @property
    def dropout_in_step(self) -> bool:
        """Whether the dropout is drawn in :meth:`train_step` (a ``curriculum`` is set) rather than by a transform."""
        return check_curriculum(self.trainer_config["modality_dropout"]) is not None

    def get_training_transforms(self, patch_size: np.ndarray | tuple[int, ...], rotation_for_DA: RandomScalar,
                                deep_supervision_scales: list | tuple | None, mirror_axes: tuple[int, ...],
                                do_dummy_2d_data_aug: bool, use_mask_for_norm: list[bool] | None = None,
                                is_cascaded: bool = False, foreground_labels: list[int] | tuple[int, ...] | None = None,
                                regions: list | None = None, ignore_label: int | None = None) -> BasicTransform:
        """The base pipeline (availability recorded, missing channels re-zeroed) followed by modality dropout (left
        to :meth:`train_step` with a curriculum)."""
        transforms = super().get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)
        if not self.dropout_in_step:
            transforms.transforms.append(self.modality_dropout_transform())
        return transforms

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's training step; with a curriculum, on the batch with this epoch's dropout drawn first."""
        if self.dropout_in_step:  # channels after the modalities (a cascade's) are kept
            batch = {**batch, "data": drop_modalities_in_batch(batch["data"], self.dropout_settings_now(),
                                                               num_modalities=self.num_modalities)[0]}
        return super().train_step(batch)
