"""D2NetTrainer through nnUNetv2_train / nnUNetv2_predict, its loss assembly (eq. 11) and its ablation variants."""

import json

import numpy as np
import pytest
import torch

from nnunet_missingmod.config import config_dir, load_trainer_config
from nnunet_missingmod.networks.d2net import D2Net
from nnunet_missingmod.trainers import D2NetTrainer, D2NetTrainer_noETM
from nnunet_missingmod.trainers.d2net import LOSS_TERMS, VARIANTS
from tests.conftest import E2E_DATASET, E2E_NAME, make_trainer, nnunet_script, run_checked

#: What each variant must change, and nothing else (the paper's Table II and IV ablations and its optimiser).
ABLATIONS = {
    "D2NetTrainer_adam": {"optimizer": "adam"},
    "D2NetTrainer_baseline": {"loss": {"w_spatial": 0.0, "w_frequency": 0.0, "w_kd_feature": 0.0, "w_kd_logit": 0.0}},
    "D2NetTrainer_spatialOnly": {"loss": {"w_frequency": 0.0, "w_kd_feature": 0.0, "w_kd_logit": 0.0}},
    "D2NetTrainer_frequencyOnly": {"loss": {"w_spatial": 0.0, "w_kd_feature": 0.0, "w_kd_logit": 0.0}},
    "D2NetTrainer_noKD": {"loss": {"w_kd_feature": 0.0, "w_kd_logit": 0.0}},
    "D2NetTrainer_featureKDOnly": {"loss": {"w_spatial": 0.0, "w_frequency": 0.0, "w_kd_logit": 0.0}},
    "D2NetTrainer_logitKDOnly": {"loss": {"w_spatial": 0.0, "w_frequency": 0.0, "w_kd_feature": 0.0}},
    "D2NetTrainer_noSFMC": {"loss": {"w_spatial": 0.0, "w_frequency": 0.0}},
    "D2NetTrainer_noETM": {"network": {"tumour_projection": False}},
}


def _trainer(work, monkeypatch, trainer_class=D2NetTrainer, dataset_json=None):
    return make_trainer(work, monkeypatch, trainer_class, dataset_json)


