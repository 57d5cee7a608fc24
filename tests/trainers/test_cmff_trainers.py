"""CMFTPretrainer and CMFFTrainer: nnU-Net runs (train, predict, evaluate-missing), the losses of eq. 2-7 against
hand-written references, the transfer of the generators into the branches, resume, and the variants."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from skimage.metrics import structural_similarity

from nnunet_missingmod.config import OVERRIDE_ENV, config_dir, load_trainer_config
from nnunet_missingmod.networks.cmff import CMFFNet, MaskGuidedAttention
from nnunet_missingmod.trainers import base as base_module
from nnunet_missingmod.trainers.cmff import (
    VARIANTS,
    CMFFTrainer,
    CMFFTrainer_noMaskGuidance,
    CMFFTrainer_random,
    CMFTPretrainer,
    translation_ssim,
)
from tests.conftest import E2E_DATASET, E2E_NAME, make_tiny_trainer, nnunet_script, run_checked
from tests.trainers.resume_checks import (
    assert_same_logs,
    assert_same_modules,
    assert_same_optimizer_state,
    logs_without_timestamps,
    run_epochs,
)

SHORT_RUN = {"nnunet": {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1},
             "inference": {"test_time_mirroring": False}}
CMFT_TERMS = ("adv_ab", "adv_ba", "cycle", "disc_a", "disc_b")
CMFF_TERMS = ("seg_a", "seg_b", "seg_fused")


def _override(tmp_path: Path, monkeypatch, settings: dict, name: str = "override.json") -> None:
    path = tmp_path / name
    path.write_text(json.dumps(settings))
    monkeypatch.setenv(OVERRIDE_ENV, str(path))


def _folder(work: Path, trainer: str) -> Path:
    return work / "nnUNet_results" / E2E_NAME / f"{trainer}__nnUNetPlans__3d_cpu" / "fold_0"


# ------------------------------------------------------------------------------------------------ nnU-Net runs
@pytest.fixture(scope="module")
def two_phase_run(trained_model, tmp_path_factory):
    """nnUNetv2_train -tr CMFTPretrainer, then -tr CMFFTrainer (1 epoch x 2 iterations each) on the e2e dataset."""
    work, _, _ = trained_model
    env = json.loads((work / "env.json").read_text())
    overrides = tmp_path_factory.mktemp("cmff_overrides")
    logs = {}
    # one override file per trainer: the file is strict, and only CMFFTrainer has a "cmff" section
    for trainer, extra in (("CMFTPretrainer", {}), ("CMFFTrainer", {"cmff": {"pretrained_checkpoint": "auto"}})):
        override = overrides / f"{trainer}.json"
        override.write_text(json.dumps({**SHORT_RUN, **extra}))
        logs[trainer] = run_checked([nnunet_script("nnUNetv2_train"), str(E2E_DATASET), "3d_cpu", "0", "-tr", trainer,
                                     "-device", "cpu"], {**env, OVERRIDE_ENV: str(override)})
    return work, env


def test_cmft_pretrainer_through_nnunet_train(two_phase_run):
    work, _ = two_phase_run
    fold = _folder(work, "CMFTPretrainer")
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert all(f"loss_{term} " in log for term in CMFT_TERMS)
    assert "validation: ssim" in log and "final validation (translations of 1 of 1 validation cases)" in log
    assert (fold / "progress_adversarial.png").stat().st_size > 10_000
    assert (fold / "examples" / "epoch_0000.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((fold / "validation_translation" / "summary.json").read_text())
    assert summary["pairs"] == {"a": ["t1", "t1ce"], "b": ["t2", "flair"]}
    assert all(np.isfinite(v) for v in summary["mean"].values()) and 0 < summary["mean"]["l1_ab"]
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert {k.split(".")[0] for k in checkpoint["network_weights"]} == {"a_to_b", "b_to_a"}
    state = checkpoint["missingmod_state"]
    assert {k.split(".")[0] for k in state["discriminator_weights"]} == {"discriminator_a", "discriminator_b"}
    assert state["cmft_pairs"] == {"a": ["t1", "t1ce"], "b": ["t2", "flair"]}
    assert all(len(checkpoint["logging"][f"loss_{term}"]) == 1 for term in CMFT_TERMS)


def test_cmff_trainer_from_the_pretraining_then_predict_and_evaluate(two_phase_run, tmp_path):
    work, env = two_phase_run
    fold = _folder(work, "CMFFTrainer")
    log = next(fold.glob("training_log_*.txt")).read_text()
    cmft_checkpoint = _folder(work, "CMFTPretrainer") / "checkpoint_final.pth"
    assert f"S_A initialised from G_A->B and S_B from G_B->A of {cmft_checkpoint}" in log  # "auto" found it
    assert all(f"loss_{term} " in log for term in CMFF_TERMS)
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert {k.split(".")[0] for k in checkpoint["network_weights"]} == {"branch_a", "branch_b", "fusion"}
    assert "missingmod_state" not in checkpoint  # no discriminator anywhere
    assert (fold / "validation" / "summary.json").is_file()  # nnU-Net's own final validation ran on S_F
    predictions = tmp_path / "predictions"
    run_checked([nnunet_script("nnUNetv2_predict"), "-i", str(work / "nnUNet_raw" / E2E_NAME / "imagesTs"),
                 "-o", str(predictions), "-d", str(E2E_DATASET), "-c", "3d_cpu", "-f", "0", "-tr", "CMFFTrainer",
                 "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    assert sorted(p.name for p in predictions.glob("*.nii.gz")) == ["Phantom_0005.nii.gz", "Phantom_0006.nii.gz"]
    evaluation = tmp_path / "missing"
    run_checked([nnunet_script("nnunet_missingmod"), "evaluate-missing", "-d", str(E2E_DATASET), "-c", "3d_cpu",
                 "-tr", "CMFFTrainer", "-f", "0", "--combinations", "t1+t1ce,t2+flair,t1+t1ce+t2+flair", "-o",
                 str(evaluation), "-device", "cpu", "--disable_tta"], env)
    summary = json.loads((evaluation / "summary.json").read_text())
    text = json.dumps(summary)
    assert "t1+t1ce" in text and "t2+flair" in text
    assert (evaluation / "table.md").is_file() and (evaluation / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------ CMFT in-process
def _batch(seed: int, incomplete: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(2, 4, 16, 16, 16, generator=generator)
    if incomplete:
        data[1, 2] = 0  # sample 1 lacks T2
    target = (torch.rand(2, 3, 16, 16, 16, generator=generator) > 0.7).float()
    return {"data": data, "target": target}


def _cmft(tmp_path, monkeypatch, iterations: int = 1) -> CMFTPretrainer:
    trainer = make_tiny_trainer(CMFTPretrainer, tmp_path, monkeypatch)
    trainer.num_iterations_per_epoch = iterations
    trainer.save_every = 1
    torch.manual_seed(0)
    trainer.initialize()
    trainer.logger.plot_progress_png = lambda folder: None  # speed only
    counter = iter(range(10**6))
    trainer.dataloader_train = (_batch(10_000 + next(counter)) for _ in iter(int, 1))
    return trainer


@pytest.mark.parametrize("incomplete", [False, True])
def test_cmft_losses_are_equations_2_to_6(tmp_path, monkeypatch, incomplete):
    _override(tmp_path, monkeypatch, {"cmft": {"lambda_cycle": 3.0}})
    trainer = _cmft(tmp_path, monkeypatch)
    batch = _batch(1, incomplete)
    data = batch["data"]
    counted = [0] if incomplete else [0, 1]  # a sample lacking a modality of the pairs takes no part
    with torch.no_grad():
        generators, discriminators = trainer.network, trainer.discriminator
        real_a, real_b = data[:, [0, 1]], data[:, [2, 3]]
        fake_b, fake_a = generators.a_to_b(real_a), generators.b_to_a(real_b)
        d_a, d_b = discriminators.discriminator_a, discriminators.discriminator_b

        def mean(values):
            return float(np.mean([values[i].mean().item() for i in counted]))
        expected_d = {"disc_a": mean((d_a(real_a) - 1) ** 2) + mean(d_a(fake_a) ** 2),  # eq. 3, D side
                      "disc_b": mean((d_b(real_b) - 1) ** 2) + mean(d_b(fake_b) ** 2)}  # eq. 2, D side
        expected_g = {"adv_ab": mean((d_b(fake_b) - 1) ** 2), "adv_ba": mean((d_a(fake_a) - 1) ** 2),
                      "cycle": mean((generators.b_to_a(fake_b) - real_a).abs()) +
                      mean((generators.a_to_b(fake_a) - real_b).abs())}  # eq. 4
        got_d = trainer.discriminator_losses(data, batch["target"])
        got_g = trainer.generator_losses(data, batch["target"])
    for name, value in {**expected_d, **expected_g}.items():
        assert float({**got_d, **got_g}[name]) == pytest.approx(value, rel=1e-5), name
    assert float(got_d["total"]) == pytest.approx(expected_d["disc_a"] + expected_d["disc_b"], rel=1e-5)
    assert float(got_g["total"]) == pytest.approx(  # eq. 6 with lambda from the config
        expected_g["adv_ab"] + expected_g["adv_ba"] + 3.0 * expected_g["cycle"], rel=1e-5)


def test_cmft_validation_reports_translation_l1_and_ssim(tmp_path, monkeypatch):
    trainer = _cmft(tmp_path, monkeypatch)
    batch = _batch(2, incomplete=True)
    batch["data"][0, :, :4] = 0  # background: no channel has signal there
    trainer.on_validation_epoch_start()
    with torch.no_grad():
        metrics = trainer.validation_step(batch)
        fake_b = trainer.network.a_to_b(batch["data"][:, :2]).numpy()
    real_b = batch["data"][:, 2:].numpy()
    errors = [abs(float(fake_b[0, c, x, y, z]) - float(real_b[0, c, x, y, z]))  # naive loop over the brain
              for c in range(2) for x in range(4, 16) for y in range(16) for z in range(16)]
    assert metrics["l1_ab"][0] == pytest.approx(sum(errors) / len(errors), rel=1e-5)
    assert metrics["l1_ab"][0] != pytest.approx(np.abs(fake_b[0] - real_b[0]).mean(), rel=1e-3)
    expected_ssim = np.mean([structural_similarity(fake_b[0, c].astype(float), real_b[0, c].astype(float),
                                                   data_range=float(real_b[0, c].max() - real_b[0, c].min()))
                             for c in range(2)])
    assert metrics["ssim_ab"][0] == pytest.approx(expected_ssim, rel=1e-5)
    assert all(np.isnan(metrics[name][1]) for name in trainer.validation_metric_names)  # incomplete sample
    np.testing.assert_allclose(metrics["ssim"], (metrics["ssim_ab"] + metrics["ssim_ba"]) / 2)


@pytest.mark.parametrize("shape", [(16, 16, 16), (5, 9, 12), (24, 3, 10)])
def test_translation_ssim_is_scikit_images(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    reference = torch.randn(*shape, generator=generator) * 2 + 1
    prediction = 0.7 * reference + 0.5 * torch.randn(*shape, generator=generator)
    window = min(7, *shape) - (1 - min(7, *shape) % 2)
    expected = structural_similarity(prediction.double().numpy(), reference.double().numpy(), win_size=window,
                                     data_range=float(reference.max() - reference.min()))
    assert translation_ssim(prediction, reference) == pytest.approx(expected, rel=1e-6)
    assert translation_ssim(reference, reference) == pytest.approx(1.0)
    assert np.isnan(translation_ssim(prediction, torch.ones(*shape)))  # constant reference: undefined
    assert np.isnan(translation_ssim(torch.zeros(8, 2, 8), torch.randn(8, 2, 8)))  # thinner than 3 voxels


def test_cmft_resume_restores_discriminators_and_optimisers(tmp_path, monkeypatch):
    uninterrupted = _cmft(tmp_path, monkeypatch)
    run_epochs(uninterrupted, 2, _batch)
    checkpoint = str(tmp_path / "killed.pth")
    shutil.copyfile(uninterrupted.output_folder + "/checkpoint_latest.pth", checkpoint)
    run_epochs(uninterrupted, 3, _batch)

    resumed = _cmft(tmp_path, monkeypatch)
    resumed.load_checkpoint(checkpoint)
    assert resumed.current_epoch == 2
    run_epochs(resumed, 3, _batch)

    logs_a, logs_b = logs_without_timestamps(uninterrupted), logs_without_timestamps(resumed)
    assert logs_a.keys() == logs_b.keys() >= {f"loss_{t}" for t in CMFT_TERMS} | {"val_ssim", "val_l1"}
    assert_same_logs(logs_a, logs_b, rtol=1e-4, atol=1e-6)
    assert_same_modules(uninterrupted, resumed, ("network", "discriminator"), rtol=1e-4, atol=1e-6)
    assert_same_optimizer_state(uninterrupted, resumed, ("optimizer", "optimizer_d"), "exp_avg", rtol=1e-4,
                                atol=1e-6)
    examples = Path(resumed.output_folder) / "examples"
    assert sorted(p.name for p in examples.iterdir()) == ["epoch_0000.png", "epoch_0001.png", "epoch_0002.png"]


# ------------------------------------------------------------------------------------------------ CMFF in-process
def _cmft_checkpoint(tmp_path, monkeypatch, settings: dict | None = None) -> tuple[Path, dict]:
    """A CMFTPretrainer checkpoint with perturbed (non-initial) weights, and those weights."""
    if settings:
        _override(tmp_path, monkeypatch, settings, "cmft_override.json")
    trainer = make_tiny_trainer(CMFTPretrainer, tmp_path, monkeypatch)
    trainer.initialize()
    with torch.no_grad():
        for parameter in trainer.network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    path = tmp_path / "cmft.pth"
    trainer.save_checkpoint(str(path))
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    return path, {k: v.clone() for k, v in trainer.network.state_dict().items()}


def _cmff(tmp_path, monkeypatch, trainer_class=CMFFTrainer, settings: dict | None = None) -> CMFFTrainer:
    if settings:
        _override(tmp_path, monkeypatch, settings, "cmff_override.json")
    trainer = make_tiny_trainer(trainer_class, tmp_path, monkeypatch)
    trainer.initialize()
    return trainer


def test_pretrained_transfer_copies_the_generator_weights(tmp_path, monkeypatch):
    path, generator_state = _cmft_checkpoint(tmp_path, monkeypatch)
    trainer = _cmff(tmp_path, monkeypatch, settings={"cmff": {"pretrained_checkpoint": str(path)}})
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    trainer.initialise_from_pretraining()
    after = trainer.network.state_dict()
    transferred = 0
    for key, value in after.items():
        branch, rest = key.split(".", 1)
        if branch in ("branch_a", "branch_b") and ".seg_layers." not in key:
            generator = {"branch_a": "a_to_b", "branch_b": "b_to_a"}[branch]
            assert torch.equal(value, generator_state[f"{generator}.{rest}"]), key
            assert not torch.equal(value, before[key]), key  # really changed
            transferred += 1
        else:  # fusion branch and segmentation heads keep their initialisation
            assert torch.equal(value, before[key]), key
    assert transferred > 50
    log = Path(trainer.log_file).read_text()
    assert f"S_A initialised from G_A->B and S_B from G_B->A of {path}" in log


def test_checkpoints_that_do_not_fit_are_refused_with_clear_errors(tmp_path, monkeypatch):
    auto = _cmff(tmp_path, monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"CMFTPretrainer__nnUNetPlans__3d_tiny/fold_0/checkpoint_final\.pth "
                                                r"does not exist: run 'nnUNetv2_train Dataset999_Tiny 3d_tiny 0 -tr "
                                                r"CMFTPretrainer' first.*CMFFTrainer_random"):
        auto.initialise_from_pretraining()
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)

    other_pairs, _ = _cmft_checkpoint(tmp_path, monkeypatch,
                                      {"cmft": {"pairs": {"a": ["t1", "flair"], "b": ["t1ce", "t2"]}}})
    trainer = _cmff(tmp_path, monkeypatch, settings={"cmff": {"pretrained_checkpoint": str(other_pairs)}})
    with pytest.raises(ValueError, match=r"pretrained on modality pairs \{'a': \['t1', 'flair'\]"):
        trainer.initialise_from_pretraining()

    wider, _ = _cmft_checkpoint(tmp_path, monkeypatch, {"cmft": {"feature_fraction": 2.0}})
    trainer = _cmff(tmp_path, monkeypatch, settings={"cmff": {"pretrained_checkpoint": str(wider)}})
    with pytest.raises(ValueError, match=r"cmft\.pth does not fit this CMFF network: a_to_b\..* has shape"):
        trainer.initialise_from_pretraining()

    foreign = tmp_path / "segmentation.pth"  # an nnU-Net checkpoint of another trainer
    torch.save({"network_weights": trainer.network.state_dict(), "trainer_name": "nnUNetTrainer"}, foreign)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    for path, message in ((foreign, "was not written by a CMFT pretrainer \\(trainer 'nnUNetTrainer'"),
                          (garbage, "is not a readable PyTorch checkpoint")):
        trainer = _cmff(tmp_path, monkeypatch, settings={"cmff": {"pretrained_checkpoint": str(path)}})
        with pytest.raises(ValueError, match=message):
            trainer.initialise_from_pretraining()


def test_pretraining_is_loaded_only_when_a_run_starts_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(base_module.MultiTermLossTrainer, "on_train_start", lambda self: None)
    trainer = _cmff(tmp_path, monkeypatch)  # "auto", and no CMFT run exists
    trainer.current_epoch = 2  # resumed (--c): the weights come from the run's own checkpoint
    trainer.on_train_start()
    trainer.current_epoch = 0
    with pytest.raises(FileNotFoundError, match="CMFTPretrainer"):
        trainer.on_train_start()
    random = _cmff(tmp_path, monkeypatch, CMFFTrainer_random)
    random.on_train_start()
    assert "randomly initialised" in Path(random.log_file).read_text()


def _regions_target(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    full = (torch.rand(2, 3, 16, 16, 16, generator=generator) > 0.6).float()
    return [full, full[:, :, ::2, ::2, ::2].contiguous()]


def test_total_loss_is_equation_7_and_a_missing_pair_leaves_its_branch_out(tmp_path, monkeypatch):
    keep_all = {"modality_dropout": {"scheme": "fixed", "keep": ["t1", "t1ce", "t2", "flair"]}}
    trainer = _cmff(tmp_path, monkeypatch, settings=keep_all)
    data = torch.randn(2, 4, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    data[1, :2] = 0  # sample 1 has no T1 and no T1ce: pair A is wholly missing
    target = _regions_target(4)
    losses = {k: v.detach() for k, v in trainer.compute_losses(data, target).items()}
    with torch.no_grad():
        outputs = trainer.network(data, return_branches=True)  # deterministic: the same forward again
    region_loss = DC_and_BCE_loss({}, {"batch_dice": False, "do_bg": True, "smooth": 1e-5, "ddp": False},
                                  dice_class=MemoryEfficientSoftDiceLoss)
    # nnU-Net's deep-supervision weights: branches over both stages (1, 0: nnU-Net drops the lowest), S_F 2/3, 1/3
    expected_a = float(region_loss(outputs["a"][0][:1], target[0][:1]))  # sample 0 only
    expected_b = float(region_loss(outputs["b"][0], target[0]))
    expected_fused = 2 / 3 * float(region_loss(outputs["fused"][0], target[0])) + \
        1 / 3 * float(region_loss(outputs["fused"][1], target[1]))
    assert outputs["present_a"].tolist() == [True, False]
    assert float(losses["seg_a"]) == pytest.approx(expected_a, rel=1e-5)
    assert float(losses["seg_b"]) == pytest.approx(expected_b, rel=1e-5)
    assert float(losses["seg_fused"]) == pytest.approx(expected_fused, rel=1e-5)
    assert float(losses["total"]) == pytest.approx(expected_a + expected_b + expected_fused, rel=1e-5)
    data[0, :2] = 0  # no sample has pair A: its term is zero and backward still works
    losses = trainer.compute_losses(data, target)
    assert float(losses["seg_a"].detach()) == 0.0
    losses["total"].backward()


@pytest.mark.parametrize("initial_lr, warned", [(None, True), (1e-2, False)])
def test_sgd_with_the_adam_learning_rate_is_warned_about(initial_lr, warned, tmp_path, monkeypatch, capsys):
    """Switching cmff.optimizer to SGD keeps the config's Adam rate (1e-4) unless initial_lr is set with it."""
    settings = {"cmff": {"optimizer": "sgd"}, **({"nnunet": {"initial_lr": initial_lr}} if initial_lr else {})}
    trainer = _cmff(tmp_path, monkeypatch, settings=settings)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(initial_lr or 1e-4)
    assert ("WARNING: cmff.optimizer is 'sgd' with nnunet.initial_lr 0.0001" in capsys.readouterr().out) == warned


