"""Can D²-Net's modality encoder learn L_SFMC from the images? E_M trained alone on phantom patches.

    python scripts/bench_sfmc.py [--temperatures 0.07 0.2 0.5 1.0] [--steps 1500] [--out bench_work/sfmc]

For each temperature τ, and for a modality encoder shared by all modalities (the default of
``D2NetTrainer``) and one with separate weights per modality, E_M (the network's own
``ModalityCodeEncoder``, default widths) is trained alone with L_SFMC (spatial + frequency, eq. 1-5)
on random patches of phantoms, with the trainer's modality dropout (U-HVED subsets) drawn per sample.
It is then scored on patches of other phantoms:

* ``spatial/ref`` and ``frequency/ref``: each term divided by its value for codes that ignore the
  image (every code equal: ``log(1 + n)`` per anchor, :func:`uninformative_code_loss`), for the same
  patches and dropout draws; below 1 means the codes carry modality information;
* ``accuracy``: the modality of each held-out (slice) code by the nearest of the four mean codes of
  the training patches: whether the codes identify the modality from what the image shows;
* ``spread``: mean cosine distance of a modality's codes to their own mean; 0 means a constant code
  per modality, which a per-modality encoder can reach without reading the image.

Writes ``results.json``, ``table.md`` and ``curves.png`` (training L_SFMC over steps per τ) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_missingmod.data.phantom import PhantomConfig, generate_case
from nnunet_missingmod.losses.contrastive import sfmc_loss, slice_offsets, uninformative_code_loss
from nnunet_missingmod.networks.d2net import ModalityCodeEncoder
from nnunet_missingmod.transforms.modality_dropout import sample_kept_modalities


def normalised_volumes(num_cases: int, seed: int, spacing: float) -> list[np.ndarray]:
    """Phantoms as float32 (4, X, Y, Z), each modality z-scored inside the brain as nnU-Net does."""
    volumes = []
    for index in range(num_cases):
        images = generate_case(seed, index, PhantomConfig(spacing=spacing)).images.astype(np.float32)
        brain = images.sum(0) > 0
        for channel in images:
            values = channel[brain]
            channel[brain] = (values - values.mean()) / max(values.std(), 1e-8)
        volumes.append(images)
    return volumes


def random_patches(volumes: list[np.ndarray], batch: int, patch: tuple[int, int, int],
                   rng: np.random.Generator, complete: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of patches with the dropped modalities zeroed (none with ``complete``), and the (B, M) availability."""
    images, kept = [], []
    for _ in range(batch):
        volume = volumes[rng.integers(len(volumes))]
        start = [rng.integers(0, max(1, s - p) + 1) for s, p in zip(volume.shape[1:], patch, strict=True)]
        crop = volume[:, start[0]:start[0] + patch[0], start[1]:start[1] + patch[1], start[2]:start[2] + patch[2]]
        keep = np.ones(4, dtype=bool) if complete else sample_kept_modalities(4, rng=rng)
        images.append(crop * keep[:, None, None, None])
        kept.append(keep)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(kept))


def evaluate(encoder: ModalityCodeEncoder, centroids: torch.Tensor, volumes: list[np.ndarray], patch, temperature,
             rng: np.random.Generator, batches: int = 8) -> dict:
    spatial, frequency, reference, correct, total, spread = [], [], [], 0, 0, []
    distance, window = slice_offsets(patch[0])
    with torch.no_grad():
        for _ in range(batches):
            x, available = random_patches(volumes, 4, patch, rng)
            codes = encoder(x)  # (B, M, G, N)
            losses = sfmc_loss(codes, available, temperature=temperature)
            spatial.append(losses["spatial"].item())
            frequency.append(losses["frequency"].item())
            reference.append(uninformative_code_loss(available, patch[0], positive_distance=distance,
                                                     negative_window=window).item())
            unit = F.normalize(codes, dim=-1)
            similarity = torch.einsum("bmgn,kn->bmgk", unit, F.normalize(centroids, dim=-1))  # (B, M, G, M)
            guess = similarity.argmax(-1)
            truth = torch.arange(4)[None, :, None].expand_as(guess)
            mask = available[:, :, None].expand_as(guess)
            correct += int((guess == truth)[mask].sum())
            total += int(mask.sum())
            spread.append(float((1 - similarity.gather(-1, truth[..., None]).squeeze(-1))[mask].mean()))
    ref = float(np.mean(reference))
    return {"spatial": float(np.mean(spatial)), "frequency": float(np.mean(frequency)), "reference": ref,
            "spatial/ref": float(np.mean(spatial)) / ref, "frequency/ref": float(np.mean(frequency)) / ref,
            "accuracy": correct / max(total, 1), "spread": float(np.mean(spread))}


