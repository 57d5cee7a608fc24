"""How good can a synthesised sequence be on the phantoms? The noise-free oracles against histogram matching.

    python scripts/synthesis_ceiling.py --dataset bench_conv/nnUNet_raw/Dataset991_BraTSPhantom -o OUT \
        [--cases 10] [--evaluation LABEL EVALUATE_SYNTHESIS_FOLDER ...]

A phantom dataset of this package (``make-phantoms``, or a benchmark's work folder) records the seed and the generator
settings of its cases (``phantom_cases.json``), so every held-out case (``imagesTs``, the first ``--cases`` in name
order, as ``evaluate-synthesis --num-cases`` takes them) can be generated again without parts of the image model. Each
regenerated case is first checked to be bit-identical to its files (a case that differs is refused by name). Then, with
``evaluate-synthesis``'s metrics (``nnunet_missingmod.evaluation.synthesis.image_metrics``: SSIM and PSNR over the
brain, in the whole-tumour box, BraSyn's tumour / non-tumour SSIM), every real sequence is scored against:

* ``noise_free``: the same sequence without its Rician noise (everything else identical, its bias field included);
* ``noise_and_bias_free``: the same sequence without noise and without its bias field. The generator draws a
  smooth multiplicative bias field per sequence, independently of the others, so no synthesis from another
  sequence can know the target's own field: this oracle, which knows everything else (the tissue contrasts, the
  texture, the tumour, the enhancement), is the ceiling to read the synthesis figures against (it is not a strict
  upper bound: SSIM does not single out one best guess of an unknown field);
* ``histogram_matching``: every other sequence of the case, histogram-matched to the other cases' pooled brain
  z-scores of the target, as ``evaluate-synthesis``'s baseline (same seeded samples, same pool).

``--evaluation LABEL FOLDER`` (repeatable) adds the synthesis of an ``evaluate-synthesis`` output folder
(``summary.json``, on the same dataset's held-out cases) per pair. Outputs in ``OUT``: ``ceiling.json``, ``ceiling.md``
(per pair: brain SSIM and the other metrics; per target: both oracles) and ``ceiling.png`` (brain SSIM per pair,
the oracles as lines).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.data.phantom import PhantomConfig, case_identifier, generate_case
from nnunet_missingmod.evaluation.synthesis import (
    METRICS,
    _brain_sample,
    _finite_mean,
    _matching_baseline,
    _reference_values,
    image_metrics,
)

ORACLES = {"noise_free": {"noise": 0.0}, "noise_and_bias_free": {"noise": 0.0, "bias": 0.0}}
ORACLE_LABELS = {"noise_free": "target without its noise", "noise_and_bias_free": "target without noise and bias"}


def phantom_settings(dataset: Path) -> tuple[int, PhantomConfig]:
    """(seed, generator settings) recorded in ``dataset/phantom_cases.json``."""
    file = dataset / "phantom_cases.json"
    if not file.is_file():
        raise SystemExit(f"{file} does not exist: {dataset} is not a phantom dataset written by this package "
                         f"(the oracles need the generator's seed and settings)")
    record = json.loads(file.read_text())
    fields = {f.name for f in dataclasses.fields(PhantomConfig)}
    settings = record.get("config", {})
    if "seed" not in record or set(settings) != fields:
        raise SystemExit(f"{file}: expected a seed and the generator settings {sorted(fields)}, got "
                         f"{sorted(record)} / {sorted(settings)}")
    return int(record["seed"]), PhantomConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                 for k, v in settings.items()})


def held_out_cases(dataset: Path, count: int) -> list[str]:
    labels = sorted((dataset / "labelsTs").glob("*.nii.gz"))
    if not labels:
        raise SystemExit(f"{dataset / 'labelsTs'} has no held-out cases (*.nii.gz)")
    return [p.name[:-len(".nii.gz")] for p in labels][:count]


def read_case(dataset: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (C, z, y, x), label (z, y, x)) with nnU-Net's SimpleITK reader, one file at a time as
    ``evaluate-synthesis`` reads them."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    reader, channels = SimpleITKIO(), []
    for channel in range(mods.NUM_MODALITIES):
        file = dataset / "imagesTs" / f"{case}_{channel:04d}.nii.gz"
        if not file.is_file():
            raise SystemExit(f"{file} does not exist: the oracles need all {mods.NUM_MODALITIES} sequences of {case}")
        channels.append(reader.read_images([str(file)])[0][0])
    label_file = dataset / "labelsTs" / f"{case}.nii.gz"
    if not label_file.is_file():
        raise SystemExit(f"{label_file} does not exist: the tumour metrics need the labels of {case}")
    label = reader.read_seg(str(label_file))[0][0]
    return np.stack(channels).astype(np.float32), label


def regenerate(seed: int, config: PhantomConfig, case: str, **changes) -> np.ndarray:
    """The case's images (C, z, y, x) from the generator, with ``changes`` to its settings."""
    number = case.rsplit("_", 1)[-1]
    if not number.isdigit() or case_identifier(int(number)) != case:
        raise SystemExit(f"{case}: not a case name the phantom generator writes (e.g. {case_identifier(0)}), so its "
                         f"seed index is unknown")
    images = generate_case(seed, int(number), dataclasses.replace(config, **changes)).images
    return images.transpose(0, 3, 2, 1).astype(np.float32)  # the generator's (x, y, z) -> SimpleITK's (z, y, x)


