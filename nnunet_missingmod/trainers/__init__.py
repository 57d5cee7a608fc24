"""nnU-Net trainers of this package; nnU-Net finds them through ``nnUNet_extTrainer`` (see ``ext.py``)."""

from nnunet_missingmod.trainers.base import MissingModTrainerBase
from nnunet_missingmod.trainers.d2net import (
    D2NetTrainer,
    D2NetTrainer_adam,
    D2NetTrainer_baseline,
    D2NetTrainer_featureKDOnly,
    D2NetTrainer_frequencyOnly,
    D2NetTrainer_logitKDOnly,
    D2NetTrainer_noETM,
    D2NetTrainer_noKD,
    D2NetTrainer_noSFMC,
    D2NetTrainer_spatialOnly,
)
from nnunet_missingmod.trainers.modality_dropout import ModalityDropoutTrainer
from nnunet_missingmod.trainers.shared_latent import SharedLatentTrainer

__all__ = ["MissingModTrainerBase", "ModalityDropoutTrainer", "SharedLatentTrainer", "D2NetTrainer",
           "D2NetTrainer_adam", "D2NetTrainer_baseline", "D2NetTrainer_noSFMC", "D2NetTrainer_spatialOnly",
           "D2NetTrainer_frequencyOnly", "D2NetTrainer_noKD", "D2NetTrainer_featureKDOnly",
           "D2NetTrainer_logitKDOnly", "D2NetTrainer_noETM"]
