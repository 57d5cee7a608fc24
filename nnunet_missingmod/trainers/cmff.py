"""CMFTPretrainer and CMFFTrainer: cross-modality feature transition, then fusion, trained with nnU-Net.

Zhang, Huang, Zhang, Han, Han, Yu, "Cross-Modality Deep Feature Learning for Brain Tumor Segmentation",
Pattern Recognition 110, 107562, 2021 (https://doi.org/10.1016/j.patcog.2020.107562). Equation, figure and table
numbers are the paper's; the networks are in :mod:`nnunet_missingmod.networks.cmff` (with their deviations) and
the adversarial and cycle losses in :mod:`nnunet_missingmod.losses.adversarial`.

Two phases, both on 3D configurations (also the CPU one)::

    nnUNetv2_train D CONFIG FOLD -tr CMFTPretrainer   # phase 1: G_A→B, G_B→A against D_A, D_B (Sec. 3.1)
    nnUNetv2_train D CONFIG FOLD -tr CMFFTrainer      # phase 2: S_A, S_B from the generators, plus S_F (Sec. 3.2)

**CMFTPretrainer** (:class:`~nnunet_missingmod.trainers.adversarial.AdversarialTrainer`): ``self.network`` holds
both generators, ``self.discriminator`` both discriminators (one optimiser each side, both in the checkpoint, so
``--c`` resumes the GAN). Per iteration the discriminators minimise eq. 2 + eq. 3 (their side), then the
generators minimise eq. 6: L_adv(G_A→B) + L_adv(G_B→A) + λ L_cyc with λ = 10 (``cmft.lambda_cycle``). Adam with
lr 1e-4 on both sides (``adversarial`` section; CycleGAN's betas 0.5, 0.999; constant rate). Logged every epoch:
``adv_ab``, ``adv_ba``, ``cycle`` (generator) and ``disc_a``, ``disc_b`` (discriminators), drawn in
``progress_adversarial.png``. The validation batches report, instead of Dice, the mean absolute error (``l1``)
over the brain and SSIM (``ssim``: scikit-image's definition, computed with torch, see :func:`translation_ssim`) of each
translation against the real images of the other pair (``l1_ab``: G_A→B(A) vs B, ``l1_ba``, ``ssim_ab``,
``ssim_ba``); ``ssim`` (mean of both directions) fills nnU-Net's pseudo-Dice slot, so ``checkpoint_best.pth`` has
the best SSIM. ``examples/epoch_XXXX.png`` shows, for one validation patch, every modality of both pairs: real,
translated from the other pair and cycle-reconstructed. After training, ``final_validation`` translates every
validation case whole (sliding window of the plans' patch, step 0.5, Gaussian weighting as nnU-Net's predictor) and
writes per-case and mean L1/SSIM over the brain to ``validation_translation/summary.json``
(``cmft.final_validation: false`` skips it and says so in the log).

Samples that lack a modality of either pair (an all-zero channel: a sequence the case does not have) take no part
in the CMFT losses and metrics: a translation into, or from, an absent image teaches nothing.

**CMFFTrainer** (:class:`~nnunet_missingmod.trainers.base.MultiTermLossTrainer`): loss eq. 7,
L_seg(S_A) + L_seg(S_B) + L_seg(S_F), each nnU-Net's region loss (Dice + BCE) with its deep supervision: over every
decoder stage for the branches, over S_F's two fused resolutions for S_F (nnU-Net's weights 1, 1/2, normalised).
The paper's L_seg is Dice only (eq. 8); nnU-Net's Dice + BCE is kept, as for every trainer of this package.
Modality dropout (config ``modality_dropout``, as ModalityDropoutTrainer) is drawn in the training step. A sample
whose pair A (or B) is wholly missing after dropout gets that branch's features and masks zeroed in S_F (see the
network) and does not enter L_seg(S_A) (or L_seg(S_B)): a branch without its input has nothing to learn from it.
Optimiser: the paper's Adam with lr 1e-4 (``cmff.optimizer: "adam"``, ``nnunet.initial_lr``; nnU-Net's weight
decay and poly schedule), or nnU-Net's SGD (``"sgd"``; set ``nnunet.initial_lr`` with it, e.g. nnU-Net's 1e-2:
the log warns when SGD runs with a rate below 1e-3, such as the Adam 1e-4 of this config).

Initialisation from the pretraining (Sec. 4.1): when training starts (epoch 0, not on ``--c``), S_A gets every
weight of G_A→B and S_B of G_B→A except the output layers; the fusion branch and the segmentation heads start
random. ``cmff.pretrained_checkpoint`` names the checkpoint:

* ``"auto"`` (default): ``checkpoint_final.pth`` of ``cmff.pretrainer`` (``CMFTPretrainer``) on the same dataset,
  plans, configuration and fold, i.e. ``$nnUNet_results/<Dataset>/CMFTPretrainer__<plans>__<config>/fold_<f>``;
* a path to a CMFTPretrainer checkpoint (e.g. in an override file: ``{"cmff": {"pretrained_checkpoint": "..."}}``);
* ``null``: no pretraining, random initialisation (``CMFFTrainer_random``, Table 2's "Ours_random").

A checkpoint that is missing, was not written by a CMFT pretrainer, used other modality pairs, or whose weights do
not fit (other plans, configuration or ``feature_fraction``) stops training before it starts, with an error naming
the file and what differs. nnU-Net's ``-pretrained_weights`` cannot take a CMFT checkpoint: its loader
(``nnunetv2/run/load_pretrained_weights.py``) requires every weight of the target network except ``.seg_layers.``
to be in the file, and the fusion branch is not (nnU-Net stops with an assertion naming the first fusion key). It
does load a CMFFTrainer checkpoint (fine-tuning a CMFF model); then set ``cmff.pretrained_checkpoint`` to null, or
the branches are overwritten with the CMFT weights when training starts.

Both phases build their U-Nets from the plans at ``feature_fraction`` 0.5 of the plans' widths, never below 16
(``cmft.feature_fraction``, ``cmff.network.feature_fraction``; they must agree for the transfer): the paper's 16
base filters on nnU-Net's BraTS plans, and two full-width U-Nets would cost twice a plain nnU-Net's inference
(see :mod:`nnunet_missingmod.networks.cmff`). The
``cmff.network`` keys shape the network and ``nnUNetv2_predict`` reads them again: change them through a variant
(and the pretrainer's to match), not through ``nnUNet_missingmod_config`` at training time only.

Ablations of Table 2 as variants that only change the config: ``CMFFTrainer_noMaskGuidance`` ("Ours w/o MG"),
``CMFFTrainer_channelAttention`` ("Ours w CA"), ``CMFFTrainer_random`` ("Ours_random").

Deviations (besides the networks'): the CycleGAN image pool (a history of generated images for the
discriminator) is not used; the paper does not mention one. Only region-based datasets (``regions_class_order``
in ``dataset.json``, as this package's BraTS datasets) are accepted by CMFFTrainer: the attention masks are the
branches' per-region sigmoids. CMFFTrainer trains with modality dropout (``modality_dropout``; this package is built for
robustness to missing sequences), where the paper trains on complete inputs: with the default ``uniform_subset``
scheme a pair is wholly absent in about a fifth of the samples (use ``p_keep_all`` for a share of complete
samples). CMFTPretrainer leaves out nnU-Net's intensity augmentation (``cmft.intensity_augmentation: false``, as
the UTAD-Net trainers do): it would move what the critics learn as real. Patches follow nnU-Net's sampling
(33% foreground oversampling, the plans' batch size) where the paper samples in the tumour with batch 1.
Like every trainer of this package, both keep nnU-Net's spatial augmentation, gradient clipping (12) and, at
inference, test-time mirroring (``inference.test_time_mirroring``); the paper mentions none of them. Table 2's
single-branch baselines (S_A, S_B, their average) and its other initialisations ("Ours_voc", "Ours_self") are
not offered as trainers.
"""

