"""BraTS-like brain-tumour phantoms on real anatomy, generated offline and deterministically.

The anatomy is the MNI152 2009a symmetric template (T1 image, grey- and white-matter probability
maps) that ships inside the nilearn wheel (``nilearn/datasets/data/``); the files are read with
nibabel so nilearn itself is never imported. CSF is the rest of the brain: ``1 - GM - WM`` inside
the template's brain mask.

Each case is drawn from its own random stream ``default_rng([seed, case_index])``:

1. the anatomy is warped by a smooth random deformation (inter-subject variability), plus an
   optional radial mass effect that pushes tissue away from the tumour;
2. a tumour is placed in white matter: an irregular, randomly rotated ellipsoid (smooth noise on
   its level set) is the tumour core; depending on the tumour type the core is a necrotic centre
   with an enhancing rim of varying thickness (``necrotic``), solid enhancing tissue with a few
   non-enhancing patches (``solid``), or non-enhancing tissue only (``non_enhancing``: no ET at all);
   edema spreads from the core preferentially through white matter and stays out of CSF;
3. four contrasts are rendered from tissue and tumour fractions with intensities that follow MR
   physics (see :data:`CONTRASTS`), then partial-volume blur, texture, a smooth bias field per
   modality, a random gain per modality and Rician noise; the background is exactly 0
   (skull-stripped, like BraTS).

Labels follow :mod:`nnunet_missingmod.modalities` (1 edema, 2 necrosis / non-enhancing core,
3 enhancing tumour).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.data.brats import write_brats_case
from nnunet_missingmod.data.nifti import (
    atomic_output_folder,
    check_overwrite,
    raise_on_sigterm,
    worker_pool,
    write_nifti,
)
from nnunet_missingmod.data.raw_dataset import (
    dataset_folder,
    dataset_overwrite_problem,
    write_availability,
    write_dataset_json,
)

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

#: Tissue classes whose fractions make up a voxel, in the column order of :data:`CONTRASTS`.
TISSUES: tuple[str, ...] = ("wm", "gm", "csf", "edema", "necrosis", "non_enhancing", "enhancing")
#: Mean intensity of each tissue class per modality (relative units, T1 white matter = 1). Rows are in
#: channel order (T1, T1ce, T2, FLAIR). T1: WM > GM > CSF, tumour hypo-intense; T1ce: as T1 but the
#: enhancing tumour is the brightest structure (and it equals non-enhancing tumour on every other
#: contrast, so only T1ce tells them apart); T2: CSF > GM > WM, edema and necrosis bright; FLAIR: as T2
#: with dark CSF and edema the brightest structure.
CONTRASTS: np.ndarray = np.array([
    #  wm    gm    csf   edema necro  nonenh enh
    [1.00, 0.70, 0.28, 0.60, 0.35, 0.52, 0.52],  # T1
    [1.00, 0.70, 0.28, 0.60, 0.35, 0.52, 1.50],  # T1ce
    [0.45, 0.65, 1.00, 0.85, 1.05, 0.75, 0.75],  # T2
    [0.50, 0.66, 0.12, 1.25, 0.55, 0.95, 0.95],  # FLAIR
], dtype=np.float32)

TUMOUR_TYPES: tuple[str, ...] = ("necrotic", "solid", "non_enhancing")
#: Marker file of a BraTS-layout folder written by :func:`make_phantom_dataset` (case -> sequences written).
SEQUENCES_PRESENT_FILE = "sequences_present.json"


@dataclass(frozen=True)
class PhantomConfig:
    """Settings of the phantom generator.

    Args:
        spacing: isotropic voxel size in mm of the generated images.
        tumour_type_probabilities: probabilities of ``necrotic``, ``solid`` and ``non_enhancing`` tumours.
        core_radius_mm: range of the tumour-core radius (drawn log-uniformly).
        edema_reach_mm: range of how far edema spreads from the core through white matter.
        deformation_mm: amplitude of the random anatomical deformation.
        mass_effect: maximum fraction by which tissue next to the tumour is pushed outwards (0 disables it).
        noise: Rician noise level relative to the white-matter intensity on T1.
        bias: maximum strength of the smooth multiplicative bias field (log scale).
        gain: range of the random per-modality scanner gain.
        padding_mm: zero background added around the brain. As in BraTS, cropping to the brain then
            removes much of the image, so nnU-Net plans z-score normalisation inside the brain mask.
    """

    spacing: float = 2.0
    tumour_type_probabilities: tuple[float, float, float] = (0.6, 0.2, 0.2)
    core_radius_mm: tuple[float, float] = (7.0, 22.0)
    edema_reach_mm: tuple[float, float] = (2.0, 20.0)
    deformation_mm: float = 4.0
    mass_effect: float = 0.35
    noise: float = 0.03
    bias: float = 0.25
    gain: tuple[float, float] = (300.0, 1500.0)
    padding_mm: float = 20.0

    def __post_init__(self) -> None:
        if not 0.5 <= self.spacing <= 6:
            raise ValueError(f"spacing must be between 0.5 and 6 mm, got {self.spacing}")
        if abs(sum(self.tumour_type_probabilities) - 1) > 1e-6 or min(self.tumour_type_probabilities) < 0:
            raise ValueError(f"tumour type probabilities must be non-negative and sum to 1, "
                             f"got {self.tumour_type_probabilities}")


@dataclass
class PhantomCase:
    """One generated case."""

    images: np.ndarray  # (4, X, Y, Z) int16, channel order of nnunet_missingmod.modalities
    labels: np.ndarray  # (X, Y, Z) uint8
    affine: np.ndarray  # voxel -> RAS mm
    tissue: dict[str, np.ndarray]  # wm, gm, csf fractions (X, Y, Z), before tumour replaced them
    info: dict  # tumour type, core radius, centre voxel, volumes in cm3 per region


@dataclass
class Template:
    """MNI152 anatomy resampled to one spacing and cropped to the brain."""

    t1: np.ndarray  # (X, Y, Z) in [0, 1]
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray  # float fraction in [0, 1]
    affine: np.ndarray  # voxel -> RAS mm
    spacing: float
    tumour_centres: np.ndarray = field(repr=False)  # (K, 3) voxel indices deep in white matter


def nilearn_data_dir() -> Path:
    """Folder of the data files bundled in the nilearn wheel, found without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("nilearn is needed for the MNI152 template files: pip install nilearn")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [name for name in _TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"nilearn's MNI152 template files are missing from {folder}: {missing}")
    return folder


