"""Prediction with any subset of the modalities.

:class:`MissingModalityPredictor` wraps nnU-Net's ``nnUNetPredictor``: a case is read and preprocessed
once by nnU-Net's own preprocessor, then every requested subset of modalities is predicted from that
tensor with the missing channels set to zero in normalised space (nnU-Net's sliding window, Gaussian
weighting, optional mirroring, fold ensembling). Missing channel files are zero-filled before
preprocessing, so a case predicted with :func:`predict_folder` gives exactly what ``nnUNetv2_predict``
gives for the same case with zero-filled files.

Which modalities a case has comes, in this order, from ``--available`` (one list for all cases),
from a ``modality_availability.json`` (per case), or from the channel files present in the input folder.

Everything is checked before the model is loaded or anything is written: the output folder must be
writable and must not be the input folder or inside it, every image a case uses must be complete and finite
(:func:`~nnunet_missingmod.data.nifti.check_image_file`) and share one geometry, and the checkpoints
must exist.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.data.nifti import InputImageError, check_image_file, geometry_mismatch, read_geometry
from nnunet_missingmod.data.raw_dataset import find_dataset_folder, read_availability
from nnunet_missingmod.ext import register


@dataclass
class CaseInput:
    """One case of an input folder: its channel files and the modalities to use."""

    identifier: str
    files: dict[int, Path]  # channel -> file (present files only)
    available: tuple[int, ...]


def _channel_index_of_model(dataset_json: dict) -> list[int]:
    """Map the model's input channels to modality indices; raise if the model was not trained on the 4 modalities."""
    names = [dataset_json["channel_names"][str(i)] for i in range(len(dataset_json["channel_names"]))]
    try:
        indices = [mods.modality_index(name) for name in names]
    except ValueError:
        indices = []
    if indices != list(range(mods.NUM_MODALITIES)):
        raise ValueError(f"the model expects channels {names}, but missing-modality prediction needs the "
                         f"BraTS channels in nnU-Net's order {list(mods.CHANNEL_NAMES.values())}")
    return indices


def find_cases(input_folder: str | os.PathLike, file_ending: str = ".nii.gz",
               available: Sequence[int] | None = None, availability_file: str | os.PathLike | None = None
               ) -> list[CaseInput]:
    """List the cases of a folder of ``<case>_XXXX<file_ending>`` files and decide their available modalities.

    Raises:
        InputImageError: the input is not a folder, a file name with a channel index outside 0-3, a case
            without any usable modality, or a modality named in ``available`` whose file is missing.
        ValueError: an availability file that is not valid (the message names the file and the key).
    """
    folder = Path(input_folder)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file, not a folder"
        raise InputImageError(f"input {folder} {what}; expected a folder of <case>_XXXX{file_ending} files")
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(file_ending)}$")
    files: dict[str, dict[int, Path]] = {}
    for file in sorted(folder.iterdir()):
        match = pattern.match(file.name)
        if match:
            channel = int(match.group(2))
            if channel >= mods.NUM_MODALITIES:
                raise InputImageError(f"case {match.group(1)}: {file.name} has channel index {channel}; "
                                      f"expected 0000-{mods.NUM_MODALITIES - 1:04d} ({', '.join(mods.MODALITIES)})")
            files.setdefault(match.group(1), {})[channel] = file
    if not files:
        raise InputImageError(f"{folder} holds no files named <case>_XXXX{file_ending}")
    per_case = read_availability(availability_file) if availability_file is not None else None
    cases = []
    for identifier, channel_files in files.items():
        if available is not None:
            wanted = tuple(sorted(available))
            missing_files = [mods.MODALITIES[c] for c in wanted if c not in channel_files]
            if missing_files:
                raise InputImageError(f"case {identifier}: --available names {missing_files} but there is no file "
                                      f"for {'it' if len(missing_files) == 1 else 'them'} in {folder}")
        elif per_case is not None and identifier in per_case:
            wanted = tuple(c for c in per_case[identifier] if c in channel_files)
        else:
            wanted = tuple(sorted(channel_files))
        if not wanted:
            raise InputImageError(f"case {identifier}: none of the modalities "
                                  f"{', '.join(mods.MODALITIES)} is available")
        cases.append(CaseInput(identifier, channel_files, wanted))
    return cases


def check_case_geometry(case: CaseInput) -> None:
    """All channel files of a case must share shape, spacing, origin and direction."""
    files = [case.files[c] for c in sorted(case.files)]
    reference = _geometry(case, files[0])
    for file in files[1:]:
        problem = geometry_mismatch(reference, _geometry(case, file))
        if problem:
            raise InputImageError(f"case {case.identifier}: {file.name} and {files[0].name} differ in {problem}")


