"""L_ADT-KD, L_aux, L_consis and L_rec against naive numpy loops over pairs, voxels and regions."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_missingmod.losses.distillation import (
    adt_kd_loss,
    affinity,
    auxiliary_loss,
    binary_kl,
    consistency_loss,
    reconstruction_loss,
)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def naive_adt_kd(student_features, student_logits, teacher_features, teacher_logits, projections):
    """Σ_s Σ_t a_{s,t} (‖Q(F_t) − F_s‖ + KL) / (N_s N_t), voxel by voxel on the teacher's grid.

    Q = projections[(s, t)] maps the teacher's channels to the student's; the student is resized to the
    teacher's grid; a_{s,t} = (1 + mean cosine) / 2. Also returns Σ ‖Q(F_t) − F_s‖² / (N_s N_t), the maps' fit.
    """
    feature_sum, logit_sum, fit_sum = 0.0, 0.0, 0.0
    for t, (teacher, teacher_logits_t) in enumerate(zip(teacher_features, teacher_logits, strict=True)):
        size = teacher.shape[2:]
        p_teacher = sigmoid(teacher_logits_t.detach().numpy())
        for s, (feature, logits) in enumerate(zip(student_features, student_logits, strict=True)):
            with torch.no_grad():
                mapped = projections[(s, t)](teacher).numpy()
                student = F.interpolate(feature, size=size, mode="trilinear", align_corners=False).numpy()
                p_student = sigmoid(F.interpolate(logits, size=size, mode="trilinear",
                                                  align_corners=False).numpy())
            batch, _, *spatial = mapped.shape
            cosines = []
            for b in range(batch):
                for voxel in np.ndindex(*spatial):
                    u = mapped[(b, slice(None), *voxel)]
                    v = student[(b, slice(None), *voxel)]
                    cosines.append(float(u @ v) / (max(np.linalg.norm(u), 1e-12) * max(np.linalg.norm(v), 1e-12)))
            weight = (1.0 + float(np.mean(cosines))) / 2.0
            squared = float(np.mean((mapped - student) ** 2))
            fit_sum += squared
            kl = p_teacher * np.log(p_teacher / p_student) + (1 - p_teacher) * np.log((1 - p_teacher) / (1 - p_student))
            feature_sum += weight * squared
            logit_sum += weight * float(np.mean(kl))
    pairs = len(student_features) * len(teacher_features)
    return feature_sum / pairs, logit_sum / pairs, fit_sum / pairs


def _pyramid(channels, sizes, regions, seed):
    generator = torch.Generator().manual_seed(seed)
    features = [torch.randn(2, c, s, s, s, generator=generator).abs() for c, s in zip(channels, sizes, strict=True)]
    logits = [torch.randn(2, regions, s, s, s, generator=generator) * 2 for s in sizes]
    return features, logits


def test_adt_kd_matches_naive_loop_over_all_stage_pairs():
    torch.manual_seed(0)
    student_features, student_logits = _pyramid([6, 10, 12], [8, 4, 2], 3, seed=1)
    teacher_features, teacher_logits = _pyramid([3, 6], [4, 2], 3, seed=2)
    projections = {(s, t): nn.Conv3d(tf.shape[1], sf.shape[1], 1)
                   for s, sf in enumerate(student_features) for t, tf in enumerate(teacher_features)}
    ours = adt_kd_loss(student_features, student_logits, teacher_features, teacher_logits,
                       lambda s, t: projections[(s, t)], feature_weight=0.7, logit_weight=1.3)
    feature, logit, fit = naive_adt_kd(student_features, student_logits, teacher_features, teacher_logits, projections)
    assert ours["feature"].item() == pytest.approx(feature, rel=1e-4)
    assert ours["logit"].item() == pytest.approx(logit, rel=1e-4)
    assert ours["total"].item() == pytest.approx(0.7 * feature + 1.3 * logit, rel=1e-4)
    assert ours["projection"].item() == 0.0  # the feature term trains the projections
    logit_only = adt_kd_loss(student_features, student_logits, teacher_features, teacher_logits,
                             lambda s, t: projections[(s, t)], feature_weight=0.0)
    assert logit_only["projection"].item() == pytest.approx(fit, rel=1e-4)
    assert logit_only["logit"].item() == pytest.approx(logit, rel=1e-4)


def test_every_pair_keeps_a_positive_weight_and_every_projection_learns():
    """Opposed features (cosine -1) still get a weight, and each projection gets a gradient in every KD ablation."""
    from nnunet_missingmod.losses.distillation import affinity

    feature = torch.rand(2, 4, 3, 3, 3) + 0.1
    assert affinity(feature, -feature).item() == pytest.approx(0.0, abs=1e-6)
    assert affinity(feature, feature).item() == pytest.approx(1.0, abs=1e-6)
    assert affinity(feature, torch.rand(2, 4, 3, 3, 3) - 0.5).item() > 0.05

    student_features, student_logits = _pyramid([6, 10], [8, 4], 3, seed=5)
    teacher_features, teacher_logits = _pyramid([3, 6], [4, 2], 3, seed=6)
    for feature_weight, logit_weight in ((1.0, 1.0), (1.0, 0.0), (0.0, 1.0)):
        projections = {(s, t): nn.Conv3d(tf.shape[1], sf.shape[1], 1)
                       for s, sf in enumerate(student_features) for t, tf in enumerate(teacher_features)}
        for conv in projections.values():  # start every pair opposed: a clamped cosine would switch them all off
            nn.init.constant_(conv.weight, -0.2)
            nn.init.zeros_(conv.bias)
        losses = adt_kd_loss(student_features, student_logits, teacher_features, teacher_logits,
                             lambda s, t, p=projections: p[(s, t)], feature_weight=feature_weight,
                             logit_weight=logit_weight)
        (losses["total"] + losses["projection"]).backward()
        for pair, conv in projections.items():
            assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0, (feature_weight, pair)


def test_teacher_learns_from_the_student_unless_detached():
    student_features, student_logits = _pyramid([4, 8], [8, 4], 3, seed=3)
    teacher_features, teacher_logits = _pyramid([4, 8], [8, 4], 3, seed=4)
    identity = nn.Identity()
    convs = {(0, 1): nn.Conv3d(8, 4, 1), (1, 0): nn.Conv3d(4, 8, 1)}
    for detach in (False, True):
        tensors = [t.clone().requires_grad_() for t in (*student_features, *student_logits, *teacher_features,
                                                          *teacher_logits)]
        students, teachers = tensors[:4], tensors[4:]
        losses = adt_kd_loss(students[:2], students[2:], teachers[:2], teachers[2:],
                             lambda s, t: convs.get((s, t), identity), detach_teacher=detach)
        losses["total"].backward()
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in students)
        if detach:
            assert all(t.grad is None for t in teachers)
        else:  # mutual learning (paper): the teacher's features and logits are pulled towards the student's
            assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in teachers)
    only_features = adt_kd_loss(student_features, student_logits, teacher_features, teacher_logits,
                                lambda s, t: convs.get((s, t), identity), logit_weight=0.0)
    assert only_features["logit"].item() == 0.0
    assert only_features["total"].item() == pytest.approx(only_features["feature"].item())


def test_binary_kl_is_zero_for_equal_maps_and_matches_formula():
    logits = torch.randn(2, 3, 4, 4, 4)
    assert binary_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    p, q = 0.9, 0.3
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    to_logit = lambda x: torch.full((1, 1, 1, 1, 1), math.log(x / (1 - x)))  # noqa: E731
    assert binary_kl(to_logit(p), to_logit(q)).item() == pytest.approx(expected, rel=1e-5)


def test_auxiliary_loss_is_weighted_bce_per_stage():
    torch.manual_seed(5)
    logits = [torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4)]
    targets = [torch.randint(0, 2, (2, 3, 8, 8, 8)).float(), torch.randint(0, 2, (2, 3, 4, 4, 4)).float()]
    expected = 0.0
    for logit, target, weight in zip(logits, targets, [0.75, 0.25], strict=True):
        p = sigmoid(logit.numpy().astype(np.float64))
        y = target.numpy()
        expected += weight * float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))
    assert auxiliary_loss(logits, targets, [0.75, 0.25]).item() == pytest.approx(expected, rel=1e-5)


def test_consistency_and_reconstruction_losses():
    torch.manual_seed(6)
    teacher, student = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    expected = float(np.mean((sigmoid(teacher.numpy()) - sigmoid(student.numpy())) ** 2))
    assert consistency_loss(teacher, student).item() == pytest.approx(expected, rel=1e-5)

    image, rebuilt = torch.randn(2, 4, 6, 6, 6), torch.randn(2, 4, 6, 6, 6)
    available = torch.tensor([[True, False, True, False], [False, False, False, True]])
    per_pair = [float(np.mean((rebuilt[b, m].numpy() - image[b, m].numpy()) ** 2))
                for b in range(2) for m in range(4) if available[b, m]]
    assert reconstruction_loss(rebuilt, image, available).item() == pytest.approx(np.mean(per_pair), rel=1e-5)


def test_learned_maps_cannot_shrink_the_feature_target_away():
    """Only the teacher side has a learned map: fitting it to unrelated features leaves the student's variance."""
    student_features, student_logits = _pyramid([6], [4], 3, seed=7)
    teacher_features, teacher_logits = _pyramid([5], [4], 3, seed=8)  # unrelated to the student
    mapping = nn.Conv3d(5, 6, 1)
    optimiser = torch.optim.SGD(mapping.parameters(), lr=0.01, momentum=0.99)
    for _ in range(300):
        losses = adt_kd_loss(student_features, student_logits, teacher_features, teacher_logits,
                             lambda s, t: mapping, logit_weight=0.0)
        optimiser.zero_grad()
        losses["total"].backward()
        optimiser.step()
    # the best a linear map of unrelated features can do is the student's variance per channel (~0.36 for |N(0,1)|)
    variance = student_features[0].var(dim=(0, 2, 3, 4)).mean().item()
    weight = affinity(mapping(teacher_features[0]).detach(), student_features[0]).item()
    assert losses["feature"].item() > 0.5 * weight * variance > 0.05
