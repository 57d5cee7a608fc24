"""D²-Net network: shapes for a tiny configuration, the inference network, checkpoint round trip."""

import pytest
import torch

from nnunet_missingmod.networks.d2net import TRAINING_ONLY_PREFIXES, D2Net

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def tiny_arch_kwargs(features=(8, 16, 32), residual=False):
    n = len(features)
    kwargs = {"n_stages": n, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv3d",
              "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
              "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
              "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
              "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    kwargs["n_blocks_per_stage" if residual else "n_conv_per_stage"] = [1] * n
    return kwargs


def build(deep_supervision=True, arch=PLAIN_UNET, features=(8, 16, 32), **settings):
    torch.manual_seed(0)
    return D2Net(num_modalities=4, num_regions=3, arch_class_name=arch,
                 arch_kwargs=tiny_arch_kwargs(features, residual=arch == RESENC_UNET),
                 arch_kwargs_req_import=REQUIRES_IMPORT, deep_supervision=deep_supervision, **settings)


@pytest.mark.parametrize("arch", [PLAIN_UNET, RESENC_UNET])
def test_training_network_shapes(arch):
    network = build(arch=arch)
    x = torch.randn(2, 4, 16, 24, 20)
    x[1, 2] = 0  # a missing modality
    output, aux = network.forward_with_aux(x)
    assert [tuple(o.shape) for o in output] == [(2, 3, 16, 24, 20), (2, 3, 8, 12, 10)]
    assert aux["available"].tolist() == [[True] * 4, [True, True, False, True]]
    assert aux["codes"].shape == (2, 4, 16, 8)  # one N=8 code per modality and slice of the first axis
    assert aux["reconstruction"].shape == (2, 4, 16, 24, 20)
    assert [f.shape[1] for f in aux["student_features"]] == [8, 16]
    # the teacher stops one stage below full resolution by default: its stages are the student's from the 2nd on
    assert aux["teacher_first_stage"] == 1
    assert [tuple(p.shape) for p in aux["teacher_logits"]] == [(2, 3, 8, 12, 10)]
    assert [tuple(f.shape) for f in aux["teacher_features"]] == [(2, 3 * 8, 8, 12, 10)]  # 3 regions kept apart


def test_full_resolution_teacher_and_no_tumour_projection():
    network = build(teacher_full_resolution=True, tumour_projection=False)
    assert network.tumour_projection is None
    _, aux = network.forward_with_aux(torch.randn(1, 4, 16, 16, 16))
    assert aux["teacher_first_stage"] == 0
    assert [tuple(p.shape) for p in aux["teacher_logits"]] == [(1, 3, 16, 16, 16), (1, 3, 8, 8, 8)]
    assert len(network.kd_projections) == 2 * 2


def test_inference_network_has_only_what_prediction_needs():
    training, inference = build(True), build(False)
    training_only = [k for k in training.state_dict() if k.startswith(TRAINING_ONLY_PREFIXES)]
    assert training_only and not any(k.startswith(TRAINING_ONLY_PREFIXES) for k in inference.state_dict())
    assert not any(hasattr(inference, name) for name in ("teacher", "reconstruction", "kd_projections"))
    inference.load_state_dict(training.state_dict())  # strict, as nnUNetPredictor loads it
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        prediction = inference.eval()(x)
        training.eval().decoder.deep_supervision = False
        reference = training(x)
    assert isinstance(prediction, torch.Tensor) and prediction.shape == (1, 3, 16, 16, 16)
    assert torch.equal(prediction, reference)


def test_missing_modality_codes_do_not_reach_the_tumour_codes():
    network = build()
    x = torch.randn(1, 4, 16, 16, 16)
    available = torch.tensor([[True, False, True, True]])
    first = network.encode(x, available)["tumour_codes"]
    x[:, 1] = torch.randn(16, 16, 16) * 10  # change only the missing modality's image
    second = network.encode(x, available)["tumour_codes"]
    assert torch.equal(first, second)


def test_checkpoint_round_trip_restores_every_module(tmp_path):
    network = build()
    optimiser = torch.optim.SGD(network.parameters(), lr=0.1)
    x = torch.randn(2, 4, 16, 16, 16)
    output, aux = network.forward_with_aux(x)
    (output[0].mean() + aux["reconstruction"].mean() + aux["teacher_logits"][0].mean()).backward()
    optimiser.step()  # weights now differ from any fresh initialisation
    torch.save({"network_weights": network.state_dict()}, tmp_path / "checkpoint.pth")
    restored = build()
    restored.load_state_dict(torch.load(tmp_path / "checkpoint.pth", weights_only=False)["network_weights"])
    for (name, a), (_, b) in zip(network.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    network.eval()
    restored.eval()
    with torch.no_grad():
        first, second = network.forward_with_aux(x)[1], restored.forward_with_aux(x)[1]
    for key in ("codes", "reconstruction"):
        assert torch.equal(first[key], second[key])
    assert all(torch.equal(a, b) for a, b in zip(first["teacher_logits"], second["teacher_logits"], strict=True))


def test_modality_codes_read_the_image_with_one_encoder_for_every_modality():
    network = build()
    torch.manual_seed(3)
    image, other = torch.randn(16, 24, 20), torch.randn(16, 24, 20)
    x = torch.stack([image, other, image, torch.randn(16, 24, 20)])[None]  # modality 2 repeats modality 0's image
    with torch.no_grad():
        codes = network.code_encoder(x)  # (1, M, G, N)
        changed = network.code_encoder(torch.cat([other[None, None], x[:, 1:]], 1))
    # shared weights: the same image gives the same code whichever modality slot it is in ...
    assert torch.allclose(codes[0, 0], codes[0, 2], atol=1e-6)
    # ... so codes can only differ by what the image shows: another image of modality 0 gives other codes
    assert (changed[0, 0] - codes[0, 0]).abs().max() > 1e-3
    assert torch.equal(changed[0, 1:], codes[0, 1:])
    # the per-modality option (grouped weights) still exists for comparison
    separate = build(shared_code_encoder=False)
    with torch.no_grad():
        per_modality = separate.code_encoder(x)
    assert per_modality.shape == codes.shape and not torch.allclose(per_modality[0, 0], per_modality[0, 2])


def test_distillation_pairs_all_start_with_weight_and_every_map_learns():
    from nnunet_missingmod.losses.distillation import adt_kd_loss, affinity, resize

    network = build(teacher_full_resolution=True)
    x = torch.randn(2, 4, 16, 16, 16)
    _, aux = network.forward_with_aux(x)
    # the teacher's bank keeps the regions apart: C region features concatenated per stage
    assert [f.shape[1] for f in aux["teacher_features"]] == [3 * 4, 3 * 8]
    for t, teacher in enumerate(aux["teacher_features"]):
        for s, feature in enumerate(aux["student_features"]):
            mapped = network.kd_projection(s, t)(teacher)
            assert mapped.shape[1] == feature.shape[1]
            assert affinity(mapped.detach(), resize(feature, teacher.shape[2:]).detach()).item() > 0.05, (s, t)
    for feature_weight, logit_weight in ((1.0, 1.0), (1.0, 0.0), (0.0, 1.0)):  # full, feature-only, logit-only
        network.zero_grad(set_to_none=True)
        _, aux = network.forward_with_aux(x)
        losses = adt_kd_loss(aux["student_features"], aux["student_logits"], aux["teacher_features"],
                             aux["teacher_logits"], network.kd_projection, feature_weight=feature_weight,
                             logit_weight=logit_weight)
        (losses["total"] + losses["projection"]).backward()
        for name, module in network.kd_projections.items():
            for parameter in module.parameters():
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, (feature_weight, name)
        # the teacher learns from the student (mutual learning, the paper's default)
        if feature_weight:
            assert all(p.grad is not None for p in network.teacher.stages.parameters())
        if logit_weight:
            assert all(p.grad is not None for p in network.teacher.seg_layers.parameters())
