"""Oracle tests of block geometry and stitching: blockwise results must equal whole-image results."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from nucleibatch.errors import ObjectTooLargeError, UsageError
from nucleibatch.instances import (
    InstanceParams,
    instance_labels,
    probabilities_to_labels,
    relabel_sequential,
)
from nucleibatch.stitching import block_offsets, paint_region, select_owned
from nucleibatch.synthetic import synthetic_mosaic, synthetic_nuclei
from nucleibatch.targets import make_targets
from nucleibatch.tiling import block_grid, padded_size
from tests.helpers.labels import same_up_to_renumbering


@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    core=st.integers(1, 128),
    margin=st.integers(0, 64),
)
@settings(max_examples=200, deadline=None)
def test_cores_partition_the_image_and_reads_contain_cores(height, width, core, margin):
    blocks = block_grid((height, width), core, margin)
    cover = np.zeros((height, width), dtype=np.int32)
    for block in blocks:
        y0, y1, x0, x1 = block.core
        cover[y0:y1, x0:x1] += 1
        ry0, ry1, rx0, rx1 = block.read
        assert 0 <= ry0 <= y0 < y1 <= ry1 <= height and 0 <= rx0 <= x0 < x1 <= rx1 <= width
        # the read region is the core grown by the margin, clipped to the image
        assert ry0 == max(0, y0 - margin) and ry1 == min(height, y1 + margin)
        assert rx0 == max(0, x0 - margin) and rx1 == min(width, x1 + margin)
        iy0, iy1, ix0, ix1 = block.core_in_read
        assert (iy1 - iy0, ix1 - ix0) == (y1 - y0, x1 - x0)
    assert (cover == 1).all()
    assert len(blocks) == -(-height // core) * -(-width // core)
    assert [b.index for b in blocks] == list(range(len(blocks)))


def test_block_grid_rejects_bad_geometry():
    with pytest.raises(UsageError, match="block size"):
        block_grid((10, 10), 0, 2)
    with pytest.raises(UsageError, match="empty image"):
        block_grid((0, 10), 4, 2)


def test_padded_size():
    assert [padded_size(n, 32) for n in (1, 32, 33, 64, 65)] == [32, 32, 64, 64, 96]


def stitch_from_truth(truth: np.ndarray, core: int, margin: int) -> np.ndarray:
    """Blockwise 'segmentation' where each block sees the truth in its read region only."""
    blocks = block_grid(truth.shape, core, margin)
    results = {}
    for block in blocks:
        ry0, ry1, rx0, rx1 = block.read
        local = relabel_sequential(truth[ry0:ry1, rx0:rx1])
        _, owned = select_owned(local, block, truth.shape, margin)
        results[block.index] = owned
    offsets = block_offsets(results[b.index].count for b in blocks)
    out = np.zeros(truth.shape, dtype=np.uint32)
    for block in blocks:
        pieces = [(results[b.index], int(offsets[b.index])) for b in blocks]
        painted, lost = paint_region(block.core, pieces)
        assert lost == {}
        y0, y1, x0, x1 = block.core
        out[y0:y1, x0:x1] = painted
    return out


@pytest.mark.parametrize("shape", [(256, 256), (300, 451), (97, 513)])
@pytest.mark.parametrize("core,margin", [(64, 32), (96, 40), (128, 48), (1024, 32)])
def test_stitching_oracle_equals_whole_image(shape, core, margin):
    _, truth = synthetic_nuclei(shape, n_nuclei=shape[0] * shape[1] // 600, radius=(4, 12), seed=sum(shape) + core)
    stitched = stitch_from_truth(truth, core, margin)
    assert same_up_to_renumbering(stitched, truth)
    # global ids are unique and there is exactly one per true nucleus: nothing cut, nothing duplicated
    assert len(np.unique(stitched)) == len(np.unique(truth))


def test_stitching_oracle_on_a_mosaic():
    _, truth = synthetic_mosaic(tiles=3, tile_shape=(200, 200), seed=4, n_nuclei=60, radius=(5, 13))
    assert same_up_to_renumbering(stitch_from_truth(truth, 128, 40), truth)


def test_nucleus_larger_than_margin_is_an_error_that_names_the_setting():
    truth = np.zeros((200, 200), dtype=np.int32)
    truth[40:160, 50:70] = 1  # 120 px tall: reaches 60 px beyond any 64-px core
    with pytest.raises(ObjectTooLargeError, match="--block-margin"):
        stitch_from_truth(truth, 64, 16)
    assert same_up_to_renumbering(stitch_from_truth(truth, 64, 64), truth)


def test_overlapping_claims_go_to_the_smaller_id_whatever_the_order():
    from nucleibatch.stitching import OwnedObjects

    a = OwnedObjects(0, np.array([1]), np.array([[0, 4, 0, 4]]), [np.ones((4, 4), bool)])
    b = OwnedObjects(1, np.array([1]), np.array([[2, 6, 2, 6]]), [np.ones((4, 4), bool)])
    first, lost_first = paint_region((0, 8, 0, 8), [(a, 0), (b, 1)])
    second, lost_second = paint_region((0, 8, 0, 8), [(b, 1), (a, 0)])
    assert np.array_equal(first, second)
    assert first[3, 3] == 1 and first[5, 5] == 2
    assert lost_first == lost_second == {2: 4}


def test_select_owned_floors_centroids_exactly_with_gaps_in_the_labels():
    _, truth = synthetic_nuclei((300, 300), n_nuclei=400, radius=(3, 9), seed=5)
    block = block_grid(truth.shape, 128, 40)[4]  # the middle block: cut on every side
    ry0, ry1, rx0, rx1 = block.read
    labels = truth[ry0:ry1, rx0:rx1].astype(np.int64) * 3  # sparse ids, most absent
    owned_labels, owned = select_owned(labels, block, truth.shape, 40)
    cy0, cy1, cx0, cx1 = block.core_in_read
    expected = []
    for value in np.unique(labels[labels > 0]):
        ys, xs = np.nonzero(labels == value)
        cy, cx = int(ys.sum()) // ys.size, int(xs.sum()) // xs.size
        if cy0 <= cy < cy1 and cx0 <= cx < cx1:
            expected.append((cy, cx, value))
    expected.sort()
    assert owned.count == len(expected) > 0
    for local_id, (_, _, value) in enumerate(expected, start=1):
        assert np.array_equal(owned_labels == local_id, labels == value)
        y0, y1, x0, x1 = (int(v) for v in owned.boxes[local_id - 1])
        ys, xs = np.nonzero(labels == value)
        assert (y0, y1, x0, x1) == (ry0 + ys.min(), ry0 + ys.max() + 1, rx0 + xs.min(), rx0 + xs.max() + 1)
        assert np.array_equal(owned.masks[local_id - 1], (labels == value)[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0])


@pytest.mark.parametrize("params", [InstanceParams(), InstanceParams(0.3, 0.7, min_seed_size=20, min_size=30)])
def test_select_owned_of_raw_instances_equals_that_of_clean_labels(params):
    """segment hands select_owned the watershed's raw ids (not consecutive, small objects kept):
    with ``min_size`` it must own exactly what it owns of probabilities_to_labels' clean labels."""
    _, truth = synthetic_nuclei((320, 320), n_nuclei=260, radius=(3, 10), seed=11)
    probabilities = np.stack([ndi.gaussian_filter(t, 1.0) for t in make_targets(truth)]).astype(np.float16)
    block = block_grid(truth.shape, 128, 48)[4]
    ry0, ry1, rx0, rx1 = block.read
    region = probabilities[:, ry0:ry1, rx0:rx1]
    clean_labels, clean = select_owned(probabilities_to_labels(region, params), block, truth.shape, 48)
    raw_labels, raw = select_owned(instance_labels(region, params), block, truth.shape, 48, params.min_size)
    assert clean.count > 10
    np.testing.assert_array_equal(raw_labels, clean_labels)
    np.testing.assert_array_equal(raw.boxes, clean.boxes)
    assert all(np.array_equal(a, b) for a, b in zip(raw.masks, clean.masks, strict=True))


