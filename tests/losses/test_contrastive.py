"""L_SFMC against a naive loop over anchors written straight from eq. 1-4 of the D²-Net paper."""

import cmath
import math

import pytest
import torch

from nnunet_missingmod.losses.contrastive import (
    amplitude_spectrum,
    modality_contrastive_loss,
    sfmc_loss,
    slice_offsets,
    uninformative_code_loss,
)


def naive_contrastive(codes, available, distance, window, temperature, same_slice=True):
    """Loop over (b, m, g): -log(e^{s+/τ} / (e^{s+/τ} + Σ_n e^{s_n/τ})), cosine similarity, mean over anchors.

    Negatives: the other available modalities at slices g - window .. g + window (g itself included, eq. 1).
    """
    batch, modalities, slices, _ = codes.shape
    vectors = codes.tolist()

    def cosine(u, v):
        dot = sum(a * b for a, b in zip(u, v, strict=True))
        return dot / (max(math.sqrt(sum(a * a for a in u)), 1e-12) * max(math.sqrt(sum(b * b for b in v)), 1e-12))

    losses = []
    for b in range(batch):
        for m in range(modalities):
            if not available[b][m]:
                continue
            for g in range(slices):
                p = g + distance if g + distance < slices else g - distance
                if not 0 <= p < slices:
                    continue
                positive = math.exp(cosine(vectors[b][m][g], vectors[b][m][p]) / temperature)
                negatives = 0.0
                for other in range(modalities):
                    if other == m or not available[b][other]:
                        continue
                    for j in range(max(0, g - window), min(slices, g + window + 1)):
                        if same_slice or j != g:
                            negatives += math.exp(cosine(vectors[b][m][g], vectors[b][other][j]) / temperature)
                losses.append(-math.log(positive / (positive + negatives)))
    return sum(losses) / len(losses) if losses else 0.0


def naive_amplitude(codes):
    """|Σ_k x_k e^{-2πi jk/N}| for every code, by the definition of the DFT."""
    *lead, length = codes.shape
    flat = codes.reshape(-1, length).tolist()
    out = [[abs(sum(x * cmath.exp(-2j * math.pi * j * k / length) for k, x in enumerate(row)))
            for j in range(length)] for row in flat]
    return torch.tensor(out, dtype=torch.float64).reshape(*lead, length)


@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_spatial_term_matches_naive_loop_with_dropped_modalities(temperature):
    torch.manual_seed(0)
    codes = torch.randn(3, 4, 12, 8, dtype=torch.float64)
    available = torch.tensor([[True, True, True, True], [True, False, True, False], [False, False, True, False]])
    ours = modality_contrastive_loss(codes, available, positive_distance=4, negative_window=2, temperature=temperature)
    expected = naive_contrastive(codes, available.tolist(), 4, 2, temperature)
    assert ours.item() == pytest.approx(expected, rel=1e-6)
    # the check can fail: counting the dropped modalities as negatives changes the value, and so does
    # leaving out the other modalities at the anchor's own slice
    everything = naive_contrastive(codes, [[True] * 4] * 3, 4, 2, temperature)
    assert abs(everything - expected) > 1e-3
    without_own_slice = naive_contrastive(codes, available.tolist(), 4, 2, temperature, same_slice=False)
    assert abs(without_own_slice - expected) > 1e-3


def test_uninformative_codes_score_log_one_plus_negatives():
    available = torch.tensor([[True, True, True, True], [True, False, True, False], [False, False, True, False]])
    slices, distance, window = 12, 4, 2
    expected = []  # count each anchor's negatives by hand: other available modalities in the window, clipped
    for row in available.tolist():
        for present in row:
            if not present:
                continue
            others = sum(row) - 1
            for g in range(slices):
                in_window = min(slices, g + window + 1) - max(0, g - window)
                expected.append(math.log(1 + others * in_window))
    reference = uninformative_code_loss(available, slices, positive_distance=distance, negative_window=window)
    assert reference.item() == pytest.approx(sum(expected) / len(expected), rel=1e-6)
    # any τ gives the same value for equal codes
    equal = torch.full((3, 4, slices, 8), 0.3)
    for temperature in (0.07, 1.0):
        loss = modality_contrastive_loss(equal, available, positive_distance=distance, negative_window=window,
                                         temperature=temperature)
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_dropped_modality_codes_do_not_matter():
    torch.manual_seed(1)
    codes = torch.randn(2, 4, 10, 8)
    available = torch.tensor([[True, False, True, True], [True, True, False, True]])
    changed = codes.clone()
    changed[0, 1] = torch.randn(10, 8) * 50
    changed[1, 2] = 7.0
    kwargs = {"positive_distance": 3, "negative_window": 2, "temperature": 0.5}
    assert torch.allclose(modality_contrastive_loss(codes, available, **kwargs),
                          modality_contrastive_loss(changed, available, **kwargs))


def test_single_modality_is_finite_and_zero():
    codes = torch.randn(2, 4, 16, 8, requires_grad=True)
    available = torch.tensor([[False, False, True, False], [True, False, False, False]])
    losses = sfmc_loss(codes, available)
    assert losses["spatial"].item() == 0.0 and losses["frequency"].item() == 0.0
    losses["total"].backward()
    assert torch.isfinite(codes.grad).all()


def test_frequency_term_is_the_loss_on_the_dft_amplitude():
    torch.manual_seed(2)
    codes = torch.randn(2, 4, 16, 8, dtype=torch.float64)
    codes[0, 0, 3] = 0  # a zero code: amplitude must stay differentiable
    amplitude = naive_amplitude(codes)
    assert torch.allclose(amplitude_spectrum(codes).double(), amplitude, atol=1e-5)
    available = torch.tensor([[True, True, False, True], [True, True, True, True]])
    distance, window = slice_offsets(16)
    losses = sfmc_loss(codes, available, temperature=0.5, spatial_weight=0.3, frequency_weight=2.0)
    spatial = naive_contrastive(codes, available.tolist(), distance, window, 0.5)
    frequency = naive_contrastive(amplitude, available.tolist(), distance, window, 0.5)
    assert losses["spatial"].item() == pytest.approx(spatial, rel=1e-5)
    assert losses["frequency"].item() == pytest.approx(frequency, rel=1e-4)
    assert losses["total"].item() == pytest.approx(0.3 * spatial + 2.0 * frequency, rel=1e-4)
    trainable = codes.clone().requires_grad_()
    sfmc_loss(trainable, available)["total"].backward()
    assert torch.isfinite(trainable.grad).all()


def test_slice_offsets_scale_the_papers_values():
    assert slice_offsets(128) == (48, 8)  # the paper's Δ = 48 and ±8 slices
    assert slice_offsets(32) == (12, 2)
    assert slice_offsets(4) == (2, 1)