from __future__ import annotations

import json
import os
from os.path import dirname, isfile, join

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo import OptimizedModule

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.config import is_non_negative_number, load_trainer_config
from nnunet_missingmod.losses.adversarial import (
    cycle_consistency_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
)
from nnunet_missingmod.networks.cmff import (
    CMFFNet,
    CMFTDiscriminators,
    CMFTGenerators,
    ModalityPairs,
    scaled_arch_kwargs,
    transfer_generator_weights,
)
from nnunet_missingmod.trainers.adversarial import AdversarialTrainer, without_intensity_augmentation
from nnunet_missingmod.trainers.base import MultiTermLossTrainer
from nnunet_missingmod.transforms.missing_modalities import acquired_modalities

__all__ = ["CMFTPretrainer", "CMFFTrainer", "CMFFTrainer_noMaskGuidance", "CMFFTrainer_channelAttention",
           "CMFFTrainer_random"]

#: Where a CMFTPretrainer checkpoint records its modality pairs (``missingmod_state``).
PAIRS_STATE_KEY = "cmft_pairs"


def _pairs(settings: dict, num_modalities: int, section: str) -> ModalityPairs:
    return ModalityPairs.from_config(settings["pairs"], num_modalities, where=f"{section}.pairs")


def _complete_samples(data: torch.Tensor, pairs: ModalityPairs) -> torch.Tensor:
    """(B,) booleans: samples that have every channel of both pairs (none of them exactly zero)."""
    acquired = acquired_modalities(data, batched=True)  # (B, M)
    return acquired[:, list(pairs.a) + list(pairs.b)].all(1)


