"""synthesize: only missing channels written, acquired ones byte-identical, geometry kept, values as computed by hand.

The synthesis model is a stand-in that follows the inference contract of the UTAD-Net student: ``translate`` is a
fixed affine map per target modality, so the expected output can be computed independently with numpy (z-score
over the brain, weighted sum of the sources, intensity rule). Plans are hand-written (a ``2d`` configuration
whose spacing equals the images' in-plane spacing, so nnU-Net's preprocessing does not resample), and the model
folder is an nnU-Net trainer folder with ``plans.json``, ``dataset.json`` and ``fold_0/checkpoint_final.pth``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from nnunet_missingmod import cli
from nnunet_missingmod import modalities as mods
from nnunet_missingmod.data.nifti import InputImageError
from nnunet_missingmod.inference import synthesize as synthesis
from nnunet_missingmod.inference.synthesize import (
    SynthesisModelError,
    combination_weights,
    load_synthesis_model,
    merge_parts,
    synthesize,
)
from tests.conftest import tiny_dataset_json, tiny_plans
from tests.inference.helpers import snapshot, truncate

SHAPE = (12, 24, 20)  # SimpleITK array order (z, y, x)
SPACING = (1.0, 1.0, 1.5)  # SimpleITK order (x, y, z)
ORIGIN = (10.0, -5.0, 3.0)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
SCALE = (1.0, -0.5, 2.0, 0.75)  # stand-in translation per target modality
SHIFT = (0.0, 0.1, -0.2, 0.3)
#: validation SSIM [source][target] of the stand-in model (null on the diagonal)
VALIDATION = [[None, 0.7, 0.6, 0.5], [0.8, None, 0.4, 0.3], [0.6, 0.5, None, 0.9], [0.5, 0.4, 0.9, None]]
DATASET = "Dataset970_SynthInput"


class LinearGenerator(nn.Module):
    """Stand-in student generator: ``translate`` = scale[t] * source + shift[t]; refuses undivisible slices."""

    num_modalities = mods.NUM_MODALITIES
    total_stride = (8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(SCALE))
        self.shift = nn.Parameter(torch.tensor(SHIFT))
        self.seen_shapes: list[tuple[int, ...]] = []

    def translate(self, source: torch.Tensor, target_modality: torch.Tensor) -> torch.Tensor:
        if source.ndim != 4 or source.shape[1] != 1 or any(
                n % s for n, s in zip(source.shape[2:], self.total_stride, strict=True)):
            raise ValueError(f"bad source shape {tuple(source.shape)}")
        self.seen_shapes.append(tuple(source.shape))
        return source * self.scale[target_modality].view(-1, 1, 1, 1) + self.shift[target_modality].view(-1, 1, 1, 1)


class StandInSynthesisTrainer:
    """What the loader needs of a trainer class: the static ``build_network_architecture``."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision=True):
        return LinearGenerator()


# ---------------------------------------------------------------------------------------------- helpers


def synthesis_plans(in_plane_spacing=(1.0, 1.0), transpose=(0, 1, 2)) -> dict:
    """Hand-written plans with one ``2d`` configuration (z-score with the non-zero mask, as nnU-Net plans BraTS)."""
    plans = tiny_plans(patch_size=(16, 16))
    configuration = plans["configurations"].pop("3d_tiny")
    configuration.update(data_identifier="nnUNetPlans_2d", spacing=list(in_plane_spacing))
    plans["configurations"]["2d"] = configuration
    plans.update(transpose_forward=list(transpose), transpose_backward=list(np.argsort(transpose).tolist()),
                 original_median_spacing_after_transp=[1.5, 1.0, 1.0],
                 original_median_shape_after_transp=list(SHAPE),
                 foreground_intensity_properties_per_channel={str(c): {"mean": 0.0, "std": 1.0} for c in range(4)})
    return plans


def make_model(root: Path, *, plans: dict | None = None, validation=VALIDATION, channel_names=None,
               folds=(0,), brain=None, brain_folds=None, histogram=None) -> Path:
    """An nnU-Net trainer folder of the stand-in (plans.json, dataset.json, fold_F/checkpoint_final.pth); the
    validation file has ``validation`` as its whole-slice matrices and ``brain`` as ``ssim_brain`` (in the folds
    ``brain_folds``, default all), if given, and the entries of the dict ``histogram`` (histogram fallback)."""
    folder = root / "Dataset971_Synth" / "StandInSynthesisTrainer__nnUNetPlans__2d"
    folder.mkdir(parents=True)
    dataset_json = tiny_dataset_json()
    if channel_names is not None:
        dataset_json["channel_names"] = channel_names
    (folder / "plans.json").write_text(json.dumps(plans or synthesis_plans()))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        torch.save({"network_weights": LinearGenerator().state_dict(), "trainer_name": "StandInSynthesisTrainer",
                    "init_args": {"configuration": "2d"}}, folder / f"fold_{fold}" / "checkpoint_final.pth")
        if validation is not None:
            content = {"channel_names": dataset_json["channel_names"], "ssim": validation, "psnr": validation,
                       "num_slices": [[1] * 4] * 4}
            if brain is not None and (brain_folds is None or fold in brain_folds):
                content["ssim_brain"] = brain
            content |= histogram or {}
            (folder / f"fold_{fold}" / synthesis.VALIDATION_FILE).write_text(json.dumps(content))
    return folder


def brain_mask() -> np.ndarray:
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    return (z / 0.9) ** 2 + (y / 0.8) ** 2 + (x / 0.75) ** 2 <= 1


def channel_array(channel: int, seed: int) -> np.ndarray:
    """A smooth, noisy positive image inside the brain, exactly 0 outside (int16, like BraTS)."""
    rng = np.random.default_rng(1000 * seed + channel)
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    image = 300 + 80 * channel + 60 * np.sin(x / 3.0 + channel) * np.cos(y / 4.0) + 20 * z / SHAPE[0]
    image = image + rng.normal(0, 10, SHAPE)
    return np.where(brain_mask(), np.clip(image, 1, None), 0).astype(np.int16)


