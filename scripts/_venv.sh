# Sourced by demo.sh and test.sh: create ./.venv on first use and install the package into it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NNUNET_MISSINGMOD_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x "$VENV/bin/python" ]; then
    echo ">>> creating virtual environment $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi
echo ">>> installing nnunet_missingmod$1 into $VENV (the first time pulls nnU-Net and PyTorch: a few minutes)"
"$VENV/bin/python" -m pip install --upgrade-strategy only-if-needed -e "$ROOT$1"
