"""``nnunet_missingmod <subcommand>``: thin argparse wrappers over the package's functions.

Errors the package reports on purpose (a ``raise`` in this package, or a file-system error such as a
missing or read-only file) end the command with one line ``nnunet_missingmod <command>: error: ...`` on
stderr and exit code 2, as argparse does for a bad option. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import linecache
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import nnunet_missingmod

#: Exit code of a command stopped by a reported error (argparse uses the same for bad options).
ERROR_EXIT_CODE = 2
_PACKAGE_DIR = Path(nnunet_missingmod.__file__).resolve().parent


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def fold(text: str) -> int | str:
    """argparse type: a fold number (>= 0) or ``all``."""
    return "all" if text == "all" else non_negative_int(text)


def step_size(text: str) -> float:
    """argparse type: a sliding-window step in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _ext_path(args: argparse.Namespace) -> None:
    from nnunet_missingmod.ext import ext_trainer_path

    print(ext_trainer_path())


def _phantom(args: argparse.Namespace) -> None:
    from nnunet_missingmod.data.phantom import PhantomConfig, make_phantom_dataset, render_preview

    folder = make_phantom_dataset(
        args.dataset_id, num_cases=args.num_cases, num_test=args.num_test, seed=args.seed, name=args.name,
        config=PhantomConfig(spacing=args.spacing), raw_folder=args.raw, overwrite=args.overwrite,
        brats_layout=args.brats_layout, missing_rate=args.missing_rate, brats_format=args.brats_format,
        num_processes=args.num_processes)
    print(f"wrote {folder}")
    if args.brats_layout:
        print(f"wrote the BraTS layout (missing rate {args.missing_rate}) to {args.brats_layout}")
    if args.preview:
        print(f"preview: {render_preview(folder, args.preview)}")


def _convert_brats(args: argparse.Namespace) -> None:
    from nnunet_missingmod.data.brats import convert_brats

    folder = convert_brats(args.source, args.dataset_id, args.name, layout=args.layout, raw_folder=args.raw,
                           overwrite=args.overwrite, num_processes=args.num_processes)
    cases = json.loads((folder / "modality_availability.json").read_text())["cases"]
    print(f"wrote {folder} ({len(cases)} cases; sequences per case in {folder / 'modality_availability.json'})")


def _add_cpu_config(args: argparse.Namespace) -> None:
    from nnunet_missingmod.data.plans import add_cpu_configuration

    path = add_cpu_configuration(args.d, name=args.name, parent=args.parent, patch_size=args.patch_size,
                                 features_per_stage=args.features, batch_size=args.batch_size,
                                 plans_identifier=args.p)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(str(path))  # resolves inherits_from as nnU-Net does
    name = args.name or f"{len(plans.get_configuration(args.parent).patch_size)}d_cpu"  # the function's default
    patch = plans.get_configuration(name).patch_size
    print(f"added configuration {name} (inherits from {args.parent}, patch {patch}) to {path}\n"
          f"train it with: nnUNetv2_train {args.d} {name} FOLD -tr TRAINER -device cpu")


def _predict(args: argparse.Namespace) -> None:
    import torch

    from nnunet_missingmod import modalities as mods
    from nnunet_missingmod.inference.predict import model_folder, predict_folder

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model_folder(args.d, args.c, args.tr, args.p)
    done = predict_folder(args.i, args.o, model, folds=args.f, checkpoint_name=args.chk, device=device,
                          tile_step_size=args.step_size, use_mirroring=not args.disable_tta,
                          save_probabilities=args.save_probabilities,
                          available=mods.parse_modalities(args.available) if args.available else None,
                          availability_file=args.availability, num_parts=args.num_parts, part_id=args.part_id,
                          postprocessing=args.postprocessing)
    print(f"predicted {len(done)} case(s) into {args.o} (modalities per case: {args.o}/modalities_used.json)"
          + (f", post-processed with {args.postprocessing}" if args.postprocessing else ""))


def _combinations(spec: str) -> list[tuple[int, ...]] | None:
    """``all`` (None), ``one-missing`` (BraSyn: each combination lacking exactly one sequence) or a list."""
    from nnunet_missingmod import modalities as mods

    if spec == "all":
        return None
    if spec == "one-missing":
        return [c for c in mods.all_combinations() if len(c) == mods.NUM_MODALITIES - 1]
    return [mods.parse_modalities(part) for part in spec.split(",")]


