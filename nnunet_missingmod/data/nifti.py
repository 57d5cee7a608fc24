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


class InputImageError(ValueError):
    """An input image cannot be used; the message names the case and the file."""


def read_geometry(file: str | os.PathLike) -> tuple:
    """(size, spacing, origin, direction) from the header alone (SimpleITK).

    Raises:
        InputImageError: unreadable file, or not a 3D single-channel image.
    """
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputImageError(f"cannot read {file}: {str(error).strip().splitlines()[-1]}") from None
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise InputImageError(f"{Path(file).name} is not a 3D single-channel image ({reader.GetDimension()}D, "
                              f"{reader.GetNumberOfComponents()} components)")
    return reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()


def _format(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def geometry_mismatch(reference: tuple, other: tuple) -> str | None:
    """Which of shape, spacing, origin, direction differ between two geometries (with their values), or None."""
    names = ("shape", "spacing", "origin", "direction")
    tolerances = (0, 1e-4, 1e-3, 1e-4)
    for name, ref, oth, tol in zip(names, reference, other, tolerances, strict=True):
        if len(ref) != len(oth) or not np.allclose(ref, oth, rtol=0, atol=tol):
            return f"{name}: {_format(oth)} vs {_format(ref)}"
    return None
