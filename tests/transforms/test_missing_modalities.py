"""Recording availability before augmentation and re-zeroing missing channels after it."""

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

from nnunet_missingmod.transforms import (
    AVAILABILITY_KEY,
    ModalityDropoutTransform,
    RecordAvailabilityTransform,
    ZeroMissingModalitiesTransform,
    acquired_modalities,
)

M = 4


def noisy_pipeline(*, fixed: bool) -> ComposeTransforms:
    noise = GaussianNoiseTransform(noise_variance=(0.1, 0.1), p_per_channel=1, synchronize_channels=True)
    if not fixed:
        return ComposeTransforms([noise])
    return ComposeTransforms([RecordAvailabilityTransform(num_modalities=M), noise,
                              ZeroMissingModalitiesTransform(num_modalities=M)])


def sample(missing: list[int], extra_channels: int = 0) -> dict:
    image = torch.rand(M + extra_channels, 6, 7, 8) + 0.5
    image[missing] = 0
    return {"image": image, "segmentation": torch.randint(0, 4, (1, 6, 7, 8))}


@pytest.mark.parametrize("missing", [[], [1], [0, 3], [0, 1, 2, 3]])
def test_missing_channels_end_exactly_zero_and_the_rest_keep_their_augmentation(missing):
    inputs = sample(missing)
    segmentation = inputs["segmentation"].clone()
    torch.manual_seed(0)
    np.random.seed(0)
    out = noisy_pipeline(fixed=True)(**{k: v.clone() for k, v in inputs.items()})
    torch.manual_seed(0)
    np.random.seed(0)
    unfixed = noisy_pipeline(fixed=False)(**{k: v.clone() for k, v in inputs.items()})
    for c in range(M):
        if c in missing:
            assert torch.count_nonzero(out["image"][c]) == 0
            assert torch.count_nonzero(unfixed["image"][c]) > 0  # noise alone would make it "present"
        else:
            assert torch.equal(out["image"][c], unfixed["image"][c])  # untouched by the re-zeroing
    assert torch.equal(out["segmentation"], segmentation)
    assert out[AVAILABILITY_KEY].tolist() == [c not in missing for c in range(M)]


def test_channels_after_the_modalities_are_not_modalities():
    inputs = sample([2], extra_channels=2)
    inputs["image"][M:] = 0  # e.g. a cascade's empty one-hot channels: not recorded, never zeroed by the pair
    record = RecordAvailabilityTransform(num_modalities=M)(**inputs)
    assert record[AVAILABILITY_KEY].shape == (M,)
    record["image"][M:] = 1
    out = ZeroMissingModalitiesTransform(num_modalities=M)(**record)
    assert torch.equal(out["image"][M:], torch.ones(2, 6, 7, 8))


def test_acquired_modalities_for_samples_and_batches():
    batch = torch.rand(3, M, 4, 4, 4) + 0.1
    batch[0, 1] = 0
    batch[2] = 0
    batch[1, 3, 0, 0, 0] = 0  # one zero voxel does not make a channel missing
    expected = torch.tensor([[True, False, True, True], [True] * M, [False] * M])
    assert torch.equal(acquired_modalities(batch, batched=True), expected)
    assert torch.equal(acquired_modalities(batch[0]), expected[0])
    assert torch.equal(acquired_modalities(batch, 2, batched=True), expected[:, :2])


def test_zeroing_without_recording_is_an_error():
    with pytest.raises(KeyError, match="RecordAvailabilityTransform"):
        ZeroMissingModalitiesTransform(num_modalities=M)(**sample([]))


def test_dropout_after_recording_never_keeps_only_missing_channels():
    rng = np.random.default_rng(0)
    transform = ModalityDropoutTransform(num_modalities=M, rng=rng)
    kept_sets = set()
    for _ in range(300):
        inputs = RecordAvailabilityTransform(num_modalities=M)(**sample([0, 2]))
        out = transform(**inputs)
        kept = tuple(c for c in range(M) if torch.count_nonzero(out["image"][c]) > 0)
        assert kept and set(kept) <= {1, 3}
        kept_sets.add(kept)
    assert kept_sets == {(1,), (3,), (1, 3)}
