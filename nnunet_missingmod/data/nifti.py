"""Small, deterministic and atomic NIfTI writing helpers shared by the data generators and converters."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> None:
    """Write ``array`` (x, y, z) as ``.nii.gz`` with a fixed gzip timestamp, so equal inputs give equal bytes."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    Path(path).write_bytes(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))


@contextmanager
def atomic_output_folder(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``final`` and rename it into place on success.

    On an exception the temporary folder is removed and ``final`` is left as it was. An existing
    ``final`` is only replaced when ``overwrite`` is True (and only after the new one is complete).

    Raises:
        FileExistsError: if ``final`` exists and ``overwrite`` is False.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass --overwrite (overwrite=True) to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield staging
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, trash / final.name)
            os.replace(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
