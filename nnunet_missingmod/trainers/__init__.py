"""nnU-Net trainers of this package; nnU-Net finds them through ``nnUNet_extTrainer`` (see ``ext.py``)."""

from nnunet_missingmod.trainers.base import MissingModTrainerBase
from nnunet_missingmod.trainers.modality_dropout import ModalityDropoutTrainer
from nnunet_missingmod.trainers.shared_latent import SharedLatentTrainer

__all__ = ["MissingModTrainerBase", "ModalityDropoutTrainer", "SharedLatentTrainer"]
