"""Phantom generator: determinism, dataset format, MR contrast orderings measured per region, variety."""

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.data.nifti import OverwriteRefusedError
from nnunet_missingmod.data.phantom import PhantomConfig, generate_case, make_phantom_dataset
from tests.conftest import FAST_CONFIG

T1, T1CE, T2, FLAIR = range(4)


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.nii.gz"))}


def test_same_seed_gives_bit_identical_files(tmp_path):
    kwargs = dict(num_cases=2, num_test=1, config=FAST_CONFIG, progress=False)
    a = make_phantom_dataset(971, seed=5, raw_folder=tmp_path / "a", **kwargs)
    b = make_phantom_dataset(971, seed=5, raw_folder=tmp_path / "b", **kwargs)
    c = make_phantom_dataset(971, seed=6, raw_folder=tmp_path / "c", **kwargs)
    assert _digests(a) == _digests(b)
    assert len(_digests(a)) == 3 * 4 + 3
    differing = [k for k, v in _digests(a).items() if _digests(c)[k] != v]
    assert len(differing) == len(_digests(a))


def test_dataset_layout_and_json(phantom_with_brats):
    dataset, _ = phantom_with_brats
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}
    assert meta["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                              "enhancing tumor": [3]}
    assert meta["regions_class_order"] == [1, 2, 3]
    assert meta["numTraining"] == 6 and meta["file_ending"] == ".nii.gz"
    images = sorted((dataset / "imagesTr").iterdir())
    assert len(images) == 24 and images[0].name == "Phantom_0000_0000.nii.gz"
    availability = json.loads((dataset / "modality_availability.json").read_text())
    assert availability["cases"]["Phantom_0003"] == list(mods.MODALITIES)
    image = nib.load(images[0])
    assert image.header.get_zooms() == (4.0, 4.0, 4.0)
    label = nib.load(dataset / "labelsTr" / "Phantom_0000.nii.gz")
    np.testing.assert_allclose(label.affine, image.affine)
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2, 3}


def _median(image, mask):
    assert mask.sum() >= 5, "region too small to measure"
    return float(np.median(image[mask]))


def _regions(case):
    """Measurement regions away from partial-volume edges: pure tissue, and tumour labels eroded by one voxel."""
    labels, tissue = case.labels, case.tissue
    healthy = ndimage.binary_erosion(labels == 0)

    def interior(label):
        return ndimage.binary_erosion(labels == label)

    return {
        "wm": healthy & (tissue["wm"] > 0.95),
        "gm": healthy & (tissue["gm"] > 0.9),
        "csf": healthy & (tissue["csf"] > 0.9),
        "edema": interior(mods.LABEL_EDEMA),
        "core2": interior(mods.LABEL_NECROSIS),
        "enhancing": interior(mods.LABEL_ENHANCING),
    }


@pytest.fixture(scope="module")
def cases_2mm():
    """One case of each tumour type at the default 2 mm, each with measurable (>= 20 interior voxels) regions."""
    found = {}
    for index in range(20):
        case = generate_case(11, index, PhantomConfig())
        kind = case.info["tumour_type"]
        needed = ["edema", "core2"] + (["enhancing"] if kind != "non_enhancing" else [])
        if kind not in found and all(_regions(case)[r].sum() >= 20 for r in needed):
            found[kind] = case
        if len(found) == 3:
            return found
    raise AssertionError(f"expected measurable cases of all three tumour types among 20, got {sorted(found)}")


