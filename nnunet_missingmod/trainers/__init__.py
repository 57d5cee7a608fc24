"""nnU-Net trainers of this package; nnU-Net finds them through ``nnUNet_extTrainer`` (see ``ext.py``)."""

from nnunet_missingmod.trainers import cmff as _cmff
from nnunet_missingmod.trainers import utad as _utad
from nnunet_missingmod.trainers.base import MissingModTrainerBase
from nnunet_missingmod.trainers.cmff import *  # noqa: F403 (CMFTPretrainer, CMFFTrainer and variants)
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
from nnunet_missingmod.trainers.utad import *  # noqa: F403 (UTADNetTeacherTrainer, UTADNetStudentTrainer)

__all__ = ["MissingModTrainerBase", "ModalityDropoutTrainer", "SharedLatentTrainer", "D2NetTrainer",
           "D2NetTrainer_adam", "D2NetTrainer_baseline", "D2NetTrainer_noSFMC", "D2NetTrainer_spatialOnly",
           "D2NetTrainer_frequencyOnly", "D2NetTrainer_noKD", "D2NetTrainer_featureKDOnly",
           "D2NetTrainer_logitKDOnly", "D2NetTrainer_noETM", *_cmff.__all__, *_utad.__all__]
