"""UTAD-Net teacher and student trainers: pair drawing, loss assembly (eq. 12, 13), the teacher checks, resume,
validation, and the run through nnU-Net's commands.

In-process tests drive nnU-Net's hooks on tiny hand-written 2D plans with synthetic batches (no data loaders).
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_missingmod.config import OVERRIDE_ENV
from nnunet_missingmod.networks.utad import UTADStudentGenerator
from nnunet_missingmod.trainers.utad import (
    INTENSITY_TRANSFORMS,
    SYNTHESIS_HEATMAP_FILE,
    SYNTHESIS_VALIDATION_FILE,
    UTADNetStudentTrainer,
    UTADNetTeacherTrainer,
    brain_ssim,
    draw_paired_pairs,
    draw_unpaired_pairs,
    histogram_matching_ssim,
    paired_translation_loss,
    slice_quality,
    synthesis_matrices,
)
from tests.conftest import SYNTHESIS_CONFIGURATION, SYNTHESIS_NAME, make_tiny_trainer
from tests.trainers.resume_checks import assert_same_modules, assert_same_optimizer_state, run_epochs

TEACHER_TERMS = {"adv_global", "adv_local", "cls_global", "cls_local", "rec", "local"}
CRITIC_TERMS = {"d_adv_global", "d_gp_global", "d_cls_global", "d_adv_local", "d_gp_local", "d_cls_local"}
TINY = {"patch_size": (32, 32), "features_per_stage": (4, 8, 16), "batch_size": 3}


# ---------------------------------------------------------------------------------------------- helpers
def _batch(seed: int, batch: int = 3, missing: dict[int, list[int]] | None = None) -> dict:
    """Synthetic 2D batch: 4 channels, region targets WT/TC/ET; ``missing`` {sample: [channels]} are zero."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(batch, 4, 32, 32, generator=generator)
    for sample, channels in (missing or {}).items():
        data[sample, channels] = 0
    wt = torch.zeros(batch, 32, 32)
    wt[:, 8:20, 10:24] = 1
    tc = torch.zeros_like(wt)
    tc[:, 10:16, 12:20] = 1
    et = torch.zeros_like(wt)
    et[:, 12:14, 14:18] = 1
    return {"data": data, "target": torch.stack((wt, tc, et), 1)}


def _override(tmp_path: Path, monkeypatch, settings: dict) -> None:
    path = tmp_path / "override.json"
    path.write_text(json.dumps(settings))
    monkeypatch.setenv(OVERRIDE_ENV, str(path))


def _trainer(trainer_class, tmp_path, monkeypatch, **plans_kwargs):
    trainer = make_tiny_trainer(trainer_class, tmp_path, monkeypatch, **{**TINY, **plans_kwargs})
    trainer.n_critic = 1
    trainer.save_every = 1
    trainer.num_iterations_per_epoch = 2
    torch.manual_seed(0)
    trainer.initialize()
    trainer.logger.plot_progress_png = lambda folder: None  # speed only
    counter = iter(range(10**6))
    trainer.dataloader_train = (_batch(20_000 + next(counter)) for _ in iter(int, 1))
    return trainer


def _teacher_checkpoint(tmp_path, monkeypatch, **plans_kwargs) -> Path:
    """Save an (untrained) teacher's checkpoint_final.pth where the student looks by default; return its path."""
    teacher = _trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch, **plans_kwargs)
    with torch.no_grad():  # weights unlike a freshly seeded student's
        for parameter in teacher.network.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    path = Path(teacher.output_folder) / "checkpoint_final.pth"
    teacher.save_checkpoint(str(path))
    return path


# ---------------------------------------------------------------------------------------------- pair drawing
def test_unpaired_pairs_use_only_acquired_channels_of_another_sample():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        acquired = rng.random((4, 4)) < 0.6
        draw = draw_unpaired_pairs(acquired, rng)
        for i, s, t, j in zip(draw.rows, draw.source, draw.target, draw.partner, strict=True):
            assert j == (i + 1) % 4 and j != i  # the real target is another sample's slice
            assert acquired[i, s] and acquired[j, t] and s != t
            seen.add((int(s), int(t)))
        # every sample that could have a pair got one (naive check over all (s, t))
        possible = {i for i in range(4) for s in range(4) for t in range(4)
                    if s != t and acquired[i, s] and acquired[(i + 1) % 4, t]}
        assert set(draw.rows.tolist()) == possible
    assert seen == {(s, t) for s in range(4) for t in range(4) if s != t}
    assert draw_unpaired_pairs(np.ones((1, 4), bool), rng).rows.size == 0  # a batch of one has no partner


def test_unpaired_partner_comes_from_another_case():
    """nnU-Net draws cases with replacement: a batch can hold two slices of one case; the partner skips them."""
    rng = np.random.default_rng(2)
    for _ in range(200):
        cases = [f"case_{k}" for k in rng.integers(0, 3, size=5)]
        acquired = rng.random((5, 4)) < 0.7
        draw = draw_unpaired_pairs(acquired, rng, cases=cases)
        for i, s, t, j in zip(draw.rows, draw.source, draw.target, draw.partner, strict=True):
            # naive: walk the batch from i + 1 on, the first slice of another case
            expected = next(k % 5 for k in range(i + 1, i + 5) if cases[k % 5] != cases[i])
            assert j == expected and cases[j] != cases[i]
            assert acquired[i, s] and acquired[j, t] and s != t
    same_case = draw_unpaired_pairs(np.ones((3, 4), bool), rng, cases=["case_7"] * 3)
    assert same_case.rows.size == 0  # no other case in the batch: no unpaired partner
    with pytest.raises(ValueError, match="2 case identifiers for a batch of 3"):
        draw_unpaired_pairs(np.ones((3, 4), bool), rng, cases=["a", "b"])


