"""evaluate-missing against 15 separate nnUNetv2_predict runs (one per modality combination) on the same cases.

    python scripts/bench_evaluate.py [--work-dir bench_work] [--trainer ModalityDropoutTrainer] [--cases 3]
        [--step-size 0.5]

Needs a trained model in the work folder (run scripts/bench_robustness.py first). The baseline is what a
user would do without this package: write zero-filled copies of the cases for each combination, run
``nnUNetv2_predict`` on each folder, and score the predictions; the time of each part is reported. Both
sides predict without mirroring TTA, with the same sliding-window step, and their Dice must agree.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import CONFIGURATION, DATASET_ID, DATASET_NAME, model_dir, prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="bench_work")
    parser.add_argument("--trainer", default="ModalityDropoutTrainer")
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--step-size", type=float, default=0.5)
    args = parser.parse_args()
    work = Path(args.work_dir).resolve()
    env = prepare(work)

    from nnunet_missingmod import modalities as mods
    from nnunet_missingmod.demo import _console_script, run_step
    from nnunet_missingmod.evaluation.metrics import region_metrics
    from nnunet_missingmod.evaluation.missing_combinations import evaluate_missing

    model = model_dir(work, args.trainer)
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        raise SystemExit(f"no trained model at {model}; run scripts/bench_robustness.py first")
    raw = work / "nnUNet_raw" / DATASET_NAME
    labels = sorted((raw / "labelsTs").glob("*.nii.gz"))[: args.cases]
    cases = [p.name[: -len(".nii.gz")] for p in labels]

    start = time.perf_counter()
    ours = evaluate_missing(model, 0, split="test", output=work / "bench_evaluate" / "ours", case_filter=set(cases),
                            tile_step_size=args.step_size, use_mirroring=False)
    ours_s = time.perf_counter() - start

    base = work / "bench_evaluate" / "baseline"
    shutil.rmtree(base, ignore_errors=True)
    prepare_s = predict_s = score_s = 0.0
    baseline_dice = {}
    for combination in mods.all_combinations():
        name = mods.combination_name(combination)
        start = time.perf_counter()
        folder = base / name / "input"
        folder.mkdir(parents=True)
        for case in cases:
            for channel in range(mods.NUM_MODALITIES):
                source = raw / "imagesTs" / f"{case}_{channel:04d}.nii.gz"
                if channel in combination:
                    shutil.copy(source, folder / source.name)
                else:
                    image = sitk.ReadImage(str(source))
                    zeros = sitk.Image(image.GetSize(), image.GetPixelID())
                    zeros.CopyInformation(image)
                    sitk.WriteImage(zeros, str(folder / source.name), useCompression=True)
        prepare_s += time.perf_counter() - start
        predict_s += run_step(f"nnUNetv2_predict, {name}", [
            _console_script("nnUNetv2_predict"), "-i", str(folder), "-o", str(base / name / "pred"),
            "-d", str(DATASET_ID), "-c", CONFIGURATION, "-f", "0", "-tr", args.trainer, "-device", "cpu",
            "--disable_tta", "-step_size", str(args.step_size), "-npp", "2", "-nps", "2"], env)
        start = time.perf_counter()
        scores = []
        for case, label in zip(cases, labels, strict=True):
            reference = sitk.ReadImage(str(label))
            predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(base / name / "pred" / f"{case}.nii.gz")))
            scores.append(region_metrics(sitk.GetArrayFromImage(reference), predicted,
                                         reference.GetSpacing()[::-1]))
        baseline_dice[name] = float(np.mean([s["WT"]["Dice"] for s in scores]))
        score_s += time.perf_counter() - start

    summary = json.loads((ours / "summary.json").read_text())["per_combination"]
    worst = max(abs(summary[n]["WT_Dice"] - baseline_dice[n]) for n in baseline_dice)
    baseline_s = prepare_s + predict_s + score_s
    result = {"cases": len(cases), "step_size": args.step_size, "evaluate_missing_s": ours_s,
              "baseline_s": {"zero_filled_copies": prepare_s, "nnUNetv2_predict_x15": predict_s, "scoring": score_s,
                             "total": baseline_s},
              "speedup_vs_total": baseline_s / ours_s, "speedup_vs_predict_only": predict_s / ours_s,
              "max_abs_wt_dice_difference": worst}
    (work / "bench_evaluate.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