@pytest.mark.parametrize("tumour_type", ["necrotic", "solid", "non_enhancing"])
def test_contrast_orderings_follow_mr_physics(cases_2mm, tumour_type):
    case = cases_2mm[tumour_type]
    regions = {k: v for k, v in _regions(case).items() if v.sum() >= 5}
    m = {k: [_median(case.images[c], v) for c in range(4)] for k, v in regions.items()}
    # T1: WM > GM > CSF; the tumour is hypo-intense
    assert m["wm"][T1] > m["gm"][T1] > m["csf"][T1]
    assert all(m[k][T1] < m["wm"][T1] for k in ("edema", "core2", "enhancing") if k in m)
    # T2: CSF > GM > WM; edema and necrosis are bright
    assert m["csf"][T2] > m["gm"][T2] > m["wm"][T2]
    assert m["edema"][T2] > m["gm"][T2] and m["core2"][T2] > m["gm"][T2]
    # FLAIR: CSF dark; edema is the brightest structure
    assert m["csf"][FLAIR] < m["wm"][FLAIR] and m["csf"][FLAIR] < m["gm"][FLAIR]
    assert all(m["edema"][FLAIR] > m[k][FLAIR] for k in m if k != "edema")
    if "enhancing" in m:
        # T1ce: enhancing tumour is the brightest structure ...
        assert all(m["enhancing"][T1CE] > m[k][T1CE] for k in m if k != "enhancing")
        # ... and it stands out from the rest of the core on T1ce only
        if tumour_type == "solid":
            def separation(c):
                return abs(m["enhancing"][c] - m["core2"][c]) / m["wm"][c]
            others = [separation(c) for c in (T1, T2, FLAIR)]
            assert separation(T1CE) > 0.4 and separation(T1CE) > 3 * max(others), (separation(T1CE), others)


def test_background_is_exactly_zero_and_brain_is_not(cases_2mm):
    case = cases_2mm["necrotic"]
    brain = (case.tissue["wm"] + case.tissue["gm"] + case.tissue["csf"]) > 0.5
    assert case.images.dtype == np.int16
    for channel in case.images:
        assert np.all(channel[~brain] == 0)
        assert np.all(channel[brain] > 0)
    assert not np.any(case.labels[~brain])


def test_variety_across_seeds():
    infos = [generate_case(0, i, PhantomConfig(spacing=3.0)).info for i in range(24)]
    types = {info["tumour_type"] for info in infos}
    assert types == {"necrotic", "solid", "non_enhancing"}
    wt = np.array([info["volume_cm3"]["WT"] for info in infos])
    assert wt.min() < 15 and wt.max() > 80, wt  # small and large tumours
    assert 2 <= wt.min() and wt.max() <= 400, wt
    assert any(info["volume_cm3"]["ET"] == 0 for info in infos)  # tumours without enhancement
    for info in infos:  # nested regions
        assert info["volume_cm3"]["WT"] >= info["volume_cm3"]["TC"] >= info["volume_cm3"]["ET"]


def test_existing_dataset_is_not_overwritten(tmp_path):
    kwargs = dict(num_cases=1, num_test=0, config=FAST_CONFIG, raw_folder=tmp_path, progress=False)
    folder = make_phantom_dataset(972, seed=0, **kwargs)
    before = _digests(folder)
    with pytest.raises(FileExistsError, match="already exists"):
        make_phantom_dataset(972, seed=1, **kwargs)
    assert _digests(folder) == before
    make_phantom_dataset(972, seed=1, overwrite=True, **kwargs)
    assert _digests(folder) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temporary folders left