def test_teacher_step_draws_partners_from_the_batch_keys(tmp_path, monkeypatch):
    """The case identifiers of nnU-Net's batch (``keys``) reach the pair draw of every critic and generator update."""
    import nnunet_missingmod.trainers.utad as utad

    seen = []
    original = utad.draw_unpaired_pairs
    monkeypatch.setattr(utad, "draw_unpaired_pairs", lambda acquired, rng=None, cases=None:
                        seen.append(None if cases is None else list(cases)) or original(acquired, rng, cases))
    trainer = _trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch)
    trainer.n_critic = 2
    trainer.dataloader_train = iter([{**_batch(7), "keys": ["case_b", "case_b", "case_c"]}])
    trainer.on_train_epoch_start()
    trainer.train_step({**_batch(6), "keys": ["case_a", "case_a", "case_a"]})
    # critic update 1 (the step's batch: one case, so no pair: zero losses), critic update 2 and the generator
    # update (the fresh batch)
    assert seen == [["case_a"] * 3, ["case_b", "case_b", "case_c"], ["case_b", "case_b", "case_c"]]
    trainer._to_device(_batch(9))  # a batch without keys (not from nnU-Net's loader): the batch is rolled
    assert trainer.batch_keys is None


def test_paired_pairs_take_two_channels_of_the_same_slice():
    rng = np.random.default_rng(1)
    for _ in range(200):
        acquired = rng.random((5, 4)) < 0.5
        draw = draw_paired_pairs(acquired, rng)
        assert set(draw.rows.tolist()) == {i for i in range(5) if acquired[i].sum() >= 2}
        for i, s, t, j in zip(draw.rows, draw.source, draw.target, draw.partner, strict=True):
            assert i == j and s != t and acquired[i, s] and acquired[i, t]


def test_missing_channels_are_never_sources_or_real_targets(tmp_path, monkeypatch):
    trainer = _trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch)
    batch = _batch(3, missing={0: [0, 1], 1: [3], 2: [1, 2, 3]})  # sample 2 has only T1
    data, target = batch["data"], batch["target"]
    acquired = [data[i, c] for i in range(3) for c in range(4) if data[i, c].abs().sum() > 0]
    np.random.seed(0)
    for _ in range(50):
        unpaired = trainer.unpaired_batch(data, target)
        for v in range(unpaired.source.shape[0]):  # every slice used is an acquired channel of a sample
            assert any(torch.equal(unpaired.source[v, 0], slice_) for slice_ in acquired)
            assert any(torch.equal(unpaired.real[v, 0], slice_) for slice_ in acquired)
        torch.testing.assert_close(unpaired.real_tumour, unpaired.real * target[:1, :1])  # WT of the partner


def test_tumour_mask_is_the_configured_region(tmp_path, monkeypatch):
    batch = _batch(0)
    for region, channel in (("WT", 0), ("TC", 1), ("ET", 2)):  # dataset.json's region order
        _override(tmp_path, monkeypatch, {"utad": {"mask_region": region}})
        trainer = make_tiny_trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch, **TINY)
        trainer.initialize()
        torch.testing.assert_close(trainer.tumour_mask(batch["target"]), batch["target"][:, channel:channel + 1])
    _override(tmp_path, monkeypatch, {"utad": {"mask_region": "edema"}})
    with pytest.raises(ValueError, match="utad.mask_region must be one of"):
        make_tiny_trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch, **TINY)


# ---------------------------------------------------------------------------------------------- training steps
def test_teacher_step_updates_both_sides_and_totals_equation_12(tmp_path, monkeypatch):
    trainer = _trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch)
    g_before = [p.detach().clone() for p in trainer.network.parameters()]
    d_before = [p.detach().clone() for p in trainer.discriminator.parameters()]
    np.random.seed(0)
    outputs = trainer.train_step(_batch(1))
    assert outputs.keys() == {"loss"} | {f"loss_{t}" for t in TEACHER_TERMS | CRITIC_TERMS}
    assert all(np.isfinite(v) for v in outputs.values())
    expected = sum(outputs[f"loss_{t}"] for t in ("adv_global", "adv_local", "cls_global", "cls_local")) + \
        10.0 * (outputs["loss_rec"] + outputs["loss_local"])  # lambda1 = 10
    assert float(outputs["loss"]) == pytest.approx(float(expected), rel=1e-5)
    for before, module in ((g_before, trainer.network), (d_before, trainer.discriminator)):
        assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert 0 < outputs["loss_d_gp_global"] and 0 < outputs["loss_d_gp_local"]


