"""``case_sampling``: training cases without a label drawn in a chosen share of the samples.

The probabilities are checked against values worked out by hand, and the wiring by counting the cases that
nnU-Net's own training loader (built by the trainer's ``get_dataloaders`` on a preprocessed phantom dataset)
draws.
"""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

from nnunet_missingmod.config import OVERRIDE_ENV
from nnunet_missingmod.trainers import ModalityDropoutTrainer
from tests.conftest import E2E_NAME, make_tiny_trainer

ET = (3,)  # class_locations key of dataset.json's "enhancing tumor": [3]
REGIONS = ((1, 2, 3), (2, 3), ET)


def with_case_sampling(monkeypatch, tmp_path, settings) -> None:
    override = tmp_path / "case_sampling.json"
    override.write_text(json.dumps({"case_sampling": settings}))
    monkeypatch.setenv(OVERRIDE_ENV, str(override))


def write_cases(folder, without_et: list[bool]) -> list[str]:
    """``.pkl`` files as nnU-Net's preprocessing writes them: ``class_locations`` per region (empty = absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, lacks in enumerate(without_et):
        locations = {region: [] if region == ET and lacks else [[0, 1, 2, 3]] for region in REGIONS}
        names.append(f"case_{i}")
        with open(folder / f"case_{i}.pkl", "wb") as f:
            pickle.dump({"class_locations": locations}, f)
    return names


@pytest.mark.parametrize(("without_et", "share", "expected"), [
    # 1 of 4 lacks ET, share 0.1: 0.1 for it, 0.3 each for the others
    ([False, True, False, False], 0.1, [0.3, 0.1, 0.3, 0.3]),
    # 2 of 5 lack ET, share 0.5: 0.25 each for them, 0.5 / 3 for the others
    ([True, False, True, False, False], 0.5, [0.25, 1 / 6, 0.25, 1 / 6, 1 / 6]),
    # 1 of 8, share 0.4: 0.4 for it, 0.6 / 7 each for the others
    ([False] * 7 + [True], 0.4, [0.6 / 7] * 7 + [0.4]),
])
def test_probabilities_by_hand(without_et, share, expected, tmp_path, monkeypatch):
    with_case_sampling(monkeypatch, tmp_path, {"cases_without": "enhancing tumor", "share": share})
    trainer = make_tiny_trainer(ModalityDropoutTrainer, tmp_path, monkeypatch)
    names = write_cases(tmp_path / "cases", without_et)
    probabilities = trainer.case_sampling_probabilities(names, str(tmp_path / "cases"))
    np.testing.assert_allclose(probabilities, expected, atol=1e-12)


def test_off_by_default_and_when_no_case_or_every_case_lacks_the_label(tmp_path, monkeypatch, capsys):
    trainer = make_tiny_trainer(ModalityDropoutTrainer, tmp_path, monkeypatch)
    assert trainer.case_sampling is None
    assert trainer.case_sampling_probabilities(["anything"], str(tmp_path)) is None  # no file is read

    with_case_sampling(monkeypatch, tmp_path, {"cases_without": "enhancing tumor", "share": 0.3})
    trainer = make_tiny_trainer(ModalityDropoutTrainer, tmp_path, monkeypatch)
    for kind, without_et in (("none", [False, False]), ("all", [True, True])):
        names = write_cases(tmp_path / kind, without_et)
        assert trainer.case_sampling_probabilities(names, str(tmp_path / kind)) is None
        assert f"{kind} of the 2 training cases lack 'enhancing tumor'" in capsys.readouterr().out


@pytest.mark.parametrize(("settings", "message"), [
    ({"cases_without": "edema", "share": 0.25}, "'edema', not a foreground label of dataset.json"),
    ({"cases_without": "background", "share": 0.25}, "not a foreground label"),
    ({"cases_without": "ignore", "share": 0.25}, "not a foreground label"),
    ({"cases_without": "enhancing tumor", "share": 0}, "strictly between 0 and 1, got 0"),
    ({"cases_without": "enhancing tumor", "share": 1.0}, "strictly between 0 and 1, got 1.0"),
    ({"cases_without": "enhancing tumor", "share": True}, "got True"),
    ({"cases_without": "enhancing tumor", "share": "0.2"}, "got '0.2'"),
    ({"cases_without": "enhancing tumor"}, "must be null or"),
    ({"cases_without": "enhancing tumor", "share": 0.2, "labels": 3}, "must be null or"),
    ("enhancing tumor", "must be null or"),
])
def test_bad_settings_are_refused_when_the_trainer_is_made(settings, message, tmp_path, monkeypatch):
    with_case_sampling(monkeypatch, tmp_path, settings)
    with pytest.raises(ValueError, match="case_sampling") as error:
        make_tiny_trainer(ModalityDropoutTrainer, tmp_path, monkeypatch)
    assert message in str(error.value)


def test_plain_labels_use_nnunets_integer_keys(tmp_path, monkeypatch):
    """Without regions, nnU-Net stores class_locations per label as an int, also for a label written as [3]."""
    from tests.conftest import tiny_dataset_json

    dataset_json = {**tiny_dataset_json(), "labels": {"background": 0, "edema": 1, "necrosis": 2, "enhancing": [3]}}
    del dataset_json["regions_class_order"]
    with_case_sampling(monkeypatch, tmp_path, {"cases_without": "enhancing", "share": 0.5})
    trainer = make_tiny_trainer(ModalityDropoutTrainer, tmp_path, monkeypatch, dataset_json=dataset_json)
    assert not trainer.label_manager.has_regions
    folder = tmp_path / "cases"
    folder.mkdir()
    for name, enhancing in (("a", []), ("b", [[0, 1, 2, 3]]), ("c", [[0, 4, 5, 6]])):
        with open(folder / f"{name}.pkl", "wb") as f:
            pickle.dump({"class_locations": {1: [[0, 1, 1, 1]], 2: [], 3: enhancing}}, f)
    np.testing.assert_allclose(trainer.case_sampling_probabilities(["a", "b", "c"], str(folder)), [0.5, 0.25, 0.25])


def test_a_case_without_locations_for_the_label_is_named(tmp_path, monkeypatch):
    with_case_sampling(monkeypatch, tmp_path, {"cases_without": "enhancing tumor", "share": 0.25})
    trainer = make_tiny_trainer(ModalityDropoutTrainer, tmp_path, monkeypatch)
    names = write_cases(tmp_path / "cases", [False, True])
    with open(tmp_path / "cases" / "case_1.pkl", "wb") as f:
        pickle.dump({"class_locations": {1: [[0, 1, 2, 3]]}}, f)  # preprocessed with plain labels
    with pytest.raises(ValueError, match=r"case_1\.pkl: no class_locations for label 'enhancing tumor'"):
        trainer.case_sampling_probabilities(names, str(tmp_path / "cases"))


def phantom_trainer_with_one_et_case(trained_model, tmp_path, monkeypatch, share: float, processes: int):
    """A trainer on a copy of the ``trained_model`` fixture's preprocessed phantoms in which every training case
    but the first lacks ET; returns it and the training cases."""
    from tests.conftest import make_trainer

    work, _, _ = trained_model
    preprocessed = tmp_path / "nnUNet_preprocessed"
    shutil.copytree(work / "nnUNet_preprocessed", preprocessed)
    with_case_sampling(monkeypatch, tmp_path, {"cases_without": "enhancing tumor", "share": share})
    monkeypatch.setenv("nnUNet_n_proc_DA", str(processes))
    trainer = make_trainer(work, monkeypatch, ModalityDropoutTrainer)
    trainer.preprocessed_dataset_folder_base = str(preprocessed / E2E_NAME)
    trainer.preprocessed_dataset_folder = str(preprocessed / E2E_NAME / trainer.configuration_manager.data_identifier)
    training_cases, _ = trainer.do_split()
    assert len(training_cases) >= 3
    for case in training_cases:  # the phantoms' ET, if any, is taken away from every case but the first
        path = preprocessed / E2E_NAME / trainer.configuration_manager.data_identifier / f"{case}.pkl"
        properties = pickle.loads(path.read_bytes())
        properties["class_locations"][ET] = [] if case != training_cases[0] else [[0, 1, 2, 3]]
        path.write_bytes(pickle.dumps(properties))
    trainer.initialize()
    return trainer, training_cases


def test_nnunets_training_loader_draws_the_share(trained_model, tmp_path, monkeypatch):
    """The trainer's own loaders on preprocessed phantoms: the cases without ET share ``share`` of the draws, the
    one with ET gets the rest. Without worker processes (nnU-Net's SingleThreadedAugmenter) the loader is reachable."""
    share = 0.6
    trainer, training_cases = phantom_trainer_with_one_et_case(trained_model, tmp_path, monkeypatch, share, 0)
    train_augmenter, val_augmenter = trainer.get_dataloaders()
    loader = train_augmenter.data_loader
    assert val_augmenter.data_loader.sampling_probabilities is None
    draws = np.concatenate([loader.get_indices() for _ in range(3000)])
    with_et = np.mean(draws == training_cases[0])
    assert abs(with_et - (1 - share)) < 0.03, f"case with ET drawn in {with_et:.3f} of the samples, not {1 - share}"
    assert set(draws) == set(training_cases)
    batch = next(train_augmenter)
    assert set(batch["keys"]) <= set(training_cases)


def test_worker_processes_get_the_probabilities(trained_model, tmp_path, monkeypatch):
    """With nnU-Net's worker processes (NonDetMultiThreadedAugmenter) the loader they copy holds the probabilities."""
    trainer, training_cases = phantom_trainer_with_one_et_case(trained_model, tmp_path, monkeypatch, 0.5, 1)
    train_augmenter, val_augmenter = trainer.get_dataloaders()
    try:
        n = len(training_cases)  # the first case has ET, the others share 0.5; in the loader's order of cases
        expected = [0.5 if case == training_cases[0] else 0.5 / (n - 1) for case in train_augmenter.generator.indices]
        np.testing.assert_allclose(train_augmenter.generator.sampling_probabilities, expected)
        assert val_augmenter.generator.sampling_probabilities is None
        assert set(next(train_augmenter)["keys"]) <= set(training_cases)
    finally:
        train_augmenter._finish()
        val_augmenter._finish()
