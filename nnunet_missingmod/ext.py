"""Registration of this package's trainers with nnU-Net through ``nnUNet_extTrainer``.

nnU-Net (2.8+) looks up a trainer it does not know in the folders listed in ``nnUNet_extTrainer``
(``os.pathsep``-separated), importing every module found there as a top-level module. The folder
returned by :func:`ext_trainer_path` holds a single one-line shim that re-exports
:mod:`nnunet_missingmod.trainers`, so the classes nnU-Net finds are the package's own classes (the
same objects as ``from nnunet_missingmod.trainers import ...``). Pointing the variable at the package
root instead would import the package's modules a second time under other names.

Usage from a shell: ``export nnUNet_extTrainer=$(nnunet_missingmod ext-path)``.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "nnUNet_extTrainer"


def ext_trainer_path() -> str:
    """Folder holding only the shim module that re-exports the trainers."""
    return str(Path(__file__).resolve().parent / "nnunet_ext")


def with_ext_trainer(env: dict[str, str] | os._Environ | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) whose ``nnUNet_extTrainer`` includes our shim folder."""
    env = dict(os.environ if env is None else env)
    ours = ext_trainer_path()
    current = [p for p in env.get(ENV_VAR, "").split(os.pathsep) if p]
    if ours not in current:
        env[ENV_VAR] = os.pathsep.join([ours, *current])
    return env


def register() -> None:
    """Add the shim folder to ``nnUNet_extTrainer`` of this process (for nnU-Net used in-process)."""
    os.environ[ENV_VAR] = with_ext_trainer()[ENV_VAR]