@lru_cache(maxsize=4)
def load_template(spacing: float = 2.0) -> Template:
    """Read the MNI152 2009a template, resample it to ``spacing`` mm and crop it to the brain (+2 voxels)."""
    folder = nilearn_data_dir()
    raw = {k: nib.load(folder / f) for k, f in _TEMPLATE_FILES.items()}
    source_spacing = float(raw["t1"].header.get_zooms()[0])
    step = spacing / source_spacing  # output voxel i samples input voxel i * step (exact spacing)
    out_shape = tuple(int((s - 1) // step) + 1 for s in raw["t1"].shape)

    def resample(volume: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(volume, [step] * 3, output_shape=out_shape, order=1)

    arrays = {k: resample(np.asarray(img.dataobj, dtype=np.float32) / 255.0) for k, img in raw.items()}
    brain_full = resample((np.asarray(raw["t1"].dataobj) > 0).astype(np.float32))
    inside = np.argwhere(brain_full > 0.5)
    lo = np.maximum(inside.min(0) - 2, 0)
    hi = np.minimum(inside.max(0) + 3, brain_full.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    brain = np.clip(brain_full[crop], 0, 1)
    gm, wm = (np.clip(arrays[k][crop], 0, 1) * brain for k in ("gm", "wm"))
    affine = raw["t1"].affine.copy()
    affine[:3, :3] = raw["t1"].affine[:3, :3] * step
    affine[:3, 3] = raw["t1"].affine[:3, :3] @ (lo * step) + raw["t1"].affine[:3, 3]
    # candidate tumour centres: deep white matter, at least 15 mm inside the brain
    depth_mm = ndimage.distance_transform_edt(brain > 0.5, sampling=spacing)
    centres = np.argwhere((wm > 0.7) & (depth_mm > 15))
    return Template(t1=arrays["t1"][crop] * brain, gm=gm, wm=wm, brain=brain, affine=affine, spacing=spacing,
                    tumour_centres=centres)


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cell_vox: float) -> np.ndarray:
    """Smooth random field with zero mean and unit standard deviation; features about ``cell_vox`` voxels wide."""
    # smooth on a coarse grid (cell_vox / 2 apart), then upsample linearly: ~10x cheaper than a cubic zoom
    coarse_shape = [max(3, int(np.ceil(2 * s / cell_vox)) + 1) for s in shape]
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 1.0, mode="wrap")
    fine = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse_shape, strict=True)], order=1, mode="nearest")
    fine = fine[tuple(slice(0, s) for s in shape)]
    return (fine - fine.mean()) / (fine.std() + 1e-6)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _warp(template: Template, rng: np.random.Generator, config: PhantomConfig, centre: np.ndarray,
          core_radius_vox: float) -> dict[str, np.ndarray]:
    """Warp the template's maps by a smooth random deformation and a radial mass effect around ``centre``."""
    shape = template.brain.shape
    grid = np.indices(shape, dtype=np.float32)  # (3, X, Y, Z)
    amplitude = config.deformation_mm / config.spacing
    source = grid + np.stack([amplitude * _smooth_field(rng, shape, 40 / config.spacing) for _ in range(3)])
    if config.mass_effect > 0:
        offset = grid - centre.reshape(3, 1, 1, 1).astype(np.float32)
        radius_sq = (offset ** 2).sum(0)
        strength = rng.uniform(0, config.mass_effect)
        sigma = 1.6 * core_radius_vox
        source -= offset * (strength * np.exp(-radius_sq / (2 * sigma ** 2)))
    maps = {name: getattr(template, name) for name in ("gm", "wm", "brain")}
    return {name: ndimage.map_coordinates(m, source, order=1, mode="constant", cval=0.0) for name, m in maps.items()}


