"""Ownership and measurement of a block's nuclei on the labels' device (torch), run here on CPU
tensors: the same code a GPU runs (``segment --instances-on device``), checked against the NumPy
path (select_owned, then measure_labels), block by block of a grid with margins."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucleibatch.errors import ObjectTooLargeError
from nucleibatch.measure import measure_labels
from nucleibatch.stitching import select_owned
from nucleibatch.stitching_torch import own_and_measure_on_device, select_owned_torch
from nucleibatch.synthetic import synthetic_nuclei
from nucleibatch.tiling import block_grid
from tests.helpers.measurements import assert_same_measurement_columns


def shuffled_ids(labels: np.ndarray, seed: int) -> np.ndarray:
    """The same objects under distinct, sparse, shuffled ids (as raw instance labels come)."""
    ids = np.random.default_rng(seed).permutation(np.arange(1, 10 * (labels.max() + 1)))[: labels.max()]
    lut = np.concatenate([[0], ids]).astype(np.int32)
    return lut[labels]


@pytest.mark.parametrize("seed", range(3))
def test_blocks_own_the_same_nuclei_with_the_same_measurements_on_the_device(seed):
    image, labels = synthetic_nuclei((300, 340), n_nuclei=90, seed=seed)
    labels = shuffled_ids(labels, seed)
    shape = labels.shape
    owned_in_all = 0
    for block in block_grid(shape, core=128, margin=32):
        y0, y1, x0, x1 = block.read
        region, grey = labels[y0:y1, x0:x1], image[y0:y1, x0:x1].astype(np.float32)
        expected_labels, expected = select_owned(region, block, shape, margin=32, min_size=20)
        ours_labels = select_owned_torch(torch.from_numpy(region), block, min_size=20).numpy()
        np.testing.assert_array_equal(ours_labels, expected_labels)
        owned, columns = own_and_measure_on_device(torch.from_numpy(region), block, shape, 32, 20, grey)
        np.testing.assert_array_equal(owned.ids, expected.ids)
        np.testing.assert_array_equal(owned.boxes, expected.boxes)
        assert all(np.array_equal(a, b) for a, b in zip(owned.masks, expected.masks, strict=True))
        owned_in_all += assert_same_measurement_columns(columns, measure_labels(expected_labels, grey, origin=(y0, x0)))
    assert owned_in_all > 60  # most nuclei are owned by some block (those under min_size are not)


def test_an_empty_block_and_a_nucleus_larger_than_the_margin():
    block = block_grid((200, 200), core=100, margin=16)[0]
    empty = torch.zeros(block.read_shape, dtype=torch.int32)
    owned, columns = own_and_measure_on_device(empty, block, (200, 200), 16, 1, np.zeros(block.read_shape, np.float32))
    assert owned.count == 0 and columns["label"].size == 0 and columns["label"].dtype == np.uint32
    too_large = torch.zeros(block.read_shape, dtype=torch.int32)
    too_large[60:116, 60:116] = 7  # centroid in the core, reaching the read region's inner edge
    with pytest.raises(ObjectTooLargeError, match="block margin"):
        own_and_measure_on_device(too_large, block, (200, 200), 16, 1, np.zeros(block.read_shape, np.float32))
    with pytest.raises(ObjectTooLargeError, match="block margin"):
        select_owned(too_large.numpy(), block, (200, 200), 16)


def test_nuclei_sharing_a_centroid_pixel_are_numbered_by_their_first_pixel():
    """A ring around a disc: the same centroid pixel; the CPU path orders ties by first pixel."""
    yy, xx = np.mgrid[:64, :64]
    radius = np.hypot(yy - 32, xx - 32)
    labels = np.where(radius < 6, 40, np.where((radius > 10) & (radius < 14), 9, 0)).astype(np.int32)
    block = block_grid((64, 64), core=64, margin=0)[0]
    expected, _ = select_owned(labels, block, (64, 64), 0)
    ours = select_owned_torch(torch.from_numpy(labels), block).numpy()
    np.testing.assert_array_equal(ours, expected)
    assert set(np.unique(ours)) == {0, 1, 2}
