"""Convert BraTS folders with missing sequences into an nnU-Net raw dataset.

Supported layouts (one folder per case, ``<SRC>/<case>/<case><sep><suffix>.nii[.gz]``):

* ``2021`` (BraTS 2018-2021): ``_t1``, ``_t1ce``, ``_t2``, ``_flair``, ``_seg``; labels 1 necrosis,
  2 edema, 4 enhancing tumour;
* ``2023`` (BraTS 2023+): ``-t1n``, ``-t1c``, ``-t2w``, ``-t2f``, ``-seg``; labels 1 necrosis,
  2 edema, 3 enhancing tumour.

Labels are mapped to the convention of :mod:`nnunet_missingmod.modalities` (as nnU-Net's
``Dataset137_BraTS21`` converter does). A missing sequence becomes an all-zero channel file with the
geometry of the present ones, and ``modality_availability.json`` records which sequences each case
really has. Cases without a segmentation go to ``imagesTs``.

Every case is checked before anything appears: the dataset is built in a temporary folder and
renamed into place only when all cases converted, so a bad case leaves nothing behind. Interrupted
runs leave nothing running or half-written either: the worker processes die with the converter (also on
SIGKILL), SIGTERM removes the temporary folder on the way out, and a run after a SIGKILL removes the one
the killed run left (see :mod:`nnunet_missingmod.data.nifti`). Entries of the
source folder that are not cases (an empty folder, cases one folder deeper, NIfTI files loose in the
source, a folder without NIfTI files, a broken symbolic link) stop the conversion with a list of every
one of them, so a dataset never silently holds fewer cases or sequences than the source. Every image is
checked to be complete and free of NaN/Inf voxels (:func:`~nnunet_missingmod.data.nifti.check_image_file`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.data.nifti import (
    InputImageError,
    atomic_output_folder,
    check_image_file,
    check_overwrite,
    geometry_mismatch,
    raise_on_sigterm,
    read_geometry,
    worker_pool,
    write_nifti,
)
from nnunet_missingmod.data.raw_dataset import (
    dataset_folder,
    dataset_overwrite_problem,
    write_availability,
    write_dataset_json,
)


@dataclass(frozen=True)
class BratsLayout:
    """File naming and label values of one BraTS release family."""

    name: str
    separator: str
    suffixes: tuple[str, ...]  # per channel, in channel order
    seg_suffix: str
    label_map: dict[int, int]  # BraTS label -> nnU-Net label


LAYOUTS: dict[str, BratsLayout] = {
    "2021": BratsLayout("2021", "_", ("t1", "t1ce", "t2", "flair"), "seg", {1: 2, 2: 1, 4: 3}),
    "2023": BratsLayout("2023", "-", ("t1n", "t1c", "t2w", "t2f"), "seg", {1: 2, 2: 1, 3: 3}),
}
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


class BratsConversionError(InputImageError):
    """A BraTS case cannot be converted; the message names the case and the file."""


@dataclass
class BratsCase:
    name: str
    sequences: dict[int, Path]  # channel index -> file
    segmentation: Path | None


def _split_suffix(case: str, file: Path) -> tuple[str, str] | None:
    """``BraTS2021_00000_t1ce.nii.gz`` -> (``"_"``, ``"t1ce"``); None when the file is not named after the case."""
    stem = _NIFTI.sub("", file.name)
    if not stem.lower().startswith(case.lower()) or len(stem) <= len(case) + 1:
        return None
    return stem[len(case)], stem[len(case) + 1:].lower()


def _detect_layout(case: str, files: Sequence[Path]) -> BratsLayout:
    votes = {name: 0 for name in LAYOUTS}
    for file in files:
        split = _split_suffix(case, file)
        for name, layout in LAYOUTS.items():
            if split and split[0] == layout.separator and split[1] in (*layout.suffixes, layout.seg_suffix):
                votes[name] += 1
    best = max(votes, key=votes.get)
    if votes[best] == 0:
        raise BratsConversionError(f"case {case}: no file is named like a BraTS 2021 ({case}_t1.nii.gz) or 2023 "
                                   f"({case}-t1n.nii.gz) sequence; found {[f.name for f in files]}")
    return LAYOUTS[best]


def _broken(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def _scan_source(source: Path) -> tuple[list[Path], list[str]]:
    """Case folders of ``source``, and a description of every entry that cannot be one.

    A case folder holds NIfTI files directly. Offending: an empty folder, a folder holding only folders
    (cases one level deeper) or only non-NIfTI files, NIfTI files loose in ``source``, broken symbolic
    links (in ``source`` or a case folder) and NIfTI names that are not files. Hidden entries (``.name``)
    and other loose files (``name_mapping.csv``, ...) are not cases and are left alone.
    """
    case_dirs, problems = [], []
    for entry in sorted(source.iterdir()):
        if entry.name.startswith("."):
            continue
        if _broken(entry):
            problems.append(f"{entry} (broken symbolic link to {os.readlink(entry)})")
        elif not entry.is_dir():
            if _NIFTI.search(entry.name):
                problems.append(f"{entry} (a NIfTI file loose in the source folder, not in a case folder)")
        else:
            contents = [f for f in sorted(entry.iterdir()) if not f.name.startswith(".")]
            nifti = [f for f in contents if _NIFTI.search(f.name)]
            broken = [f for f in contents if _broken(f)]
            not_files = [f for f in nifti if not _broken(f) and not f.is_file()]
            problems += [f"{f} (broken symbolic link to {os.readlink(f)})" for f in broken]
            problems += [f"{f} (named like a NIfTI file but not a file)" for f in not_files]
            if not contents:
                problems.append(f"{entry} (empty folder)")
            elif not nifti and all(f.is_dir() for f in contents):
                problems.append(f"{entry} (holds only folders: cases one level deeper? pass that folder as the "
                                f"source)")
            elif not nifti and not broken:
                names = [f.name for f in contents][:5]
                problems.append(f"{entry} (no .nii/.nii.gz file, only {names}{' ...' if len(contents) > 5 else ''})")
            elif nifti:
                case_dirs.append(entry)
    return case_dirs, problems


def _other_format_sequences(case_dir: Path, layout: BratsLayout) -> list[str]:
    """Files of a case folder named like one of its sequences but not NIfTI (``<case>_t2.mha``)."""
    stems = [f"{case_dir.name}{layout.separator}{s}.".lower() for s in (*layout.suffixes, layout.seg_suffix)]
    return [f.name for f in sorted(case_dir.iterdir())
            if not _NIFTI.search(f.name) and f.name.lower().startswith(tuple(stems))]


def find_cases(source: str | os.PathLike, layout: str = "auto") -> tuple[BratsLayout, list[BratsCase]]:
    """List the cases of a BraTS folder and the sequence files each one has.

    Raises:
        BratsConversionError: no case folders, entries that are not case folders (every one is listed), mixed
            layouts, unrecognised file names, duplicate sequences, or a case with no sequence at all.
    """
    source = Path(source)
    if not source.is_dir():
        raise BratsConversionError(f"{source} is not a folder")
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected auto, {', '.join(LAYOUTS)}")
    case_dirs, problems = _scan_source(source)
    if problems:
        raise BratsConversionError(f"{source}: {len(problems)} entr{'y is' if len(problems) == 1 else 'ies are'} not "
                                   f"a BraTS case folder (<case>/<case>_t1.nii.gz); convert-brats converts every "
                                   f"case or none, so fix or remove them: " + "; ".join(problems))
    if not case_dirs:
        raise BratsConversionError(f"{source} holds no case folders with NIfTI files "
                                   f"(expected <case>/<case>_t1.nii.gz)")
    chosen = LAYOUTS.get(layout)
    cases = []
    for case_dir in case_dirs:
        case = case_dir.name
        files = sorted(f for f in case_dir.iterdir() if _NIFTI.search(f.name))
        detected = _detect_layout(case, files)
        if chosen is None:
            chosen = detected
        elif detected is not chosen and layout == "auto":
            raise BratsConversionError(f"case {case} uses the BraTS {detected.name} file names but earlier cases use "
                                       f"{chosen.name}; convert the two layouts separately")
        sequences: dict[int, Path] = {}
        segmentation = None
        for file in files:
            split = _split_suffix(case, file)
            suffix = split[1] if split and split[0] == chosen.separator else None
            if suffix == chosen.seg_suffix:
                segmentation = file
            elif suffix in chosen.suffixes:
                channel = chosen.suffixes.index(suffix)
                if channel in sequences:
                    raise BratsConversionError(f"case {case}: two files for {mods.MODALITIES[channel]}: "
                                               f"{sequences[channel].name} and {file.name}")
                sequences[channel] = file
            else:
                names = (*chosen.suffixes, chosen.seg_suffix)
                expected = ", ".join(f"{case}{chosen.separator}{s}.nii.gz" for s in names)
                raise BratsConversionError(f"case {case}: unrecognised file {file} (BraTS {chosen.name} expects "
                                           f"{expected})")
        other_formats = _other_format_sequences(case_dir, chosen)
        if other_formats:
            raise BratsConversionError(f"case {case}: {other_formats} named like BraTS sequences but not .nii/.nii.gz; "
                                       f"convert them to NIfTI first (they would otherwise count as missing)")
        if not sequences:
            raise BratsConversionError(f"case {case}: no image sequence at all (only {[f.name for f in files]})")
        cases.append(BratsCase(case, dict(sorted(sequences.items())), segmentation))  # channel order
    return chosen, cases


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _check_geometry(case: str, reference: tuple, reference_file: Path, other: tuple, other_file: Path) -> None:
    problem = geometry_mismatch(reference, other)
    if problem:
        name, values = problem.split(": ", 1)
        other_value, reference_value = values.split(" vs ")
        raise BratsConversionError(f"case {case}: {other_file.name} has {name} {other_value} but {reference_file.name} "
                                   f"has {reference_value}; all sequences and the segmentation of a case must share "
                                   f"one geometry")


def _read_header(case: str, file: Path) -> tuple:
    try:
        return read_geometry(file)
    except InputImageError as error:
        raise BratsConversionError(f"case {case}: {error}") from None


def check_case_headers(case: BratsCase) -> None:
    """Cheap first pass (headers only): readable 3D images sharing one geometry."""
    files = [*case.sequences.values(), *([case.segmentation] if case.segmentation else [])]
    reference = _read_header(case.name, files[0])
    for file in files[1:]:
        _check_geometry(case.name, reference, files[0], _read_header(case.name, file), file)


def check_complete(case: str, file: Path) -> None:
    """Raise if a NIfTI file is truncated or holds NaN/Inf voxels (:func:`.nifti.check_image_file`)."""
    try:
        check_image_file(file, case)
    except InputImageError as error:
        raise BratsConversionError(str(error)) from None


def _read_image(case: str, file: Path) -> sitk.Image:
    check_complete(case, file)
    try:
        return sitk.ReadImage(str(file))
    except RuntimeError as error:
        raise BratsConversionError(f"case {case}: cannot read {file} (unreadable or truncated): "
                                   f"{str(error).strip().splitlines()[-1]}") from None


def convert_labels(case: str, file: Path, seg: np.ndarray, layout: BratsLayout) -> np.ndarray:
    """Map BraTS labels to the nnU-Net convention; unknown values raise an error naming the case and file."""
    values = np.unique(seg)
    unexpected = [v for v in values.tolist() if v != 0 and v not in layout.label_map]
    if unexpected:
        raise BratsConversionError(f"case {case}: {file.name} contains label values {unexpected}; BraTS "
                                   f"{layout.name} segmentations may only contain 0 and {sorted(layout.label_map)}")
    converted = np.zeros(seg.shape, dtype=np.uint8)
    for source_label, target_label in layout.label_map.items():
        converted[seg == source_label] = target_label
    return converted


def _convert_case(args: tuple[BratsCase, BratsLayout, str]) -> tuple[str, list[str], bool]:
    """Worker: read and check one case fully, then write it into the staging folder."""
    case, layout, staging = args
    images = {channel: _read_image(case.name, file) for channel, file in case.sequences.items()}
    reference_channel = min(images)
    reference = images[reference_channel]
    reference_file = case.sequences[reference_channel]
    for channel, image in images.items():
        _check_geometry(case.name, _geometry(reference), reference_file, _geometry(image), case.sequences[channel])
    image_dir = Path(staging, "imagesTr" if case.segmentation else "imagesTs")
    for channel in range(mods.NUM_MODALITIES):
        target = image_dir / f"{case.name}_{channel:04d}.nii.gz"
        if channel in images:
            if case.sequences[channel].name.lower().endswith(".nii.gz"):
                shutil.copyfile(case.sequences[channel], target)  # keep the acquired bytes unchanged
            else:
                sitk.WriteImage(images[channel], str(target), useCompression=True)
        else:
            zeros = sitk.Image(reference.GetSize(), reference.GetPixelID())
            zeros.CopyInformation(reference)
            sitk.WriteImage(zeros, str(target), useCompression=True)
    if case.segmentation is not None:
        seg_image = _read_image(case.name, case.segmentation)
        _check_geometry(case.name, _geometry(reference), reference_file, _geometry(seg_image), case.segmentation)
        labels = convert_labels(case.name, case.segmentation, sitk.GetArrayFromImage(seg_image), layout)
        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(seg_image)
        sitk.WriteImage(out, str(Path(staging, "labelsTr", f"{case.name}.nii.gz")), useCompression=True)
    return case.name, [mods.MODALITIES[c] for c in sorted(images)], case.segmentation is not None


def convert_brats(source: str | os.PathLike, dataset_id: int, name: str, *, layout: str = "auto",
                  raw_folder: str | os.PathLike | None = None, overwrite: bool = False,
                  num_processes: int | None = None, progress: bool = True) -> Path:
    """Convert a BraTS folder (sequences may be missing) into ``$nnUNet_raw/DatasetNNN_name``.

    Args:
        source: folder whose subfolders are the BraTS cases.
        dataset_id: nnU-Net dataset id.
        name: dataset name.
        layout: ``auto``, ``2021`` or ``2023``.
        raw_folder: nnU-Net raw folder (default ``$nnUNet_raw``).
        overwrite: replace an existing dataset of the same id and name, if this package wrote it.
        num_processes: worker processes (default ``$nnUNet_def_n_proc`` or 2).
        progress: show a progress bar.

    Returns:
        The dataset folder.

    Raises:
        BratsConversionError: a case cannot be converted, or an entry of ``source`` is not a case (the message
            names case and file); nothing is written.
        FileExistsError: the dataset exists and ``overwrite`` is False, or (``OverwriteRefusedError``) it was not
            written by this package.
    """
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"the number of processes must be at least 1, got {num_processes}")
    final = dataset_folder(raw_folder, dataset_id, name)
    check_overwrite(final, overwrite, dataset_overwrite_problem)
    chosen, cases = find_cases(source, layout)
    for case in tqdm(cases, desc="checking headers", unit="case", disable=not progress):
        check_case_headers(case)
    num_processes = num_processes or int(os.environ.get("nnUNet_def_n_proc", 2))
    with (raise_on_sigterm(),
          atomic_output_folder(final, overwrite=overwrite, recognise=dataset_overwrite_problem) as staging):
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (staging / sub).mkdir()
        jobs = [(case, chosen, str(staging)) for case in cases]
        with worker_pool(max(1, num_processes)) as pool:
            results = list(tqdm(pool.map(_convert_case, jobs), total=len(jobs), desc="converting", unit="case",
                                disable=not progress))
        if not any((staging / "imagesTs").iterdir()):
            (staging / "imagesTs").rmdir()
        num_training = sum(has_seg for _, _, has_seg in results)
        if num_training == 0:
            raise BratsConversionError(f"{source}: no case has a segmentation, so there is nothing to train on")
        write_dataset_json(staging, dataset_name=final.name, num_training=num_training,
                           converted_by="nnunet_missingmod convert-brats",
                           description=f"converted from {Path(source).resolve()} (BraTS {chosen.name} layout)",
                           license="see the BraTS challenge's data use agreement")
        write_availability(staging, {case: present for case, present, _ in results})
    return final


def write_brats_case(folder: Path, case: str, images: np.ndarray, labels: np.ndarray | None, affine: np.ndarray,
                     present: Sequence[int], layout: str = "2021") -> Path:
    """Write one case in the BraTS folder layout (only the ``present`` channels; labels in BraTS values)."""
    spec = LAYOUTS[layout]
    case_dir = folder / case
    case_dir.mkdir(parents=True, exist_ok=True)
    for channel in present:
        write_nifti(case_dir / f"{case}{spec.separator}{spec.suffixes[channel]}.nii.gz", images[channel], affine)
    if labels is not None:
        brats_labels = np.zeros_like(labels)
        for source_label, target_label in spec.label_map.items():
            brats_labels[labels == target_label] = source_label
        write_nifti(case_dir / f"{case}{spec.separator}{spec.seg_suffix}.nii.gz", brats_labels, affine)
    return case_dir