def _tumour_labels(rng: np.random.Generator, config: PhantomConfig, shape: Sequence[int], centre: np.ndarray,
                   core_radius_mm: float, tumour_type: str, wm: np.ndarray, csf: np.ndarray,
                   brain: np.ndarray) -> np.ndarray:
    """Label map (0 background, 1 edema, 2 necrosis/non-enhancing core, 3 enhancing) of one tumour."""
    spacing = config.spacing
    offset_mm = (np.indices(shape, dtype=np.float32) - centre.reshape(3, 1, 1, 1)) * spacing
    axes = _random_rotation(rng) * rng.uniform(0.75, 1.3, size=3)[:, None]  # anisotropic, randomly oriented
    ellipsoid = np.sqrt((np.tensordot(axes, offset_mm, axes=1) ** 2).sum(0)) / core_radius_mm
    irregular = ellipsoid + rng.uniform(0.12, 0.3) * _smooth_field(rng, shape, 10 / spacing)
    inside = brain > 0.5
    core = (irregular < 1) & inside
    core[tuple(np.round(centre).astype(int))] = True  # never empty

    labels = np.zeros(shape, dtype=np.uint8)
    if tumour_type == "necrotic":
        rim_mm = rng.uniform(2.0, 6.0) * (0.6 + 0.8 * (0.5 + 0.5 * np.tanh(_smooth_field(rng, shape, 12 / spacing))))
        necrosis = irregular < 1 - rim_mm / core_radius_mm
        labels[core] = mods.LABEL_ENHANCING
        labels[core & necrosis] = mods.LABEL_NECROSIS
    elif tumour_type == "solid":
        patches = _smooth_field(rng, shape, 10 / spacing) > rng.uniform(0.2, 0.8)
        labels[core] = mods.LABEL_ENHANCING
        labels[core & patches] = mods.LABEL_NECROSIS
    else:
        labels[core] = mods.LABEL_NECROSIS

    # edema: reaches further through white matter, never into CSF, connected to the core
    distance_mm = ndimage.distance_transform_edt(~core, sampling=spacing)
    reach = rng.uniform(*config.edema_reach_mm) * (0.2 + 0.8 * wm)
    reach *= np.exp(0.3 * _smooth_field(rng, shape, 15 / spacing))
    edema = (distance_mm < reach) & ~core & inside & (csf < 0.4)
    components, _ = ndimage.label(edema | core)
    edema &= np.isin(components, np.unique(components[core]))
    labels[edema] = mods.LABEL_EDEMA
    return labels


