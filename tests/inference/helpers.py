"""Small stand-ins for input-checking tests: a model folder with only the files read before the network is loaded.

Every check of ``predict`` and ``evaluate-missing`` runs before the model is restored, so these tests need no
training. The checkpoint files are empty: a test that got as far as loading the model would fail loudly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nnunet_missingmod.data.nifti import write_nifti

DATASET = "Dataset961_Checks"
TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_cpu"
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
SHAPE = (10, 9, 8)


def fake_model(results: Path, folds: tuple[int, ...] = (0,)) -> Path:
    """``results/Dataset961_Checks/nnUNetTrainer__nnUNetPlans__3d_cpu`` with dataset.json and empty checkpoints."""
    model = results / DATASET / TRAINER_FOLDER
    model.mkdir(parents=True)
    (model / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}, "file_ending": ".nii.gz"}))
    for fold in folds:
        (model / f"fold_{fold}").mkdir()
        (model / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"")
    return model


def write_case(folder: Path, case: str, channels: tuple[int, ...] = (0, 1, 2, 3), seed: int = 0) -> list[Path]:
    """Channel files ``<case>_000X.nii.gz`` of a small positive int16 image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for channel in channels:
        file = folder / f"{case}_{channel:04d}.nii.gz"
        write_nifti(file, rng.integers(1, 1000, SHAPE).astype(np.int16), AFFINE)
        files.append(file)
    return files


def write_label(folder: Path, case: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[3:6, 3:6, 3:6] = 1
    write_nifti(folder / f"{case}.nii.gz", labels, AFFINE)
    return folder / f"{case}.nii.gz"


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def put_non_finite(file: Path) -> None:
    """Rewrite ``file`` as float32 with one NaN and one Inf voxel."""
    import nibabel as nib

    array = np.asanyarray(nib.load(file).dataobj).astype(np.float32)
    array[1, 2, 3], array[4, 5, 6] = np.nan, np.inf
    write_nifti(file, array, AFFINE)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for folders)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}