def test_modality_dropout_is_drawn_in_the_training_step(tmp_path, monkeypatch):
    trainer = _cmff(tmp_path, monkeypatch, settings={"modality_dropout": {"scheme": "fixed", "keep": ["t2", "flair"]}})
    seen = []
    forward = trainer.network.forward

    def record(x, available=None, return_branches=False):
        seen.append((x.detach().clone(), available.clone()))
        return forward(x, available, return_branches)
    trainer.network.forward = record
    data = torch.randn(2, 4, 16, 16, 16)
    outputs = trainer.train_step({"data": data, "target": _regions_target(5)})
    x, available = seen[0]
    assert torch.count_nonzero(x[:, :2]) == 0 and torch.equal(x[:, 2:], data[:, 2:])
    assert available.tolist() == [[False, False, True, True]] * 2
    assert outputs["loss_seg_a"] == 0.0  # pair A dropped in every sample: S_A has nothing to learn
    assert set(outputs) == {"loss"} | {f"loss_{t}" for t in CMFF_TERMS}


def test_inference_network_holds_no_discriminator_or_generator_parameters(tmp_path, monkeypatch):
    trainer = _cmff(tmp_path, monkeypatch)
    path, generator_state = _cmft_checkpoint(tmp_path, monkeypatch)
    network = CMFFTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 4, 3,
                                                     enable_deep_supervision=False)
    assert isinstance(network, CMFFNet) and any(isinstance(m, MaskGuidedAttention) for m in network.modules())
    state = network.state_dict()
    assert state.keys() == trainer.network.state_dict().keys()  # nothing training-only to drop
    assert not any(k.startswith(("discriminator", "a_to_b", "b_to_a")) for k in state)
    generator_only = {k: v for k, v in generator_state.items() if ".seg_layers." in k}  # the image outputs
    assert generator_only and all(v.shape[0] == 2 for k, v in generator_only.items() if k.endswith("weight"))
    heads = {k: v for k, v in state.items() if ".seg_layers." in k or k.startswith("fusion.heads.")}
    assert all(v.shape[0] == 3 for v in heads.values())  # segmentation heads only, no 2-channel image output
    network.load_state_dict(trainer.network.state_dict())  # what nnUNetv2_predict does with the checkpoint
    with torch.no_grad():
        output = network.eval()(torch.randn(1, 4, 16, 16, 16))
    assert isinstance(output, torch.Tensor) and output.shape == (1, 3, 16, 16, 16)