def generate_case(seed: int, case_index: int, config: PhantomConfig = PhantomConfig()) -> PhantomCase:
    """Generate one phantom case.

    Args:
        seed: dataset seed.
        case_index: index of the case; each (seed, case_index) pair has its own random stream.
        config: generator settings.

    Returns:
        The images (4, X, Y, Z) int16 in channel order, labels, affine, tissue fractions and tumour description.
    """
    template = load_template(config.spacing)
    rng = np.random.default_rng([seed, case_index])
    shape = template.brain.shape
    tumour_type = TUMOUR_TYPES[rng.choice(3, p=config.tumour_type_probabilities)]
    core_radius_mm = float(np.exp(rng.uniform(*np.log(config.core_radius_mm))))
    centre = template.tumour_centres[rng.integers(len(template.tumour_centres))].astype(np.float32)

    warped = _warp(template, rng, config, centre, core_radius_mm / config.spacing)
    brain = np.clip(warped["brain"], 0, 1)
    wm, gm = np.clip(warped["wm"], 0, 1), np.clip(warped["gm"], 0, 1)
    csf = np.clip(brain - wm - gm, 0, 1)
    labels = _tumour_labels(rng, config, shape, centre, core_radius_mm, tumour_type, wm, csf, brain)

    # tissue fractions (T, X, Y, Z); tumour classes displace normal tissue, with partial-volume edges
    is_necrosis = labels == mods.LABEL_NECROSIS
    tumour_masks = [labels == mods.LABEL_EDEMA,
                    is_necrosis & (tumour_type == "necrotic"),
                    is_necrosis & (tumour_type != "necrotic"),
                    labels == mods.LABEL_ENHANCING]
    tumour = np.stack([ndimage.gaussian_filter(m.astype(np.float32), 0.6) for m in tumour_masks])
    tumour *= brain
    normal = np.clip(1 - tumour.sum(0), 0, 1)
    fractions = np.concatenate([np.stack([wm, gm, csf]) * normal, tumour])

    contrasts = CONTRASTS * rng.uniform(0.95, 1.05, size=CONTRASTS.shape).astype(np.float32)
    not_t1ce = [c for c in range(mods.NUM_MODALITIES) if c != 1]
    enhancing, non_enhancing = TISSUES.index("enhancing"), TISSUES.index("non_enhancing")
    contrasts[not_t1ce, enhancing] = contrasts[not_t1ce, non_enhancing]  # enhancement is visible on T1ce only
    texture_normal = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.0)
    texture_tumour = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.5)
    texture = 1 + 0.12 * texture_normal[None] * np.array([1, 1, 1, 0, 0, 0, 0], np.float32).reshape(-1, 1, 1, 1) \
        + 0.25 * texture_tumour[None] * np.array([0, 0, 0, 1, 1, 1, 1], np.float32).reshape(-1, 1, 1, 1)
    textured = fractions * texture  # (T, X, Y, Z)
    brain_mask = brain > 0.5
    images = np.empty((mods.NUM_MODALITIES, *shape), dtype=np.int16)
    for channel in range(mods.NUM_MODALITIES):
        clean = np.tensordot(contrasts[channel], textured, axes=1)
        clean = ndimage.gaussian_filter(clean, 0.5)
        clean *= np.exp(rng.uniform(0.3, 1.0) * config.bias * _smooth_field(rng, shape, 60 / config.spacing))
        sigma = config.noise * contrasts[0, 0]
        noisy = np.hypot(clean + sigma * rng.standard_normal(shape, dtype=np.float32),
                         sigma * rng.standard_normal(shape, dtype=np.float32))
        scaled = np.round(noisy * rng.uniform(*config.gain))
        images[channel] = np.where(brain_mask, np.clip(scaled, 1, np.iinfo(np.int16).max), 0)
    labels[~brain_mask] = 0
    pad = int(round(config.padding_mm / config.spacing))
    images = np.pad(images, [(0, 0)] + [(pad, pad)] * 3)
    labels = np.pad(labels, pad)
    affine = template.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)

    voxel_cm3 = config.spacing ** 3 / 1000
    info = {
        "tumour_type": tumour_type,
        "core_radius_mm": round(core_radius_mm, 2),
        "centre_voxel": [int(c) + pad for c in centre],
        "volume_cm3": {region: round(float(np.isin(labels, members).sum() * voxel_cm3), 3)
                       for region, members in mods.REGIONS.items()},
    }
    tissue = {name: np.pad(fraction, pad) for name, fraction in (("wm", wm), ("gm", gm), ("csf", csf))}
    return PhantomCase(images=images, labels=labels, affine=affine, tissue=tissue, info=info)


