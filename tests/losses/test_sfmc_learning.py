"""L_SFMC can only be lowered by reading the images: a shared modality encoder trained on phantoms.

With one encoder for every modality (D²-Net's E_M, as in the authors' code), codes that ignore the
image are the same for every modality and score ``log(1 + n)`` per anchor. After training on phantom
patches with the trainers' modality dropout, the loss on patches of *other* phantoms must fall clearly
below that value, which is only possible when the codes depend on what each modality's image shows.
The uninformative value is counted here from the number of negatives, independently of the loss code.
"""

import math

import numpy as np
import torch

from nnunet_missingmod.data.phantom import PhantomConfig, generate_case
from nnunet_missingmod.losses.contrastive import modality_contrastive_loss, sfmc_loss, slice_offsets
from nnunet_missingmod.networks.d2net import ModalityCodeEncoder
from nnunet_missingmod.transforms.modality_dropout import sample_kept_modalities

PATCH = (32, 48, 48)


def phantom_volumes(count: int, seed: int) -> list[np.ndarray]:
    """(4, X, Y, Z) float32 phantoms, each modality z-scored inside the brain (nnU-Net's normalisation)."""
    volumes = []
    for index in range(count):
        images = generate_case(seed, index, PhantomConfig(spacing=3.0)).images.astype(np.float32)
        brain = images.sum(0) > 0
        for channel in images:
            channel[brain] = (channel[brain] - channel[brain].mean()) / channel[brain].std()
        volumes.append(images)
    return volumes


def patches(volumes, batch: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images, kept = [], []
    for _ in range(batch):
        volume = volumes[rng.integers(len(volumes))]
        corner = [rng.integers(0, s - p + 1) for s, p in zip(volume.shape[1:], PATCH, strict=True)]
        crop = volume[:, corner[0]:corner[0] + PATCH[0], corner[1]:corner[1] + PATCH[1], corner[2]:corner[2] + PATCH[2]]
        keep = sample_kept_modalities(4, rng=rng)  # the trainers' default U-HVED dropout
        images.append(crop * keep[:, None, None, None])
        kept.append(keep)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(kept))


def uninformative_by_counting(available: torch.Tensor, slices: int, window: int) -> float:
    """Mean over anchors of log(1 + number of negatives): other available modalities in the clipped window."""
    values = []
    for row in available.tolist():
        for present in row:
            if present:
                for g in range(slices):
                    values.append(math.log(1 + (sum(row) - 1) * (min(slices, g + window + 1) - max(0, g - window))))
    return sum(values) / len(values)


def test_shared_modality_encoder_learns_the_contrastive_terms_from_the_images():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    volumes = phantom_volumes(8, seed=5)
    train, held_out = volumes[:6], volumes[6:]
    encoder = ModalityCodeEncoder(4, [8, 16], 8, shared=True)
    optimiser = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    for _ in range(1000):
        x, available = patches(train, 2, rng)
        loss = sfmc_loss(encoder(x), available, temperature=0.07)["total"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    distance, window = slice_offsets(PATCH[0])
    ratios = {"spatial": [], "frequency": []}
    with torch.no_grad():
        for _ in range(6):
            x, available = patches(held_out, 4, rng)
            reference = uninformative_by_counting(available, PATCH[0], window)
            terms = sfmc_loss(encoder(x), available, temperature=0.07)
            for name in ratios:
                ratios[name].append(terms[name].item() / reference)
            # and the codes differ between two images of the same modality (they read the input)
            codes = encoder(x)
            assert (codes[0] - codes[1]).abs().max() > 1e-3
    assert np.mean(ratios["spatial"]) < 0.7, ratios
    assert np.mean(ratios["frequency"]) < 0.85, ratios
    # the reference is what equal codes score (the check can fail: the loss of equal codes is exactly 1 x it)
    equal = torch.ones(4, 4, PATCH[0], 8)
    equal_loss = modality_contrastive_loss(equal, available, positive_distance=distance, negative_window=window,
                                           temperature=0.07)
    assert equal_loss.item() / uninformative_by_counting(available, PATCH[0], window) > 0.999
