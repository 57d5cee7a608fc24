"""CMFT/CMFF networks: modality pairs, generator and discriminator shapes (Table 1), the fusion network, the
mask-guided attention against a hand-written reference, zeroed pairs, and the generator-to-branch transfer."""

import pytest
import torch
from torch import nn

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.networks.cmff import (
    ChannelAttention,
    CMFFNet,
    CMFTDiscriminators,
    CMFTGenerators,
    MaskGuidedAttention,
    ModalityPairs,
    PatchDiscriminator,
    scaled_arch_kwargs,
    transfer_generator_weights,
)
from tests.networks.test_d2net import PLAIN_UNET, REQUIRES_IMPORT, RESENC_UNET, tiny_arch_kwargs

PAIRS = ModalityPairs.from_config({"a": ["t1", "t1ce"], "b": ["t2", "flair"]}, 4)


def generators(arch=PLAIN_UNET, features=(8, 16, 32)):
    torch.manual_seed(0)
    return CMFTGenerators(pairs=PAIRS, arch_class_name=arch,
                          arch_kwargs=tiny_arch_kwargs(features, residual=arch == RESENC_UNET),
                          arch_kwargs_req_import=REQUIRES_IMPORT)


def fusion_network(deep_supervision=True, arch=PLAIN_UNET, features=(8, 16, 32), attention="mask_guided", seed=1):
    torch.manual_seed(seed)
    return CMFFNet(pairs=PAIRS, num_regions=3, arch_class_name=arch,
                   arch_kwargs=tiny_arch_kwargs(features, residual=arch == RESENC_UNET),
                   arch_kwargs_req_import=REQUIRES_IMPORT, deep_supervision=deep_supervision, attention=attention)


def test_default_pairs_are_the_papers_by_channel_name():
    assert PAIRS.a == (mods.modality_index("t1"), mods.modality_index("t1ce"))
    assert PAIRS.b == (mods.modality_index("t2"), mods.modality_index("flair"))
    assert PAIRS.names() == {"a": ["t1", "t1ce"], "b": ["t2", "flair"]}
    other = ModalityPairs.from_config({"a": ["FLAIR", "t1"], "b": ["t1c"]}, 4)  # aliases, any order
    assert other.a == (0, 3) and other.b == (1,)


@pytest.mark.parametrize("settings, message", [
    ({"a": ["t1", "t2"], "b": ["t2", "flair"]}, "share"),
    ({"a": ["t1", "dwi"], "b": ["t2"]}, r"cmft\.pairs\.a: unknown modality 'dwi'"),
    ({"a": ["t1"]}, "keys 'a' and 'b'"),
    ({"a": "t1", "b": ["t2"]}, r"cmft\.pairs\.a must be a list"),
    ({"a": [], "b": ["t2"]}, "no modality given"),
])
def test_bad_pairs_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        ModalityPairs.from_config(settings, 4, where="cmft.pairs")
    with pytest.raises(ValueError, match="dataset has 3 modality channels"):
        ModalityPairs.from_config({"a": ["t1"], "b": ["flair"]}, 3)


@pytest.mark.parametrize("arch", [PLAIN_UNET, RESENC_UNET])
def test_generators_translate_pair_to_pair_and_back(arch):
    network = generators(arch)
    x = torch.randn(2, 4, 8, 12, 16)
    out = network(x, cycle=True)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, 2, 8, 12, 16) for k in
                                                          ("fake_a", "fake_b", "cycle_a", "cycle_b")}
    changed_b = x.clone()
    changed_b[:, 2:] = torch.randn(2, 2, 8, 12, 16)
    again = network(changed_b)
    assert set(again) == {"fake_a", "fake_b"}
    torch.testing.assert_close(again["fake_b"], out["fake_b"])  # G_A→B reads pair A only
    assert not torch.allclose(again["fake_a"], out["fake_a"])
    with torch.no_grad():  # eq. 1: the cycle is the other generator applied to the translation
        torch.testing.assert_close(out["cycle_a"], network.b_to_a(out["fake_b"]))
        torch.testing.assert_close(out["cycle_b"], network.a_to_b(out["fake_a"]))


