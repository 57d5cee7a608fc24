"""The ``fixed`` modality-dropout scheme: every sample keeps exactly the configured subset (dedicated models)."""

import json

import numpy as np
import pytest
import torch

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.config import OVERRIDE_ENV, load_trainer_config
from nnunet_missingmod.trainers import ModalityDropoutTrainer
from nnunet_missingmod.transforms.missing_modalities import AVAILABILITY_KEY
from nnunet_missingmod.transforms.modality_dropout import (
    ModalityDropoutTransform,
    drop_modalities_in_batch,
    fixed_keep_mask,
    sample_kept_modalities,
    transform_from_settings,
)

M = mods.NUM_MODALITIES
COMBINATIONS = mods.all_combinations()


def _kept_channels(image: torch.Tensor) -> tuple[int, ...]:
    return tuple(c for c in range(M) if torch.count_nonzero(image[c]) > 0)


@pytest.mark.parametrize("combination", COMBINATIONS, ids=mods.combination_name)
def test_transform_keeps_exactly_the_subset_for_every_sample(combination):
    names = [mods.MODALITIES[c] for c in combination]
    transform = ModalityDropoutTransform(num_modalities=M, scheme="fixed", keep=names)
    for _ in range(20):
        image = torch.rand(M + 1, 4, 5, 6) + 0.5  # an extra non-modality channel (e.g. a cascade's one-hot seg)
        original = image.clone()
        out = transform(image=image)["image"]
        assert _kept_channels(out) == combination
        for c in combination:
            assert torch.equal(out[c], original[c]), "a kept channel was changed"
        assert torch.equal(out[M], original[M]), "a non-modality channel was touched"


@pytest.mark.parametrize("combination", COMBINATIONS, ids=mods.combination_name)
def test_batch_keeps_exactly_the_subset_for_every_sample(combination):
    settings = {"scheme": "fixed", "keep": [mods.MODALITIES[c] for c in combination], "p_keep_all": 0.0,
                "drop_probabilities": [0.5] * M}
    data = torch.rand(6, M, 3, 3, 3) + 0.5
    dropped, available = drop_modalities_in_batch(data, settings)
    expected = torch.from_numpy(mods.availability_mask(combination)).expand(6, M)
    assert torch.equal(available, expected)
    for sample in dropped:
        assert _kept_channels(sample) == combination


def test_names_aliases_and_indices_are_equivalent():
    by_name = fixed_keep_mask(["t1ce", "flair"], M)
    assert by_name.tolist() == [False, True, False, True]
    assert fixed_keep_mask(["T1c", "t2f"], M).tolist() == by_name.tolist()  # BraTS 2023 aliases
    assert fixed_keep_mask([3, 1], M).tolist() == by_name.tolist()
    assert fixed_keep_mask([np.int64(1), "FLAIR"], M).tolist() == by_name.tolist()


def test_fixed_draws_nothing_at_random():
    state = np.random.get_state()
    keep = sample_kept_modalities(M, scheme="fixed", keep=["t2"])
    assert keep.tolist() == [False, False, True, False]
    assert np.array_equal(np.random.get_state()[1], state[1]), "the fixed scheme consumed random numbers"


def test_acquired_modalities_are_intersected_as_for_the_other_schemes():
    transform = ModalityDropoutTransform(num_modalities=M, scheme="fixed", keep=["t1ce", "flair"])
    # the sample lacks FLAIR: only T1ce stays
    acquired = torch.tensor([True, True, True, False])
    assert transform.get_parameters(image=torch.ones(M, 2, 2, 2), **{AVAILABILITY_KEY: acquired})["keep"].tolist() \
        == [False, True, False, False]
    # the sample has none of the kept modalities: it keeps what it has (never an all-zero input)
    acquired = torch.tensor([True, False, True, False])
    assert transform.get_parameters(image=torch.ones(M, 2, 2, 2), **{AVAILABILITY_KEY: acquired})["keep"].tolist() \
        == [True, False, True, False]
    # the stored mask is not modified between samples
    assert transform.keep.tolist() == [False, True, False, True]

    settings = {"scheme": "fixed", "keep": ["t1ce", "flair"], "p_keep_all": 0.0}
    data = torch.rand(2, M, 3, 3, 3) + 0.5
    data[0, 3] = 0  # sample 0 lacks FLAIR
    data[1, 1] = data[1, 3] = 0  # sample 1 lacks both kept modalities
    _, available = drop_modalities_in_batch(data, settings)
    assert available.tolist() == [[False, True, False, False], [True, False, True, False]]


