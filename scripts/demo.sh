#!/usr/bin/env bash
# The main job: phantoms -> nnUNetv2_plan_and_preprocess -> 3d_cpu configuration -> nnUNetv2_train
# -> nnUNetv2_predict on held-out phantoms -> per-region Dice. Extra arguments go to `nnunet_missingmod demo`
# (e.g. --epochs 40, -tr ModalityDropoutTrainer, --work-dir DIR, --fresh).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" ""
cd "$ROOT"
export nnUNet_def_n_proc="${nnUNet_def_n_proc:-2}" nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-2}"
exec "$VENV/bin/nnunet_missingmod" demo "$@"
