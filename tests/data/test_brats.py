"""BraTS conversion: round trip with missing sequences, and every kind of bad input (clear error, nothing written)."""

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.data.brats import LAYOUTS, BratsConversionError, convert_brats, write_brats_case
from nnunet_missingmod.data.nifti import OverwriteRefusedError, write_nifti
from nnunet_missingmod.data.phantom import generate_case
from tests.conftest import FAST_CONFIG


def _array(path):
    return np.asarray(nib.load(path).dataobj)


def test_round_trip_with_missing_sequences(phantom_with_brats, tmp_path):
    phantom, brats = phantom_with_brats
    present = json.loads((brats / "sequences_present.json").read_text())
    assert any(len(v) < 4 for v in present.values()), "the fixture should have missing sequences"
    out = convert_brats(brats, 982, "Converted", raw_folder=tmp_path, progress=False)

    availability = json.loads((out / "modality_availability.json").read_text())
    assert availability["modalities"] == ["t1", "t1ce", "t2", "flair"]
    assert availability["cases"] == present
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == len(present)
    assert meta["regions_class_order"] == [1, 2, 3]

    for index, (case, sequences) in enumerate(sorted(present.items())):
        source = phantom / "imagesTr" / f"Phantom_{index:04d}_0000.nii.gz"
        reference = sitk.ReadImage(str(source))
        for channel, name in enumerate(mods.MODALITIES):
            converted_file = out / "imagesTr" / f"{case}_{channel:04d}.nii.gz"
            converted = sitk.ReadImage(str(converted_file))
            # geometry preserved for every channel, also the zero-filled ones
            assert converted.GetSize() == reference.GetSize()
            np.testing.assert_allclose(converted.GetSpacing(), reference.GetSpacing())
            np.testing.assert_allclose(converted.GetOrigin(), reference.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(converted.GetDirection(), reference.GetDirection(), atol=1e-6)
            original = _array(phantom / "imagesTr" / f"Phantom_{index:04d}_{channel:04d}.nii.gz")
            if name in sequences:
                np.testing.assert_array_equal(_array(converted_file), original)
            else:
                assert not np.any(_array(converted_file)), f"{case} {name} should be zero-filled"
        # labels back in the nnU-Net convention
        np.testing.assert_array_equal(_array(out / "labelsTr" / f"{case}.nii.gz"),
                                      _array(phantom / "labelsTr" / f"Phantom_{index:04d}.nii.gz"))


def _write_case(folder, name, layout="2021", present=(0, 1, 2, 3), with_seg=True, seed=0):
    case = generate_case(seed, 0, FAST_CONFIG)
    write_brats_case(folder, name, case.images, case.labels if with_seg else None, case.affine,
                     present=list(present), layout=layout)
    return case


def test_2023_layout_and_cases_without_segmentation(tmp_path):
    src = tmp_path / "src"
    case = _write_case(src, "BraTS-GLI-00001-000", layout="2023", present=(1, 3))
    _write_case(src, "BraTS-GLI-00002-000", layout="2023", present=(0,), with_seg=False)
    out = convert_brats(src, 983, "B23", raw_folder=tmp_path / "raw", progress=False)
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"BraTS-GLI-00002-000_{c:04d}.nii.gz"
                                                                   for c in range(4)]
    np.testing.assert_array_equal(_array(out / "labelsTr" / "BraTS-GLI-00001-000.nii.gz"), case.labels)
    availability = json.loads((out / "modality_availability.json").read_text())["cases"]
    assert availability == {"BraTS-GLI-00001-000": ["t1ce", "flair"], "BraTS-GLI-00002-000": ["t1"]}
    # 2023 labels 1 NCR, 2 ED, 3 ET map to 2, 1, 3
    assert LAYOUTS["2023"].label_map == {1: 2, 2: 1, 3: 3}


def _modify(path, fn):
    image = sitk.ReadImage(str(path))
    image = fn(image)
    sitk.WriteImage(image, str(path))


def _with_spacing(image):
    image.SetSpacing((4.0, 4.0, 5.0))
    return image


def _with_origin(image):
    image.SetOrigin(tuple(o + 3 for o in image.GetOrigin()))
    return image


def _with_direction(image):
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    return image


def _with_shape(image):
    return image[:-2, :, :]


