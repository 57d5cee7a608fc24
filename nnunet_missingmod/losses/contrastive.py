"""Spatial-frequency joint modality contrastive loss (L_SFMC) of D²-Net.

Yang et al., "D²-Net: Dual Disentanglement Network for Brain Tumor Segmentation With Missing
Modalities", IEEE TMI 2022, eq. 1-5. The codes are one N-dimensional vector per modality and slice,
``codes`` (B, M, G, N). For an anchor (modality m, slice g):

* positive: the same modality at slice g + Δ (g - Δ where g + Δ is outside the patch);
* negatives: every other modality at the slices within ±k of g, the anchor's own slice included
  (eq. 1 and 4 contrast the anchor with the other modalities at its own slice u; Sec. IV-D adds
  the 8 neighbouring slices on each side, so 3 × (2·8 + 1) = 51 negatives for the paper's volumes);
* loss: ``-log(exp(s(a, p) / τ) / (exp(s(a, p) / τ) + Σ_n exp(s(a, n) / τ)))`` with cosine similarity s
  (eq. 1), averaged over the anchors.

The frequency term (eq. 2-4) is the same loss on the amplitude of the discrete Fourier transform of
each code along its N entries; L_SFMC (eq. 5) is the weighted sum of the two.

The codes should come from one encoder shared by all modalities (as in the authors' release), so
that the only way to tell the modalities apart is to read the images: with a separate encoder per
modality a constant code per modality, independent of the image, is already an optimum of both
terms. For codes that carry no information (every code equal) each anchor scores ``log(1 + n)``
with n its number of negatives; :func:`uninformative_code_loss` gives that reference value for a
batch, and a trained encoder should fall clearly below it.

Deviations and choices:

* Δ and k scale with the patch: ``Δ = round(0.375 G)`` and ``k = round(0.0625 G)`` (48 and 8 of the
  paper's 128 slices), at least 1 each;
* modalities missing from a sample (dropped or absent) are excluded as anchors, positives and
  negatives; an anchor without any negative contributes exactly 0 (so a sample with a single
  modality gives a finite loss), and a batch without any anchor gives 0;
* the amplitude is ``sqrt(re² + im² + ε) - sqrt(ε)`` so that its gradient stays finite at zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The paper's 48 (positive distance) and 8 (negative window) slices of a 128-slice volume.
PAPER_POSITIVE_FRACTION = 48 / 128
PAPER_NEGATIVE_FRACTION = 8 / 128


def slice_offsets(num_slices: int, *, positive_fraction: float = PAPER_POSITIVE_FRACTION,
                  negative_fraction: float = PAPER_NEGATIVE_FRACTION) -> tuple[int, int]:
    """Positive distance Δ and negative half-window k for ``num_slices`` slices (both at least 1)."""
    return max(1, round(positive_fraction * num_slices)), max(1, round(negative_fraction * num_slices))


def positive_slices(num_slices: int, distance: int, device: torch.device | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each slice's positive (g + Δ, else g - Δ) and whether it exists."""
    index = torch.arange(num_slices, device=device)
    forward = index + distance
    positive = torch.where(forward < num_slices, forward, index - distance)
    valid = (positive >= 0) & (positive < num_slices)
    return positive.clamp(0, num_slices - 1), valid