def train(shared: bool, temperature: float, train_volumes, test_volumes, patch, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    encoder = ModalityCodeEncoder(4, [8, 16], 8, shared=shared)
    optimiser = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    curve = []
    start = time.perf_counter()
    for _ in range(steps):
        x, available = random_patches(train_volumes, 2, patch, rng)
        loss = sfmc_loss(encoder(x), available, temperature=temperature)["total"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        curve.append(loss.item())
    with torch.no_grad():  # mean code per modality over random training patches (for the accuracy)
        codes = torch.cat([encoder(random_patches(train_volumes, 4, patch, rng, complete=True)[0]) for _ in range(4)])
        centroids = F.normalize(codes, dim=-1).mean((0, 2))  # (M, N)
    scores = evaluate(encoder, centroids, test_volumes, patch, temperature, np.random.default_rng(seed + 1))
    return {"shared": shared, "temperature": temperature, "steps": steps, "seconds": time.perf_counter() - start,
            "curve": curve, **scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.07, 0.2, 0.5, 1.0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 48, 48])
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--cases", type=int, nargs=2, default=[8, 4], metavar=("TRAIN", "TEST"))
    parser.add_argument("--encoders", nargs="+", default=["shared", "per-modality"],
                        choices=["shared", "per-modality"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_work/sfmc")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    volumes = normalised_volumes(sum(args.cases), args.seed, args.spacing)
    train_volumes, test_volumes = volumes[:args.cases[0]], volumes[args.cases[0]:]
    patch = tuple(min(p, s) for p, s in zip(args.patch, volumes[0].shape[1:], strict=True))
    results = []
    for shared in (encoder == "shared" for encoder in args.encoders):
        for temperature in args.temperatures:
            result = train(shared, temperature, train_volumes, test_volumes, patch, args.steps, args.seed)
            results.append(result)
            (out / "results.json").write_text(json.dumps({"args": vars(args), "patch": patch, "results": results},
                                                         indent=1))  # after every run: an interrupted bench keeps them
            print(f"E_M {'shared' if shared else 'per-modality'} τ={temperature}: spatial/ref "
                  f"{result['spatial/ref']:.3f} frequency/ref {result['frequency/ref']:.3f} accuracy "
                  f"{result['accuracy']:.3f} spread {result['spread']:.3f} ({result['seconds']:.0f} s)", flush=True)
    lines = ["| E_M | τ | spatial / uninformative | frequency / uninformative | modality accuracy | spread |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {'shared' if r['shared'] else 'per modality'} | {r['temperature']} | {r['spatial/ref']:.3f} "
                     f"| {r['frequency/ref']:.3f} | {r['accuracy']:.3f} | {r['spread']:.3f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    encoders = [encoder == "shared" for encoder in args.encoders]
    fig, axes = plt.subplots(1, len(encoders), figsize=(6 * len(encoders), 4.5), sharey=True, squeeze=False)
    for axis, shared in zip(axes[0], encoders, strict=True):
        for r in (r for r in results if r["shared"] == shared):
            curve = np.convolve(r["curve"], np.ones(10) / 10, mode="valid")
            axis.plot(curve / (2 * r["reference"]), label=f"τ = {r['temperature']}")
        axis.axhline(1.0, color="grey", linestyle="--", label="codes that ignore the image")
        axis.set(title=f"E_M {'shared by all modalities' if shared else 'per modality'}", xlabel="step",
                 ylabel="(spatial + frequency) / (2 × uninformative value)")
        axis.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    print(f"wrote {out}/results.json, table.md, curves.png")


if __name__ == "__main__":
    main()
