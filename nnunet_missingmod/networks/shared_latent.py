"""Shared-latent multi-encoder U-Net for missing modalities (HeMIS-style fusion).

After van Tulder & de Bruijne, "Learning cross-modality representations from multi-modal images",
IEEE TMI 2018, and Havaei et al., "HeMIS: Hetero-Modal
Image Segmentation", MICCAI 2016:

* one encoder f^m per modality (1 input channel, own weights), built from the plans: nnU-Net's
  ``PlainConvEncoder`` for ``PlainConvUNet`` plans, its ``ResidualEncoder`` for the residual-encoder
  presets (``nnUNetPlannerResEncM/L/XL``, ``ResidualEncoderUNet``);
* per-feature normalisation of each modality's features (Sec. II-D), with the affine parameters fixed at
  scale 1 and shift 0, since learnt ones could reintroduce differences between modalities;
* fusion by the mean over the **available** modalities only, f(x) = sum_m f^m(x^m) / |available|
  (Sec. II-A: dividing by the number of modalities makes the scale independent of it);
* one shared decoder (nnU-Net's ``UNetDecoder``, deep supervision) producing the segmentation;
* (training only) a reconstruction decoder g that rebuilds every modality from the fused representation,
  with linear outputs (Sec. II-A), trained with L_rec (eq. 1, L1) on every modality whose target is known;
* L_sim (eq. 2) between each available modality's features and their mean.

Deviations from the paper, and why:

* the paper is an unsupervised autoencoder (its features then feed a random forest); here the shared
  representation feeds a segmentation U-Net trained jointly, and L_rec / L_sim are auxiliary terms
  (the direction the paper's Sec. VI-D suggests);
* the fused representation is every encoder level (the segmentation decoder needs the skips), so the
  per-feature normalisation, the mean fusion and L_sim are applied at every level, not only at the
  central layer; L_sim is averaged over the levels;
* the per-feature normalisation is instance normalisation (per sample) rather than batch normalisation
  with running statistics, as nnU-Net uses instance normalisation with its small batches; the paper's
  "β = 1 and γ = 0" is read as scale 1, shift 0 (the other way round would zero every feature);
* one reconstruction decoder with one output channel per modality instead of one decoder g^m per
  modality (cheaper in 3D; every output still sees only the shared representation);
* by default the reconstruction decoder starts from the fused **bottleneck alone**, without skip
  connections, like the paper's decoder, which inverts the encoder from the central representation. With
  ``reconstruction_skips=True`` it is a U-Net decoder on all fused levels; its highest-resolution skip
  lets it rebuild the input from shallow features and bypass the representation that L_rec is meant to
  shape, so that option exists only for comparison;
* the encoders use ``feature_fraction`` (default 0.5) of the plans' features per stage, so that four
  encoders cost about as much as one full encoder; the decoders work on that width;
* nnU-Net's convolution blocks (instance norm, leaky ReLU, strided "same" convolutions, transposed
  convolutions) instead of the paper's valid convolutions and batch normalisation;
* normalisation of the terms: the paper's |.| is read as the per-element mean of the absolute error
  within a modality, summed over the modalities as in eqs. 1 and 2 and averaged over the batch, the same
  for L_rec and L_sim, so that alpha of eq. 3 weighs comparable quantities;
* a modality counts as available when its channel is not exactly zero (nnU-Net's convention for a
  missing modality); training passes the dropout's availability mask explicitly. A sample without any
  available modality (a background-only patch) fuses to exactly 0 in training; at inference every
  channel of such a patch is zero and the mean over all four encoders is taken (their outputs for a
  zero input are close to, not exactly, 0: a negligible difference on background);
* one normalisation module per level, shared by the modalities: with instance normalisation without
  running statistics (nnU-Net's plans) this equals the paper's per-modality statistics; plans with batch
  normalisation would share the statistics across modalities, zeroed ones included;
* the optimiser is nnU-Net's SGD with its poly schedule (the paper: SGD at a learning rate of 0.3).
"""

