"""Networks of cross-modality feature transition (CMFT) and fusion (CMFF), built from nnU-Net's plans.

Zhang, Huang, Zhang, Han, Han, Yu, "Cross-Modality Deep Feature Learning for Brain Tumor Segmentation",
Pattern Recognition 110, 107562, 2021 (https://doi.org/10.1016/j.patcog.2020.107562). Equation, figure and
table numbers are the paper's.

The four modalities form two pairs (Sec. 3.3, Fig. 5-6): A = {T1, T1ce} and B = {T2, FLAIR} by default
(:class:`ModalityPairs`, read from the trainer config; channel indices from :mod:`nnunet_missingmod.modalities`).

* :class:`CMFTGenerators` (Sec. 3.1, Fig. 3): G_A→B and G_B→A, each the plans' U-Net (``PlainConvUNet`` or
  ``ResidualEncoderUNet`` as the plans' ``network_class_name`` says) with a linear |B|- (or |A|-) channel image
  output, so that the translated images live in nnU-Net's normalised intensity space. One forward pass gives
  the translations and, for eq. 4, the cycle reconstructions G_B→A(G_A→B(A)) and G_A→B(G_B→A(B)).
* :class:`PatchDiscriminator` (Table 1): 4x4x4 convolutions with stride 2 and 16-32-64-128 filters, instance
  normalisation after every one but the first, LeakyReLU, then a stride-1 4x4x4 convolution to one channel
  (a patch map of real/fake scores). :class:`CMFTDiscriminators` holds D_A and D_B as one module.
* :class:`CMFFNet` (Sec. 3.2, Fig. 3-4): the single-pair branches S_A and S_B (the generators' architecture,
  output layer replaced by a segmentation head, so the CMFT weights transfer to everything but the output
  layers: :func:`transfer_generator_weights`) and the fusion branch S_F
  (:class:`FusionBranch`), which fuses the features of the branches' last two decoder stages and guides the
  fused features with the branches' predicted masks (:class:`MaskGuidedAttention`).

The inference network is :class:`CMFFNet` itself: it holds no discriminator and no generator output layer, and
in eval mode its forward returns S_F's logits only (a list over S_F's resolutions while deep supervision is on).

Missing modalities: a pair is present in a sample when at least one of its channels is available (passed by
the trainer after modality dropout, else inferred from exactly-zero channels). When a whole pair is missing,
that branch's decoder features and predicted masks are multiplied by zero before they enter S_F, so the
fusion sees exactly nothing from the branch, not the response of its biases to an all-zero input.

Deviations from the paper, and why:

* sizes follow the plans (patch, stages, widths; the plans' normalisation and non-linearity) instead of a
  fixed 128³ patch; ``feature_fraction`` scales every stage's width of the generators and branches, rounded to
  multiples of 8 and never below the paper's 16 (:func:`scaled_width`). The trainers ship 0.5, which gives the
  paper's base width on nnU-Net's BraTS plans (Sec. 4.1: 16 base filters, doubled after each downsampling; the
  plans have 32): 16-32-64-128-160-160, the last two stages half of nnU-Net's cap of 320 (the paper gives no
  depth; stages follow the plans). At full width CMFF costs 2.21x the forward FLOPs of the plans' U-Net
  (BraTS 3d_fullres, 128³), at 0.75 1.24x and at 0.5 0.56x. FLOPs are not the whole cost: on the 2-core CPU
  a 24-channel 3x3x3 convolution takes as long as a 32-channel one (oneDNN's blocks of 16 channels), so 0.75
  measured 2.22x plain nnU-Net's inference time at 128³ and 0.5 1.18x (``scripts/bench_inference_plans.py``);
* the generators' output is linear, not tanh: nnU-Net's z-scored images are not bounded to [-1, 1];
* the discriminator is Table 1's for a 128³ input; along an axis that has fewer than 4 voxels left, a layer
  does not downsample (kernel 3, stride 1 there), and the last convolution uses kernel 3 where a single voxel
  is left, so it works on any patch the plans choose. LeakyReLU slope 0.2 and the normal(0, 0.02) weight
  initialisation are CycleGAN's (the reference the paper follows; it states neither);
* "the deep features in the last two convolutional layers" (Fig. 3) are taken as the outputs of the branches'
  last two decoder stages (full and half resolution); the paper's figure is not available to us and this
  reading works for any number of convolutions per decoder stage. S_F fuses them coarse to fine: at each of
  the two resolutions, a 1x1x1 convolution compresses the concatenated branch features (plus the upsampled
  fused features of the coarser level), a 3x3x3 convolution mixes them (each with the plans' normalisation and
  non-linearity; Fig. 4's "several convolutional layers"), then the attention block and a segmentation head.
  S_F therefore has two outputs, which carry its deep supervision (eq. 7 with nnU-Net's deep supervision);
* the mask-guided attention block (Fig. 4) is specified only as "the attention masks are the segmentation
  masks predicted by the single-modality branches". Ours: the features are projected by a 1x1x1 convolution
  into one group of channels per predicted mask (2 branches x C regions); each group is multiplied by its
  mask (the sigmoid of the branch's logits at that resolution, top-down: never computed from S_F's own
  features), and a 1x1x1 convolution merges the groups back, added to the features (residual), followed by
  the plans' normalisation and non-linearity. Each region mask of each branch can so select its own evidence
  (the paper's Table 2: S_A is good at ET, S_B at WT); the masks are not detached, so eq. 7's S_F term also
  trains the branches through them;
* ablations: ``attention="none"`` (Table 2 "Ours w/o MG") skips the block; ``attention="channel"`` ("Ours w
  CA") replaces it by a conventional squeeze-and-excitation channel attention computed from the fused
  features themselves (bottom-up). The paper cites CBAM for this block; SE is its channel part without the
  max-pooling path and without the spatial part;
* region-based training only (one sigmoid per region, as this package's BraTS datasets): the masks are
  sigmoids of the region logits; 3D configurations only (the paper is 3D).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.networks.blocks import SqueezeExcitation, decode_with_features
from nnunet_missingmod.networks.shared_latent import availability_from_input

#: ``attention`` settings of :class:`CMFFNet`: the paper's block and the two ablations of Table 2.
ATTENTION_MODES = ("mask_guided", "channel", "none")
#: Key fragment of the U-Nets' output layers (nnU-Net's ``seg_layers``): the generators' image outputs and the
#: branches' segmentation heads, never transferred from CMFT to CMFF.
OUTPUT_LAYER_KEY = ".seg_layers."
#: Narrowest stage width :func:`scaled_width` produces: the paper's 16 base filters.
MIN_WIDTH = 16
#: Which CMFT generator initialises which CMFF branch (Sec. 4.1: S_A and S_B take the generators' inputs).
GENERATOR_OF_BRANCH = {"branch_a.": "a_to_b.", "branch_b.": "b_to_a."}


@dataclass(frozen=True)
class ModalityPairs:
    """The two modality pairs of Sec. 3.3 as channel indices (sorted), e.g. A = (0, 1), B = (2, 3).

    Attributes:
        a: channels of pair A (input of G_A→B and S_A).
        b: channels of pair B (input of G_B→A and S_B).
    """

    a: tuple[int, ...]
    b: tuple[int, ...]

    @classmethod
    def from_config(cls, settings: dict, num_modalities: int, where: str = "pairs") -> ModalityPairs:
        """Pairs from a config entry ``{"a": ["t1", "t1ce"], "b": ["t2", "flair"]}``.

        Raises:
            ValueError: a pair is missing or empty, names an unknown modality or a channel the dataset does not
                have, or the pairs overlap (the message names ``where``).
        """
        if not isinstance(settings, dict) or set(settings) != {"a", "b"}:
            raise ValueError(f"{where} must be an object with the keys 'a' and 'b' (lists of modality names), "
                             f"got {settings!r}")
        pairs = {}
        for key in ("a", "b"):
            names = settings[key]
            if isinstance(names, str) or not isinstance(names, (list, tuple)):
                raise ValueError(f"{where}.{key} must be a list of modality names, got {names!r}")
            try:
                indices = mods.parse_modalities(names)
            except ValueError as error:
                raise ValueError(f"{where}.{key}: {error}") from None
            outside = [i for i in indices if i >= num_modalities]
            if outside:
                raise ValueError(f"{where}.{key} names channel(s) {outside}, but the dataset has {num_modalities} "
                                 f"modality channels")
            pairs[key] = indices
        overlap = sorted(set(pairs["a"]) & set(pairs["b"]))
        if overlap:
            raise ValueError(f"{where}: pairs a and b share {[mods.MODALITIES[i] for i in overlap]}; each modality "
                             f"may belong to one pair only")
        return cls(a=pairs["a"], b=pairs["b"])

    def names(self) -> dict[str, list[str]]:
        """``{"a": ["t1", "t1ce"], "b": ["t2", "flair"]}`` (what checkpoints record)."""
        return {"a": [mods.MODALITIES[i] for i in self.a], "b": [mods.MODALITIES[i] for i in self.b]}


def scaled_width(channels: int, feature_fraction: float) -> int:
    """``channels * feature_fraction`` rounded (half up) to a multiple of 8, never below ``min(channels, 16)``.

    Multiples of 8 because CPU (oneDNN) and GPU convolutions are much slower on other widths: a 3x3x3
    convolution on 48³ took 1.6 s with 12 channels and 0.16 s with 16 on the benchmark machine. The floor
    of 16 (:data:`MIN_WIDTH`) is the paper's base width (Sec. 4.1: 16 filters in the first stage); a plans'
    width below it is never narrowed further.
    """
    return max(min(channels, MIN_WIDTH), int(channels * feature_fraction / 8 + 0.5) * 8)


def scaled_arch_kwargs(arch_kwargs: dict, feature_fraction: float) -> dict:
    """The plans' architecture kwargs with every stage's width scaled by ``feature_fraction`` (:func:`scaled_width`)."""
    if not (isinstance(feature_fraction, (int, float)) and 0 < feature_fraction <= 4):
        raise ValueError(f"feature_fraction must be a number in (0, 4], got {feature_fraction!r}")
    kwargs = copy.deepcopy(dict(arch_kwargs))
    if feature_fraction != 1:
        features = kwargs["features_per_stage"]
        features = [features] * kwargs["n_stages"] if isinstance(features, int) else features
        kwargs["features_per_stage"] = [scaled_width(c, feature_fraction) for c in features]
    return kwargs


def build_plans_unet(arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import: list[str] | tuple[str, ...],
                     input_channels: int, output_channels: int, deep_supervision: bool) -> nn.Module:
    """The configuration's U-Net (nnU-Net's ``get_network_from_plans``, He-initialised), 3D only.

    Raises:
        ValueError: the configuration is not 3D.
    """
    unet = get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, input_channels,
                                  output_channels, allow_init=True, deep_supervision=deep_supervision)
    if unet.encoder.conv_op is not nn.Conv3d:
        raise ValueError(f"CMFT/CMFF networks need a 3D configuration (the paper's 3D U-Net), but the plans' "
                         f"network uses {unet.encoder.conv_op.__name__}")
    return unet


def _select(x: torch.Tensor, channels: tuple[int, ...]) -> torch.Tensor:
    """The given channels of a (B, M, ...) batch, as a view when they are contiguous."""
    if channels == tuple(range(channels[0], channels[-1] + 1)):
        return x[:, channels[0]:channels[-1] + 1]
    return x[:, list(channels)]


# ------------------------------------------------------------------------------------------------ transition
class CMFTGenerators(nn.Module):
    """G_A→B and G_B→A (Sec. 3.1), each the plans' U-Net with a linear image output.

    Args:
        pairs: the modality pairs.
        arch_class_name, arch_kwargs, arch_kwargs_req_import: the configuration's network from the plans
            (``arch_kwargs`` already scaled by ``feature_fraction``).
    """

    def __init__(self, *, pairs: ModalityPairs, arch_class_name: str, arch_kwargs: dict,
                 arch_kwargs_req_import: list[str] | tuple[str, ...]) -> None:
        super().__init__()
        self.pairs = pairs
        self.a_to_b = build_plans_unet(arch_class_name, arch_kwargs, arch_kwargs_req_import, len(pairs.a),
                                       len(pairs.b), deep_supervision=False)
        self.b_to_a = build_plans_unet(arch_class_name, arch_kwargs, arch_kwargs_req_import, len(pairs.b),
                                       len(pairs.a), deep_supervision=False)

    def forward(self, x: torch.Tensor, cycle: bool = False) -> dict[str, torch.Tensor]:
        """x (B, M, ...) -> ``fake_b`` = G_A→B(A) (B, |B|, ...), ``fake_a`` = G_B→A(B) (B, |A|, ...) and, with
        ``cycle``, ``cycle_a`` = G_B→A(G_A→B(A)) and ``cycle_b`` = G_A→B(G_B→A(B)) (eq. 1 and 4)."""
        fake_b = self.a_to_b(_select(x, self.pairs.a))
        fake_a = self.b_to_a(_select(x, self.pairs.b))
        out = {"fake_a": fake_a, "fake_b": fake_b}
        if cycle:
            out["cycle_a"] = self.b_to_a(fake_b)
            out["cycle_b"] = self.a_to_b(fake_a)
        return out


class PatchDiscriminator(nn.Module):
    """The 3D discriminator of Table 1, sized for ``patch_size`` (see the module docstring).

    Args:
        in_channels: channels of the judged images (2 for a modality pair, Table 1's note).
        patch_size: spatial size of the images.
        features: filters of the strided convolutions (Table 1: 16, 32, 64, 128).
        negative_slope: LeakyReLU slope.
    """

    def __init__(self, in_channels: int, patch_size: tuple[int, ...] | list[int],
                 features: tuple[int, ...] | list[int] = (16, 32, 64, 128), negative_slope: float = 0.2) -> None:
        super().__init__()
        if len(patch_size) != 3:
            raise ValueError(f"the CMFT discriminator is 3D, got a patch of {len(patch_size)} axes {patch_size}")
        size = [int(s) for s in patch_size]
        layers: list[nn.Module] = []
        channels = in_channels
        for index, width in enumerate(features):
            strides = [2 if s >= 4 else 1 for s in size]
            kernels = [4 if stride == 2 else 3 for stride in strides]
            layers.append(nn.Conv3d(channels, width, kernels, strides, padding=1))  # L1, L3, L6, L9
            if index > 0:
                layers.append(nn.InstanceNorm3d(width))  # L4, L7, L10
            layers.append(nn.LeakyReLU(negative_slope, inplace=True))  # L2, L5, L8, L11
            size = [s // 2 if stride == 2 else s for s, stride in zip(size, strides, strict=True)]
            channels = width
        kernels = [4 if s >= 2 else 3 for s in size]
        layers.append(nn.Conv3d(channels, 1, kernels, 1, padding=1))  # L12
        self.layers = nn.Sequential(*layers)
        self.output_size = tuple(s - 1 if k == 4 else s for s, k in zip(size, kernels, strict=True))
        for module in self.modules():
            if isinstance(module, nn.Conv3d):  # CycleGAN's initialisation
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, in_channels, *patch) -> patch scores (B, 1, *output_size)."""
        return self.layers(images)


class CMFTDiscriminators(nn.Module):
    """D_A (real vs. generated pair-A images) and D_B (pair B) as one module (one optimiser, one checkpoint entry)."""

    def __init__(self, pairs: ModalityPairs, patch_size: tuple[int, ...] | list[int],
                 features: tuple[int, ...] | list[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.discriminator_a = PatchDiscriminator(len(pairs.a), patch_size, features)
        self.discriminator_b = PatchDiscriminator(len(pairs.b), patch_size, features)

    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(D_A(images_a), D_B(images_b)); one call, so that DDP sees both."""
        return self.discriminator_a(images_a), self.discriminator_b(images_b)


# ------------------------------------------------------------------------------------------------ fusion
class MaskGuidedAttention(nn.Module):
    """Fig. 4's mask-guided attention block: the branches' predicted masks gate groups of the fused features.

    ``out = act(norm(x + merge(concat_k(mask_k * project_k(x)))))`` where ``project`` is a 1x1x1 convolution
    into K groups of ``group_channels`` channels (one group per mask), ``mask_k`` the k-th predicted mask in
    [0, 1] (top-down: from S_A / S_B, never from ``x``), and ``merge`` a 1x1x1 convolution back to ``channels``.

    Args:
        channels: feature channels.
        num_masks: K, the masks of both branches together (2 x regions).
        conv_op, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs: the plans' layers.
        group_channels: channels per mask group (default ``ceil(channels / K)``, raised so that K times it is a
            multiple of 8, for the speed of the 1x1x1 convolutions).
    """

    def __init__(self, channels: int, num_masks: int, conv_op: type[nn.Module], norm_op: type[nn.Module] | None,
                 norm_op_kwargs: dict | None, nonlin: type[nn.Module] | None, nonlin_kwargs: dict | None,
                 group_channels: int | None = None) -> None:
        super().__init__()
        self.num_masks = num_masks
        step = 8 // math.gcd(num_masks, 8)
        self.group_channels = group_channels or step * math.ceil(math.ceil(channels / num_masks) / step)
        self.project = conv_op(channels, num_masks * self.group_channels, 1)
        self.merge = conv_op(num_masks * self.group_channels, channels, 1)
        self.norm = norm_op(channels, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()
        self.nonlin = nonlin(**(nonlin_kwargs or {})) if nonlin is not None else nn.Identity()

    def forward(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """features (B, C, ...), masks (B, K, ...) in [0, 1] -> (B, C, ...)."""
        batch, spatial = features.shape[0], features.shape[2:]
        groups = self.project(features).view(batch, self.num_masks, self.group_channels, *spatial)  # (B, K, g, ...)
        attended = (groups * masks.unsqueeze(2)).flatten(1, 2)  # (B, K * g, ...)
        return self.nonlin(self.norm(features + self.merge(attended)))


class ChannelAttention(nn.Module):
    """Ablation "Ours w CA": a conventional (bottom-up) channel attention, squeeze-and-excitation on the features.

    Takes the masks only to share :class:`MaskGuidedAttention`'s signature; it ignores them.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.excitation = SqueezeExcitation(channels)

    def forward(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.excitation(features)


class NoAttention(nn.Module):
    """Ablation "Ours w/o MG": the fused features pass unchanged."""

    def forward(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return features


class FusionBranch(nn.Module):
    """S_F (Fig. 4): fuses the branches' last ``levels`` decoder stages, coarse to fine, with attention per level.

    Args:
        encoder: the branches' encoder (layers, widths and strides of the plans' U-Net).
        levels: decoder stages fused (2: full and half resolution).
        num_classes: segmentation outputs (regions).
        attention: ``mask_guided``, ``channel`` or ``none``.
    """

    def __init__(self, encoder: nn.Module, levels: int, num_classes: int, attention: str) -> None:
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.levels = levels
        layers = {"conv_op": encoder.conv_op, "conv_bias": encoder.conv_bias, "norm_op": encoder.norm_op,
                  "norm_op_kwargs": encoder.norm_op_kwargs, "dropout_op": None, "dropout_op_kwargs": None,
                  "nonlin": encoder.nonlin, "nonlin_kwargs": encoder.nonlin_kwargs}
        channels = list(encoder.output_channels)
        transpconv = get_matching_convtransp(conv_op=encoder.conv_op)
        self.compress, self.mix, self.attention, self.heads = (nn.ModuleList() for _ in range(4))
        self.upsample = nn.ModuleList()
        for level in range(levels):  # level 0 = full resolution
            width = channels[level]
            inputs = 2 * width + (width if level + 1 < levels else 0)
            self.compress.append(ConvDropoutNormReLU(input_channels=inputs, output_channels=width, kernel_size=1,
                                                     stride=1, **layers))
            self.mix.append(ConvDropoutNormReLU(input_channels=width, output_channels=width,
                                                kernel_size=encoder.kernel_sizes[level], stride=1, **layers))
            if attention == "mask_guided":
                block = MaskGuidedAttention(width, 2 * num_classes, encoder.conv_op, encoder.norm_op,
                                            encoder.norm_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs)
            elif attention == "channel":
                block = ChannelAttention(width)
            else:
                block = NoAttention()
            self.attention.append(block)
            self.heads.append(encoder.conv_op(width, num_classes, 1, 1, 0, bias=True))
            if level + 1 < levels:
                stride = encoder.strides[level + 1]
                self.upsample.append(transpconv(channels[level + 1], width, stride, stride, bias=encoder.conv_bias))

    def forward(self, features_a: list[torch.Tensor], features_b: list[torch.Tensor], masks_a: list[torch.Tensor],
                masks_b: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per level (largest first): branch features (B, C_l, ...) and masks (B, R, ...) -> S_F logits per level."""
        outputs: list[torch.Tensor | None] = [None] * self.levels
        coarser = None
        for level in reversed(range(self.levels)):
            parts = [features_a[level], features_b[level]]
            if coarser is not None:
                parts.append(self.upsample[level](coarser))
            fused = self.mix[level](self.compress[level](torch.cat(parts, 1)))  # (B, C_l, ...)
            fused = self.attention[level](fused, torch.cat((masks_a[level], masks_b[level]), 1))
            outputs[level] = self.heads[level](fused)
            coarser = fused
        return outputs


class CMFFNet(nn.Module):
    """The cross-modality feature fusion network (Sec. 3.2): S_A, S_B and S_F.

    Args:
        pairs: the modality pairs (S_A reads pair A, S_B pair B).
        num_regions: segmentation outputs (one sigmoid per region).
        arch_class_name, arch_kwargs, arch_kwargs_req_import: the configuration's network from the plans
            (``arch_kwargs`` already scaled by ``feature_fraction``; must match the CMFT generators' for the
            transfer).
        deep_supervision: S_F returns its logits at every fused level (training); otherwise full resolution only.
        attention: ``mask_guided`` (the paper), ``channel`` or ``none`` (Table 2 ablations).
        fusion_levels: decoder stages fused (2 in the paper's reading; fewer if the U-Net has fewer).
    """

    def __init__(self, *, pairs: ModalityPairs, num_regions: int, arch_class_name: str, arch_kwargs: dict,
                 arch_kwargs_req_import: list[str] | tuple[str, ...], deep_supervision: bool,
                 attention: str = "mask_guided", fusion_levels: int = 2) -> None:
        super().__init__()
        if not (isinstance(fusion_levels, int) and fusion_levels >= 1):
            raise ValueError(f"fusion_levels must be an integer >= 1, got {fusion_levels!r}")
        self.pairs = pairs
        self.branch_a = build_plans_unet(arch_class_name, arch_kwargs, arch_kwargs_req_import, len(pairs.a),
                                         num_regions, deep_supervision)
        self.branch_b = build_plans_unet(arch_class_name, arch_kwargs, arch_kwargs_req_import, len(pairs.b),
                                         num_regions, deep_supervision)
        encoder = self.branch_a.encoder
        levels = min(fusion_levels, len(encoder.output_channels) - 1)
        self.fusion = FusionBranch(encoder, levels, num_regions, attention)
        self.fusion.apply(InitWeights_He(1e-2))
        self.deep_supervision = deep_supervision

    def set_deep_supervision(self, enabled: bool) -> None:
        """Switch S_F's (and the branches') deep-supervision outputs on or off."""
        self.deep_supervision = enabled
        self.branch_a.decoder.deep_supervision = enabled
        self.branch_b.decoder.deep_supervision = enabled

    @staticmethod
    def _branch(unet: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A branch's decoder features and logits at every decoder stage, largest first."""
        return decode_with_features(unet.decoder, unet.encoder(x))

    def forward(self, x: torch.Tensor, available: torch.Tensor | None = None, return_branches: bool = False):
        """S_F's logits (a list over its levels, largest first, while deep supervision is on).

        Args:
            x: (B, M, ...) all modality channels, missing ones zero.
            available: (B, M) boolean, the modalities each sample has (default: the channels that are not
                exactly zero).
            return_branches: also return S_A's and S_B's logits (training, eq. 7): then the result is a dict
                with ``fused``, ``a``, ``b`` (lists over every decoder stage while deep supervision is on) and
                ``present_a``, ``present_b`` (B,) booleans.
        """
        available = availability_from_input(x) if available is None else available.bool()
        present_a = _select(available, self.pairs.a).any(1)  # (B,)
        present_b = _select(available, self.pairs.b).any(1)
        features_a, logits_a = self._branch(self.branch_a, _select(x, self.pairs.a))
        features_b, logits_b = self._branch(self.branch_b, _select(x, self.pairs.b))
        levels = self.fusion.levels
        keep_a = present_a.to(features_a[0].dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1, 1)
        keep_b = present_b.to(features_b[0].dtype).view(-1, *([1] * (x.ndim - 1)))
        fused = self.fusion([f * keep_a for f in features_a[:levels]], [f * keep_b for f in features_b[:levels]],
                            [torch.sigmoid(p) * keep_a for p in logits_a[:levels]],
                            [torch.sigmoid(p) * keep_b for p in logits_b[:levels]])
        fused = fused if self.deep_supervision else fused[0]
        if not return_branches:
            return fused
        return {"fused": fused, "a": logits_a if self.deep_supervision else logits_a[0],
                "b": logits_b if self.deep_supervision else logits_b[0], "present_a": present_a,
                "present_b": present_b}


def transfer_generator_weights(network: CMFFNet, generator_weights: dict[str, torch.Tensor], source: str
                               ) -> list[str]:
    """Initialise S_A from G_A→B and S_B from G_B→A: every weight but the output layers (Sec. 3.2, 4.1).

    Args:
        network: the CMFF network (its fusion branch and segmentation heads are left as they are).
        generator_weights: ``network_weights`` of a CMFTPretrainer checkpoint (keys ``a_to_b.*``, ``b_to_a.*``).
        source: the checkpoint's name, for error messages.

    Returns:
        The CMFF keys that were copied.

    Raises:
        ValueError: a branch weight has no counterpart in the checkpoint or another shape (different plans,
            configuration, modality pairs or ``feature_fraction``).
    """
    state = network.state_dict()
    copied, problems = {}, []
    for key, tensor in state.items():
        prefix = next((p for p in GENERATOR_OF_BRANCH if key.startswith(p)), None)
        if prefix is None or OUTPUT_LAYER_KEY in key:
            continue
        source_key = GENERATOR_OF_BRANCH[prefix] + key[len(prefix):]
        if source_key not in generator_weights:
            problems.append(f"{source_key} is missing")
        elif tuple(generator_weights[source_key].shape) != tuple(tensor.shape):
            problems.append(f"{source_key} has shape {tuple(generator_weights[source_key].shape)}, {key} needs "
                            f"{tuple(tensor.shape)}")
        else:
            copied[key] = generator_weights[source_key]
    if problems or not copied:
        listed = "; ".join(problems[:3]) + (f"; ... ({len(problems)} in all)" if len(problems) > 3 else "")
        raise ValueError(f"{source} does not fit this CMFF network: {listed or 'it holds no generator weights'}. "
                         f"Pretrain with CMFTPretrainer on the same plans, configuration, modality pairs and "
                         f"feature_fraction")
    network.load_state_dict({**state, **{k: v.to(state[k].device, state[k].dtype) for k, v in copied.items()}})
    return sorted(copied)
