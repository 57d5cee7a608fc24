"""UTAD-Net generator and discriminators (Huang, Wei, Li, "Unsupervised Tumor-Aware Distillation for Multi-Modal
Brain Image Translation"; section III-A and Fig. 2), sized from nnU-Net's ``2d`` plans.

Generator G (Fig. 2a): two U-Net encoder-decoder pairs on 2D slices,

* the **global branch** encodes the source whole image I_source,
* the **local branch** encodes the source tumour image T_source = I_source x M (teacher), or the whole image
  again (student: "the local branch of the student network takes the whole image as input instead of the tumor
  image"), so the student never reads a mask;
* a **fusion block F** (Hi-Net's mixed fusion block: element-wise sum, product and maximum of the two
  bottlenecks, concatenated, then two convolution blocks) fuses the two encoders' bottlenecks;
* each branch's decoder receives the fused feature F and its own encoder's skips and outputs the target whole
  image I_target (global) or the target tumour image T_target (local).

The target modality t enters as a one-hot code broadcast to image channels and concatenated to the input of both
encoders (StarGAN's conditioning), and as a per-target affine map after every normalisation of the generator
(:class:`ModalityConditionalNorm`, see the deviations below). Encoders and decoders are
``dynamic_network_architectures``' plain (or residual) encoder and ``UNetDecoder``, built from the configuration's
``network_arch_init_kwargs`` (features per stage, strides, kernel sizes, conv/norm/nonlin ops), so G scales with
nnU-Net's planning.

Discriminators D_g and D_l (Fig. 2b): StarGAN's PatchGAN, ``num_layers`` 4x4 convolutions of stride 2 with
LeakyReLU(0.01), a real/fake head (3x3 convolution, one score per patch: D_src) and a modality-classification head
(D_cls, one logit per modality).

Inference contract (used by the ``synthesize`` command): :class:`UTADStudentGenerator` has
``translate(source (B, 1, X, Y), target_modality (B,)) -> (B, 1, X, Y)`` in nnU-Net's normalised space, and the
attributes ``num_modalities`` and ``total_stride``; X and Y must be divisible by ``total_stride``.

Where the paper is silent, the authors' code (github.com/scut-HC/UTAD-Net, ``net/unet_concat.py``) decided:
fusion only at the bottleneck (the decoders keep their own branch's skips), the one-hot code concatenated to both
encoders' inputs, a StarGAN discriminator.

Deviations from the paper and the authors' code, and why:

* Encoder/decoder widths, depths, strides, kernels and normalisation come from nnU-Net's plans, not the authors'
  fixed 64-feature, 4-level U-Net with max pooling and bilinear upsampling: nnU-Net's strided convolutions and
  transposed convolutions are used, so the network follows the dataset's planning like every trainer here.
* The fusion block uses the plans' conv/norm/nonlin (instance norm) instead of Hi-Net's batch norm, like the
  rest of the network.
* Every normalisation layer of the generator is followed by a learned per-target-modality scale and shift
  (conditional normalisation, zero-initialised). The paper and the authors' code concatenate the one-hot code to
  the input only; with instance normalisation after the first convolution (the authors' default and nnU-Net's),
  the constant code channels only reach the features within the kernel's reach of the zero-padded border (the
  spatial mean that the normalisation removes holds the rest), and the inside of the slice learns the target
  only through deeper layers. Measured on the phantoms (docs/RESULTS.md, "Where the target code enters"): the
  same result as 200 epochs of the paper's conditioning in 40 epochs, at about 1.3-1.4x the time per epoch.
* The generator's output is linear, not ``tanh``: images are in nnU-Net's z-score space (unbounded), not [-1, 1].
* The classification head averages the last feature map over space before a 1x1 convolution, instead of
  StarGAN's convolution whose kernel spans the whole map: that kernel ties the discriminator to one image size,
  while patches and validation slices differ in size here.
* The discriminator's widths follow the plans' ``features_per_stage`` (one entry per layer, the last one repeated)
  unless given, instead of StarGAN's 64·2^i (2048 features at the sixth layer); the number of layers is 6 as in
  StarGAN/UTAD-Net at 128x128 when the patch allows it, and fewer for smaller patches (the patch map keeps at
  least 2x2 scores).
* Optional (``utad.generator.source_skip``, off by default as in the paper): both decoders' outputs are added to
  their branch's input slice, so G learns the difference between target and source (a residual translation). On
  the phantoms every model blurred T1 <-> T1ce, where the two sequences differ only in the enhancing tumour and a
  monotone map of the source (histogram matching) keeps the texture that the decoders lose; with the skip the
  source's texture reaches the output unchanged unless G removes it. The flag is a buffer of the network
  (``source_skip``), so a checkpoint carries it to ``synthesize`` and ``nnUNetPredictor``, which build G from the
  plans alone; checkpoints without it load as off.
* Optional (``utad.discriminator.conditional``, off by default as in the paper): a real/fake head conditional on
  the modality (projection discriminator), see :class:`UTADDiscriminators`.
* Optional (``utad.discriminator.classifier_blur_sigma``, 0 by default as in the paper): the modality classifier
  reads the image low-passed by a Gaussian of that sigma (pixels), through the same trunk; the real/fake head
  still reads the image itself. On the phantoms the generator satisfied the classifier with a high-frequency
  texture instead of the target's contrast (docs/RESULTS.md, "A heavier modality classifier"); a classifier that
  only sees low frequencies can only be satisfied by the contrast. Measured at sigma 2: not the fix (the generator
  then inverts every source instead of keeping its contrast; docs/RESULTS.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import maybe_convert_scalar_to_list
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from nnunet_missingmod.config import is_non_negative_number
from nnunet_missingmod.networks.shared_latent import SUPPORTED_ARCHITECTURES, resolve_architecture_kwargs

#: StarGAN's / UTAD-Net's number of stride-2 discriminator layers (for 128x128 images).
DEFAULT_DISCRIMINATOR_LAYERS = 6
_ENCODER_KEYS = ("n_stages", "conv_op", "kernel_sizes", "strides", "conv_bias", "norm_op", "norm_op_kwargs",
                 "dropout_op", "dropout_op_kwargs", "nonlin", "nonlin_kwargs")
_OPTIONAL_RESIDUAL_KEYS = ("block", "bottleneck_channels", "stem_channels")


class GeneratorOutput(NamedTuple):
    """What G returns for one translation."""

    whole: torch.Tensor  # (B, 1, X, Y) target whole image I_target
    tumour: torch.Tensor  # (B, 1, X, Y) target tumour image T_target
    fused: torch.Tensor  # (B, C, x, y) fused bottleneck feature F (distilled by eq. 10)


def build_encoder(arch_class_name: str, arch_kwargs: dict, input_channels: int) -> PlainConvEncoder | ResidualEncoder:
    """The plans' U-Net encoder (skips returned) with ``input_channels`` inputs.

    Args:
        arch_class_name: the plans' ``network_class_name`` (``...PlainConvUNet`` or ``...ResidualEncoderUNet``).
        arch_kwargs: the plans' ``arch_kwargs`` with classes resolved.
        input_channels: number of input channels.

    Raises:
        ValueError: an architecture other than nnU-Net's plain or residual-encoder U-Net.
    """
    common = {key: arch_kwargs[key] for key in _ENCODER_KEYS}
    features = list(arch_kwargs["features_per_stage"])
    if arch_class_name.endswith("ResidualEncoderUNet"):
        optional = {key: arch_kwargs[key] for key in _OPTIONAL_RESIDUAL_KEYS if arch_kwargs.get(key) is not None}
        if isinstance(optional.get("block"), str):
            optional = resolve_architecture_kwargs(optional, ("block",))
        return ResidualEncoder(input_channels=input_channels, features_per_stage=features,
                               n_blocks_per_stage=arch_kwargs["n_blocks_per_stage"], return_skips=True,
                               **common, **optional)
    if arch_class_name.endswith("PlainConvUNet"):
        return PlainConvEncoder(input_channels=input_channels, features_per_stage=features,
                                n_conv_per_stage=arch_kwargs["n_conv_per_stage"], return_skips=True, **common)
    raise ValueError(f"the UTAD-Net generator builds on the plans of {' or '.join(SUPPORTED_ARCHITECTURES)}, "
                     f"got {arch_class_name}")


class ModalityConditionalNorm(nn.Module):
    """The plans' normalisation followed by a per-target-modality affine map (conditional normalisation).

    ``y = norm(x) * (1 + gamma[t]) + beta[t]`` per channel, ``t`` the target modality of each sample (set with
    :meth:`UTADGenerator.set_target` before a forward pass); ``gamma`` and ``beta`` start at 0, so an untrained
    layer is the plans' normalisation. Why: instance normalisation subtracts each channel's spatial mean, which
    removes everything a spatially constant one-hot input contributes to a convolution's output, except within
    the kernel's reach of the zero-padded border; this layer gives the code a path that normalisation keeps
    (Dumoulin et al., "A learned representation for artistic style", 2017).

    Args:
        num_features: channels.
        norm_op: the plans' normalisation class; ``norm_kwargs`` go to it.
        num_modalities: number of target modalities M.
    """

    def __init__(self, num_features: int, *, norm_op: type[nn.Module], num_modalities: int, **norm_kwargs) -> None:
        super().__init__()
        self.norm = norm_op(num_features, **norm_kwargs)
        self.scale = nn.Parameter(torch.zeros(num_modalities, num_features))
        self.shift = nn.Parameter(torch.zeros(num_modalities, num_features))
        self.target: torch.Tensor | None = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a generator saved before this layer existed had the plans' norm in its place (``<prefix>weight``): it
        # loads as that norm with a zero affine map, which computes exactly what it computed then
        old = [key[len(prefix):] for key in state_dict if key.startswith(prefix) and "." not in key[len(prefix):]]
        if old and not any(key.startswith(prefix + "norm.") for key in state_dict):
            for name in old:
                state_dict[f"{prefix}norm.{name}"] = state_dict.pop(prefix + name)
            state_dict.setdefault(prefix + "scale", torch.zeros_like(self.scale))
            state_dict.setdefault(prefix + "shift", torch.zeros_like(self.shift))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.target is None or self.target.shape != (x.shape[0],):
            raise RuntimeError("ModalityConditionalNorm needs the target modality of every sample "
                               "(UTADGenerator.set_target) before the forward pass")
        view = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        return self.norm(x) * (1 + self.scale[self.target].view(view)) + self.shift[self.target].view(view)


class MixedFusionBlock(nn.Module):
    """Hi-Net's mixed fusion block (Zhou et al., IEEE TMI 2020): sum, product and maximum of two features.

    ``[a + b, a * b, max(a, b)]`` (3C channels) -> convolution block to C -> convolution block to C, with the
    given conv/norm/nonlin ops (the plans').
    """

    def __init__(self, channels: int, encoder: PlainConvEncoder | ResidualEncoder, kernel_size: Sequence[int]):
        super().__init__()
        self.blocks = StackedConvBlocks(
            2, encoder.conv_op, 3 * channels, channels, kernel_size, 1, encoder.conv_bias, encoder.norm_op,
            encoder.norm_op_kwargs, None, None, encoder.nonlin, encoder.nonlin_kwargs)

    def forward(self, global_feature: torch.Tensor, local_feature: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat((global_feature + local_feature, global_feature * local_feature,
                           torch.maximum(global_feature, local_feature)), 1)  # (B, 3C, x, y)
        return self.blocks(mixed)  # (B, C, x, y)


class UTADGenerator(nn.Module):
    """G: global and local U-Net branches with a fused bottleneck, conditioned on a one-hot target modality.

    Use :class:`UTADTeacherGenerator` (local branch reads the tumour image) or :class:`UTADStudentGenerator`
    (local branch reads the whole image). Both have the same parameters, so one's weights load into the other.

    Args:
        num_modalities: number of modalities M (length of the one-hot code; ``dataset.json`` channel order).
        arch_class_name, arch_kwargs, arch_kwargs_req_import: the ``2d`` configuration's network from the plans.

        source_skip: add each branch's input slice to its decoder's output (module docstring); stored as the
            boolean buffer ``source_skip``, so it travels with the weights.

    Attributes:
        num_modalities: M.
        total_stride: product of the encoder's strides per axis; inputs must be divisible by it.
    """

    def __init__(self, *, num_modalities: int, arch_class_name: str, arch_kwargs: dict,
                 arch_kwargs_req_import: Sequence[str], source_skip: bool = False) -> None:
        super().__init__()
        if num_modalities < 2:
            raise ValueError(f"translation needs at least two modalities, got num_modalities={num_modalities}")
        kwargs = resolve_architecture_kwargs(arch_kwargs, arch_kwargs_req_import)
        if not (isinstance(kwargs["conv_op"], type) and issubclass(kwargs["conv_op"], nn.Conv2d)):
            raise ValueError(f"UTAD-Net translates 2D slices: train it on a 2d configuration (conv_op Conv2d), got "
                             f"conv_op {arch_kwargs['conv_op']}")
        if kwargs.get("norm_op") is None:
            raise ValueError("the UTAD-Net generator conditions its normalisation layers on the target modality; "
                             "the plans' network has no norm_op")
        self.num_modalities = int(num_modalities)
        # every normalisation of encoders, fusion block and decoders gets a per-target affine map
        kwargs = {**kwargs, "norm_op": functools.partial(ModalityConditionalNorm, norm_op=kwargs["norm_op"],
                                                         num_modalities=self.num_modalities)}
        self.global_encoder = build_encoder(arch_class_name, kwargs, 1 + num_modalities)
        self.local_encoder = build_encoder(arch_class_name, kwargs, 1 + num_modalities)
        bottleneck = self.global_encoder.output_channels[-1]
        self.fusion = MixedFusionBlock(bottleneck, self.global_encoder,
                                       maybe_convert_scalar_to_list(kwargs["conv_op"], kwargs["kernel_sizes"][-1]))
        decoder_convs = kwargs["n_conv_per_stage_decoder"]
        self.global_decoder = UNetDecoder(self.global_encoder, 1, decoder_convs, deep_supervision=False)
        self.local_decoder = UNetDecoder(self.local_encoder, 1, decoder_convs, deep_supervision=False)
        strides = [maybe_convert_scalar_to_list(kwargs["conv_op"], s) for s in kwargs["strides"]]
        self.total_stride: tuple[int, int] = tuple(int(math.prod(s[axis] for s in strides)) for axis in range(2))
        self.apply(InitWeights_He(1e-2))
        self.conditional_norms = [m for m in self.modules() if isinstance(m, ModalityConditionalNorm)]
        self.register_buffer("source_skip", torch.tensor(bool(source_skip)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # weights saved before utad.generator.source_skip existed have no flag: they were trained without the skip
        state_dict.setdefault(prefix + "source_skip", torch.tensor(False))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_target(self, target_modality: torch.Tensor) -> None:
        """Tell every conditional normalisation the target modality (B,) of the next forward pass."""
        for module in self.conditional_norms:
            module.target = target_modality.long()

    def one_hot_input(self, image: torch.Tensor, target_modality: torch.Tensor) -> torch.Tensor:
        """``image`` (B, 1, X, Y) with the one-hot code of ``target_modality`` (B,) as M more channels."""
        code = F.one_hot(target_modality.long(), self.num_modalities).to(image.dtype)  # (B, M)
        code = code[:, :, None, None].expand(-1, -1, *image.shape[2:])  # (B, M, X, Y)
        return torch.cat((image, code), 1)  # (B, 1 + M, X, Y)

    def check_input(self, image: torch.Tensor, target_modality: torch.Tensor, what: str = "source") -> None:
        """Raise ValueError unless ``image`` is (B, 1, X, Y) with X, Y divisible by ``total_stride`` and
        ``target_modality`` holds B indices in 0..M-1."""
        if image.ndim != 4 or image.shape[1] != 1:
            raise ValueError(f"{what} must be (B, 1, X, Y) slices of one channel, got shape {tuple(image.shape)}")
        if any(size % stride for size, stride in zip(image.shape[2:], self.total_stride, strict=True)):
            raise ValueError(f"{what} slice size {tuple(image.shape[2:])} is not divisible by the network's total "
                             f"stride {self.total_stride}; pad it first")
        if target_modality.shape != (image.shape[0],):
            raise ValueError(f"target_modality must have shape ({image.shape[0]},), got {tuple(target_modality.shape)}")
        if target_modality.numel() and not (0 <= int(target_modality.min()) and
                                            int(target_modality.max()) < self.num_modalities):
            raise ValueError(f"target_modality values must lie in 0..{self.num_modalities - 1}, got "
                             f"{target_modality.tolist()}")

    def generate(self, image: torch.Tensor, local_input: torch.Tensor, target_modality: torch.Tensor
                 ) -> GeneratorOutput:
        """(I_target, T_target, F) from the global branch's ``image`` and the local branch's ``local_input``."""
        self.check_input(image, target_modality)
        if local_input.shape != image.shape:
            raise ValueError(f"the local branch's input must have the image's shape {tuple(image.shape)}, got "
                             f"{tuple(local_input.shape)}")
        self.set_target(target_modality)
        global_skips = self.global_encoder(self.one_hot_input(image, target_modality))
        local_skips = self.local_encoder(self.one_hot_input(local_input, target_modality))
        fused = self.fusion(global_skips[-1], local_skips[-1])  # (B, C_bottleneck, x, y)
        whole = self.global_decoder([*global_skips[:-1], fused])  # (B, 1, X, Y)
        tumour = self.local_decoder([*local_skips[:-1], fused])  # (B, 1, X, Y)
        if bool(self.source_skip):
            whole, tumour = whole + image, tumour + local_input
        return GeneratorOutput(whole, tumour, fused)


class UTADTeacherGenerator(UTADGenerator):
    """The teacher's G: ``(I_target, T_target, F) = G(I_source, T_source, t)``; T_source = I_source x tumour mask."""

    def forward(self, image: torch.Tensor, tumour_image: torch.Tensor, target_modality: torch.Tensor
                ) -> GeneratorOutput:
        """Translate (B, 1, X, Y) ``image`` and ``tumour_image`` to the modalities ``target_modality`` (B,)."""
        return self.generate(image, tumour_image, target_modality)


class UTADStudentGenerator(UTADGenerator):
    """The student's G: ``(I_target, T_target, F) = G(I_source, t)``; the local branch reads the whole image.

    Its forward has no mask argument: nothing but the source slice and the target code reaches it.
    """

    def forward(self, image: torch.Tensor, target_modality: torch.Tensor) -> GeneratorOutput:
        """Translate (B, 1, X, Y) ``image`` to the modalities ``target_modality`` (B,)."""
        return self.generate(image, image, target_modality)

    def translate(self, source: torch.Tensor, target_modality: torch.Tensor) -> torch.Tensor:
        """The synthesised target whole image (B, 1, X, Y) of ``source`` (B, 1, X, Y), in nnU-Net's z-score space.

        Args:
            source: one channel of B slices, normalised like the ``2d`` configuration's preprocessing; X and Y
                divisible by :attr:`total_stride` (pad first).
            target_modality: (B,) channel indices (``dataset.json`` order) to synthesise.
        """
        return self(source, target_modality).whole


def discriminator_layers(patch_size: Sequence[int], requested: int | None) -> int:
    """Number of stride-2 discriminator layers for ``patch_size``: ``requested``, or 6 capped so the map stays >= 2x2.

    Raises:
        ValueError: ``requested`` layers would reduce the smallest patch axis below one pixel.
    """
    smallest = min(int(s) for s in patch_size)
    if requested is None:
        return max(1, min(DEFAULT_DISCRIMINATOR_LAYERS, int(math.log2(smallest)) - 1))
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"utad.discriminator.num_layers must be null or an integer >= 1, got {requested!r}")
    if smallest < 2 ** requested:
        raise ValueError(f"utad.discriminator.num_layers={requested} halves the patch {list(patch_size)} below one "
                         f"pixel; use at most {int(math.log2(smallest))} (or null for automatic)")
    return requested