def case_identifier(case_index: int, prefix: str = "Phantom") -> str:
    return f"{prefix}_{case_index:04d}"


def _write_case(args: tuple) -> tuple[str, dict, list[str]]:
    """Worker: generate one case and write it into the staging folder (and the BraTS-layout folder)."""
    seed, index, config, staging, is_test, brats_dir, missing_rate, brats_format = args
    case = generate_case(seed, index, config)
    images, labels, affine, info = case.images, case.labels, case.affine, case.info
    identifier = case_identifier(index)
    image_dir, label_dir = ("imagesTs", "labelsTs") if is_test else ("imagesTr", "labelsTr")
    for channel in range(mods.NUM_MODALITIES):
        write_nifti(Path(staging, image_dir, f"{identifier}_{channel:04d}.nii.gz"), images[channel], affine)
    write_nifti(Path(staging, label_dir, f"{identifier}.nii.gz"), labels, affine)
    present: list[str] = list(mods.MODALITIES)
    if brats_dir is not None:
        rng = np.random.default_rng([seed, index, 1])
        keep = rng.random(mods.NUM_MODALITIES) >= missing_rate
        if not keep.any():
            keep[rng.integers(mods.NUM_MODALITIES)] = True
        present = [m for m, k in zip(mods.MODALITIES, keep, strict=True) if k]
        write_brats_case(Path(brats_dir), f"BraTS-PHANTOM-{index:05d}", images, labels, affine,
                         present=[mods.modality_index(m) for m in present], layout=brats_format)
    return identifier, info, present


