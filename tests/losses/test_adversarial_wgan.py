"""WGAN-GP, modality classification and L1 terms of UTAD-Net (eq. 1-10) against naive computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_missingmod.losses.adversarial import (
    cycle_reconstruction_loss,
    distillation_loss,
    gradient_penalty,
    interpolate_real_fake,
    local_consistency_loss,
    modality_classification_loss,
    wgan_critic_loss,
    wgan_generator_loss,
)


def _critic() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 4, 2, 1), nn.LeakyReLU(0.01), nn.Conv2d(3, 1, 3, 1, 1))


def _naive_gradient_penalty(critic: nn.Module, real, fake, alpha) -> torch.Tensor:
    """One sample at a time: x_hat, the gradient of its summed patch scores, (||g||_2 - 1)^2, then the mean."""
    terms = []
    for b in range(real.shape[0]):
        x_hat = (alpha[b] * real[b:b + 1] + (1 - alpha[b]) * fake[b:b + 1]).detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
        norm = torch.sqrt((gradient ** 2).sum())  # over all of the sample's pixels
        terms.append((norm - 1) ** 2)
    return sum(terms) / len(terms)


def test_gradient_penalty_against_a_per_sample_loop():
    critic = _critic()
    real, fake = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
    alpha = torch.tensor([0.0, 0.3, 0.7, 1.0])
    got = gradient_penalty(critic, real, fake, alpha)
    expected = _naive_gradient_penalty(critic, real, fake, alpha)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # the penalty trains the critic (create_graph): same parameter gradients as the naive loop's
    # (the last bias does not change the input gradient, so it gets none)
    got_grads = torch.autograd.grad(got, list(critic.parameters()), allow_unused=True)
    expected_grads = torch.autograd.grad(expected, list(critic.parameters()), allow_unused=True)
    assert sum(g is not None for g in got_grads) == 3
    for a, b in zip(got_grads, expected_grads, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_gradient_penalty_of_a_linear_critic_is_analytic():
    weight = torch.randn(1, 1, 8, 8)

    def linear_critic(x):  # D(x) = <w, x> per sample: its gradient is w everywhere
        return (x * weight).flatten(1).sum(1)
    real, fake = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    expected = (math.sqrt(float((weight ** 2).sum())) - 1) ** 2
    assert float(gradient_penalty(linear_critic, real, fake)) == pytest.approx(expected, rel=1e-5)


def test_interpolation_lies_on_the_segment_with_one_alpha_per_sample():
    torch.manual_seed(3)
    real, fake = torch.ones(500, 1, 4, 4), torch.zeros(500, 1, 4, 4)
    x_hat = interpolate_real_fake(real, fake)
    alpha = x_hat.flatten(1)
    assert torch.equal(alpha, alpha[:, :1].expand_as(alpha))  # constant within a sample
    assert 0 <= float(alpha.min()) and float(alpha.max()) <= 1
    assert abs(float(alpha.mean()) - 0.5) < 0.05 and float(alpha.std()) > 0.25  # uniform-like, not fixed
    torch.testing.assert_close(interpolate_real_fake(real, 3 * fake + 2, torch.full((500,), 0.25)),
                               torch.full_like(real, 0.25 + 0.75 * 2))


def test_wasserstein_terms_against_python_sums():
    real, fake = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    mean = lambda t: sum(float(v) for v in t.flatten()) / t.numel()  # noqa: E731
    assert float(wgan_critic_loss(real, fake)) == pytest.approx(mean(fake) - mean(real), rel=1e-5, abs=1e-7)
    assert float(wgan_generator_loss(fake)) == pytest.approx(-mean(fake), rel=1e-5, abs=1e-7)


def test_modality_classification_against_log_softmax_by_hand():
    logits = torch.randn(5, 4)
    modality = torch.tensor([0, 3, 1, 1, 2])
    naive = 0.0
    for b in range(5):
        row = [float(v) for v in logits[b]]
        naive += -(row[int(modality[b])] - math.log(sum(math.exp(v) for v in row)))
    assert float(modality_classification_loss(logits, modality)) == pytest.approx(naive / 5, rel=1e-5)


def test_l1_terms_against_numpy():
    a, b, c, d = (torch.randn(2, 1, 6, 6) for _ in range(4))
    npy = [t.numpy() for t in (a, b, c, d)]
    assert float(local_consistency_loss(a, b, c, d)) == pytest.approx(
        np.abs(npy[0] - npy[1]).mean() + np.abs(npy[2] - npy[3]).mean(), rel=1e-5)
    assert float(cycle_reconstruction_loss(a, b)) == pytest.approx(np.abs(npy[0] - npy[1]).mean(), rel=1e-5)
    feature_t, feature_s = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3, requires_grad=True)
    feature, image = distillation_loss(feature_t, feature_s, c, d)
    assert feature.item() == pytest.approx((feature_t - feature_s).abs().mean().item(), rel=1e-6)
    assert float(image) == pytest.approx(np.abs(npy[2] - npy[3]).mean(), rel=1e-5)
    teacher = torch.randn(2, 8, 3, 3, requires_grad=True)
    distillation_loss(teacher, feature_s, c, d)[0].backward()
    assert teacher.grad is None and feature_s.grad is not None  # the teacher is never trained by L_dis
