"""batchgeneratorsv2 transforms."""

from nnunet_missingmod.transforms.missing_modalities import (
    AVAILABILITY_KEY,
    RecordAvailabilityTransform,
    ZeroMissingModalitiesTransform,
    acquired_modalities,
)
from nnunet_missingmod.transforms.modality_dropout import ModalityDropoutTransform, sample_kept_modalities

__all__ = ["AVAILABILITY_KEY", "ModalityDropoutTransform", "RecordAvailabilityTransform",
           "ZeroMissingModalitiesTransform", "acquired_modalities", "sample_kept_modalities"]
