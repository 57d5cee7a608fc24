"""batchgeneratorsv2 transforms."""

from nnunet_missingmod.transforms.modality_dropout import ModalityDropoutTransform, sample_kept_modalities

__all__ = ["ModalityDropoutTransform", "sample_kept_modalities"]
