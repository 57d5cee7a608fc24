"""Median time and peak memory of a training iteration per trainer, as ratios to plain nnUNetTrainer.

    python scripts/bench_train_step.py [--work-dir bench_work] [--trainers nnUNetTrainer ModalityDropoutTrainer
        SharedLatentTrainer D2NetTrainer CMFTPretrainer CMFFTrainer] [--steps 15] [--rounds 5] [--processes 1]
        [--no-rerun] [--device cpu] [--plot-only]

Same plans (3d_cpu on the phantoms) and the same batch for every trainer: one batch is drawn once
from nnU-Net's data loader and saved, then each trainer runs in a fresh process, builds its network,
loss and optimiser (``initialize``), runs 3 warm-up steps and times ``train_step`` on that batch.
Also timed: the training augmentation pipeline per sample (ModalityDropoutTrainer's dropout is a
transform, so its cost is there). Peak memory: the process's maximum RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA.

Interleaved rounds: timing trainers one after another lets drift of the machine (other jobs, clock
speed) land in the ratios. Each of ``--rounds`` rounds measures every trainer once (in an order rotated
by one per round, so no trainer is always first), and every ratio is taken within its round; the table
reports the median of the per-round ratios and their range (min-max). ModalityDropoutTrainer is always
measured: its network and ``train_step`` are nnUNetTrainer's, so its step and inference ratios check
the method (1.00 should lie within their range).

Spread between processes: one trainer's step time varies from one fresh process to the next (±10-20% on
a 2-core machine, with identical weights and batch), which no number of rounds removes from a single
ratio. Two things measure and reduce it. Every round also times a second, independent process of the
baseline, ``nnUNetTrainer (rerun)``: its ratios to the baseline are what two processes of one trainer
differ by, the yardstick for every other ratio (``--no-rerun`` drops it); it is timed half a round away
from the baseline, so that it also sees the drift within a round. Which of the two is called the
rerun is arbitrary, so its band is symmetric (its range and the reciprocals: a rerun range of 0.77-1.11
gives 0.77-1.30), and the check asks whether the identical network's median ratio lies within that band (a
loose check: a median against the range of single rounds).
``--processes N`` times every trainer
in N processes per round (the round's trainers in turn, N times) and takes the median over them before
the ratios are formed.

Writes ``bench_train_step.json`` (every round's values) and ``bench_train_step.png`` (the per-round ratios of
each trainer with their median, 1.00 and the rerun's band) in the work folder; ``--plot-only`` redraws the
picture from the JSON.

GAN trainers (CMFTPretrainer): a step is one discriminator and one generator update, and "inference" is
the forward pass of ``build_network_architecture`` (both translations, no cycle). CMFFTrainer is timed
from its random initialisation (the benchmark never calls ``on_train_start``, where the CMFT weights are
loaded); the weights do not change the cost.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import CONFIGURATION, DATASET_ID, prepare, run_worker  # noqa: E402


def _trainer(name: str, device: str):
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(DATASET_ID), CONFIGURATION, 0, name, device=torch.device(device))
    trainer.initialize()
    return trainer


def make_batch(path: Path, device: str) -> None:
    import torch

    trainer = _trainer("nnUNetTrainer", device)
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    batch = next(trainer.dataloader_train)
    torch.save({"data": batch["data"], "target": batch["target"]}, path)


def forward_seconds(network, data, steps: int, device: str, warmup: int = 2) -> float:
    """Median seconds of ``steps`` forward passes of ``network`` on ``data`` (no gradient), after ``warmup``."""
    import torch

    times = []
    with torch.no_grad():
        for step in range(warmup + steps):
            start = time.perf_counter()
            network(data)
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_inference(trainer, data, steps: int, device: str) -> float:
    """Median time of one forward pass of the inference network (as nnUNetv2_predict builds it) on ``data``."""
    network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                 trainer.num_input_channels,
                                                 trainer.label_manager.num_segmentation_heads, False)
    network.load_state_dict(trainer.network.state_dict())
    network.to(trainer.device).eval()
    return forward_seconds(network, data.to(trainer.device), steps, device)


def measure(name: str, batch_file: Path, steps: int, device: str) -> dict:
    import numpy as np
    import torch

    trainer = _trainer(name, device)
    batch = torch.load(batch_file, weights_only=False)
    trainer.network.train()
    for _ in range(3):
        trainer.train_step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    inference_s = time_inference(trainer, batch["data"], steps, device)
    configured = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    rotation, dummy_2d, initial_patch, mirror_axes = configured
    transforms = trainer.get_training_transforms(
        trainer.configuration_manager.patch_size, rotation, trainer._get_deep_supervision_scales(), mirror_axes,
        dummy_2d, use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm,
        regions=trainer.label_manager.foreground_regions)
    np.random.seed(0)
    augment = []
    for _ in range(200):  # the pipeline's transforms fire at random: average many samples
        image = torch.randn(4, *initial_patch)
        seg = torch.randint(0, 4, (1, *initial_patch)).to(torch.int16)
        start = time.perf_counter()
        transforms(image=image, segmentation=seg)
        augment.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "peak_mb": peak_mb, "augment_s": statistics.mean(augment),
            "inference_s": inference_s,
            "parameters": sum(p.numel() for p in trainer.network.parameters())}


BASELINE = "nnUNetTrainer"
#: A second, independent process of the baseline in every round: the spread between two processes of one trainer.
RERUN = f"{BASELINE} (rerun)"
#: Same network and train_step as the baseline: its ratios should be 1.00 within their spread.
IDENTICAL_NETWORK = "ModalityDropoutTrainer"
RATIO_KEYS = ("step_s", "inference_s", "peak_mb", "augment_s")


def worker_trainer(name: str) -> str:
    """The trainer class a measured name runs (the rerun is the baseline's class)."""
    return BASELINE if name == RERUN else name


def measured_trainers(requested: list[str], rerun: bool = True) -> list[str]:
    """The names a round measures: the baseline, the identical network, the requested trainers and, half a round
    away from the baseline (so that it also sees the drift within a round), the baseline's rerun."""
    trainers = list(dict.fromkeys([BASELINE, IDENTICAL_NETWORK, *requested]))
    if rerun:
        trainers.insert(max(1, (len(trainers) + 1) // 2), RERUN)
    return trainers


def median_over_processes(results: list[dict]) -> dict:
    """One trainer's measurements in several processes of a round, as one: the median of each timed value."""
    if not results:
        raise ValueError("no measurement to combine")
    combined = dict(results[0])
    for key in RATIO_KEYS:
        combined[key] = float(statistics.median(r[key] for r in results))
    if len(results) > 1:
        combined["processes"] = [{key: r[key] for key in RATIO_KEYS} for r in results]
    return combined


def round_order(trainers: list[str], round_index: int) -> list[str]:
    """The trainers of one round, rotated by ``round_index`` so that each position is taken in turn."""
    shift = round_index % len(trainers)
    return trainers[shift:] + trainers[:shift]


def ratio_statistics(rounds: list[dict[str, dict]], base: str = BASELINE,
                     keys: tuple[str, ...] = RATIO_KEYS) -> dict[str, dict[str, dict]]:
    """Per trainer and measure: the per-round ratios to ``base`` and their median, min, max and quartiles.

    Args:
        rounds: one ``{trainer: measure result}`` per round; every round must hold ``base``.
    """
    result = {}
    for name in rounds[0]:
        result[name] = {}
        for key in keys:
            ratios = [r[name][key] / r[base][key] for r in rounds]
            q1, q3 = (float(q) for q in np.percentile(ratios, [25, 75]))
            result[name][key] = {"median": float(statistics.median(ratios)), "min": float(min(ratios)),
                                      "max": float(max(ratios)), "q1": q1, "q3": q3, "values": ratios}
    return result


def within_spread(stats: dict, value: float = 1.0) -> bool:
    """Whether ``value`` lies in the min-max range of per-round ratios."""
    return stats["min"] <= value <= stats["max"]


def rerun_band(rerun: dict) -> tuple[float, float]:
    """What two processes of one trainer can differ by: the rerun's min-max range made symmetric (which of the
    baseline's two processes is the rerun is arbitrary, so a ratio r and 1/r are the same difference)."""
    return min(rerun["min"], 1 / rerun["max"]), max(rerun["max"], 1 / rerun["min"])


def rerun_check(identical: dict, rerun: dict) -> bool:
    """Whether the identical network's median ratio lies within :func:`rerun_band` of the baseline's rerun."""
    low, high = rerun_band(rerun)
    return low <= identical["median"] <= high


def plot_ratios(trainers: dict[str, dict], path: Path) -> None:
    """Per-round step and inference ratios of each trainer (dots), their median (bar), 1.00 (dashed) and, where the
    run has a rerun of the baseline, its band (shaded), as a PNG; ``trainers`` is the JSON's ``trainers``."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    names = [name for name in trainers if name != BASELINE]
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 2.6 * len(names)), 4.5), sharey=True)
    for axis, key, title in zip(axes, ("step_s", "inference_s"), ("training step", "inference"), strict=True):
        if RERUN in trainers:
            low, high = rerun_band(trainers[RERUN]["ratios"][key])
            axis.axhspan(low, high, color="tab:blue", alpha=0.12, label=f"rerun's band {low:.2f}-{high:.2f}")
        axis.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        for x, name in enumerate(names):
            stats = trainers[name]["ratios"][key]
            values = stats["values"]
            axis.scatter(x + rng.uniform(-0.12, 0.12, len(values)), values, s=18, color="tab:orange", zorder=3)
            axis.plot([x - 0.25, x + 0.25], [stats["median"]] * 2, color="black", linewidth=2, zorder=4)
        axis.set_xticks(range(len(names)), [name.replace("Trainer", "") for name in names], rotation=20)
        axis.set(title=f"{title} ÷ {BASELINE}")
        if RERUN in trainers:
            axis.legend(loc="upper left")
    top = max(max(trainers[n]["ratios"][k]["max"] for n in names) for k in ("step_s", "inference_s"))
    if RERUN in trainers:
        top = max(top, *(rerun_band(trainers[RERUN]["ratios"][k])[1] for k in ("step_s", "inference_s")))
    axes[0].set_ylim(0, max(1.5, 1.1 * top))
    axes[0].set_ylabel("time ratio (dots: rounds; bar: median)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ratio_cell(stats: dict) -> str:
    return f"{stats['median']:.2f} ({stats['min']:.2f}-{stats['max']:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="bench_work")
    parser.add_argument("--trainers", nargs="+", default=["nnUNetTrainer", "ModalityDropoutTrainer",
                                                          "SharedLatentTrainer", "D2NetTrainer", "CMFTPretrainer",
                                                          "CMFFTrainer"])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every trainer (default: 5)")
    parser.add_argument("--processes", type=int, default=1,
                        help="fresh processes per trainer and round, their median taken (default: 1)")
    parser.add_argument("--no-rerun", action="store_true",
                        help=f"do not time a second process of {BASELINE} in each round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--make-batch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw bench_train_step.png from the work folder's bench_train_step.json only")
    args = parser.parse_args()
    work = Path(args.work_dir).resolve()
    if args.plot_only:
        results = work / "bench_train_step.json"
        if not results.is_file():
            raise SystemExit(f"{results} does not exist: run the benchmark first")
        trainers = json.loads(results.read_text()).get("trainers")
        if trainers is None:
            raise SystemExit(f"{results} was written by an older version of this script (no rerun): run it again")
        plot_ratios(trainers, work / "bench_train_step.png")
        print(f"wrote {work / 'bench_train_step.png'}")
        return
    env = prepare(work)
    batch_file = work / "bench_batch.pt"
    if args.make_batch:
        make_batch(batch_file, args.device)
        print(json.dumps({"batch": str(batch_file)}))
        return
    if args.worker:
        print(json.dumps(measure(args.worker, batch_file, args.steps, args.device)))
        return
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if args.processes < 1:
        raise SystemExit("--processes must be at least 1")
    if RERUN in args.trainers:
        raise SystemExit(f"{RERUN!r} is added by the script (drop it with --no-rerun), not a trainer to name")
    controls = [] if args.no_rerun else [RERUN]
    trainers = measured_trainers(args.trainers, rerun=bool(controls))
    added = [name for name in trainers if name not in args.trainers]
    if added:
        print(f"also measuring {', '.join(added)} ({BASELINE}: the reference; {IDENTICAL_NETWORK}: the 1.00 check"
              + (f"; {RERUN}: a second process of the reference, the spread between processes)" if controls
                 else ")"))
    if not batch_file.is_file():
        run_worker(__file__, ["--make-batch", "--work-dir", str(work), "--device", args.device], env)
    rounds = []
    for round_index in range(args.rounds):
        results: dict[str, list[dict]] = {name: [] for name in trainers}
        for process in range(args.processes):
            for name in round_order(trainers, round_index + process):
                of = f", process {process + 1}/{args.processes}" if args.processes > 1 else ""
                print(f"round {round_index + 1}/{args.rounds}{of}: measuring {name} ...", flush=True)
                results[name].append(run_worker(__file__, ["--worker", worker_trainer(name), "--work-dir", str(work),
                                                           "--steps", str(args.steps), "--device", args.device],
                                                env))
        rounds.append({name: median_over_processes(results[name]) for name in trainers})
    ratios = ratio_statistics(rounds)
    summary = {name: {**{key: float(statistics.median(r[name][key] for r in rounds)) for key in RATIO_KEYS},
                      "parameters": rounds[0][name]["parameters"], "ratios": ratios[name],
                      "rounds": [r[name] for r in rounds]} for name in trainers}
    per_round = f", median of {args.processes} processes per trainer and round" if args.processes > 1 else ""
    print(f"\n{CONFIGURATION} on {args.device}, {args.rounds} interleaved rounds x {args.steps} timed steps "
          f"(median){per_round}, same batch for every trainer; augment: mean over 200 samples of the training "
          f"transforms; values: median over rounds; ratios: median of the per-round ratios (min-max)")
    print(f"{'trainer':<28}{'step s':>9}{'ratio':>19}{'infer s':>9}{'ratio':>19}{'peak MB':>10}{'ratio':>19}"
          f"{'augment ms':>12}{'ratio':>19}{'params':>10}")
    for name, r in summary.items():
        q = r["ratios"]
        print(f"{name:<28}{r['step_s']:9.3f}{_ratio_cell(q['step_s']):>19}{r['inference_s']:9.3f}"
              f"{_ratio_cell(q['inference_s']):>19}{r['peak_mb']:10.0f}{_ratio_cell(q['peak_mb']):>19}"
              f"{1000 * r['augment_s']:12.1f}{_ratio_cell(q['augment_s']):>19}{r['parameters']:10d}")
    check = ratios[IDENTICAL_NETWORK]
    for key in ("step_s", "inference_s"):
        verdict = "within" if within_spread(check[key]) else "OUTSIDE"
        stats = check[key]
        print(f"check: {IDENTICAL_NETWORK} {key} ratio {stats['median']:.3f} (range {stats['min']:.3f}-"
              f"{stats['max']:.3f}): 1.00 is {verdict} the range")
        if controls:
            rerun = ratios[RERUN][key]
            low, high = rerun_band(rerun)
            verdict = "within" if rerun_check(stats, rerun) else "OUTSIDE"
            print(f"check: {IDENTICAL_NETWORK} {key} median ratio {stats['median']:.3f} is {verdict} the band of "
                  f"{RERUN}, {low:.3f}-{high:.3f} (its range {rerun['min']:.3f}-{rerun['max']:.3f} and the "
                  f"reciprocals)")
    (work / "bench_train_step.json").write_text(json.dumps({"rounds": args.rounds, "processes": args.processes,
                                                            "steps": args.steps, "trainers": summary}, indent=2))
    plot_ratios(summary, work / "bench_train_step.png")
    print(f"wrote {work / 'bench_train_step.json'} and bench_train_step.png")


if __name__ == "__main__":
    main()
