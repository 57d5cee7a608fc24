"""SharedLatentUNet: invariance to missing inputs, mean fusion, L_sim against a naive loop, inference loading."""

import pytest
import torch
from torch import nn

from nnunet_missingmod.networks.shared_latent import SharedLatentUNet, similarity_loss

ARCH = {
    "n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": nn.Conv3d, "kernel_sizes": [[3, 3, 3]] * 3,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1],
    "conv_bias": True, "norm_op": nn.InstanceNorm3d, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True},
}


def _network(**kwargs):
    torch.manual_seed(0)
    defaults = {"num_modalities": 4, "num_classes": 3, "arch_kwargs": ARCH, "deep_supervision": False}
    return SharedLatentUNet(**(defaults | kwargs)).eval()


def test_output_ignores_what_a_missing_modality_contains():
    network = _network()
    x = torch.randn(2, 4, 16, 16, 16)
    available = torch.tensor([[True, False, True, False], [False, False, False, True]])
    zeroed = x * available[:, :, None, None, None]
    noisy = zeroed + torch.randn_like(x) * 5 * ~available[:, :, None, None, None]
    with torch.no_grad():
        reference = network(zeroed, available)
        assert torch.equal(network(noisy, available), reference)
        assert torch.allclose(network(zeroed), reference)  # inferred from the exactly-zero channels
        assert not torch.allclose(network(noisy), reference)  # noise counts as a modality when not masked


def test_fusion_is_the_mean_over_available_modalities():
    network = _network()
    x = torch.randn(3, 4, 16, 16, 16)
    available = torch.tensor([[True, True, True, True], [False, True, False, False], [True, False, False, True]])
    with torch.no_grad():
        stacked, fused = network.encode(x, available)
    for level_features, level_fused in zip(stacked, fused, strict=True):
        for b in range(3):
            expected = level_features[b, available[b]].mean(0)
            torch.testing.assert_close(level_fused[b], expected)


def test_similarity_loss_against_naive_loop():
    torch.manual_seed(1)
    features = torch.randn(3, 4, 5, 6, 6, 6)
    available = torch.tensor([[True, True, False, True], [False, False, True, False], [True, True, True, True]])
    total = 0.0
    for b in range(3):
        indices = [m for m in range(4) if available[b, m]]
        mean = sum(features[b, m] for m in indices) / len(indices)
        total += sum((features[b, m] - mean).abs().mean() for m in indices)
    expected = total / 3
    assert similarity_loss(features, available).item() == pytest.approx(float(expected), rel=1e-5)
    single = torch.tensor([[False, True, False, False]] * 3)
    assert similarity_loss(features, single).item() == pytest.approx(0.0, abs=1e-6)


def test_training_checkpoint_loads_into_the_inference_network():
    training = _network(deep_supervision=True, reconstruction=True)
    inference = _network(deep_supervision=False, reconstruction=False)
    assert any(k.startswith("reconstruction.") for k in training.state_dict())
    assert not any(k.startswith("reconstruction.") for k in inference.state_dict())
    inference.load_state_dict(training.state_dict())  # strict, as nnUNetPredictor loads it
    x = torch.randn(1, 4, 16, 16, 16)
    training.decoder.deep_supervision = False
    with torch.no_grad():
        out = inference(x)
        assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 16, 16, 16)
        torch.testing.assert_close(out, training(x))
        _, aux = training.forward_with_aux(x)
    assert aux["reconstruction"].shape == (1, 4, 16, 16, 16)
    training.decoder.deep_supervision = True
    with torch.no_grad():
        assert isinstance(training(x), list)
