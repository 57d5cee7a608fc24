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

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunet_missingmod.config import load_trainer_config
from nnunet_missingmod.transforms.modality_dropout import drop_modalities_in_batch

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


class MultiTermLossTrainer(MissingModTrainerBase):
    """Base of trainers whose loss has several terms: ``compute_losses`` returns them, this class does the rest.

    * modality dropout drawn in the training step (``drop_modalities``, config section ``modality_dropout``),
      so that the availability mask reaches the loss terms;
    * nnU-Net's optimisation step (autocast on CUDA, gradient scaling, clipping at 12) on ``losses["total"]``;
    * every term named in ``loss_terms`` averaged per epoch, stored in nnU-Net's logger as ``loss_<name>``
      (so it is in the checkpoint) and written to the training log.

    Subclasses set ``loss_terms`` and implement ``compute_losses(data, target) -> {name: tensor, "total": tensor}``.
    """

    loss_terms: tuple[str, ...] = ()

    def drop_modalities(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero a random subset of modalities per sample; return the dropped batch and the (B, M) kept mask."""
        return drop_modalities_in_batch(data, self.trainer_config["modality_dropout"])

    def compute_losses(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            losses = self.compute_losses(data, target)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses["total"]).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": losses["total"].detach().cpu().numpy(),
                **{f"loss_{k}": losses[k].detach().cpu().numpy() for k in self.loss_terms}}

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        history = self.logger.local_logger.my_fantastic_logging
        terms = {}
        for name in self.loss_terms:
            key = f"loss_{name}"
            # a run resumed from an older checkpoint gets NaN for the epochs it has no record of
            values = history.setdefault(key, [])
            values.extend([float("nan")] * (self.current_epoch - len(values)))
            terms[key] = float(np.mean([o[key] for o in train_outputs]))
            self.logger.log(key, terms[key], self.current_epoch)
        self.print_to_log_file(", ".join(f"{k} {v:.4f}" for k, v in terms.items()))