def test_discriminator_follows_table_1():
    layers = list(PatchDiscriminator(2, (128, 128, 128)).layers)
    convs = [m for m in layers if isinstance(m, nn.Conv3d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (2, 16, (4, 4, 4), (2, 2, 2)), (16, 32, (4, 4, 4), (2, 2, 2)), (32, 64, (4, 4, 4), (2, 2, 2)),
        (64, 128, (4, 4, 4), (2, 2, 2)), (128, 1, (4, 4, 4), (1, 1, 1))]
    kinds = [type(m).__name__ for m in layers]  # L1 ... L12
    assert kinds == ["Conv3d", "LeakyReLU", "Conv3d", "InstanceNorm3d", "LeakyReLU", "Conv3d", "InstanceNorm3d",
                     "LeakyReLU", "Conv3d", "InstanceNorm3d", "LeakyReLU", "Conv3d"]
    # Table 1's feature sizes 128 -> 64 -> 32 -> 16 -> 8, then the stride-1 4x4x4 convolution (padding 1): 7
    assert PatchDiscriminator(2, (128, 128, 128)).output_size == (7, 7, 7)


# per axis: halved while at least 4 voxels are left, then the last convolution takes 1 off (kernel 4) or keeps a
# single voxel (kernel 3): 48 -> 24, 12, 6, 3 -> 2; 40 -> 20, 10, 5, 2 -> 1; 24 -> 12, 6, 3, 3 -> 2
@pytest.mark.parametrize("patch, expected", [((32, 32, 32), (1, 1, 1)), ((48, 40, 24), (2, 1, 2)),
                                             ((8, 32, 32), (1, 1, 1))])
def test_discriminator_runs_on_small_and_anisotropic_patches(patch, expected):
    discriminator = CMFTDiscriminators(PAIRS, patch)
    scores_a, scores_b = discriminator(torch.randn(2, 2, *patch), torch.randn(3, 2, *patch))
    assert scores_a.shape == (2, 1, *expected) and scores_b.shape == (3, 1, *expected)
    assert discriminator.discriminator_a.output_size == expected


@pytest.mark.parametrize("arch", [PLAIN_UNET, RESENC_UNET])
def test_fusion_network_shapes_training_and_inference(arch):
    network = fusion_network(arch=arch)
    x = torch.randn(2, 4, 8, 12, 16)
    out = network(x, return_branches=True)
    assert [tuple(o.shape) for o in out["fused"]] == [(2, 3, 8, 12, 16), (2, 3, 4, 6, 8)]
    assert [tuple(o.shape) for o in out["a"]] == [(2, 3, 8, 12, 16), (2, 3, 4, 6, 8)]
    assert [tuple(o.shape) for o in out["b"]] == [(2, 3, 8, 12, 16), (2, 3, 4, 6, 8)]
    assert out["present_a"].tolist() == [True, True] and out["present_b"].tolist() == [True, True]
    inference = fusion_network(deep_supervision=False, arch=arch).eval()
    with torch.no_grad():
        output = inference(x)
    assert isinstance(output, torch.Tensor) and output.shape == (2, 3, 8, 12, 16)
    network.eval()
    with torch.no_grad():
        assert [tuple(o.shape) for o in network(x)] == [(2, 3, 8, 12, 16), (2, 3, 4, 6, 8)]
        network.set_deep_supervision(False)
        torch.testing.assert_close(network(x), network(x, return_branches=True)["fused"])


def test_mask_guided_attention_against_a_hand_written_reference():
    torch.manual_seed(0)
    block = MaskGuidedAttention(5, 4, nn.Conv3d, nn.InstanceNorm3d, {"affine": True}, nn.LeakyReLU,
                                {"negative_slope": 0.01})
    assert block.group_channels == 2  # ceil(5 / 4)
    features, masks = torch.randn(2, 5, 3, 4, 5), torch.rand(2, 4, 3, 4, 5)
    projected = block.project(features)  # (2, 8, ...): group k = channels 2k, 2k+1
    attended = torch.zeros_like(projected)
    for k in range(4):
        for c in range(2):
            attended[:, 2 * k + c] = projected[:, 2 * k + c] * masks[:, k]
    merged = torch.zeros_like(features)
    for out_channel in range(5):  # the 1x1x1 merge convolution as a weighted sum
        merged[:, out_channel] = block.merge.bias[out_channel] + sum(
            block.merge.weight[out_channel, j, 0, 0, 0] * attended[:, j] for j in range(8))
    summed = features + merged
    mean = summed.mean((2, 3, 4), keepdim=True)
    var = summed.var((2, 3, 4), unbiased=False, keepdim=True)
    normalised = (summed - mean) / torch.sqrt(var + 1e-5) * block.norm.weight.view(1, 5, 1, 1, 1) + \
        block.norm.bias.view(1, 5, 1, 1, 1)
    expected = torch.where(normalised > 0, normalised, 0.01 * normalised)
    torch.testing.assert_close(block(features, masks), expected, rtol=1e-4, atol=1e-5)


def test_only_the_mask_guided_block_listens_to_the_masks():
    torch.manual_seed(0)
    features, masks = torch.randn(1, 6, 4, 4, 4), torch.rand(1, 6, 4, 4, 4)
    guided = MaskGuidedAttention(6, 6, nn.Conv3d, nn.InstanceNorm3d, {}, nn.LeakyReLU, {})
    assert not torch.allclose(guided(features, masks), guided(features, torch.zeros_like(masks)))
    channel = ChannelAttention(6)
    torch.testing.assert_close(channel(features, masks), channel(features, torch.zeros_like(masks)))
    for attention in ("channel", "none"):  # the ablations build and run
        network = fusion_network(attention=attention)
        assert not any(isinstance(m, MaskGuidedAttention) for m in network.modules())
        assert network(torch.randn(1, 4, 8, 8, 8))[0].shape == (1, 3, 8, 8, 8)


@pytest.mark.parametrize("missing, absent_branch", [((2, 3), "branch_b"), ((0, 1), "branch_a")])
def test_a_wholly_missing_pair_feeds_zeros_and_its_branch_does_not_matter(missing, absent_branch):
    network = fusion_network().eval()
    x = torch.randn(2, 4, 8, 8, 12)
    x[1, list(missing)] = 0  # sample 1 lacks the whole pair
    seen = {}
    original = network.fusion.forward

    def record(features_a, features_b, masks_a, masks_b):
        seen.update(features_a=features_a, features_b=features_b, masks_a=masks_a, masks_b=masks_b)
        return original(features_a, features_b, masks_a, masks_b)
    network.fusion.forward = record
    with torch.no_grad():
        before = network(x)
    side = "b" if absent_branch == "branch_b" else "a"
    other = "a" if side == "b" else "b"
    for level in range(2):
        assert seen[f"features_{side}"][level][1].abs().max() == 0 and seen[f"masks_{side}"][level][1].max() == 0
        assert seen[f"features_{side}"][level][0].abs().max() > 0 and seen[f"masks_{other}"][level][1].max() > 0
    with torch.no_grad():
        for parameter in getattr(network, absent_branch).parameters():
            parameter.add_(torch.randn_like(parameter))
        after = network(x)
    for level in range(2):
        torch.testing.assert_close(after[level][1], before[level][1])  # S_F ignores the absent branch
        assert not torch.allclose(after[level][0], before[level][0])  # ... but not where the pair is there
    available = torch.ones(2, 4, dtype=torch.bool)
    available[0, list(missing)] = False  # an explicit mask (modality dropout) overrides what the input shows
    with torch.no_grad():
        out = network(x, available, return_branches=True)
    assert out[f"present_{side}"].tolist() == [False, True]


@pytest.mark.parametrize("arch", [PLAIN_UNET, RESENC_UNET])
def test_transfer_copies_every_generator_weight_but_the_output_layers(arch):
    source, target = generators(arch), fusion_network(arch=arch)
    fusion_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("fusion.")}
    heads_before = {k: v.clone() for k, v in target.state_dict().items() if ".seg_layers." in k}
    copied = transfer_generator_weights(target, source.state_dict(), "cmft.pth")
    state, generator_state = target.state_dict(), source.state_dict()
    branch_keys = [k for k in state if k.startswith(("branch_a.", "branch_b.")) and ".seg_layers." not in k]
    assert sorted(branch_keys) == copied and len(copied) > 20
    for key in branch_keys:
        generator_key = key.replace("branch_a.", "a_to_b.", 1).replace("branch_b.", "b_to_a.", 1)
        assert torch.equal(state[key], generator_state[generator_key]), key
    for key, value in {**fusion_before, **heads_before}.items():
        assert torch.equal(state[key], value), key  # fusion branch and segmentation heads untouched
    assert all(state[k].shape[0] == 3 for k in heads_before if k.endswith("weight"))  # no 2-channel image head


