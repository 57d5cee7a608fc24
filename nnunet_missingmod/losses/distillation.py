"""Tumour-region disentanglement losses of D²-Net: affinity-guided dense distillation and its companions.

Yang et al., "D²-Net: Dual Disentanglement Network for Brain Tumor Segmentation With Missing
Modalities", IEEE TMI 2022:

* L_ADT-KD (eq. 8-9): for every pair of a student decoder stage s and a teacher decoder stage t,
  the student's features are resized to the teacher's grid, the teacher's features (its C region
  features, concatenated) are mapped to the student's channels, the affinity ``a_{s,t}`` is the global
  average of the normalised Hadamard product of the two maps, and the pair contributes
  ``a_{s,t} (‖Q(F_t) − F_s‖ + KL(p_t ‖ p_s))``, the KL per region on sigmoid probabilities of the
  stages' auxiliary heads;
* L_aux (eq. 7): binary cross-entropy of each teacher map against its region mask;
* L_consis: squared distance between the final teacher and student probabilities;
* L_rec (eq. 6): mean squared error of the reconstructed modalities.

Normalisation and choices (what λ2 = 1 means here):

* "normalised Hadamard product": features are L2-normalised over channels at each voxel, and the
  affinity is ``a_{s,t} = (1 + mean cosine) / 2`` in [0, 1], as in the authors' release: a pair whose
  features start out unrelated or opposed keeps a positive weight and can still learn (a cosine
  clamped at 0 would switch such a pair off for good). The affinity is a weight, not a target: it is
  detached, or the network could lower the loss by making the two maps dissimilar;
* ``‖F_t − F_s‖`` is the mean squared difference per element, and the KL the mean over voxels and
  regions, so the loss does not grow with the patch size; the pair sum is divided by N_s·N_t (the
  paper sums over pairs) so that λ2 does not depend on the network depth. With these means, λ2 = 1
  here weighs the terms differently from the paper's λ2 = 1 on sums;
* the learned 1x1x1 map Q per pair sits on the teacher's side and fuses its region features into the
  student's channels (the paper's two decoders have equal widths; ours differ, and the regions are
  kept apart). The student's side is the student's own features, shaped by L_seg, so the feature term
  cannot be driven to 0 by shrinking learned maps on both sides. Q is trained through the feature
  term; when that term is off (logit-only ablation) the affinities still need Q, and nothing else
  would train it (its affinities would be frozen random numbers): there it is fitted by its own term
  ``‖Q(sg F_t) − sg F_s‖²`` (sg: no gradient to the networks, so it only moves Q);
* ``detach_teacher`` (default False, as in the paper: "the teacher can also learn holistic ... from
  the student", mutual learning) stops the distillation gradient at the teacher when set;
* the affinity is one number per stage pair and batch (the mean over samples and voxels);
* L_aux is summed over all teacher stages with nnU-Net's deep-supervision weights;
* L_rec covers the modalities available in the sample (the reconstruction of a dropped modality from
  its code would have no input to come from).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resize(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of (B, C, *S) to ``size`` (no-op when the size already matches)."""
    if tuple(volume.shape[2:]) == tuple(size):
        return volume
    return F.interpolate(volume, size=tuple(size), mode="trilinear", align_corners=False)


def affinity(teacher_feature: torch.Tensor, student_feature: torch.Tensor) -> torch.Tensor:
    """a_{s,t} = (1 + c) / 2, c the mean over voxels (and the batch) of the channel vectors' cosine similarity."""
    product = F.normalize(teacher_feature.float(), dim=1) * F.normalize(student_feature.float(), dim=1)
    return (1 + product.sum(1).mean()) / 2


