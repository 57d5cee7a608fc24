"""Modality dropout against the schemes' closed-form subset probabilities (computed here independently)."""

from itertools import combinations
from math import comb

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import nnunet_missingmod.trainers as trainers
from nnunet_missingmod.config import OVERRIDE_ENV, load_trainer_config
from nnunet_missingmod.transforms.modality_dropout import (
    ModalityDropoutTransform,
    drop_modalities_in_batch,
    sample_kept_modalities,
)

M = 4
SUBSETS = [frozenset(c) for k in range(1, M + 1) for c in combinations(range(M), k)]


def uniform_subset_probability(subset: frozenset) -> float:
    # U-HVED: k ~ U{1..M}, then a uniform subset of size k
    return 1 / M / comb(M, len(subset))


def independent_probability(subset: frozenset, drop: list[float]) -> float:
    weight = lambda s: np.prod([(1 - drop[c]) if c in s else drop[c] for c in range(M)])  # noqa: E731
    return weight(subset) / sum(weight(s) for s in SUBSETS)


def draw_counts(n: int, **kwargs) -> dict[frozenset, int]:
    rng = np.random.default_rng(1234)
    counts = {s: 0 for s in SUBSETS}
    for _ in range(n):
        keep = sample_kept_modalities(M, rng=rng, **kwargs)
        assert keep.any(), "an empty subset was drawn"
        counts[frozenset(np.flatnonzero(keep).tolist())] += 1
    return counts


def assert_matches(counts: dict, probabilities: dict, n: int):
    observed = np.array([counts[s] for s in SUBSETS])
    expected = np.array([probabilities[s] * n for s in SUBSETS])
    assert observed.sum() == n
    assert chisquare(observed, expected).pvalue > 1e-3, (observed, expected.round(1))


def test_uniform_subset_distribution():
    n = 30000
    assert_matches(draw_counts(n), {s: uniform_subset_probability(s) for s in SUBSETS}, n)


def test_independent_distribution_with_resampling():
    n, drop = 30000, [0.2, 0.5, 0.7, 0.4]
    assert_matches(draw_counts(n, scheme="independent", drop_probabilities=drop),
                   {s: independent_probability(s, drop) for s in SUBSETS}, n)


def test_keep_all_probability_mixes_in():
    n, p = 30000, 0.4
    full = frozenset(range(M))
    probabilities = {s: (1 - p) * uniform_subset_probability(s) + (p if s == full else 0) for s in SUBSETS}
    assert_matches(draw_counts(n, p_keep_all=p), probabilities, n)


def test_wrong_scheme_is_detected_by_the_test():
    # the chi-square check must be able to fail: independent p=0.5 is not the U-HVED distribution
    n = 30000
    counts = draw_counts(n, scheme="independent", drop_probabilities=[0.5] * M)
    observed = np.array([counts[s] for s in SUBSETS])
    expected = np.array([uniform_subset_probability(s) * n for s in SUBSETS])
    assert chisquare(observed, expected).pvalue < 1e-6


def test_transform_zeroes_dropped_channels_and_leaves_the_rest():
    rng = np.random.default_rng(0)
    transform = ModalityDropoutTransform(num_modalities=M, rng=rng)
    seen = set()
    for _ in range(200):
        image = torch.rand(M + 1, 6, 7, 8) + 0.5  # one extra channel (e.g. a cascade's one-hot seg)
        seg = torch.randint(0, 4, (1, 6, 7, 8))
        original, original_seg = image.clone(), seg.clone()
        out = transform(image=image, segmentation=seg)
        kept = [c for c in range(M) if torch.equal(out["image"][c], original[c])]
        dropped = [c for c in range(M) if c not in kept]
        assert kept, "every modality was dropped"
        for c in dropped:
            assert torch.count_nonzero(out["image"][c]) == 0
        assert torch.equal(out["image"][M], original[M]), "a non-modality channel was touched"
        assert torch.equal(out["segmentation"], original_seg), "labels changed"
        seen.add(tuple(kept))
    assert len(seen) == 15


def test_default_stream_is_numpy_not_torch():
    transform = ModalityDropoutTransform(num_modalities=M)
    image = torch.ones(M, 2, 2, 2)

    def pattern(np_seed: int, torch_seed: int) -> list:
        np.random.seed(np_seed)
        torch.manual_seed(torch_seed)
        return [tuple(transform.get_parameters(image=image)["keep"]) for _ in range(30)]

    assert pattern(0, 0) == pattern(0, 99)  # torch's stream plays no part
    assert pattern(0, 0) != pattern(1, 0)  # numpy's stream (reseeded per DA worker) does


@pytest.mark.parametrize("kwargs, message", [
    ({"scheme": "independent"}, "drop_probabilities: independent dropout needs 4"),
    ({"scheme": "independent", "drop_probabilities": [0.5, 1.0, 0.5, 0.5]}, r"must be in \[0, 1\)"),
    ({"scheme": "bogus"}, "unknown scheme 'bogus'"),
    ({"p_keep_all": 1.5}, r"p_keep_all must be in \[0, 1\]"),
])
def test_invalid_settings_are_rejected(kwargs, message):
    """A real error (not an assert, which ``python -O`` removes) naming the config key."""
    with pytest.raises(ValueError, match=message):
        ModalityDropoutTransform(num_modalities=M, **kwargs)


@pytest.mark.parametrize("trainer_name, p_keep_all", [("ModalityDropoutTrainer", 0.25), ("D2NetTrainer", 0.25),
                                                      ("SharedLatentTrainer", 0.0)])
def test_shipped_dropout_of_each_trainer_draws_the_documented_mixture(trainer_name, p_keep_all, monkeypatch):
    # the trainer's shipped section, drawn as its train_step draws it (drop_modalities_in_batch), against the
    # closed-form U-HVED mixture with the p_keep_all that docs/RESULTS.md decided for it
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    settings = load_trainer_config(getattr(trainers, trainer_name))["modality_dropout"]
    n, full = 20000, frozenset(range(M))
    np.random.seed(4321)
    _, available = drop_modalities_in_batch(torch.ones(n, M, 2), settings)
    counts = {s: 0 for s in SUBSETS}
    for row in available.numpy():
        counts[frozenset(np.flatnonzero(row).tolist())] += 1
    probabilities = {s: (1 - p_keep_all) * uniform_subset_probability(s) + (p_keep_all if s == full else 0)
                     for s in SUBSETS}
    assert_matches(counts, probabilities, n)
