"""Train several trainers with the same budget on the phantoms, evaluate all 15 modality combinations, compare.

    python scripts/bench_robustness.py [--work-dir bench_work] [--trainers nnUNetTrainer ModalityDropoutTrainer
        SharedLatentTrainer D2NetTrainer] [--epochs 20] [--iterations 25] [--eval-cases 10] [--step-size 1.0]

Every trainer (plain nnUNetTrainer included) trains fold 0 of the 3d_cpu configuration for exactly
``epochs x iterations`` iterations (set on the trainer object), in its own process. Each model is then
scored by ``evaluate-missing`` on the first ``eval-cases`` held-out phantoms without mirroring TTA, and
``compare`` renders the results side by side (``<work-dir>/robustness/comparison.md`` and ``.png``).
Trained models, and evaluations newer than their model, are reused when the script is run again
(``--retrain`` to start over).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import DATASET_NAME, model_dir, prepare, run_worker, train_with_budget  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="bench_work")
    parser.add_argument("--trainers", nargs="+", default=["nnUNetTrainer", "ModalityDropoutTrainer",
                                                          "SharedLatentTrainer", "D2NetTrainer"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--eval-cases", type=int, default=10)
    parser.add_argument("--step-size", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work_dir).resolve()
    env = prepare(work)
    if args.worker:
        start = time.perf_counter()
        train_with_budget(args.worker, args.epochs, args.iterations, args.device)
        print(json.dumps({"train_s": time.perf_counter() - start}))
        return

    from nnunet_missingmod.evaluation.missing_combinations import compare, evaluate_missing

    cases = sorted((work / "nnUNet_raw" / DATASET_NAME / "labelsTs").glob("*.nii.gz"))[: args.eval_cases]
    case_names = {c.name[: -len(".nii.gz")] for c in cases}
    timings = work / "robustness" / "timings.json"
    runs, report = [], json.loads(timings.read_text()) if timings.is_file() else {}  # reused runs keep their times
    for trainer in args.trainers:
        folder = model_dir(work, trainer)
        if args.retrain and folder.exists():
            shutil.rmtree(folder)
        if not (folder / "fold_0" / "checkpoint_final.pth").is_file():
            print(f"=== training {trainer}: {args.epochs} epochs x {args.iterations} iterations", flush=True)
            report[trainer] = run_worker(__file__, ["--worker", trainer, "--work-dir", str(work), "--epochs",
                                                    str(args.epochs), "--iterations", str(args.iterations),
                                                    "--device", args.device], env)
        out = work / "robustness" / trainer
        checkpoint = folder / "fold_0" / "checkpoint_final.pth"
        summary = out / "summary.json"
        if summary.is_file() and summary.stat().st_mtime > checkpoint.stat().st_mtime \
                and json.loads(summary.read_text())["num_cases"] == len(cases):
            print(f"=== reusing the evaluation of {trainer} ({summary})", flush=True)
            runs.append(out)
            continue
        print(f"=== evaluating {trainer} on {len(cases)} held-out phantoms x 15 combinations", flush=True)
        start = time.perf_counter()
        out = evaluate_missing(folder, 0, split="test", output=work / "robustness" / trainer,
                               tile_step_size=args.step_size, use_mirroring=False, device=args.device,
                               case_filter=case_names)
        report.setdefault(trainer, {})["evaluate_s"] = time.perf_counter() - start
        runs.append(out)
    markdown, png = compare(runs, work / "robustness", labels=args.trainers)
    timings.write_text(json.dumps(report, indent=2))
    print(markdown.read_text())
    print(f"chart: {png}\ntables per trainer: {work / 'robustness'}/<trainer>/table.md")


if __name__ == "__main__":
    main()