def brats_layout_overwrite_problem(folder: str | os.PathLike) -> str | None:
    """None if ``folder`` is a BraTS-layout folder written by :func:`make_phantom_dataset`, else why it is not.

    It must hold :data:`SEQUENCES_PRESENT_FILE` and nothing but the case folders listed there, each holding
    only ``<case>_*.nii.gz`` / ``<case>-*.nii.gz`` files.
    """
    folder = Path(folder)
    marker = folder / SEQUENCES_PRESENT_FILE
    if not marker.is_file():
        return f"it has no {SEQUENCES_PRESENT_FILE}, so it is not a BraTS layout written by nnunet_missingmod"
    try:
        cases = json.loads(marker.read_text())
    except (OSError, ValueError) as error:
        return f"its {SEQUENCES_PRESENT_FILE} cannot be read ({error})"
    if not isinstance(cases, dict):
        return f"its {SEQUENCES_PRESENT_FILE} is not a case -> sequences object"
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.name == SEQUENCES_PRESENT_FILE:
            continue
        if entry.name not in cases or entry.is_symlink() or not entry.is_dir():
            foreign.append(entry.name)
            continue
        foreign += [f"{entry.name}/{f.name}" for f in sorted(entry.iterdir())
                    if f.is_symlink() or not f.is_file() or not f.name.endswith(".nii.gz")
                    or not f.name.startswith((f"{entry.name}_", f"{entry.name}-"))]
    if foreign:
        shown = foreign[:5] + ([f"... ({len(foreign) - 5} more)"] if len(foreign) > 5 else [])
        return f"it also holds {shown}, which nnunet_missingmod did not write"
    return None


def _check_separate(dataset: Path, brats_layout: Path) -> None:
    """The BraTS-layout folder and the dataset folder must not be the same or nested (one would replace the other)."""
    a, b = dataset.resolve(), brats_layout.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise ValueError(f"--brats-layout {brats_layout} and the dataset folder {dataset} must be separate "
                         f"folders, neither inside the other")


def make_phantom_dataset(dataset_id: int, *, num_cases: int = 40, num_test: int = 10, seed: int = 0,
                         name: str = "BraTSPhantom", config: PhantomConfig = PhantomConfig(),
                         raw_folder: str | os.PathLike | None = None, overwrite: bool = False,
                         brats_layout: str | os.PathLike | None = None, missing_rate: float = 0.3,
                         brats_format: str = "2021", num_processes: int | None = None,
                         progress: bool = True) -> Path:
    """Write a complete nnU-Net raw dataset of phantoms (``DatasetNNN_name``) under ``nnUNet_raw``.

    Args:
        dataset_id: nnU-Net dataset id (1-999).
        num_cases: number of training cases (``imagesTr``/``labelsTr``).
        num_test: number of held-out cases (``imagesTs``/``labelsTs``), indices after the training cases.
        seed: dataset seed; the same seed gives bit-identical files.
        name: dataset name.
        config: generator settings.
        raw_folder: nnU-Net raw folder; defaults to ``$nnUNet_raw``.
        overwrite: replace an existing dataset folder (and ``brats_layout`` folder), only once the new one is
            complete and only if this package wrote it (see :func:`brats_layout_overwrite_problem` and
            :func:`nnunet_missingmod.data.raw_dataset.dataset_overwrite_problem`); anything else is refused.
        brats_layout: if given, also write every case in the BraTS folder layout here, with a random
            subset of sequence files missing per case (at least one sequence is always kept).
        missing_rate: probability that a sequence file is missing in the BraTS layout.
        brats_format: ``"2021"`` (``_t1``, ``_t1ce``, ``_t2``, ``_flair``, labels 1/2/4) or ``"2023"``
            (``-t1n``, ``-t1c``, ``-t2w``, ``-t2f``, labels 1/2/3).
        num_processes: worker processes (default ``$nnUNet_def_n_proc`` or 2).
        progress: show a progress bar.

    Returns:
        The dataset folder.

    Raises:
        FileExistsError: an output folder exists and ``overwrite`` is False.
        OverwriteRefusedError: an output folder exists but is not one this package wrote; nothing is removed.
    """
    if num_cases < 1 or num_test < 0:
        raise ValueError(f"need at least one training case and no negative test count ({num_cases=}, {num_test=})")
    if not 0 <= missing_rate <= 1:
        raise ValueError(f"missing rate must be between 0 and 1, got {missing_rate}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"the number of processes must be at least 1, got {num_processes}")
    final = dataset_folder(raw_folder, dataset_id, name)
    check_overwrite(final, overwrite, dataset_overwrite_problem)
    if brats_layout:
        check_overwrite(brats_layout, overwrite, brats_layout_overwrite_problem)
        _check_separate(final, Path(brats_layout))
    num_processes = num_processes or int(os.environ.get("nnUNet_def_n_proc", 2))
    brats_context = (atomic_output_folder(brats_layout, overwrite=overwrite, recognise=brats_layout_overwrite_problem)
                     if brats_layout else nullcontext(None))
    with (atomic_output_folder(final, overwrite=overwrite, recognise=dataset_overwrite_problem) as staging,
          brats_context as brats_staging):
        for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if num_test else ()):
            (staging / sub).mkdir()
        jobs = [(seed, i, config, str(staging), i >= num_cases, brats_staging, missing_rate, brats_format)
                for i in range(num_cases + num_test)]
        # workers die with this process and stop at once on an error, Ctrl-C or SIGTERM (then the staging
        # folders are removed by atomic_output_folder), as in convert-brats
        with raise_on_sigterm(), worker_pool(max(1, num_processes)) as pool:
            results = list(tqdm(pool.map(_write_case, jobs), total=len(jobs), desc="phantoms", unit="case",
                                disable=not progress))
        write_dataset_json(staging, dataset_name=final.name, num_training=num_cases,
                           converted_by="nnunet_missingmod phantom",
                           description=f"BraTS-like phantoms, seed {seed}, spacing {config.spacing} mm",
                           reference="MNI ICBM152 2009a nonlinear symmetric template",
                           license="derived from the MNI ICBM152 2009a template; its copyright notice "
                                   "(McConnell Brain Imaging Centre) applies")
        availability = {identifier: list(mods.MODALITIES) for identifier, _, _ in results}
        write_availability(staging, availability)
        with open(staging / "phantom_cases.json", "w") as f:
            json.dump({"seed": seed, "config": asdict(config),
                       "cases": {identifier: info for identifier, info, _ in results}}, f, indent=2)
        if brats_staging is not None:
            with open(Path(brats_staging) / SEQUENCES_PRESENT_FILE, "w") as f:
                json.dump({f"BraTS-PHANTOM-{i:05d}": present for i, (_, _, present) in enumerate(results)}, f, indent=2)
    return final


