#!/usr/bin/env bash
# Install the package with its test extra into ./.venv and run the test suite (CPU only, no network).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" "[test]"
cd "$ROOT"
export nnUNet_def_n_proc="${nnUNet_def_n_proc:-2}" nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-2}"
exec "$VENV/bin/python" -m pytest -q --durations=10 tests "$@"
