"""D²-Net: Dual Disentanglement Network, built from nnU-Net's plans.

Yang, Guo, Chen, Woo, Yuan, "D²-Net: Dual Disentanglement Network for Brain Tumor Segmentation With
Missing Modalities", IEEE TMI 41(10), 2022 (https://doi.org/10.1109/TMI.2022.3175478).

Parts (names as in the paper; the losses live in :mod:`nnunet_missingmod.losses`):

* **E_T** (tumour encoder): the plans' U-Net encoder (``PlainConvUNet`` or ``ResidualEncoderUNet``)
  over all modalities, missing ones zeroed; its bottleneck is the tumour feature ``z``.
* **E_M** (modality encoder): one light convolutional encoder applied to every modality on its own
  (the modalities stacked in the batch, weights shared as in the authors' release; stride only
  in-plane), ending in global average pooling over the in-plane axes, so each modality gets one
  N-dimensional code per slice: ``codes`` (B, M, G, N). ``shared_code_encoder: false`` gives each
  modality its own weights instead (then a constant code per modality, which ignores the image,
  minimises L_SFMC: see :mod:`nnunet_missingmod.losses.contrastive`).
* **E_TM** (tumour modality projection): three 1x1x1 convolutions over the concatenated codes of all
  modalities, giving one code per tumour region: ``tumour_codes`` (B, C, G, N).
* **E_R** (region encoders): residual 3x3x3 blocks with AdaIN conditioned on ``tumour_codes[:, c]``
  turn ``z`` into one region-specific feature F_c per region.
* **D^T** (disentangled binary teacher): one decoder, shared by the regions, applied to each F_c with
  E_T's skips; one sigmoid map per region, with a head at every stage (auxiliary classifiers). For
  distillation, each teacher stage's C region features are kept apart (concatenated, not averaged),
  and a learned 1x1x1 convolution per stage pair fuses them into the student stage's channels (the
  authors fuse the region features with a learned convolution too). The student side is the student's
  own features, so the distillation target cannot be shrunk away by the learned maps.
* **Fusion**: two convolutions and a squeeze-and-excitation block over the concatenated F_c -> F'.
* **D^S** (holistic student): the plans' U-Net decoder on F' and E_T's skips, with nnU-Net's deep
  supervision heads at every stage; this is the network's prediction.
* **D_R** (reconstruction decoder): rebuilds each modality from ``z`` with AdaIN conditioned on that
  modality's code.

Only E_T, E_M, E_TM, E_R, the fusion and D^S exist in the inference network (built with deep
supervision off); D^T, D_R and the distillation projections are training-only and their checkpoint
keys are dropped when loading into it. In eval mode ``forward`` returns the student's logits only.

Deviations from the paper, and why:

* sizes follow the plans (patch, stages, features) instead of a fixed 128³ input and fixed widths;
  the slice axis of the codes is the first spatial axis of the patch (nnU-Net puts the
  lowest-resolution axis first), so G is the patch size along it;
* AdaIN is slice-wise: the per-slice codes are average-pooled to the feature map's number of slices
  and each slice gets its own scale and shift (the paper conditions on a code vector; ours keeps the
  slice structure that the contrastive loss gives the codes);
* E_R has its own residual blocks per region (the regions differ through both weights and codes),
  and E_TM sees the codes of the available modalities only (codes of missing ones are zeroed);
* the teacher decoder runs at ``teacher_feature_fraction`` of the plans' widths (its inputs are E_T's
  skips projected by 1x1x1 convolutions) and, unless ``teacher_full_resolution`` is set, stops one
  stage below full resolution: its maps, auxiliary losses, distillation pairs and consistency term use
  the student's stages from the second one on. The paper's teacher is a full-width, full-resolution
  decoder; the full-resolution stage alone cost more than the rest of the teacher on the CPU plans;
* one reconstruction decoder shared by the modalities (the code selects the modality, as MUNIT's style
  code does) at ``reconstruction_feature_fraction`` of the widths, without skips, ending one stage
  below full resolution with a trilinear resize; the paper has one full decoder per modality. Both
  cuts keep the training step within the benchmark's 2.5x of a plain U-Net;
* with ``tumour_projection`` off (ablation "w/o E_TM") every region is conditioned on the mean of the
  available modality codes;
* E_M is one encoder shared by all modalities (the authors' code; the paper writes one encoder per
  modality): with separate weights a constant code per modality, which never looks at the image, is
  already an optimum of L_SFMC. It has two in-plane-strided convolution stages with instance
  normalisation and a 1x1x1 output convolution (the paper: four layers with batch normalisation);
* the teacher's region features are fused per distillation pair by a learned convolution into the
  student stage's channels (the paper's teacher and student have equal widths and need no map);
* 3D configurations only (the codes are per slice of a volume).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunet_missingmod.networks.blocks import AdaINResidualBlock, SliceAdaIN, SqueezeExcitation, decode_with_features
from nnunet_missingmod.networks.shared_latent import availability_from_input, fuse_mean

TRAINING_ONLY_PREFIXES = ("teacher_skip_projections.", "teacher_bottleneck_projection.", "teacher.",
                          "reconstruction.", "kd_projections.")


def _scaled(channels: list[int], fraction: float) -> list[int]:
    return [max(4, int(round(c * fraction))) for c in channels]


class ModalityCodeEncoder(nn.Module):
    """E_M: a light convolutional encoder with in-plane global average pooling, one code per slice.

    With ``shared`` (the default, as in the authors' release) one encoder reads every modality (the
    modalities are stacked in the batch), so the codes can only tell the modalities apart by reading
    the images. Otherwise each modality has its own weights (grouped convolutions); then a constant
    code per modality, which ignores the image, already minimises the contrastive loss (kept as an
    option for comparison).

    Args:
        num_modalities: M.
        features: channels after each stride-(1, 2, 2) stage (per modality when not shared).
        code_dim: N.
        shared: one set of weights for every modality.
    """

    def __init__(self, num_modalities: int, features: list[int], code_dim: int, shared: bool = True) -> None:
        super().__init__()
        groups = 1 if shared else num_modalities
        layers: list[nn.Module] = []
        channels = 1
        for width in features:
            layers += [nn.Conv3d(groups * channels, groups * width, 3, stride=(1, 2, 2), padding=1, groups=groups),
                       nn.InstanceNorm3d(groups * width, affine=True), nn.LeakyReLU(0.01, inplace=True)]
            channels = width
        layers.append(nn.Conv3d(groups * channels, groups * code_dim, 1, groups=groups))
        self.layers = nn.Sequential(*layers)
        self.num_modalities, self.code_dim, self.shared = num_modalities, code_dim, shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, M, G, H, W) -> codes (B, M, G, N)."""
        batch, modalities = x.shape[:2]
        if self.shared:
            pooled = self.layers(x.reshape(batch * modalities, 1, *x.shape[2:])).mean((-2, -1))  # (B * M, N, G)
        else:
            pooled = self.layers(x).mean((-2, -1))  # (B, M * N, G)
        slices = pooled.shape[-1]
        return pooled.reshape(batch, modalities, self.code_dim, slices).transpose(2, 3)