def test_variants_change_only_their_config():
    base = load_trainer_config(CMFFTrainer)
    changes = {"CMFFTrainer_noMaskGuidance": {"cmff": {"network": {"attention": "none"}}},
               "CMFFTrainer_channelAttention": {"cmff": {"network": {"attention": "channel"}}},
               "CMFFTrainer_random": {"cmff": {"pretrained_checkpoint": None}}}
    assert {cls.__name__ for cls in VARIANTS} == set(changes)
    for variant in VARIANTS:
        shipped = json.loads((config_dir() / f"{variant.__name__}.json").read_text())
        assert shipped == changes[variant.__name__]
        resolved = load_trainer_config(variant)
        expected = json.loads(json.dumps(base))
        for key, value in changes[variant.__name__]["cmff"].items():
            if isinstance(value, dict):
                assert set(value) <= set(expected["cmff"][key])  # no misspelt key slips through
                expected["cmff"][key].update(value)
            else:
                assert key in expected["cmff"]
                expected["cmff"][key] = value
        assert resolved == expected, variant.__name__
    for key in ("pairs", "feature_fraction"):  # the two phases must build the same U-Nets
        assert base["cmff"]["network"][key] == load_trainer_config(CMFTPretrainer)["cmft"][key]
    assert load_trainer_config(CMFTPretrainer)["cmft"]["lambda_cycle"] == 10.0  # the paper's lambda
    assert load_trainer_config(CMFTPretrainer)["adversarial"]["generator_optimizer"]["lr"] == 1e-4


