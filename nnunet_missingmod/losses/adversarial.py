"""Adversarial and cycle losses of the package's GAN trainers, as plain functions on tensors.

Each function cites the equation it implements; tests compare them with naive references.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


# ---- WGAN-GP and classification terms (UTAD-Net, StarGAN-style) ----------------------------------------------
# UTAD-Net (Huang, Wei, Li), eq. 1-13, with WGAN-GP (Gulrajani et al. 2017) and StarGAN's classification terms.
# E[.] is a mean over every element (patch scores, pixels, samples), as in the authors' code (torch.mean).
def wgan_critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """The critic's adversarial part of eq. 11, ``-(E[D_src(real)] - E[D_src(fake)])`` (eq. 1/2 without the penalty).

    Args:
        real_scores: D_src of real images (any shape, e.g. (B, 1, h, w) patch scores).
        fake_scores: D_src of generated images.
    """
    return fake_scores.mean() - real_scores.mean()





def wgan_generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """The part of eq. 1/2 that depends on the generator, ``-E[D_src(G(x))]`` (the L_adv terms of eq. 12)."""
    return -fake_scores.mean()


def interpolate_real_fake(real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * real + (1 - alpha) * fake`` with one ``alpha ~ U[0, 1]`` per sample (WGAN-GP's x-hat).

    Args:
        real, fake: (B, ...) images.
        alpha: (B,) mixing weights (default: drawn uniformly).
    """
    if alpha is None:
        alpha = torch.rand(real.shape[0], device=real.device, dtype=real.dtype)
    alpha = alpha.to(real.dtype).view(-1, *([1] * (real.ndim - 1)))  # (B, 1, ...)
    return alpha * real + (1 - alpha) * fake


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     alpha: torch.Tensor | None = None) -> torch.Tensor:
    """``E[(||grad_x D_src(x_hat)||_2 - 1)^2]``, the penalty of eq. 1/2 (before the weight lambda_gp).

    x_hat lies on the line between a real and a generated image (:func:`interpolate_real_fake`). As in StarGAN and
    the authors' code, the gradient is that of the sum of the critic's patch scores of a sample, and its L2 norm is
    taken over all of that sample's pixels. The graph is kept (``create_graph``), so the penalty trains the critic.

    Args:
        critic: maps (B, ...) images to D_src scores (B, ...); samples must not interact (no batch norm).
        real, fake: (B, ...) images; both are detached.
        alpha: (B,) mixing weights (default: drawn uniformly).
    """
    x_hat = interpolate_real_fake(real.detach(), fake.detach(), alpha).requires_grad_(True)
    scores = critic(x_hat)
    (gradients,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    norms = torch.linalg.vector_norm(gradients.flatten(1), ord=2, dim=1)  # (B,)
    return ((norms - 1) ** 2).mean()


def modality_classification_loss(logits: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """``E[-log D_cls(m | x)]``: eq. 3/4 (real images, their modality) and eq. 5/6 (generated, the target modality).

    Args:
        logits: (B, M) modality logits D_cls.
        modality: (B,) modality indices.
    """
    return F.cross_entropy(logits, modality.long())


def l1_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``E[|a - b|]`` over all elements: the L1 of eq. 8, 9 and 10."""
    return (a - b).abs().mean()


def local_consistency_loss(tumour_target: torch.Tensor, masked_target: torch.Tensor, tumour_source: torch.Tensor,
                           reconstructed_tumour: torch.Tensor) -> torch.Tensor:
    """L_local (eq. 8) = ``E|T_target - T'_target| + E|T_source - T'_source|``.

    Args:
        tumour_target: T_target, the local branch's target tumour image.
        masked_target: T'_target, the generated whole image I_target times the tumour mask.
        tumour_source: T_source, the source image times the tumour mask.
        reconstructed_tumour: T'_source, the local branch's output of the cycle back to the source modality.
    """
    return l1_distance(tumour_target, masked_target) + l1_distance(tumour_source, reconstructed_tumour)


def cycle_reconstruction_loss(source: torch.Tensor, reconstructed: torch.Tensor) -> torch.Tensor:
    """L_rec (eq. 9) = ``E|I_source - I'_source|``, I'_source = G(I_target, s) (the cycle back)."""
    return l1_distance(source, reconstructed)


def distillation_loss(teacher_feature: torch.Tensor, student_feature: torch.Tensor, teacher_image: torch.Tensor,
                      student_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of L_dis (eq. 10), ``(E|F^teacher - F^student|, E|I^teacher_target - I^student_target|)``.

    L_dis is their sum; they are returned apart so that each can be logged. The teacher's tensors are detached.
    """
    return (l1_distance(teacher_feature.detach(), student_feature),
            l1_distance(teacher_image.detach(), student_image))

# ---- end of WGAN-GP section ---------------------------------------------------------------------------------

# ---- least-squares GAN and cycle terms (CMFT, Zhang et al. 2021, eq. 2-6) ----------------------------------
# Zhang, Huang, Zhang, Han, Han, Yu, "Cross-Modality Deep Feature Learning for Brain Tumor Segmentation", Pattern
# Recognition 2021, after CycleGAN (Zhu et al., ICCV 2017) with the least-squares GAN of Mao et al. (ICCV 2017).
# Deviations, as in CycleGAN's implementation: eq. 2-3 are written as one min-max objective (eq. 5); the
# discriminator minimises E[(D(real) - 1)^2] + E[D(fake)^2] (eq. 2 or 3 as written) and the generator minimises
# E[(D(G(x)) - 1)^2] (the least-squares generator loss) instead of maximising the discriminator's objective;
# ||.||_1 in eq. 4 is a mean over voxels and channels (CycleGAN's L1Loss), so lambda = 10 keeps CycleGAN's meaning.
# Every E[.] is a mean over the samples of a batch (each sample's patch map or voxels averaged first); an optional
# (B,) boolean ``sample_mask`` restricts it to some samples (those whose modalities are all acquired), and a
# batch without any such sample gives 0 (still connected to the graph, so backward passes work).


def _sample_mean(values: Tensor, sample_mask: Tensor | None) -> Tensor:
    """Mean over each sample's elements, then over the samples selected by ``sample_mask`` (all by default)."""
    per_sample = values.flatten(1).mean(1)  # (B,)
    if sample_mask is None:
        return per_sample.mean()
    if sample_mask.shape != per_sample.shape:
        raise ValueError(f"sample_mask must have shape {tuple(per_sample.shape)} (one entry per sample), "
                         f"got {tuple(sample_mask.shape)}")
    weights = sample_mask.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)


def lsgan_discriminator_loss(real_scores: Tensor, fake_scores: Tensor, sample_mask: Tensor | None = None) -> Tensor:
    """The discriminator's side of eq. 2 (D_B) or eq. 3 (D_A): E[(D(real) - 1)^2] + E[D(fake)^2].

    Args:
        real_scores: D's patch scores on real images, (B, 1, ...).
        fake_scores: D's patch scores on generated images (generator output detached), (B, 1, ...).
        sample_mask: optional (B,) booleans, the samples that count.
    """
    return _sample_mean((real_scores - 1).pow(2), sample_mask) + _sample_mean(fake_scores.pow(2), sample_mask)


def lsgan_generator_loss(fake_scores: Tensor, sample_mask: Tensor | None = None) -> Tensor:
    """The generator's adversarial term for eq. 2 or 3: E[(D(G(x)) - 1)^2] (generated images scored as real)."""
    return _sample_mean((fake_scores - 1).pow(2), sample_mask)


def cycle_consistency_loss(cycled_a: Tensor, real_a: Tensor, cycled_b: Tensor, real_b: Tensor,
                           sample_mask: Tensor | None = None) -> Tensor:
    """Eq. 4: E_A[|G_B→A(G_A→B(A)) - A|_1] + E_B[|G_A→B(G_B→A(B)) - B|_1], each |.|_1 a mean over voxels.

    Args:
        cycled_a, real_a: (B, |A|, ...) the reconstruction of pair A and pair A itself.
        cycled_b, real_b: (B, |B|, ...) likewise for pair B.
        sample_mask: optional (B,) booleans, the samples that count.
    """
    return _sample_mean((cycled_a - real_a).abs(), sample_mask) + _sample_mean((cycled_b - real_b).abs(), sample_mask)


# ---- end of least-squares section ---------------------------------------------------------------------------
