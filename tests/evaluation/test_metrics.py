"""Dice and HD95 against medpy (an independent implementation) on real phantom label maps, and empty cases."""

import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from nnunet_missingmod import modalities as mods
from nnunet_missingmod.data.phantom import PhantomConfig, generate_case
from nnunet_missingmod.evaluation.metrics import HD95_PENALTY_MM, dice, hd95, region_metrics


@pytest.fixture(scope="module")
def label_pairs():
    """Reference phantom labels and realistic 'predictions': shifted, eroded and dilated versions, another case."""
    pairs = []
    for index in range(3):
        labels = generate_case(21, index, PhantomConfig(spacing=3.0)).labels
        shifted = np.roll(labels, (2, -1, 1), axis=(0, 1, 2))
        eroded = np.where(ndimage.binary_erosion(labels > 0), labels, 0)
        other = generate_case(21, index + 10, PhantomConfig(spacing=3.0)).labels
        pairs += [(labels, shifted), (labels, eroded), (labels, other)]
    return pairs


def test_dice_and_hd95_match_medpy(label_pairs):
    spacing = (3.0, 2.0, 1.5)  # anisotropic on purpose
    checked = 0
    for reference_labels, predicted_labels in label_pairs:
        for members in mods.REGIONS.values():
            reference = np.isin(reference_labels, members)
            prediction = np.isin(predicted_labels, members)
            if reference.any() and prediction.any():
                assert dice(reference, prediction) == pytest.approx(medpy_binary.dc(prediction, reference), abs=1e-12)
                expected = medpy_binary.hd95(prediction, reference, voxelspacing=spacing)
                assert hd95(reference, prediction, spacing) == pytest.approx(expected, rel=1e-9, abs=1e-9)
                checked += 1
    assert checked >= 15


def test_region_at_the_image_border_matches_medpy():
    reference = np.zeros((20, 20, 20), bool)
    reference[:6, 5:12, 3:9] = True
    prediction = np.zeros_like(reference)
    prediction[:4, 6:14, 3:12] = True
    expected = medpy_binary.hd95(prediction, reference, voxelspacing=(1.0, 1.0, 2.0))
    assert hd95(reference, prediction, (1.0, 1.0, 2.0)) == pytest.approx(expected)


def test_brats_conventions_for_empty_regions():
    empty = np.zeros((8, 8, 8), bool)
    blob = empty.copy()
    blob[2:5, 2:5, 2:5] = True
    assert dice(empty, empty) == 1.0 and hd95(empty, empty, (1, 1, 1)) == 0.0
    assert dice(blob, empty) == 0.0 and hd95(blob, empty, (1, 1, 1)) == HD95_PENALTY_MM
    assert dice(empty, blob) == 0.0 and hd95(empty, blob, (1, 1, 1)) == HD95_PENALTY_MM
    assert HD95_PENALTY_MM == 373.13


def test_region_metrics_hand_computed():
    reference = np.zeros((1, 4, 4), np.uint8)
    reference[0, 0, :] = [1, 2, 3, 3]  # WT 4 voxels, TC 3, ET 2
    prediction = np.zeros_like(reference)
    prediction[0, 0, :] = [1, 1, 3, 0]  # WT 3, TC 1, ET 1
    metrics = region_metrics(reference, prediction, (1, 1, 1))
    assert metrics["WT"]["Dice"] == pytest.approx(2 * 3 / 7)
    assert metrics["TC"]["Dice"] == pytest.approx(2 * 1 / 4)
    assert metrics["ET"]["Dice"] == pytest.approx(2 * 1 / 3)
    no_et = np.where(reference == 3, 2, reference)
    assert region_metrics(no_et, no_et, (1, 1, 1))["ET"] == {"Dice": 1.0, "HD95": 0.0}


def test_label_maps_of_different_shapes_are_refused_under_python_O():
    """A real error, not an assert (which ``python -O`` removes)."""
    import subprocess
    import sys
    code = ("import numpy as np\nfrom nnunet_missingmod.evaluation.metrics import region_metrics\n"
            "try:\n    region_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True)
    assert "refused: shapes differ" in out.stdout