def _geometry(case: CaseInput, file: Path) -> tuple:
    try:
        return read_geometry(file)
    except InputImageError as error:
        raise InputImageError(f"case {case.identifier}: {error}") from None


def check_case_files(case: CaseInput) -> None:
    """Geometry of all channel files, and every file the case uses complete and free of NaN/Inf voxels.

    Raises:
        InputImageError: naming the case and the file.
    """
    check_case_geometry(case)
    for channel in case.available:
        check_image_file(case.files[channel], case.identifier)


def check_output_folder(input_folder: str | os.PathLike, output_folder: str | os.PathLike) -> None:
    """Refuse an output folder equal to the input folder or inside it (symbolic links resolved).

    Segmentations written among the inputs would be read as images by the next run.

    Raises:
        ValueError: the output folder is the input folder or lies inside it.
    """
    source, target = Path(input_folder).resolve(), Path(output_folder).resolve()
    if target == source or source in target.parents:
        where = "is" if target == source else "lies inside"
        raise ValueError(f"output folder {output_folder} {where} the input folder {input_folder}; segmentations "
                         f"written there would be read as images by the next run, choose another -o")


def check_writable(folder: str | os.PathLike) -> None:
    """Refuse an output folder that cannot be created or written, before any work is done.

    Raises:
        PermissionError: the folder, or the nearest existing folder above it, is not writable.
        NotADirectoryError: a file stands where the folder (or a folder above it) should be.
    """
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write to {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {folder}: {existing} is not writable")


def check_checkpoints(model_folder: str | os.PathLike, folds: Sequence[int | str] | None,
                      checkpoint_name: str) -> None:
    """Every requested fold (or, with ``folds`` None, at least one fold) has ``checkpoint_name``.

    Raises:
        FileNotFoundError: naming the missing files and the checkpoints that do exist.
    """
    model = Path(model_folder)
    if folds is None:
        found = [p for p in model.glob("fold_*") if p.name != "fold_all" and (p / checkpoint_name).is_file()]
        missing = [] if found else [str(model / "fold_*" / checkpoint_name)]
    else:
        missing = [str(model / f"fold_{f}" / checkpoint_name) for f in folds
                   if not (model / f"fold_{f}" / checkpoint_name).is_file()]
    if missing:
        existing = sorted(str(p.relative_to(model)) for p in model.glob("fold_*/*.pth"))
        raise FileNotFoundError(f"checkpoint not found: {', '.join(missing)}; checkpoints in {model}: "
                                f"{existing or 'none'}")


def model_file_ending(model_folder: str | os.PathLike) -> str:
    """``file_ending`` of a trained model's ``dataset.json`` (read without loading the model)."""
    file = Path(model_folder) / "dataset.json"
    try:
        return json.loads(file.read_text())["file_ending"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} not found; is {model_folder} a trained nnU-Net model folder?") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{file} is not a valid dataset.json (key 'file_ending': {error})") from None


