"""Smoke run through nnU-Net's unmodified commands on CPU: plan/preprocess, CPU configuration, train, predict."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import torch

from nnunet_missingmod.demo import region_dice
from nnunet_missingmod.transforms import ModalityDropoutTransform
from tests.conftest import E2E_NAME as NAME


def test_cpu_configuration_inherits_preprocessed_data(trained_model):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    work, _, _ = trained_model
    plans = json.loads((work / "nnUNet_preprocessed" / NAME / "nnUNetPlans.json").read_text())
    manager = PlansManager(plans)
    cpu, full = manager.get_configuration("3d_cpu"), manager.get_configuration("3d_fullres")
    assert cpu.data_identifier == full.data_identifier
    assert cpu.patch_size == [32, 32, 32] and cpu.batch_size == 2
    assert cpu.network_arch_init_kwargs["features_per_stage"] == [8, 16, 32]
    assert cpu.network_arch_init_kwargs["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    # the configuration builds a network that maps a patch to one output per region
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    network = get_network_from_plans(cpu.network_arch_class_name, cpu.network_arch_init_kwargs,
                                     cpu.network_arch_init_kwargs_req_import, 4, 3, deep_supervision=False)
    assert network(torch.zeros(1, 4, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_training_ran_with_our_trainer_and_recorded_its_config(trained_model):
    work, _, train_log = trained_model
    fold = work / "nnUNet_results" / NAME / "ModalityDropoutTrainer__nnUNetPlans__3d_cpu" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    config = json.loads((fold / "trainer_config.json").read_text())
    assert config["trainer"] == "ModalityDropoutTrainer"
    assert config["nnunet"]["num_epochs"] == 1 and config["modality_dropout"]["scheme"] == "uniform_subset"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "ModalityDropoutTrainer"
    assert checkpoint["inference_allowed_mirroring_axes"] is None  # test_time_mirroring: false
    assert (fold / "validation" / "summary.json").is_file()


def test_prediction_matches_input_geometry(trained_model):
    work, predictions, _ = trained_model
    files = sorted(predictions.glob("*.nii.gz"))
    assert [f.name for f in files] == ["Phantom_0005.nii.gz", "Phantom_0006.nii.gz"]
    for file in files:
        reference = nib.load(work / "nnUNet_raw" / NAME / "labelsTs" / file.name)
        predicted = nib.load(file)
        assert predicted.shape == reference.shape
        np.testing.assert_allclose(predicted.affine, reference.affine, atol=1e-4)
        assert set(np.unique(np.asarray(predicted.dataobj))) <= {0, 1, 2, 3}
    dataset_json = json.loads((work / "nnUNet_raw" / NAME / "dataset.json").read_text())
    result = region_dice(work / "nnUNet_raw" / NAME / "labelsTs", predictions, dataset_json, num_processes=1)
    assert set(result["mean"]) == {"WT", "TC", "ET"}
    assert all(0.0 <= row[r] <= 1.0 for row in result["per_case"] for r in ("WT", "TC", "ET"))


def test_training_transforms_end_with_modality_dropout(trained_model, monkeypatch):
    from nnunet_missingmod.trainers import ModalityDropoutTrainer

    work, _, _ = trained_model
    monkeypatch.setenv("nnUNet_results", str(work / "inprocess_results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(work / "nnUNet_preprocessed"))
    plans = json.loads((work / "nnUNet_preprocessed" / NAME / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnU-Net's run_training adds this before instantiating a trainer
    dataset_json = json.loads((work / "nnUNet_preprocessed" / NAME / "dataset.json").read_text())
    trainer = ModalityDropoutTrainer(plans, "3d_cpu", 0, dataset_json, torch.device("cpu"))
    configured = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    rotation, dummy_2d, initial_patch, mirror_axes = configured
    transforms = trainer.get_training_transforms(
        [32, 32, 32], rotation, trainer._get_deep_supervision_scales(), mirror_axes, dummy_2d,
        use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm,
        regions=trainer.label_manager.foreground_regions)
    last = transforms.transforms[-1]
    assert isinstance(last, ModalityDropoutTransform) and last.num_modalities == 4
    np.random.seed(0)
    image = torch.rand(4, *initial_patch) + 1
    seg = torch.randint(0, 4, (1, *initial_patch)).to(torch.int16)
    out = transforms(image=image, segmentation=seg)
    zero = [c for c in range(4) if torch.count_nonzero(out["image"][c]) == 0]
    assert 0 <= len(zero) < 4
    assert isinstance(out["segmentation"], list)  # deep-supervision targets still built