def _brain_extent() -> tuple[int, ...]:
    """Size of the brain's bounding box per axis, counted by hand."""
    mask = brain_mask()
    return tuple(int(np.sum(mask.any(axis=tuple(b for b in range(3) if b != a)))) for a in range(3))


def put_nan(file: Path) -> None:
    """Rewrite ``file`` as float32 with one NaN and one Inf voxel, keeping its geometry."""
    image = sitk.ReadImage(str(file))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[3, 5, 6], array[4, 6, 7] = np.nan, np.inf
    damaged = sitk.GetImageFromArray(array)
    damaged.CopyInformation(image)
    sitk.WriteImage(damaged, str(file), True)


def write_image(file: Path, array: np.ndarray, spacing=SPACING) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(file), True)


def write_case(folder: Path, case: str, channels, seed: int, zero: tuple[int, ...] = ()) -> dict[int, np.ndarray]:
    """Channel files of a case (``zero``: written as all-zero placeholders); returns the real arrays."""
    arrays = {}
    for channel in channels:
        arrays[channel] = channel_array(channel, seed)
        write_image(folder / f"{case}_{channel:04d}.nii.gz", np.zeros(SHAPE, np.int16) if channel in zero
                    else arrays[channel])
    return arrays


def write_labels(file: Path) -> None:
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    distance = np.sqrt((z - 6) ** 2 + (y - 12) ** 2 + (x - 9) ** 2)
    labels = np.select([distance < 1.5, distance < 2.5, distance < 4], [3, 2, 1], 0).astype(np.uint8)
    write_image(file, labels)


def make_dataset(root: Path) -> tuple[Path, dict]:
    """A raw dataset: 2 training cases (convert-brats style: zero-filled files + manifest) and 1 test case."""
    from nnunet_missingmod.data.raw_dataset import write_availability, write_dataset_json

    folder = root / DATASET
    arrays = {"A": write_case(folder / "imagesTr", "A", range(4), seed=1, zero=(1, 2)),  # t1, flair acquired
              "B": write_case(folder / "imagesTr", "B", range(4), seed=2, zero=(3,)),  # t1, t1ce, t2 acquired
              "C": write_case(folder / "imagesTs", "C", range(4), seed=3, zero=(0,))}  # t1ce, t2, flair
    for case in ("A", "B"):
        write_labels(folder / "labelsTr" / f"{case}.nii.gz")
    write_dataset_json(folder, dataset_name=DATASET, num_training=2, converted_by="nnunet_missingmod test")
    write_availability(folder, {"A": ["t1", "flair"], "B": ["t1", "t1ce", "t2"], "C": ["t1ce", "t2", "flair"]})
    return folder, arrays


def expected_channel(arrays: dict[int, np.ndarray], acquired, target: int, weights: dict[int, float]) -> np.ndarray:
    """By hand: z-score of each source over the brain, weighted stand-in translations, then the intensity rule."""
    brain = np.zeros(SHAPE, dtype=bool)
    for channel in acquired:
        brain |= arrays[channel] != 0
    combined = np.zeros(SHAPE)
    for source, weight in weights.items():
        values = arrays[source].astype(np.float64)
        z = (values - values[brain].mean()) / values[brain].std()
        combined += weight * (SCALE[target] * z + SHIFT[target])
    mean = np.mean([arrays[c][brain].astype(np.float64).mean() for c in acquired])
    sd = np.mean([arrays[c][brain].astype(np.float64).std() for c in acquired])
    return np.where(brain, mean + sd * combined, 0.0)


def read(file: Path) -> tuple[np.ndarray, tuple]:
    image = sitk.ReadImage(str(file))
    return sitk.GetArrayFromImage(image), (image.GetSize(), image.GetSpacing(), image.GetOrigin(),
                                           image.GetDirection())


@pytest.fixture
def dataset(tmp_path):
    folder, arrays = make_dataset(tmp_path / "raw")
    return folder, arrays, make_model(tmp_path / "results")


def _load(model: Path, **kwargs):
    return load_synthesis_model(model, trainer_class=StandInSynthesisTrainer, **kwargs)


def _loadf(model: Path):
    """Loaded with the histogram fallback on."""
    return _load(model, histogram_fallback=True)


# ---------------------------------------------------------------------------------------------- behaviour