def _evaluate_missing(args: argparse.Namespace) -> None:
    import torch

    from nnunet_missingmod.evaluation.missing_combinations import evaluate_missing, markdown_table
    from nnunet_missingmod.inference.predict import model_folder

    if args.fill == "synthesize" and not args.m:
        raise ValueError("--fill synthesize needs the synthesis model folder: -m MODEL_FOLDER")
    if args.fill == "zero" and args.m:
        raise ValueError("-m names a synthesis model, which only --fill synthesize uses")
    combinations = _combinations(args.combinations)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = evaluate_missing(model_folder(args.d, args.c, args.tr, args.p), args.f, split=args.split,
                           combinations=combinations, output=args.o, save_predictions=args.save_predictions,
                           checkpoint_name=args.chk, device=device, tile_step_size=args.step_size,
                           use_mirroring=not args.disable_tta, batch_size=args.batch_size, fill=args.fill,
                           synthesis_model=args.m, synthesis_folds=args.synthesis_folds,
                           synthesis_checkpoint=args.synthesis_chk, combine=args.combine,
                           num_parts=args.num_parts, part_id=args.part_id,
                           histogram_fallback=args.histogram_fallback, postprocessing=args.postprocessing)
    summary = json.loads((out / "summary.json").read_text())
    print("\n" + markdown_table(summary, "Dice"))
    fill = "synthesised by " + args.m if args.fill == "synthesize" else "zero-filled"
    print(f"missing channels {fill}; per-case CSV, summary.json, table.md and heatmap.png in {out}")
    if args.num_parts > 1:
        print(f"part {args.part_id} of {args.num_parts}; when every part has finished, combine them with: "
              f"nnunet_missingmod merge-evaluation {out.parent}")


def _determine_postprocessing(args: argparse.Namespace) -> None:
    from nnunet_missingmod.evaluation.postprocessing import NNUNET_BRATS_THRESHOLDS, determine_postprocessing

    result = determine_postprocessing(args.folder, args.l, candidates=args.thresholds or NNUNET_BRATS_THRESHOLDS)
    folder = Path(args.folder)
    if result["applied"]:
        print(f"enhancing tumour below {result['min_voxels']} voxels becomes non-enhancing tumour core: mean ET Dice "
              f"{result['dice_before']:.4f} -> {result['dice_after']:.4f} on {result['chosen_on']['predictions']} "
              f"validation predictions ({result['relabelled']['without_label_in_reference']} false enhancing "
              f"tumours removed, {result['relabelled']['with_label_in_reference']} true ones lost)")
    else:
        print(f"no threshold raises the mean ET Dice ({result['dice_before']:.4f}) of "
              f"{result['chosen_on']['predictions']} validation predictions: postprocessing.pkl applies nothing")
    print(f"postprocessing.pkl, .json and .png in {folder}; score the test cases with it: nnunet_missingmod "
          f"evaluate-missing ... --split test --postprocessing {folder / 'postprocessing.pkl'}")


def _merge_evaluation(args: argparse.Namespace) -> None:
    from nnunet_missingmod.evaluation.missing_combinations import markdown_table, merge_parts

    out = merge_parts(args.folder)
    summary = json.loads((out / "summary.json").read_text())
    print("\n" + markdown_table(summary, "Dice"))
    print(f"merged {len(summary['merged_from'])} parts ({summary['num_cases']} cases) into {out}")


def _synthesize(args: argparse.Namespace) -> None:
    import torch

    from nnunet_missingmod import modalities as mods
    from nnunet_missingmod.inference.synthesize import synthesize

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = synthesize(args.i, args.o, args.m, folds=args.f, checkpoint_name=args.chk, device=device,
                        available=mods.parse_modalities(args.available) if args.available else None,
                        availability_file=args.availability, combine=args.combine, batch_size=args.batch_size,
                        num_parts=args.num_parts, part_id=args.part_id, histogram_fallback=args.histogram_fallback)
    speed = result["slices"] / result["seconds"] if result["seconds"] > 0 else 0.0
    print(f"synthesised {result['synthesized_channels']} channel(s) in {result['cases']} case(s) into {args.o} "
          f"({result['slices']} slice translations, {speed:.1f}/s); acquired and synthetic sequences per case in "
          f"{args.o}/modality_availability.json")


