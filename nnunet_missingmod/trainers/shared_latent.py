"""SharedLatentTrainer: per-modality encoders fused in a shared latent space (see networks/shared_latent.py).

After van Tulder & de Bruijne, "Learning cross-modality representations from multi-modal images", IEEE TMI
2018. ``nnUNetv2_train D CONFIG FOLD -tr SharedLatentTrainer`` (plain or residual-encoder plans, e.g.
``-p nnUNetResEncUNetMPlans``). Loss::

    L = L_seg + w_rec * ((1 - alpha) * L_rec + alpha * L_sim)        (eq. 3 added to nnU-Net's loss)

* L_seg: nnU-Net's segmentation loss (deep supervision);
* L_rec (eq. 1): L1 error of the reconstruction of every modality whose target is known (acquired by the
  case), also the ones dropped from the input, as in the paper's modality dropout (Fig. 3). The
  reconstruction decoder sees only the fused bottleneck (no skip connections), as the paper's decoder;
* L_sim (eq. 2): distance of each available modality's features to their mean, at every encoder level.

Settings: ``trainer_configs/SharedLatentTrainer.json``, section ``shared_latent``: ``w_rec``, ``alpha``,
``feature_fraction`` (network width, read again by ``nnUNetv2_predict``), ``reconstruction`` (train with the
reconstruction decoder), ``reconstruction_loss`` (``l1``, the paper's, or ``mse``) and
``reconstruction_skips`` (``false``, the paper's; ``true`` gives the decoder the U-Net skips, which let it
bypass the shared representation). ``modality_dropout`` as in ModalityDropoutTrainer.

Deviations from the paper (segmentation added, all encoder levels fused, instance instead of batch
normalisation, one reconstruction decoder with M outputs, nnU-Net's SGD schedule instead of the paper's
SGD at lr 0.3) are listed in :mod:`nnunet_missingmod.networks.shared_latent`.

Modality dropout is drawn in ``train_step`` (numpy's stream, same schemes as the transform), not in
the augmentation pipeline, so that the un-dropped channels remain available as reconstruction targets.
A sequence the case lacks is neither an input nor a target (the training transforms keep it at zero).
Inference builds the network without the reconstruction decoder; ``nnUNetv2_predict`` works unchanged.
"""

from __future__ import annotations

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_missingmod.config import load_trainer_config
from nnunet_missingmod.networks.shared_latent import (
    SharedLatentUNet,
    reconstruction_loss,
    resolve_architecture_kwargs,
    similarity_loss,
)
from nnunet_missingmod.trainers.base import MultiTermLossTrainer
from nnunet_missingmod.transforms.missing_modalities import acquired_modalities


class SharedLatentTrainer(MultiTermLossTrainer):
    """Multi-encoder shared-latent network with reconstruction and similarity terms."""

    loss_terms = ("seg", "sim", "rec")

    def initialize(self) -> None:
        # the reconstruction decoder exists only in the deep-supervision (training) network: without it L_rec
        # would silently be 0 while (1 - alpha) still weighs it
        if self.trainer_config["shared_latent"]["reconstruction"] and not self.enable_deep_supervision:
            raise ValueError(f"{type(self).__name__} builds its reconstruction decoder with deep supervision; keep "
                             "nnunet.enable_deep_supervision true, or set shared_latent.reconstruction to false")
        super().initialize()

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        # a classmethod, so that a variant's config shapes its own network in training and in nnUNetv2_predict
        settings = load_trainer_config(cls)["shared_latent"]
        kwargs = resolve_architecture_kwargs(configuration_manager.network_arch_init_kwargs,
                                             configuration_manager.network_arch_init_kwargs_req_import)
        # deep supervision is on in training only: the reconstruction decoder never reaches inference
        return SharedLatentUNet(num_modalities=num_input_channels, num_classes=num_output_channels,
                                arch_kwargs=kwargs, deep_supervision=enable_deep_supervision,
                                feature_fraction=settings["feature_fraction"],
                                reconstruction=enable_deep_supervision and settings["reconstruction"],
                                reconstruction_skips=settings["reconstruction_skips"],
                                arch_class_name=configuration_manager.network_arch_class_name)

    def compute_losses(self, data: torch.Tensor, target) -> dict[str, torch.Tensor]:
        settings = self.trainer_config["shared_latent"]
        known = acquired_modalities(data, batched=True)  # (B, M): every modality the case has, dropped or not
        dropped, available = self.drop_modalities(data, acquired=known)
        output, aux = self.network(dropped, available, return_aux=True)  # through DDP / torch.compile wrappers
        losses = {"seg": self.loss(output, target)}
        losses["sim"] = torch.stack([similarity_loss(f, aux["available"]) for f in aux["features"]]).mean()
        if "reconstruction" in aux:  # targets: every acquired modality
            losses["rec"] = reconstruction_loss(aux["reconstruction"], data, known, settings["reconstruction_loss"])
        else:
            losses["rec"] = torch.zeros((), device=data.device)
        weight, alpha = settings["w_rec"], settings["alpha"]
        losses["total"] = losses["seg"] + weight * ((1 - alpha) * losses["rec"] + alpha * losses["sim"])
        return losses
