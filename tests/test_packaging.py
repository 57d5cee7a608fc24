"""A non-editable install must ship the trainer configs and the nnUNet_extTrainer shim."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_configs_and_shim(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("nnunet_missingmod-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (ROOT / "trainer_configs").glob("*.json")}
    assert shipped and all(f"nnunet_missingmod/trainer_configs/{n}" in names for n in shipped)
    assert "nnunet_missingmod/nnunet_ext/nnunet_missingmod_trainers.py" in names
    assert not any(n.startswith("nnunet_missingmod/nnunet_ext/") and n.endswith("__init__.py") for n in names)
    assert not any(n.startswith(("tests/", "trainer_configs/")) for n in names)