def test_transfer_refuses_weights_that_do_not_fit():
    wider = generators(features=(12, 16, 32))
    with pytest.raises(ValueError, match=r"cmft\.pth does not fit.*a_to_b\.encoder\.stages\.0.*has shape"):
        transfer_generator_weights(fusion_network(), wider.state_dict(), "cmft.pth")
    with pytest.raises(ValueError, match="a_to_b.* is missing"):
        transfer_generator_weights(fusion_network(), {"encoder.x": torch.zeros(1)}, "other.pth")


def test_feature_fraction_scales_every_stage_to_multiples_of_8_never_below_16():
    brats = tiny_arch_kwargs((32, 64, 128, 256, 320, 320))  # nnU-Net's BraTS 3d_fullres widths
    assert scaled_arch_kwargs(brats, 0.75)["features_per_stage"] == [24, 48, 96, 192, 240, 240]
    # the shipped 0.5 gives the paper's 16 base filters, doubled per downsampling up to half of nnU-Net's cap
    assert scaled_arch_kwargs(brats, 0.5)["features_per_stage"] == [16, 32, 64, 128, 160, 160]
    assert scaled_arch_kwargs(brats, 0.25)["features_per_stage"] == [16, 16, 32, 64, 80, 80]  # floor 16
    kwargs = tiny_arch_kwargs((4, 16, 36, 44))
    assert scaled_arch_kwargs(kwargs, 0.75)["features_per_stage"] == [4, 16, 24, 32]  # 27 -> 24, 33 -> 32
    assert scaled_arch_kwargs(kwargs, 0.25)["features_per_stage"] == [4, 16, 16, 16]  # never below min(c, 16)
    assert scaled_arch_kwargs(kwargs, 2)["features_per_stage"] == [8, 32, 72, 88]
    assert kwargs["features_per_stage"] == [4, 16, 36, 44]  # the plans are not modified
    with pytest.raises(ValueError, match="feature_fraction"):
        scaled_arch_kwargs(kwargs, 0)
