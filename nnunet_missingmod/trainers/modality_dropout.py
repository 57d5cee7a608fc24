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

With ``region_requires`` (e.g. ``{"enhancing tumor": ["t1ce"]}``), a training sample that has none of a
region's modalities after the dropout is trained with that region empty (see
:mod:`nnunet_missingmod.transforms.modality_dropout`); region-based datasets only.

With a ``curriculum`` in the section (``p_keep_all`` falling from ``p_keep_all_start`` over the first
``ramp_fraction`` of the epochs), the dropout is drawn in the training step instead, on the augmented batch
(the same point of the pipeline: after every augmentation and the re-zeroing), because the augmentation
workers do not know the epoch.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
from batchgeneratorsv2.helpers.scalar_type import RandomScalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

from nnunet_missingmod.trainers.base import MissingModTrainerBase
from nnunet_missingmod.transforms.missing_modalities import acquired_modalities
from nnunet_missingmod.transforms.modality_dropout import (
    REGION_REQUIRES_KEY,
    ModalityDropoutTransform,
    check_curriculum,
    check_region_requires,
    drop_modalities_in_batch,
    empty_unobservable_regions,
    fixed_keep_mask,
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
        _ = self.region_requirements  # checked before the augmentation workers start
        transforms = super().get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)
        if not self.dropout_in_step:
            transforms.transforms.append(self.modality_dropout_transform())
        return transforms

    @cached_property
    def region_requirements(self) -> dict[int, np.ndarray]:
        """``region_requires`` checked against dataset.json: ``{region channel: (M,) mask of its modalities}``.

        Raises:
            ValueError: a label-based dataset, or a bad entry (:func:`check_region_requires`).
        """
        settings = self.trainer_config["modality_dropout"]
        if settings.get("region_requires") is None:
            return {}
        self.require_region_labels(f"{REGION_REQUIRES_KEY} empties a region's target")
        regions, channels = self.region_names(), self.dataset_json["channel_names"]
        requirements = check_region_requires(settings, regions, self.num_modalities)
        fixed = settings["scheme"] == "fixed"
        for region, needed in requirements.items():
            self.print_to_log_file(f"{REGION_REQUIRES_KEY}: {regions[region]!r} is trained as empty in samples "
                                   f"without {' or '.join(channels[str(i)] for i in np.flatnonzero(needed))}")
            if fixed and not fixed_keep_mask(settings["keep"], self.num_modalities)[needed].any():
                self.print_to_log_file(f"WARNING: {REGION_REQUIRES_KEY}: scheme 'fixed' keeps none of the sequences "
                                       f"of {regions[region]!r}, so it is empty in every sample and never learned",
                                       also_print_to_console=True)
        return requirements

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's training step; with a curriculum, on the batch with this epoch's dropout drawn first; with
        ``region_requires``, with those regions emptied in the samples that lack their modalities."""
        batch, available = dict(batch), None
        if self.dropout_in_step:  # channels after the modalities (a cascade's) are kept
            batch["data"], available = drop_modalities_in_batch(batch["data"], self.dropout_settings_now(),
                                                                num_modalities=self.num_modalities)
        if self.region_requirements:
            if available is None:  # dropped by the transforms: a dropped or missing channel is exactly zero
                available = acquired_modalities(batch["data"], self.num_modalities, batched=True)
            batch["target"] = empty_unobservable_regions(batch["target"], available, self.region_requirements)
        return super().train_step(batch)
