"""SharedLatentTrainer through nnUNetv2_train / nnUNetv2_predict, and its in-step modality dropout."""

import json

import numpy as np
import torch

from nnunet_missingmod.networks.shared_latent import SharedLatentUNet
from nnunet_missingmod.trainers import SharedLatentTrainer
from tests.conftest import E2E_DATASET, E2E_NAME, make_trainer, nnunet_script, run_checked


def _trainer(work, monkeypatch):
    return make_trainer(work, monkeypatch, SharedLatentTrainer)


def test_train_and_predict_with_nnunet_commands(trained_model, tmp_path):
    work, _, _ = trained_model
    env = json.loads((work / "env.json").read_text())
    run_checked([nnunet_script("nnUNetv2_train"), str(E2E_DATASET), "3d_cpu", "0", "-tr", "SharedLatentTrainer",
                 "-device", "cpu"], env)
    fold = work / "nnUNet_results" / E2E_NAME / "SharedLatentTrainer__nnUNetPlans__3d_cpu" / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "loss_seg" in log and "loss_rec" in log and "loss_sim" in log
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(k.startswith("reconstruction.") for k in checkpoint["network_weights"])
    run_checked([nnunet_script("nnUNetv2_predict"), "-i", str(work / "nnUNet_raw" / E2E_NAME / "imagesTs"),
                 "-o", str(tmp_path), "-d", str(E2E_DATASET), "-c", "3d_cpu", "-f", "0", "-tr", "SharedLatentTrainer",
                 "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    assert sorted(p.name for p in tmp_path.glob("*.nii.gz")) == ["Phantom_0005.nii.gz", "Phantom_0006.nii.gz"]


def test_inference_network_has_no_training_parts(trained_model, monkeypatch):
    trainer = _trainer(trained_model[0], monkeypatch)
    network = SharedLatentTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                             4, 3, enable_deep_supervision=False)
    assert isinstance(network, SharedLatentUNet) and network.reconstruction is None
    with torch.no_grad():
        assert isinstance(network.eval()(torch.randn(1, 4, 32, 32, 32)), torch.Tensor)


def test_dropout_in_train_step_keeps_a_present_modality(trained_model, monkeypatch):
    trainer = _trainer(trained_model[0], monkeypatch)
    np.random.seed(0)
    data = torch.randn(64, 4, 4, 4, 4)
    data[:8, 0] = 0  # t1 really absent in 8 samples
    dropped, available = trainer.drop_modalities(data)
    assert available.any(1).all()
    assert not available[:8, 0].any()  # an absent modality is never counted as available
    for b in range(64):
        for m in range(4):
            expected = data[b, m] if available[b, m] else torch.zeros_like(data[b, m])
            assert torch.equal(dropped[b, m], expected)
    assert len({tuple(row.tolist()) for row in available[8:]}) > 8  # subsets vary per sample
