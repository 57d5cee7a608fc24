"""The demo: phantoms -> nnU-Net planning and preprocessing -> CPU configuration -> short training -> prediction.

Everything runs through nnU-Net's own commands (``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train``,
``nnUNetv2_predict``) in a work folder of its own (``nnUNet_raw``, ``nnUNet_preprocessed`` and
``nnUNet_results`` are set for the child processes only), with ``nnUNet_extTrainer`` pointing at this
package's trainers. The short training budget goes through the ``nnUNet_missingmod_config`` override
file, which is kept in the work folder and recorded next to the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.config import OVERRIDE_ENV
from nnunet_missingmod.ext import with_ext_trainer


def nnunet_environment(work_dir: Path, *, num_processes: int = 2,
                       extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for nnU-Net child processes working in ``work_dir`` on a small CPU machine."""
    env = with_ext_trainer()
    env.update({
        "nnUNet_raw": str(work_dir / "nnUNet_raw"),
        "nnUNet_preprocessed": str(work_dir / "nnUNet_preprocessed"),
        "nnUNet_results": str(work_dir / "nnUNet_results"),
        "nnUNet_def_n_proc": str(num_processes),
        "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA", str(num_processes)),
        "nnUNet_compile": "f",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def run_step(title: str, command: list[str], env: dict[str, str]) -> float:
    """Run one nnU-Net command, streaming its output; return the wall time in seconds."""
    print(f"\n=== {title}\n$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    completed = subprocess.run(command, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"step '{title}' failed with exit code {completed.returncode}: {' '.join(command)}")
    return time.perf_counter() - start


def _console_script(name: str) -> str:
    """Absolute path of a console script installed beside this interpreter (falls back to PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def region_dice(reference_folder: Path, prediction_folder: Path, dataset_json: dict,
                num_processes: int = 2) -> dict:
    """Per-region Dice (nnU-Net's evaluation code; both empty counts as 1, as in BraTS) of a prediction folder."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    regions = [tuple(mods.REGIONS[name]) for name in mods.REGIONS]
    summary = compute_metrics_on_folder(str(reference_folder), str(prediction_folder),
                                        str(prediction_folder / "summary.json"), SimpleITKIO(),
                                        dataset_json["file_ending"], regions, None, num_processes)
    names = {tuple(members): name for name, members in mods.REGIONS.items()}
    per_case = []
    for case in summary["metric_per_case"]:
        row = {"case": Path(case["prediction_file"]).name}
        for region in regions:
            metrics = case["metrics"][region]
            # nnU-Net reports NaN when reference and prediction are both empty; BraTS counts that as 1
            both_empty = metrics["n_ref"] == 0 and metrics["n_pred"] == 0
            row[names[tuple(region)]] = 1.0 if both_empty else float(metrics["Dice"])
        per_case.append(row)
    mean = {name: sum(row[name] for row in per_case) / len(per_case) for name in mods.REGIONS}
    return {"mean": mean, "per_case": per_case}


def prepare_phantom_dataset(work: Path, env: dict[str, str], *, dataset_id: int = 990, num_cases: int = 40,
                            num_test: int = 10, seed: int = 0, configuration: str = "3d_cpu",
                            patch_size: tuple[int, int, int] = (48, 48, 48), num_processes: int = 2,
                            spacing: float | None = None, features_per_stage: tuple[int, ...] | None = None,
                            batch_size: int | None = None, preview: bool = True) -> dict[str, float]:
    """Phantoms, nnU-Net planning/preprocessing and the CPU configuration in ``work`` (finished steps are reused).

    ``spacing`` (mm, default the phantoms' 2 mm), ``features_per_stage`` and ``batch_size`` (default
    ``add_cpu_configuration``'s) set the phantoms and the CPU configuration of the benchmark regimes;
    ``preview`` writes ``work/phantom_preview.png``.

    Returns:
        Wall times in seconds of the steps that ran.
    """
    from nnunet_missingmod.data.phantom import PhantomConfig, make_phantom_dataset, render_preview
    from nnunet_missingmod.data.plans import add_cpu_configuration

    timings = {}
    dataset_name = f"Dataset{dataset_id:03d}_BraTSPhantom"
    raw = work / "nnUNet_raw" / dataset_name
    start = time.perf_counter()
    if not (raw / "dataset.json").is_file():
        print(f"=== generating {num_cases + num_test} phantoms" + (f" at {spacing:g} mm" if spacing else ""),
              flush=True)
        make_phantom_dataset(dataset_id, num_cases=num_cases, num_test=num_test, seed=seed,
                             config=PhantomConfig() if spacing is None else PhantomConfig(spacing=spacing),
                             raw_folder=work / "nnUNet_raw", num_processes=num_processes)
    if preview:
        render_preview(raw, work / "phantom_preview.png")
    timings["phantoms"] = time.perf_counter() - start

    plans = work / "nnUNet_preprocessed" / dataset_name / "nnUNetPlans.json"
    if not plans.is_file() or not (plans.parent / "nnUNetPlans_3d_fullres").is_dir():
        timings["plan_and_preprocess"] = run_step(
            "nnU-Net planning and preprocessing",
            [_console_script("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres",
             "-np", str(num_processes), "--verify_dataset_integrity"], env)
    sizes = {key: value for key, value in (("features_per_stage", features_per_stage), ("batch_size", batch_size))
             if value is not None}
    add_cpu_configuration(dataset_id, name=configuration, patch_size=patch_size,
                          preprocessed_folder=work / "nnUNet_preprocessed", **sizes)
    print(f"added configuration {configuration} (patch {list(patch_size)}) to {plans}")
    return timings


def run_demo(work_dir: str | os.PathLike = "demo_output", *, trainer: str = "ModalityDropoutTrainer",
             dataset_id: int = 990, num_cases: int = 40, num_test: int = 10, seed: int = 0,
             epochs: int = 20, iterations_per_epoch: int = 25, configuration: str = "3d_cpu",
             patch_size: tuple[int, int, int] = (48, 48, 48), device: str = "cpu", num_processes: int = 2,
             tta: bool = False, step_size: float = 1.0, eval_cases: int = 5, fresh: bool = False) -> dict:
    """Run the whole demo and return the per-region Dice on the held-out phantoms.

    Args:
        work_dir: folder for the nnU-Net raw, preprocessed and results folders of the demo.
        trainer: trainer to train (any nnU-Net or nnunet_missingmod trainer).
        dataset_id: dataset id of the phantom dataset.
        num_cases: training phantoms (5-fold cross-validation split by nnU-Net; fold 0 is trained).
        num_test: held-out phantoms that are predicted and scored.
        seed: phantom seed.
        epochs: training epochs.
        iterations_per_epoch: training iterations per epoch.
        configuration: name of the small CPU configuration added to the plans.
        patch_size: its patch size.
        device: ``cpu``, ``cuda`` or ``mps`` (passed to nnU-Net's ``-device``).
        num_processes: worker processes for nnU-Net.
        tta: mirroring test-time augmentation in the final validation and the prediction (8x slower on CPU).
        step_size: sliding-window step of the prediction and the evaluation (nnU-Net's default is 0.5; the demo
            uses 1.0, no overlap, about 3x faster on a CPU).
        eval_cases: held-out phantoms scored on all 15 modality combinations (0 skips that step).
        fresh: delete the work folder first; otherwise finished steps (phantoms, preprocessing) are reused.

    Returns:
        ``{"mean": {region: dice}, "per_case": [...], "timings_s": {...}}``.
    """
    import nnunet_missingmod.trainers as trainers

    if not isinstance(getattr(trainers, trainer, None), type):
        raise ValueError(f"the demo trains this package's trainers, whose budget it can set: "
                         f"{', '.join(trainers.__all__)} "
                         f"(MissingModTrainerBase is nnU-Net's default trainer); got {trainer!r}")
    work = Path(work_dir).resolve()
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    overrides = {"nnunet": {"num_epochs": epochs, "num_iterations_per_epoch": iterations_per_epoch,
                            "num_val_iterations_per_epoch": max(1, iterations_per_epoch // 5),
                            "save_every": max(1, epochs)},
                 "inference": {"test_time_mirroring": tta}}
    override_file = work / "demo_trainer_overrides.json"
    override_file.write_text(json.dumps(overrides, indent=2))
    env = nnunet_environment(work, num_processes=num_processes, extra={OVERRIDE_ENV: str(override_file)})
    timings: dict[str, float] = {}

    dataset_name = f"Dataset{dataset_id:03d}_BraTSPhantom"
    raw = work / "nnUNet_raw" / dataset_name
    timings.update(prepare_phantom_dataset(work, env, dataset_id=dataset_id, num_cases=num_cases, num_test=num_test,
                                           seed=seed, configuration=configuration, patch_size=patch_size,
                                           num_processes=num_processes))

    timings["train"] = run_step(
        f"training {trainer} ({epochs} epochs x {iterations_per_epoch} iterations)",
        [_console_script("nnUNetv2_train"), str(dataset_id), configuration, "0", "-tr", trainer, "-device", device],
        env)

    predictions = work / "predictions" / f"{trainer}__{configuration}"
    if predictions.exists():
        shutil.rmtree(predictions)
    command = [_console_script("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(predictions),
               "-d", str(dataset_id), "-c", configuration, "-f", "0", "-tr", trainer, "-device", device,
               "-npp", str(num_processes), "-nps", str(num_processes), "-step_size", str(step_size)]
    if not tta:
        command.append("--disable_tta")
    timings["predict"] = run_step("predicting the held-out phantoms", command, env)

    dataset_json = json.loads((raw / "dataset.json").read_text())
    result = region_dice(raw / "labelsTs", predictions, dataset_json, num_processes)
    print_dice_table(result, title=f"Dice on {num_test} held-out phantoms ({trainer}, {configuration}, fold 0)")
    if eval_cases > 0:
        start = time.perf_counter()
        evaluation = evaluate_demo_model(work, env, dataset_name, trainer, configuration, eval_cases, step_size, tta)
        timings["evaluate_missing"] = time.perf_counter() - start
        result["missing_modalities"] = str(evaluation)
    result["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    (work / "demo_result.json").write_text(json.dumps(result, indent=2))
    print(f"\nresults: {work / 'demo_result.json'}; preview of a phantom: {work / 'phantom_preview.png'}")
    return result


def evaluate_demo_model(work: Path, env: dict[str, str], dataset_name: str, trainer: str, configuration: str,
                        num_cases: int, step_size: float, tta: bool) -> Path:
    """``evaluate-missing`` on the first ``num_cases`` held-out phantoms; prints the table, returns the folder."""
    from nnunet_missingmod.evaluation import missing_combinations as evaluation

    print(f"\n=== all 15 modality combinations on {num_cases} held-out phantoms (evaluate-missing)", flush=True)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[key] = env[key]
    model = work / "nnUNet_results" / dataset_name / f"{trainer}__nnUNetPlans__{configuration}"
    cases = sorted((work / "nnUNet_raw" / dataset_name / "labelsTs").glob("*.nii.gz"))[:num_cases]
    out = evaluation.evaluate_missing(model, 0, split="test", output=work / "missing_modalities",
                                      tile_step_size=step_size, use_mirroring=tta,
                                      case_filter={c.name[: -len(".nii.gz")] for c in cases})
    summary = json.loads((out / "summary.json").read_text())
    print("\n" + evaluation.markdown_table(summary, "Dice"))
    print(f"heat map: {out / 'heatmap.png'}; per-case CSV, summary.json and table.md in {out}")
    return out


def print_dice_table(result: dict, title: str) -> None:
    regions = list(mods.REGIONS)
    print(f"\n{title}")
    print(f"{'case':<24}" + "".join(f"{r:>8}" for r in regions))
    for row in result["per_case"]:
        print(f"{row['case']:<24}" + "".join(f"{row[r]:8.3f}" for r in regions))
    print(f"{'mean':<24}" + "".join(f"{result['mean'][r]:8.3f}" for r in regions))
