"""Oracle tests: the whole-image measurements equal skimage's regionprops, object by object."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import regionprops_table

from nucleibatch.annotated import discover_annotated, iter_annotated
from nucleibatch.measure import NUCLEI_COLUMNS, measure_labels
from nucleibatch.synthetic import synthetic_nuclei
from tests.helpers.measurements import awkward_shapes
from tests.helpers.paths import DEMO

REGIONPROPS = {
    "label": "label", "centroid_y": "centroid-0", "centroid_x": "centroid-1", "area": "area",
    "perimeter": "perimeter", "eccentricity": "eccentricity", "solidity": "solidity",
    "mean_intensity": "intensity_mean", "bbox_min_y": "bbox-0", "bbox_min_x": "bbox-1",
    "bbox_max_y": "bbox-2", "bbox_max_x": "bbox-3",
}  # fmt: skip


def regionprops_columns(labels: np.ndarray, intensity: np.ndarray) -> dict[str, np.ndarray]:
    properties = ("label", "centroid", "area", "perimeter", "eccentricity", "solidity", "intensity_mean", "bbox")
    table = regionprops_table(labels.astype(np.int32), intensity_image=intensity.astype(np.float64), properties=properties)
    return {ours: np.asarray(table[theirs]) for ours, theirs in REGIONPROPS.items()}


def assert_matches_regionprops(labels: np.ndarray, intensity: np.ndarray) -> int:
    ours = measure_labels(labels, intensity)
    reference = regionprops_columns(labels, intensity)
    assert set(ours) == set(NUCLEI_COLUMNS) - {"image_id"}
    for column, expected in reference.items():
        np.testing.assert_allclose(ours[column], expected, rtol=1e-9, atol=1e-9, err_msg=column)
    return len(ours["label"])


def demo_label_images() -> list[tuple[np.ndarray, np.ndarray]]:
    images = []
    for annotated in iter_annotated(discover_annotated([str(DEMO)])):
        grey = annotated.image[..., :3].mean(axis=2) if annotated.image.ndim == 3 else annotated.image
        images.append((annotated.labels, grey))
    return images


def test_real_dsb_nuclei_match_regionprops():
    measured = sum(assert_matches_regionprops(labels, grey) for labels, grey in demo_label_images())
    assert measured > 150  # the five demo images' annotated nuclei


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_nuclei_match_regionprops(seed):
    image, labels = synthetic_nuclei((300, 260), n_nuclei=60, seed=seed)
    assert assert_matches_regionprops(labels, image.astype(np.float64)) > 20


def test_awkward_shapes_match_regionprops():
    labels = awkward_shapes(np.int32)
    intensity = np.random.default_rng(0).random(labels.shape) * 1000
    assert assert_matches_regionprops(labels, intensity) == 8


@pytest.mark.parametrize("seed", range(4))
def test_scattered_objects_with_row_gaps_match_regionprops(seed):
    """Labels made of scattered pieces (a nucleus split at a seam): hull rows between the pieces count."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((60, 70), np.int32)
    for value in (2, 5, 9, 14):
        pieces = rng.random(labels.shape) < 0.004
        labels[pieces & (labels == 0)] = value
    labels[40:44, 3:6] = 17  # two blocks of one label, rows 44..49 empty between them
    labels[50:53, 8:12] = 17
    intensity = rng.random(labels.shape) * 100
    assert assert_matches_regionprops(labels, intensity) == 5


def test_origin_and_id_offset_shift_positions_boxes_and_labels():
    image, labels = synthetic_nuclei((128, 128), n_nuclei=12, seed=3)
    plain = measure_labels(labels, image)
    moved = measure_labels(labels, image, origin=(1000, 2000), id_offset=500)
    np.testing.assert_array_equal(moved["label"], plain["label"] + 500)
    for column, shift in (("centroid_y", 1000), ("bbox_min_y", 1000), ("bbox_max_y", 1000), ("centroid_x", 2000), ("bbox_min_x", 2000), ("bbox_max_x", 2000)):
        np.testing.assert_allclose(moved[column], plain[column] + shift)
    assert moved["label"].dtype == np.uint32 and moved["area"].dtype == np.int64 and moved["bbox_min_y"].dtype == np.int64


def test_mean_intensity_averages_the_finite_pixels_only():
    labels = np.zeros((6, 6), np.int32)
    labels[0:2, 0:2] = 1
    labels[3:5, 3:5] = 2
    intensity = np.full((6, 6), 10.0)
    intensity[0, 0] = np.nan
    intensity[1, 1] = 40.0
    intensity[3:5, 3:5] = np.inf
    columns = measure_labels(labels, intensity)
    assert columns["mean_intensity"][0] == pytest.approx(20.0)  # (10 + 10 + 40) / 3
    assert np.isnan(columns["mean_intensity"][1])  # no finite pixel at all
    assert list(columns["area"]) == [4, 4]


def test_no_objects_give_empty_typed_columns():
    columns = measure_labels(np.zeros((8, 8), np.int32), np.zeros((8, 8)))
    assert all(len(values) == 0 for values in columns.values())
    assert columns["label"].dtype == np.uint32 and columns["area"].dtype == np.int64


def test_forty_dsb_training_images_match_regionprops(dsb_root):
    """Every shape of 40 annotated DSB images (fluorescence, brightfield, tissue; ~2,000 nuclei)."""
    sources = discover_annotated([str(dsb_root)])[:40]
    measured = 0
    for annotated in iter_annotated(sources):
        grey = annotated.image[..., :3].mean(axis=2) if annotated.image.ndim == 3 else annotated.image
        measured += assert_matches_regionprops(annotated.labels, grey)
    assert measured > 1000