def test_lambda_cls_weighs_the_classification_terms_of_both_sides(tmp_path, monkeypatch):
    _override(tmp_path, monkeypatch, {"utad": {"lambda_cls": 3.0}})
    trainer = _trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch)
    batch = _batch(2)
    data, target = trainer._to_device(batch)
    np.random.seed(0)
    critic = trainer.discriminator_losses(data, target)
    expected = sum(critic[f"d_adv_{b}"] + critic[f"d_gp_{b}"] + 3.0 * critic[f"d_cls_{b}"] for b in ("global", "local"))
    assert float(critic["total"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    np.random.seed(0)
    generator = trainer.generator_losses(data, target)
    expected = generator["adv_global"] + generator["adv_local"] + 3.0 * (generator["cls_global"] +
                                                                         generator["cls_local"]) + \
        10.0 * (generator["rec"] + generator["local"])
    assert float(generator["total"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    with pytest.raises(ValueError, match="utad.lambda_cls must be a number >= 0"):
        _override(tmp_path, monkeypatch, {"utad": {"lambda_cls": -1}})
        make_tiny_trainer(UTADNetTeacherTrainer, tmp_path / "bad", monkeypatch, **TINY)


def test_paired_term_is_the_l1_to_the_same_slice_of_the_target_modality(tmp_path, monkeypatch):
    _override(tmp_path, monkeypatch, {"utad": {"lambda_paired": 2.0}})
    trainer = _trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch)
    assert "paired" in trainer.generator_terms and trainer.term_weights()["paired"] == 2.0
    trainer.network.eval()  # the same forward twice
    excluded = 0
    for seed in range(6):
        batch = _batch(seed, missing={0: [2], 2: [0, 3]})  # sample 0 lacks T1ce, sample 2 T1 and FLAIR
        data, target = trainer._to_device(batch)
        np.random.seed(seed)
        losses = trainer.generator_losses(data, target)
        np.random.seed(seed)  # the same draw, by hand
        draw = draw_unpaired_pairs((data.flatten(2).abs().sum(-1) > 0).numpy())
        with torch.no_grad():
            generated = trainer.generate(data[draw.rows, draw.source][:, None],
                                         trainer.tumour_mask(target)[draw.rows],
                                         torch.as_tensor(draw.target)).whole
        differences = []
        for v, (i, t) in enumerate(zip(draw.rows, draw.target, strict=True)):
            if data[i, t].abs().sum() == 0:  # the source's own slice lacks the target: no reference
                excluded += 1
                continue
            differences.append(float((generated[v, 0] - data[i, t]).abs().mean()))
        assert float(losses["paired"].detach()) == pytest.approx(np.mean(differences), rel=1e-5)
        expected = losses["adv_global"] + losses["adv_local"] + losses["cls_global"] + losses["cls_local"] + \
            10.0 * (losses["rec"] + losses["local"]) + 2.0 * losses["paired"]
        assert float(losses["total"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert excluded > 0
    trainer.network.train()
    np.random.seed(0)
    assert "loss_paired" in trainer.train_step(_batch(1))
    critic_batch = trainer.unpaired_batch(*trainer._to_device(_batch(1)))  # the critic steps skip the reference
    assert critic_batch.same_slice_target is None and critic_batch.has_same_slice_target is None
    monkeypatch.delenv(OVERRIDE_ENV)
    default = _trainer(UTADNetTeacherTrainer, tmp_path / "default", monkeypatch)
    assert "paired" not in default.generator_terms and "paired" not in default.term_weights()
    np.random.seed(0)
    assert "paired" not in default.generator_losses(*default._to_device(_batch(1)))
    for bad in (-1, float("nan"), True):
        with pytest.raises(ValueError, match="utad.lambda_paired must be a number >= 0"):
            _override(tmp_path, monkeypatch, {"utad": {"lambda_paired": bad}})
            make_tiny_trainer(UTADNetTeacherTrainer, tmp_path / f"bad{bad}", monkeypatch, **TINY)


def test_paired_term_by_hand_and_without_any_reference():
    generated = torch.zeros(3, 1, 4, 4, requires_grad=True)
    reference = torch.stack((torch.full((1, 4, 4), 2.0), torch.full((1, 4, 4), 9.0), torch.full((1, 4, 4), -1.0)))
    available = torch.tensor([True, False, True])
    assert float(paired_translation_loss(generated, reference, available)) == pytest.approx((2.0 + 1.0) / 2)
    none = paired_translation_loss(generated, reference, torch.zeros(3, dtype=torch.bool))
    assert float(none) == 0.0 and none.requires_grad  # kept in the graph: backward and the step still work
    none.backward()
    assert torch.equal(generated.grad, torch.zeros_like(generated))


def test_student_adds_the_paired_term_beside_the_distillation(tmp_path, monkeypatch):
    _override(tmp_path, monkeypatch, {"utad": {"lambda_paired": 0.5}})
    _teacher_checkpoint(tmp_path, monkeypatch)
    student = _trainer(UTADNetStudentTrainer, tmp_path, monkeypatch)
    assert {"paired", "dis_feature", "dis_image"} <= set(student.generator_terms)
    weights = student.term_weights()
    assert weights["paired"] == 0.5 and weights["dis_feature"] == weights["dis_image"] == 10.0
    np.random.seed(0)
    losses = student.generator_losses(*student._to_device(_batch(4)))
    expected = sum(weight * losses[name] for name, weight in weights.items())
    assert float(losses["paired"].detach()) > 0
    assert float(losses["total"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_conditional_critic_judges_reals_as_their_modality_and_fakes_as_the_requested_one(tmp_path, monkeypatch):
    _override(tmp_path, monkeypatch, {"utad": {"discriminator": {"conditional": True}}})
    trainer = _trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch)
    assert trainer.discriminator.global_critic.modality_embedding is not None
    data, target = trainer._to_device(_batch(3))
    calls = []
    discriminator = trainer.discriminator

    def spy(images, branch, modality=None):
        calls.append((branch, images.detach().clone(), None if modality is None else modality.clone()))
        return discriminator(images, branch, modality)
    monkeypatch.setattr(trainer, "discriminator", spy)
    np.random.seed(0)
    batch = trainer.unpaired_batch(data, target)
    np.random.seed(0)
    trainer.discriminator_losses(data, target)
    np.random.seed(0)
    trainer.generator_losses(data, target)
    critic_global, penalty_global = calls[0], calls[1]
    assert critic_global[0] == penalty_global[0] == "global"
    rows = batch.real.shape[0]
    # the critic's input: the real target slices (of modality t), then the fakes (asked for t)
    torch.testing.assert_close(critic_global[1][:rows], batch.real)
    assert torch.equal(critic_global[2], torch.cat((batch.target_modality, batch.target_modality)))
    assert torch.equal(penalty_global[2], batch.target_modality)  # interpolates: the modality of their real end
    generator_global = [c for c in calls[2:] if c[0] == "global" and c[1].shape[0] == rows and c[2] is not None]
    assert generator_global and torch.equal(generator_global[-1][2], batch.target_modality)
    # the scores now depend on the modality: the same images judged as another modality score differently
    image = batch.real[:1]
    scores = [trainer.discriminator_module(image, "global", torch.tensor([m]))[0] for m in range(4)]
    assert not torch.allclose(scores[0], scores[1])
    with pytest.raises(ValueError, match="needs the modality"):
        trainer.discriminator_module(image, "global")
    with pytest.raises(ValueError, match="utad.discriminator.conditional must be true or false"):
        _override(tmp_path, monkeypatch, {"utad": {"discriminator": {"conditional": 1}}})
        make_tiny_trainer(UTADNetTeacherTrainer, tmp_path / "bad", monkeypatch, **TINY)


def test_classifier_blur_reaches_both_critics_and_bad_values_are_refused(tmp_path, monkeypatch):
    trainer = _trainer(UTADNetTeacherTrainer, tmp_path / "default", monkeypatch)
    assert trainer.discriminator_module.global_critic.classifier_blur_sigma == 0.0  # the paper's classifier
    _override(tmp_path, monkeypatch, {"utad": {"discriminator": {"classifier_blur_sigma": 1.5}}})
    trainer = _trainer(UTADNetTeacherTrainer, tmp_path / "blur", monkeypatch)
    assert trainer.discriminator_module.global_critic.classifier_blur_sigma == 1.5
    assert trainer.discriminator_module.local_critic.classifier_blur_sigma == 1.5
    for bad in (-0.5, "2", None):
        with pytest.raises(ValueError, match="utad.discriminator.classifier_blur_sigma must be a number >= 0"):
            _override(tmp_path, monkeypatch, {"utad": {"discriminator": {"classifier_blur_sigma": bad}}})
            make_tiny_trainer(UTADNetTeacherTrainer, tmp_path / f"bad{bad}", monkeypatch, **TINY)


def test_source_skip_setting_reaches_teacher_and_student_and_bad_values_are_refused(tmp_path, monkeypatch):
    assert not bool(_trainer(UTADNetTeacherTrainer, tmp_path / "default", monkeypatch).generator_module.source_skip)
    _override(tmp_path, monkeypatch, {"utad": {"generator": {"source_skip": True}}})
    path = _teacher_checkpoint(tmp_path, monkeypatch)  # a teacher trained with the skip
    assert torch.load(path, map_location="cpu", weights_only=False)["network_weights"]["source_skip"].item()
    monkeypatch.delenv(OVERRIDE_ENV)
    student = _trainer(UTADNetStudentTrainer, tmp_path, monkeypatch)  # shipped setting: no skip
    assert bool(student.teacher.source_skip)  # the frozen teacher as it was trained
    assert not bool(student.generator_module.source_skip)  # the student's own setting, not the teacher's weights'
    assert "the teacher was trained with utad.generator.source_skip=true" in Path(student.log_file).read_text()
    # weights trained with the skip are not resumed or validated under a config without it
    teacher = _trainer(UTADNetTeacherTrainer, tmp_path / "resume", monkeypatch)
    with pytest.raises(ValueError, match="trained with utad.generator.source_skip=true, the config now says false"):
        teacher.load_checkpoint(str(path))
    for bad in ({"source_skip": 1}, {"source_skip": "yes"}, {"source_skip": None}):
        with pytest.raises(ValueError, match="utad.generator must be"):
            _override(tmp_path, monkeypatch, {"utad": {"generator": bad}})
            make_tiny_trainer(UTADNetTeacherTrainer, tmp_path / "bad", monkeypatch, **TINY)
    with pytest.raises(KeyError, match="unknown config key 'utad.generator.other'"):
        _override(tmp_path, monkeypatch, {"utad": {"generator": {"other": 1}}})
        make_tiny_trainer(UTADNetTeacherTrainer, tmp_path / "bad", monkeypatch, **TINY)


def test_student_step_adds_distillation_and_never_gives_the_network_a_mask(tmp_path, monkeypatch):
    _teacher_checkpoint(tmp_path, monkeypatch)
    student = _trainer(UTADNetStudentTrainer, tmp_path, monkeypatch)
    assert isinstance(student.network, UTADStudentGenerator)
    assert list(inspect.signature(student.network.forward).parameters) == ["image", "target_modality"]
    calls = []
    original = UTADStudentGenerator.generate

    def generate(self, image, local_input, target_modality):
        calls.append(torch.equal(image, local_input))  # the local branch reads the whole image
        return original(self, image, local_input, target_modality)
    monkeypatch.setattr(UTADStudentGenerator, "generate", generate)
    teacher_before = [p.detach().clone() for p in student.teacher.parameters()]
    np.random.seed(0)
    outputs = student.train_step(_batch(2))
    assert calls and all(calls)
    assert outputs.keys() == {"loss"} | {f"loss_{t}" for t in TEACHER_TERMS | CRITIC_TERMS | {"dis_feature",
                                                                                              "dis_image"}}
    expected = sum(outputs[f"loss_{t}"] for t in ("adv_global", "adv_local", "cls_global", "cls_local")) + \
        10.0 * (outputs["loss_rec"] + outputs["loss_local"]) + \
        10.0 * (outputs["loss_dis_feature"] + outputs["loss_dis_image"])  # eq. 13, lambda2 = 10
    assert float(outputs["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert outputs["loss_dis_feature"] > 0 and outputs["loss_dis_image"] > 0
    for a, b in zip(teacher_before, student.teacher.parameters(), strict=True):
        assert torch.equal(a, b) and not b.requires_grad  # frozen


def test_student_starts_from_the_teacher_with_a_fresh_local_encoder(tmp_path, monkeypatch):
    path = _teacher_checkpoint(tmp_path, monkeypatch)
    teacher_weights = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
    student = _trainer(UTADNetStudentTrainer, tmp_path, monkeypatch)
    # re-initialised: the local encoder's convolutions (also reachable as local_decoder.encoder), not its norms
    fresh_tensors = {p.data_ptr() for m in student.network.local_encoder.modules() if isinstance(m, torch.nn.Conv2d)
                     for p in m.parameters()}
    assert fresh_tensors
    for name, value in student.network.state_dict().items():
        fresh = value.data_ptr() in fresh_tensors
        assert torch.equal(value, teacher_weights[name]) != fresh, name


def test_batch_without_any_pair_gives_zero_losses(tmp_path, monkeypatch):
    trainer = _trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch)
    lonely = _batch(4, missing={0: [1, 2, 3], 1: [1, 2, 3], 2: [1, 2, 3]})  # every sample has only T1
    outputs = trainer.train_step(lonely)
    assert all(float(v) == 0.0 for v in outputs.values())


def test_tumour_free_slices_stay_out_of_the_local_critic_and_local_terms(tmp_path, monkeypatch):
    """Blank tumour images (empty masks) never reach D_l; the global terms and L_rec still use every slice."""
    trainer = _trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch)
    no_tumour = _batch(5)
    no_tumour["target"][:] = 0
    np.random.seed(0)
    critic = trainer.discriminator_losses(no_tumour["data"], no_tumour["target"])
    generator = trainer.generator_losses(no_tumour["data"], no_tumour["target"])
    for name in ("d_adv_local", "d_gp_local", "d_cls_local"):
        assert float(critic[name].detach()) == 0.0, name
    for name in ("adv_local", "cls_local"):
        assert float(generator[name].detach()) == 0.0, name
    assert float(critic["d_gp_global"]) > 0 and float(critic["d_cls_global"]) > 0 and float(generator["rec"]) > 0

    # one slice with a tumour: the local classification term is the cross-entropy of that sample alone
    one = _batch(5)
    one["target"][1:] = 0
    seen = []
    discriminator = trainer.discriminator

    def spy(images, branch, modality=None):
        if branch == "local":
            seen.append(images.shape[0])
        return discriminator(images, branch, modality)
    monkeypatch.setattr(trainer, "discriminator", spy)
    np.random.seed(0)  # the same draw of sources, targets and partners in all three calls
    batch = trainer.unpaired_batch(one["data"], one["target"])
    np.random.seed(0)
    trainer.discriminator_losses(one["data"], one["target"])
    np.random.seed(0)
    trainer.generator_losses(one["data"], one["target"])
    real_rows, fake_rows = int(batch.real_has_tumour.sum()), int(batch.source_has_tumour.sum())
    # critic: reals + fakes with a tumour, then the penalty's interpolates; generator: fakes with a tumour
    expected_critic = [real_rows + fake_rows, min(real_rows, fake_rows)] if real_rows and fake_rows else []
    assert seen == expected_critic + ([fake_rows] if fake_rows else [])


def test_batch_size_one_is_refused(tmp_path, monkeypatch):
    trainer = make_tiny_trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch, **{**TINY, "batch_size": 1})
    with pytest.raises(ValueError, match="batch size must be at least 2"):
        trainer.initialize()


def test_intensity_augmentation_is_off_unless_asked_for(tmp_path, monkeypatch):
    def kinds(trainer):
        transforms = trainer.get_training_transforms(np.array([32, 32]), 0.0, None, (0, 1), False,
                                                     regions=trainer.label_manager.foreground_regions)
        return {type(getattr(t, "transform", t)) for t in transforms.transforms}
    off = kinds(make_tiny_trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch, **TINY))
    _override(tmp_path, monkeypatch, {"utad": {"intensity_augmentation": True}})
    on = kinds(make_tiny_trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch, **TINY))
    assert not off & set(INTENSITY_TRANSFORMS) and set(INTENSITY_TRANSFORMS) <= on
    assert {k.__name__ for k in off} >= {"SpatialTransform", "MirrorTransform", "RecordAvailabilityTransform",
                                         "ZeroMissingModalitiesTransform"}


# ---------------------------------------------------------------------------------------------- the teacher checks
def test_student_refuses_a_missing_teacher_folder_or_checkpoint(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"UTADNetTeacherTrainer__nnUNetPlans__3d_tiny .*does not exist.*"
                                                r"nnUNetv2_train Dataset999_Tiny 3d_tiny 0 -tr UTADNetTeacherTrainer"):
        _trainer(UTADNetStudentTrainer, tmp_path, monkeypatch)
    path = _teacher_checkpoint(tmp_path, monkeypatch)
    path.rename(path.with_name("checkpoint_best.pth"))
    with pytest.raises(FileNotFoundError, match=r"fold_0/checkpoint_final\.pth does not exist"):
        _trainer(UTADNetStudentTrainer, tmp_path, monkeypatch)
    _override(tmp_path, monkeypatch, {"utad": {"teacher_checkpoint": "checkpoint_best.pth"}})
    _trainer(UTADNetStudentTrainer, tmp_path, monkeypatch)  # the config key names the checkpoint
    elsewhere = tmp_path / "moved_teacher"
    shutil.move(path.parent.parent, elsewhere)
    monkeypatch.setenv("MY_TEACHERS", str(tmp_path))
    _override(tmp_path, monkeypatch, {"utad": {"teacher_checkpoint": "checkpoint_best.pth",
                                               "teacher_model_folder": "$MY_TEACHERS/moved_teacher"}})
    assert _trainer(UTADNetStudentTrainer, tmp_path, monkeypatch).teacher is not None


def _damage(path: Path, change) -> None:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    change(checkpoint)
    torch.save(checkpoint, path)


def test_student_refuses_a_teacher_of_other_channels_plans_trainer_or_region(tmp_path, monkeypatch):
    path = _teacher_checkpoint(tmp_path, monkeypatch, features_per_stage=(8, 16, 32))
    with pytest.raises(ValueError, match=r"network differs .* in \['features_per_stage'\]"):
        _trainer(UTADNetStudentTrainer, tmp_path, monkeypatch)  # student plans (4, 8, 16)

    path = _teacher_checkpoint(tmp_path, monkeypatch)
    original = path.read_bytes()
    _damage(path, lambda c: c["init_args"]["dataset_json"]["channel_names"].update({"3": "PD"}))
    with pytest.raises(ValueError, match=r"trained on channels .*'PD'"):
        _trainer(UTADNetStudentTrainer, tmp_path, monkeypatch)

    path.write_bytes(original)
    _damage(path, lambda c: c.update(trainer_name="UTADNetStudentTrainer"))
    with pytest.raises(ValueError, match="was written by UTADNetStudentTrainer, not by UTADNetTeacherTrainer"):
        _trainer(UTADNetStudentTrainer, tmp_path, monkeypatch)

    path.write_bytes(original)
    (path.parent / "trainer_config.json").write_text(json.dumps({"utad": {"mask_region": "ET"}}))
    with pytest.raises(ValueError, match="trained with utad.mask_region ET, this student's config says WT"):
        _trainer(UTADNetStudentTrainer, tmp_path, monkeypatch)

    (path.parent / "trainer_config.json").unlink()
    path.write_bytes(original[:1000])
    with pytest.raises(ValueError, match="cannot read the teacher checkpoint"):
        _trainer(UTADNetStudentTrainer, tmp_path, monkeypatch)


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("trainer_class", [UTADNetTeacherTrainer, UTADNetStudentTrainer])
def test_resume_restores_discriminators_and_optimisers(trainer_class, tmp_path, monkeypatch):
    if trainer_class is UTADNetStudentTrainer:
        _teacher_checkpoint(tmp_path, monkeypatch)
    uninterrupted = _trainer(trainer_class, tmp_path, monkeypatch)
    run_epochs(uninterrupted, 1, _batch, seed_each_step=True)
    checkpoint = str(tmp_path / "killed.pth")
    shutil.copyfile(uninterrupted.output_folder + "/checkpoint_latest.pth", checkpoint)
    run_epochs(uninterrupted, 2, _batch, seed_each_step=True)

    resumed = _trainer(trainer_class, tmp_path, monkeypatch)
    resumed.load_checkpoint(checkpoint)
    assert resumed.current_epoch == 1
    run_epochs(resumed, 2, _batch, seed_each_step=True)

    assert_same_modules(uninterrupted, resumed, ("network", "discriminator"), rtol=1e-5, atol=1e-6)
    assert_same_optimizer_state(uninterrupted, resumed, ("optimizer", "optimizer_d"), "exp_avg_sq", rtol=1e-5,
                                atol=1e-9)
    logs_a = uninterrupted.logger.local_logger.my_fantastic_logging
    logs_b = resumed.logger.local_logger.my_fantastic_logging
    for term in trainer_class.generator_terms + trainer_class.discriminator_terms:
        np.testing.assert_allclose(logs_b[f"loss_{term}"], logs_a[f"loss_{term}"], rtol=1e-5, err_msg=term)
    np.testing.assert_allclose(logs_b["mean_fg_dice"], logs_b["val_ssim"])  # nnU-Net's best checkpoint: SSIM
    assert (Path(resumed.output_folder) / "progress_adversarial.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------- validation
def test_validation_scores_a_perfect_generator_as_perfect(tmp_path, monkeypatch):
    trainer = _trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch)
    batch = _batch(5, missing={1: [0, 1, 2]})  # sample 1 has only FLAIR: no pair, NaN
    base = batch["data"][:, 3:4].clone()
    batch["data"] = torch.where(batch["data"] != 0, base.expand(-1, 4, -1, -1), batch["data"])
    monkeypatch.setattr(trainer, "generate", lambda image, mask, modality: type("Out", (), {"whole": image})())
    with torch.no_grad():
        metrics = trainer.validation_step(batch)  # every channel is the same image: identity is exact
    assert np.isnan(metrics["ssim"][1]) and np.isnan(metrics["l1"][1])
    np.testing.assert_allclose(metrics["ssim"][[0, 2]], 1.0)
    np.testing.assert_allclose(metrics["l1"][[0, 2]], 0.0)
    assert np.all(np.isinf(metrics["psnr"][[0, 2]]))


def test_validation_l1_against_a_naive_computation(tmp_path, monkeypatch):
    trainer = _trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch)
    batch = _batch(6)
    recorded = {}
    original = trainer.paired_translation

    def paired_translation(data, target, draw):
        recorded["draw"] = draw
        recorded["out"] = original(data, target, draw)
        return recorded["out"]
    monkeypatch.setattr(trainer, "paired_translation", paired_translation)
    trainer.network.eval()
    with torch.no_grad():
        metrics = trainer.validation_step(batch)
    draw, (source, generated, real) = recorded["draw"], recorded["out"]
    for k, (i, s, t) in enumerate(zip(draw.rows, draw.source, draw.target, strict=True)):
        assert torch.equal(source[k, 0], batch["data"][i, s]) and torch.equal(real[k, 0], batch["data"][i, t])
        naive = sum(abs(float(generated[k, 0, x, y]) - float(batch["data"][i, t, x, y]))
                    for x in range(32) for y in range(32)) / 32 ** 2
        assert metrics["l1"][i] == pytest.approx(naive, rel=1e-5)


def test_write_examples_draws_a_png_grid(tmp_path, monkeypatch):
    trainer = _trainer(UTADNetTeacherTrainer, tmp_path, monkeypatch)
    trainer.dataloader_val = iter([_batch(8)])
    trainer.network.eval()
    with torch.no_grad():
        trainer.write_examples(str(tmp_path / "a.png"))
        trainer.write_examples(str(tmp_path / "b.png"))  # the same fixed batch again (the loader is exhausted)
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "b.png").stat().st_size > 5000


def test_synthesis_matrices_against_hand_made_sums():
    totals = np.zeros((3, 3, 3))
    totals[:, 0, 1] = (1.8, 60.0, 2)  # two slices: mean SSIM 0.9, PSNR 30
    totals[:, 2, 0] = (0.5, 20.0, 1)
    result = synthesis_matrices(totals, {"0": "A", "1": "B", "2": "C"})
    assert result["ssim"] == [[None, pytest.approx(0.9), None], [None, None, None], [0.5, None, None]]
    assert result["psnr"][0][1] == pytest.approx(30.0) and result["psnr"][2][0] == 20.0
    assert result["num_slices"] == [[None, 2, 0], [0, None, 0], [1, 0, None]]
    assert result["channel_names"] == {"0": "A", "1": "B", "2": "C"}


def test_synthesis_matrices_brain_ssim_weighs_slices_by_their_brain_voxels():
    totals = np.zeros((3, 2, 2))
    totals[:, 0, 1] = (1.0, 40.0, 2)
    brain = np.zeros((2, 2, 2))
    brain[:, 0, 1] = (0.9 * 10 + 0.3 * 30, 40)  # a slice of 10 brain voxels at SSIM 0.9, one of 30 at 0.3
    result = synthesis_matrices(totals, {"0": "A", "1": "B"}, brain)
    assert result["ssim_brain"] == [[None, pytest.approx(0.45)], [None, None]]
    assert result["brain_voxels"] == [[None, 40], [0, None]] and result["ssim"][0][1] == 0.5


def test_brain_ssim_ignores_the_background_and_sees_an_inverted_contrast():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:40, :36]
    brain = (yy - 20) ** 2 / 16 ** 2 + (xx - 18) ** 2 / 14 ** 2 <= 1
    real = np.where(brain, rng.normal(1.0, 0.5, brain.shape) + 0.05 * yy, 0.0)
    other_background = real + np.where(brain, 0.0, rng.normal(0.0, 2.0, brain.shape))
    total, voxels = brain_ssim(other_background, real, brain)
    assert voxels == brain.sum() and total / voxels == pytest.approx(1.0)  # only the background differs
    assert slice_quality(other_background, real)[0] < 0.9  # the whole-slice SSIM counts the background
    affine = np.where(brain, 3.0 * real + 7.0, 0.0)  # the same contrast on another scale: percentile scaling
    assert brain_ssim(affine, real, brain)[0] / voxels == pytest.approx(1.0, abs=1e-6)
    inverted = np.where(brain, -real, 0.0)
    assert brain_ssim(inverted, real, brain)[0] / voxels < -0.3  # (the brain edge, 0 outside, agrees)
    assert brain_ssim(real, real, np.zeros_like(brain)) == (0.0, 0)
    assert brain_ssim(real[:8, :8], real[:8, :8], brain[:8, :8]) == (0.0, 0)  # smaller than the 11-pixel window