class PatchDiscriminator(nn.Module):
    """StarGAN's discriminator: PatchGAN real/fake scores and modality logits.

    Args:
        num_modalities: number of modality classes M.
        features: width of each stride-2 layer (their number is the number of layers).
        conv_op: convolution class (``nn.Conv2d``).
        in_channels: image channels (1).
        conditional: make the real/fake scores conditional on the modality the image is meant to be (a projection
            discriminator, Miyato & Koyama 2018, applied per patch): ``D_src(x, t) = head(f(x)) + <e_t, f(x)>`` at
            every patch, ``e_t`` a learned embedding of modality t. Off in the paper (StarGAN's unconditional
            D_src); see :class:`UTADDiscriminators` for why it is offered.
        classifier_blur_sigma: when > 0, D_cls reads the image blurred by a Gaussian of this sigma in pixels
            (torchvision's ``gaussian_blur``, kernel 2 * ceil(3 sigma) + 1, reflected edges; 2D images only) through
            the same trunk, so that only the image's low frequencies (its contrast) decide the modality; D_src
            reads the image as it is. 0: the paper's classifier on the image itself.
    """

    def __init__(self, *, num_modalities: int, features: Sequence[int], conv_op: type[nn.Module] = nn.Conv2d,
                 in_channels: int = 1, conditional: bool = False, classifier_blur_sigma: float = 0.0) -> None:
        super().__init__()
        if not is_non_negative_number(classifier_blur_sigma):
            raise ValueError(f"classifier_blur_sigma must be a number >= 0 (pixels), got {classifier_blur_sigma!r}")
        if classifier_blur_sigma > 0 and conv_op is not nn.Conv2d:
            raise ValueError("classifier_blur_sigma is for 2D images (nn.Conv2d) only")
        self.classifier_blur_sigma = float(classifier_blur_sigma)
        layers, channels = [], in_channels
        for width in features:
            layers += [conv_op(channels, int(width), 4, 2, 1), nn.LeakyReLU(0.01)]
            channels = int(width)
        self.main = nn.Sequential(*layers)
        self.source_head = conv_op(channels, 1, 3, 1, 1, bias=False)
        self.class_head = conv_op(channels, num_modalities, 1, 1, 0, bias=False)
        self.apply(InitWeights_He(1e-2))
        self.conditional = bool(conditional)
        self.modality_embedding = nn.Embedding(num_modalities, channels) if self.conditional else None
        if self.modality_embedding is not None:
            nn.init.xavier_uniform_(self.modality_embedding.weight)

    def forward(self, image: torch.Tensor, modality: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(D_src (B, 1, h, w) patch scores, D_cls (B, M) modality logits) of ``image`` (B, 1, X, Y).

        ``modality`` (B,) is the modality each image is meant to be (real: its own; generated: the requested
        target); a conditional critic needs it, an unconditional one does not read it.
        """
        features = self.main(image)  # (B, C, X / 2^L, Y / 2^L)
        scores = self.source_head(features)  # (B, 1, h, w)
        if self.modality_embedding is not None:
            if modality is None:
                raise ValueError("a conditional discriminator needs the modality of every image")
            embedding = self.modality_embedding(modality.long())  # (B, C)
            scores = scores + (features * embedding[(...,) + (None,) * (features.ndim - 2)]).sum(1, keepdim=True)
        if self.classifier_blur_sigma > 0:
            features = self.main(self.blur(image))
        pooled = features.mean(dim=tuple(range(2, features.ndim)), keepdim=True)  # (B, C, 1, 1)
        logits = self.class_head(pooled).flatten(1)  # (B, M)
        return scores, logits

    def blur(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` (B, C, X, Y) low-passed as the classifier reads it (unchanged when the sigma is 0)."""
        if self.classifier_blur_sigma <= 0:
            return image
        from torchvision.transforms.v2.functional import gaussian_blur

        radius = math.ceil(3 * self.classifier_blur_sigma)
        if min(image.shape[2:]) <= radius:
            raise ValueError(f"classifier_blur_sigma {self.classifier_blur_sigma} needs images larger than "
                             f"{radius} pixels per axis, got {list(image.shape[2:])}")
        return gaussian_blur(image, [2 * radius + 1] * 2, [self.classifier_blur_sigma] * 2)


class UTADDiscriminators(nn.Module):
    """D_g (whole images) and D_l (tumour images) in one module: ``forward(image, branch, modality)`` picks one.

    Why a conditional D_src is offered (``conditional``): with StarGAN's unconditional real/fake head, the
    generator's adversarial term only asks that its outputs, pooled over all requested targets, look like real
    slices pooled over the same targets. When sources and targets are drawn from the same modalities, as here, the
    identity mapping (and any mapping that permutes the modalities, e.g. a contrast inversion that turns T1 into
    something T2-like and T2 into something T1-like) matches that pooled distribution exactly and reconstructs the
    cycle exactly; only the classification head (eq. 5-6) tells the generator which target it was asked for. A
    conditional critic judges each output against real slices of the requested modality.

    Args:
        num_modalities: number of modality classes M.
        features: width of each stride-2 layer of both discriminators.
        conv_op: convolution class.
        conditional: real/fake scores conditional on the modality (:class:`PatchDiscriminator`).
        classifier_blur_sigma: Gaussian sigma (pixels) of the image the modality classifier reads (0: the image).
    """

    BRANCHES = ("global", "local")

    def __init__(self, *, num_modalities: int, features: Sequence[int], conv_op: type[nn.Module] = nn.Conv2d,
                 conditional: bool = False, classifier_blur_sigma: float = 0.0):
        super().__init__()
        self.global_critic = PatchDiscriminator(num_modalities=num_modalities, features=features, conv_op=conv_op,
                                                conditional=conditional, classifier_blur_sigma=classifier_blur_sigma)
        self.local_critic = PatchDiscriminator(num_modalities=num_modalities, features=features, conv_op=conv_op,
                                               conditional=conditional, classifier_blur_sigma=classifier_blur_sigma)

    def forward(self, image: torch.Tensor, branch: str, modality: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(D_src, D_cls) of the ``branch`` (``"global"`` or ``"local"``) discriminator."""
        if branch == "global":
            return self.global_critic(image, modality)
        if branch == "local":
            return self.local_critic(image, modality)
        raise ValueError(f"branch must be one of {self.BRANCHES}, got {branch!r}")


def discriminator_features(plans_features: Sequence[int], num_layers: int, requested: Sequence[int] | None
                           ) -> list[int]:
    """Widths of the discriminator layers: ``requested``, or the plans' features per stage (last one repeated).

    Raises:
        ValueError: ``requested`` does not have ``num_layers`` positive integers.
    """
    if requested is None:
        return [int(plans_features[min(i, len(plans_features) - 1)]) for i in range(num_layers)]
    widths = list(requested) if isinstance(requested, (list, tuple)) else None
    if widths is None or len(widths) != num_layers or \
            not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
        raise ValueError(f"utad.discriminator.features must be null or {num_layers} positive integers (one per "
                         f"layer), got {requested!r}")
    return widths