class MissingModalityPredictor:
    """A trained nnU-Net model that predicts from any subset of the four modalities.

    Args:
        model_folder: ``<nnUNet_results>/DatasetNNN/<trainer>__<plans>__<configuration>``.
        folds: folds to ensemble (default: all folds found).
        checkpoint_name: checkpoint file in each fold folder.
        device: torch device.
        tile_step_size: sliding-window step as a fraction of the patch size.
        use_mirroring: mirroring test-time augmentation (if the model allows it).
        progress: show nnU-Net's sliding-window progress bars.
    """

    def __init__(self, model_folder: str | os.PathLike, *, folds: Sequence[int | str] | None = None,
                 checkpoint_name: str = "checkpoint_final.pth", device: torch.device | str = "cpu",
                 tile_step_size: float = 0.5, use_mirroring: bool = True, progress: bool = False) -> None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        register()  # our trainers must be found by name when nnU-Net restores the network
        check_checkpoints(model_folder, folds, checkpoint_name)
        device = torch.device(device)
        self.predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                         perform_everything_on_device=device.type == "cuda", device=device,
                                         verbose=False, verbose_preprocessing=False, allow_tqdm=progress)
        self.predictor.initialize_from_trained_model_folder(str(model_folder), folds, checkpoint_name)
        _channel_index_of_model(self.predictor.dataset_json)
        self.reader = self.predictor.plans_manager.image_reader_writer_class()

    @property
    def file_ending(self) -> str:
        return self.predictor.dataset_json["file_ending"]

    def read_case(self, case: CaseInput, *, check: bool = True) -> tuple[np.ndarray, dict]:
        """Read the present channels (nnU-Net's reader and axis order) and zero-fill the missing ones.

        ``check`` runs :func:`check_case_files` first (skip it only for a case already checked).
        """
        if check:
            check_case_files(case)
        arrays, properties = {}, None
        for channel in case.available:
            array, props = self.reader.read_images([str(case.files[channel])])
            if not np.isfinite(array).all():  # also for formats check_image_file does not scan
                raise InputImageError(f"case {case.identifier}: {case.files[channel]} has NaN/Inf voxels")
            arrays[channel], properties = array[0], props
        shape = next(iter(arrays.values())).shape
        image = np.zeros((mods.NUM_MODALITIES, *shape), dtype=np.float32)
        for channel, array in arrays.items():
            image[channel] = array
        return image, properties

    def preprocess(self, image: np.ndarray, properties: dict) -> tuple[torch.Tensor, dict]:
        """nnU-Net's preprocessing (crop, resample, normalise) of a (C, ...) image."""
        p = self.predictor
        preprocessor = p.configuration_manager.preprocessor_class(verbose=False)
        data, _, data_properties = preprocessor.run_case_npy(image, None, properties, p.plans_manager,
                                                              p.configuration_manager, p.dataset_json)
        return torch.from_numpy(data).float(), data_properties

    def predict_logits(self, data: torch.Tensor, available: Sequence[int]) -> torch.Tensor:
        """Sliding-window logits of a preprocessed tensor with the channels not in ``available`` set to zero."""
        masked = data.clone()
        missing = [c for c in range(mods.NUM_MODALITIES) if c not in set(available)]
        if missing:
            masked[missing] = 0
        return self.predictor.predict_logits_from_preprocessed_data(masked)

    @torch.inference_mode()
    def predict_logits_many(self, data: torch.Tensor, combinations: Sequence[Sequence[int]], batch_size: int = 5,
                            progress: bool = False) -> list[torch.Tensor]:
        """Logits of several modality subsets at once: each sliding window is predicted as a batch of masked copies.

        The same padding, windows, Gaussian weighting, mirroring and fold ensembling as nnU-Net's
        ``predict_sliding_window_return_logits``, with ``batch_size`` combinations per forward pass.
        """
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian
        from nnunetv2.utilities.helpers import dummy_context

        p = self.predictor
        device, results = p.device, torch.device("cpu")
        p.network = p.network.to(device).eval()
        patch_size = tuple(p.configuration_manager.patch_size)
        padded, revert = pad_nd_image(data, patch_size, "constant", {"value": 0}, True, None)
        slicers = p._internal_get_sliding_window_slicers(padded.shape[1:])
        gaussian = compute_gaussian(patch_size, sigma_scale=1. / 8, value_scaling_factor=10, device=results) \
            if p.use_gaussian else 1
        masks = torch.zeros(len(combinations), data.shape[0], device=device)
        for k, combination in enumerate(combinations):
            masks[k, list(combination)] = 1
        masks = masks.view(*masks.shape, *([1] * len(patch_size)))  # (K, C, 1, ...)
        total = None
        for parameters in p.list_of_parameters:
            p.network.load_state_dict(parameters)
            logits = torch.zeros((len(combinations), p.label_manager.num_segmentation_heads, *padded.shape[1:]),
                                 dtype=torch.half, device=results)
            counts = torch.zeros(padded.shape[1:], dtype=torch.half, device=results)
            with torch.autocast(device.type, enabled=True) if device.type == "cuda" else dummy_context():
                for window in tqdm(slicers, desc="windows", leave=False, disable=not progress):
                    patch = padded[window][None].to(device)  # (1, C, *patch)
                    for start in range(0, len(combinations), batch_size):
                        batch = patch * masks[start:start + batch_size]  # (k, C, *patch)
                        prediction = p._internal_maybe_mirror_and_predict(batch).to(results)
                        if p.use_gaussian:
                            prediction *= gaussian
                        logits[(slice(start, start + batch_size), *window)] += prediction
                    counts[window[1:]] += gaussian
            logits = (logits / counts).float()
            total = logits if total is None else total + logits
        total /= len(p.list_of_parameters)
        return [total[k][(slice(None), *revert[1:])] for k in range(len(combinations))]

    def logits_to_segmentation(self, logits: torch.Tensor, data_properties: dict) -> np.ndarray:
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        p = self.predictor
        return convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, p.plans_manager, p.configuration_manager, p.label_manager, data_properties)

    def export(self, logits: torch.Tensor, data_properties: dict, output_truncated: str,
               save_probabilities: bool = False) -> None:
        from nnunetv2.inference.export_prediction import export_prediction_from_logits

        p = self.predictor
        export_prediction_from_logits(logits, data_properties, p.configuration_manager, p.plans_manager,
                                      p.dataset_json, output_truncated, save_probabilities)