from __future__ import annotations

import pydoc
from collections.abc import Sequence

import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

TRAINING_ONLY_PREFIXES = ("reconstruction.",)
#: nnU-Net network classes whose plans this network can be built from (matched on the class name's end).
SUPPORTED_ARCHITECTURES = ("PlainConvUNet", "ResidualEncoderUNet")
RECONSTRUCTION_LOSSES = ("l1", "mse")
_COMMON_ENCODER_KEYS = ("n_stages", "conv_op", "kernel_sizes", "strides", "conv_bias", "norm_op", "norm_op_kwargs",
                        "dropout_op", "dropout_op_kwargs", "nonlin", "nonlin_kwargs")
_OPTIONAL_RESIDUAL_KEYS = ("block", "bottleneck_channels", "stem_channels")


def resolve_architecture_kwargs(arch_kwargs: dict, requires_import: Sequence[str]) -> dict:
    """The plans' ``arch_kwargs`` with class names (``conv_op``, ``norm_op``, ...) turned into classes."""
    resolved = dict(arch_kwargs)
    for key in requires_import:
        if isinstance(resolved.get(key), str):
            resolved[key] = pydoc.locate(resolved[key])
    return resolved


def build_modality_encoder(arch_class_name: str, arch_kwargs: dict, features_per_stage: Sequence[int]
                           ) -> PlainConvEncoder | ResidualEncoder:
    """A one-channel U-Net encoder (skips returned) of the plans' kind with the given widths.

    Args:
        arch_class_name: the plans' ``network_class_name`` (``...PlainConvUNet`` or ``...ResidualEncoderUNet``).
        arch_kwargs: the plans' resolved ``arch_kwargs``.
        features_per_stage: width of each stage.

    Raises:
        ValueError: an architecture other than nnU-Net's plain or residual-encoder U-Net.
    """
    common = {key: arch_kwargs[key] for key in _COMMON_ENCODER_KEYS}
    if arch_class_name.endswith("ResidualEncoderUNet"):
        optional = {key: arch_kwargs[key] for key in _OPTIONAL_RESIDUAL_KEYS if arch_kwargs.get(key) is not None}
        if isinstance(optional.get("block"), str):
            optional["block"] = pydoc.locate(optional["block"])
        return ResidualEncoder(input_channels=1, features_per_stage=list(features_per_stage),
                               n_blocks_per_stage=arch_kwargs["n_blocks_per_stage"], return_skips=True,
                               **common, **optional)
    if arch_class_name.endswith("PlainConvUNet"):
        return PlainConvEncoder(input_channels=1, features_per_stage=list(features_per_stage),
                                n_conv_per_stage=arch_kwargs["n_conv_per_stage"], return_skips=True, **common)
    raise ValueError(f"SharedLatentUNet builds on the plans of {' or '.join(SUPPORTED_ARCHITECTURES)}, "
                     f"got {arch_class_name}")


def availability_from_input(x: torch.Tensor) -> torch.Tensor:
    """(B, M) boolean: channels that are not exactly zero; samples with none available get all True."""
    available = x.flatten(2).ne(0).any(-1)
    return available | ~available.any(1, keepdim=True)


