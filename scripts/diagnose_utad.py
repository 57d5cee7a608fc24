"""Two checks of what UTAD-Net learns on a ``2d`` preprocessed dataset.

    python scripts/diagnose_utad.py --preprocessed bench_conv/nnUNet_preprocessed/Dataset991_BraTSPhantom \
        [--steps 600] [--batch-size 16] [--features 16 32 64 128] [--lr 1e-4] [--seed 0] [--model MODEL_FOLDER]
        [--border 2] [--classifier-blur-sigma 0]

1. The critic's modality classifier alone: UTAD-Net's PatchDiscriminator trained on the classification term only
   (eq. 3, no adversarial term, no gradient penalty) on real slices. The generator's target code only takes effect
   through this classifier (eq. 5-6): if the critic cannot name the modality of a real slice, the generator gets no
   signal to make its output depend on the code. Slices from the middle half of each volume (mostly brain), one
   random modality each; the first 75% of the cases train, the rest are held out. Prints, every 100 steps, the
   held-out cross-entropy (chance: ln 4 = 1.386), accuracy and confusion matrix (rows: true t1, t1ce, t2, flair;
   columns: predicted). ``--steps 0`` skips it. ``--classifier-blur-sigma S`` trains the classifier on images
   blurred by a Gaussian of sigma S pixels (``utad.discriminator.classifier_blur_sigma``): how well the modality
   can be told from the contrast alone.
2. With ``--model`` (a trained UTAD-Net model folder): does the generator use the target code? The middle slice of
   the first held-out case is translated from each source to each of the four targets; printed per source: the
   correlation over the brain of each output with the real target slice (the source's own modality included,
   where a faithful generator gives about +1), and the mean absolute difference between the four outputs (0: the
   code is ignored). Then where the code enters: the mean absolute difference, between the four targets, of the
   global encoder's first-stage features, in the band of ``--border`` pixels along the slice's edge and inside
   it. One-hot input channels followed by instance normalisation only reach the features near the zero-padded
   edge; the generator's conditional normalisations (``ModalityConditionalNorm``) reach the inside as well.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.networks.utad import PatchDiscriminator


def read_volumes(folder: Path) -> list[np.ndarray]:
    """Every case's (M, Z, X, Y) image of nnU-Net's ``nnUNetPlans_2d`` preprocessing."""
    import blosc2

    files = sorted(p for p in folder.glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    if not files:
        raise SystemExit(f"no preprocessed cases (*.b2nd) in {folder}: run nnUNetv2_preprocess -c 2d first")
    return [np.asarray(blosc2.open(str(p))[:]) for p in files]


def sample(volumes: list[np.ndarray], count: int, size: tuple[int, int], rng: np.random.Generator):
    """``count`` slices (count, 1, *size), zero-padded or cropped, and their modality labels."""
    images, labels = [], []
    for _ in range(count):
        volume = volumes[rng.integers(len(volumes))]
        depth = volume.shape[1]
        z = rng.integers(depth // 4, max(depth // 4 + 1, 3 * depth // 4))
        modality = int(rng.integers(volume.shape[0]))
        slice_ = volume[modality, z][: size[0], : size[1]]
        images.append(np.pad(slice_, [(0, s - n) for s, n in zip(size, slice_.shape, strict=True)]))
        labels.append(modality)
    return torch.tensor(np.stack(images)[:, None], dtype=torch.float32), torch.tensor(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preprocessed", required=True, help="nnUNet_preprocessed/<dataset> folder (2d done)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="a trained UTAD-Net model folder: check its target code")
    parser.add_argument("--border", type=int, default=2,
                        help="width of the edge band for the first-stage features (default 2: two 3x3 convolutions)")
    parser.add_argument("--classifier-blur-sigma", type=float, default=0.0,
                        help="the classifier reads images blurred by a Gaussian of this sigma in pixels (default 0)")
    args = parser.parse_args()
    if args.border < 1:
        parser.error(f"--border must be at least 1 pixel, got {args.border}")
    if not args.classifier_blur_sigma >= 0:
        parser.error(f"--classifier-blur-sigma must be >= 0, got {args.classifier_blur_sigma}")
    folder = Path(args.preprocessed) / "nnUNetPlans_2d"
    volumes = read_volumes(folder)
    if len(volumes) < 4:
        raise SystemExit(f"{folder}: {len(volumes)} case(s); at least 4 are needed (train and held-out)")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    stride = 2 ** len(args.features)
    size = tuple(max(stride, n - n % stride) for n in volumes[0].shape[2:])
    split = int(0.75 * len(volumes))
    held_x, held_y = sample(volumes[split:], 400, size, rng)
    critic = PatchDiscriminator(num_modalities=mods.NUM_MODALITIES, features=args.features,
                                classifier_blur_sigma=args.classifier_blur_sigma)
    optimizer = torch.optim.Adam(critic.parameters(), args.lr, betas=(0.9, 0.999))
    start = time.perf_counter()
    for step in tqdm(range(1, args.steps + 1), desc="classifier steps", disable=args.steps == 0):
        images, labels = sample(volumes[:split], args.batch_size, size, rng)
        loss = torch.nn.functional.cross_entropy(critic(images)[1], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps:
            with torch.no_grad():
                logits = critic(held_x)[1]
            predicted = logits.argmax(1)
            confusion = np.zeros((mods.NUM_MODALITIES,) * 2, dtype=int)
            np.add.at(confusion, (held_y.numpy(), predicted.numpy()), 1)
            tqdm.write(f"step {step}: held-out cross-entropy {torch.nn.functional.cross_entropy(logits, held_y):.3f}, "
                       f"accuracy {(predicted == held_y).float().mean():.3f}, confusion {confusion.tolist()} "
                       f"({time.perf_counter() - start:.0f} s)")
    if args.model:
        check_target_code(Path(args.model), volumes[split], args.border)


def check_target_code(model_folder: Path, volume: np.ndarray, border: int = 2) -> None:
    """Translate the middle slice of ``volume`` (M, Z, X, Y) from each source to each target; print correlations."""
    from nnunet_missingmod.inference.synthesize import load_synthesis_model
    from nnunet_missingmod.trainers.utad import pad_to_stride

    network = load_synthesis_model(model_folder).networks[0].eval()
    slices = pad_to_stride(torch.tensor(volume[:, volume.shape[1] // 2][:, None], dtype=torch.float32),
                           network.total_stride)  # (M, 1, X, Y)
    brain = (slices != 0).any(0)[0]
    names = mods.MODALITIES
    stage_outputs: list[torch.Tensor] = []
    hook = network.global_encoder.stages[0].register_forward_hook(
        lambda module, inputs, output: stage_outputs.append(output.detach()))
    with torch.no_grad():
        for source in range(len(names)):
            outputs = [network.translate(slices[source:source + 1], torch.tensor([target]))[0, 0]
                       for target in range(len(names))]
            correlations = [np.corrcoef(slices[target, 0][brain], outputs[target][brain])[0, 1]
                            for target in range(len(names))]
            spread = np.mean([float((outputs[a][brain] - outputs[b][brain]).abs().mean())
                              for a in range(len(names)) for b in range(a + 1, len(names))])
            print(f"{names[source]:>5} -> " + ", ".join(f"{names[t]} r = {c:+.2f}" for t, c in enumerate(correlations))
                  + f"; the four outputs differ by {spread:.3f} on average (z-score units)")
    hook.remove()
    # stage_outputs: (source, target) in order, each (1, C, X, Y); differences between targets of the same source
    features = torch.stack([f[0] for f in stage_outputs]).view(len(names), len(names), *stage_outputs[0].shape[1:])
    edge = torch.ones(features.shape[-2:], dtype=torch.bool)
    edge[border:-border, border:-border] = False
    differences = torch.stack([(features[:, a] - features[:, b]).abs().mean(1)  # (sources, X, Y)
                               for a in range(len(names)) for b in range(a + 1, len(names))])
    print(f"first encoder stage: the target code changes the features by {float(differences[..., edge].mean()):.4f} "
          f"within {border} px of the edge and by {float(differences[..., ~edge].mean()):.4f} inside (feature sd "
          f"{float(features.std()):.3f})")


if __name__ == "__main__":
    main()
