"""Shared fixtures: small phantom datasets generated once per session (no network, no GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_missingmod.config import OVERRIDE_ENV
from nnunet_missingmod.data.phantom import PhantomConfig, make_phantom_dataset
from nnunet_missingmod.data.plans import add_cpu_configuration
from nnunet_missingmod.demo import nnunet_environment

#: Coarse phantoms keep conversion and pipeline tests fast; contrast tests use the default 2 mm.
FAST_CONFIG = PhantomConfig(spacing=4.0, padding_mm=16.0)


@pytest.fixture(autouse=True)
def _small_machine(monkeypatch):
    """Keep nnU-Net and our pools at two processes, as on the CI machine."""
    monkeypatch.setenv("nnUNet_def_n_proc", "2")
    monkeypatch.setenv("nnUNet_n_proc_DA", os.environ.get("nnUNet_n_proc_DA", "2"))


@pytest.fixture(scope="session")
def phantom_with_brats(tmp_path_factory) -> tuple[Path, Path]:
    """A 6-case phantom dataset at 4 mm plus the same cases in the BraTS 2021 layout with half the files missing."""
    base = tmp_path_factory.mktemp("phantom_brats")
    dataset = make_phantom_dataset(981, num_cases=6, num_test=0, seed=3, config=FAST_CONFIG,
                                   raw_folder=base / "raw", brats_layout=base / "brats",
                                   missing_rate=0.5, progress=False)
    return dataset, base / "brats"


E2E_DATASET = 980
E2E_NAME = f"Dataset{E2E_DATASET:03d}_BraTSPhantom"


def nnunet_script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run_checked(command: list[str], env: dict) -> str:
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(command)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    """Phantoms -> nnUNetv2_plan_and_preprocess -> 3d_cpu -> nnUNetv2_train (1 short epoch) -> nnUNetv2_predict.

    Returns (work folder with nnUNet_raw/_preprocessed/_results and env.json, prediction folder, training log).
    """
    work = tmp_path_factory.mktemp("e2e")
    override = work / "override.json"
    override.write_text(json.dumps({"nnunet": {"num_epochs": 1, "num_iterations_per_epoch": 4,
                                               "num_val_iterations_per_epoch": 2},
                                    "inference": {"test_time_mirroring": False}}))
    env = nnunet_environment(work, num_processes=2, extra={OVERRIDE_ENV: str(override), "nnUNet_n_proc_DA": "1"})
    make_phantom_dataset(E2E_DATASET, num_cases=5, num_test=2, seed=1, config=FAST_CONFIG,
                         raw_folder=work / "nnUNet_raw", progress=False)
    run_checked([nnunet_script("nnUNetv2_plan_and_preprocess"), "-d", str(E2E_DATASET), "-c", "3d_fullres",
                 "-np", "2", "--verify_dataset_integrity"], env)
    add_cpu_configuration(E2E_DATASET, patch_size=(32, 32, 32), features_per_stage=(8, 16, 32),
                          preprocessed_folder=work / "nnUNet_preprocessed")
    train_log = run_checked([nnunet_script("nnUNetv2_train"), str(E2E_DATASET), "3d_cpu", "0",
                             "-tr", "ModalityDropoutTrainer", "-device", "cpu"], env)
    predictions = work / "predictions"
    run_checked([nnunet_script("nnUNetv2_predict"), "-i", str(work / "nnUNet_raw" / E2E_NAME / "imagesTs"),
                 "-o", str(predictions), "-d", str(E2E_DATASET), "-c", "3d_cpu", "-f", "0",
                 "-tr", "ModalityDropoutTrainer", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    (work / "env.json").write_text(json.dumps(env))
    return work, predictions, train_log




def make_trainer(work: Path, monkeypatch, trainer_class: type, dataset_json: dict | None = None):
    """An in-process trainer on the ``trained_model`` fixture's 3d_cpu plans (results in a separate folder)."""
    import torch

    monkeypatch.setenv("nnUNet_results", str(work / "inprocess_results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(work / "nnUNet_preprocessed"))
    plans = json.loads((work / "nnUNet_preprocessed" / E2E_NAME / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnU-Net's trainer pops it (run_training inserts it)
    if dataset_json is None:
        dataset_json = json.loads((work / "nnUNet_preprocessed" / E2E_NAME / "dataset.json").read_text())
    return trainer_class(plans, "3d_cpu", 0, dataset_json, torch.device("cpu"))


#: ``network_class_name`` of nnU-Net's two U-Net families (the ResEnc presets write the second).
PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def tiny_plans(network_class_name: str = PLAIN_UNET, *, patch_size=(16, 16, 16),
               features_per_stage=(4, 8, 16), batch_size: int = 2) -> dict:
    """A hand-written nnU-Net plans dict (configuration ``3d_tiny``) with a tiny network: no planning needed.

    ``network_class_name`` picks the plain U-Net or the residual-encoder U-Net of nnU-Net's ResEnc presets
    (``n_blocks_per_stage`` instead of ``n_conv_per_stage``).
    """
    from nnunet_missingmod import modalities as mods

    stages = len(features_per_stage)
    dims = len(patch_size)
    arch_kwargs = {
        "n_stages": stages, "features_per_stage": list(features_per_stage),
        "conv_op": "torch.nn.modules.conv.Conv3d" if dims == 3 else "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3] * dims] * stages, "strides": [[1] * dims] + [[2] * dims] * (stages - 1),
        "n_conv_per_stage_decoder": [1] * (stages - 1), "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d" if dims == 3 else
                   "torch.nn.modules.instancenorm.InstanceNorm2d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    if network_class_name.endswith("ResidualEncoderUNet"):
        arch_kwargs["n_blocks_per_stage"] = [1] + [2] * (stages - 1)
    else:
        arch_kwargs["n_conv_per_stage"] = [1] * stages
    configuration = {
        "data_identifier": "nnUNetPlans_3d_tiny", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size, "patch_size": list(patch_size), "median_image_size_in_voxels": [32] * dims,
        "spacing": [1.0] * dims, "normalization_schemes": ["ZScoreNormalization"] * mods.NUM_MODALITIES,
        "use_mask_for_norm": [True] * mods.NUM_MODALITIES,
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {"network_class_name": network_class_name, "arch_kwargs": arch_kwargs,
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0] * dims, "original_median_shape_after_transp": [32] * dims,
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(range(dims)),
        "transpose_backward": list(range(dims)), "configurations": {"3d_tiny": configuration},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
    }


def tiny_dataset_json() -> dict:
    """``dataset.json`` of a BraTS-like dataset (4 channels, region-based labels) for :func:`tiny_plans`."""
    from nnunet_missingmod import modalities as mods

    return {"channel_names": dict(mods.CHANNEL_NAMES), "labels": dict(mods.DATASET_LABELS),
            "regions_class_order": list(mods.REGIONS_CLASS_ORDER), "numTraining": 2, "file_ending": ".nii.gz"}


def make_tiny_trainer(trainer_class: type, tmp_path: Path, monkeypatch, network_class_name: str = PLAIN_UNET,
                      dataset_json: dict | None = None, **plans_kwargs):
    """A CPU trainer on :func:`tiny_plans`, ready for ``initialize()`` (no data: transforms, networks and steps).

    The preprocessed folder holds one empty ``.b2nd`` file, only so that ``initialize`` can infer nnU-Net's
    dataset class; nothing reads it unless the data loaders are started. ``dataset_json`` defaults to
    :func:`tiny_dataset_json`.
    """
    import torch

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    data_folder = tmp_path / "preprocessed" / "Dataset999_Tiny" / "nnUNetPlans_3d_tiny"
    data_folder.mkdir(parents=True, exist_ok=True)
    (data_folder / "placeholder.b2nd").touch()
    plans = tiny_plans(network_class_name, **plans_kwargs)
    plans["continue_training"] = False  # nnU-Net's trainer pops it (run_training inserts it)
    return trainer_class(plans, "3d_tiny", 0, dataset_json or tiny_dataset_json(), torch.device("cpu"))


SYNTHESIS_DATASET = 984
SYNTHESIS_NAME = f"Dataset{SYNTHESIS_DATASET:03d}_BraTSPhantom"
SYNTHESIS_CONFIGURATION = "2d_cpu"
#: Settings of both trainers in the end-to-end run: one short epoch on tiny 2D patches.
SYNTHESIS_OVERRIDE = {
    "nnunet": {"num_epochs": 1, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 2},
    "adversarial": {"n_critic": 2},
}


@pytest.fixture(scope="session")
def trained_synthesis_model(tmp_path_factory):
    """Phantoms -> nnUNetv2_plan_and_preprocess -c 2d -> add-cpu-config --parent 2d -> nnUNetv2_train
    UTADNetTeacherTrainer, then UTADNetStudentTrainer (fold 0, one short epoch each, on the CPU).

    Returns:
        (work folder with nnUNet_raw/_preprocessed/_results and env.json (the environment of the nnU-Net
        commands), the student's model folder ``.../UTADNetStudentTrainer__nnUNetPlans__2d_cpu``).
    """
    work = tmp_path_factory.mktemp("utad_e2e")
    override = work / "override.json"
    override.write_text(json.dumps(SYNTHESIS_OVERRIDE))
    env = nnunet_environment(work, num_processes=2, extra={OVERRIDE_ENV: str(override), "nnUNet_n_proc_DA": "1"})
    make_phantom_dataset(SYNTHESIS_DATASET, num_cases=5, num_test=2, seed=1, config=FAST_CONFIG,
                         raw_folder=work / "nnUNet_raw", progress=False)
    run_checked([nnunet_script("nnUNetv2_plan_and_preprocess"), "-d", str(SYNTHESIS_DATASET), "-c", "2d",
                 "-np", "2"], env)
    add_cpu_configuration(SYNTHESIS_DATASET, name=SYNTHESIS_CONFIGURATION, parent="2d", patch_size=(32, 32),
                          features_per_stage=(8, 16, 32), batch_size=4,
                          preprocessed_folder=work / "nnUNet_preprocessed")
    for trainer in ("UTADNetTeacherTrainer", "UTADNetStudentTrainer"):
        run_checked([nnunet_script("nnUNetv2_train"), str(SYNTHESIS_DATASET), SYNTHESIS_CONFIGURATION, "0",
                     "-tr", trainer, "-device", "cpu"], env)
    (work / "env.json").write_text(json.dumps(env))
    student = f"UTADNetStudentTrainer__nnUNetPlans__{SYNTHESIS_CONFIGURATION}"
    return work, work / "nnUNet_results" / SYNTHESIS_NAME / student