def translation_ssim(prediction: torch.Tensor, reference: torch.Tensor, window: int = 7) -> float:
    """SSIM of one 3D image against its reference, as scikit-image's ``structural_similarity`` with its defaults.

    Uniform ``window``³ filter, K1 = 0.01, K2 = 0.03, sample covariances, data range = the reference's max - min,
    mean over the voxels at least ``window // 2`` from the border (scikit-image crops the same border). Computed
    with torch on the images' device: scikit-image takes 1-3 s per 128³ volume on a CPU core, which over nnU-Net's
    validation batches would add minutes per epoch (tests compare the two). NaN where SSIM is undefined: a
    constant reference, or an image thinner than 3 voxels (the window shrinks, odd, to the image's smallest axis).

    Args:
        prediction, reference: (X, Y, Z) tensors.
    """
    window = min(window, *reference.shape)
    window -= 1 - window % 2  # odd
    dtype = torch.float32 if reference.device.type == "mps" else torch.float64  # MPS has no float64
    prediction, reference = prediction.to(dtype), reference.to(dtype)
    data_range = float(reference.max() - reference.min())
    if window < 3 or data_range <= 0:
        return float("nan")

    def local_mean(volume: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(volume[None, None], window, stride=1)[0, 0]  # the border-cropped region only

    covariance_norm = window ** 3 / (window ** 3 - 1)  # sample covariance, as scikit-image's default
    mean_p, mean_r = local_mean(prediction), local_mean(reference)
    var_p = covariance_norm * (local_mean(prediction * prediction) - mean_p * mean_p)
    var_r = covariance_norm * (local_mean(reference * reference) - mean_r * mean_r)
    cov = covariance_norm * (local_mean(prediction * reference) - mean_p * mean_r)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim = ((2 * mean_p * mean_r + c1) * (2 * cov + c2)) / ((mean_p ** 2 + mean_r ** 2 + c1) * (var_p + var_r + c2))
    return float(ssim.mean())


def translate_volume(generator: nn.Module, image: torch.Tensor, patch_size: tuple[int, ...], out_channels: int,
                     step_size: float = 0.5) -> torch.Tensor:
    """A generator over a whole volume by sliding windows with Gaussian weighting (as nnU-Net's predictor).

    Args:
        generator: maps (1, C_in, *patch) to (1, out_channels, *patch).
        image: (C_in, X, Y, Z) on the generator's device; padded with zeros to at least the patch.
        patch_size: the tile.
        out_channels: channels of the result.
        step_size: tile step as a fraction of the patch.

    Returns:
        (out_channels, X, Y, Z).
    """
    shape = tuple(image.shape[1:])
    padded_shape = tuple(max(s, p) for s, p in zip(shape, patch_size, strict=True))
    padded = image.new_zeros((image.shape[0], *padded_shape))
    padded[(slice(None), *(slice(0, s) for s in shape))] = image
    gaussian = compute_gaussian(tuple(patch_size), sigma_scale=1 / 8, value_scaling_factor=10, dtype=torch.float32,
                                device=image.device)
    result = image.new_zeros((out_channels, *padded_shape), dtype=torch.float32)
    weights = image.new_zeros(padded_shape, dtype=torch.float32)
    steps = compute_steps_for_sliding_window(padded_shape, tuple(patch_size), step_size)
    for x in steps[0]:
        for y in steps[1]:
            for z in steps[2]:
                tile = (slice(x, x + patch_size[0]), slice(y, y + patch_size[1]), slice(z, z + patch_size[2]))
                output = generator(padded[(slice(None), *tile)][None])[0].float()  # (out_channels, *patch)
                result[(slice(None), *tile)] += output * gaussian
                weights[tile] += gaussian
    result /= weights
    return result[(slice(None), *(slice(0, s) for s in shape))]


# ------------------------------------------------------------------------------------------------ CMFT
class CMFTPretrainer(AdversarialTrainer):
    """Phase 1, cross-modality feature transition (Sec. 3.1, eq. 2-6); see the module docstring."""

    generator_terms = ("adv_ab", "adv_ba", "cycle")
    discriminator_terms = ("disc_a", "disc_b")
    validation_metric_names = ("ssim", "l1", "ssim_ab", "ssim_ba", "l1_ab", "l1_ba")
    validation_loss_name = "l1"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        settings = self.trainer_config["cmft"]
        self.pairs = _pairs(settings, self.num_modalities, "cmft")
        weight = settings["lambda_cycle"]
        if not is_non_negative_number(weight):
            raise ValueError(f"cmft.lambda_cycle must be a number >= 0, got {weight!r}")
        self.lambda_cycle = float(weight)
        self._example: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """Both generators as one module (``num_output_channels`` and deep supervision do not apply)."""
        settings = load_trainer_config(cls)["cmft"]
        return CMFTGenerators(pairs=_pairs(settings, num_input_channels, "cmft"),
                              arch_class_name=configuration_manager.network_arch_class_name,
                              arch_kwargs=scaled_arch_kwargs(configuration_manager.network_arch_init_kwargs,
                                                             settings["feature_fraction"]),
                              arch_kwargs_req_import=configuration_manager.network_arch_init_kwargs_req_import)

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        """The base's transforms, without nnU-Net's intensity augmentations unless ``cmft.intensity_augmentation``.

        The real images of one pair are what the other pair's generator learns to produce; intensity noise on them
        would become part of that target (as in the UTAD-Net trainers).
        """
        transforms = super().get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)
        if not self.trainer_config["cmft"].get("intensity_augmentation", False):
            transforms = without_intensity_augmentation(transforms)
        return transforms

    def build_discriminator(self) -> nn.Module:
        return CMFTDiscriminators(self.pairs, self.configuration_manager.patch_size,
                                  self.trainer_config["cmft"]["discriminator_features"])

    def extra_checkpoint_state(self) -> dict:
        return {**super().extra_checkpoint_state(), PAIRS_STATE_KEY: self.pairs.names()}

    # ---------------------------------------------------------------------------------------------- losses
    def _real(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return data[:, list(self.pairs.a)], data[:, list(self.pairs.b)]

    def discriminator_losses(self, data: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The discriminators' side of eq. 2 (D_B) and eq. 3 (D_A), generator outputs detached."""
        complete = _complete_samples(data, self.pairs)
        with torch.no_grad():
            generated = self.network(data, cycle=False)
        real_a, real_b = self._real(data)
        batch = data.shape[0]
        scores_a, scores_b = self.discriminator(torch.cat((real_a, generated["fake_a"])),
                                                torch.cat((real_b, generated["fake_b"])))  # (2B, 1, ...) each
        losses = {"disc_a": lsgan_discriminator_loss(scores_a[:batch], scores_a[batch:], complete),
                  "disc_b": lsgan_discriminator_loss(scores_b[:batch], scores_b[batch:], complete)}
        losses["total"] = losses["disc_a"] + losses["disc_b"]
        return losses

    def generator_losses(self, data: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 6 for the generators: both least-squares adversarial terms plus λ times eq. 4."""
        complete = _complete_samples(data, self.pairs)
        generated = self.network(data, cycle=True)
        real_a, real_b = self._real(data)
        scores_a, scores_b = self.discriminator(generated["fake_a"], generated["fake_b"])
        losses = {"adv_ab": lsgan_generator_loss(scores_b, complete),  # G_A→B against D_B (eq. 2)
                  "adv_ba": lsgan_generator_loss(scores_a, complete),  # G_B→A against D_A (eq. 3)
                  "cycle": cycle_consistency_loss(generated["cycle_a"], real_a, generated["cycle_b"], real_b,
                                                  complete)}
        losses["total"] = losses["adv_ab"] + losses["adv_ba"] + self.lambda_cycle * losses["cycle"]
        return losses

    # ---------------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._example = None

    def validation_metrics(self, data: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
        """Per sample: L1 and SSIM of G_A→B(A) against B and of G_B→A(B) against A (NaN for incomplete samples).

        L1 is the mean over the brain (voxels where any input channel is nonzero, as in :meth:`final_validation`),
        so the background, where any generator easily outputs zero, does not dilute it; NaN without brain voxels.
        """
        complete = _complete_samples(data, self.pairs).cpu().numpy()
        generated = self.network(data, cycle=False)
        real_a, real_b = self._real(data)
        pairs = {"ab": (generated["fake_b"], real_b), "ba": (generated["fake_a"], real_a)}
        brain = data.ne(0).any(1, keepdim=True).float()  # (B, 1, ...)
        brain_voxels = brain.flatten(1).sum(1)
        metrics: dict[str, np.ndarray] = {}
        for direction, (fake, real) in pairs.items():  # (B, C, ...) each
            error = ((fake.float() - real.float()).abs() * brain).flatten(1).sum(1) / (fake.shape[1] * brain_voxels)
            l1 = np.where(brain_voxels.cpu().numpy() > 0, error.cpu().numpy(), np.nan)
            ssim = np.array([np.nanmean([translation_ssim(f, r) for f, r in zip(fs, rs, strict=True)])
                             if ok else np.nan for fs, rs, ok in zip(fake, real, complete, strict=True)])
            metrics[f"l1_{direction}"] = np.where(complete, l1, np.nan)
            metrics[f"ssim_{direction}"] = ssim
        metrics["l1"] = (metrics["l1_ab"] + metrics["l1_ba"]) / 2
        metrics["ssim"] = (metrics["ssim_ab"] + metrics["ssim_ba"]) / 2
        if self._example is None and complete.any():
            first = int(np.flatnonzero(complete)[0])
            self._example = (data[first:first + 1].detach().cpu(), target[first:first + 1].detach().cpu())
        return metrics

    def write_examples(self, filename: str) -> None:
        """One validation patch: each modality real, translated from the other pair, and cycle-reconstructed."""
        if self._example is None:
            return
        data, target = self._example
        generated = self.generator_module(data.to(self.device), cycle=True)
        rows = {"real": data[0].float().numpy(), "translated": np.zeros_like(data[0].float().numpy()),
                "cycle": np.zeros_like(data[0].float().numpy())}
        for channels, fake, cycled in ((self.pairs.a, "fake_a", "cycle_a"), (self.pairs.b, "fake_b", "cycle_b")):
            rows["translated"][list(channels)] = generated[fake][0].float().cpu().numpy()
            rows["cycle"][list(channels)] = generated[cycled][0].float().cpu().numpy()
        foreground = target[0].float().reshape(target.shape[1], target.shape[2], -1)[0].sum(-1)  # (X,) first region
        index = int(foreground.argmax()) if foreground.max() > 0 else data.shape[2] // 2
        shown = list(self.pairs.a) + list(self.pairs.b)
        matplotlib.use("agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(3, len(shown), figsize=(2.6 * len(shown), 7.8), squeeze=False)
        for column, channel in enumerate(shown):
            real = rows["real"][channel, index]
            low, high = float(real.min()), float(real.max())
            for row, (name, images) in enumerate(rows.items()):
                ax = axes[row, column]
                ax.imshow(images[channel, index], cmap="gray", vmin=low, vmax=high if high > low else low + 1)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    pair = "A" if channel in self.pairs.a else "B"
                    ax.set_title(f"{mods.DISPLAY_NAMES[channel]} (pair {pair})", fontsize=10)
                if column == 0:
                    ax.set_ylabel(name, fontsize=10)
        fig.suptitle(f"{type(self).__name__}, epoch {self.current_epoch}: translated = from the other pair",
                     fontsize=11)
        fig.tight_layout()
        fig.savefig(filename, dpi=80)
        plt.close(fig)

    def final_validation(self) -> None:
        """L1 and SSIM of both translations of every validation case, whole volume, inside the brain."""
        if not self.trainer_config["cmft"]["final_validation"]:
            super().final_validation()
            return
        if self.local_rank != 0:
            return
        _, keys = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, keys,
                                     folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        generators = self.generator_module
        patch = tuple(self.configuration_manager.patch_size)
        cases = []
        for key in keys:
            data = torch.from_numpy(np.asarray(dataset.load_case(key)[0], dtype=np.float32))  # (M, X, Y, Z)
            row: dict = {"case": key}
            if not bool(_complete_samples(data[None], self.pairs)[0]):
                row["skipped"] = "a modality of the pairs is missing"
                cases.append(row)
                continue
            data = data.to(self.device)
            brain = data.ne(0).any(0)  # (X, Y, Z)
            with self._autocast():
                fake_b = translate_volume(generators.a_to_b, data[list(self.pairs.a)], patch, len(self.pairs.b))
                fake_a = translate_volume(generators.b_to_a, data[list(self.pairs.b)], patch, len(self.pairs.a))
            for direction, fake, channels in (("ab", fake_b, self.pairs.b), ("ba", fake_a, self.pairs.a)):
                real = data[list(channels)].float()
                row[f"l1_{direction}"] = float((fake - real).abs()[:, brain].mean())
                row[f"ssim_{direction}"] = float(np.nanmean([translation_ssim(f, r)
                                                             for f, r in zip(fake, real, strict=True)]))
            cases.append(row)
        names = ("l1_ab", "l1_ba", "ssim_ab", "ssim_ba")
        scored = [c for c in cases if "skipped" not in c]
        mean = {n: float(np.mean([c[n] for c in scored])) if scored else float("nan") for n in names}
        folder = join(self.output_folder, "validation_translation")
        os.makedirs(folder, exist_ok=True)
        with open(join(folder, "summary.json"), "w") as f:
            json.dump({"pairs": self.pairs.names(), "mean": mean, "cases": cases,
                       "note": "l1: mean absolute error over the brain (nonzero voxels) in normalised intensities; "
                               "ssim: SSIM of the whole volume (scikit-image's definition and defaults), mean "
                               "over the pair's channels"},
                      f, indent=2)
        self.print_to_log_file(f"final validation (translations of {len(scored)} of {len(cases)} validation cases): "
                               + ", ".join(f"{n} {v:.4f}" for n, v in mean.items()) + f"; written to {folder}")


# ------------------------------------------------------------------------------------------------ CMFF
class CMFFTrainer(MultiTermLossTrainer):
    """Phase 2, cross-modality feature fusion (Sec. 3.2, eq. 7), initialised from CMFT; see the module docstring."""

    loss_terms = ("seg_a", "seg_b", "seg_fused")

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        # a classmethod, so that a variant's config shapes its own network in training and in nnUNetv2_predict
        settings = load_trainer_config(cls)["cmff"]["network"]
        return CMFFNet(pairs=_pairs(settings, num_input_channels, "cmff.network"), num_regions=num_output_channels,
                       arch_class_name=configuration_manager.network_arch_class_name,
                       arch_kwargs=scaled_arch_kwargs(configuration_manager.network_arch_init_kwargs,
                                                      settings["feature_fraction"]),
                       arch_kwargs_req_import=configuration_manager.network_arch_init_kwargs_req_import,
                       deep_supervision=enable_deep_supervision, attention=settings["attention"],
                       fusion_levels=settings["fusion_levels"])

    def initialize(self) -> None:
        self.require_region_labels("its attention masks are one sigmoid per tumour region")
        super().initialize()

    def _network_module(self) -> CMFFNet:
        network = self.network.module if self.is_ddp else self.network
        return network._orig_mod if isinstance(network, OptimizedModule) else network

    @property
    def pairs(self) -> ModalityPairs:
        return _pairs(self.trainer_config["cmff"]["network"], self.num_modalities, "cmff.network")

    def _build_loss(self):
        """nnU-Net's region loss: deep supervision over every stage for S_A / S_B, over S_F's levels for S_F.

        The branch losses are built as on one process (no gathering of batch-Dice statistics across DDP ranks):
        they only count the samples whose pair is present, which differ between ranks, and a rank with none
        skips the loss, so a collective there would mismatch or hang.
        """
        fused_loss = super()._build_loss()
        is_ddp = self.is_ddp
        self.is_ddp = False  # nnU-Net's _build_loss reads it for the Dice term's 'ddp' setting
        try:
            self.branch_loss = super()._build_loss()
        finally:
            self.is_ddp = is_ddp
        if not self.enable_deep_supervision:
            return fused_loss
        levels = self._network_module().fusion.levels
        weights = np.array([1 / 2 ** i for i in range(levels)])
        return DeepSupervisionWrapper(fused_loss.loss, weights / weights.sum())

    def configure_optimizers(self):
        return self.sgd_or_adam(self.trainer_config["cmff"]["optimizer"], "cmff.optimizer")

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self._network_module().set_deep_supervision(enabled)

    def _branch_loss(self, outputs, target, present: torch.Tensor) -> torch.Tensor:
        """L_seg of one branch over the samples whose pair is present (0, graph-connected, if none is)."""
        if isinstance(outputs, (list, tuple)):
            if not bool(present.any()):
                return 0.0 * sum(o.sum() for o in outputs)
            if not bool(present.all()):
                outputs, target = [o[present] for o in outputs], [t[present] for t in target]
            return self.branch_loss(outputs, target)
        if not bool(present.any()):
            return 0.0 * outputs.sum()
        if not bool(present.all()):
            outputs, target = outputs[present], target[present]
        return self.branch_loss(outputs, target)

    def compute_losses(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
        """Eq. 7 for one batch (after modality dropout): the three L_seg terms and their sum ``total``."""
        dropped, available = self.drop_modalities(data)
        outputs = self.network(dropped, available, return_branches=True)  # through DDP / compile wrappers
        losses = {"seg_a": self._branch_loss(outputs["a"], target, outputs["present_a"]),
                  "seg_b": self._branch_loss(outputs["b"], target, outputs["present_b"]),
                  "seg_fused": self.loss(outputs["fused"], target)}
        losses["total"] = losses["seg_a"] + losses["seg_b"] + losses["seg_fused"]
        return losses

    # ---------------------------------------------------------------------------------------------- pretraining
    def pretrained_checkpoint(self) -> str | None:
        """The CMFT checkpoint this run starts from (``cmff.pretrained_checkpoint`` resolved), or None."""
        setting = self.trainer_config["cmff"]["pretrained_checkpoint"]
        if setting is None:
            return None
        if not isinstance(setting, str) or not setting:
            raise ValueError(f"cmff.pretrained_checkpoint must be \"auto\", a file path or null, got {setting!r}")
        if setting != "auto":
            return os.path.abspath(os.path.expanduser(setting))
        pretrainer = self.trainer_config["cmff"]["pretrainer"]
        folder = convert_trainer_plans_config_to_identifier(pretrainer, self.plans_manager.plans_name,
                                                            self.configuration_name)
        return join(dirname(self.output_folder_base), folder, f"fold_{self.fold}", "checkpoint_final.pth")

    def initialise_from_pretraining(self) -> None:
        """Copy the CMFT generators into S_A and S_B (all but their output layers), or log that none is used.

        Raises:
            FileNotFoundError: the checkpoint does not exist.
            ValueError: it is not a CMFT checkpoint, used other modality pairs, or its weights do not fit.
        """
        path = self.pretrained_checkpoint()
        if path is None:
            self.print_to_log_file("CMFF branches randomly initialised (cmff.pretrained_checkpoint is null: no "
                                   "cross-modality feature transition, the paper's 'Ours_random')")
            return
        if not isfile(path):
            how = (f"run 'nnUNetv2_train {self.plans_manager.dataset_name} {self.configuration_name} {self.fold} -tr "
                   f"{self.trainer_config['cmff']['pretrainer']}' first" if
                   self.trainer_config["cmff"]["pretrained_checkpoint"] == "auto" else "check the path")
            raise FileNotFoundError(f"{type(self).__name__} starts from a CMFT pretraining checkpoint, but {path} does "
                                    f"not exist: {how}, set cmff.pretrained_checkpoint to a CMFTPretrainer checkpoint "
                                    f"(e.g. in the file named by $nnUNet_missingmod_config), or train "
                                    f"CMFFTrainer_random (no pretraining)")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # any unreadable file gets the same message
            raise ValueError(f"{path} is not a readable PyTorch checkpoint: {error}") from None
        if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
            raise ValueError(f"{path} is not an nnU-Net checkpoint (no 'network_weights')")
        recorded = (checkpoint.get("missingmod_state") or {}).get(PAIRS_STATE_KEY)
        if recorded is None:
            raise ValueError(f"{path} was not written by a CMFT pretrainer (trainer "
                             f"{checkpoint.get('trainer_name', 'unknown')!r}, no recorded modality pairs)")
        if recorded != self.pairs.names():
            raise ValueError(f"{path} was pretrained on modality pairs {recorded}, but {type(self).__name__} uses "
                             f"{self.pairs.names()} (cmff.network.pairs)")
        copied = transfer_generator_weights(self._network_module(), checkpoint["network_weights"], path)
        self.print_to_log_file(f"S_A initialised from G_A->B and S_B from G_B->A of {path} ({len(copied)} tensors; "
                               "output layers and the fusion branch start random)")

    def on_train_start(self) -> None:
        if not self.was_initialized:
            self.initialize()
        if self.current_epoch == 0:  # a fresh run; a resumed one has its weights from its own checkpoint
            self.initialise_from_pretraining()
        super().on_train_start()


class CMFFTrainer_noMaskGuidance(CMFFTrainer):  # noqa: N801 (nnU-Net's variant naming)
    """Table 2 "Ours w/o MG": the fusion branch without the mask-guided attention block."""


class CMFFTrainer_channelAttention(CMFFTrainer):  # noqa: N801
    """Table 2 "Ours w CA": a conventional channel-attention block instead of the mask-guided one."""


class CMFFTrainer_random(CMFFTrainer):  # noqa: N801
    """Table 2 "Ours_random": no cross-modality feature transition, the CMFF network starts from random weights."""


VARIANTS = (CMFFTrainer_noMaskGuidance, CMFFTrainer_channelAttention, CMFFTrainer_random)