def score_cases(dataset: Path, cases: Sequence[str], progress: bool = True) -> list[dict]:
    """One row per case, method, source and target (``source`` is the target itself for the oracles)."""
    seed, config = phantom_settings(dataset)
    rng = np.random.default_rng(0)  # evaluate-synthesis's seeded histogram samples, in the same order
    read, samples = {}, {}
    for case in tqdm(cases, desc="reading and checking", unit="case", disable=not progress):
        image, label = read_case(dataset, case)
        if not np.array_equal(regenerate(seed, config, case), image):
            raise SystemExit(f"{case} ({dataset / 'imagesTs'}) differs from the phantom generated with the seed and "
                             f"settings of {dataset / 'phantom_cases.json'}: modified after generation?")
        brain = np.any(image != 0, axis=0)
        read[case] = (image, brain, np.isin(label, mods.REGIONS["WT"]))
        samples[case] = {c: _brain_sample(image[c], brain, rng) for c in range(mods.NUM_MODALITIES)}
    rows = []
    for case in tqdm(cases, desc="scoring", unit="case", disable=not progress):
        image, brain, tumour = read[case]
        oracles = {name: regenerate(seed, config, case, **changes) for name, changes in ORACLES.items()}
        for target in range(mods.NUM_MODALITIES):
            real = image[target]
            base = {"case": case, "target": mods.MODALITIES[target]}
            for name, oracle in oracles.items():
                rows.append({**base, "source": mods.MODALITIES[target], "method": name,
                             **image_metrics(real, oracle[target], brain, tumour)})
            reference = _reference_values(samples, case, target, real[brain])
            for source in range(mods.NUM_MODALITIES):
                if source != target:
                    matched = _matching_baseline(image[source], brain, reference)
                    rows.append({**base, "source": mods.MODALITIES[source], "method": "histogram_matching",
                                 **image_metrics(real, matched, brain, tumour)})
    return rows


def _mean(values: Sequence[float]) -> float | None:
    """Mean without NaN, as evaluate-synthesis's summary averages."""
    return _finite_mean(values)[0]


def summarise(rows: Sequence[dict], evaluations: dict[str, dict]) -> dict:
    """Per target: both oracles; per pair ``source->target``: histogram matching and each evaluation's synthesis."""
    summary: dict = {"per_target": {}, "per_pair": {}}
    for target in mods.MODALITIES:
        summary["per_target"][target] = {
            name: {m: _mean([r[m] for r in rows if r["method"] == name and r["target"] == target]) for m in METRICS}
            for name in ORACLES}
        for source in mods.MODALITIES:
            if source == target:
                continue
            pair = f"{source}->{target}"
            cell = {"histogram_matching": {m: _mean([r[m] for r in rows if r["method"] == "histogram_matching"
                                                     and r["source"] == source and r["target"] == target])
                                           for m in METRICS}}
            for label, evaluation in evaluations.items():
                synthesis = evaluation["per_pair"].get(pair, {}).get("synthesis")
                cell[label] = {m: synthesis.get(m) for m in METRICS} if synthesis else None
            summary["per_pair"][pair] = cell
    summary["num_cases"] = len({r["case"] for r in rows})
    return summary