@pytest.mark.parametrize(("keep", "message"), [
    (None, "modality_dropout.keep must be a non-empty list"),
    ([], "modality_dropout.keep must be a non-empty list"),
    ("t1ce", "modality_dropout.keep must be a non-empty list"),
    (["t1ce", "dwi"], "modality_dropout.keep: unknown modality 'dwi'"),
    ([1, 4], "modality_dropout.keep: 4 is channel 4, but the data has 4 modality channels"),
    ([-1], "modality_dropout.keep: -1 is channel -1"),
    ([True], "modality_dropout.keep: entries must be modality names or channel indices"),
    ([1.0], "modality_dropout.keep: entries must be modality names or channel indices"),
    (["t1ce", "T1c"], "modality_dropout.keep: a modality is named twice"),
])
def test_bad_keep_lists_name_the_config_key(keep, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModalityDropoutTransform(num_modalities=M, scheme="fixed", keep=keep)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        drop_modalities_in_batch(torch.ones(1, M, 2, 2, 2), {"scheme": "fixed", "keep": keep, "p_keep_all": 0.0})


def test_keep_all_probability_is_refused_with_fixed():
    with pytest.raises(ValueError, match="modality_dropout.p_keep_all must be 0 with scheme 'fixed'"):
        ModalityDropoutTransform(num_modalities=M, scheme="fixed", keep=["t1"], p_keep_all=0.2)
    with pytest.raises(ValueError, match="modality_dropout.p_keep_all must be 0"):
        drop_modalities_in_batch(torch.ones(1, M, 2, 2, 2), {"scheme": "fixed", "keep": ["t1"], "p_keep_all": 0.2})


def test_override_file_selects_the_subset(tmp_path, monkeypatch):
    """The documented override: strict config merge accepts ``keep``, and the config builds the fixed transform."""
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"modality_dropout": {"scheme": "fixed", "keep": ["t1ce", "flair"],
                                                         "p_keep_all": 0}}))
    monkeypatch.setenv(OVERRIDE_ENV, str(override))
    settings = load_trainer_config(ModalityDropoutTrainer)["modality_dropout"]
    transform = transform_from_settings(settings, M)
    assert transform.scheme == "fixed" and transform.keep.tolist() == [False, True, False, True]
    out = transform(image=torch.rand(M, 3, 3, 3) + 0.5)["image"]
    assert _kept_channels(out) == (1, 3)


def test_fixed_without_keep_all_zero_names_the_fix(tmp_path, monkeypatch):
    """ModalityDropoutTrainer keeps all four sequences in a quarter of the draws by default: with ``fixed`` the
    override must set ``p_keep_all`` to 0, and the error says so."""
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"modality_dropout": {"scheme": "fixed", "keep": ["t1ce", "flair"]}}))
    monkeypatch.setenv(OVERRIDE_ENV, str(override))
    settings = load_trainer_config(ModalityDropoutTrainer)["modality_dropout"]
    with pytest.raises(ValueError, match=r'got 0.25: set "p_keep_all": 0 beside "scheme": "fixed"'):
        transform_from_settings(settings, M)


def test_settings_of_the_other_schemes_are_unchanged():
    shipped = load_trainer_config(ModalityDropoutTrainer)["modality_dropout"]
    assert shipped["scheme"] == "uniform_subset" and shipped["keep"] is None
    transform = transform_from_settings(shipped, M)
    assert transform.keep is None and transform.scheme == "uniform_subset"
    with pytest.raises(ValueError, match="modality_dropout.drop_probabilities has 4 values but the dataset has 3"):
        transform_from_settings({**shipped, "scheme": "independent"}, 3)


def test_modality_dropout_trainer_trains_on_the_fixed_subset(tmp_path, monkeypatch):
    from tests.conftest import make_tiny_trainer

    override = tmp_path / "override.json"
    override.write_text(json.dumps({"modality_dropout": {"scheme": "fixed", "keep": ["t1ce", "flair"],
                                                         "p_keep_all": 0}}))
    monkeypatch.setenv(OVERRIDE_ENV, str(override))
    trainer = make_tiny_trainer(ModalityDropoutTrainer, tmp_path, monkeypatch)
    transform = trainer.modality_dropout_transform()
    np.random.seed(0)
    for _ in range(5):
        kept = _kept_channels(transform(image=torch.ones(M, 4, 4, 4))["image"])
        assert kept == tuple(sorted(mods.parse_modalities("t1ce,flair")))
