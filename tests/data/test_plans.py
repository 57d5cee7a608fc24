"""add-cpu-config: invalid settings, circular plans and damaged plans files are one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from nnunet_missingmod import cli
from nnunet_missingmod.data.plans import PlansError, add_cpu_configuration
from tests.conftest import tiny_plans


@pytest.fixture
def preprocessed(tmp_path, monkeypatch):
    """A preprocessed folder whose Dataset999_Tiny plans have ``3d_tiny`` (as planned) and return the plans file."""
    folder = tmp_path / "preprocessed" / "Dataset999_Tiny"
    folder.mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(tiny_plans(patch_size=(32, 32, 32))))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    return folder / "nnUNetPlans.json"



@pytest.mark.parametrize("args, message", [
    (["--patch-size", "30", "32", "32"], "divisible by 4"),
    (["--patch-size", "32", "32"], "must have 3 dimensions"),
    (["--patch-size", "0", "32", "32"], "patch size must be integers of at least 1"),
    (["--features", "8"], "at least two stages"),
    (["--features", "8", "0", "16"], "features per stage must be integers of at least 1"),
    (["--name", "3d_tiny"], "cannot inherit from itself"),
])
def test_invalid_settings_are_one_line_errors(preprocessed, capsys, args, message):
    before = preprocessed.read_text()
    code = cli.main(["add-cpu-config", "-d", "999", "--parent", "3d_tiny", "--patch-size", "16", "16", "16",
                     "--features", "4", "8", "16", *args])
    err = capsys.readouterr().err
    assert code == cli.ERROR_EXIT_CODE
    assert err.startswith("nnunet_missingmod add-cpu-config: error: ") and err.count("\n") == 1 and message in err
    assert preprocessed.read_text() == before  # nothing written


def test_batch_size_zero_is_refused_by_argparse_and_by_the_function(preprocessed):
    with pytest.raises(SystemExit) as stop:
        cli.main(["add-cpu-config", "-d", "999", "--parent", "3d_tiny", "--batch-size", "0"])
    assert stop.value.code == 2
    with pytest.raises(PlansError, match="batch size must be an integer of at least 1, got 0"):
        add_cpu_configuration(999, parent="3d_tiny", patch_size=(16, 16, 16), features_per_stage=(4, 8, 16),
                              batch_size=0)


def test_checks_survive_python_dash_o(preprocessed, tmp_path):
    """The checks used to be asserts: under ``python -O`` a bad patch size was written into the plans."""
    code = ("import sys; from nnunet_missingmod.data.plans import add_cpu_configuration as a\n"
            "try:\n    a(999, parent='3d_tiny', patch_size=(30, 32, 32), features_per_stage=(4, 8, 16))\n"
            "except ValueError as e:\n    print('refused:', e); sys.exit(0)\nsys.exit(1)")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "divisible by 4" in out.stdout
    assert "3d_cpu" not in preprocessed.read_text()


def test_parent_inheriting_from_the_new_name_is_refused(preprocessed, capsys):
    add_cpu_configuration(999, name="3d_cpu", parent="3d_tiny", patch_size=(16, 16, 16), features_per_stage=(4, 8))
    add_cpu_configuration(999, name="3d_cpu_small", parent="3d_cpu", patch_size=(8, 8, 8), features_per_stage=(4, 8))
    before = preprocessed.read_text()
    # replacing 3d_cpu by a child of 3d_cpu_small would make 3d_cpu -> 3d_cpu_small -> 3d_cpu
    code = cli.main(["add-cpu-config", "-d", "999", "--name", "3d_cpu", "--parent", "3d_cpu_small",
                     "--patch-size", "8", "8", "8", "--features", "4", "8"])
    assert code == cli.ERROR_EXIT_CODE and "circular" in capsys.readouterr().err
    assert preprocessed.read_text() == before


def _damage_missing_architecture(plans: dict) -> None:
    del plans["configurations"]["3d_tiny"]["architecture"]  # nnU-Net then looks for the old 'UNet_class_name'


def _damage_missing_arch_kwargs(plans: dict) -> None:
    del plans["configurations"]["3d_tiny"]["architecture"]["arch_kwargs"]


def _damage_missing_configurations(plans: dict) -> None:
    del plans["configurations"]


def _damage_loop(plans: dict) -> None:
    plans["configurations"]["a"] = {"inherits_from": "b"}
    plans["configurations"]["b"] = {"inherits_from": "a"}
    plans["configurations"]["3d_tiny"]["inherits_from"] = "a"


@pytest.mark.parametrize("damage, key", [
    (_damage_missing_architecture, "'UNet_class_name'"),
    (_damage_missing_arch_kwargs, "'arch_kwargs'"),
    (_damage_missing_configurations, "'configurations'"),
    (_damage_loop, "loop"),
    (None, "not a valid JSON"),
])
def test_damaged_plans_file_names_the_file_and_the_key(preprocessed, capsys, damage, key):
    if damage is None:
        preprocessed.write_text(preprocessed.read_text()[:200])
    else:
        plans = json.loads(preprocessed.read_text())
        damage(plans)
        preprocessed.write_text(json.dumps(plans))
    before = preprocessed.read_text()
    code = cli.main(["add-cpu-config", "-d", "999", "--parent", "3d_tiny", "--patch-size", "16", "16", "16",
                     "--features", "4", "8", "16"])
    err = capsys.readouterr().err
    assert code == cli.ERROR_EXIT_CODE, err
    assert err.count("\n") == 1 and str(preprocessed) in err and key in err
    assert preprocessed.read_text() == before


def test_valid_settings_still_work(preprocessed):
    add_cpu_configuration(999, parent="3d_tiny", patch_size=(16, 16, 16), features_per_stage=(4, 8, 16), batch_size=1)
    added = json.loads(preprocessed.read_text())["configurations"]["3d_cpu"]
    assert added["inherits_from"] == "3d_tiny" and added["patch_size"] == [16, 16, 16] and added["batch_size"] == 1
    assert added["architecture"]["arch_kwargs"]["features_per_stage"] == [4, 8, 16]


@pytest.fixture
def preprocessed_2d(tmp_path, monkeypatch):
    """Like ``preprocessed``, with a 2D configuration ``2d`` (nnU-Net's 2d: Conv2d, InstanceNorm2d, 2D patch)."""
    plans = tiny_plans(patch_size=(48, 40), features_per_stage=(4, 8, 16, 32))
    plans["configurations"] = {"2d": plans["configurations"]["3d_tiny"]}
    folder = tmp_path / "preprocessed" / "Dataset999_Tiny"
    folder.mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    return folder / "nnUNetPlans.json"


def test_a_2d_parent_gives_a_2d_configuration(preprocessed_2d, capsys):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    code = cli.main(["add-cpu-config", "-d", "999", "--parent", "2d", "--name", "2d_cpu", "--patch-size", "32", "16",
                     "--features", "4", "8", "16", "--batch-size", "3"])
    assert code == 0, capsys.readouterr().err
    configuration = PlansManager(str(preprocessed_2d)).get_configuration("2d_cpu")
    kwargs = configuration.network_arch_init_kwargs
    assert configuration.patch_size == [32, 16] and configuration.batch_size == 3
    assert configuration.data_identifier == "nnUNetPlans_3d_tiny"  # the parent's preprocessed data
    assert kwargs["conv_op"] == "torch.nn.modules.conv.Conv2d"
    assert kwargs["norm_op"] == "torch.nn.modules.instancenorm.InstanceNorm2d"
    assert kwargs["kernel_sizes"] == [[3, 3]] * 3 and kwargs["strides"] == [[1, 1], [2, 2], [2, 2]]
    assert kwargs["features_per_stage"] == [4, 8, 16] and len(kwargs["n_conv_per_stage_decoder"]) == 2
    network = get_network_from_plans(configuration.network_arch_class_name, kwargs,
                                     configuration.network_arch_init_kwargs_req_import, 4, 3)
    assert network(torch.zeros(1, 4, 32, 16)).shape == (1, 3, 32, 16)


def test_a_2d_parent_defaults_to_2d_cpu_and_refuses_a_3d_patch(preprocessed_2d, capsys):
    add_cpu_configuration(999, parent="2d", features_per_stage=(4, 8, 16))
    added = json.loads(preprocessed_2d.read_text())["configurations"]["2d_cpu"]
    assert added["inherits_from"] == "2d" and added["patch_size"] == [64, 64]
    before = preprocessed_2d.read_text()
    code = cli.main(["add-cpu-config", "-d", "999", "--parent", "2d", "--name", "2d_small",
                     "--patch-size", "32", "32", "32", "--features", "4", "8"])
    err = capsys.readouterr().err
    assert code == cli.ERROR_EXIT_CODE and err.count("\n") == 1
    assert "must have 2 dimensions like 2d (give 2 numbers, e.g. --patch-size 64 64)" in err
    assert preprocessed_2d.read_text() == before