def read_evaluation(label: str, folder: str, num_cases: int) -> dict:
    file = Path(folder) / "summary.json"
    if not file.is_file():
        raise SystemExit(f"--evaluation {label}: {file} does not exist (an evaluate-synthesis output folder)")
    summary = json.loads(file.read_text())
    if summary.get("num_cases") != num_cases or "per_pair" not in summary:
        raise SystemExit(f"--evaluation {label}: {file} scored {summary.get('num_cases')} case(s), the oracles "
                         f"{num_cases}: evaluate the same held-out cases (--num-cases)")
    return summary


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(summary: dict, labels: Sequence[str]) -> str:
    lines = [f"# Noise-free oracles against histogram matching ({summary['num_cases']} held-out phantoms)", "",
             "Per target sequence, the real image scored against itself without its noise, and without noise and "
             "without its bias field (the ceiling for a synthesis, which cannot know the target's own bias field):", "",
             "| target | metric | " + " | ".join(ORACLE_LABELS.values()) + " |", "|---|---|---|---|"]
    for target, oracles in summary["per_target"].items():
        for metric in ("ssim_brain", "ssim_wt_bbox", "brasyn_ssim_tumour", "brasyn_ssim_non_tumour"):
            lines.append(f"| {target} | {metric} | " + " | ".join(_cell(oracles[n][metric]) for n in ORACLES) + " |")
    methods = ["histogram_matching", *labels]
    lines += ["", "Brain SSIM per pair; the last column is the ceiling of the target (noise and bias free):", "",
              "| pair | " + " | ".join(methods) + " | ceiling |", "|---|" + "---|" * (len(methods) + 1)]
    for pair, cell in summary["per_pair"].items():
        ceiling = summary["per_target"][pair.split("->")[1]]["noise_and_bias_free"]["ssim_brain"]
        lines.append(f"| {pair} | " + " | ".join(_cell((cell.get(m) or {}).get("ssim_brain")) for m in methods)
                     + f" | {_cell(ceiling)} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, labels: Sequence[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(summary["per_pair"])
    methods = ["histogram_matching", *labels]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(pairs)) + 3, 4.5))
    for i, method in enumerate(methods):
        values = [(summary["per_pair"][p].get(method) or {}).get("ssim_brain") for p in pairs]
        ax.bar(np.arange(len(pairs)) + (i - (len(methods) - 1) / 2) * width,
               [np.nan if v is None else v for v in values], width, label=method.replace("_", " "))
    for name, style in (("noise_and_bias_free", "-"), ("noise_free", ":")):
        for j, pair in enumerate(pairs):
            value = summary["per_target"][pair.split("->")[1]][name]["ssim_brain"]
            ax.hlines(value, j - 0.45, j + 0.45, colors="black", linestyles=style,
                      label=ORACLE_LABELS[name] if j == 0 else None)
    ax.set_xticks(np.arange(len(pairs)), [p.replace("->", " → ") for p in pairs], rotation=45, ha="right")
    ax.set_ylabel("SSIM over the brain")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.0)
    ax.set_title(f"Synthesis against the noise-free oracles ({summary['num_cases']} held-out phantoms)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a phantom raw dataset folder (with phantom_cases.json)")
    parser.add_argument("-o", "--output", required=True, help="folder for ceiling.json, ceiling.md, ceiling.png")
    parser.add_argument("--cases", type=int, default=10, help="the first N held-out cases (default 10)")
    parser.add_argument("--evaluation", nargs=2, action="append", default=[], metavar=("LABEL", "FOLDER"),
                        help="an evaluate-synthesis output folder to show beside the oracles (repeatable)")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error(f"--cases must be at least 1, got {args.cases}")
    labels = [label for label, _ in args.evaluation]
    if len(set(labels)) != len(labels) or {"histogram_matching", *ORACLES} & set(labels):
        parser.error(f"--evaluation labels must be unique and not a method's name, got {labels}")
    dataset = Path(args.dataset)
    cases = held_out_cases(dataset, args.cases)
    evaluations = {label: read_evaluation(label, folder, len(cases)) for label, folder in args.evaluation}
    rows = score_cases(dataset, cases)
    summary = summarise(rows, evaluations)
    summary.update(dataset=str(dataset.resolve()), cases=cases,
                   evaluations={label: folder for label, folder in args.evaluation})
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceiling.json").write_text(json.dumps(summary, indent=2))
    (out / "ceiling.md").write_text(markdown(summary, labels))
    plot(summary, labels, out / "ceiling.png")
    print(f"written: {out / 'ceiling.md'}, {out / 'ceiling.png'}")


if __name__ == "__main__":
    sys.exit(main())