# ---------------------------------------------------------------------------------------------- through nnU-Net
def test_teacher_then_student_through_nnunet_train(trained_synthesis_model):
    work, student_folder = trained_synthesis_model
    teacher_folder = student_folder.parent / f"UTADNetTeacherTrainer__nnUNetPlans__{SYNTHESIS_CONFIGURATION}"
    dataset_json = json.loads((work / "nnUNet_preprocessed" / SYNTHESIS_NAME / "dataset.json").read_text())
    for folder, terms in ((teacher_folder, TEACHER_TERMS),
                          (student_folder, TEACHER_TERMS | {"dis_feature", "dis_image"})):
        fold = folder / "fold_0"
        result = json.loads((fold / SYNTHESIS_VALIDATION_FILE).read_text())
        assert result.keys() == {"channel_names", "ssim", "psnr", "num_slices", "ssim_brain", "brain_voxels",
                                 "histogram_ssim_brain", "histogram_quantiles"}
        for row in result["histogram_quantiles"]:  # the phantoms' training cases have every sequence
            assert len(row) == 1001 and np.all(np.diff(row) >= 0) and row[0] < 0 < row[-1]  # z-scores
        assert result["channel_names"] == dataset_json["channel_names"]
        size = len(dataset_json["channel_names"])
        for s in range(size):
            assert all(result[k][s][s] is None for k in ("ssim", "psnr", "num_slices", "ssim_brain", "brain_voxels"))
            for t in set(range(size)) - {s}:  # phantoms have every sequence: every pair has slices
                assert isinstance(result["num_slices"][s][t], int) and result["num_slices"][s][t] > 0
                assert -1 <= result["ssim"][s][t] <= 1 and math.isfinite(result["psnr"][s][t])
                # every voxel of nnU-Net's non-zero mask counts once per slice both sequences have
                assert result["brain_voxels"][s][t] > 10 * result["num_slices"][s][t]
                assert -1 <= result["ssim_brain"][s][t] <= 1 and -1 <= result["histogram_ssim_brain"][s][t] <= 1
        assert (fold / SYNTHESIS_HEATMAP_FILE).stat().st_size > 5000
        assert (fold / "examples" / "epoch_0000.png").stat().st_size > 5000
        assert (fold / "progress_adversarial.png").stat().st_size > 5000
        log = next(fold.glob("training_log_*.txt")).read_text()
        assert all(f"loss_{term} " in log for term in terms | CRITIC_TERMS), log[-3000:]
        assert json.loads((fold / "trainer_config.json").read_text())["trainer"] == folder.name.split("__")[0]
    _check_histogram_scores(work, student_folder)
    assert f"teacher loaded from {teacher_folder / 'fold_0' / 'checkpoint_final.pth'}" in \
        next((student_folder / "fold_0").glob("training_log_*.txt")).read_text()


