"""How much each D²-Net loss term pulls on the tumour encoder E_T: gradient norms per term.

    python scripts/bench_d2net_gradients.py [--work-dir bench_work] [--batches 4] [--checkpoint PATH]

Builds ``D2NetTrainer`` on the benchmark's phantom dataset and 3d_cpu plans (``bench_common.prepare``),
draws real training batches from nnU-Net's data loader (augmentation and modality dropout included),
and for every term of eq. 11, weighted as in the total loss (``D2NetTrainer.term_weights``), computes
the gradient on E_T's parameters alone (``torch.autograd.grad``). Reported per term: the norm of that
gradient, its share of the sum of the norms, and its cosine with L_seg's gradient (negative: the term
works against the segmentation).
``--checkpoint`` loads trained weights first (e.g. ``fold_0/checkpoint_final.pth`` of a benchmark run);
without it the network is freshly initialised.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import CONFIGURATION, DATASET_ID, prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="bench_work")
    parser.add_argument("--trainer", default="D2NetTrainer")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--out", default=None,
                        help="JSON file for the result (default: <work-dir>/d2net_gradients.json)")
    args = parser.parse_args()
    work = Path(args.work_dir).resolve()
    prepare(work)

    import numpy as np
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    torch.manual_seed(0)
    np.random.seed(0)
    trainer = get_trainer_from_args(str(DATASET_ID), CONFIGURATION, 0, args.trainer, device=torch.device("cpu"))
    trainer.initialize()
    if args.checkpoint:
        trainer.load_checkpoint(args.checkpoint)
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    weights = {name: weight for name, weight in trainer.term_weights().items() if name != "kd_projection"}
    encoder = [p for p in trainer.network.encoder.parameters() if p.requires_grad]
    norms = {name: [] for name in weights}
    cosines = {name: [] for name in weights}
    for index in range(args.batches):
        batch = next(trainer.dataloader_train)
        data, target = batch["data"], batch["target"]
        losses = trainer.compute_losses(data, target)
        gradients = {}
        for name, weight in weights.items():
            grads = torch.autograd.grad(weight * losses[name], encoder, retain_graph=True, allow_unused=True)
            gradients[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                         for g, p in zip(grads, encoder, strict=True)])
        for name, gradient in gradients.items():
            norms[name].append(float(gradient.norm()))
            cosines[name].append(float(torch.nn.functional.cosine_similarity(gradient, gradients["seg"], dim=0)))
        print(f"batch {index + 1}/{args.batches}: " + ", ".join(f"{k} {v[-1]:.3g}" for k, v in norms.items()),
              flush=True)
    mean_norms = {name: float(np.mean(values)) for name, values in norms.items()}
    total = sum(mean_norms.values())
    result = {"trainer": args.trainer, "checkpoint": args.checkpoint, "batches": args.batches,
              "terms": {name: {"grad_norm": mean_norms[name], "share": mean_norms[name] / total,
                               "cosine_with_seg": float(np.mean(cosines[name]))} for name in mean_norms}}
    out = Path(args.out) if args.out else work / "d2net_gradients.json"
    out.write_text(json.dumps(result, indent=2))
    print("| term | ‖∇_E_T‖ | share | cos with L_seg |\n|---|---|---|---|")
    for name, row in result["terms"].items():
        print(f"| {name} | {row['grad_norm']:.3g} | {row['share']:.1%} | {row['cosine_with_seg']:+.2f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
