"""The shared input-image check (truncation, NaN/Inf) and the overwrite rule of atomic output folders."""

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_missingmod.data.nifti import (
    InputImageError,
    OverwriteRefusedError,
    atomic_output_folder,
    check_image_file,
    write_nifti,
)

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _image(shape=(24, 20, 16), dtype=np.int16):
    return (np.arange(np.prod(shape)).reshape(shape) % 997 + 1).astype(dtype)


def test_complete_finite_images_pass(tmp_path):
    write_nifti(tmp_path / "int.nii.gz", _image(), AFFINE)
    write_nifti(tmp_path / "float.nii.gz", _image(dtype=np.float32), AFFINE)
    nib.save(nib.Nifti1Image(_image(dtype=np.float64), AFFINE), tmp_path / "plain.nii")
    for name in ("int.nii.gz", "float.nii.gz", "plain.nii"):
        check_image_file(tmp_path / name, "Case_1")


def test_truncated_gzip_is_refused_although_simpleitk_reads_it(tmp_path):
    file = tmp_path / "Case_1_0002.nii.gz"
    write_nifti(file, _image(), AFFINE)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    # the fault: SimpleITK returns an image padded with zeros, without any error
    padded = sitk.GetArrayFromImage(sitk.ReadImage(str(file)))
    assert padded.shape == _image().shape[::-1] and (padded == 0).any() and not (_image() == 0).any()
    with pytest.raises(InputImageError, match="case Case_1: cannot read .*Case_1_0002.nii.gz .*truncated"):
        check_image_file(file, "Case_1")


@pytest.mark.parametrize("name", ["short.nii.gz", "short.nii"])
def test_short_data_block_is_refused(tmp_path, name):
    """A well-formed stream (gzip or plain) with fewer voxel bytes than the header promises."""
    whole = nib.Nifti1Image(_image(), AFFINE).to_bytes()
    missing = 1000
    short = whole[:-missing]
    file = tmp_path / name
    file.write_bytes(gzip.compress(short) if name.endswith(".gz") else short)
    with pytest.raises(InputImageError) as error:
        check_image_file(file, "Case_9")
    expected = f"{len(short)} bytes of image data, the header needs {len(whole)}"
    assert f"case Case_9: {file} is truncated: {expected}" == str(error.value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.dtype(">f4")])
def test_nan_and_inf_voxels_are_counted_and_refused(tmp_path, dtype):
    # large enough for several read chunks, with bad voxels at the start, the end and a chunk boundary
    image = _image(shape=(128, 128, 72), dtype=np.float32).astype(dtype)
    flat = image.reshape(-1, order="F")
    chunk_voxels = (1 << 22) // np.dtype(dtype).itemsize
    bad = {0: np.nan, chunk_voxels - 1: np.inf, chunk_voxels: -np.inf, flat.size - 1: np.nan}
    for index, value in bad.items():
        flat[index] = value
    image = flat.reshape(image.shape, order="F")
    file = tmp_path / "Case_2_0003.nii.gz"
    write_nifti(file, image, AFFINE)
    expected = int((~np.isfinite(np.asanyarray(nib.load(file).dataobj))).sum())
    assert expected == len(bad)
    with pytest.raises(InputImageError, match=f"case Case_2: {file} has {expected} NaN/Inf voxel"):
        check_image_file(file, "Case_2")


def test_other_formats_are_left_to_their_reader(tmp_path):
    file = tmp_path / "image.mha"
    file.write_bytes(b"not checked here")
    check_image_file(file)


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_overwrite_refused_for_a_folder_the_recogniser_rejects(tmp_path):
    final = tmp_path / "out"
    (final / "sub").mkdir(parents=True)
    (final / "sub" / "keep.txt").write_text("precious")
    before = _tree(final)
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        with atomic_output_folder(final, recognise=lambda folder: None):
            pass
    with pytest.raises(OverwriteRefusedError, match=f"refusing to overwrite {final}: not ours"):
        with atomic_output_folder(final, overwrite=True, recognise=lambda folder: "not ours") as staging:
            pytest.fail(f"the refusal must come before the work starts ({staging})")
    # default recogniser: a dataset folder written by this package
    with pytest.raises(OverwriteRefusedError, match="it has no dataset.json"):
        with atomic_output_folder(final, overwrite=True):
            pass
    assert _tree(final) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_overwrite_refused_when_the_folder_changes_during_the_work(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "mine.txt").write_text("old")

    def recognise(folder):
        return None if sorted(p.name for p in folder.iterdir()) == ["mine.txt"] else "foreign content"

    with pytest.raises(OverwriteRefusedError, match="foreign content"):
        with atomic_output_folder(final, overwrite=True, recognise=recognise) as staging:
            (staging / "mine.txt").write_text("new")
            (final / "theirs.txt").write_text("written meanwhile")
    assert (final / "mine.txt").read_text() == "old" and (final / "theirs.txt").is_file()
    with atomic_output_folder(final, overwrite=True, recognise=lambda folder: None) as staging:
        (staging / "mine.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["mine.txt"] and (final / "mine.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_refuses_a_file(tmp_path):
    final = tmp_path / "out"
    final.write_text("a file")
    with pytest.raises(OverwriteRefusedError, match="it is not a folder"):
        with atomic_output_folder(final, overwrite=True, recognise=lambda folder: None):
            pass
    assert final.read_text() == "a file"


def test_new_folder_gets_ordinary_permissions(tmp_path):
    """The folder used to keep the private mode (0700) of its temporary name: unusable by colleagues."""
    import os
    import stat

    mask = os.umask(0o022)
    try:
        with atomic_output_folder(tmp_path / "out") as staging:
            (staging / "file.txt").write_text("x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
