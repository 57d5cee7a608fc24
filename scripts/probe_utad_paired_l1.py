"""How far a paired L1 alone takes UTAD-Net's generator: the reference for ``utad.lambda_paired``.

    python scripts/probe_utad_paired_l1.py --preprocessed bench_conv/nnUNet_preprocessed/Dataset991_BraTSPhantom \
        --model MODEL_FOLDER [--steps 600] [--lr 1e-3] [--batch-size 8] [--seed 0] [--source-skip] [--eval-every N]

The teacher's generator, built from the plans of a UTAD-Net model folder (``MODEL_FOLDER``, e.g. a teacher's
``UTADNetTeacherTrainer__nnUNetPlans__2d_cpu``; only its ``plans.json`` is read, its weights are not), is trained from
scratch on nothing but ``E|G(I_source, T_source, t) - I_target|`` with the target slice of the SAME case (no critic, no
cycle): random (source, target) pairs of random slices of fold 0's training cases (``splits_final.json``), cropped or
zero-padded to the configuration's patch. Then every slice of fold 0's validation cases is translated for every pair
and scored like the trainers' final validation (``ssim_brain``: the SSIM map over nnU-Net's brain mask, both slices
scaled by their own 0.5-99.5 percentiles). ``--source-skip`` builds the generator with
``utad.generator.source_skip`` (each decoder's output added to its branch's input). Printed: the loss every 100 steps
and the 4 x 4 matrix [source][target]; ``--eval-every N`` also scores the validation cases every N steps (the
12-pair average and T1 <-> T1ce), a learning curve of the paired L1 at this budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import blosc2
import numpy as np
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from tqdm import tqdm

from nnunet_missingmod.trainers.utad import UTADNetTeacherTrainer, brain_ssim, pad_to_stride

CONFIGURATION = "2d_cpu"


def load_case(folder: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(image (M, Z, X, Y), segmentation (1, Z, X, Y)) of one case of nnU-Net's 2d preprocessing."""
    return (np.asarray(blosc2.open(str(folder / f"{key}.b2nd"))[:]),
            np.asarray(blosc2.open(str(folder / f"{key}_seg.b2nd"))[:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preprocessed", required=True, help="nnUNet_preprocessed/<dataset> folder (2d done)")
    parser.add_argument("--model", required=True, help="a UTAD-Net model folder (its plans.json builds the generator)")
    parser.add_argument("--configuration", default=CONFIGURATION)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source-skip", action="store_true", help="the generator with utad.generator.source_skip")
    parser.add_argument("--eval-every", type=int, default=0, help="score the validation cases every N steps too")
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 1 or not args.lr > 0 or args.eval_every < 0:
        parser.error("--steps and --batch-size must be >= 1, --lr > 0 and --eval-every >= 0")
    plans_file, splits_file = Path(args.model) / "plans.json", Path(args.preprocessed) / "splits_final.json"
    for file in (plans_file, splits_file):
        if not file.is_file():
            raise SystemExit(f"{file} does not exist")
    plans = PlansManager(json.loads(plans_file.read_text()))
    configuration = plans.get_configuration(args.configuration)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    network = UTADNetTeacherTrainer.build_network_architecture(plans, configuration, 4, 1)
    network.source_skip.fill_(args.source_skip)
    folder = Path(args.preprocessed) / "nnUNetPlans_2d"
    split = json.loads(splits_file.read_text())[0]
    train = [load_case(folder, key) for key in split["train"]]
    validation = [load_case(folder, key) for key in split["val"]]
    modalities = train[0][0].shape[0]
    patch = tuple(configuration.patch_size)

    def crop(image: np.ndarray) -> np.ndarray:
        image = image[: patch[0], : patch[1]]
        return np.pad(image, [(0, p - n) for p, n in zip(patch, image.shape, strict=True)])

    def batch() -> tuple[torch.Tensor, ...]:
        sources, masks, targets, reals = [], [], [], []
        for _ in range(args.batch_size):
            image, seg = train[rng.integers(len(train))]
            z = rng.integers(image.shape[1])
            s, t = rng.choice(modalities, 2, replace=False)
            sources.append(crop(image[s, z]))
            reals.append(crop(image[t, z]))
            masks.append(crop((seg[0, z] > 0).astype(np.float32)))
            targets.append(t)
        tensor = lambda slices: torch.tensor(np.stack(slices)[:, None], dtype=torch.float32)  # noqa: E731
        return tensor(sources), tensor(masks), torch.tensor(targets), tensor(reals)

    def score() -> np.ndarray:
        """[source][target] SSIM over the brain on the validation cases."""
        network.eval()
        totals = np.zeros((2, modalities, modalities))
        with torch.no_grad():
            for image, seg in tqdm(validation, desc="validation cases", leave=False):
                brain, tumour = seg[0] >= 0, (seg[0] > 0)[:, None].astype(np.float32)
                for s in range(modalities):
                    source = pad_to_stride(torch.tensor(image[s][:, None], dtype=torch.float32), network.total_stride)
                    mask = pad_to_stride(torch.from_numpy(tumour), network.total_stride)
                    for t in range(modalities):
                        if s == t:
                            continue
                        code = torch.full((source.shape[0],), t)
                        out = network(source, source * mask, code).whole[:, 0, : image.shape[2], : image.shape[3]]
                        out = out.numpy()
                        for z in range(image.shape[1]):
                            totals[:, s, t] += brain_ssim(out[z], image[t, z], brain[z])
        network.train()
        return totals[0] / np.maximum(totals[1], 1)

    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr)
    for step in tqdm(range(args.steps), desc="paired L1 steps"):
        source, mask, target, real = batch()
        loss = (network(source, source * mask, target).whole - real).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            tqdm.write(f"step {step}: L1 {loss.item():.3f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            ssim = score()
            tqdm.write(f"step {step + 1}: 12-pair average {ssim[~np.eye(modalities, dtype=bool)].mean():.3f}, "
                       f"T1 -> T1ce {ssim[0, 1]:.3f}, T1ce -> T1 {ssim[1, 0]:.3f}")
    ssim = score()
    print("SSIM over the brain, [source][target]:")
    for s in range(modalities):
        print(f"  {s}: " + " ".join(f"{ssim[s, t]:+.3f}" if s != t else "   -  " for t in range(modalities)))
    print(f"average of the {modalities * (modalities - 1)} pairs: {ssim[~np.eye(modalities, dtype=bool)].mean():.3f}")


if __name__ == "__main__":
    main()
