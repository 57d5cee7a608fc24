"""Least-squares adversarial terms (eq. 2-3) and the cycle-consistency term (eq. 4) against hand-written loops."""

import pytest
import torch

from nnunet_missingmod.losses.adversarial import (
    cycle_consistency_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
)


def _mean_over_samples(per_sample: list[float], mask: list[bool] | None) -> float:
    chosen = [value for value, keep in zip(per_sample, mask or [True] * len(per_sample), strict=True) if keep]
    return sum(chosen) / len(chosen) if chosen else 0.0


def _naive_patch_mean(scores: torch.Tensor, function) -> list[float]:
    """Per sample, the mean of function(score) over its patch map, by explicit loops."""
    values = []
    for sample in scores:
        flat = sample.flatten().tolist()
        values.append(sum(function(s) for s in flat) / len(flat))
    return values


@pytest.mark.parametrize("mask", [None, [True, False, True], [False, False, True]])
def test_discriminator_loss_is_equation_2(mask):
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(3, 1, 2, 3, 2, generator=generator), torch.randn(3, 1, 2, 3, 2, generator=generator)
    expected = _mean_over_samples(_naive_patch_mean(real, lambda s: (s - 1) ** 2), mask) + \
        _mean_over_samples(_naive_patch_mean(fake, lambda s: s ** 2), mask)
    got = lsgan_discriminator_loss(real, fake, None if mask is None else torch.tensor(mask))
    assert float(got) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mask", [None, [False, True, True]])
def test_generator_loss_scores_the_fakes_as_real(mask):
    fake = torch.randn(3, 1, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    expected = _mean_over_samples(_naive_patch_mean(fake, lambda s: (s - 1) ** 2), mask)
    got = lsgan_generator_loss(fake, None if mask is None else torch.tensor(mask))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(lsgan_generator_loss(torch.ones(2, 1, 2, 2, 2))) == 0.0  # perfect fakes cost nothing
    assert float(lsgan_discriminator_loss(torch.ones(2, 1, 2, 2, 2), torch.zeros(2, 1, 2, 2, 2))) == 0.0


@pytest.mark.parametrize("mask", [None, [True, False]])
def test_cycle_loss_is_equation_4(mask):
    generator = torch.Generator().manual_seed(2)
    cycled_a, real_a, cycled_b, real_b = (torch.randn(2, 2, 3, 4, 2, generator=generator) for _ in range(4))
    expected = 0.0
    for cycled, real in ((cycled_a, real_a), (cycled_b, real_b)):
        per_sample = []
        for b in range(2):
            differences = [abs(c - r) for c, r in zip(cycled[b].flatten().tolist(), real[b].flatten().tolist(),
                                                      strict=True)]
            per_sample.append(sum(differences) / len(differences))  # ||.||_1 as a mean over voxels and channels
        expected += _mean_over_samples(per_sample, mask)
    got = cycle_consistency_loss(cycled_a, real_a, cycled_b, real_b, None if mask is None else torch.tensor(mask))
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_a_batch_without_counted_samples_gives_zero_and_zero_gradients():
    fake = torch.randn(2, 1, 2, 2, 2, requires_grad=True)
    loss = lsgan_generator_loss(fake, torch.tensor([False, False]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(fake.grad) == 0
    fake.grad = None
    lsgan_generator_loss(fake, torch.tensor([True, False])).backward()
    assert torch.count_nonzero(fake.grad[1]) == 0 and torch.count_nonzero(fake.grad[0]) == 8
    # the gradient pushes each generated score towards 1: d/ds mean((s - 1)^2) = 2 (s - 1) / 8
    torch.testing.assert_close(fake.grad[0], 2 * (fake.detach()[0] - 1) / 8)


def test_a_mask_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"sample_mask must have shape \(2,\)"):
        lsgan_generator_loss(torch.zeros(2, 1, 2, 2, 2), torch.tensor([True, True, False]))