def test_variant_config_shapes_its_network(tmp_path, monkeypatch):
    trainer = _cmff(tmp_path, monkeypatch, CMFFTrainer_noMaskGuidance)
    assert not any(isinstance(m, MaskGuidedAttention) for m in trainer.network.modules())
    assert isinstance(trainer.optimizer, torch.optim.Adam) and trainer.optimizer.param_groups[0]["lr"] == 1e-4


@pytest.mark.parametrize("trainer_class, settings, error, message", [
    (CMFTPretrainer, {"cmft": {"pairs": {"a": ["t1", "t2"], "b": ["t2"]}}}, ValueError, r"cmft\.pairs: pairs a and b"),
    (CMFTPretrainer, {"cmft": {"lambda_cycle": -1}}, ValueError, "lambda_cycle must be a number >= 0"),
    (CMFTPretrainer, {"cmft": {"lambda_cycle": True}}, ValueError, "lambda_cycle must be a number >= 0"),
    (CMFTPretrainer, {"cmft": {"lambda_cycle": float("inf")}}, ValueError, "lambda_cycle must be a number >= 0"),
    (CMFFTrainer, {"cmff": {"optimizer": "rmsprop"}}, ValueError, "cmff.optimizer must be 'adam' or 'sgd'"),
    (CMFFTrainer, {"cmff": {"network": {"attention": "spatial"}}}, ValueError, "attention must be one of"),
])
def test_bad_settings_are_refused(trainer_class, settings, error, message, tmp_path, monkeypatch):
    _override(tmp_path, monkeypatch, settings)
    with pytest.raises(error, match=message):
        make_tiny_trainer(trainer_class, tmp_path, monkeypatch).initialize()