def test_cli_writes_dataset_and_preview(tmp_path):
    from nnunet_missingmod.cli import main

    png = tmp_path / "preview.png"
    code = main(["phantom", "--dataset-id", "974", "--num-cases", "1", "--num-test", "1", "--spacing", "4",
                 "--raw", str(tmp_path / "raw"), "--preview", str(png), "-np", "1"])
    assert code == 0
    assert (tmp_path / "raw" / "Dataset974_BraTSPhantom" / "imagesTs" / "Phantom_0001_0003.nii.gz").is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def _all_files(folder):
    """Every file under ``folder`` with its bytes (the state that must survive a refused --overwrite)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_brats_layout_overwrite_never_deletes_the_raw_folder(tmp_path, capsys):
    """``phantom --brats-layout $nnUNet_raw --overwrite`` once deleted every dataset in nnUNet_raw."""
    from nnunet_missingmod.cli import main

    raw = tmp_path / "raw"
    make_phantom_dataset(973, num_cases=1, num_test=0, config=FAST_CONFIG, raw_folder=raw, progress=False)
    (raw / "Dataset500_Other").mkdir()
    (raw / "Dataset500_Other" / "dataset.json").write_text("{}")
    before = _all_files(raw)
    code = main(["phantom", "--dataset-id", "975", "--num-cases", "1", "--num-test", "0", "--spacing", "4",
                 "--raw", str(raw), "--brats-layout", str(raw), "--overwrite", "-np", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"nnunet_missingmod phantom: error: refusing to overwrite {raw}: it has no "
                          f"sequences_present.json") and "nothing was removed" in err and err.count("\n") == 1
    assert _all_files(raw) == before
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset500_Other", "Dataset973_BraTSPhantom"]


def test_brats_layout_overwrite_replaces_only_its_own_layout(tmp_path):
    kwargs = dict(num_cases=1, num_test=0, config=FAST_CONFIG, raw_folder=tmp_path / "raw", progress=False,
                  brats_layout=tmp_path / "brats", missing_rate=0.0)
    make_phantom_dataset(976, seed=0, **kwargs)
    first = _all_files(tmp_path / "brats")
    assert sorted(first) == ["BraTS-PHANTOM-00000/BraTS-PHANTOM-00000_" + s + ".nii.gz"
                             for s in ("flair", "seg", "t1", "t1ce", "t2")] + ["sequences_present.json"]
    make_phantom_dataset(976, seed=1, overwrite=True, **kwargs)  # its own layout: replaced
    second = _all_files(tmp_path / "brats")
    assert sorted(second) == sorted(first) and second != first
    # foreign content inside an otherwise recognised layout: refused, nothing removed
    (tmp_path / "brats" / "notes.txt").write_text("mine")
    before = _all_files(tmp_path / "brats"), _all_files(tmp_path / "raw")
    with pytest.raises(OverwriteRefusedError, match=r"brats: it also holds \['notes.txt'\]"):
        make_phantom_dataset(976, seed=2, overwrite=True, **kwargs)
    assert (_all_files(tmp_path / "brats"), _all_files(tmp_path / "raw")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brats", "raw"]
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset976_BraTSPhantom"]


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "dataset.json").write_text(json.dumps({"name": "x"})), "its dataset.json has no converted_by"),
    (lambda d: (d / "dataset.json").write_text(json.dumps({"converted_by": "someone else"})),
     "its dataset.json says converted_by 'someone else', not nnunet_missingmod"),
    (lambda d: (d / "dataset.json").write_text("{not json"), "its dataset.json cannot be read"),
    (lambda d: (d / "dataset.json").unlink(), "it has no dataset.json"),
    (lambda d: (d / "my_notes.txt").write_text("keep"), r"it also holds \['my_notes.txt'\]"),
])
def test_dataset_overwrite_only_replaces_a_dataset_this_package_wrote(tmp_path, damage, reason):
    kwargs = dict(num_cases=1, num_test=0, config=FAST_CONFIG, raw_folder=tmp_path, progress=False)
    folder = make_phantom_dataset(977, seed=0, **kwargs)
    damage(folder)
    before = _all_files(folder)
    with pytest.raises(OverwriteRefusedError, match=f"refusing to overwrite {folder}: {reason}"):
        make_phantom_dataset(977, seed=1, overwrite=True, **kwargs)
    assert _all_files(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_brats_layout_must_be_separate_from_the_dataset(tmp_path):
    raw = tmp_path / "work" / "raw"
    dataset = raw / "Dataset978_BraTSPhantom"
    for brats in (dataset, dataset / "brats", raw / ".." / "..", tmp_path / "work"):
        with pytest.raises(ValueError, match="must be separate folders"):
            make_phantom_dataset(978, num_cases=1, num_test=0, config=FAST_CONFIG, raw_folder=raw,
                                 brats_layout=brats, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value, message", [
    ("-np", "0", "argument -np/--num-processes: must be at least 1, got 0"),
    ("-np", "-3", "argument -np/--num-processes: must be at least 1, got -3"),
    ("--spacing", "0.1", "spacing must be between 0.5 and 6 mm, got 0.1"),
    ("--missing-rate", "1.5", "missing rate must be between 0 and 1, got 1.5"),
])
def test_invalid_options_are_one_line_errors(tmp_path, capsys, option, value, message):
    from nnunet_missingmod.cli import main

    argv = ["phantom", "--dataset-id", "979", "--num-cases", "1", "--num-test", "0", "--raw", str(tmp_path / "raw"),
            "--brats-layout", str(tmp_path / "brats"), option, value]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "raw").exists() and not (tmp_path / "brats").exists()
    with pytest.raises(ValueError, match="at least 1"):
        make_phantom_dataset(979, num_cases=1, raw_folder=tmp_path / "raw", num_processes=0, progress=False)
