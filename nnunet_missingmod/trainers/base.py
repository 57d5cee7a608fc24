"""Common base of this package's trainers: config loading and recording.

nnU-Net instantiates trainers with the fixed signature ``(plans, configuration, fold, dataset_json,
device)``, so hyper-parameters come from ``trainer_configs/<TrainerName>.json`` (see
:mod:`nnunet_missingmod.config`). The ``nnunet`` section sets nnU-Net's own trainer attributes
(``num_epochs``, ``num_iterations_per_epoch``, ...). ``inference.test_time_mirroring: false`` stores no
mirroring axes in the checkpoint, so nnU-Net's final validation and ``nnUNetv2_predict`` run without
mirroring test-time augmentation (8x fewer forward passes in 3D; used by the CPU demo). The other
sections belong to the subclasses.
"""

from __future__ import annotations

import json
from os.path import join

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_missingmod.config import load_trainer_config

CONFIG_FILE_NAME = "trainer_config.json"


class MissingModTrainerBase(nnUNetTrainer):
    """nnUNetTrainer that reads its settings from the package's trainer configs.

    Attributes:
        trainer_config: the resolved config (written to ``<fold folder>/trainer_config.json`` when training starts).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.trainer_config = load_trainer_config(type(self))
        for name, value in self.trainer_config.get("nnunet", {}).items():
            if not hasattr(self, name):
                raise KeyError(f"config key nnunet.{name} is not an attribute of nnUNetTrainer")
            setattr(self, name, value)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.trainer_config.get("inference", {}).get("test_time_mirroring", True):
            self.inference_allowed_mirroring_axes = None  # saved in the checkpoint; the predictor then never mirrors
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.local_rank == 0:
            with open(join(self.output_folder, CONFIG_FILE_NAME), "w") as f:
                json.dump({"trainer": type(self).__name__, **self.trainer_config}, f, indent=4)
            self.print_to_log_file(f"{type(self).__name__} config:\n{json.dumps(self.trainer_config, indent=2)}",
                                   also_print_to_console=False)