def test_select_owned_numbers_objects_with_the_same_centroid_pixel_by_their_first_pixel():
    labels = np.zeros((40, 40), np.int32)
    labels[15:26, 15:26] = 9  # a square ring, centroid (20, 20), first pixel (15, 15)
    labels[16:25, 16:25] = 0
    labels[20, 20] = 2  # a dot on the same centroid pixel, a smaller id
    labels[30:34, 5:9] = 4
    block = block_grid(labels.shape, 64, 0)[0]
    owned_labels, owned = select_owned(labels, block, labels.shape, 0)
    reference, _ = select_owned(relabel_sequential(labels), block, labels.shape, 0)
    np.testing.assert_array_equal(owned_labels, reference)
    assert owned_labels[15, 15] == 1 and owned_labels[20, 20] == 2 and owned_labels[30, 5] == 3
    assert select_owned(labels, block, labels.shape, 0, min_size=2)[1].count == 2  # the dot is dropped


def paint_reference(region, objects):
    """Pixelwise: each pixel gets the smallest global id claiming it; every other claim loses it."""
    from collections import Counter

    y0, y1, x0, x1 = region
    best = np.full((y1 - y0, x1 - x0), np.iinfo(np.int64).max)
    claimed = Counter()
    for owned, offset in objects:
        for local_id, (by0, by1, bx0, bx1), mask in zip(owned.ids, owned.boxes, owned.masks, strict=True):
            canvas = np.zeros((y1 - y0, x1 - x0), dtype=bool)
            sy0, sx0 = max(by0, y0), max(bx0, x0)
            sy1, sx1 = min(by1, y1), min(bx1, x1)
            if sy0 >= sy1 or sx0 >= sx1:
                continue
            canvas[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = mask[sy0 - by0 : sy1 - by0, sx0 - bx0 : sx1 - bx0]
            global_id = int(offset + local_id)
            best[canvas] = np.minimum(best[canvas], global_id)
            claimed[global_id] += int(canvas.sum())
    out = np.where(best == np.iinfo(np.int64).max, 0, best).astype(np.uint32)
    lost = {g: n - int((out == g).sum()) for g, n in sorted(claimed.items()) if n - int((out == g).sum())}
    return out, lost


@pytest.mark.parametrize("seed", range(6))
def test_paint_region_overlaps_match_a_pixelwise_reference_in_any_order(seed):
    from nucleibatch.stitching import OwnedObjects

    rng = np.random.default_rng(seed)
    pairs = []
    for block_index, offset in enumerate([0, 20, 40]):
        boxes, masks = [], []
        for _ in range(20):
            y0, x0 = (int(v) for v in rng.integers(-8, 40, size=2))
            h, w = (int(v) for v in rng.integers(1, 12, size=2))
            boxes.append((y0, y0 + h, x0, x0 + w))
            masks.append(rng.random((h, w)) < 0.7)
        pairs.append((OwnedObjects(block_index, np.arange(1, 21, dtype=np.int64), np.array(boxes, dtype=np.int64), masks), offset))
    if seed % 2:
        pairs.append(pairs[0])  # the same block twice: its copies lose every pixel to the first
    region = (2, 34, 3, 30)
    expected_out, expected_lost = paint_reference(region, pairs)
    assert expected_lost  # the case is meant to have overlaps
    for order in [range(len(pairs)), *(rng.permutation(len(pairs)) for _ in range(3))]:
        out, lost = paint_region(region, [pairs[i] for i in order])
        assert out.dtype == np.uint32 and np.array_equal(out, expected_out)
        assert lost == expected_lost


@pytest.mark.parametrize("seed", range(8))
def test_tiles_over_a_box_partition_it_on_the_32_pixel_grid_and_read_their_halo_inside_the_image(seed):
    """Oracle: every pixel of the box lies in exactly one tile core; no core leaves the box or
    exceeds ``core``; the cuts inside the box lie on multiples of 32, and so does every read's
    start (the network's pixel grid, as for the whole image in one window); each tile reads at
    least ``halo`` pixels around its core, cut only at the image's edges (the image around the
    box is context), and at most 31 more before it."""
    from nucleibatch.tiling import tiles_over_box

    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(40, 1500)), int(rng.integers(40, 1500)))
    y0, x0 = int(rng.integers(0, shape[0] - 1)), int(rng.integers(0, shape[1] - 1))
    box = (y0, int(rng.integers(y0 + 1, shape[0] + 1)), x0, int(rng.integers(x0 + 1, shape[1] + 1)))
    core, halo = int(rng.integers(33, 500)), int(rng.integers(0, 80))
    covered = np.zeros(shape, dtype=np.int32)
    tiles = tiles_over_box(shape, box, core, halo)
    rows = sorted({(t.core[0], t.core[1]) for t in tiles})
    cols = sorted({(t.core[2], t.core[3]) for t in tiles})
    assert len(tiles) == len(rows) * len(cols) and len(rows) == -(-(box[1] - box[0]) // (core - 32))
    for tile in tiles:
        cy0, cy1, cx0, cx1 = tile.core
        assert box[0] <= cy0 < cy1 <= box[1] and box[2] <= cx0 < cx1 <= box[3]
        assert cy1 - cy0 <= core and cx1 - cx0 <= core
        assert (cy0 == box[0] or cy0 % 32 == 0) and (cx0 == box[2] or cx0 % 32 == 0)
        ry0, ry1, rx0, rx1 = tile.read
        assert ry0 % 32 == 0 and rx0 % 32 == 0
        assert max(0, cy0 - halo - 31) <= ry0 <= max(0, cy0 - halo) and max(0, cx0 - halo - 31) <= rx0 <= max(0, cx0 - halo)
        assert ry1 == min(shape[0], cy1 + halo) and rx1 == min(shape[1], cx1 + halo)
        covered[cy0:cy1, cx0:cx1] += 1
    inside = np.zeros(shape, dtype=bool)
    inside[box[0] : box[1], box[2] : box[3]] = True
    assert (covered[inside] == 1).all() and (covered[~inside] == 0).all()


def test_tiles_over_a_box_outside_the_image_are_refused():
    from nucleibatch.tiling import tiles_over_box

    with pytest.raises(UsageError, match="not a non-empty part"):
        tiles_over_box((100, 100), (50, 50, 0, 10), 32, 8)
    with pytest.raises(UsageError, match="not a non-empty part"):
        tiles_over_box((100, 100), (0, 120, 0, 10), 32, 8)


@pytest.mark.parametrize("margin", [0, 40, 128])
def test_prediction_regions_start_on_the_network_grid(margin):
    """A block's prediction region holds its read region and ``halo`` pixels around it (cut at the
    image's edges) and starts on a multiple of 32, whatever the margin: the tiles laid from its
    corner are then on the whole image's pixel grid."""
    from nucleibatch.segment.plan import prediction_region

    shape, halo = (1000, 900), 64
    for block in block_grid(shape, 256, margin):
        y0, y1, x0, x1 = prediction_region(block, shape, halo)
        ry0, ry1, rx0, rx1 = block.read
        assert y0 % 32 == 0 and x0 % 32 == 0
        assert max(0, ry0 - halo - 31) <= y0 <= max(0, ry0 - halo) and max(0, rx0 - halo - 31) <= x0 <= max(0, rx0 - halo)
        assert y1 == min(shape[0], ry1 + halo) and x1 == min(shape[1], rx1 + halo)