def test_train_and_predict_with_nnunet_commands(trained_model, tmp_path):
    work, _, _ = trained_model
    env = json.loads((work / "env.json").read_text())
    run_checked([nnunet_script("nnUNetv2_train"), str(E2E_DATASET), "3d_cpu", "0", "-tr", "D2NetTrainer",
                 "-device", "cpu"], env)
    fold = work / "nnUNet_results" / E2E_NAME / "D2NetTrainer__nnUNetPlans__3d_cpu" / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert all(f"loss_{term} " in log for term in LOSS_TERMS)
    assert (fold / "progress_d2net.png").stat().st_size > 10_000
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(k.startswith("teacher.") for k in checkpoint["network_weights"])
    assert all(len(checkpoint["logging"][f"loss_{term}"]) == 1 for term in LOSS_TERMS)  # in nnU-Net's logger
    assert json.loads((fold / "trainer_config.json").read_text())["trainer"] == "D2NetTrainer"
    run_checked([nnunet_script("nnUNetv2_predict"), "-i", str(work / "nnUNet_raw" / E2E_NAME / "imagesTs"),
                 "-o", str(tmp_path), "-d", str(E2E_DATASET), "-c", "3d_cpu", "-f", "0", "-tr", "D2NetTrainer",
                 "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    assert sorted(p.name for p in tmp_path.glob("*.nii.gz")) == ["Phantom_0005.nii.gz", "Phantom_0006.nii.gz"]


def test_total_loss_is_equation_11(trained_model, monkeypatch, tmp_path):
    weights = {"lambda1": 0.3, "lambda2": 2.0, "w_spatial": 0.5, "w_frequency": 1.5, "w_rec": 0.7,
               "w_kd_feature": 1.1, "w_kd_logit": 0.9, "w_aux": 0.4, "w_consis": 3.0, "warmup_epochs": 4}
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"d2net": {"loss": weights}}))
    monkeypatch.setenv("nnUNet_missingmod_config", str(override))
    trainer = _trainer(trained_model[0], monkeypatch)
    trainer.initialize()
    np.random.seed(0)
    torch.manual_seed(0)
    data = torch.randn(2, 4, 32, 32, 32)
    stages = len(trainer.configuration_manager.pool_op_kernel_sizes) - 1  # nnU-Net's deep-supervision targets
    target = [torch.randint(0, 2, (2, 3, 32 // 2 ** i, 32 // 2 ** i, 32 // 2 ** i)).float() for i in range(stages)]
    trainer.current_epoch = 1  # second epoch of a 4-epoch warm-up: the auxiliary terms count half
    losses = trainer.compute_losses(data, target)
    assert all(torch.isfinite(losses[k]) and losses[k] > 0 for k in LOSS_TERMS if k != "kd_projection")
    assert losses["kd_projection"].item() == 0.0  # the feature term trains the projections
    w = weights
    expected = losses["seg"] \
        + 0.5 * w["lambda1"] * (w["w_spatial"] * losses["sfmc_spatial"] + w["w_frequency"] * losses["sfmc_frequency"]
                                + w["w_rec"] * losses["rec"]) \
        + 0.5 * w["lambda2"] * (w["w_kd_feature"] * losses["kd_feature"] + w["w_kd_logit"] * losses["kd_logit"]
                                + w["w_aux"] * losses["aux"] + w["w_consis"] * losses["consis"])
    assert losses["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    trainer.current_epoch = 10  # after the warm-up: eq. 11 as written
    assert trainer.auxiliary_ramp() == 1.0


def test_logit_only_ablation_trains_its_projections(trained_model, monkeypatch):
    from nnunet_missingmod.trainers import D2NetTrainer_logitKDOnly

    trainer = _trainer(trained_model[0], monkeypatch, D2NetTrainer_logitKDOnly)
    trainer.initialize()
    np.random.seed(1)
    data = torch.randn(2, 4, 32, 32, 32)
    stages = len(trainer.configuration_manager.pool_op_kernel_sizes) - 1
    target = [torch.randint(0, 2, (2, 3, 32 // 2 ** i, 32 // 2 ** i, 32 // 2 ** i)).float() for i in range(stages)]
    losses = trainer.compute_losses(data, target)
    assert losses["kd_feature"].item() == 0.0 and losses["kd_projection"].item() > 0
    losses["total"].backward()
    projections = [p for p in trainer.network.kd_projections.parameters()]
    assert projections and all(p.grad is not None and p.grad.abs().sum() > 0 for p in projections)


def test_optimizer_and_teacher_resolution_follow_the_config(trained_model, monkeypatch):
    from nnunet_missingmod.trainers import D2NetTrainer_adam
    from nnunet_missingmod.trainers.d2net import resolve_teacher_full_resolution

    assert resolve_teacher_full_resolution("auto", "cuda") is True
    assert resolve_teacher_full_resolution("auto", "cpu") is False
    assert resolve_teacher_full_resolution(True, "cpu") is True
    with pytest.raises(ValueError, match="teacher_full_resolution"):
        resolve_teacher_full_resolution("yes", "cpu")
    trainer = _trainer(trained_model[0], monkeypatch, D2NetTrainer_adam)
    trainer.initialize()
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(3e-4) and group["weight_decay"] == pytest.approx(5e-5)
    assert trainer.num_epochs == 400
    assert trainer.network.teacher_first_stage == 1  # "auto" on a CPU trainer
    default = _trainer(trained_model[0], monkeypatch)
    default.initialize()
    assert isinstance(default.optimizer, torch.optim.SGD)


def test_variants_change_only_their_config():
    base = load_trainer_config(D2NetTrainer)
    assert {cls.__name__ for cls in VARIANTS} == set(ABLATIONS)
    for variant in VARIANTS:
        shipped = json.loads((config_dir() / f"{variant.__name__}.json").read_text())
        resolved = load_trainer_config(variant)
        if variant.__name__ == "D2NetTrainer_adam":  # the paper's recipe also sets nnU-Net's lr, decay and epochs
            assert shipped == {"d2net": {"optimizer": "adam"},
                               "nnunet": {"initial_lr": 3e-4, "weight_decay": 5e-5, "num_epochs": 400}}
            assert resolved["d2net"] == {**base["d2net"], "optimizer": "adam"}
            continue
        assert shipped == {"d2net": ABLATIONS[variant.__name__]}, variant.__name__
        for section, changes in ABLATIONS[variant.__name__].items():
            assert set(changes) <= set(base["d2net"][section])  # no misspelt key slips through
            expected = {**base["d2net"][section], **changes}
            assert resolved["d2net"][section] == expected
        assert {k: v for k, v in resolved.items() if k != "d2net"} == {k: v for k, v in base.items() if k != "d2net"}


def test_variant_config_shapes_the_inference_network(trained_model, monkeypatch):
    trainer = _trainer(trained_model[0], monkeypatch, D2NetTrainer_noETM)
    # nnUNetPredictor calls build_network_architecture on the class it looked up by name
    network = D2NetTrainer_noETM.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                            4, 3, enable_deep_supervision=False)
    assert isinstance(network, D2Net) and network.tumour_projection is None and not network.training_parts
    default = D2NetTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 4, 3,
                                                      enable_deep_supervision=False)
    assert default.tumour_projection is not None
    with torch.no_grad():
        assert isinstance(network.eval()(torch.randn(1, 4, 32, 32, 32)), torch.Tensor)


def test_label_based_dataset_is_refused(trained_model, monkeypatch):
    work = trained_model[0]
    dataset_json = json.loads((work / "nnUNet_preprocessed" / E2E_NAME / "dataset.json").read_text())
    dataset_json["labels"] = {"background": 0, "edema": 1, "non-enhancing": 2, "enhancing": 3}
    dataset_json.pop("regions_class_order")
    trainer = _trainer(work, monkeypatch, dataset_json=dataset_json)
    with pytest.raises(ValueError, match="region-based"):
        trainer.initialize()


def test_trainer_checkpoint_round_trip_restores_every_module(trained_model, monkeypatch, tmp_path):
    trainer = _trainer(trained_model[0], monkeypatch)
    trainer.initialize()
    with torch.no_grad():
        for parameter in trainer.network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)  # differ from any fresh initialisation
    trainer.logger.local_logger.my_fantastic_logging["loss_aux"] = [0.5]
    trainer.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    restored = _trainer(trained_model[0], monkeypatch)
    restored.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    saved, loaded = trainer.network.state_dict(), restored.network.state_dict()
    assert saved.keys() == loaded.keys()
    prefixes = {key.split(".")[0] for key in saved}
    assert {"encoder", "decoder", "code_encoder", "tumour_projection", "region_encoders", "fusion", "teacher",
            "reconstruction", "kd_projections"} <= prefixes
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)
    assert restored.logger.local_logger.my_fantastic_logging["loss_aux"] == [0.5]