def fuse_mean(features: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Mean over the available modalities: (B, M, C, ...) and (B, M) -> (B, C, ...)."""
    weights = available.to(features.dtype).view(*available.shape, *([1] * (features.ndim - 2)))
    return (features * weights).sum(1) / weights.sum(1).clamp_min(1)


def similarity_loss(features: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """L_sim (eq. 2) = sum over available m of mean |f_m - f_mean|, averaged over the batch.

    Args:
        features: (B, M, C, ...) per-modality features of one level.
        available: (B, M) boolean availability.
    """
    fused = fuse_mean(features, available).unsqueeze(1)  # (B, 1, C, ...)
    per_modality = (features - fused).abs().flatten(2).mean(-1)  # (B, M)
    return (per_modality * available.to(features.dtype)).sum(1).mean()


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, known: torch.Tensor,
                        kind: str = "l1") -> torch.Tensor:
    """L_rec (eq. 1) = sum over known m of mean |g_m(f(x)) - x_m|, averaged over the batch.

    The paper's error is L1; ``kind="mse"`` squares it instead (this package's former choice).

    Args:
        reconstruction: (B, M, ...) reconstructed modalities.
        target: (B, M, ...) the input before modality dropout.
        known: (B, M) boolean: modalities whose target exists (acquired, dropped or not).
        kind: ``l1`` or ``mse``.
    """
    if kind not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"shared_latent.reconstruction_loss: unknown loss {kind!r}; expected one of "
                         f"{RECONSTRUCTION_LOSSES}")
    difference = reconstruction - target
    error = difference.abs() if kind == "l1" else difference.pow(2)
    per_modality = error.flatten(2).mean(-1)  # (B, M)
    return (per_modality * known.to(per_modality.dtype)).sum(1).mean()


class LatentDecoder(nn.Module):
    """Decoder from the bottleneck alone, without skip connections (the paper's g: the encoder inverted).

    Each stage, from the lowest resolution up: a transposed convolution to the next encoder stage's width and
    resolution, then that stage's number of convolution blocks. A linear 1x1 convolution gives the outputs.

    Args:
        encoder: the encoder whose stages it inverts (widths, strides, kernel sizes, conv/norm/nonlin ops).
        num_outputs: output channels (one per modality).
        n_conv_per_stage: convolution blocks per decoder stage (one entry per stage after the bottleneck).
    """

    def __init__(self, encoder: PlainConvEncoder | ResidualEncoder, num_outputs: int,
                 n_conv_per_stage: int | Sequence[int]) -> None:
        super().__init__()
        num_stages = len(encoder.output_channels)
        if isinstance(n_conv_per_stage, int):
            n_conv_per_stage = [n_conv_per_stage] * (num_stages - 1)
        if len(n_conv_per_stage) != num_stages - 1:
            raise ValueError(f"plans: n_conv_per_stage_decoder needs {num_stages - 1} entries, "
                             f"got {list(n_conv_per_stage)}")
        transpconv_op = get_matching_convtransp(conv_op=encoder.conv_op)
        upsamplings, stages = [], []
        for s in range(1, num_stages):
            below, above, stride = encoder.output_channels[-s], encoder.output_channels[-(s + 1)], encoder.strides[-s]
            upsamplings.append(transpconv_op(below, above, stride, stride, bias=encoder.conv_bias))
            stages.append(StackedConvBlocks(
                n_conv_per_stage[s - 1], encoder.conv_op, above, above, encoder.kernel_sizes[-(s + 1)], 1,
                encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs, encoder.dropout_op,
                encoder.dropout_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs))
        self.upsamplings = nn.ModuleList(upsamplings)
        self.stages = nn.ModuleList(stages)
        self.output = encoder.conv_op(encoder.output_channels[0], num_outputs, 1, 1, 0, bias=True)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        x = bottleneck  # (B, C_last, lowest resolution)
        for upsample, stage in zip(self.upsamplings, self.stages, strict=True):
            x = stage(upsample(x))
        return self.output(x)  # (B, num_outputs, full resolution)


class SharedLatentUNet(nn.Module):
    """Multi-encoder U-Net with fusion by the mean over available modalities.

    Args:
        num_modalities: number of input channels, one encoder each.
        num_classes: segmentation outputs (one per region for region-based training).
        arch_kwargs: the plans' resolved ``arch_kwargs`` of a ``PlainConvUNet`` or ``ResidualEncoderUNet``.
        deep_supervision: return one output per decoder stage.
        feature_fraction: width of each modality encoder relative to the plans' features.
        reconstruction: add the (training-only) reconstruction decoder.
        reconstruction_skips: give the reconstruction decoder the fused skips of every level (U-Net decoder)
            instead of the bottleneck alone (the paper's; default).
        arch_class_name: the plans' ``network_class_name``; selects the encoder kind.

    Example:
        >>> network = SharedLatentUNet(num_modalities=4, num_classes=3, arch_kwargs=kwargs, deep_supervision=False)
        >>> segmentation = network(x)  # missing modalities: all-zero channels of x
    """

    def __init__(self, *, num_modalities: int, num_classes: int, arch_kwargs: dict, deep_supervision: bool,
                 feature_fraction: float = 0.5, reconstruction: bool = False, reconstruction_skips: bool = False,
                 arch_class_name: str = "PlainConvUNet") -> None:
        super().__init__()
        if not 0 < feature_fraction <= 1:
            raise ValueError(f"shared_latent.network.feature_fraction must be in (0, 1], got {feature_fraction}")
        features = [max(4, int(round(f * feature_fraction))) for f in arch_kwargs["features_per_stage"]]
        self.num_modalities = num_modalities
        self.encoders = nn.ModuleList([build_modality_encoder(arch_class_name, arch_kwargs, features)
                                       for _ in range(num_modalities)])
        norm_op = arch_kwargs["norm_op"] or nn.InstanceNorm3d
        norm_kwargs = {**(arch_kwargs["norm_op_kwargs"] or {}), "affine": False}  # fixed affine parameters
        self.feature_norms = nn.ModuleList([norm_op(f, **norm_kwargs) for f in features])
        decoder_convs = arch_kwargs["n_conv_per_stage_decoder"]
        self.decoder = UNetDecoder(self.encoders[0], num_classes, decoder_convs, deep_supervision)
        self.reconstruction_skips = reconstruction_skips
        self.reconstruction: nn.Module | None = None
        if reconstruction:
            self.reconstruction = UNetDecoder(self.encoders[0], num_modalities, decoder_convs, False) \
                if reconstruction_skips else LatentDecoder(self.encoders[0], num_modalities, decoder_convs)

    def encode(self, x: torch.Tensor, available: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-level normalised per-modality features (B, M, C, ...) and their fusion (B, C, ...)."""
        per_modality = [encoder(x[:, m:m + 1]) for m, encoder in enumerate(self.encoders)]  # M lists of levels
        stacked, fused = [], []
        for level, norm in enumerate(self.feature_norms):
            level_features = torch.stack([norm(skips[level]) for skips in per_modality], 1)  # (B, M, C, ...)
            stacked.append(level_features)
            fused.append(fuse_mean(level_features, available))
        return stacked, fused

    def reconstruct(self, fused: list[torch.Tensor]) -> torch.Tensor:
        """(B, M, ...) reconstruction of every modality from the fused representation."""
        if self.reconstruction is None:
            raise RuntimeError("this network was built without the reconstruction decoder (inference network)")
        return self.reconstruction(fused if self.reconstruction_skips else fused[-1])

    def forward_with_aux(self, x: torch.Tensor, available: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor | list[torch.Tensor], dict]:
        """Segmentation plus what the training losses need (features, availability, reconstruction)."""
        available = availability_from_input(x) if available is None else available.bool()
        stacked, fused = self.encode(x, available)
        aux = {"features": stacked, "available": available}
        if self.reconstruction is not None:
            aux["reconstruction"] = self.reconstruct(fused)
        return self.decoder(fused), aux

    def forward(self, x: torch.Tensor, available: torch.Tensor | None = None, return_aux: bool = False):
        """Segmentation; with ``return_aux`` (training) also the dict of :meth:`forward_with_aux`.

        Trainers go through ``forward(..., return_aux=True)`` rather than ``forward_with_aux``: DDP and
        ``torch.compile`` wrappers only expose ``forward``.
        """
        if return_aux:
            return self.forward_with_aux(x, available)
        available = availability_from_input(x) if available is None else available.bool()
        return self.decoder(self.encode(x, available)[1])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accept training checkpoints in an inference network (their training-only weights are dropped)."""
        if self.reconstruction is None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