def render_preview(dataset: str | os.PathLike, png: str | os.PathLike, case: str | None = None) -> Path:
    """Render one case of a raw dataset: the four modalities and the label overlay, axial slice through the tumour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    folder = Path(dataset)
    label_files = sorted((folder / "labelsTr").glob("*.nii.gz"))
    if not label_files:
        raise FileNotFoundError(f"no label files in {folder / 'labelsTr'}")
    label_file = folder / "labelsTr" / f"{case}.nii.gz" if case else label_files[0]
    identifier = label_file.name[: -len(".nii.gz")]
    labels = np.asarray(nib.load(label_file).dataobj)
    z = int(np.argmax((labels > 0).sum((0, 1)))) if labels.any() else labels.shape[2] // 2
    channels = [np.asarray(nib.load(folder / "imagesTr" / f"{identifier}_{c:04d}.nii.gz").dataobj)[:, :, z]
                for c in range(mods.NUM_MODALITIES)]
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.6))
    for ax, image, title in zip(axes[:4], channels, mods.DISPLAY_NAMES, strict=True):
        ax.imshow(np.rot90(image), cmap="gray")
        ax.set_title(title)
    axes[4].imshow(np.rot90(channels[3]), cmap="gray")
    overlay = np.ma.masked_equal(np.rot90(labels[:, :, z]), 0)
    axes[4].imshow(overlay, cmap=ListedColormap(["gold", "tab:red", "deepskyblue"]), vmin=1, vmax=3, alpha=0.6,
                   interpolation="nearest")
    axes[4].set_title("labels: edema / necrosis / enhancing", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{identifier} (axial slice {z})")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