class TumourModalityProjection(nn.Module):
    """E_TM: a linear transformation (three 1x1x1 convolutions, no activation between them, as the paper's
    "linear transformation" and the authors' code) from the M modality codes to C tumour-region codes, per slice."""

    def __init__(self, num_modalities: int, num_regions: int, code_dim: int) -> None:
        super().__init__()
        width = num_modalities * code_dim
        self.layers = nn.Sequential(nn.Conv1d(width, width, 1), nn.Conv1d(width, width, 1),
                                    nn.Conv1d(width, num_regions * code_dim, 1))
        self.num_regions, self.code_dim = num_regions, code_dim

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, M, G, N) -> tumour codes (B, C, G, N)."""
        batch, modalities, slices, code_dim = codes.shape
        flat = codes.permute(0, 1, 3, 2).reshape(batch, modalities * code_dim, slices)  # (B, M * N, G)
        projected = self.layers(flat).view(batch, self.num_regions, code_dim, slices)
        return projected.transpose(2, 3)


class RegionEncoder(nn.Module):
    """E_R for one region: residual AdaIN blocks conditioned on the region's code."""

    def __init__(self, channels: int, code_dim: int, num_blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([AdaINResidualBlock(channels, code_dim) for _ in range(num_blocks)])

    def forward(self, tumour_feature: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tumour_feature = block(tumour_feature, code)
        return tumour_feature


class ReconstructionDecoder(nn.Module):
    """D_R: rebuilds a modality from ``z`` with AdaIN conditioned on that modality's code, without skips.

    One decoder serves every modality (the code says which one to rebuild, as the style code of MUNIT
    does); it upsamples with the encoder's strides up to the second-highest resolution, and the last
    factor is a trilinear resize.

    Args:
        encoder_channels: E_T's output channels per stage (largest resolution first).
        strides: E_T's strides per stage.
        code_dim: N.
        fraction: width of each stage relative to ``encoder_channels``.
    """

    def __init__(self, encoder_channels: list[int], strides: list, code_dim: int, fraction: float) -> None:
        super().__init__()
        widths = _scaled(encoder_channels, fraction)
        self.upsample = nn.ModuleList()
        self.convs = nn.ModuleList()
        self.adains = nn.ModuleList()
        below = encoder_channels[-1]
        for stage in range(len(encoder_channels) - 2, 0, -1):
            stride = strides[stage + 1]
            self.upsample.append(nn.ConvTranspose3d(below, widths[stage], stride, stride, bias=False))
            self.convs.append(nn.Conv3d(widths[stage], widths[stage], 3, padding=1, bias=False))
            self.adains.append(SliceAdaIN(widths[stage], code_dim))
            below = widths[stage]
        self.output = nn.Conv3d(below, 1, 1)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, tumour_feature: torch.Tensor, codes: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """z (B, Cz, ...) and the codes (B, M, G, N) -> every modality rebuilt, (B, M, *size)."""
        batch, modalities = codes.shape[:2]
        features = tumour_feature.repeat_interleave(modalities, 0)  # (B * M, Cz, ...), modality fastest
        flat_codes = codes.flatten(0, 1)  # (B * M, G, N)
        for upsample, conv, adain in zip(self.upsample, self.convs, self.adains, strict=True):
            features = self.act(adain(conv(upsample(features)), flat_codes))
        image = F.interpolate(self.output(features), size=size, mode="trilinear", align_corners=False)
        return image.view(batch, modalities, *size)


class D2Net(nn.Module):
    """D²-Net on the plans' U-Net (see the module docstring for the parts and deviations).

    Args:
        num_modalities: input channels M.
        num_regions: output channels C; one sigmoid per region (nnU-Net region-based training).
        arch_class_name, arch_kwargs, arch_kwargs_req_import: the configuration's network from the plans.
        deep_supervision: training network (deep supervision, teacher, reconstruction, distillation
            projections) when True; inference network otherwise.
        code_dim: N, length of the modality and tumour codes.
        code_encoder_features: channels of E_M's stages.
        shared_code_encoder: one E_M for every modality (the authors' code) instead of one per modality (the
            paper's notation E_M = {E_M^1, ..., E_M^M}).
        region_blocks: residual AdaIN blocks per region in E_R.
        tumour_projection: use E_TM (False: ablation "w/o E_TM").
        teacher_feature_fraction: width of D^T relative to the plans' decoder.
        teacher_full_resolution: D^T decodes up to full resolution (paper) instead of one stage below it.
        reconstruction_feature_fraction: width of D_R relative to the plans' decoder.
    """

    def __init__(self, *, num_modalities: int, num_regions: int, arch_class_name: str, arch_kwargs: dict,
                 arch_kwargs_req_import: list[str] | tuple[str, ...], deep_supervision: bool, code_dim: int = 8,
                 code_encoder_features: tuple[int, ...] = (8, 16), shared_code_encoder: bool = True,
                 region_blocks: int = 2,
                 tumour_projection: bool = True, teacher_feature_fraction: float = 0.5,
                 teacher_full_resolution: bool = False, reconstruction_feature_fraction: float = 0.25) -> None:
        super().__init__()
        unet = get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, num_modalities,
                                      num_regions, allow_init=False, deep_supervision=deep_supervision)
        if unet.encoder.conv_op is not nn.Conv3d:
            raise ValueError("D2Net needs a 3D configuration (its modality codes are per slice of a 3D patch); "
                             "train it on 3d_fullres or a CPU configuration derived from it")
        self.encoder, self.decoder = unet.encoder, unet.decoder  # E_T and D^S; `decoder` as nnU-Net expects
        channels = list(self.encoder.output_channels)
        bottleneck = channels[-1]
        self.num_modalities, self.num_regions, self.code_dim = num_modalities, num_regions, code_dim

        self.code_encoder = ModalityCodeEncoder(num_modalities, list(code_encoder_features), code_dim,
                                                shared=shared_code_encoder)
        self.tumour_projection = TumourModalityProjection(num_modalities, num_regions, code_dim) \
            if tumour_projection else None
        self.region_encoders = nn.ModuleList([RegionEncoder(bottleneck, code_dim, region_blocks)
                                              for _ in range(num_regions)])
        norm_op = self.encoder.norm_op or nn.InstanceNorm3d
        norm_kwargs = self.encoder.norm_op_kwargs or {}
        self.fusion = nn.Sequential(
            nn.Conv3d(num_regions * bottleneck, bottleneck, 3, padding=1), norm_op(bottleneck, **norm_kwargs),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(bottleneck, bottleneck, 3, padding=1), norm_op(bottleneck, **norm_kwargs),
            nn.LeakyReLU(0.01, inplace=True), SqueezeExcitation(bottleneck))

        self.training_parts = deep_supervision
        if deep_supervision:
            # the teacher's first (largest) stage: full resolution, or one stage below it (see the docstring)
            first = 0 if teacher_full_resolution or len(channels) < 3 else 1
            self.teacher_first_stage = first
            teacher_channels = _scaled(channels, teacher_feature_fraction)[first:]
            self.teacher_skip_projections = nn.ModuleList([nn.Conv3d(c, t, 1) for c, t in
                                                           zip(channels[first:-1], teacher_channels[:-1], strict=True)])
            self.teacher_bottleneck_projection = nn.Conv3d(bottleneck, teacher_channels[-1], 1)
            teacher_layout = SimpleNamespace(**{key: getattr(self.encoder, key) for key in (
                "conv_op", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs", "nonlin",
                "nonlin_kwargs")}, output_channels=teacher_channels, strides=self.encoder.strides[first:],
                kernel_sizes=self.encoder.kernel_sizes[first:])
            decoder_convs = arch_kwargs["n_conv_per_stage_decoder"]
            decoder_convs = [decoder_convs] * (len(channels) - 1) if isinstance(decoder_convs, int) else decoder_convs
            self.teacher = UNetDecoder(teacher_layout, 1, list(decoder_convs)[:len(teacher_channels) - 1], True)
            self.reconstruction = ReconstructionDecoder(channels, self.encoder.strides, code_dim,
                                                        reconstruction_feature_fraction)
            # per stage pair: the C region features of teacher stage t fused to student stage s's channels
            self.kd_projections = nn.ModuleDict({
                f"{s}_{t}": nn.Conv3d(num_regions * teacher_channels[t], channels[s], 1)
                for s in range(len(channels) - 1) for t in range(len(teacher_channels) - 1)})
        self.apply(InitWeights_He(1e-2))

    # --- shared parts -------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, available: torch.Tensor) -> dict:
        """E_T, E_M, E_TM and E_R: skips, codes, tumour codes and the region features F_c."""
        skips = self.encoder(x)
        codes = self.code_encoder(x)  # (B, M, G, N)
        visible = codes * available.to(codes.dtype)[:, :, None, None]  # codes of missing modalities are zeroed
        if self.tumour_projection is not None:
            tumour_codes = self.tumour_projection(visible)  # (B, C, G, N)
        else:
            tumour_codes = fuse_mean(codes, available).unsqueeze(1).expand(-1, self.num_regions, -1, -1)
        region_features = [encoder(skips[-1], tumour_codes[:, c]) for c, encoder in enumerate(self.region_encoders)]
        return {"skips": skips, "codes": codes, "tumour_codes": tumour_codes, "region_features": region_features}

    def student_skips(self, encoded: dict) -> list[torch.Tensor]:
        fused = self.fusion(torch.cat(encoded["region_features"], 1))  # F' (B, Cz, ...)
        return [*encoded["skips"][:-1], fused]

    def forward(self, x: torch.Tensor, available: torch.Tensor | None = None, return_aux: bool = False):
        """The student's segmentation logits (a list over stages while deep supervision is enabled).

        With ``return_aux`` (training only) also the dict of :meth:`forward_with_aux`; going through
        ``forward`` keeps DDP's gradient hooks and ``torch.compile`` in the loop.
        """
        if return_aux:
            return self.forward_with_aux(x, available)
        available = availability_from_input(x) if available is None else available.bool()
        return self.decoder(self.student_skips(self.encode(x, available)))

    # --- training ------------------------------------------------------------------------------------------------
    def run_teacher(self, encoded: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """D^T on every F_c (batched over regions): per stage the C region features, concatenated, and the logits.

        The stages are the student's from ``teacher_first_stage`` on (largest first).
        """
        batch, regions = encoded["skips"][0].shape[0], self.num_regions
        skips = [projection(skip).repeat_interleave(regions, 0)  # (B * C, ...), region fastest
                 for projection, skip in zip(self.teacher_skip_projections,
                                             encoded["skips"][self.teacher_first_stage:-1], strict=True)]
        bottleneck = torch.stack([self.teacher_bottleneck_projection(f) for f in encoded["region_features"]], 1)
        skips.append(bottleneck.flatten(0, 1))  # (B * C, Ct, ...)
        features, logits = decode_with_features(self.teacher, skips)
        features = [f.reshape(batch, regions * f.shape[1], *f.shape[2:]) for f in features]  # (B, C * Ct, ...)
        logits = [p.view(batch, regions, *p.shape[2:]) for p in logits]  # (B, C, ...)
        return features, logits

    def forward_with_aux(self, x: torch.Tensor, available: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor | list[torch.Tensor], dict]:
        """Student output (as ``forward``) plus everything the D²-Net losses need."""
        if not self.training_parts:
            raise RuntimeError("forward_with_aux needs the training network (built with deep supervision)")
        available = availability_from_input(x) if available is None else available.bool()
        encoded = self.encode(x, available)
        student_features, student_logits = decode_with_features(self.decoder, self.student_skips(encoded))
        teacher_features, teacher_logits = self.run_teacher(encoded)
        reconstruction = self.reconstruction(encoded["skips"][-1], encoded["codes"], x.shape[2:])  # (B, M, *patch)
        aux = {"available": available, "codes": encoded["codes"], "reconstruction": reconstruction,
               "student_features": student_features, "student_logits": student_logits,
               "teacher_features": teacher_features, "teacher_logits": teacher_logits,
               "teacher_first_stage": self.teacher_first_stage}
        output = student_logits if self.decoder.deep_supervision else student_logits[0]
        return output, aux

    def kd_projection(self, student_stage: int, teacher_stage: int) -> nn.Module:
        """The learned map from teacher stage t's concatenated region features to student stage s's channels."""
        return self.kd_projections[f"{student_stage}_{teacher_stage}"]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accept training checkpoints in an inference network (their training-only weights are dropped)."""
        if not self.training_parts:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
