"""Shared fixtures: small phantom datasets generated once per session (no network, no GPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nnunet_missingmod.data.phantom import PhantomConfig, make_phantom_dataset

#: Coarse phantoms keep conversion and pipeline tests fast; contrast tests use the default 2 mm.
FAST_CONFIG = PhantomConfig(spacing=4.0, padding_mm=16.0)


@pytest.fixture(autouse=True)
def _small_machine(monkeypatch):
    """Keep nnU-Net and our pools at two processes, as on the CI machine."""
    monkeypatch.setenv("nnUNet_def_n_proc", "2")
    monkeypatch.setenv("nnUNet_n_proc_DA", os.environ.get("nnUNet_n_proc_DA", "2"))


@pytest.fixture(scope="session")
def phantom_with_brats(tmp_path_factory) -> tuple[Path, Path]:
    """A 6-case phantom dataset at 4 mm plus the same cases in the BraTS 2021 layout with half the files missing."""
    base = tmp_path_factory.mktemp("phantom_brats")
    dataset = make_phantom_dataset(981, num_cases=6, num_test=0, seed=3, config=FAST_CONFIG,
                                   raw_folder=base / "raw", brats_layout=base / "brats",
                                   missing_rate=0.5, progress=False)
    return dataset, base / "brats"
