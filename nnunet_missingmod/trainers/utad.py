"""UTAD-Net synthesis trainers (Huang, Wei, Li, "Unsupervised Tumor-Aware Distillation for Multi-Modal Brain Image
Translation"): ``UTADNetTeacherTrainer`` and ``UTADNetStudentTrainer`` on nnU-Net's ``2d`` configuration.

``nnUNetv2_train D 2d FOLD -tr UTADNetTeacherTrainer``, then ``-tr UTADNetStudentTrainer``. Both build on
:class:`~nnunet_missingmod.trainers.adversarial.AdversarialTrainer` (generator = ``self.network``, the two
discriminators D_g and D_l = ``self.discriminator``, both optimisers and the discriminators in the checkpoint).
Networks: :mod:`nnunet_missingmod.networks.utad`; loss terms: :mod:`nnunet_missingmod.losses.adversarial`.

One training step, per sample of an nnU-Net 2D batch (data (B, M, X, Y), region target (B, R, X, Y)):

* the source modality s is drawn among the channels the sample has (a channel that is exactly zero after
  augmentation is missing: never a source, never a real target); the source slice is I_source = data[i, s];
* training is **unpaired**: the real slice the critics compare with comes from another sample of the batch, of
  another case (partner j: the first of i + 1, i + 2, ... mod B whose case differs, by the batch's ``keys``), in a
  modality t != s that the partner has;
  I_target = G(I_source, T_source, t) is never compared with a real image of the same slice (unless the optional
  paired term is on, ``utad.lambda_paired`` > 0, below);
* the tumour mask M is nnU-Net's region target of ``utad.mask_region`` (WT, TC or ET; default WT);
  T_source = I_source x M_i, the real tumour image is data[j, t] x M_j.

Critic step (eq. 11, both discriminators): ``L_D = -E[D_src(real)] + E[D_src(fake)] + lambda_gp GP + L_r_cls``
for D_g on whole images and D_l on tumour images, GP of WGAN-GP with lambda_gp = 1 (eq. 1-4).

Generator step (eq. 12): ``L_G = L_adv^g + L_adv^l + L_f_cls + lambda1 (L_rec + L_local)`` (+ ``lambda_paired
L_paired`` when that optional term is on), lambda1 = 10, with
the cycle ``(I'_source, T'_source) = G(I_target, T'_target, s)``, T'_target = I_target x M (eq. 5-9).
The student adds ``lambda2 L_dis`` (eq. 10, 13; lambda2 = 10): L1 between the teacher's and the student's fused
features F and generated target images, the frozen teacher reading the tumour image, the student the whole image.
The mask still enters the student's losses (L_local, the local critic's real tumour images), as in the authors'
code, but never its network.

Logged per epoch (``loss_<term>``, plotted in ``progress_adversarial.png``): generator terms ``adv_global``,
``adv_local`` (the generator's ``-E[D_src(fake)]``), ``cls_global``, ``cls_local`` (eq. 5, 6), ``rec`` (eq. 9),
``local`` (eq. 8), for the student ``dis_feature`` and ``dis_image`` (the two terms of eq. 10), ``paired`` when
``utad.lambda_paired`` > 0; critic terms
``d_adv_*`` (``-E[D(real)] + E[D(fake)]``), ``d_gp_*`` and ``d_cls_*`` (eq. 3, 4) for both discriminators.

Validation (replaces nnU-Net's pseudo Dice): per sample a target modality the slice has is generated from another
channel of the SAME slice, so a real target exists; SSIM (nnU-Net's "pseudo dice" slot, so ``checkpoint_best``
is the best SSIM), PSNR (scikit-image, data range of the real slice) and L1 (nnU-Net's ``val_loss``).
``examples/epoch_XXXX.png``: source, generated and real target for a few samples of one fixed validation batch.
After training, :meth:`UTADNetTeacherTrainer.final_validation` translates every slice of the fold's validation
cases for every source -> target pair both channels of the slice have and writes
``<fold folder>/synthesis_validation.json`` = ``{"channel_names": dataset.json's, "ssim": M x M, "psnr": M x M,
"num_slices": M x M, "ssim_brain": M x M, "brain_voxels": M x M}`` (indexed [source][target]; ``null`` on the
diagonal, and the metrics ``null`` where no slice allowed the pair, whose counts are then 0) plus the heat map of
``ssim_brain``, ``synthesis_validation_ssim.png``. ``ssim`` and ``psnr`` score whole slices (padded to the network's
total stride, background included, averaged over slices), as the per-epoch validation does. ``ssim_brain`` is the
SSIM of ``evaluate-synthesis`` on 2D slices: both slices scaled to [0, 1] by their own 0.5 and 99.5 percentiles in
the brain (nnU-Net's non-zero mask, label >= 0 in the preprocessed data; 0 outside it), the Gaussian SSIM map
averaged over every brain voxel of the validation slices. The file also holds ``histogram_ssim_brain`` (M x M, the
same SSIM for plain histogram matching) and ``histogram_quantiles`` (M rows; see the list below). ``synthesize``
weighs or picks its sources by ``ssim_brain``: whole-slice SSIM rewards the blank background and rated inverted
translations about as high as good ones (docs/RESULTS.md, "Combining sources").
``nnUNetv2_train ... -tr UTADNetStudentTrainer --val`` rewrites the file for a model validated before (one of the
same generator: nnU-Net's ``--val`` also restores the optimiser, whose state does not fit a generator saved before
the conditional normalisation).

The student loads the frozen teacher from ``utad.teacher_model_folder`` (default: the
``UTADNetTeacherTrainer__<plans>__<configuration>`` folder of the same dataset in ``nnUNet_results``), same fold,
``utad.teacher_checkpoint`` (``checkpoint_final.pth``); a missing folder or checkpoint, a checkpoint of another
trainer, other channels, another network (plans/configuration) or another mask region is a clear error. As in the
authors' code (``train_distill_global_local.py``) the student starts from the teacher's weights with a freshly
initialised local encoder (``utad.init_from_teacher``). The inference network (``build_network_architecture``) is
the student's generator only; the teacher and the discriminators never enter its checkpoint weights.

Optimisation (config section ``adversarial``, paper section IV-A-4): Adam (beta 0.9, 0.999), lr 1e-4 for both
networks during the first half of the epochs, then linear decay to 1e-6; ``n_critic`` critic updates (each on a
fresh batch) per generator update. nnU-Net's deep supervision is off.

Deviations from the paper, and why:

* The local critic and the local adversarial and classification terms only use slices whose tumour mask is not
  empty: nnU-Net's 2D loader draws many tumour-free slices, whose tumour image is blank; a critic asked to tell the
  modality of a blank image learns nothing, and the generator would be pushed to put contrast where eq. 8 wants 0.
  The paper's slices all contain tumour (its local metrics are computed in the tumour box of every image).
  Tumour-free slices still train the global terms, L_rec, L_local and the student's L_dis (the generator must also
  translate slices without a tumour).
* The critics' real images are real slices of the target modality t from another sample (rolled batch), with
  eq. 3/4's classification on them (label t); the paper (like StarGAN) shows the critic the source images
  I_source (label s) and draws targets as a permutation of the batch's source labels. Both are unpaired; taking the
  real side in modality t keeps real and fake modality distributions equal for any availability pattern, where a
  permutation of source labels would ask for modalities the batch does not have. The partner is the next sample
  of the batch that comes from another case (nnU-Net's loader draws cases with replacement, so two samples of a
  batch can share one; the batch's ``keys`` say which); a sample whose batch holds no other case is left out.
* ``utad.lambda_cls`` weighs the classification terms of both the critic (eq. 11) and the generator (eq. 12), as
  StarGAN's lambda_cls does; the paper writes them unweighted, which is the default 1. It is a knob for data whose
  modalities are hard to tell apart (docs/RESULTS.md, "UTAD-Net synthesis").
* Every modality of every training case serves as a source and as a real target. The paper (Sec. IV-A-1) uses
  each training subject in one modality only; no loss here compares a generated slice with a real slice of its
  own case (unless ``utad.lambda_paired`` > 0, below), so the setting stays unpaired, but the model sees more
  images per modality than in the paper.
* Samples with no usable (source, target) pair are left out of a step; a batch without any gives zero losses
  (kept in the autograd graph) for that update. ``batch_size`` must be at least 2 (unpaired partner).
* Images are z-scored (nnU-Net's 2d preprocessing), not scaled to [-1, 1]; the tumour image is the image times
  the mask, so the outside of the tumour is 0 like the background. The generator's output is linear.
* nnU-Net's intensity augmentations (noise, blur, brightness, contrast, low resolution, gamma) are off by default
  (``utad.intensity_augmentation``): they would teach the critics that contrast-jittered slices are real, i.e.
  move the target distribution; spatial augmentation and mirroring stay on. The paper only says "data
  augmentation and normalization".
* Epochs are nnU-Net epochs (``num_iterations_per_epoch`` generator updates), 100 of them as the paper's 100
  epochs; ``n_critic`` = 5 (StarGAN's default, which the authors' code builds on; the paper does not give it).
* ``utad.discriminator.conditional`` (default false, the paper's unconditional real/fake head) makes both critics'
  real/fake scores conditional on the modality: reals are judged as their own modality t, fakes as the requested
  t (networks/utad.py, ``UTADDiscriminators``, for why).
* ``utad.lambda_paired`` (default 0: unpaired, as in the paper) adds ``lambda_paired * E|I_target - I^real_target|``
  to the generator loss (eq. 12/13), the reference being the source sample's OWN slice of modality t (logged as
  ``paired``; a sample whose own slice lacks t is left out of it). BraTS sequences (and the phantoms) are
  co-registered, so every acquired sequence of a training slice is a paired target; the critics, the cycle and
  everything else stay as they are. The paper's unpaired losses are satisfied as well by a generator that keeps or
  inverts the source's contrast without reading the target code (measured, docs/RESULTS.md); the paired term was
  meant to rule that out: at weight 10 the generator still inverts every source, at 100 it reads the code but
  blurs (docs/RESULTS.md, "A paired term"). nnU-Net's spatial augmentation moves all channels of a sample
  together, so the pairs stay aligned.
* ``utad.discriminator.classifier_blur_sigma`` (default 0, the paper's classifier) makes both critics' modality
  classifiers read the image blurred by a Gaussian of that sigma in pixels, so that the generator can satisfy them
  only with the target's contrast, not with a high-frequency texture (networks/utad.py, ``PatchDiscriminator``).
* SSIM/PSNR of the per-epoch validation and of ``synthesis_validation.json`` are over whole slices in z-score space
  with the real slice's range as data range, for model selection and for weighting sources; the paper's metrics
  (and BraSyn's) are computed by ``evaluate-synthesis``.
* ``synthesis_validation.json`` also scores plain histogram matching on the same validation slices
  (``histogram_ssim_brain``: the source's brain voxels of the case given the target's histogram, pooled from the
  fold's training cases (a seeded sample of 50 in larger folds) and stored as ``histogram_quantiles``), so that
  ``synthesize --histogram-fallback`` can use it on the pairs where it beats the model (inference/synthesize.py,
  histogram fallback). Not in the paper.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from os.path import isdir, isfile, join

import matplotlib
import numpy as np
import torch
from batchgeneratorsv2.helpers.scalar_type import RandomScalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.config import is_non_negative_number
from nnunet_missingmod.evaluation.synthesis import SSIM_WINDOW, scale_to_unit, ssim_map
from nnunet_missingmod.inference.synthesize import HISTOGRAM_QUANTILES, HISTOGRAM_SSIM, histogram_matched
from nnunet_missingmod.losses.adversarial import (
    cycle_reconstruction_loss,
    distillation_loss,
    gradient_penalty,
    l1_distance,
    local_consistency_loss,
    modality_classification_loss,
    wgan_critic_loss,
    wgan_generator_loss,
)
from nnunet_missingmod.networks.utad import (
    GeneratorOutput,
    UTADDiscriminators,
    UTADGenerator,
    UTADStudentGenerator,
    UTADTeacherGenerator,
    discriminator_features,
    discriminator_layers,
)
from nnunet_missingmod.trainers.adversarial import (  # noqa: F401 (INTENSITY_TRANSFORMS: re-exported)
    INTENSITY_TRANSFORMS,
    AdversarialTrainer,
    without_intensity_augmentation,
)
from nnunet_missingmod.transforms.missing_modalities import acquired_modalities

__all__ = ["UTADNetTeacherTrainer", "UTADNetStudentTrainer"]

#: File written by the final validation in the fold folder (the ``synthesize`` command reads it).
SYNTHESIS_VALIDATION_FILE = "synthesis_validation.json"
SYNTHESIS_HEATMAP_FILE = "synthesis_validation_ssim.png"
#: Slices translated at once in the final validation.
FINAL_VALIDATION_BATCH = 16
#: The histogram fallback's reference: brain voxels sampled per training case and sequence, and quantiles kept.
HISTOGRAM_SAMPLE_PER_CASE = 20_000
HISTOGRAM_LEVELS = 1001
#: At most this many training cases (a seeded sample) make the reference, so that a BraTS-sized fold is not read
#: in full once more.
HISTOGRAM_CASES = 50


# ---------------------------------------------------------------------------------------------- pair drawing
@dataclass
class PairDraw:
    """Per-sample draws of one batch; ``rows`` are the samples that got a pair (V of them)."""

    rows: np.ndarray  # (V,) sample index i
    source: np.ndarray  # (V,) source modality s (acquired in sample i)
    target: np.ndarray  # (V,) target modality t != s
    partner: np.ndarray  # (V,) sample whose slice is the real target (acquired t); i itself when paired


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    # seeded from numpy's global stream, so np.random.seed makes a run reproducible
    return rng if rng is not None else np.random.default_rng(np.random.randint(0, 2 ** 31))


def draw_unpaired_pairs(acquired: np.ndarray, rng: np.random.Generator | None = None,
                        cases: Sequence | None = None) -> PairDraw:
    """Source modality of each sample and a target modality of its partner sample (the batch rolled by one).

    Sample i's partner j is the next sample of the batch, (i + 1) mod B, or with ``cases`` the first of
    (i + 1), (i + 2), ... mod B that comes from another case. Its source s is drawn uniformly among its acquired
    channels that leave the partner some other acquired channel; the target t is drawn uniformly among the
    partner's acquired channels except s. Samples without such a pair (and every sample of a batch of one, or of
    a batch from one case) are left out.

    Args:
        acquired: (B, M) boolean, channel c of sample b is not all zero.
        rng: numpy generator (default: seeded from numpy's global stream).
        cases: (B,) the case of each sample (nnU-Net's batch ``keys``), or None.
    """
    rng = _rng(rng)
    batch, num_modalities = acquired.shape
    if cases is not None and len(cases) != batch:
        raise ValueError(f"{len(cases)} case identifiers for a batch of {batch}")
    draws = []
    for i in range(batch):
        others = [(i + k) % batch for k in range(1, batch)]
        if cases is not None:
            others = [j for j in others if cases[j] != cases[i]]
        if not others:
            continue
        j = others[0]
        sources = [s for s in np.flatnonzero(acquired[i]) if np.any(np.delete(acquired[j], s))]
        if not sources:
            continue
        s = int(sources[rng.integers(len(sources))])
        targets = [t for t in np.flatnonzero(acquired[j]) if t != s]
        draws.append((i, s, int(targets[rng.integers(len(targets))]), j))
    return _pair_draw(draws)


def draw_paired_pairs(acquired: np.ndarray, rng: np.random.Generator | None = None) -> PairDraw:
    """Two different acquired channels of the same sample, (source, target), for samples that have two.

    Args:
        acquired: (B, M) boolean, channel c of sample b is not all zero.
        rng: numpy generator (default: seeded from numpy's global stream).
    """
    rng = _rng(rng)
    draws = []
    for i in range(acquired.shape[0]):
        channels = np.flatnonzero(acquired[i])
        if channels.size < 2:
            continue
        s, t = rng.choice(channels, size=2, replace=False)
        draws.append((i, int(s), int(t), i))
    return _pair_draw(draws)


def _pair_draw(draws: list[tuple[int, int, int, int]]) -> PairDraw:
    columns = np.asarray(draws, dtype=np.int64).reshape(-1, 4).T
    return PairDraw(*columns)


def paired_translation_loss(generated: torch.Tensor, same_slice_target: torch.Tensor, available: torch.Tensor
                            ) -> torch.Tensor:
    """``E|I_target - I^real_target|`` over the samples whose own slice has the target modality (``available``).

    The optional paired term (``utad.lambda_paired``; not in the paper): the source's co-registered slice of the
    target modality is the reference. Zero, kept in the autograd graph, when no sample has it.
    """
    if not bool(available.any()):
        return generated.sum() * 0.0
    return l1_distance(same_slice_target[available], generated[available])


# ---------------------------------------------------------------------------------------------- metrics
def slice_quality(generated: np.ndarray, real: np.ndarray) -> tuple[float, float, float]:
    """(SSIM, PSNR, L1) of a generated 2D slice against the real one (scikit-image; data range of the real slice).

    SSIM and PSNR are NaN for a constant real slice (no data range) or one smaller than 3 pixels.
    """
    generated = np.asarray(generated, dtype=np.float64)
    real = np.asarray(real, dtype=np.float64)
    l1 = float(np.abs(generated - real).mean())
    data_range = float(real.max() - real.min())
    window = min(7, min(real.shape) - (1 - min(real.shape) % 2))  # odd, at most 7, at most the image
    if data_range <= 0 or window < 3:
        return float("nan"), float("nan"), l1
    ssim = structural_similarity(real, generated, data_range=data_range, win_size=window)
    with np.errstate(divide="ignore"):  # identical slices: PSNR is +inf
        psnr = peak_signal_noise_ratio(real, generated, data_range=data_range)
    return float(ssim), float(psnr), l1


def brain_ssim(generated: np.ndarray, real: np.ndarray, brain: np.ndarray) -> tuple[float, int]:
    """(sum of the SSIM map over ``brain``, number of brain voxels) of a generated 2D slice against the real one.

    ``evaluate-synthesis``'s ``ssim_brain`` on one slice: both scaled to [0, 1] by their own 0.5 and 99.5 percentiles
    in the brain, scikit-image's Gaussian SSIM map (sigma 1.5, data range 1). Summed, not averaged, so that slices
    add up to the mean over every brain voxel. ``(0.0, 0)`` for a slice without brain or smaller than the window.
    """
    brain = np.asarray(brain, dtype=bool)
    if not brain.any() or min(brain.shape) < SSIM_WINDOW:
        return 0.0, 0
    full = ssim_map(scale_to_unit(real, brain), scale_to_unit(generated, brain))
    return float(full[brain].sum()), int(brain.sum())


def pad_to_stride(images: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad (N, C, X, Y) at the end of X and Y to multiples of ``stride``."""
    pads = []
    for size, step in zip(reversed(images.shape[2:]), reversed(stride), strict=True):
        pads += [0, (-size) % step]
    return torch.nn.functional.pad(images, pads)


# ---------------------------------------------------------------------------------------------- trainers
@dataclass
class UnpairedBatch:
    """Tensors of one unpaired training step (V samples with a pair)."""

    source: torch.Tensor  # (V, 1, X, Y) I_source
    source_mask: torch.Tensor  # (V, 1, X, Y) M of the source slice
    source_modality: torch.Tensor  # (V,) s
    target_modality: torch.Tensor  # (V,) t
    real: torch.Tensor  # (V, 1, X, Y) real slice of modality t from the partner sample
    real_tumour: torch.Tensor  # (V, 1, X, Y) real x the partner's mask
    source_has_tumour: torch.Tensor  # (V,) bool: the source slice's mask is not empty
    real_has_tumour: torch.Tensor  # (V,) bool: the partner's mask is not empty
    # only built when asked (the generator step with utad.lambda_paired > 0):
    same_slice_target: torch.Tensor | None = None  # (V, 1, X, Y) the source sample's own slice of modality t
    has_same_slice_target: torch.Tensor | None = None  # (V,) bool: the source sample has modality t


class UTADNetTeacherTrainer(AdversarialTrainer):
    """UTAD-Net's teacher: G reads the source slice and the tumour image; see the module docstring."""

    generator_terms = ("adv_global", "adv_local", "cls_global", "cls_local", "rec", "local")
    discriminator_terms = ("d_adv_global", "d_gp_global", "d_cls_global", "d_adv_local", "d_gp_local", "d_cls_local")
    validation_metric_names = ("ssim", "psnr", "l1")
    validation_loss_name = "l1"
    generator_class: type[UTADGenerator] = UTADTeacherGenerator

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.utad = self.check_settings(self.trainer_config["utad"])
        if self.utad["lambda_paired"] > 0:  # logged and plotted only when it is on
            self.generator_terms = (*type(self).generator_terms, "paired")
        self.example_batch: dict | None = None  # fixed validation batch of write_examples (set on first use)
        self._mask_channel: int | None = None

    # ------------------------------------------------------------------ settings and networks
    def check_settings(self, settings: dict) -> dict:
        """The ``utad`` config section, checked (ValueError naming the key)."""
        if settings["mask_region"] not in mods.REGIONS:
            raise ValueError(f"utad.mask_region must be one of {list(mods.REGIONS)}, got {settings['mask_region']!r}")
        for key in ("lambda_gp", "lambda1", "lambda_cls", "lambda_paired"):
            value = settings[key]
            if not is_non_negative_number(value):
                raise ValueError(f"utad.{key} must be a number >= 0, got {value!r}")
        if not isinstance(settings["intensity_augmentation"], bool):
            raise ValueError(f"utad.intensity_augmentation must be true or false, got "
                             f"{settings['intensity_augmentation']!r}")
        examples = settings["num_examples"]
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
            raise ValueError(f"utad.num_examples must be an integer >= 1, got {examples!r}")
        generator = settings["generator"]
        if not (isinstance(generator, dict) and set(generator) == {"source_skip"}
                and isinstance(generator["source_skip"], bool)):
            raise ValueError(f'utad.generator must be {{"source_skip": true or false}}, got {generator!r}')
        keys = {"num_layers", "features", "conditional", "classifier_blur_sigma"}
        if set(settings["discriminator"]) != keys:
            raise ValueError(f"utad.discriminator must have exactly the keys {', '.join(sorted(keys))}, "
                             f"got {sorted(settings['discriminator'])}")
        if not isinstance(settings["discriminator"]["conditional"], bool):
            raise ValueError(f"utad.discriminator.conditional must be true or false, got "
                             f"{settings['discriminator']['conditional']!r}")
        sigma = settings["discriminator"]["classifier_blur_sigma"]
        if not is_non_negative_number(sigma):
            raise ValueError(f"utad.discriminator.classifier_blur_sigma must be a number >= 0 (pixels), got {sigma!r}")
        return settings

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = False) -> UTADGenerator:
        """The generator G from the configuration's plans (``num_output_channels`` is ignored: one image out).

        For the student this is the inference network: G without discriminators or teacher.
        """
        return cls.generator_class(num_modalities=num_input_channels,
                                   arch_class_name=configuration_manager.network_arch_class_name,
                                   arch_kwargs=configuration_manager.network_arch_init_kwargs,
                                   arch_kwargs_req_import=configuration_manager.network_arch_init_kwargs_req_import)

    def build_discriminator(self) -> nn.Module:
        patch = self.configuration_manager.patch_size
        settings = self.utad["discriminator"]
        layers = discriminator_layers(patch, settings["num_layers"])
        features = discriminator_features(self.configuration_manager.network_arch_init_kwargs["features_per_stage"],
                                          layers, settings["features"])
        return UTADDiscriminators(num_modalities=self.num_modalities, features=features,
                                  conv_op=self.generator_module.global_encoder.conv_op,
                                  conditional=settings["conditional"],
                                  classifier_blur_sigma=settings["classifier_blur_sigma"])

    def initialize(self) -> None:
        super().initialize()
        if self.batch_size < 2:
            raise ValueError(f"{type(self).__name__} trains unpaired: the real target slice comes from another sample "
                             f"of the batch, so the batch size must be at least 2 (configuration "
                             f"{self.configuration_name} has {self.batch_size} per process)")
        self._mask_channel = self._find_mask_channel()
        self.generator_module.source_skip.fill_(self.utad["generator"]["source_skip"])

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's loading (``--c``, ``--val``); refuses weights trained with another ``utad.generator.source_skip``
        (the flag is part of the generator: the config must say how the weights were trained)."""
        wanted = self.utad["generator"]["source_skip"]
        super().load_checkpoint(filename_or_checkpoint)
        trained = bool(self.generator_module.source_skip)
        if trained != wanted:
            where = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "the checkpoint"
            raise ValueError(f"{where} was trained with utad.generator.source_skip={str(trained).lower()}, the config "
                             f"now says {str(wanted).lower()}; set it back to resume or validate this model")

    def _find_mask_channel(self) -> int | None:
        """Index of ``utad.mask_region`` among the region targets, or None for a label-based dataset."""
        region = set(mods.REGIONS[self.utad["mask_region"]])
        if not self.label_manager.has_regions:
            return None
        for index, labels in enumerate(self.label_manager.foreground_regions):
            labels = {labels} if isinstance(labels, int) else set(labels)
            if labels == region:
                return index
        raise ValueError(f"utad.mask_region {self.utad['mask_region']} (labels {sorted(region)}) is not one of the "
                         f"regions of dataset.json of {self.plans_manager.dataset_name}: "
                         f"{self.label_manager.foreground_regions}")

    def get_training_transforms(self, patch_size: np.ndarray | tuple[int, ...], rotation_for_DA: RandomScalar,
                                deep_supervision_scales: list | tuple | None, mirror_axes: tuple[int, ...],
                                do_dummy_2d_data_aug: bool, use_mask_for_norm: list[bool] | None = None,
                                is_cascaded: bool = False, foreground_labels: list[int] | tuple[int, ...] | None = None,
                                regions: list | None = None, ignore_label: int | None = None) -> BasicTransform:
        """The base's transforms, without nnU-Net's intensity augmentations unless ``utad.intensity_augmentation``."""
        transforms = super().get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)
        if not self.utad["intensity_augmentation"]:
            transforms = without_intensity_augmentation(transforms)
        return transforms

    # ------------------------------------------------------------------ batches
    def tumour_mask(self, target: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y) float mask of ``utad.mask_region`` from nnU-Net's target (region maps or a label map)."""
        if self._mask_channel is not None:
            return (target[:, self._mask_channel:self._mask_channel + 1] > 0.5).float()
        labels = torch.as_tensor(mods.REGIONS[self.utad["mask_region"]], device=target.device)
        return torch.isin(target[:, :1].long(), labels).float()

    def unpaired_batch(self, data: torch.Tensor, target: torch.Tensor, *,
                       with_same_slice: bool = False) -> UnpairedBatch | None:
        """Draw the sources, targets and partners of one step (None if no sample has a pair).

        ``with_same_slice`` also gathers each source sample's own slice of its target modality (the reference of the
        paired term); the critic steps and runs with the term off skip that copy.
        """
        acquired = acquired_modalities(data, self.num_modalities, batched=True).cpu().numpy()
        cases = self.batch_keys if self.batch_keys is not None and len(self.batch_keys) == len(data) else None
        draw = draw_unpaired_pairs(acquired, cases=cases)
        if draw.rows.size == 0:
            return None
        mask = self.tumour_mask(target)
        rows, partner = (torch.as_tensor(a, device=data.device) for a in (draw.rows, draw.partner))
        source_modality, target_modality = (torch.as_tensor(a, device=data.device) for a in (draw.source, draw.target))
        real = data[partner, target_modality][:, None]  # (V, 1, X, Y)
        has_tumour = mask.flatten(1).any(1)  # (B,)
        batch = UnpairedBatch(source=data[rows, source_modality][:, None], source_mask=mask[rows],
                              source_modality=source_modality, target_modality=target_modality, real=real,
                              real_tumour=real * mask[partner], source_has_tumour=has_tumour[rows],
                              real_has_tumour=has_tumour[partner])
        if with_same_slice:
            batch.same_slice_target = data[rows, target_modality][:, None]
            batch.has_same_slice_target = torch.as_tensor(acquired[draw.rows, draw.target], device=data.device)
        return batch

    def generate(self, image: torch.Tensor, mask: torch.Tensor, target_modality: torch.Tensor) -> GeneratorOutput:
        """G for the teacher: the local branch reads the tumour image ``image x mask``."""
        return self.network(image, image * mask, target_modality)

    @staticmethod
    def _zero_losses(module: nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Zero for every term, attached to ``module``'s trainable parameters (so backward and step still work)."""
        zero = sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0
        return {name: zero for name in (*names, "total")}

    # ------------------------------------------------------------------ losses
    def discriminator_losses(self, data: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 11 for D_g and D_l (critic terms with eq. 1-4), generator outputs detached."""
        batch = self.unpaired_batch(data, target)
        if batch is None:
            return self._zero_losses(self.discriminator, self.discriminator_terms)
        with torch.no_grad():
            fake = self.generate(batch.source, batch.source_mask, batch.target_modality)
        lambda_gp = self.utad["lambda_gp"]
        losses: dict[str, torch.Tensor] = {}
        # the local critic only sees tumour images of slices that have a tumour (an empty mask gives a blank image,
        # whose modality cannot be told and which would pull the local output away from I_target x M = 0)
        everything = torch.ones_like(batch.real_has_tumour)
        for branch, real, generated, real_rows, fake_rows in (
                ("global", batch.real, fake.whole, everything, everything),
                ("local", batch.real_tumour, fake.tumour, batch.real_has_tumour, batch.source_has_tumour)):
            real, real_modality, generated = real[real_rows], batch.target_modality[real_rows], generated[fake_rows]
            if real.shape[0] == 0 or generated.shape[0] == 0:
                zero = self._zero_losses(self.discriminator, ())["total"]
                losses.update({f"d_adv_{branch}": zero, f"d_gp_{branch}": zero, f"d_cls_{branch}": zero})
                continue
            # real slices are of modality t, the fakes were asked for t (a conditional critic reads both)
            fake_modality = batch.target_modality[fake_rows]
            scores, logits = self.discriminator(torch.cat((real, generated.detach())), branch,
                                                torch.cat((real_modality, fake_modality)))
            real_scores, fake_scores = scores[:real.shape[0]], scores[real.shape[0]:]
            losses[f"d_adv_{branch}"] = wgan_critic_loss(real_scores, fake_scores)
            pairs = min(real.shape[0], generated.shape[0])  # interpolates need a real and a fake each
            with torch.autocast(self.device.type, enabled=False):  # the double backward in float32
                # an interpolate is judged as the modality of its real end
                losses[f"d_gp_{branch}"] = gradient_penalty(
                    lambda images, b=branch, m=real_modality[:pairs]: self.discriminator(images, b, m)[0],
                    real[:pairs].float(), generated[:pairs].float())
            losses[f"d_cls_{branch}"] = modality_classification_loss(logits[:real.shape[0]], real_modality)
        lambda_cls = self.utad["lambda_cls"]
        losses["total"] = sum(losses[f"d_adv_{b}"] + lambda_gp * losses[f"d_gp_{b}"] + lambda_cls * losses[f"d_cls_{b}"]
                              for b in UTADDiscriminators.BRANCHES)
        return losses

    def generator_losses(self, data: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 12 (teacher) or eq. 13 (student): every term and their weighted ``total``."""
        batch = self.unpaired_batch(data, target, with_same_slice=self.utad["lambda_paired"] > 0)
        if batch is None:
            return self._zero_losses(self.network, self.generator_terms)
        fake = self.generate(batch.source, batch.source_mask, batch.target_modality)
        losses: dict[str, torch.Tensor] = {}
        everything = torch.ones_like(batch.source_has_tumour)
        for branch, generated, rows in (("global", fake.whole, everything),
                                        ("local", fake.tumour, batch.source_has_tumour)):  # as in the critic step
            if not bool(rows.any()):
                losses[f"adv_{branch}"] = losses[f"cls_{branch}"] = generated.sum() * 0.0
                continue
            scores, logits = self.discriminator(generated[rows], branch, batch.target_modality[rows])
            losses[f"adv_{branch}"] = wgan_generator_loss(scores)
            losses[f"cls_{branch}"] = modality_classification_loss(logits, batch.target_modality[rows])
        # cycle back to the source modality; the local branch reads T'_target = I_target x M (teacher)
        cycle = self.generate(fake.whole, batch.source_mask, batch.source_modality)
        losses["rec"] = cycle_reconstruction_loss(batch.source, cycle.whole)
        losses["local"] = local_consistency_loss(fake.tumour, fake.whole * batch.source_mask,
                                                 batch.source * batch.source_mask, cycle.tumour)
        if self.utad["lambda_paired"] > 0:
            losses["paired"] = paired_translation_loss(fake.whole, batch.same_slice_target, batch.has_same_slice_target)
        losses.update(self.extra_generator_losses(batch, fake))
        losses["total"] = sum(weight * losses[name] for name, weight in self.term_weights().items())
        return losses

    def extra_generator_losses(self, batch: UnpairedBatch, fake: GeneratorOutput) -> dict[str, torch.Tensor]:
        """Terms a subclass adds to the generator loss (the student's distillation); none for the teacher."""
        return {}

    def term_weights(self) -> dict[str, float]:
        """Weight of each generator term in the total (eq. 12)."""
        lambda1, lambda_cls = float(self.utad["lambda1"]), float(self.utad["lambda_cls"])
        weights = {"adv_global": 1.0, "adv_local": 1.0, "cls_global": lambda_cls, "cls_local": lambda_cls,
                   "rec": lambda1, "local": lambda1}
        if self.utad["lambda_paired"] > 0:
            weights["paired"] = float(self.utad["lambda_paired"])
        return weights

    # ------------------------------------------------------------------ validation
    def paired_translation(self, data: torch.Tensor, target: torch.Tensor, draw: PairDraw
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(source, generated, real) (V, 1, X, Y) for the paired ``draw`` (target from the same slice)."""
        rows = torch.as_tensor(draw.rows, device=data.device)
        source_modality = torch.as_tensor(draw.source, device=data.device)
        target_modality = torch.as_tensor(draw.target, device=data.device)
        source = data[rows, source_modality][:, None]
        generated = self.generate(source, self.tumour_mask(target)[rows], target_modality).whole
        return source, generated, data[rows, target_modality][:, None]

    def validation_metrics(self, data: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
        """SSIM, PSNR and L1 per sample (NaN for samples without two acquired channels)."""
        metrics = {name: np.full(data.shape[0], np.nan) for name in self.validation_metric_names}
        draw = draw_paired_pairs(acquired_modalities(data, self.num_modalities, batched=True).cpu().numpy())
        if draw.rows.size == 0:
            return metrics
        _, generated, real = self.paired_translation(data, target, draw)
        generated, real = generated.float().cpu().numpy()[:, 0], real.float().cpu().numpy()[:, 0]
        for k, row in enumerate(draw.rows):
            metrics["ssim"][row], metrics["psnr"][row], metrics["l1"][row] = slice_quality(generated[k], real[k])
        return metrics

    def write_examples(self, filename: str) -> None:
        """PNG grid: source, generated and real target (same slice) for a few samples of a fixed validation batch."""
        if self.example_batch is None:
            if self.dataloader_val is None:
                self.print_to_log_file("no validation data loader: example grid skipped")
                return
            batch = next(self.dataloader_val)
            target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
            data = batch["data"]
            draw = draw_paired_pairs(acquired_modalities(data, self.num_modalities, batched=True).numpy(),
                                     np.random.default_rng(0))
            self.example_batch = {"data": data, "target": target, "draw": draw}
        batch = self.example_batch
        draw = batch["draw"]
        count = min(self.utad["num_examples"], draw.rows.size)
        if count == 0:
            self.print_to_log_file("no validation sample with two acquired channels: example grid skipped")
            return
        draw = PairDraw(*(a[:count] for a in (draw.rows, draw.source, draw.target, draw.partner)))
        source, generated, real = (t.float().cpu().numpy()[:, 0] for t in self.paired_translation(
            batch["data"].to(self.device), batch["target"].to(self.device), draw))
        names = [self.dataset_json["channel_names"][str(c)] for c in range(self.num_modalities)]
        plot_examples(source, generated, real, [names[s] for s in draw.source], [names[t] for t in draw.target],
                      filename, title=f"{type(self).__name__}, epoch {self.current_epoch}")

    def final_validation(self) -> None:
        """Translate the validation cases' slices for every pair; write the SSIM/PSNR matrices and heat map.

        Histogram matching to the training cases' histograms is scored on the same slices (module docstring).
        """
        if self.local_rank != 0:
            return
        train_keys, val_keys = self.do_split()
        dataset_class = self.dataset_class or infer_dataset_class(self.preprocessed_dataset_folder)
        dataset = dataset_class(self.preprocessed_dataset_folder, val_keys)
        size = self.num_modalities
        totals = np.zeros((3, size, size))  # summed SSIM, PSNR, slice count
        brain_totals = np.zeros((2, size, size))  # SSIM map summed over brain voxels, brain voxel count
        histogram_totals = np.zeros((2, size, size))  # the same for histogram matching
        reference_keys = sorted(train_keys) if len(train_keys) <= HISTOGRAM_CASES else sorted(
            np.random.default_rng(0).choice(sorted(train_keys), HISTOGRAM_CASES, replace=False).tolist())
        quantiles = self.histogram_reference(dataset_class(self.preprocessed_dataset_folder, reference_keys),
                                             reference_keys)
        region = np.asarray(mods.REGIONS[self.utad["mask_region"]])
        for number, key in enumerate(val_keys, start=1):
            self.print_to_log_file(f"final validation: {key} ({number} of {len(val_keys)})")
            data, seg, _, _ = dataset.load_case(key)
            data = np.asarray(data[:size], dtype=np.float32)  # (M, Z, X, Y)
            mask = np.isin(np.asarray(seg[0]), region).astype(np.float32)  # (Z, X, Y)
            brain = np.asarray(seg[0]) >= 0  # nnU-Net marks voxels outside its non-zero mask -1
            acquired = data.reshape(size, data.shape[1], -1).any(-1)  # (M, Z)
            for source in range(size):
                for target in range(size):
                    slices = np.flatnonzero(acquired[source] & acquired[target])
                    if source == target or slices.size == 0:
                        continue
                    for ssim, psnr, brain_sum, voxels in self._translate_slices(
                            data[source, slices], mask[slices], data[target, slices], brain[slices], target):
                        if np.isfinite(ssim) and np.isfinite(psnr):
                            totals[:, source, target] += (ssim, psnr, 1)
                        brain_totals[:, source, target] += (brain_sum, voxels)
                    if np.isfinite(quantiles[target]).all():
                        histogram_totals[:, source, target] += histogram_matching_ssim(
                            data[source, slices], data[target, slices], brain[slices], quantiles[target])
        result = synthesis_matrices(totals, self.dataset_json["channel_names"], brain_totals)
        result[HISTOGRAM_SSIM] = pair_means(histogram_totals[0], histogram_totals[1])
        result[HISTOGRAM_QUANTILES] = [None if not np.isfinite(row).all() else [round(float(v), 6) for v in row]
                                       for row in quantiles]
        with open(join(self.output_folder, SYNTHESIS_VALIDATION_FILE), "w") as f:
            json.dump(result, f, indent=2)
        plot_ssim_matrix(result, join(self.output_folder, SYNTHESIS_HEATMAP_FILE),
                         title=f"{type(self).__name__}\nvalidation SSIM over the brain, {len(val_keys)} case(s), "
                               f"fold {self.fold}")
        means = {name: np.mean(finite) if (finite := [v for row in result[name] for v in row if v is not None])
                 else float("nan") for name in ("ssim", "ssim_brain", HISTOGRAM_SSIM)}
        self.print_to_log_file(f"final validation on {len(val_keys)} case(s): mean over source->target pairs of the "
                               f"SSIM over the brain {means['ssim_brain']:.4f} (histogram matching "
                               f"{means[HISTOGRAM_SSIM]:.4f}), over whole slices {means['ssim']:.4f}; "
                               f"written to {join(self.output_folder, SYNTHESIS_VALIDATION_FILE)}")

    def histogram_reference(self, dataset, keys: Sequence[str]) -> np.ndarray:
        """(M, HISTOGRAM_LEVELS) quantiles of each sequence's brain voxels over the cases ``keys`` (preprocessed,
        z-scores; up to HISTOGRAM_SAMPLE_PER_CASE voxels of a case's acquired slices; a NaN row where none has it)."""
        size = self.num_modalities
        rng = np.random.default_rng(0)
        samples: list[list[np.ndarray]] = [[] for _ in range(size)]
        for key in keys:
            data, seg, _, _ = dataset.load_case(key)
            brain = np.asarray(seg[0]) >= 0
            for modality in range(size):
                channel = np.asarray(data[modality], dtype=np.float32)
                acquired = channel.reshape(channel.shape[0], -1).any(axis=1)  # zero-filled slices are missing
                values = channel[acquired][brain[acquired]]
                if values.size > HISTOGRAM_SAMPLE_PER_CASE:
                    values = rng.choice(values, HISTOGRAM_SAMPLE_PER_CASE, replace=False)
                if values.size:
                    samples[modality].append(values)
        levels = np.linspace(0.0, 1.0, HISTOGRAM_LEVELS)
        return np.stack([np.quantile(np.concatenate(s), levels) if s else np.full(HISTOGRAM_LEVELS, np.nan)
                         for s in samples])

    def _translate_slices(self, sources: np.ndarray, masks: np.ndarray, reals: np.ndarray, brains: np.ndarray,
                          target: int):
        """Yield, for each (X, Y) slice of ``sources`` translated to ``target`` (in chunks), the whole slice's SSIM
        and PSNR, and the sum of the SSIM map over the slice's brain voxels with their count (:func:`brain_ssim`)."""
        stride = self.generator_module.total_stride
        for start in range(0, len(sources), FINAL_VALIDATION_BATCH):
            chunk = slice(start, start + FINAL_VALIDATION_BATCH)
            source = torch.from_numpy(sources[chunk][:, None]).to(self.device)  # (n, 1, X, Y)
            mask = torch.from_numpy(masks[chunk][:, None]).to(self.device)
            shape = source.shape[2:]
            modality = torch.full((source.shape[0],), target, dtype=torch.long, device=self.device)
            with self._autocast():
                generated = self.generate(pad_to_stride(source, stride), pad_to_stride(mask, stride), modality).whole
            generated = generated[:, 0, :shape[0], :shape[1]].float().cpu().numpy()
            for k, (real, brain) in enumerate(zip(reals[chunk], brains[chunk], strict=True)):
                yield *slice_quality(generated[k], real)[:2], *brain_ssim(generated[k], real, brain)


class UTADNetStudentTrainer(UTADNetTeacherTrainer):
    """UTAD-Net's student: G reads the whole image only, distilled from the frozen teacher (eq. 10, 13)."""

    generator_terms = UTADNetTeacherTrainer.generator_terms + ("dis_feature", "dis_image")
    generator_class = UTADStudentGenerator

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.teacher: UTADTeacherGenerator | None = None

    def check_settings(self, settings: dict) -> dict:
        settings = super().check_settings(settings)
        value = settings["lambda2"]
        if not is_non_negative_number(value):
            raise ValueError(f"utad.lambda2 must be a number >= 0, got {value!r}")
        if not isinstance(settings["init_from_teacher"], bool):
            raise ValueError(f"utad.init_from_teacher must be true or false, got {settings['init_from_teacher']!r}")
        if not (isinstance(settings["teacher_checkpoint"], str) and settings["teacher_checkpoint"]):
            raise ValueError(f"utad.teacher_checkpoint must be a file name, got {settings['teacher_checkpoint']!r}")
        folder = settings["teacher_model_folder"]
        if folder is not None and not (isinstance(folder, str) and folder):
            raise ValueError(f"utad.teacher_model_folder must be null or a folder, got {folder!r}")
        return settings

    def initialize(self) -> None:
        super().initialize()
        self.teacher, teacher_weights = self.load_teacher()
        if self.utad["init_from_teacher"]:
            student = self.generator_module
            student.load_state_dict(teacher_weights)
            if bool(student.source_skip) != self.utad["generator"]["source_skip"]:
                self.print_to_log_file(f"WARNING: the teacher was trained with utad.generator.source_skip="
                                       f"{str(bool(student.source_skip)).lower()}, the student uses "
                                       f"{str(self.utad['generator']['source_skip']).lower()}: its decoders start "
                                       f"from weights that learned the other output")
            student.source_skip.fill_(self.utad["generator"]["source_skip"])  # the student's setting, not the teacher's
            student.local_encoder.apply(InitWeights_He(1e-2))  # the local branch now reads whole images
            self.print_to_log_file("student initialised from the teacher's weights, local encoder re-initialised")

    def teacher_model_folder(self) -> str:
        """``utad.teacher_model_folder`` with ``$VARS`` and ``~`` expanded, or the default teacher folder."""
        folder = self.utad["teacher_model_folder"]
        if folder is None:
            results = os.environ.get("nnUNet_results")
            if not results:
                raise RuntimeError("nnUNet_results is not set and utad.teacher_model_folder is null: set one of them")
            return join(results, self.plans_manager.dataset_name,
                        f"UTADNetTeacherTrainer__{self.plans_manager.plans_name}__{self.configuration_name}")
        return os.path.expanduser(os.path.expandvars(folder))

    def load_teacher(self) -> tuple[UTADTeacherGenerator, dict]:
        """The frozen teacher generator of the same fold, and its weights; clear errors for a wrong teacher.

        Raises:
            FileNotFoundError: the teacher's model folder, fold folder or checkpoint does not exist.
            ValueError: the checkpoint is unreadable, not a teacher's, or was trained on other channels, another
                network (plans/configuration) or another mask region.
        """
        folder = self.teacher_model_folder()
        name = type(self).__name__
        train_hint = (f"train the teacher first (nnUNetv2_train {self.plans_manager.dataset_name} "
                      f"{self.configuration_name} {self.fold} -tr UTADNetTeacherTrainer) or set "
                      f"utad.teacher_model_folder")
        if not isdir(folder):
            raise FileNotFoundError(f"{name}: teacher model folder {folder} (utad.teacher_model_folder) does not "
                                    f"exist; {train_hint}")
        path = join(folder, f"fold_{self.fold}", self.utad["teacher_checkpoint"])
        if not isfile(path):
            raise FileNotFoundError(f"{name}: teacher checkpoint {path} does not exist (utad.teacher_checkpoint "
                                    f"{self.utad['teacher_checkpoint']!r}, fold {self.fold}); {train_hint}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
            weights, init_args = checkpoint["network_weights"], checkpoint.get("init_args") or {}
        except Exception as error:  # a truncated file, or not an nnU-Net checkpoint
            raise ValueError(f"{name}: cannot read the teacher checkpoint {path}: {error}") from None
        self._check_teacher(path, checkpoint.get("trainer_name"), init_args)
        teacher = UTADTeacherGenerator(num_modalities=self.num_modalities,
                                       arch_class_name=self.configuration_manager.network_arch_class_name,
                                       arch_kwargs=self.configuration_manager.network_arch_init_kwargs,
                                       arch_kwargs_req_import=self.configuration_manager.network_arch_init_kwargs_req_import)
        try:
            teacher.load_state_dict(weights)
        except RuntimeError as error:
            raise ValueError(f"{name}: the teacher weights in {path} do not fit this configuration's generator "
                             f"(other plans?): {str(error).splitlines()[0]}") from None
        teacher.to(self.device).eval()
        teacher.requires_grad_(False)
        self.print_to_log_file(f"teacher loaded from {path}")
        return teacher, weights

    def _check_teacher(self, path: str, trainer_name: str | None, init_args: dict) -> None:
        name = type(self).__name__
        teacher_class = globals().get(str(trainer_name))
        if not (isinstance(teacher_class, type) and issubclass(teacher_class, UTADNetTeacherTrainer)
                and not issubclass(teacher_class, UTADNetStudentTrainer)):
            raise ValueError(f"{name}: {path} was written by {trainer_name}, not by UTADNetTeacherTrainer")
        channels = (init_args.get("dataset_json") or {}).get("channel_names")
        if channels != self.dataset_json["channel_names"]:
            raise ValueError(f"{name}: the teacher in {path} was trained on channels {channels}, this dataset has "
                             f"{self.dataset_json['channel_names']}")
        try:
            theirs = PlansManager(init_args["plans"]).get_configuration(init_args["configuration"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"{name}: {path} does not record the plans it was trained with ({error})") from None
        ours = self.configuration_manager
        differing = sorted(k for k in {*theirs.network_arch_init_kwargs, *ours.network_arch_init_kwargs}
                           if theirs.network_arch_init_kwargs.get(k) != ours.network_arch_init_kwargs.get(k))
        if theirs.network_arch_class_name != ours.network_arch_class_name:
            differing.insert(0, "network_class_name")
        if differing:
            raise ValueError(f"{name}: the teacher in {path} was trained with configuration "
                             f"{init_args['configuration']!r} of plans {init_args['plans'].get('plans_name')!r}, "
                             f"whose network differs from this run's {self.configuration_name!r} in {differing}; "
                             f"train the student with the teacher's plans and configuration")
        recorded = join(os.path.dirname(path), "trainer_config.json")
        if isfile(recorded):
            with open(recorded) as f:
                region = json.load(f).get("utad", {}).get("mask_region")
            if region is not None and region != self.utad["mask_region"]:
                raise ValueError(f"{name}: the teacher in {path} was trained with utad.mask_region {region}, this "
                                 f"student's config says {self.utad['mask_region']}; use the same region")

    def generate(self, image: torch.Tensor, mask: torch.Tensor, target_modality: torch.Tensor) -> GeneratorOutput:
        """G for the student: the whole image only; ``mask`` is never passed to the network."""
        return self.network(image, target_modality)

    def extra_generator_losses(self, batch: UnpairedBatch, fake: GeneratorOutput) -> dict[str, torch.Tensor]:
        """L_dis (eq. 10) against the frozen teacher, which reads the tumour image."""
        with torch.no_grad():
            teacher = self.teacher(batch.source, batch.source * batch.source_mask, batch.target_modality)
        feature, image = distillation_loss(teacher.fused, fake.fused, teacher.whole, fake.whole)
        return {"dis_feature": feature, "dis_image": image}

    def term_weights(self) -> dict[str, float]:
        """Eq. 13: the teacher's weights plus lambda2 for both terms of L_dis."""
        lambda2 = float(self.utad["lambda2"])
        return {**super().term_weights(), "dis_feature": lambda2, "dis_image": lambda2}


# ---------------------------------------------------------------------------------------------- outputs
def histogram_matching_ssim(sources: np.ndarray, reals: np.ndarray, brains: np.ndarray,
                            quantiles: np.ndarray) -> tuple[float, int]:
    """(sum of the SSIM map over the brain voxels, their number) of the (n, X, Y) ``sources`` of one case, their brain
    voxels matched together to the target histogram ``quantiles``, against the real target slices (:func:`brain_ssim`
    per slice, summed): the histogram fallback's validation score of one pair on one case."""
    matched = histogram_matched(sources, brains, quantiles)
    total, voxels = 0.0, 0
    for generated, real, brain in zip(matched, reals, brains, strict=True):
        slice_sum, slice_voxels = brain_ssim(generated, real, brain)
        total, voxels = total + slice_sum, voxels + slice_voxels
    return total, voxels


def pair_means(values: np.ndarray, counts: np.ndarray) -> list[list[float | None]]:
    """M x M ``values / counts`` per source -> target pair; None on the diagonal and where the count is 0."""
    size = values.shape[0]
    return [[None if s == t or counts[s, t] == 0 else float(values[s, t] / counts[s, t]) for t in range(size)]
            for s in range(size)]


def synthesis_matrices(totals: np.ndarray, channel_names: dict, brain_totals: np.ndarray | None = None) -> dict:
    """``synthesis_validation.json``'s content from (3, M, M) sums of SSIM, PSNR and slice counts, and (2, M, M)
    sums of the SSIM map over brain voxels and brain voxel counts (``ssim_brain``, ``brain_voxels``)."""
    size = totals.shape[1]
    def integers(counts: np.ndarray) -> list[list[int | None]]:
        return [[None if s == t else int(counts[s, t]) for t in range(size)] for s in range(size)]

    counts = totals[2]
    result = {"channel_names": dict(channel_names), "ssim": pair_means(totals[0], counts),
              "psnr": pair_means(totals[1], counts), "num_slices": integers(counts)}
    if brain_totals is not None:
        result |= {"ssim_brain": pair_means(brain_totals[0], brain_totals[1]),
                   "brain_voxels": integers(brain_totals[1])}
    return result


def plot_ssim_matrix(result: dict, filename: str, title: str, key: str = "ssim_brain") -> None:
    """Heat map of the [source][target] SSIM matrix ``key`` of :func:`synthesis_matrices` (``ssim`` if absent)."""
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    key = key if key in result else "ssim"
    names = [result["channel_names"][str(c)] for c in range(len(result[key]))]
    values = np.array([[np.nan if v is None else v for v in row] for row in result[key]], dtype=float)
    with plt.style.context("default"):  # nnU-Net's progress plot changes the global style (seaborn, large fonts)
        _draw_ssim_matrix(plt, names, values, filename, title)


def _draw_ssim_matrix(plt, names: list[str], values: np.ndarray, filename: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 1.1 * len(names) + 1.5))
    low = float(np.nanmin(values)) if np.isfinite(values).any() else 0.0
    image = ax.imshow(values, cmap="viridis", vmin=min(0.0, low), vmax=1)  # an inverted contrast scores < 0
    for s in range(len(names)):
        for t in range(len(names)):
            label = "–" if np.isnan(values[s, t]) else f"{values[s, t]:.3f}"
            dark = not np.isnan(values[s, t]) and values[s, t] < 0.6
            ax.text(t, s, label, ha="center", va="center", color="white" if dark else "black", fontsize=9)
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
           xlabel="target", ylabel="source")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="SSIM")
    fig.tight_layout()
    fig.savefig(filename, dpi=100)
    plt.close(fig)


def plot_examples(source: np.ndarray, generated: np.ndarray, real: np.ndarray, source_names: list[str],
                  target_names: list[str], filename: str, title: str) -> None:
    """Rows of (source, generated, real target) slices, each row in one grey scale (that of its real target)."""
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):  # nnU-Net's progress plot changes the global style (seaborn, large fonts)
        _draw_examples(plt, source, generated, real, source_names, target_names, filename, title)


def _draw_examples(plt, source: np.ndarray, generated: np.ndarray, real: np.ndarray, source_names: list[str],
                   target_names: list[str], filename: str, title: str) -> None:
    rows = len(source)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows + 0.4), squeeze=False)
    for k in range(rows):
        low, high = np.percentile(real[k], (0.5, 99.5))
        panels = ((source[k], f"source {source_names[k]}", np.percentile(source[k], (0.5, 99.5))),
                  (generated[k], f"generated {target_names[k]}", (low, high)),
                  (real[k], f"real {target_names[k]}", (low, high)))
        for ax, (image, label, (vmin, vmax)) in zip(axes[k], panels, strict=True):
            ax.imshow(image.T, cmap="gray", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1, origin="lower")
            ax.set_title(label, fontsize=9)
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(filename, dpi=90)
    plt.close(fig)
