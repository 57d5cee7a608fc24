from itertools import combinations

import numpy as np
import pytest

from nnunet_missingmod import modalities as mods


def test_fifteen_distinct_nonempty_combinations():
    combos = mods.all_combinations()
    assert len(combos) == 15 == 2 ** 4 - 1
    assert len(set(combos)) == 15
    expected = {c for k in range(1, 5) for c in combinations(range(4), k)}
    assert set(combos) == expected


def test_channel_order_matches_nnunet_brats_converter():
    # nnU-Net's Dataset137_BraTS21: _0000 t1, _0001 t1ce, _0002 t2, _0003 flair
    assert [mods.CHANNEL_NAMES[str(i)] for i in range(4)] == ["T1", "T1ce", "T2", "Flair"]
    assert mods.DATASET_LABELS == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                                   "enhancing tumor": [3]}


@pytest.mark.parametrize("spec, expected", [
    ("t1ce,flair", (1, 3)), ("FLAIR+T1c", (1, 3)), ("t2f, t1n", (0, 3)), (["t2w"], (2,)),
])
def test_parse_modalities_accepts_aliases(spec, expected):
    assert mods.parse_modalities(spec) == expected


@pytest.mark.parametrize("spec", ["", "t1,t1", "pd", "t1,xyz"])
def test_parse_modalities_rejects_bad_input(spec):
    with pytest.raises(ValueError):
        mods.parse_modalities(spec)


def test_infer_available_finds_exactly_zero_channels():
    image = np.random.default_rng(0).normal(size=(4, 5, 5, 5))
    image[[0, 2]] = 0
    assert mods.infer_available(image) == (1, 3)
    assert mods.combination_name((3, 1)) == "t1ce+flair"