def test_raw_dataset_only_missing_channels_synthesised_as_computed_by_hand(dataset, tmp_path):
    source, arrays, model = dataset
    before = snapshot(source)
    out = tmp_path / "raw" / "Dataset972_SynthOutput"
    result = synthesize(source, out, _load(model), combine="ssim", progress=False)
    assert result["cases"] == 3 and result["synthesized_channels"] == 2 + 1 + 1
    assert snapshot(source) == before  # the input is never touched
    expected_acquired = {"A": (0, 3), "B": (0, 1, 2), "C": (1, 2, 3)}
    folders = {"A": "imagesTr", "B": "imagesTr", "C": "imagesTs"}
    for case, acquired in expected_acquired.items():
        for channel in range(4):
            written = out / folders[case] / f"{case}_{channel:04d}.nii.gz"
            original = source / folders[case] / f"{case}_{channel:04d}.nii.gz"
            if channel in acquired:
                assert written.read_bytes() == original.read_bytes()  # bit-identical copy
                continue
            values, geometry = read(written)
            assert geometry == read(original)[1]  # size, spacing, origin and direction kept
            ssim = np.array(VALIDATION, dtype=float)
            sources = [s for s in acquired]
            weights = {s: ssim[s, channel] / sum(ssim[t, channel] for t in sources) for s in sources}
            expected = expected_channel(arrays[case], acquired, channel, weights)
            assert values.dtype == np.float32
            np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-2)
            assert np.all(values[~brain_mask()] == 0)
    for name in ("dataset.json", "labelsTr/A.nii.gz", "labelsTr/B.nii.gz"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    manifest = json.loads((out / "modality_availability.json").read_text())
    assert manifest["synthetic"] == {"A": ["t1ce", "t2"], "B": ["flair"], "C": ["t1"]}
    assert manifest["acquired"] == {"A": ["t1", "flair"], "B": ["t1", "t1ce", "t2"], "C": ["t1ce", "t2", "flair"]}
    assert manifest["cases"] == {case: list(mods.MODALITIES) for case in "ABC"}
    assert manifest["synthesis"]["combination"]["A/t2"] == "ssim"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_output_is_a_valid_nnunet_raw_dataset(dataset, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    source, _, model = dataset
    out = tmp_path / "raw" / "Dataset973_SynthOutput"
    synthesize(source, out, _load(model), progress=False)
    verify_dataset_integrity(str(out), num_processes=1)  # raises on any problem
    from nnunet_missingmod.data.raw_dataset import read_availability

    assert read_availability(out / "modality_availability.json")["A"] == (0, 1, 2, 3)


def test_empty_test_folder_of_a_raw_dataset_stays_empty(dataset, tmp_path):
    source, _, model = dataset
    for file in (source / "imagesTs").iterdir():
        file.unlink()
    out = tmp_path / "raw" / "Dataset976_Out"
    synthesize(source, out, _load(model), progress=False)
    assert (out / "imagesTs").is_dir() and not any((out / "imagesTs").iterdir())
    assert len(list((out / "imagesTr").iterdir())) == 8


def test_case_folder_zero_files_and_absent_files_are_missing(tmp_path):
    """Without a manifest, an absent file and an all-zero file are missing; --available overrides both."""
    cases = tmp_path / "cases"
    arrays = write_case(cases, "P", (0, 2, 3), seed=4, zero=(2,))  # t1ce absent, t2 all zero
    model = _load(make_model(tmp_path / "results"))
    synthesize(cases, tmp_path / "out", model, combine="mean", progress=False)
    manifest = json.loads((tmp_path / "out" / "modality_availability.json").read_text())
    assert manifest["acquired"] == {"P": ["t1", "flair"]} and manifest["synthetic"] == {"P": ["t1ce", "t2"]}
    values, _ = read(tmp_path / "out" / "P_0001.nii.gz")
    np.testing.assert_allclose(values, expected_channel(arrays, (0, 3), 1, {0: 0.5, 3: 0.5}), rtol=1e-4, atol=1e-2)
    synthesize(cases, tmp_path / "out_flair", model, available=(3,), progress=False)
    manifest = json.loads((tmp_path / "out_flair" / "modality_availability.json").read_text())
    assert manifest["synthetic"] == {"P": ["t1", "t1ce", "t2"]}
    values, _ = read(tmp_path / "out_flair" / "P_0000.nii.gz")  # t1 from flair alone
    np.testing.assert_allclose(values, expected_channel(arrays, (3,), 0, {3: 1.0}), rtol=1e-4, atol=1e-2)


def test_best_rule_and_missing_validation_file(tmp_path):
    cases = tmp_path / "cases"
    arrays = write_case(cases, "Q", (0, 2), seed=5)
    best = _load(make_model(tmp_path / "r1"))
    synthesize(cases, tmp_path / "best", best, combine="best", progress=False)
    values, _ = read(tmp_path / "best" / "Q_0003.nii.gz")  # flair: SSIM t1 0.5 < t2 0.9 -> t2 only
    np.testing.assert_allclose(values, expected_channel(arrays, (0, 2), 3, {2: 1.0}), rtol=1e-4, atol=1e-2)
    plain = _load(make_model(tmp_path / "r2", validation=None))
    synthesize(cases, tmp_path / "plain", plain, progress=False)
    values, _ = read(tmp_path / "plain" / "Q_0003.nii.gz")
    np.testing.assert_allclose(values, expected_channel(arrays, (0, 2), 3, {0: 0.5, 2: 0.5}), rtol=1e-4, atol=1e-2)
    manifest = json.loads((tmp_path / "plain" / "modality_availability.json").read_text())
    assert manifest["synthesis"]["combination"]["Q/flair"] == "mean (fallback: no synthesis_validation.json)"


def test_the_rules_read_the_ssim_over_the_brain_where_the_file_has_it(tmp_path):
    """A model validated since ``ssim_brain`` exists is combined by it; an older one (``ssim`` only), or folds of
    both kinds, by the whole-slice ``ssim``; the manifest says which."""
    cases = tmp_path / "cases"
    arrays = write_case(cases, "R", (0, 2), seed=6)
    brain = [[None, 0.7, 0.6, 0.45], [0.8, None, 0.4, 0.3], [0.6, 0.5, None, -0.2], [0.5, 0.4, 0.9, None]]
    for name, kwargs, source, metric in (("new", {"brain": brain}, 0, "ssim_brain"),  # flair: t1 0.45 > t2 -0.2
                                         ("old", {}, 2, "ssim"),  # whole slices: t1 0.5 < t2 0.9
                                         ("mixed", {"brain": brain, "folds": (0, 1), "brain_folds": (0,)}, 2, "ssim")):
        model = _load(make_model(tmp_path / f"r_{name}", **kwargs))
        assert model.validation_metric == metric
        synthesize(cases, tmp_path / name, model, combine="best", progress=False)
        values, _ = read(tmp_path / name / "R_0003.nii.gz")
        np.testing.assert_allclose(values, expected_channel(arrays, (0, 2), 3, {source: 1.0}), rtol=1e-4, atol=1e-2)
        manifest = json.loads((tmp_path / name / "modality_availability.json").read_text())
        assert manifest["synthesis"]["validation_metric"] == metric
        assert manifest["synthesis"]["combine"] == "best" and manifest["synthesis"]["combination"]["R/flair"] == "best"


def _z_scores(arrays: dict[int, np.ndarray], acquired) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """By hand: each acquired channel's z-score over the brain (the union of the acquired non-zero voxels)."""
    brain = np.zeros(SHAPE, dtype=bool)
    for channel in acquired:
        brain |= arrays[channel] != 0
    z = {}
    for channel in acquired:
        values = arrays[channel].astype(np.float64)
        z[channel] = (values - values[brain].mean()) / values[brain].std()
    return z, brain


def test_histogram_fallback_replaces_the_pairs_where_histogram_matching_validated_better(tmp_path):
    """t2 -> flair: histogram matching 0.5 > the model's 0.3, so that pair is the t2 z-scores given flair's stored
    histogram; t1 -> flair keeps the model (0.2 < 0.45). The stored flair histogram is a scaled, shifted copy of
    this case's own t2 z-scores, so histogram matching must give 1.5 z + 0.25 (the increasing map of a distribution
    onto such a copy of itself is that affine map)."""
    cases = tmp_path / "cases"
    arrays = write_case(cases, "H", (0, 2), seed=7)
    z, brain = _z_scores(arrays, (0, 2))
    flair = np.quantile(1.5 * z[2][brain] + 0.25, np.linspace(0, 1, 1001))
    brain_ssim = [[None, 0.7, 0.6, 0.45], [0.8, None, 0.4, 0.3], [0.6, 0.5, None, 0.3], [0.5, 0.4, 0.9, None]]
    matched_ssim = [[None, 0.1, 0.1, 0.2], [0.1, None, 0.1, 0.1], [0.1, 0.1, None, 0.5], [0.1, 0.1, 0.1, None]]
    quantiles = [np.linspace(-2, 2, 1001).tolist()] * 3 + [flair.tolist()]
    folder = make_model(tmp_path / "r", brain=brain_ssim,
                        histogram={"histogram_ssim_brain": matched_ssim, "histogram_quantiles": quantiles})
    model = _load(folder, histogram_fallback=True)
    assert model.fallback_pairs == {(2, 3)} and model.fallback_names == ["t2->flair"]
    synthesize(cases, tmp_path / "out", model, combine="ssim", progress=False)
    weights = {0: 0.45 / 0.95, 2: 0.5 / 0.95}
    combined = weights[0] * (SCALE[3] * z[0] + SHIFT[3]) + weights[2] * (1.5 * z[2] + 0.25)
    mean = np.mean([arrays[c][brain].astype(np.float64).mean() for c in (0, 2)])
    sd = np.mean([arrays[c][brain].astype(np.float64).std() for c in (0, 2)])
    values, _ = read(tmp_path / "out" / "H_0003.nii.gz")
    error = np.abs(values[brain] - (mean + sd * combined)[brain]) / sd  # in z-score units
    # 1001 stored quantiles: exact but for the interpolation between them, coarse only in the tails
    assert np.quantile(error, 0.99) < 0.02 and error.max() < 0.15
    assert np.all(values[~brain] == 0)
    manifest = json.loads((tmp_path / "out" / "modality_availability.json").read_text())["synthesis"]
    assert manifest["histogram_fallback"] == ["t2->flair"]
    assert manifest["combination"]["H/flair"] == "ssim (histogram matching from t2)"
    assert manifest["combination"]["H/t1ce"] == "ssim"  # t1 -> t1ce and t2 -> t1ce keep the model
    # without the option (the default): the model on every pair, weighted by its own SSIM
    plain = _load(folder)
    assert plain.fallback_pairs == frozenset()
    synthesize(cases, tmp_path / "plain", plain, combine="ssim", progress=False)
    values, _ = read(tmp_path / "plain" / "H_0003.nii.gz")
    np.testing.assert_allclose(values, expected_channel(arrays, (0, 2), 3, {0: 0.45 / 0.75, 2: 0.3 / 0.75}),
                               rtol=1e-4, atol=1e-2)
    assert json.loads((tmp_path / "plain" / "modality_availability.json").read_text())["synthesis"][
        "histogram_fallback"] == []


def test_fallback_pairs_by_hand():
    model = np.array([[np.nan, 0.5, 0.4, 0.3], [0.5, np.nan, 0.2, 0.1], [0.1, 0.1, np.nan, 0.6],
                      [0.2, 0.2, 0.2, np.nan]])
    histogram = np.array([[0.9, 0.6, 0.3, np.nan], [0.4, 0.9, 0.3, 0.2], [0.2, 0.1, 0.9, 0.5],
                          [0.3, np.nan, 0.3, 0.9]])
    quantiles = np.array([[0.0, 1.0]] * 3 + [[np.nan, np.nan]])  # no FLAIR histogram stored
    # higher than the model, never the diagonal, never NaN, never a target without a histogram (1 -> 3)
    assert synthesis.fallback_pairs(model, histogram, quantiles) == {(0, 1), (1, 2), (2, 0), (3, 0), (3, 2)}


def test_histogram_fallback_needs_both_entries_the_brain_ssim_and_a_target_histogram(tmp_path):
    brain_ssim = [[None, 0.2, 0.2, 0.2]] + [[0.2 if s != t else None for t in range(4)] for s in range(1, 4)]
    better = [[None if s == t else 0.5 for t in range(4)] for s in range(4)]
    quantiles = [np.linspace(-2, 2, 11).tolist()] * 4
    entries = {"histogram_ssim_brain": better, "histogram_quantiles": quantiles}
    assert len(_loadf(make_model(tmp_path / "all", brain=brain_ssim, histogram=entries)).fallback_pairs) == 12
    assert not _load(make_model(tmp_path / "default", brain=brain_ssim, histogram=entries)).fallback_pairs  # opt-in
    with pytest.warns(UserWarning, match="--histogram-fallback has no effect: its synthesis_validation.json lacks"):
        assert not _loadf(make_model(tmp_path / "old", brain=brain_ssim)).fallback_pairs  # a model from before
    for name, kwargs in (("whole", {"histogram": entries}),  # no ssim_brain
                         ("half", {"brain": brain_ssim, "histogram": {"histogram_ssim_brain": better}}),
                         ("other_half", {"brain": brain_ssim, "histogram": {"histogram_quantiles": quantiles}})):
        with pytest.warns(UserWarning, match="--histogram-fallback has no effect"):
            assert not _loadf(make_model(tmp_path / name, **kwargs)).fallback_pairs
    no_flair = {**entries, "histogram_quantiles": quantiles[:3] + [None]}
    model = _loadf(make_model(tmp_path / "noflair", brain=brain_ssim, histogram=no_flair))
    assert model.fallback_pairs == {(s, t) for s in range(4) for t in range(3) if s != t}  # never to flair
    for bad in ([[0.0, 1.0]] * 3, [[0.0, 1.0]] * 3 + [[0.0, 1.0, 2.0]], [[1.0, 0.0]] * 4, [[0.0, float("nan")]] * 4,
                [[0.0]] * 4, "x"):
        folder = make_model(tmp_path / f"bad{len(list(tmp_path.iterdir()))}", brain=brain_ssim,
                            histogram={"histogram_ssim_brain": better, "histogram_quantiles": bad})
        with pytest.raises(SynthesisModelError, match=r"synthesis_validation\.json: 'histogram_quantiles' must be"):
            _loadf(folder)


def test_every_command_offers_the_rules_with_the_library_default():
    parser = cli.build_parser()
    for argv in (["synthesize", "-i", "I", "-o", "O", "-m", "M"],
                 ["evaluate-synthesis", "-i", "I", "-o", "O", "-m", "M"],
                 ["evaluate-missing", "-d", "1", "-c", "3d", "-o", "O"]):
        assert parser.parse_args(argv).combine == synthesis.DEFAULT_COMBINE, argv
        assert parser.parse_args(argv).histogram_fallback is False
        assert parser.parse_args([*argv, "--histogram-fallback"]).histogram_fallback is True
        for rule in synthesis.COMBINE_RULES:
            assert parser.parse_args([*argv, "--combine", rule]).combine == rule


def test_combination_weights_by_hand():
    ssim = np.array(VALIDATION, dtype=float)
    weights, how = combination_weights([0, 3], 2, ssim)  # the default
    assert how == "ssim" and weights == pytest.approx({0: 0.6 / 1.5, 3: 0.9 / 1.5})
    assert combination_weights([0, 3], 2, ssim, "best") == ({0: 0.0, 3: 1.0}, "best")
    assert combination_weights([0, 3], 2, ssim, "mean") == ({0: 0.5, 3: 0.5}, "mean")
    assert combination_weights([1], 2, ssim) == ({1: 1.0}, "single source")
    assert combination_weights([0, 1], 0, ssim)[1] == "mean (fallback: a validation SSIM is missing)"  # diagonal
    negative = ssim.copy()
    negative[1, 2] = -0.1  # an inverted translation: no weight, and never the best
    assert combination_weights([0, 1, 3], 2, negative, "ssim") == (
        pytest.approx({0: 0.6 / 1.5, 1: 0.0, 3: 0.9 / 1.5}), "ssim")
    assert combination_weights([0, 1], 2, negative, "best") == ({0: 1.0, 1: 0.0}, "best")
    negative[0, 2] = -0.2
    assert combination_weights([0, 1], 2, negative, "ssim") == (
        {0: 0.5, 1: 0.5}, "mean (fallback: no validation SSIM is positive)")
    assert combination_weights([0, 1], 2, negative, "best") == ({0: 0.0, 1: 1.0}, "best")
    with pytest.raises(ValueError, match="combine rule must be one of ssim, best, mean"):
        combination_weights([0, 1], 2, ssim, "median")


def test_resampled_configuration_returns_to_the_original_geometry(tmp_path):
    """A 2d configuration at half the in-plane spacing: translated at 0.5 mm, written back at 1 mm."""
    cases = tmp_path / "cases"
    arrays = write_case(cases, "R", (0, 3), seed=6)
    model = make_model(tmp_path / "results", plans=synthesis_plans(in_plane_spacing=(0.5, 0.5)))
    loaded = _load(model)
    synthesize(cases, tmp_path / "out", loaded, combine="ssim", progress=False)
    extent = _brain_extent()  # nnU-Net crops to the brain first: (z, y, x) extent of the ellipsoid
    padded = tuple(8 * int(np.ceil(2 * n / 8)) for n in extent[1:])  # y, x at 0.5 mm, padded to the stride 8
    assert {s[2:] for s in loaded.networks[0].seen_shapes} == {padded}
    values, geometry = read(tmp_path / "out" / "R_0001.nii.gz")
    assert geometry == read(cases / "R_0000.nii.gz")[1]
    expected = expected_channel(arrays, (0, 3), 1, {0: 0.8 / 1.1, 3: 0.3 / 1.1})
    interior = brain_mask() & (np.abs(values) > 0)
    # cubic resampling up and down smooths the noise: close to the exact result, not equal
    assert np.corrcoef(values[interior], expected[interior])[0, 1] > 0.97
    assert np.all(values[~brain_mask()] == 0)


def test_slices_follow_the_2d_configuration_axis(tmp_path):
    """With transpose_forward (1, 0, 2) nnU-Net slices along the array's y axis: slices are (z, x)."""
    cases = tmp_path / "cases"
    write_case(cases, "S", (0,), seed=7)
    loaded = _load(make_model(tmp_path / "results", plans=synthesis_plans(transpose=(1, 0, 2))))
    synthesize(cases, tmp_path / "out", loaded, progress=False)
    shapes = {s[2:] for s in loaded.networks[0].seen_shapes}
    extent = _brain_extent()
    assert shapes == {tuple(8 * int(np.ceil(extent[a] / 8)) for a in (0, 2))}  # (z, x) cropped, padded to 8
    # every y slice with brain is run once per missing channel (t1ce, t2, flair), in batches of 16
    assert sum(s[0] for s in loaded.networks[0].seen_shapes) == 3 * extent[1]
    assert read(tmp_path / "out" / "S_0002.nii.gz")[1] == read(cases / "S_0000.nii.gz")[1]


def _part_one_of_two(tmp_path):
    """Three cases with T1 and T1ce, a stand-in model, and part 1 of a 2-part run written into ``tmp_path/out``."""
    cases = tmp_path / "cases"
    for index, case in enumerate(("P1", "P2", "P3")):
        write_case(cases, case, (0, 1), seed=10 + index)
    model = _load(make_model(tmp_path / "results"))
    out = tmp_path / "out"
    synthesize(cases, out, model, num_parts=2, part_id=1, progress=False)
    return cases, model, out


def test_split_into_parts_then_merged(tmp_path):
    cases, model, out = _part_one_of_two(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == [*(f"P2_000{c}.nii.gz" for c in range(4)),
                                                     "synthesis_part_1_of_2.json"]
    assert merge_parts(out) is None  # part 0 still missing
    with pytest.raises(FileExistsError, match="part 1 of 2: 5 of its output files already exist"):
        synthesize(cases, out, model, num_parts=2, part_id=1, progress=False)
    synthesize(cases, out, model, num_parts=2, part_id=0, progress=False)
    manifest = json.loads((out / "modality_availability.json").read_text())
    assert sorted(manifest["synthetic"]) == ["P1", "P2", "P3"] and manifest["synthesis"]["num_parts"] == 2
    # every part's per-channel combination record is kept, not only part 0's
    assert sorted(manifest["synthesis"]["combination"]) == [f"{c}/{m}" for c in ("P1", "P2", "P3")
                                                            for m in ("flair", "t2")]
    assert "part" not in manifest["synthesis"]
    assert not list(out.glob("synthesis_part_*")) and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert len(list(out.glob("*.nii.gz"))) == 12
    many = tmp_path / "many"  # more parts than cases: the empty parts only record that they are done
    for part in range(4):
        synthesize(cases, many, model, num_parts=4, part_id=part, progress=False)
    assert sorted(json.loads((many / "modality_availability.json").read_text())["cases"]) == ["P1", "P2", "P3"]
    with pytest.raises(ValueError, match="-num_parts splits a folder of cases"):
        make_dataset(tmp_path / "raw")
        synthesize(tmp_path / "raw" / DATASET, tmp_path / "o2", model, num_parts=2, progress=False)


def test_parts_with_other_settings_are_refused_before_writing_and_when_merging(tmp_path):
    cases, model, out = _part_one_of_two(tmp_path)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match=r"part 0 of 2: synthesis_part_1_of_2.json .* other settings \(combine: "
                                         r"'ssim' vs 'mean'\)"):
        synthesize(cases, out, model, num_parts=2, part_id=0, combine="mean", progress=False)
    assert sorted(p.name for p in out.iterdir()) == before  # part 0 wrote nothing
    # part files changed by hand (or written by different versions) are not merged either, and are kept
    synthesize(cases, tmp_path / "other", model, num_parts=2, part_id=0, combine="mean", progress=False)
    os.replace(tmp_path / "other" / "synthesis_part_0_of_2.json", out / "synthesis_part_0_of_2.json")
    with pytest.raises(ValueError, match="part 1 of 2 was run with other settings than part 0 .*combine"):
        merge_parts(out)
    assert not (out / "modality_availability.json").exists()
    assert {"synthesis_part_0_of_2.json", "synthesis_part_1_of_2.json"} <= {p.name for p in out.iterdir()}


def test_failure_midway_leaves_nothing_behind(dataset, tmp_path, monkeypatch):
    source, _, model = dataset
    loaded = _load(model)
    calls = {"n": 0}
    original = synthesis.write_image

    def fail_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(synthesis, "write_image", fail_on_second)
    out = tmp_path / "raw" / "Dataset974_Out"
    with pytest.raises(OSError, match="disk full"):
        synthesize(source, out, loaded, progress=False)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [DATASET]


def test_nan_output_of_the_model_is_refused(tmp_path):
    cases = tmp_path / "cases"
    write_case(cases, "N", (0,), seed=8)
    loaded = _load(make_model(tmp_path / "results"))
    with torch.no_grad():
        loaded.networks[0].scale[2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/Inf voxels translating t1 to t2"):
        synthesize(cases, tmp_path / "out", loaded, progress=False)
    assert not (tmp_path / "out").exists()


def test_student_of_the_trainers_synthesizes_a_case_folder(trained_synthesis_model, tmp_path):
    """The real UTADNetStudentTrainer model (nnUNetv2_train, teacher then student) through the CLI."""
    work, student = trained_synthesis_model
    env = json.loads((Path(work) / "env.json").read_text())
    raw = Path(env["nnUNet_raw"])
    dataset = next(p for p in raw.iterdir() if (p / "dataset.json").is_file())
    cases = tmp_path / "cases"
    cases.mkdir()
    images = sorted((dataset / "imagesTs").glob("*.nii.gz")) or sorted((dataset / "imagesTr").glob("*.nii.gz"))
    case = images[0].name[:-len("_0000.nii.gz")]
    for channel in (1, 3):
        (cases / f"{case}_{channel:04d}.nii.gz").write_bytes((images[0].parent / f"{case}_{channel:04d}.nii.gz")
                                                             .read_bytes())
    code = cli.main(["synthesize", "-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(student),
                     "-device", "cpu", "--histogram-fallback"])
    assert code == 0
    for channel in (0, 2):
        values, geometry = read(tmp_path / "out" / f"{case}_{channel:04d}.nii.gz")
        assert geometry == read(cases / f"{case}_0001.nii.gz")[1] and np.isfinite(values).all()
    for channel in (1, 3):
        assert (tmp_path / "out" / f"{case}_{channel:04d}.nii.gz").read_bytes() == \
            (cases / f"{case}_{channel:04d}.nii.gz").read_bytes()
    manifest = json.loads((tmp_path / "out" / "modality_availability.json").read_text())
    assert manifest["synthetic"] == {case: ["t1", "t2"]}
    # the trainer's validation matrices are read and used for the two sources: the model, or histogram matching on
    # the pairs where that validated better (a one-epoch model loses most of them)
    validation = json.loads((student / "fold_0" / synthesis.VALIDATION_FILE).read_text())
    fallback = [(s, t) for s in range(4) for t in range(4) if s != t
                and validation["histogram_ssim_brain"][s][t] > validation["ssim_brain"][s][t]]
    assert manifest["synthesis"]["histogram_fallback"] == [f"{mods.MODALITIES[s]}->{mods.MODALITIES[t]}"
                                                           for s, t in fallback]
    for target in (0, 2):
        how = manifest["synthesis"]["combination"][f"{case}/{mods.MODALITIES[target]}"]
        weight = {s: validation["histogram_ssim_brain" if (s, target) in fallback else "ssim_brain"][s][target]
                  for s in (1, 3)}
        matched = [mods.MODALITIES[s] for s in (1, 3) if (s, target) in fallback and weight[s] > 0]
        if max(weight.values()) <= 0:  # equal weights: every source counts
            matched = [mods.MODALITIES[s] for s in (1, 3) if (s, target) in fallback]
            assert how == "mean (fallback: no validation SSIM is positive)" + (
                f" (histogram matching from {', '.join(matched)})" if matched else ""), how
        else:
            assert how == "ssim" + (f" (histogram matching from {', '.join(matched)})" if matched else ""), how
    labels = images[0].parent.parent / ("labelsTs" if images[0].parent.name == "imagesTs" else "labelsTr")
    code = cli.main(["evaluate-synthesis", "-i", str(images[0].parent), "-l", str(labels), "-o",
                     str(tmp_path / "eval"), "-m", str(student), "--num-cases", "1", "-device", "cpu"])
    assert code == 0 and (tmp_path / "eval" / "table.md").is_file()


# ---------------------------------------------------------------------------------------------- bad input (CLI)


def _run(capsys, *argv):
    try:
        code = cli.main(["synthesize", *argv, "-device", "cpu"])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr()


def _one_line_error(err: str, text: str) -> None:
    assert err.startswith("nnunet_missingmod synthesize: error: ") and err.count("\n") == 1, err
    assert text in err and "Traceback" not in err, err


@pytest.fixture
def cli_setup(tmp_path, monkeypatch):
    """A case folder with two cases and the stand-in model folder, found by name through the loader."""
    monkeypatch.setattr(synthesis, "find_trainer_class", lambda name: StandInSynthesisTrainer)
    cases = tmp_path / "cases"
    write_case(cases, "K1", (0, 3), seed=20)
    write_case(cases, "K2", (1, 2, 3), seed=21)
    return cases, make_model(tmp_path / "results")


def _nothing_left(tmp_path: Path, before: set[str]) -> None:
    assert {p.name for p in tmp_path.iterdir()} == before, sorted(p.name for p in tmp_path.iterdir())


def test_cli_synthesizes_a_case_folder(cli_setup, tmp_path, capsys):
    cases, model = cli_setup
    code, captured = _run(capsys, "-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(model))
    assert code == 0, captured.err
    assert "synthesised 3 channel(s) in 2 case(s)" in captured.out and "slice translations" in captured.out
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 8


def test_cli_refuses_an_existing_output_and_leaves_it_alone(cli_setup, tmp_path, capsys):
    cases, model = cli_setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, captured = _run(capsys, "-i", str(cases), "-o", str(out), "-m", str(model))
    assert code == 2
    _one_line_error(captured.err, f"output {out} already exists; synthesize never overwrites")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_cli_refuses_output_inside_input(cli_setup, tmp_path, capsys):
    cases, model = cli_setup
    before = snapshot(cases)
    code, captured = _run(capsys, "-i", str(cases), "-o", str(cases / "filled"), "-m", str(model))
    assert code == 2
    _one_line_error(captured.err, "lies inside the input folder")
    assert snapshot(cases) == before


def test_cli_geometry_mismatch_names_case_and_file(cli_setup, tmp_path, capsys):
    cases, model = cli_setup
    write_image(cases / "K1_0003.nii.gz", channel_array(3, 20), spacing=(1.0, 1.0, 2.0))
    before = {p.name for p in tmp_path.iterdir()}
    code, captured = _run(capsys, "-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(model))
    assert code == 2
    _one_line_error(captured.err, "case K1: K1_0003.nii.gz and K1_0000.nii.gz differ in spacing")
    _nothing_left(tmp_path, before)


def test_cli_every_modality_missing(cli_setup, tmp_path, capsys):
    cases, model = cli_setup
    for channel in (0, 3):
        write_image(cases / f"K1_{channel:04d}.nii.gz", np.zeros(SHAPE, np.int16))
    before = {p.name for p in tmp_path.iterdir()}
    code, captured = _run(capsys, "-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(model))
    assert code == 2
    _one_line_error(captured.err, "case K1: every modality is missing (the files of t1, flair are all zero)")
    _nothing_left(tmp_path, before)
    for file in cases.glob("K2_*"):
        file.unlink()
    code, captured = _run(capsys, "-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(model),
                          "--available", "t1,flair")
    _one_line_error(captured.err, f"case K1: --available lists t1 as acquired, but {cases / 'K1_0000.nii.gz'} is "
                                  f"all zero")


def test_cli_model_for_other_channels(cli_setup, tmp_path, capsys):
    cases, _ = cli_setup
    other = make_model(tmp_path / "other", channel_names={"0": "T1", "1": "T2", "2": "PD", "3": "Flair"})
    before = {p.name for p in tmp_path.iterdir()}
    code, captured = _run(capsys, "-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(other))
    assert code == 2
    _one_line_error(captured.err, f"{other / 'dataset.json'} has channels ['T1', 'T2', 'PD', 'Flair'], but "
                                  f"synthesis needs the BraTS channels")
    _nothing_left(tmp_path, before)


def test_cli_raw_dataset_of_other_channels(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(synthesis, "find_trainer_class", lambda name: StandInSynthesisTrainer)
    source, _ = make_dataset(tmp_path / "raw")
    meta = json.loads((source / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT"}
    (source / "dataset.json").write_text(json.dumps(meta))
    model = make_model(tmp_path / "results")
    code, captured = _run(capsys, "-i", str(source), "-o", str(tmp_path / "raw" / "Dataset975_X"), "-m", str(model))
    assert code == 2
    _one_line_error(captured.err, f"{source / 'dataset.json'} has channels ['CT']")


def test_cli_dataset_id_already_used(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(synthesis, "find_trainer_class", lambda name: StandInSynthesisTrainer)
    source, _ = make_dataset(tmp_path / "raw")
    model = make_model(tmp_path / "results")
    code, captured = _run(capsys, "-i", str(source), "-o", str(tmp_path / "raw" / "Dataset970_Filled"),
                          "-m", str(model))
    assert code == 2
    _one_line_error(captured.err, f"dataset id 970 of Dataset970_Filled is already used by {DATASET}")
    assert not (tmp_path / "raw" / "Dataset970_Filled").exists()


@pytest.mark.parametrize("damage, message", [(truncate, "(unreadable or truncated)"),
                                             (put_nan, "has 2 NaN/Inf voxel(s)")])
def test_cli_damaged_image(cli_setup, tmp_path, capsys, damage, message):
    cases, model = cli_setup
    file = cases / "K2_0002.nii.gz"
    damage(file)
    before = {p.name for p in tmp_path.iterdir()}
    code, captured = _run(capsys, "-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(model))
    assert code == 2
    _one_line_error(captured.err, "case K2: ")
    assert str(file) in captured.err and message in captured.err
    _nothing_left(tmp_path, before)


def test_cli_missing_checkpoint_and_model_files(cli_setup, tmp_path, capsys):
    cases, model = cli_setup
    before = {p.name for p in tmp_path.iterdir()}
    code, captured = _run(capsys, "-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(model),
                          "-chk", "checkpoint_best.pth")
    assert code == 2
    _one_line_error(captured.err, f"checkpoint not found: {model / 'fold_*' / 'checkpoint_best.pth'}")
    code, captured = _run(capsys, "-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(model), "-f", "1")
    _one_line_error(captured.err, f"checkpoint not found: {model / 'fold_1' / 'checkpoint_final.pth'}")
    code, captured = _run(capsys, "-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "nowhere"))
    _one_line_error(captured.err, f"synthesis model folder {tmp_path / 'nowhere'} does not exist")
    (model / "plans.json").unlink()
    code, captured = _run(capsys, "-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(model))
    _one_line_error(captured.err, f"{model / 'plans.json'} not found")
    _nothing_left(tmp_path, before)


def test_cli_corrupt_validation_file_and_unfitting_weights(cli_setup, tmp_path, capsys):
    cases, model = cli_setup
    (model / "fold_0" / synthesis.VALIDATION_FILE).write_text(json.dumps({"ssim": [[0.5, 0.4]]}))
    before = {p.name for p in tmp_path.iterdir()}
    code, captured = _run(capsys, "-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(model))
    assert code == 2
    _one_line_error(captured.err, f"{model / 'fold_0' / synthesis.VALIDATION_FILE}: 'ssim' must be a 4 x 4 list")
    (model / "fold_0" / synthesis.VALIDATION_FILE).unlink()
    torch.save({"network_weights": {"other": torch.zeros(1)}, "trainer_name": "StandInSynthesisTrainer",
                "init_args": {"configuration": "2d"}}, model / "fold_0" / "checkpoint_final.pth")
    code, captured = _run(capsys, "-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(model))
    _one_line_error(captured.err, "the weights do not fit the network of StandInSynthesisTrainer")
    _nothing_left(tmp_path, before)


def test_not_a_synthesis_network(tmp_path):
    class SegmentationTrainer:
        @staticmethod
        def build_network_architecture(*args, **kwargs):
            return nn.Conv2d(4, 3, 1)

    model = make_model(tmp_path / "results")
    torch.save({"network_weights": nn.Conv2d(4, 3, 1).state_dict(), "trainer_name": "SegmentationTrainer",
                "init_args": {"configuration": "2d"}}, model / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(SynthesisModelError, match="has no translate\\(\\) method"):
        load_synthesis_model(model, trainer_class=SegmentationTrainer)


def test_invalid_options(cli_setup, tmp_path, capsys):
    cases, model = cli_setup
    for options, message in ((("-num_parts", "0"), "argument -num_parts: must be at least 1, got 0"),
                             (("-num_parts", "2", "-part_id", "2"), "need num_parts >= 1 and 0 <= part_id"),
                             (("--combine", "median"), "argument --combine: invalid choice: 'median'"),
                             (("--batch-size", "0"), "argument --batch-size: must be at least 1, got 0")):
        code, captured = _run(capsys, "-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(model), *options)
        assert code == 2 and message in captured.err and "Traceback" not in captured.err, captured.err
    with pytest.raises(InputImageError, match="is a file, not a folder"):
        synthesize(cases / "K1_0000.nii.gz", tmp_path / "out", model)