def _check_histogram_scores(work: Path, model_folder: Path) -> None:
    """The file's histogram_ssim_brain, recomputed from the fold's validation cases: the TARGET's stored histogram,
    the slices both sequences have, summed over cases (wiring; the score itself is tested by hand below)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    result = json.loads((model_folder / "fold_0" / SYNTHESIS_VALIDATION_FILE).read_text())
    preprocessed = work / "nnUNet_preprocessed" / SYNTHESIS_NAME
    val_keys = json.loads((preprocessed / "splits_final.json").read_text())[0]["val"]
    identifier = PlansManager(str(model_folder / "plans.json")).get_configuration(
        SYNTHESIS_CONFIGURATION).data_identifier
    folder = str(preprocessed / identifier)
    dataset = infer_dataset_class(folder)(folder, val_keys)
    totals = np.zeros((2, 4, 4))
    for key in val_keys:
        data, seg, _, _ = dataset.load_case(key)
        data, brain = np.asarray(data[:4], dtype=np.float32), np.asarray(seg[0]) >= 0
        acquired = data.reshape(4, data.shape[1], -1).any(-1)
        for s in range(4):
            for t in set(range(4)) - {s}:
                slices = np.flatnonzero(acquired[s] & acquired[t])
                totals[:, s, t] += histogram_matching_ssim(data[s, slices], data[t, slices], brain[slices],
                                                           np.asarray(result["histogram_quantiles"][t]))
    for s in range(4):
        for t in set(range(4)) - {s}:
            assert result["histogram_ssim_brain"][s][t] == pytest.approx(totals[0, s, t] / totals[1, s, t], abs=1e-4)


def test_histogram_matching_ssim_by_hand():
    """Histogram matching onto the histogram of an increasing affine copy of the sources gives that copy: SSIM 1
    against it; against an inverted copy the same matched images score below 0. Voxels: every brain voxel."""
    rng = np.random.default_rng(5)
    y, x = np.mgrid[:24, :24]
    brains = np.stack([(y - 12) ** 2 + (x - 11) ** 2 < 90 + 10 * k for k in range(3)])
    sources = np.stack([np.sin(x / (3.0 + k)) + np.cos(y / 4.0) + 0.2 * rng.normal(size=(24, 24)) for k in range(3)])
    copy = np.where(brains, 2.0 * sources + 1.0, 0.0)
    quantiles = np.quantile(copy[brains], np.linspace(0, 1, 1001))
    total, voxels = histogram_matching_ssim(sources, copy, brains, quantiles)
    assert voxels == brains.sum() and total / voxels > 0.99
    inverted = np.where(brains, -sources, 0.0)
    total, voxels = histogram_matching_ssim(sources, inverted, brains, np.quantile(inverted[brains],
                                                                                    np.linspace(0, 1, 1001)))
    assert total / voxels < -0.1


def test_student_checkpoint_loads_strictly_into_the_inference_network(trained_synthesis_model):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    _, student_folder = trained_synthesis_model
    plans_manager = PlansManager(str(student_folder / "plans.json"))
    configuration = plans_manager.get_configuration(SYNTHESIS_CONFIGURATION)
    network = UTADNetStudentTrainer.build_network_architecture(plans_manager, configuration, 4, 3,
                                                               enable_deep_supervision=False)
    checkpoint = torch.load(student_folder / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)
    network.load_state_dict(checkpoint["network_weights"], strict=True)
    assert not any(k.startswith(("teacher", "discriminator")) for k in checkpoint["network_weights"])
    assert network.num_modalities == 4 and network.total_stride == (4, 4)
    network.eval()
    with torch.no_grad():
        out = network.translate(torch.randn(2, 1, 48, 40), torch.tensor([0, 3]))
    assert out.shape == (2, 1, 48, 40) and torch.isfinite(out).all()


def test_histogram_reference_pools_the_brain_voxels_of_the_acquired_slices():
    """Quantiles of each sequence over the cases' brain voxels (seg >= 0), slices that are all zero left out."""
    from types import SimpleNamespace

    rng = np.random.default_rng(3)
    cases = {}
    for key in ("a", "b"):
        data = rng.normal(size=(4, 3, 6, 5)).astype(np.float32)
        seg = np.zeros((1, 3, 6, 5), dtype=np.int8)
        seg[0, :, 0, :] = -1  # outside nnU-Net's non-zero mask
        cases[key] = (data, seg)
    cases["a"][0][1, 2] = 0  # case a lacks T1ce on its last slice (zero-filled)
    cases["b"][0][3] = 0  # case b lacks FLAIR
    dataset = SimpleNamespace(load_case=lambda key: (*cases[key], None, None))
    trainer = SimpleNamespace(num_modalities=4)
    quantiles = UTADNetTeacherTrainer.histogram_reference(trainer, dataset, ["a", "b"])
    assert quantiles.shape == (4, 1001)
    for modality in range(4):
        values = []
        for data, seg in cases.values():
            for z in range(3):
                if data[modality, z].any():
                    values += [data[modality, z, x, y] for x in range(6) for y in range(5) if seg[0, z, x, y] >= 0]
        expected = np.quantile(np.array(values), np.linspace(0, 1, 1001))
        np.testing.assert_allclose(quantiles[modality], expected, rtol=1e-6)
    empty = {"a": (np.zeros((4, 2, 3, 3), np.float32), np.zeros((1, 2, 3, 3), np.int8))}
    none = UTADNetTeacherTrainer.histogram_reference(
        trainer, SimpleNamespace(load_case=lambda key: (*empty[key], None, None)), ["a"])
    assert np.isnan(none).all()  # no acquired voxel of any sequence: no reference
    big = {"c": (rng.normal(size=(4, 30, 30, 30)).astype(np.float32), np.zeros((1, 30, 30, 30), np.int8))}
    sampled = UTADNetTeacherTrainer.histogram_reference(
        trainer, SimpleNamespace(load_case=lambda key: (*big[key], None, None)), ["c"])  # 27,000 voxels: sampled
    full = np.quantile(big["c"][0].reshape(4, -1), np.linspace(0, 1, 1001), axis=1).T
    np.testing.assert_allclose(sampled[:, 100:901], full[:, 100:901], atol=0.05)  # (the tails are sparser)
    assert not np.array_equal(sampled, full)