def model_folder(dataset: int | str, configuration: str, trainer: str = "nnUNetTrainer",
                 plans: str = "nnUNetPlans", results_folder: str | os.PathLike | None = None) -> Path:
    """``$nnUNet_results/DatasetNNN_Name/<trainer>__<plans>__<configuration>`` (must exist)."""
    base = Path(results_folder or os.environ.get("nnUNet_results") or "")
    if not str(base) or str(base) == ".":
        raise RuntimeError("nnUNet_results is not set; export nnUNet_results=/path/to/nnUNet_results")
    folder = base / find_dataset_folder(base, dataset) / f"{trainer}__{plans}__{configuration}"
    if not folder.is_dir():
        raise FileNotFoundError(f"no trained model at {folder}")
    return folder


def predict_folder(input_folder: str | os.PathLike, output_folder: str | os.PathLike, model: str | os.PathLike, *,
                   folds: Sequence[int | str] | None = None, checkpoint_name: str = "checkpoint_final.pth",
                   device: str = "cpu", tile_step_size: float = 0.5, use_mirroring: bool = True,
                   save_probabilities: bool = False, available: Sequence[int] | None = None,
                   availability_file: str | os.PathLike | None = None, num_parts: int = 1, part_id: int = 0,
                   progress: bool = True, postprocessing: str | os.PathLike | None = None) -> list[str]:
    """Predict every case of ``input_folder`` with the modalities it has (see the module docstring).

    All cases are checked (output folder, names, availability, geometry, complete and finite images,
    checkpoints, the post-processing file) before the model is loaded and anything is written.

    ``postprocessing``: a ``postprocessing.pkl`` (nnU-Net's format, e.g. from ``determine-postprocessing``) applied
    to every segmentation as ``nnUNetv2_apply_postprocessing`` would; probabilities stay the network's.

    Returns:
        The identifiers of the predicted cases (this part's share when ``num_parts`` > 1).

    Raises:
        ValueError: invalid parts, the output folder is the input folder or inside it, or ``postprocessing`` is
            not a post-processing pickle.
        InputImageError: a case cannot be used (the message names the case and the file).
        FileNotFoundError: a checkpoint or the post-processing file is missing.
    """
    from nnunetv2.postprocessing.remove_connected_components import load_postprocess_save

    from nnunet_missingmod.evaluation.postprocessing import load_postprocessing

    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"need num_parts >= 1 and 0 <= part_id < num_parts, got {num_parts=}, {part_id=}")
    check_output_folder(input_folder, output_folder)
    check_writable(output_folder)
    if availability_file is None and (Path(input_folder).parent / "modality_availability.json").is_file():
        availability_file = Path(input_folder).parent / "modality_availability.json"
    cases = find_cases(input_folder, model_file_ending(model), available, availability_file)[part_id::num_parts]
    for case in cases:
        check_case_files(case)
    pp_functions, pp_kwargs = load_postprocessing(postprocessing) if postprocessing else ([], [])
    predictor = MissingModalityPredictor(model, folds=folds, checkpoint_name=checkpoint_name, device=device,
                                         tile_step_size=tile_step_size, use_mirroring=use_mirroring)
    output = Path(output_folder)
    output.mkdir(parents=True, exist_ok=True)
    used = {}
    for case in tqdm(cases, desc="predicting", unit="case", disable=not progress):
        image, properties = predictor.read_case(case, check=False)
        data, data_properties = predictor.preprocess(image, properties)
        logits = predictor.predict_logits(data, case.available)
        predictor.export(logits, data_properties, str(output / case.identifier), save_probabilities)
        if pp_functions:
            segmentation = str(output / f"{case.identifier}{predictor.file_ending}")
            load_postprocess_save(segmentation, segmentation, predictor.reader, pp_functions, pp_kwargs)
        used[case.identifier] = [mods.MODALITIES[c] for c in case.available]
    with open(output / "modalities_used.json", "w") as f:
        json.dump(used, f, indent=2)
    return list(used)
