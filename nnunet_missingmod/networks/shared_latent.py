"""Shared-latent multi-encoder U-Net for missing modalities (HeMIS-style fusion).

After van Tulder & de Bruijne, "Learning cross-modality representations from multi-modal images",
IEEE TMI 2018, and Havaei et al., "HeMIS: Hetero-Modal Image Segmentation", MICCAI 2016:

* one U-Net encoder per modality (1 input channel, own weights), built from the plans;
* a per-feature normalisation of each modality's features at every skip level, with fixed affine
  parameters (instance normalisation without learnable scale and shift), so that no modality can
  scale its features away from the shared space;
* fusion by the mean over the **available** modalities only (sum divided by their number);
* one shared decoder (nnU-Net's ``UNetDecoder``, deep supervision) producing the segmentation;
* optionally (training only) a reconstruction decoder that rebuilds every modality from the fused
  representation.

Deviations and choices:

* the per-modality encoders use ``feature_fraction`` (default 0.5) of the plans' features per stage,
  so that four encoders cost about as much as one full encoder; the shared decoder works on that width;
* one reconstruction decoder with one output per modality rather than one decoder per modality;
* a modality counts as available when its channel is not exactly zero (nnU-Net's convention for a
  missing modality); training passes the dropout's availability mask explicitly. A sample without
  any non-zero channel (a background-only patch) fuses all modalities, which are all zero anyway.
"""

from __future__ import annotations

import pydoc
from collections.abc import Sequence

import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

TRAINING_ONLY_PREFIXES = ("reconstruction.",)


def resolve_architecture_kwargs(arch_kwargs: dict, requires_import: Sequence[str]) -> dict:
    """The plans' ``arch_kwargs`` with class names (``conv_op``, ``norm_op``, ...) turned into classes."""
    resolved = dict(arch_kwargs)
    for key in requires_import:
        if resolved.get(key) is not None:
            resolved[key] = pydoc.locate(resolved[key])
    return resolved


def availability_from_input(x: torch.Tensor) -> torch.Tensor:
    """(B, M) boolean: channels that are not exactly zero; samples with none available get all True."""
    available = x.flatten(2).ne(0).any(-1)
    return available | ~available.any(1, keepdim=True)


def fuse_mean(features: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Mean over the available modalities: (B, M, C, ...) and (B, M) -> (B, C, ...)."""
    weights = available.to(features.dtype).view(*available.shape, *([1] * (features.ndim - 2)))
    return (features * weights).sum(1) / weights.sum(1).clamp_min(1)


def similarity_loss(features: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """L_sim = sum over available m of mean |f_m - f_mean|, averaged over the batch.

    Args:
        features: (B, M, C, ...) per-modality features of one level.
        available: (B, M) boolean availability.
    """
    fused = fuse_mean(features, available).unsqueeze(1)  # (B, 1, C, ...)
    per_modality = (features - fused).abs().flatten(2).mean(-1)  # (B, M)
    return (per_modality * available.to(features.dtype)).sum(1).mean()


class SharedLatentUNet(nn.Module):
    """Multi-encoder U-Net with fusion by the mean over available modalities.

    Args:
        num_modalities: number of input channels, one encoder each.
        num_classes: segmentation outputs (one per region for region-based training).
        arch_kwargs: the plans' resolved ``arch_kwargs`` of a ``PlainConvUNet``.
        deep_supervision: return one output per decoder stage.
        feature_fraction: width of each modality encoder relative to the plans' features.
        reconstruction: add the (training-only) reconstruction decoder.
    """

    def __init__(self, *, num_modalities: int, num_classes: int, arch_kwargs: dict, deep_supervision: bool,
                 feature_fraction: float = 0.5, reconstruction: bool = False) -> None:
        super().__init__()
        assert 0 < feature_fraction <= 1, f"feature_fraction must be in (0, 1], got {feature_fraction}"
        features = [max(4, int(round(f * feature_fraction))) for f in arch_kwargs["features_per_stage"]]
        encoder_kwargs = {key: arch_kwargs[key] for key in (
            "n_stages", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage", "conv_bias", "norm_op",
            "norm_op_kwargs", "dropout_op", "dropout_op_kwargs", "nonlin", "nonlin_kwargs")}
        self.num_modalities = num_modalities
        self.encoders = nn.ModuleList([
            PlainConvEncoder(input_channels=1, features_per_stage=features, return_skips=True, **encoder_kwargs)
            for _ in range(num_modalities)])
        norm_op = arch_kwargs["norm_op"] or nn.InstanceNorm3d
        norm_kwargs = {**(arch_kwargs["norm_op_kwargs"] or {}), "affine": False}  # fixed affine parameters
        self.feature_norms = nn.ModuleList([norm_op(f, **norm_kwargs) for f in features])
        decoder_convs = arch_kwargs["n_conv_per_stage_decoder"]
        self.decoder = UNetDecoder(self.encoders[0], num_classes, decoder_convs, deep_supervision)
        self.reconstruction = UNetDecoder(self.encoders[0], num_modalities, decoder_convs, False) \
            if reconstruction else None

    def encode(self, x: torch.Tensor, available: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-level normalised per-modality features (B, M, C, ...) and their fusion (B, C, ...)."""
        per_modality = [encoder(x[:, m:m + 1]) for m, encoder in enumerate(self.encoders)]  # M lists of levels
        stacked, fused = [], []
        for level, norm in enumerate(self.feature_norms):
            level_features = torch.stack([norm(skips[level]) for skips in per_modality], 1)  # (B, M, C, ...)
            stacked.append(level_features)
            fused.append(fuse_mean(level_features, available))
        return stacked, fused

    def forward_with_aux(self, x: torch.Tensor, available: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor | list[torch.Tensor], dict]:
        """Segmentation plus what the training losses need (features, availability, reconstruction)."""
        available = availability_from_input(x) if available is None else available.bool()
        stacked, fused = self.encode(x, available)
        aux = {"features": stacked, "available": available}
        if self.reconstruction is not None:
            aux["reconstruction"] = self.reconstruction(fused)
        return self.decoder(fused), aux

    def forward(self, x: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        available = availability_from_input(x) if available is None else available.bool()
        return self.decoder(self.encode(x, available)[1])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accept training checkpoints in an inference network (their training-only weights are dropped)."""
        if self.reconstruction is None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