def modality_contrastive_loss(codes: torch.Tensor, available: torch.Tensor, *, positive_distance: int,
                              negative_window: int, temperature: float) -> torch.Tensor:
    """Eq. 1 averaged over all valid anchors.

    Args:
        codes: (B, M, G, N) one code per modality and slice.
        available: (B, M) boolean; missing modalities are neither anchors, positives nor negatives.
        positive_distance: Δ in slices.
        negative_window: k in slices (negatives at offsets 0..k on both sides, other modalities only).
        temperature: τ.
    """
    _, modalities, slices, _ = codes.shape
    unit = F.normalize(codes.float(), dim=-1)
    similarity = torch.einsum("bmgn,bkjn->bmgkj", unit, unit) / temperature  # (B, M, G, M, G)
    positive, has_positive = positive_slices(slices, positive_distance, codes.device)
    positive_similarity = (unit * unit[:, :, positive]).sum(-1) / temperature  # (B, M, G)

    offset = torch.arange(slices, device=codes.device)
    distance = (offset[None, :] - offset[:, None]).abs()  # (G, G)
    near = distance <= negative_window  # the anchor's own slice included (eq. 1)
    modality = torch.arange(modalities, device=codes.device)
    other = modality[:, None] != modality[None, :]  # (M, M)
    negative = other[:, None, :, None] & near[None, :, None, :]  # (M, G, M, G)
    negative = negative[None] & available[:, None, None, :, None]  # (B, M, G, M, G)
    negative_logits = similarity.masked_fill(~negative, float("-inf")).flatten(3)  # (B, M, G, M * G)
    logits = torch.cat([positive_similarity.unsqueeze(-1), negative_logits], -1)
    per_anchor = torch.logsumexp(logits, -1) - positive_similarity  # (B, M, G)

    anchors = available[:, :, None] & has_positive[None, None, :]
    if not anchors.any():
        return codes.sum() * 0.0
    return per_anchor[anchors].mean()


def amplitude_spectrum(codes: torch.Tensor) -> torch.Tensor:
    """|DFT| of each code along its last axis (N values; differentiable at zero)."""
    spectrum = torch.fft.fft(codes.float(), dim=-1)
    eps = 1e-12  # sqrt(|z|² + eps) - sqrt(eps): exactly 0 at z = 0, with a finite gradient there
    return torch.sqrt(spectrum.real ** 2 + spectrum.imag ** 2 + eps) - eps ** 0.5


def uninformative_code_loss(available: torch.Tensor, num_slices: int, *, positive_distance: int,
                            negative_window: int) -> torch.Tensor:
    """Eq. 1 for codes that ignore the image (all codes equal): the mean over anchors of ``log(1 + n)``.

    This is what a modality encoder shared by all modalities scores when it does not read its input
    (its code is then the same for every modality); it does not depend on τ.

    Args:
        available: (B, M) boolean availability, as passed to :func:`modality_contrastive_loss`.
        num_slices: G.
        positive_distance, negative_window: Δ and k.
    """
    index = torch.arange(num_slices, device=available.device)
    in_window = (index + negative_window + 1).clamp(max=num_slices) - (index - negative_window).clamp(min=0)  # (G,)
    _, has_positive = positive_slices(num_slices, positive_distance, available.device)
    others = (available.sum(1, keepdim=True) - 1).clamp(min=0)  # (B, 1): other available modalities
    per_anchor = torch.log1p((others[:, :, None] * in_window).float()).expand(-1, available.shape[1], -1)
    anchors = available[:, :, None] & has_positive[None, None, :]  # (B, M, G)
    return per_anchor[anchors].mean() if anchors.any() else per_anchor.sum() * 0.0


def sfmc_loss(codes: torch.Tensor, available: torch.Tensor, *, temperature: float = 0.07,
              spatial_weight: float = 1.0, frequency_weight: float = 1.0,
              positive_fraction: float = PAPER_POSITIVE_FRACTION,
              negative_fraction: float = PAPER_NEGATIVE_FRACTION) -> dict[str, torch.Tensor]:
    """L_SFMC (eq. 5) and its spatial (eq. 1) and frequency (eq. 4) terms.

    Returns:
        ``{"spatial": ..., "frequency": ..., "total": spatial_weight * spatial + frequency_weight * frequency}``;
        a term whose weight is 0 is not computed (reported as 0).
    """
    distance, window = slice_offsets(codes.shape[2], positive_fraction=positive_fraction,
                                     negative_fraction=negative_fraction)
    zero = codes.sum() * 0.0
    spatial = modality_contrastive_loss(codes, available, positive_distance=distance, negative_window=window,
                                        temperature=temperature) if spatial_weight else zero
    frequency = modality_contrastive_loss(amplitude_spectrum(codes), available, positive_distance=distance,
                                          negative_window=window, temperature=temperature) \
        if frequency_weight else zero
    return {"spatial": spatial, "frequency": frequency,
            "total": spatial_weight * spatial + frequency_weight * frequency}