def binary_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over elements of KL(Bernoulli(σ(l_t)) ‖ Bernoulli(σ(l_s)))."""
    teacher_logits, student_logits = teacher_logits.float(), student_logits.float()
    p_teacher = torch.sigmoid(teacher_logits)
    kl = p_teacher * (F.logsigmoid(teacher_logits) - F.logsigmoid(student_logits)) \
        + (1 - p_teacher) * (F.logsigmoid(-teacher_logits) - F.logsigmoid(-student_logits))
    return kl.mean()


def adt_kd_loss(student_features: Sequence[torch.Tensor], student_logits: Sequence[torch.Tensor],
                teacher_features: Sequence[torch.Tensor], teacher_logits: Sequence[torch.Tensor],
                projection: Callable[[int, int], nn.Module], *, feature_weight: float = 1.0,
                logit_weight: float = 1.0, detach_teacher: bool = False) -> dict[str, torch.Tensor]:
    """L_ADT-KD over all N_s × N_t stage pairs (eq. 8-9, scaled by 1 / (N_s N_t)) and the maps' fit.

    Args:
        student_features, student_logits: per student stage, (B, C_s, *S_s) and (B, R, *S_s).
        teacher_features, teacher_logits: per teacher stage, (B, C_t, *S_t) (the region features concatenated)
            and (B, R, *S_t).
        projection: ``projection(s, t)`` maps the teacher's C_t channels to the student's C_s (Q above).
        feature_weight, logit_weight: weights of the feature and KL terms (ablations set one to 0).
        detach_teacher: no distillation gradient into the teacher (the paper lets the teacher learn too);
            Q is still trained.

    Returns:
        ``{"feature": Σ a·‖Q(F_t) − F_s‖, "logit": Σ a·KL, "total": feature_weight * feature + logit_weight * logit,
        "projection": Σ ‖Q(sg F_t) − sg F_s‖²}``, each divided by N_s·N_t. ``projection`` is computed only when
        the feature term is off and the logit term on (else 0); it trains only the maps Q.
    """
    pairs = len(student_features) * len(teacher_features)
    zero = student_features[0].sum() * 0.0
    feature_term, logit_term, projection_term = zero, zero, zero
    for t, (teacher_feature, target_logits) in enumerate(zip(teacher_features, teacher_logits, strict=True)):
        if detach_teacher:
            teacher_feature, target_logits = teacher_feature.detach(), target_logits.detach()
        size = teacher_feature.shape[2:]
        for s, (feature, logits) in enumerate(zip(student_features, student_logits, strict=True)):
            mapping = projection(s, t)
            student = resize(feature, size).float()  # (B, C_s, *S_t)
            # without the feature term, Q only weighs pairs and is fitted by its own term: no gradient to the teacher
            mapped = mapping(teacher_feature if feature_weight else teacher_feature.detach()).float()  # (B, C_s, *S_t)
            weight = affinity(mapped.detach(), student.detach())
            if feature_weight:
                feature_term = feature_term + weight * (mapped - student).pow(2).mean()
            elif logit_weight:
                projection_term = projection_term + (mapped - student.detach()).pow(2).mean()
            if logit_weight:
                logit_term = logit_term + weight * binary_kl(target_logits, resize(logits, size))
    feature_term, logit_term, projection_term = feature_term / pairs, logit_term / pairs, projection_term / pairs
    return {"feature": feature_term, "logit": logit_term, "projection": projection_term,
            "total": feature_weight * feature_term + logit_weight * logit_term}


def auxiliary_loss(teacher_logits: Sequence[torch.Tensor], region_targets: Sequence[torch.Tensor],
                   stage_weights: Sequence[float]) -> torch.Tensor:
    """L_aux (eq. 7): Σ_stage w_stage · BCE(teacher logits, region masks).

    Args:
        teacher_logits: per stage (B, R, *S), largest first.
        region_targets: per stage (B, R, *S) binary region masks (nnU-Net's deep-supervision targets).
        stage_weights: one weight per stage (nnU-Net's deep-supervision weights).
    """
    terms = [weight * F.binary_cross_entropy_with_logits(logits.float(), target.float())
             for logits, target, weight in zip(teacher_logits, region_targets, stage_weights, strict=True) if weight]
    return torch.stack(terms).sum()


def consistency_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """L_consis: mean squared difference of the final teacher and student sigmoid probabilities."""
    return (torch.sigmoid(teacher_logits.float()) - torch.sigmoid(student_logits.float())).pow(2).mean()


def reconstruction_loss(reconstruction: torch.Tensor, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """L_rec (eq. 6): MSE per modality, averaged over the available (sample, modality) pairs.

    Args:
        reconstruction, image: (B, M, *S).
        available: (B, M) boolean.
    """
    per_modality = (reconstruction.float() - image.float()).pow(2).flatten(2).mean(-1)  # (B, M)
    weights = available.to(per_modality.dtype)
    return (per_modality * weights).sum() / weights.sum().clamp_min(1)
