"""nnU-Net trainers of this package, found by nnU-Net through ``nnUNet_extTrainer`` (see :mod:`nnunet_missingmod.ext`)."""

from nnunet_missingmod.trainers.base import MissingModTrainerBase
from nnunet_missingmod.trainers.modality_dropout import ModalityDropoutTrainer

__all__ = ["MissingModTrainerBase", "ModalityDropoutTrainer"]
