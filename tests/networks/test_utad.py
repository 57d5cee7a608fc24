"""UTAD-Net generator and discriminators: shapes from the plans, one-hot conditioning, the student reads no mask."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_missingmod.networks.utad import (
    MixedFusionBlock,
    ModalityConditionalNorm,
    PatchDiscriminator,
    UTADDiscriminators,
    UTADStudentGenerator,
    UTADTeacherGenerator,
    discriminator_features,
    discriminator_layers,
)
from nnunet_missingmod.trainers.utad import UTADNetStudentTrainer, UTADNetTeacherTrainer
from tests.conftest import PLAIN_UNET, RESENC_UNET, tiny_plans


def _configuration(network_class_name: str = PLAIN_UNET, features=(4, 8, 16), patch_size=(32, 32)):
    plans_manager = PlansManager(tiny_plans(network_class_name, patch_size=patch_size, features_per_stage=features))
    return plans_manager, plans_manager.get_configuration("3d_tiny")


def _generator(cls, network_class_name: str = PLAIN_UNET, features=(4, 8, 16)):
    _, configuration = _configuration(network_class_name, features)
    torch.manual_seed(0)
    return cls(num_modalities=4, arch_class_name=configuration.network_arch_class_name,
               arch_kwargs=configuration.network_arch_init_kwargs,
               arch_kwargs_req_import=configuration.network_arch_init_kwargs_req_import)


@pytest.mark.parametrize("network_class_name", [PLAIN_UNET, RESENC_UNET])
def test_shapes_follow_the_plans(network_class_name):
    teacher = _generator(UTADTeacherGenerator, network_class_name, features=(4, 8, 16, 32))
    image = torch.randn(2, 1, 32, 48)  # any size divisible by the total stride
    out = teacher(image, image * (image > 0), torch.tensor([0, 3]))
    assert out.whole.shape == out.tumour.shape == (2, 1, 32, 48)
    assert out.fused.shape == (2, 32, 4, 6)  # the bottleneck: last stage's width, 1/8 of the slice
    assert teacher.total_stride == (8, 8) and teacher.num_modalities == 4
    first_conv = next(m for m in teacher.global_encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 5  # image + 4-channel one-hot code
    assert [s.output_channels for s in teacher.global_decoder.stages] == [16, 8, 4]


def test_the_build_hook_gives_teacher_and_student_generators():
    plans_manager, configuration = _configuration()
    student = UTADNetStudentTrainer.build_network_architecture(plans_manager, configuration, 4, 3,
                                                               enable_deep_supervision=False)
    teacher = UTADNetTeacherTrainer.build_network_architecture(plans_manager, configuration, 4, 3)
    assert type(student) is UTADStudentGenerator and type(teacher) is UTADTeacherGenerator
    # one set of parameters: the teacher's weights load strictly into the student (its initialisation)
    student.load_state_dict(teacher.state_dict(), strict=True)
    assert student.translate(torch.randn(3, 1, 16, 24), torch.tensor([1, 2, 0])).shape == (3, 1, 16, 24)


def test_one_hot_code_is_the_naive_broadcast_and_changes_the_output():
    student = _generator(UTADStudentGenerator).eval()
    image = torch.randn(2, 1, 16, 16)
    conditioned = student.one_hot_input(image, torch.tensor([2, 0]))
    naive = torch.zeros(2, 5, 16, 16)
    naive[:, 0] = image[:, 0]
    naive[0, 1 + 2] = 1
    naive[1, 1 + 0] = 1
    assert torch.equal(conditioned, naive)
    with torch.no_grad():
        outputs = [student.translate(image, torch.full((2,), t)) for t in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert (outputs[a] - outputs[b]).abs().max() > 1e-4  # every target code reaches the output


def test_the_student_never_reads_a_mask_and_the_teacher_does():
    assert list(inspect.signature(UTADStudentGenerator.forward).parameters) == ["self", "image", "target_modality"]
    assert list(inspect.signature(UTADStudentGenerator.translate).parameters) == ["self", "source", "target_modality"]
    teacher = _generator(UTADTeacherGenerator).eval()
    student = _generator(UTADStudentGenerator).eval()
    student.load_state_dict(teacher.state_dict())
    image, target = torch.randn(2, 1, 16, 16), torch.tensor([1, 3])
    mask_a = (torch.rand(2, 1, 16, 16) > 0.5).float()
    with torch.no_grad():
        # the teacher's output depends on the tumour image it is given ...
        assert (teacher(image, image * mask_a, target).whole - teacher(image, image, target).whole).abs().max() > 1e-4
        # ... the student's local branch reads the whole image: it is the teacher given the image twice
        torch.testing.assert_close(student(image, target).whole, teacher(image, image, target).whole)
        torch.testing.assert_close(student(image, target).tumour, teacher(image, image, target).tumour)


def test_bad_inputs_are_clear_errors():
    student = _generator(UTADStudentGenerator)
    with pytest.raises(ValueError, match=r"slice size \(18, 16\) is not divisible by the network's total stride"):
        student.translate(torch.randn(1, 1, 18, 16), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"target_modality values must lie in 0\.\.3"):
        student.translate(torch.randn(1, 1, 16, 16), torch.tensor([4]))
    with pytest.raises(ValueError, match=r"\(B, 1, X, Y\) slices of one channel"):
        student.translate(torch.randn(1, 4, 16, 16), torch.tensor([0]))
    plans = PlansManager(tiny_plans(patch_size=(16, 16, 16)))
    configuration = plans.get_configuration("3d_tiny")
    with pytest.raises(ValueError, match="train it on a 2d configuration"):
        UTADNetStudentTrainer.build_network_architecture(plans, configuration, 4, 3)


def test_fusion_block_is_hi_nets_sum_product_maximum():
    encoder = _generator(UTADTeacherGenerator).global_encoder
    fusion = MixedFusionBlock(6, encoder, [3, 3]).eval()
    for module in fusion.modules():
        if isinstance(module, ModalityConditionalNorm):
            module.target = torch.tensor([0, 1])
    a, b = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    naive = torch.zeros(2, 18, 4, 4)
    for c in range(6):
        naive[:, c] = a[:, c] + b[:, c]
        naive[:, 6 + c] = a[:, c] * b[:, c]
        naive[:, 12 + c] = torch.where(a[:, c] > b[:, c], a[:, c], b[:, c])
    torch.testing.assert_close(fusion(a, b), fusion.blocks(naive))
    assert fusion(a, b).shape == (2, 6, 4, 4)


def test_conditional_norm_is_the_plans_norm_then_a_per_target_affine_map():
    torch.manual_seed(0)
    layer = ModalityConditionalNorm(3, norm_op=torch.nn.InstanceNorm2d, num_modalities=4, eps=1e-5, affine=True)
    x, target = torch.randn(2, 3, 5, 6), torch.tensor([3, 1])
    layer.target = target
    torch.testing.assert_close(layer(x), layer.norm(x))  # zero-initialised: the plans' normalisation
    with torch.no_grad():
        layer.scale.normal_()
        layer.shift.normal_()
    normalised = layer.norm(x).detach()
    scale, shift = layer.scale.detach(), layer.shift.detach()
    naive = torch.zeros_like(x)
    for b in range(2):
        for c in range(3):
            naive[b, c] = normalised[b, c] * (1 + float(scale[target[b], c])) + float(shift[target[b], c])
    torch.testing.assert_close(layer(x), naive)
    layer.target = None
    with pytest.raises(RuntimeError, match="needs the target modality"):
        layer(x)


def test_a_generator_saved_without_conditional_norms_loads_and_computes_the_same():
    generator = _generator(UTADStudentGenerator, features=(4, 8, 16)).eval()
    old_layout = dict(generator.state_dict())  # the affine maps are still zero: the generator before them
    for name, module in generator.named_modules(remove_duplicate=False):
        if isinstance(module, ModalityConditionalNorm):
            del old_layout[f"{name}.scale"], old_layout[f"{name}.shift"]
            for key in ("weight", "bias"):
                old_layout[f"{name}.{key}"] = old_layout.pop(f"{name}.norm.{key}")
    assert not any(".norm.norm." in key for key in old_layout)
    loaded = _generator(UTADStudentGenerator, features=(4, 8, 16)).eval()
    with torch.no_grad():
        for parameter in loaded.parameters():
            parameter.normal_()
    loaded.load_state_dict(old_layout, strict=True)
    image, target = torch.randn(2, 1, 32, 32), torch.tensor([1, 3])
    torch.testing.assert_close(loaded.translate(image, target), generator.translate(image, target))
    assert all(not m.scale.detach().any() and not m.shift.detach().any() for m in loaded.conditional_norms)


def test_the_target_code_reaches_the_inside_of_the_slice_through_the_normalisation():
    """One-hot input channels alone reach the first stage only at the padded border; the conditional norms do not."""
    generator = _generator(UTADStudentGenerator, features=(4, 8, 16)).eval()
    stage = generator.global_encoder.stages[0]
    image = torch.randn(1, 1, 96, 96)

    def first_stage(target: int) -> torch.Tensor:
        generator.set_target(torch.tensor([target]))
        return stage(generator.one_hot_input(image, torch.tensor([target])))[0].detach()

    inside = (slice(None), slice(3, -3), slice(3, -3))
    border = torch.ones(96, 96, dtype=torch.bool)
    border[3:-3, 3:-3] = False
    difference = (first_stage(0) - first_stage(2)).abs()
    # the one-hot channels' own path: inside, only the normalisation's statistics carry the border's difference
    assert float(difference[inside].mean()) < 0.2 * float(difference[:, border].mean())
    with torch.no_grad():
        for module in generator.conditional_norms:
            module.shift.normal_()
    difference = (first_stage(0) - first_stage(2)).abs()
    assert float(difference[inside].mean()) > 0.5 * float(difference[:, border].mean())


def test_discriminators_give_patch_scores_and_modality_logits():
    critic = PatchDiscriminator(num_modalities=4, features=[4, 8, 16])
    scores, logits = critic(torch.randn(3, 1, 32, 40))
    assert scores.shape == (3, 1, 4, 5) and logits.shape == (3, 4)
    both = UTADDiscriminators(num_modalities=4, features=[4, 8])
    image = torch.randn(2, 1, 16, 16)
    assert not torch.equal(both(image, "global")[0], both(image, "local")[0])  # two separate critics
    with pytest.raises(ValueError, match="branch must be one of"):
        both(image, "tumour")


def test_conditional_discriminator_adds_the_projection_of_each_patch_on_the_modality_embedding():
    torch.manual_seed(0)
    critic = PatchDiscriminator(num_modalities=4, features=[4, 8, 16], conditional=True)
    image, modality = torch.randn(3, 1, 32, 40), torch.tensor([2, 0, 3])
    scores, logits = critic(image, modality)
    features = critic.main(image).detach()
    unconditional = critic.source_head(features).detach()
    embedding = critic.modality_embedding.weight.detach()
    naive = torch.zeros_like(unconditional)
    for b in range(3):
        for x in range(features.shape[2]):
            for y in range(features.shape[3]):
                naive[b, 0, x, y] = unconditional[b, 0, x, y] + sum(
                    float(embedding[modality[b], c]) * float(features[b, c, x, y])
                    for c in range(features.shape[1]))
    torch.testing.assert_close(scores, naive, rtol=1e-5, atol=1e-6)
    plain = PatchDiscriminator(num_modalities=4, features=[4, 8, 16])
    plain.load_state_dict({k: v for k, v in critic.state_dict().items() if not k.startswith("modality_embedding")})
    torch.testing.assert_close(plain(image)[1], logits)  # the classification head is unchanged
    torch.testing.assert_close(plain(image, modality)[0], unconditional)  # unconditional: modality not read
    assert plain.modality_embedding is None
    with pytest.raises(ValueError, match="needs the modality"):
        critic(image)


def test_blurred_classifier_reads_the_gaussian_low_pass_and_the_source_head_the_image():
    from scipy.ndimage import gaussian_filter

    torch.manual_seed(0)
    sigma = 1.5
    critic = PatchDiscriminator(num_modalities=4, features=[4, 8, 16], classifier_blur_sigma=sigma)
    plain = PatchDiscriminator(num_modalities=4, features=[4, 8, 16])
    plain.load_state_dict(critic.state_dict())  # no new weights: a saved critic loads either way
    image = torch.randn(2, 1, 32, 40)
    scores, logits = critic(image)
    # reference: scipy's Gaussian filter (reflected edges without repeating the edge pixel, truncated at 3 sigma
    # rounded up), then the same trunk and head
    reference = torch.tensor(np.stack([gaussian_filter(image[b, 0].numpy().astype(np.float64), sigma, mode="mirror",
                                                       truncate=math.ceil(3 * sigma) / sigma)
                                       for b in range(2)])[:, None], dtype=torch.float32)
    torch.testing.assert_close(critic.blur(image), reference, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        expected = critic.class_head(critic.main(reference).mean(dim=(2, 3), keepdim=True)).flatten(1)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores, plain(image)[0])  # real/fake: the image itself
    assert not torch.allclose(logits, plain(image)[1])
    # a texture at the pixel scale (a checkerboard of amplitude 1) is gone from what the classifier reads
    checker = torch.tensor([[(-1.0) ** (x + y) for y in range(40)] for x in range(32)])
    textured = image + checker
    assert float((critic.blur(textured) - critic.blur(image)).abs().max()) < 1e-3
    assert torch.equal(plain.blur(image), image)  # sigma 0: the paper's classifier


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), True])
def test_blurred_classifier_rejects_a_bad_sigma(sigma):
    with pytest.raises(ValueError, match="classifier_blur_sigma must be a number >= 0"):
        PatchDiscriminator(num_modalities=4, features=[4, 8], classifier_blur_sigma=sigma)


def test_blurred_classifier_is_2d_only_and_needs_images_larger_than_the_kernel():
    with pytest.raises(ValueError, match="2D images"):
        PatchDiscriminator(num_modalities=4, features=[4, 8], conv_op=torch.nn.Conv3d, classifier_blur_sigma=1.0)
    critic = PatchDiscriminator(num_modalities=4, features=[4, 8], classifier_blur_sigma=2.0)
    with pytest.raises(ValueError, match=r"larger than 6 pixels per axis, got \[16, 6\]"):
        critic(torch.randn(1, 1, 16, 6))


def test_discriminator_depth_and_widths():
    assert discriminator_layers((128, 128), None) == 6  # StarGAN / UTAD-Net at 128 x 128
    assert discriminator_layers((32, 40), None) == 4  # the score map keeps at least 2 x 2
    assert discriminator_layers((192, 160), None) == 6
    assert discriminator_layers((32, 32), 5) == 5
    with pytest.raises(ValueError, match="num_layers=6 halves the patch"):
        discriminator_layers((32, 32), 6)
    assert discriminator_features([32, 64, 128], 5, None) == [32, 64, 128, 128, 128]
    assert discriminator_features([32, 64], 2, [8, 16]) == [8, 16]
    with pytest.raises(ValueError, match="2 positive integers"):
        discriminator_features([32, 64], 2, [8])


def test_source_skip_adds_each_branchs_input_and_travels_with_the_weights():
    off, on = _generator(UTADTeacherGenerator), _generator(UTADTeacherGenerator)  # the same seed: the same weights
    assert not bool(off.source_skip)  # the paper's generator by default
    on.source_skip.fill_(True)
    image, target = torch.randn(2, 1, 32, 32), torch.tensor([1, 3])
    tumour = image * (torch.rand_like(image) > 0.7)
    without, with_skip = off(image, tumour, target), on(image, tumour, target)
    torch.testing.assert_close(with_skip.whole, without.whole + image)
    torch.testing.assert_close(with_skip.tumour, without.tumour + tumour)
    torch.testing.assert_close(with_skip.fused, without.fused)
    # the flag is in the weights: the inference build (plans only, flag off) gets it from the checkpoint
    plans_manager, configuration = _configuration()
    student = UTADNetStudentTrainer.build_network_architecture(plans_manager, configuration, 4, 3)
    assert not bool(student.source_skip)
    student.load_state_dict(on.state_dict(), strict=True)
    assert bool(student.source_skip)
    torch.testing.assert_close(student.translate(image, target), on(image, image, target).whole)
    # weights saved before the option existed have no flag: loaded as off, strictly
    old = {key: value for key, value in off.state_dict().items() if key != "source_skip"}
    student.load_state_dict(old, strict=True)
    assert not bool(student.source_skip)