def _with_label_5(image):
    array = sitk.GetArrayFromImage(image)
    array[array.shape[0] // 2, array.shape[1] // 2, array.shape[2] // 2] = 5
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    path.write_bytes(gzip.compress(b"this is not a nifti file" * 20))


def _with_non_finite(path):
    image = nib.load(path)
    array = np.asanyarray(image.dataobj).astype(np.float32)
    array[5, 6, 7], array[-1, -1, -1] = np.nan, -np.inf
    write_nifti(path, array, image.affine)


@pytest.mark.parametrize("target, damage, message", [
    ("t2", lambda p: _modify(p, _with_spacing), "spacing"),
    ("flair", lambda p: _modify(p, _with_origin), "origin"),
    ("t1ce", lambda p: _modify(p, _with_direction), "direction"),
    ("t1", lambda p: _modify(p, _with_shape), "shape"),
    ("seg", lambda p: _modify(p, _with_spacing), "spacing"),
    ("seg", lambda p: _modify(p, _with_label_5), "label values [5]"),
    ("t2", _truncate, "truncated"),
    ("flair", _garbage, "cannot read"),
    ("t1ce", _with_non_finite, "has 2 NaN/Inf voxel(s)"),
    ("seg", _with_non_finite, "has 2 NaN/Inf voxel(s)"),
])
def test_bad_case_gives_clear_error_and_writes_nothing(tmp_path, target, damage, message):
    src, raw = tmp_path / "src", tmp_path / "raw"
    _write_case(src, "BraTS2021_00001")
    _write_case(src, "BraTS2021_00002", seed=1)
    bad = src / "BraTS2021_00002" / f"BraTS2021_00002_{target}.nii.gz"
    damage(bad)
    with pytest.raises(BratsConversionError) as error:
        convert_brats(src, 984, "Bad", raw_folder=raw, progress=False)
    text = str(error.value)
    assert "BraTS2021_00002" in text and bad.name in text and message in text, text
    assert not raw.exists() or not any(raw.iterdir()), f"something was written: {list(raw.iterdir())}"


def test_case_without_any_sequence(tmp_path):
    src = tmp_path / "src"
    _write_case(src, "BraTS2021_00001")
    _write_case(src, "BraTS2021_00007", present=(0,))
    (src / "BraTS2021_00007" / "BraTS2021_00007_t1.nii.gz").unlink()
    with pytest.raises(BratsConversionError, match="BraTS2021_00007: no image sequence"):
        convert_brats(src, 985, "Empty", raw_folder=tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


def test_unrecognised_file_name(tmp_path):
    src = tmp_path / "src"
    _write_case(src, "BraTS2021_00001")
    case_dir = src / "BraTS2021_00001"
    shutil.copy(case_dir / "BraTS2021_00001_t2.nii.gz", case_dir / "BraTS2021_00001_pd.nii.gz")
    with pytest.raises(BratsConversionError, match="BraTS2021_00001.*BraTS2021_00001_pd.nii.gz"):
        convert_brats(src, 986, "Odd", raw_folder=tmp_path / "raw", progress=False)


def test_existing_dataset_needs_overwrite_and_input_is_untouched(tmp_path):
    src = tmp_path / "src"
    _write_case(src, "BraTS2021_00001", present=(1, 2))
    before = {p: p.read_bytes() for p in src.rglob("*.nii.gz")}
    out = convert_brats(src, 987, "Again", raw_folder=tmp_path / "raw", progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_brats(src, 987, "Again", raw_folder=tmp_path / "raw", progress=False)
    with pytest.raises(FileExistsError, match="already used by Dataset987_Again"):
        convert_brats(src, 987, "Other", raw_folder=tmp_path / "raw", progress=False)
    convert_brats(src, 987, "Again", raw_folder=tmp_path / "raw", overwrite=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [out.name]
    assert {p: p.read_bytes() for p in src.rglob("*.nii.gz")} == before


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    from nnunet_missingmod.cli import main

    src = tmp_path / "src"
    _write_case(src, "BraTS2021_00003", present=(0, 3))
    _modify(src / "BraTS2021_00003" / "BraTS2021_00003_flair.nii.gz", _with_origin)
    code = main(["convert-brats", str(src), "--dataset-id", "988", "--name", "Cli", "--raw", str(tmp_path / "raw")])
    err = capsys.readouterr().err
    assert code == 2
    assert "convert-brats: error: case BraTS2021_00003: BraTS2021_00003_flair.nii.gz has origin" in err
    assert not (tmp_path / "raw").exists()


def _nested_case(src):
    _write_case(src / "HGG", "BraTS2021_00011")
    return src / "HGG"


def _empty_case(src):
    (src / "BraTS2021_00012").mkdir()
    return src / "BraTS2021_00012"


def _loose_file(src):
    shutil.copy(src / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz", src / "BraTS2021_00013_t1.nii.gz")
    return src / "BraTS2021_00013_t1.nii.gz"


def _non_nifti_case(src):
    (src / "BraTS2021_00014").mkdir()
    for name in ("BraTS2021_00014_t1.mha", "BraTS2021_00014_t2.nrrd"):
        (src / "BraTS2021_00014" / name).write_bytes(b"...")
    return src / "BraTS2021_00014"


def _broken_sequence_link(src):
    link = src / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz"
    link.unlink(missing_ok=True)
    link.symlink_to(src / "gone" / "t2.nii.gz")
    return link


def _broken_case_link(src):
    (src / "BraTS2021_00015").symlink_to(src / "moved_away")
    return src / "BraTS2021_00015"


UNRECOGNISED = {"nested case": (_nested_case, "holds only folders"), "empty case": (_empty_case, "empty folder"),
                "loose file": (_loose_file, "a NIfTI file loose in the source folder"),
                "no NIfTI": (_non_nifti_case, "no .nii/.nii.gz file"),
                "broken sequence link": (_broken_sequence_link, "broken symbolic link"),
                "broken case link": (_broken_case_link, "broken symbolic link")}


@pytest.mark.parametrize("kind", list(UNRECOGNISED))
def test_entries_that_are_not_cases_stop_the_conversion(tmp_path, kind):
    """Each of these was silently dropped (or, for a broken link, taken as a missing sequence)."""
    src, raw = tmp_path / "src", tmp_path / "raw"
    _write_case(src, "BraTS2021_00001")
    make, reason = UNRECOGNISED[kind]
    offending = make(src)
    with pytest.raises(BratsConversionError) as error:
        convert_brats(src, 989, "Unrecognised", raw_folder=raw, progress=False)
    assert f"{offending} ({reason}" in str(error.value), str(error.value)
    assert "1 entry is not a BraTS case folder" in str(error.value)
    assert not raw.exists()


def test_every_offending_entry_is_listed_and_harmless_extras_are_ignored(tmp_path):
    src, raw = tmp_path / "src", tmp_path / "raw"
    _write_case(src, "BraTS2021_00001", present=(0, 3))
    (src / "name_mapping.csv").write_text("BraTS2021_00001,...\n")  # BraTS ships such tables beside the cases
    (src / ".DS_Store").write_bytes(b"\0")
    (src / "BraTS2021_00001" / ".DS_Store").write_bytes(b"\0")
    out = convert_brats(src, 990, "Extras", raw_folder=raw, progress=False)
    assert json.loads((out / "modality_availability.json").read_text())["cases"] == {"BraTS2021_00001": ["t1", "flair"]}
    offending = [make(src) for make, _ in UNRECOGNISED.values()]
    with pytest.raises(BratsConversionError) as error:
        convert_brats(src, 991, "All", raw_folder=raw, progress=False)
    text = str(error.value)
    assert f"{len(offending)} entries are not a BraTS case folder" in text
    assert all(str(path) in text for path in offending), text
    assert sorted(p.name for p in raw.iterdir()) == [out.name]


def test_sequence_in_another_format_is_not_taken_as_missing(tmp_path):
    src = tmp_path / "src"
    _write_case(src, "BraTS2021_00001", present=(0, 1, 3))
    image = sitk.ReadImage(str(src / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz"))
    sitk.WriteImage(image, str(src / "BraTS2021_00001" / "BraTS2021_00001_t2.mha"))
    with pytest.raises(BratsConversionError, match=r"case BraTS2021_00001: \['BraTS2021_00001_t2.mha'\] named like "
                                                   r"BraTS sequences but not .nii/.nii.gz"):
        convert_brats(src, 992, "Mha", raw_folder=tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


def test_overwrite_refuses_a_dataset_this_package_did_not_write(tmp_path, capsys):
    from nnunet_missingmod.cli import main

    src, raw = tmp_path / "src", tmp_path / "raw"
    _write_case(src, "BraTS2021_00001")
    foreign = raw / "Dataset993_Foreign"
    (foreign / "imagesTr").mkdir(parents=True)
    (foreign / "imagesTr" / "case_0000.nii.gz").write_bytes(b"someone's data")
    (foreign / "dataset.json").write_text(json.dumps({"name": "Foreign", "channel_names": {"0": "CT"}}))
    code = main(["convert-brats", str(src), "--dataset-id", "993", "--name", "Foreign", "--raw", str(raw),
                 "--overwrite", "-np", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"nnunet_missingmod convert-brats: error: refusing to overwrite {foreign}: "
                                        f"its dataset.json has no converted_by"), err
    assert (foreign / "imagesTr" / "case_0000.nii.gz").read_bytes() == b"someone's data"
    assert sorted(p.name for p in raw.iterdir()) == [foreign.name]
    with pytest.raises(OverwriteRefusedError):
        convert_brats(src, 993, "Foreign", raw_folder=raw, overwrite=True, progress=False)


def test_zero_processes_is_an_error(tmp_path, capsys):
    from nnunet_missingmod.cli import main

    src = tmp_path / "src"
    _write_case(src, "BraTS2021_00001")
    with pytest.raises(SystemExit) as exit_:
        main(["convert-brats", str(src), "--dataset-id", "994", "--name", "Np", "--raw", str(tmp_path / "raw"),
              "-np", "0"])
    assert exit_.value.code == 2 and "-np/--num-processes: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 1, got 0"):
        convert_brats(src, 994, "Np", raw_folder=tmp_path / "raw", num_processes=0, progress=False)
    assert not (tmp_path / "raw").exists()
