"""Trainer registration through nnU-Net's own nnUNet_extTrainer lookup, in a fresh interpreter."""

import os
import subprocess
import sys

from nnunet_missingmod.ext import ext_trainer_path, with_ext_trainer

LOOKUP = """
import nnunet_missingmod.trainers as ours
from nnunet_missingmod.trainers.modality_dropout import ModalityDropoutTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
found = recursive_find_trainer_class_by_name("ModalityDropoutTrainer")
assert found is ModalityDropoutTrainer, (found, found.__module__)
assert recursive_find_trainer_class_by_name("nnUNetTrainer").__name__ == "nnUNetTrainer"
print("FOUND", found.__module__)
"""


def test_ext_folder_holds_only_the_shim():
    assert sorted(f for f in os.listdir(ext_trainer_path()) if f != "__pycache__") == ["nnunet_missingmod_trainers.py"]


def test_cli_prints_ext_path():
    out = subprocess.run([sys.executable, "-m", "nnunet_missingmod.cli", "ext-path"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == ext_trainer_path()


def test_nnunet_finds_our_trainer_class_itself():
    env = with_ext_trainer({k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"})
    out = subprocess.run([sys.executable, "-c", LOOKUP], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FOUND nnunet_missingmod.trainers.modality_dropout" in out.stdout


def test_without_registration_nnunet_does_not_find_it():
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    out = subprocess.run([sys.executable, "-c", LOOKUP], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "Could not find requested nnunet trainer" in out.stderr


def test_with_ext_trainer_keeps_other_folders():
    env = with_ext_trainer({"nnUNet_extTrainer": "/somewhere/else"})
    assert env["nnUNet_extTrainer"].split(os.pathsep) == [ext_trainer_path(), "/somewhere/else"]
    assert with_ext_trainer(env) == env


def test_every_subcommand_has_help():
    for command in ("ext-path", "phantom", "convert-brats", "add-cpu-config", "predict", "evaluate-missing",
                    "compare", "demo"):
        out = subprocess.run([sys.executable, "-m", "nnunet_missingmod.cli", command, "--help"],
                             capture_output=True, text=True)
        assert out.returncode == 0 and "usage: nnunet_missingmod " + command in out.stdout, out.stderr
