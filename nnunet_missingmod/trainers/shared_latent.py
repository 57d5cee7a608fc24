"""SharedLatentTrainer: per-modality encoders fused in a shared latent space (see networks/shared_latent.py).

``nnUNetv2_train D CONFIG FOLD -tr SharedLatentTrainer``. Loss:
``L_seg + w_rec * ((1 - alpha) * L_rec + alpha * L_sim)`` with nnU-Net's segmentation loss (deep
supervision), L_rec the MSE of the reconstruction of every modality whose target is known (also the
dropped ones), and L_sim the similarity term over the available modalities at every encoder level.
Settings: ``trainer_configs/SharedLatentTrainer.json`` (``shared_latent``: ``w_rec``, ``alpha``,
``feature_fraction``, ``reconstruction``; ``modality_dropout`` as in ModalityDropoutTrainer).

Modality dropout is drawn in ``train_step`` (numpy's stream, same schemes as the transform), not in
the augmentation pipeline, so that the un-dropped channels remain available as reconstruction targets.
Inference builds the network without the reconstruction decoder; ``nnUNetv2_predict`` works unchanged.
"""

from __future__ import annotations

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_missingmod.config import load_trainer_config
from nnunet_missingmod.networks.shared_latent import SharedLatentUNet, resolve_architecture_kwargs, similarity_loss
from nnunet_missingmod.trainers.base import MultiTermLossTrainer


class SharedLatentTrainer(MultiTermLossTrainer):
    """Multi-encoder shared-latent network with reconstruction and similarity terms."""

    loss_terms = ("seg", "sim", "rec")

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        name = configuration_manager.network_arch_class_name
        assert name.endswith("PlainConvUNet"), f"SharedLatentTrainer builds on PlainConvUNet plans, got {name}"
        # feature_fraction shapes the network: inference reads the shipped config (or the same override file)
        settings = load_trainer_config(SharedLatentTrainer)["shared_latent"]
        kwargs = resolve_architecture_kwargs(configuration_manager.network_arch_init_kwargs,
                                             configuration_manager.network_arch_init_kwargs_req_import)
        # deep supervision is on in training only: the reconstruction decoder never reaches inference
        return SharedLatentUNet(num_modalities=num_input_channels, num_classes=num_output_channels,
                                arch_kwargs=kwargs, deep_supervision=enable_deep_supervision,
                                feature_fraction=settings["feature_fraction"],
                                reconstruction=enable_deep_supervision and settings["reconstruction"])

    def compute_losses(self, data: torch.Tensor, target) -> dict[str, torch.Tensor]:
        settings = self.trainer_config["shared_latent"]
        dropped, available = self.drop_modalities(data)
        output, aux = self.network.forward_with_aux(dropped, available)
        losses = {"seg": self.loss(output, target)}
        losses["sim"] = torch.stack([similarity_loss(f, aux["available"]) for f in aux["features"]]).mean()
        if "reconstruction" in aux:
            known = data.flatten(2).ne(0).any(-1)  # reconstruction targets exist for every present channel
            squared = (aux["reconstruction"] - data).pow(2).flatten(2).mean(-1)  # (B, M)
            losses["rec"] = (squared * known).sum() / known.sum().clamp_min(1)
        else:
            losses["rec"] = torch.zeros((), device=data.device)
        weight, alpha = settings["w_rec"], settings["alpha"]
        losses["total"] = losses["seg"] + weight * ((1 - alpha) * losses["rec"] + alpha * losses["sim"])
        return losses