def _evaluate_synthesis(args: argparse.Namespace) -> None:
    import torch

    from nnunet_missingmod import modalities as mods
    from nnunet_missingmod.evaluation.synthesis import evaluate_synthesis, markdown_tables

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = evaluate_synthesis(args.i, args.m, args.o, labels=args.l, folds=args.f, checkpoint_name=args.chk,
                             device=device,
                             available=mods.parse_modalities(args.available) if args.available else None,
                             availability_file=args.availability, num_cases=args.num_cases, combine=args.combine,
                             combined=not args.no_combined, batch_size=args.batch_size, examples=args.examples,
                             histogram_fallback=args.histogram_fallback)
    summary = json.loads((out / "summary.json").read_text())
    print("\n" + markdown_tables(summary))
    print(f"per_case.csv, summary.json, table.md and examples.png in {out}")


def _compare_entries(args: argparse.Namespace) -> tuple[list, list]:
    """The entries (single folders, then the ``--group`` lists) and their labels (None: from the summary)."""
    groups = args.group or []
    if not args.runs and not groups:
        raise ValueError("nothing to compare; pass evaluate-missing folders and/or --group LABEL DIR [DIR ...]")
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise ValueError(f"{len(args.labels)} labels for {len(args.runs)} runs (--labels names the positional "
                         f"folders only; a --group carries its own label)")
    for group in groups:
        if len(group) < 2:
            raise ValueError(f"--group {group[0]} has no folder; use --group LABEL DIR [DIR ...]")
    labels = list(args.labels) if args.labels is not None else [None] * len(args.runs)
    return [*args.runs, *(group[1:] for group in groups)], [*labels, *(group[0] for group in groups)]


