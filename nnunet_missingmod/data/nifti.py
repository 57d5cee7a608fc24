"""Small, deterministic and atomic NIfTI helpers shared by the data generators, converters and readers.

Writing: :func:`write_nifti` (byte-identical for equal inputs) and :func:`atomic_output_folder` (a folder
appears complete or not at all, and replaces only a folder the package itself wrote).

Interruptions: the hidden staging folder is named ``.<name>.partial-<host>-<pid>-<random>``, so a later run
removes what a killed run of the same host left (:func:`remove_stale_staging`, called by
:func:`atomic_output_folder`); :func:`worker_pool` gives process pools whose workers die with their parent
(Linux ``prctl(PR_SET_PDEATHSIG)``) and are stopped at once on an error, and :func:`raise_on_sigterm` turns
SIGTERM into an exception, so the staging folder is removed on the way out.

Reading: :func:`check_image_file` is the one check every command runs on an input image before using it:
SimpleITK reads a truncated ``.nii.gz`` as an image padded with zeros, and NaN/Inf voxels pass through
nnU-Net's normalisation unnoticed, so both are refused with an error naming the case and the file.
"""

from __future__ import annotations

import ctypes
import gzip
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np

#: Recogniser of a folder that may be replaced: None if the package wrote it, else why not.
Recogniser = Callable[[Path], "str | None"]


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> None:
    """Write ``array`` (x, y, z) as ``.nii.gz`` with a fixed gzip timestamp, so equal inputs give equal bytes."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    Path(path).write_bytes(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))


class OverwriteRefusedError(FileExistsError):
    """``--overwrite`` was given for a folder the package cannot recognise as its own; nothing was removed."""


def check_overwrite(final: str | os.PathLike, overwrite: bool, recognise: Recogniser | None = None) -> None:
    """Raise unless ``final`` may be written: it does not exist, or ``overwrite`` is set and ``recognise`` accepts it.

    Args:
        final: the folder to be written.
        overwrite: whether an existing folder may be replaced.
        recognise: returns None for a folder this package wrote (and may replace), else the reason it may not;
            default :func:`nnunet_missingmod.data.raw_dataset.dataset_overwrite_problem` (a dataset folder).

    Raises:
        FileExistsError: ``final`` exists and ``overwrite`` is False.
        OverwriteRefusedError: ``final`` exists but is not a folder the package wrote; the message says why.
    """
    final = Path(final)
    if not (final.exists() or final.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{final} already exists; pass --overwrite (overwrite=True) to replace it")
    if recognise is None:
        from nnunet_missingmod.data.raw_dataset import dataset_overwrite_problem

        recognise = dataset_overwrite_problem
    problem = "it is not a folder" if not final.is_dir() else recognise(final)
    if problem:
        raise OverwriteRefusedError(f"refusing to overwrite {final}: {problem}; --overwrite only replaces a folder "
                                    f"that nnunet_missingmod wrote itself, so nothing was removed")


@contextmanager
def atomic_output_folder(final: str | os.PathLike, *, overwrite: bool = False,
                         recognise: Recogniser | None = None) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``final`` and rename it into place on success.

    On an exception the temporary folder is removed and ``final`` is left as it was. An existing
    ``final`` is only replaced when ``overwrite`` is True and ``recognise`` accepts it as a folder the
    package wrote (checked on entry and again just before the swap), and only after the new one is complete.
    Temporary folders that an earlier, killed run left beside ``final`` are removed first
    (:func:`remove_stale_staging`).

    Raises:
        FileExistsError: if ``final`` exists and ``overwrite`` is False.
        OverwriteRefusedError: if ``final`` exists and is not a folder the package wrote (see :func:`check_overwrite`).
    """
    final = Path(final)
    remove_stale_staging(final)
    check_overwrite(final, overwrite, recognise)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(final, "partial"), dir=final.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); the result is an ordinary folder
        yield staging
        check_overwrite(final, overwrite, recognise)  # it may have changed while the new folder was built
        if final.exists() or final.is_symlink():
            trash = Path(tempfile.mkdtemp(prefix=staging_prefix(final, "old"), dir=final.parent))
            os.replace(final, trash / final.name)
            os.replace(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _host() -> str:
    """This machine's name with every character but letters, digits, ``.`` and ``_`` replaced (no ``-``)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def staging_prefix(final: Path, kind: str) -> str:
    """``.<name>.<kind>-<host>-<pid>-``: whose process a temporary folder beside ``final`` belongs to."""
    return f".{final.name}.{kind}-{_host()}-{os.getpid()}-"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a process another user owns counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def remove_stale_staging(final: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders beside ``final`` that a run of this machine left when it was killed.

    Only folders named by :func:`atomic_output_folder` (``.<name>.partial-<host>-<pid>-*`` and
    ``.<name>.old-<host>-<pid>-*``) whose host is this one and whose process is gone are touched; those of a
    running process, another machine (shared file systems) or an unknown naming are left alone. A run killed
    in the middle of the final swap leaves the previous ``final`` in an ``.old-`` folder: it is moved back if
    ``final`` is missing.

    Returns:
        The folders removed.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    removed = []
    for entry in sorted(final.parent.iterdir()):
        for kind in ("partial", "old"):
            prefix = f".{final.name}.{kind}-{_host()}-"
            pid, _, suffix = entry.name[len(prefix):].partition("-")
            if not (entry.name.startswith(prefix) and pid.isdigit() and suffix and "-" not in suffix):
                continue
            if not entry.is_dir() or entry.is_symlink() or process_alive(int(pid)):
                continue
            previous = entry / final.name
            if kind == "old" and not (final.exists() or final.is_symlink()) and previous.exists():
                os.replace(previous, final)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


class Interrupted(RuntimeError):
    """The command was stopped by a signal (SIGTERM); its temporary output is removed on the way out."""


@contextmanager
def raise_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Interrupted` while the block runs, so ``finally``/``except`` clean-ups run.

    Without it SIGTERM ends the process at once, leaving worker processes and temporary folders behind.
    Only the main thread can install signal handlers; elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}; the unfinished output was removed and "
                          f"nothing was written")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


#: ``prctl`` option that makes the kernel send a signal to a process when its parent ends (linux/prctl.h).
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: on Linux, have the kernel SIGKILL this worker when its parent process ends.

    ``prctl(PR_SET_PDEATHSIG)`` fires when the parent dies however it dies (SIGKILL included), so no worker
    outlives it; multiprocessing's resource tracker then sees its last user gone and exits too. If the parent
    died before the call took effect, the worker exits at once. Elsewhere this does nothing.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


@contextmanager
def worker_pool(num_processes: int) -> Iterator[ProcessPoolExecutor]:
    """A spawn-context process pool whose workers die with this process and stop at once on any exception.

    ``ProcessPoolExecutor``'s own ``with`` waits for every queued job even after an error or an interrupt; here
    queued jobs are cancelled and the workers terminated, so an error, Ctrl-C or SIGTERM (with
    :func:`raise_on_sigterm`) ends the command promptly and leaves no process behind.
    """
    pool = ProcessPoolExecutor(max_workers=num_processes, mp_context=get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException:
        stop_pool(pool)
        raise
    pool.shutdown(wait=True)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel a pool's queued jobs and end its workers now (terminate, then kill what is left after 5 s)."""
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(timeout=5)
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class InputImageError(ValueError):
    """An input image cannot be used; the message names the case and the file."""


def _where(case: str | None) -> str:
    return f"case {case}: " if case else ""


def check_image_file(file: str | os.PathLike, case: str | None = None) -> None:
    """Refuse a NIfTI file that is truncated or holds NaN/Inf voxels (other formats are left to their reader).

    The whole data block is streamed once: its length must match what the header promises (SimpleITK
    silently pads a short file with zeros), and for float images every voxel must be finite.

    Args:
        file: ``.nii`` or ``.nii.gz`` file.
        case: case identifier, for the message.

    Raises:
        InputImageError: unreadable, truncated, or non-finite voxels; the message names the case and the file.
    """
    file = Path(file)
    name = file.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        image = nib.load(file)
        dtype = image.header.get_data_dtype()
        voxels = int(np.prod(image.header.get_data_shape()))
        # where nibabel reads the voxels; a loaded NIfTI-1 header may report vox_offset 0 for a .nii file
        offset = int(getattr(image.dataobj, "offset", image.header.get_data_offset()))
        data_bytes, non_finite = _scan_data(file, name.endswith(".gz"), offset, dtype, voxels)
    except (EOFError, OSError, zlib.error, nib.filebasedimages.ImageFileError) as error:
        raise InputImageError(f"{_where(case)}cannot read {file} (unreadable or truncated): {error}") from None
    needed = voxels * dtype.itemsize
    if data_bytes < needed:
        raise InputImageError(f"{_where(case)}{file} is truncated: {offset + data_bytes} bytes of image data, "
                              f"the header needs {offset + needed}")
    if non_finite:
        raise InputImageError(f"{_where(case)}{file} has {non_finite} NaN/Inf voxel(s) of {voxels}; replace them "
                              f"(e.g. by 0) before using the image")


def _scan_data(file: Path, compressed: bool, offset: int, dtype: np.dtype, voxels: int) -> tuple[int, int]:
    """(bytes of voxel data present, number of non-finite voxels), reading the file in chunks."""
    needed = voxels * dtype.itemsize
    check_values = dtype.kind in "fc"
    opener = gzip.open if compressed else open
    data_bytes, non_finite, leftover = 0, 0, b""
    with opener(file, "rb") as stream:
        if len(stream.read(offset)) < offset:
            return 0, 0
        while data_bytes < needed and (chunk := stream.read(min(1 << 22, needed - data_bytes))):
            data_bytes += len(chunk)
            if check_values:
                buffer = leftover + chunk
                usable = len(buffer) - len(buffer) % dtype.itemsize
                values = np.frombuffer(buffer, dtype=dtype, count=usable // dtype.itemsize)
                non_finite += int(values.size - np.count_nonzero(np.isfinite(values)))
                leftover = buffer[usable:]
    return data_bytes, non_finite


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
