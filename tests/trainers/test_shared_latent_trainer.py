"""SharedLatentTrainer through nnUNetv2_train / nnUNetv2_predict, its in-step modality dropout, its loss
(eqs. 1-3 against naive loops) and residual-encoder plans."""

import json

import numpy as np
import pytest
import torch

from nnunet_missingmod.config import load_trainer_config
from nnunet_missingmod.networks.shared_latent import LatentDecoder, SharedLatentUNet
from nnunet_missingmod.trainers import SharedLatentTrainer
from tests.conftest import (
    E2E_DATASET,
    E2E_NAME,
    PLAIN_UNET,
    RESENC_UNET,
    make_tiny_trainer,
    make_trainer,
    nnunet_script,
    run_checked,
)


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


def _tiny_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(2, 4, 16, 16, 16, generator=generator)
    data[0, 1] = 0  # T1ce missing from the first case
    labels = torch.randint(0, 4, (2, 1, 16, 16, 16), generator=generator)
    regions = torch.cat([labels > 0, (labels == 2) | (labels == 3), labels == 3], 1)
    return {"data": data, "target": [regions[..., ::s, ::s, ::s].clone() for s in (1, 2)]}


def test_defaults_follow_the_paper():
    settings = load_trainer_config(SharedLatentTrainer)["shared_latent"]
    assert settings["reconstruction_loss"] == "l1" and settings["reconstruction_skips"] is False


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_losses_are_equations_1_to_3(kind, tmp_path, monkeypatch):
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"shared_latent": {"w_rec": 0.7, "alpha": 0.3, "reconstruction_loss": kind}}))
    monkeypatch.setenv("nnUNet_missingmod_config", str(override))
    trainer = make_tiny_trainer(SharedLatentTrainer, tmp_path, monkeypatch)
    trainer.initialize()
    assert isinstance(trainer.network.reconstruction, LatentDecoder)
    batch = _tiny_batch()
    data, target = batch["data"], batch["target"]
    np.random.seed(3)
    losses = trainer.compute_losses(data, target)
    np.random.seed(3)
    dropped, available = trainer.drop_modalities(data)  # the same draw
    assert not available[0, 1] and (~available[:, [0, 2, 3]]).any()  # something acquired was dropped
    with torch.no_grad():
        output, aux = trainer.network(dropped, available, return_aux=True)
    rec = 0.0
    for b in range(2):
        for m in range(4):
            if b == 0 and m == 1:
                continue  # a missing sequence is no target; dropped but acquired ones are
            error = aux["reconstruction"][b, m] - data[b, m]
            rec += (error.abs() if kind == "l1" else error ** 2).mean()
    rec /= 2
    sim = 0.0
    for level in aux["features"]:
        for b in range(2):
            kept = [m for m in range(4) if available[b, m]]
            mean = level[b, kept].mean(0)
            sim += sum((level[b, m] - mean).abs().mean() for m in kept) / 2
    sim /= len(aux["features"])
    assert losses["rec"].item() == pytest.approx(float(rec), rel=1e-4)
    assert losses["sim"].item() == pytest.approx(float(sim), rel=1e-4)
    expected_total = trainer.loss(output, target) + 0.7 * (0.7 * rec + 0.3 * sim)
    assert losses["total"].item() == pytest.approx(float(expected_total), rel=1e-4)


@pytest.mark.parametrize("network_class_name", [PLAIN_UNET, RESENC_UNET], ids=["plain", "resenc"])
def test_train_step_on_plain_and_residual_encoder_plans(network_class_name, tmp_path, monkeypatch):
    trainer = make_tiny_trainer(SharedLatentTrainer, tmp_path, monkeypatch, network_class_name)
    trainer.initialize()
    expected = "ResidualEncoder" if network_class_name == RESENC_UNET else "PlainConvEncoder"
    assert all(type(encoder).__name__ == expected for encoder in trainer.network.encoders)
    np.random.seed(0)
    result = trainer.train_step(_tiny_batch())
    assert all(np.isfinite(result[k]) for k in ("loss", "loss_seg", "loss_sim", "loss_rec"))
    without_gradient = [name for name, p in trainer.network.named_parameters() if p.grad is None]
    # every part learns except the lowest-resolution output, which nnU-Net's deep supervision weighs 0
    # (no DDP, so nothing is added to the loss to hide a parameter without gradient)
    assert without_gradient == ["decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"], without_gradient
    inference = SharedLatentTrainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 4, 3, enable_deep_supervision=False)
    inference.load_state_dict(trainer.network.state_dict())
    with torch.no_grad():
        assert inference.eval()(_tiny_batch()["data"]).shape == (2, 3, 16, 16, 16)


def test_reconstruction_without_deep_supervision_is_refused(tmp_path, monkeypatch):
    trainer = make_tiny_trainer(SharedLatentTrainer, tmp_path, monkeypatch)
    trainer.enable_deep_supervision = False  # as nnunet.enable_deep_supervision: false in a config would set it
    with pytest.raises(ValueError, match="deep supervision"):
        trainer.initialize()