def _compare(args: argparse.Namespace) -> None:
    from nnunet_missingmod.evaluation.missing_combinations import CombinationMismatchWarning, compare

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CombinationMismatchWarning)
        entries, labels = _compare_entries(args)
        markdown, png = compare(entries, args.o, labels)
    for warning in caught:
        if issubclass(warning.category, CombinationMismatchWarning):
            print(f"nnunet_missingmod compare: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    print(markdown.read_text())
    print(f"chart: {png}")


def _demo(args: argparse.Namespace) -> None:
    from nnunet_missingmod.demo import run_demo

    run_demo(args.work_dir, trainer=args.tr, dataset_id=args.dataset_id, num_cases=args.num_cases,
             num_test=args.num_test, seed=args.seed, epochs=args.epochs, iterations_per_epoch=args.iterations,
             patch_size=tuple(args.patch_size), device=args.device, num_processes=args.num_processes,
             tta=args.tta, step_size=args.step_size, eval_cases=args.eval_cases, fresh=args.fresh)


def _add_dataset_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.add_argument("-np", "--num-processes", type=positive_int, default=None,
                   help="worker processes, at least 1 (default: $nnUNet_def_n_proc or 2)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """The trained model (as nnUNetv2_predict names it) and the inference settings."""
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer (default: nnUNetTrainer)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default: checkpoint_final.pth)")
    p.add_argument("-device", default=None, help="cpu, cuda or mps (default: cuda if available, else cpu)")
    p.add_argument("-step_size", type=step_size, default=0.5, help="sliding-window step in (0, 1] (default: 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")


def _add_combine_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--combine", choices=("ssim", "best", "mean"), default="ssim",
                   help="several acquired sequences: average weighted by the model's validation SSIM over the brain "
                        "per pair, negative ones given no weight (default), only the best source, or equal weights")
    p.add_argument("--histogram-fallback", action="store_true",
                   help="a source -> target pair on which plain histogram matching scored a higher validation SSIM "
                        "than the model (stored with the model) uses histogram matching instead (default: always "
                        "the model)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet_missingmod",
        description="nnU-Net v2 extension for brain-tumour segmentation with missing MRI modalities. "
                    "Trainers run through nnU-Net's own commands after "
                    "`export nnUNet_extTrainer=$(nnunet_missingmod ext-path)`.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("ext-path", help="print the folder to put in nnUNet_extTrainer",
                       description="Print the folder holding the shim module that makes this package's trainers "
                                   "visible to nnUNetv2_train / nnUNetv2_predict: "
                                   "export nnUNet_extTrainer=$(nnunet_missingmod ext-path)")
    p.set_defaults(func=_ext_path)

    p = sub.add_parser("phantom", help="generate a BraTS-like phantom dataset in nnU-Net's raw format",
                       description="Generate BraTS-like phantoms (MNI152 anatomy, tumour with edema, necrosis and "
                                   "enhancing tumour, four MR contrasts) as $nnUNet_raw/DatasetNNN_NAME.")
    p.add_argument("--dataset-id", type=int, required=True, help="nnU-Net dataset id, e.g. 990")
    p.add_argument("--name", default="BraTSPhantom", help="dataset name (default: BraTSPhantom)")
    p.add_argument("--num-cases", type=int, default=40, help="training cases (default: 40)")
    p.add_argument("--num-test", type=int, default=10, help="held-out cases in imagesTs/labelsTs (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="seed; equal seeds give bit-identical files (default: 0)")
    p.add_argument("--spacing", type=float, default=2.0, help="isotropic spacing in mm (default: 2)")
    p.add_argument("--preview", default=None, metavar="PNG", help="render the first case to this PNG")
    p.add_argument("--brats-layout", default=None, metavar="DIR",
                   help="also write the cases in the BraTS folder layout here, with sequences missing at random")
    p.add_argument("--missing-rate", type=float, default=0.3,
                   help="probability that a sequence file is missing in --brats-layout (default: 0.3)")
    p.add_argument("--brats-format", choices=("2021", "2023"), default="2021",
                   help="file names and labels of --brats-layout (default: 2021)")
    _add_dataset_output_options(p)
    p.set_defaults(func=_phantom)

    p = sub.add_parser("convert-brats", help="convert a BraTS folder with missing sequences to nnU-Net's format",
                       description="Convert BraTS 2018-2021 (_t1, _t1ce, _t2, _flair, _seg; labels 1/2/4) or 2023+ "
                                   "(-t1n, -t1c, -t2w, -t2f, -seg; labels 1/2/3) case folders into "
                                   "$nnUNet_raw/DatasetNNN_NAME. Missing sequences become zero-filled channels and "
                                   "are recorded in modality_availability.json; cases without a segmentation go to "
                                   "imagesTs. Any bad case stops the conversion and nothing is written.")
    p.add_argument("source", help="folder whose subfolders are the BraTS cases")
    p.add_argument("--dataset-id", type=int, required=True, help="nnU-Net dataset id")
    p.add_argument("--name", required=True, help="dataset name, e.g. BraTS2021")
    p.add_argument("--layout", choices=("auto", "2021", "2023"), default="auto", help="file naming (default: auto)")
    _add_dataset_output_options(p)
    p.set_defaults(func=_convert_brats)

    p = sub.add_parser("add-cpu-config", help="add a small CPU configuration (e.g. 3d_cpu) to a dataset's plans",
                       description="Add a configuration that inherits_from an existing one (same preprocessed data) "
                                   "with a small patch, batch and network, so that training runs on a CPU. A "
                                   "convenience for demos and tests, not a recommendation for real data.")
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("--name", default=None,
                   help="name of the new configuration (default: 3d_cpu for a 3D parent, 2d_cpu for a 2D one)")
    p.add_argument("--parent", default="3d_fullres", help="configuration to inherit from (default: 3d_fullres)")
    p.add_argument("--patch-size", type=int, nargs="+", default=None,
                   help="patch size, one number per axis of the parent (default: 48 48 48 for 3D, 64 64 for 2D)")
    p.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128],
                   help="features per stage; their number is the number of stages (default: 16 32 64 128)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="batch size, at least 1 (default: 2)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.set_defaults(func=_add_cpu_config)

    p = sub.add_parser("predict", help="predict with any subset of the modalities (nnUNetv2_predict's options)",
                       description="Like nnUNetv2_predict, but cases may lack channel files: missing modalities are "
                                   "zero-filled. Availability comes from --available, else from "
                                   "modality_availability.json (--availability, or found beside the input folder), "
                                   "else from the files present. Every case is checked before anything is written.")
    p.add_argument("-i", required=True, help="input folder of <case>_XXXX files (XXXX: 0000 t1, 0001 t1ce, "
                                             "0002 t2, 0003 flair)")
    p.add_argument("-o", required=True, help="output folder")
    _add_model_options(p)
    p.add_argument("-f", nargs="+", type=fold, default=None, help="folds to ensemble (default: all found)")
    p.add_argument("--save_probabilities", action="store_true", help="also write probabilities (.npz)")
    p.add_argument("--available", default=None, help="modalities to use for every case, e.g. t1ce,flair")
    p.add_argument("--availability", default=None, metavar="JSON", help="a modality_availability.json")
    p.add_argument("-num_parts", type=positive_int, default=1, help="split the cases into this many parts")
    p.add_argument("-part_id", type=non_negative_int, default=0, help="which part this process predicts (from 0)")
    p.add_argument("--postprocessing", default=None, metavar="PKL",
                   help="a postprocessing.pkl (determine-postprocessing's or nnU-Net's) applied to every segmentation")
    p.set_defaults(func=_predict)

    p = sub.add_parser("evaluate-missing", help="score a model on all 15 combinations of available modalities",
                       description="Predict the fold's validation cases (or imagesTs/labelsTs) with every non-empty "
                                   "subset of the modalities (each case preprocessed once) and report Dice and HD95 "
                                   "for WT, TC and ET: per_case.csv, summary.json, table.md (D2-Net Table I layout) "
                                   "and heatmap.png in <fold folder>/missing_modalities_<split> (or -o).")
    _add_model_options(p)
    p.add_argument("-f", type=fold, default=0, help="fold (default: 0)")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="the fold's validation cases, or imagesTs with labelsTs (default: val)")
    p.add_argument("--combinations", default="all",
                   help="'all' (default), 'one-missing' (the four combinations lacking exactly one sequence, as in "
                        "BraSyn) or a comma-separated list such as t1ce+flair,flair,t1+t1ce+t2+flair")
    p.add_argument("--save-predictions", action="store_true", help="keep each combination's segmentation")
    p.add_argument("-num_parts", type=positive_int, default=1,
                   help="split the cases into this many parts (e.g. one per machine; default: 1)")
    p.add_argument("-part_id", type=non_negative_int, default=0,
                   help="which part this process evaluates (from 0); parts go to <output>/part_K_of_N, combined by "
                        "merge-evaluation")
    p.add_argument("-o", default=None, help="output folder (default: in the fold folder)")
    p.add_argument("--batch-size", type=positive_int, default=5,
                   help="combinations per forward pass (default: 5; 1 uses nnU-Net's sliding window one at a time)")
    p.add_argument("--fill", choices=("zero", "synthesize"), default="zero",
                   help="channels outside a combination: zero-filled (default) or synthesised from the channels in "
                        "it by the synthesis model -m")
    p.add_argument("-m", default=None, metavar="SYNTH_MODEL",
                   help="synthesis model folder (e.g. $nnUNet_results/DatasetNNN/"
                        "UTADNetStudentTrainer__nnUNetPlans__2d), for --fill synthesize")
    p.add_argument("--synthesis-folds", nargs="+", type=fold, default=None,
                   help="folds of the synthesis model to ensemble (default: all found)")
    p.add_argument("--synthesis-chk", default="checkpoint_final.pth",
                   help="checkpoint of the synthesis model (default: checkpoint_final.pth)")
    _add_combine_option(p)
    p.add_argument("--postprocessing", default=None, metavar="PKL",
                   help="a postprocessing.pkl (determine-postprocessing's or nnU-Net's) applied to every "
                        "segmentation before scoring; default output folder missing_modalities_<split>_postprocessed")
    p.set_defaults(func=_evaluate_missing)

    p = sub.add_parser("determine-postprocessing",
                       help="choose the BraTS enhancing-tumour volume threshold on validation predictions",
                       description="Choose on the saved predictions of evaluate-missing --split val "
                                   "--save-predictions (every modality combination of the fold's validation cases) "
                                   "the volume below which a predicted enhancing tumour becomes non-enhancing tumour "
                                   "core (BraTS post-processing): of the candidates (by default those of nnU-Net's "
                                   "BraTS entry), the one with the highest mean ET Dice, the smallest of a tie. "
                                   "Writes postprocessing.pkl (nnU-Net's format, for "
                                   "nnUNetv2_apply_postprocessing -pp_pkl_file and evaluate-missing "
                                   "--postprocessing), postprocessing.json and postprocessing.png into FOLDER.")
    p.add_argument("folder", help="evaluate-missing output folder of the validation cases, with predictions/")
    p.add_argument("-l", default=None,
                   help="reference label folder (default: labelsTr of the evaluated model's dataset in nnUNet_raw)")
    p.add_argument("--thresholds", type=non_negative_int, nargs="+", default=None, metavar="VOXELS",
                   help="candidate thresholds in voxels (default: nnU-Net's 0 10 50 100 200 500 750 1000 1500 2500 "
                        "10000)")
    p.set_defaults(func=_determine_postprocessing)

    p = sub.add_parser("synthesize", help="fill in missing sequences with a trained synthesis model (UTAD-Net)",
                       description="Write a copy of a raw dataset (dataset.json, imagesTr/imagesTs, labels) or of a "
                                   "folder of <case>_XXXX files in which every missing sequence is synthesised by a "
                                   "trained UTADNetStudentTrainer model, slice by slice in its 2d configuration. "
                                   "Acquired files are copied byte for byte; modality_availability.json in the "
                                   "output marks the synthetic sequences. Which sequences a case has comes from "
                                   "--available, else modality_availability.json, else the files that are not all "
                                   "zero. An existing output is refused; the output appears when complete.")
    p.add_argument("-i", required=True, help="raw dataset folder, or folder of <case>_XXXX files")
    p.add_argument("-o", required=True, help="output folder (must not exist; for nnU-Net use "
                                             "$nnUNet_raw/DatasetNNN_Name with a new id)")
    p.add_argument("-m", required=True, help="synthesis model folder (<trainer>__<plans>__<configuration>)")
    p.add_argument("-f", nargs="+", type=fold, default=None, help="folds to ensemble (default: all found)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default: checkpoint_final.pth)")
    p.add_argument("-device", default=None, help="cpu, cuda or mps (default: cuda if available, else cpu)")
    p.add_argument("--available", default=None, help="acquired sequences of every case, e.g. t1ce,flair")
    p.add_argument("--availability", default=None, metavar="JSON", help="a modality_availability.json")
    _add_combine_option(p)
    p.add_argument("--batch-size", type=positive_int, default=16, help="slices per forward pass (default: 16)")
    p.add_argument("-num_parts", type=positive_int, default=1,
                   help="split the cases of a case folder into this many parts, all writing into -o")
    p.add_argument("-part_id", type=non_negative_int, default=0, help="which part this process writes (from 0)")
    p.set_defaults(func=_synthesize)

    p = sub.add_parser("evaluate-synthesis", help="SSIM/PSNR of synthesised against real sequences, with baselines",
                       description="Hide each acquired sequence of every case in turn, synthesise it from each other "
                                   "one (and from all together), and report SSIM and PSNR over the brain and in the "
                                   "whole-tumour bounding box, and the BraSyn SSIM (tumour / non-tumour), per "
                                   "source -> target pair, next to two baselines: zero-fill and the source "
                                   "histogram-matched to the target. per_case.csv, summary.json, table.md and "
                                   "examples.png in -o.")
    p.add_argument("-i", required=True, help="folder of <case>_XXXX files, e.g. $nnUNet_raw/DatasetNNN/imagesTs")
    p.add_argument("-l", default=None, help="label folder (default: labelsXx beside imagesXx)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-m", required=True, help="synthesis model folder (<trainer>__<plans>__<configuration>)")
    p.add_argument("-f", nargs="+", type=fold, default=None, help="folds to ensemble (default: all found)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default: checkpoint_final.pth)")
    p.add_argument("-device", default=None, help="cpu, cuda or mps (default: cuda if available, else cpu)")
    p.add_argument("--available", default=None, help="acquired sequences of every case, e.g. t1,t2,flair")
    p.add_argument("--availability", default=None, metavar="JSON", help="a modality_availability.json")
    p.add_argument("--num-cases", type=positive_int, default=None, help="evaluate only the first N cases")
    _add_combine_option(p)
    p.add_argument("--no-combined", action="store_true", help="skip the all-sources -> target rows")
    p.add_argument("--batch-size", type=positive_int, default=16, help="slices per forward pass (default: 16)")
    p.add_argument("--examples", type=non_negative_int, default=4, help="example rows in examples.png (default: 4)")
    p.set_defaults(func=_evaluate_synthesis)

    p = sub.add_parser("merge-evaluation", help="combine the parts of evaluate-missing -num_parts N into one result",
                       description="Combine the part_K_of_N folders that evaluate-missing -num_parts N -part_id K "
                                   "wrote into FOLDER: per_case.csv, summary.json, table.md and heatmap.png as one "
                                   "run over all cases would write them. Refuses missing parts, parts evaluated with "
                                   "other settings and cases evaluated twice.")
    p.add_argument("folder", help="the evaluation's output folder (holding the part_K_of_N folders)")
    p.set_defaults(func=_merge_evaluation)

    p = sub.add_parser("compare", help="several evaluate-missing results side by side (Markdown + bar chart)",
                       description="Average Dice and HD95 over the modality combinations of several evaluate-missing "
                                   "outputs, as comparison.md and a grouped bar chart comparison.png. Repeated runs "
                                   "of one experiment (e.g. training seeds) go into one --group, shown as mean ± sd "
                                   "over its runs (error bars in the chart; 95% intervals in comparison.json). "
                                   "Example: compare --group dropout s0/eval s1/eval s2/eval "
                                   "--group plain p0/eval p1/eval -o cmp")
    p.add_argument("runs", nargs="*", help="folders written by evaluate-missing (one run each)")
    p.add_argument("-o", default=".", help="output folder (default: current folder)")
    p.add_argument("--labels", nargs="+", default=None,
                   help="names of the positional runs (default: trainer names)")
    p.add_argument("--group", nargs="+", action="append", metavar=("LABEL", "DIR"), default=None,
                   help="a labelled group of evaluate-missing folders (repeated runs), shown as mean ± sd; "
                        "repeat the option for several groups; listed after the positional runs")
    p.set_defaults(func=_compare)

    p = sub.add_parser("demo", help="phantoms -> plan/preprocess -> CPU config -> train -> predict -> Dice",
                       description="Run the whole pipeline on phantoms in a work folder of its own, through "
                                   "nnU-Net's unmodified commands, and print per-region Dice on held-out phantoms.")
    p.add_argument("--work-dir", default="demo_output", help="work folder (default: ./demo_output)")
    p.add_argument("-tr", default="ModalityDropoutTrainer", help="trainer (default: ModalityDropoutTrainer)")
    p.add_argument("--dataset-id", type=int, default=990, help="phantom dataset id (default: 990)")
    p.add_argument("--num-cases", type=int, default=40, help="training phantoms (default: 40)")
    p.add_argument("--num-test", type=int, default=10, help="held-out phantoms (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default: 0)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    p.add_argument("--iterations", type=int, default=25, help="iterations per epoch (default: 25)")
    p.add_argument("--patch-size", type=int, nargs=3, default=[48, 48, 48], help="CPU patch size (default: 48 48 48)")
    p.add_argument("-device", default="cpu", choices=("cpu", "cuda", "mps"), help="device (default: cpu)")
    p.add_argument("-np", "--num-processes", type=positive_int, default=2, help="worker processes (default: 2)")
    p.add_argument("--tta", action="store_true",
                   help="validate and predict with mirroring test-time augmentation (8x slower on CPU)")
    p.add_argument("--step-size", type=float, default=1.0,
                   help="sliding-window step for prediction and evaluation (default: 1.0, no overlap; nnU-Net: 0.5)")
    p.add_argument("--eval-cases", type=int, default=5,
                   help="held-out phantoms scored on all 15 modality combinations (default: 5; 0 skips it)")
    p.add_argument("--fresh", action="store_true", help="delete the work folder first instead of reusing it")
    p.set_defaults(func=_demo)
    return parser


def is_reported_error(error: BaseException) -> bool:
    """Whether ``error`` is one the package reports on purpose (see the module docstring), not a bug.

    True for a file-system error (``OSError``: missing, existing, read-only, not a folder), an exception
    class defined in this package (``InputImageError``, ...), and an exception raised by an explicit
    ``raise`` statement in this package's source. A ``KeyError`` from indexing or a ``ValueError`` from
    inside numpy or torch is a bug and is not reported this way.
    """
    if isinstance(error, OSError):
        return True
    if not isinstance(error, Exception) or isinstance(error, (AssertionError, NotImplementedError)):
        return False
    if type(error).__module__.startswith("nnunet_missingmod."):
        return True
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return False
    source = Path(frame.tb_frame.f_code.co_filename).resolve()
    return (_PACKAGE_DIR in source.parents
            and linecache.getline(str(source), frame.tb_lineno).lstrip().startswith("raise "))


def error_message(error: BaseException) -> str:
    """The message of a reported error on one line (a KeyError's text without quotes, an OSError's path)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]
    elif isinstance(error, OSError) and error.strerror and error.filename and len(error.args) == 2:
        text = f"{error.strerror}: {error.filename}"
    else:
        text = str(error)
    return " ".join(text.split("\n")).strip() or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as error:
        if not is_reported_error(error):
            raise
        print(f"nnunet_missingmod {args.command}: error: {error_message(error)}", file=sys.stderr)
        return ERROR_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
