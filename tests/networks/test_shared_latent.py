"""SharedLatentUNet: invariance to missing inputs, mean fusion, L_sim / L_rec against naive loops, the
reconstruction decoder's inputs, residual-encoder plans, inference loading."""

import pytest
import torch
from torch import nn

from nnunet_missingmod.networks.shared_latent import (
    LatentDecoder,
    SharedLatentUNet,
    reconstruction_loss,
    similarity_loss,
)

ARCH = {
    "n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": nn.Conv3d, "kernel_sizes": [[3, 3, 3]] * 3,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1],
    "conv_bias": True, "norm_op": nn.InstanceNorm3d, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True},
}


#: The same network with nnU-Net's residual encoder (ResEnc presets: n_blocks_per_stage, no n_conv_per_stage).
RESENC_ARCH = {key: value for key, value in ARCH.items() if key != "n_conv_per_stage"} | \
    {"n_blocks_per_stage": [1, 2, 2]}
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


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


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_reconstruction_loss_against_naive_loop(kind):
    torch.manual_seed(2)
    reconstruction, target = torch.randn(3, 4, 5, 6, 7), torch.randn(3, 4, 5, 6, 7)
    known = torch.tensor([[True, False, True, True], [False, False, False, True], [True] * 4])
    total = 0.0
    for b in range(3):
        for m in range(4):
            if known[b, m]:
                difference = reconstruction[b, m] - target[b, m]
                total += (difference.abs() if kind == "l1" else difference ** 2).mean()
    expected = total / 3  # eq. 1: sum over modalities, then the batch mean
    assert reconstruction_loss(reconstruction, target, known, kind).item() == pytest.approx(float(expected), rel=1e-5)


def test_reconstruction_loss_is_l1_by_default_and_rejects_unknown_kinds():
    reconstruction, target = torch.zeros(1, 2, 4, 4, 4), torch.full((1, 2, 4, 4, 4), 3.0)
    known = torch.tensor([[True, True]])
    assert reconstruction_loss(reconstruction, target, known).item() == pytest.approx(6.0)
    with pytest.raises(ValueError, match="reconstruction_loss"):
        reconstruction_loss(reconstruction, target, known, "l2")


@pytest.mark.parametrize("skips", [False, True])
def test_reconstruction_decoder_inputs(skips):
    # the paper's decoder (default) sees the fused bottleneck only; with skips a shallow level reaches it
    network = _network(deep_supervision=True, reconstruction=True, reconstruction_skips=skips)
    assert isinstance(network.reconstruction, nn.Module) and isinstance(network.reconstruction, LatentDecoder) != skips
    x = torch.randn(2, 4, 16, 16, 16)
    with torch.no_grad():
        _, fused = network.encode(x, torch.ones(2, 4, dtype=torch.bool))
        reference = network.reconstruct(fused)
        shallow_changed = network.reconstruct([fused[0] + 1, *fused[1:]])
        bottleneck_changed = network.reconstruct([*fused[:-1], fused[-1] + 1])
    assert reference.shape == (2, 4, 16, 16, 16)
    assert torch.equal(shallow_changed, reference) != skips
    assert not torch.allclose(bottleneck_changed, reference)


def test_forward_with_return_aux_is_forward_with_aux():
    # trainers call forward(..., return_aux=True): a DDP or torch.compile wrapper exposes only forward
    network = _network(deep_supervision=True, reconstruction=True)
    x = torch.randn(1, 4, 16, 16, 16)
    available = torch.tensor([[True, False, True, True]])
    with torch.no_grad():
        output, aux = network(x, available, return_aux=True)
        expected_output, expected_aux = network.forward_with_aux(x, available)
        plain = network(x, available)
    for a, b, c in zip(output, expected_output, plain, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    torch.testing.assert_close(aux["reconstruction"], expected_aux["reconstruction"])


def test_residual_encoder_plans_build_and_train():
    training = _network(arch_kwargs=RESENC_ARCH, arch_class_name=RESENC, deep_supervision=True, reconstruction=True)
    assert all(type(encoder).__name__ == "ResidualEncoder" for encoder in training.encoders)
    training.train()
    x = torch.randn(2, 4, 16, 16, 16)
    x[0, 1] = 0
    output, aux = training(x, return_aux=True)
    assert [o.shape[-1] for o in output] == [16, 8] and aux["reconstruction"].shape == x.shape
    loss = sum(o.mean() for o in output) + similarity_loss(aux["features"][-1], aux["available"]) + \
        reconstruction_loss(aux["reconstruction"], x, aux["available"])
    loss.backward()
    without_gradient = [name for name, p in training.named_parameters() if p.grad is None]
    assert not without_gradient, without_gradient
    inference = _network(arch_kwargs=RESENC_ARCH, arch_class_name=RESENC, deep_supervision=False)
    inference.load_state_dict(training.state_dict())
    with torch.no_grad():
        assert inference(x).shape == (2, 3, 16, 16, 16)


def test_other_architectures_are_rejected():
    with pytest.raises(ValueError, match="PlainConvUNet or ResidualEncoderUNet"):
        _network(arch_class_name="dynamic_network_architectures.architectures.primus.Primus")
