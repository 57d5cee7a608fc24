"""Building blocks shared by this package's networks: slice-wise AdaIN, residual AdaIN blocks,
squeeze-and-excitation, and a U-Net decoder pass that also returns its stage features.

AdaIN after Huang & Belongie, "Arbitrary Style Transfer in Real-time with Adaptive Instance
Normalization", ICCV 2017; squeeze-and-excitation after Hu et al., "Squeeze-and-Excitation
Networks", CVPR 2018.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn


class SliceAdaIN(nn.Module):
    """Adaptive instance normalisation whose scale and shift come from per-slice codes.

    The code sequence (one N-dimensional code per slice along the first spatial axis) is average-pooled
    to the feature map's number of slices, and a linear map turns each pooled code into a per-channel
    scale and shift for that slice: ``out = IN(x) * (1 + gamma) + beta``.

    Args:
        channels: feature channels C.
        code_dim: code length N.
    """

    def __init__(self, channels: int, code_dim: int) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm3d(channels, affine=False, eps=1e-5)
        self.affine = nn.Conv1d(code_dim, 2 * channels, kernel_size=1)
        nn.init.zeros_(self.affine.weight)  # starts as plain instance normalisation
        nn.init.zeros_(self.affine.bias)

    def forward(self, features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """features (B, C, D, H, W), codes (B, G, N) -> (B, C, D, H, W)."""
        pooled = F.adaptive_avg_pool1d(codes.transpose(1, 2), features.shape[2])  # (B, N, D)
        gamma, beta = self.affine(pooled).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)  # (B, C, D, 1, 1) each
        return self.norm(features) * (1 + gamma) + beta


class AdaINResidualBlock(nn.Module):
    """``x + AdaIN(conv(act(AdaIN(conv(x)))))`` with 3x3x3 convolutions (MUNIT-style residual block)."""

    def __init__(self, channels: int, code_dim: int, conv_op: type[nn.Module] = nn.Conv3d) -> None:
        super().__init__()
        self.conv1 = conv_op(channels, channels, 3, padding=1, bias=False)
        self.adain1 = SliceAdaIN(channels, code_dim)
        self.conv2 = conv_op(channels, channels, 3, padding=1, bias=False)
        self.adain2 = SliceAdaIN(channels, code_dim)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        residual = self.act(self.adain1(self.conv1(features), codes))
        return features + self.adain2(self.conv2(residual), codes)


class SqueezeExcitation(nn.Module):
    """Channel re-weighting by a gate computed from globally pooled features."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels),
                                  nn.Sigmoid())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weights = self.gate(features.flatten(2).mean(-1))  # (B, C)
        return features * weights.view(*weights.shape, *([1] * (features.ndim - 2)))


def decode_with_features(decoder: UNetDecoder, skips: list[torch.Tensor]
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run a ``UNetDecoder`` and return every stage's features and logits, largest resolution first.

    Mirrors ``UNetDecoder.forward`` (same modules, same order) but keeps the stage features, which
    feature-level distillation needs; the logits are those of the decoder's deep-supervision heads.
    """
    below = skips[-1]
    features, logits = [], []
    for stage in range(len(decoder.stages)):
        upsampled = decoder.transpconvs[stage](below)
        below = decoder.stages[stage](torch.cat((upsampled, skips[-(stage + 2)]), 1))
        features.append(below)
        logits.append(decoder.seg_layers[stage](below))
    return features[::-1], logits[::-1]
