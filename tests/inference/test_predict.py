"""Missing-modality prediction: same segmentation as nnUNetv2_predict on zero-filled files; clear errors."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_missingmod.data.nifti import InputImageError
from nnunet_missingmod.inference.predict import _channel_index_of_model, predict_folder
from tests.conftest import E2E_DATASET, E2E_NAME, nnunet_script, run_checked

KEPT = (1, 3)  # t1ce + flair


def _model(work):
    return work / "nnUNet_results" / E2E_NAME / "ModalityDropoutTrainer__nnUNetPlans__3d_cpu"


def _labels(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def folders(trained_model, tmp_path_factory):
    """imagesTs copied twice: with only t1ce/flair files, and with zero-filled t1/t2 files."""
    work, _, _ = trained_model
    source = work / "nnUNet_raw" / E2E_NAME / "imagesTs"
    base = tmp_path_factory.mktemp("subsets")
    sparse, zero_filled = base / "sparse", base / "zero_filled"
    sparse.mkdir()
    zero_filled.mkdir()
    for file in sorted(source.glob("*.nii.gz")):
        channel = int(file.name[-11:-7])
        if channel in KEPT:
            shutil.copy(file, sparse / file.name)
            shutil.copy(file, zero_filled / file.name)
        else:
            image = sitk.ReadImage(str(file))
            zeros = sitk.Image(image.GetSize(), image.GetPixelID())
            zeros.CopyInformation(image)
            sitk.WriteImage(zeros, str(zero_filled / file.name))
    return work, source, sparse, zero_filled


def test_same_segmentation_as_nnunet_predict_on_zero_filled_files(folders, tmp_path):
    work, source, sparse, zero_filled = folders
    env = json.loads((work / "env.json").read_text())
    run_checked([nnunet_script("nnUNetv2_predict"), "-i", str(zero_filled), "-o", str(tmp_path / "nnunet"),
                 "-d", str(E2E_DATASET), "-c", "3d_cpu", "-f", "0", "-tr", "ModalityDropoutTrainer",
                 "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    ours = predict_folder(sparse, tmp_path / "ours", _model(work), folds=[0], use_mirroring=False, progress=False)
    explicit = predict_folder(source, tmp_path / "explicit", _model(work), folds=[0], use_mirroring=False,
                              available=KEPT, progress=False)
    assert ours == explicit == ["Phantom_0005", "Phantom_0006"]
    for case in ours:
        reference = _labels(tmp_path / "nnunet" / f"{case}.nii.gz")
        np.testing.assert_array_equal(_labels(tmp_path / "ours" / f"{case}.nii.gz"), reference)
        np.testing.assert_array_equal(_labels(tmp_path / "explicit" / f"{case}.nii.gz"), reference)
    used = json.loads((tmp_path / "ours" / "modalities_used.json").read_text())
    assert used == {"Phantom_0005": ["t1ce", "flair"], "Phantom_0006": ["t1ce", "flair"]}


def test_availability_file_is_honoured(folders, tmp_path):
    work, source, _, _ = folders
    manifest = tmp_path / "availability.json"
    manifest.write_text(json.dumps({"cases": {"Phantom_0005": ["flair"], "Phantom_0006": ["t1", "t2"]}}))
    predict_folder(source, tmp_path / "out", _model(work), folds=[0], use_mirroring=False,
                   availability_file=manifest, progress=False)
    used = json.loads((tmp_path / "out" / "modalities_used.json").read_text())
    assert used == {"Phantom_0005": ["flair"], "Phantom_0006": ["t1", "t2"]}


def test_geometry_mismatch_is_reported_and_nothing_written(folders, tmp_path):
    work, _, sparse, _ = folders
    broken = tmp_path / "broken"
    shutil.copytree(sparse, broken)
    file = broken / "Phantom_0006_0003.nii.gz"
    image = sitk.ReadImage(str(file))
    image.SetSpacing((4.0, 4.0, 4.5))
    sitk.WriteImage(image, str(file))
    with pytest.raises(InputImageError, match="case Phantom_0006: Phantom_0006_0003.nii.gz .* spacing"):
        predict_folder(broken, tmp_path / "out", _model(work), folds=[0], use_mirroring=False, progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_file_for_available_modality_and_empty_case(folders, tmp_path):
    work, _, sparse, _ = folders
    with pytest.raises(InputImageError, match="case Phantom_0005: --available names \\['t2'\\]"):
        predict_folder(sparse, tmp_path / "out", _model(work), folds=[0], available=(2,), progress=False)
    manifest = tmp_path / "availability.json"
    manifest.write_text(json.dumps({"cases": {"Phantom_0005": ["t1"]}}))  # t1 has no file here
    with pytest.raises(InputImageError, match="case Phantom_0005: none of the modalities"):
        predict_folder(sparse, tmp_path / "out", _model(work), folds=[0], availability_file=manifest, progress=False)
    assert not (tmp_path / "out").exists()


def test_model_with_other_channels_is_refused():
    with pytest.raises(ValueError, match="the model expects channels \\['CT'\\]"):
        _channel_index_of_model({"channel_names": {"0": "CT"}})
    assert _channel_index_of_model({"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}}) == [0, 1, 2, 3]


def test_exported_zip_installs_and_predicts_elsewhere(folders, tmp_path):
    work, source, _, _ = folders
    env = json.loads((work / "env.json").read_text())
    archive = tmp_path / "model.zip"
    run_checked([nnunet_script("nnUNetv2_export_model_to_zip"), "-d", str(E2E_DATASET), "-o", str(archive),
                 "-c", "3d_cpu", "-tr", "ModalityDropoutTrainer", "-f", "0"], env)
    elsewhere = dict(env, nnUNet_results=str(tmp_path / "other_results"))
    run_checked([nnunet_script("nnUNetv2_install_pretrained_model_from_zip"), str(archive)], elsewhere)
    installed = tmp_path / "other_results" / E2E_NAME / "ModalityDropoutTrainer__nnUNetPlans__3d_cpu"
    assert (installed / "fold_0" / "checkpoint_final.pth").is_file()
    run_checked([nnunet_script("nnUNetv2_predict"), "-i", str(source), "-o", str(tmp_path / "pred"),
                 "-d", str(E2E_DATASET), "-c", "3d_cpu", "-f", "0", "-tr", "ModalityDropoutTrainer",
                 "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], elsewhere)
    for case in ("Phantom_0005", "Phantom_0006"):
        np.testing.assert_array_equal(_labels(tmp_path / "pred" / f"{case}.nii.gz"),
                                      _labels(work / "predictions" / f"{case}.nii.gz"))


def test_postprocessing_is_applied_to_the_written_segmentations(folders, tmp_path):
    import pickle

    from nnunet_missingmod.evaluation.postprocessing import relabel_small_label

    work, _, sparse, _ = folders
    pkl = tmp_path / "postprocessing.pkl"  # every edema voxel becomes core
    pkl.write_bytes(pickle.dumps(([relabel_small_label], [{"label": 1, "replace_with": 2, "min_voxels": 10**9}])))
    plain = predict_folder(sparse, tmp_path / "plain", _model(work), folds=[0], use_mirroring=False, progress=False)
    processed = predict_folder(sparse, tmp_path / "pp", _model(work), folds=[0], use_mirroring=False, progress=False,
                               postprocessing=pkl)
    assert processed == plain
    for case in plain:
        before, after = _labels(tmp_path / "plain" / f"{case}.nii.gz"), _labels(tmp_path / "pp" / f"{case}.nii.gz")
        assert (before == 1).any()  # the model predicts edema, so the relabelling is put to the test
        np.testing.assert_array_equal(after, np.where(before == 1, 2, before))
        reference = sitk.ReadImage(str(tmp_path / "plain" / f"{case}.nii.gz"))
        written = sitk.ReadImage(str(tmp_path / "pp" / f"{case}.nii.gz"))
        assert written.GetSpacing() == reference.GetSpacing() and written.GetOrigin() == reference.GetOrigin()