def test_label_based_dataset_is_refused(tmp_path, monkeypatch):
    trainer = make_tiny_trainer(CMFFTrainer, tmp_path, monkeypatch)
    trainer.label_manager._has_regions = False
    with pytest.raises(ValueError, match="region-based"):
        trainer.initialize()


def test_pretrainer_leaves_out_intensity_augmentation_unless_asked_for(tmp_path, monkeypatch):
    """Noise or contrast changes on the real images would become part of what the generators must produce."""
    import json

    from nnunet_missingmod.config import OVERRIDE_ENV
    from nnunet_missingmod.trainers import CMFTPretrainer
    from nnunet_missingmod.trainers.adversarial import INTENSITY_TRANSFORMS
    from tests.conftest import make_tiny_trainer

    def kinds(trainer):
        transforms = trainer.get_training_transforms(np.array([16, 16, 16]), 0.0, None, (0, 1, 2), False,
                                                     regions=trainer.label_manager.foreground_regions)
        return {type(getattr(t, "transform", t)) for t in transforms.transforms}
    off = kinds(make_tiny_trainer(CMFTPretrainer, tmp_path, monkeypatch))
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"cmft": {"intensity_augmentation": True}}))
    monkeypatch.setenv(OVERRIDE_ENV, str(override))
    on = kinds(make_tiny_trainer(CMFTPretrainer, tmp_path, monkeypatch))
    assert not off & set(INTENSITY_TRANSFORMS) and set(INTENSITY_TRANSFORMS) <= on
    assert {k.__name__ for k in off} >= {"SpatialTransform", "MirrorTransform"}
