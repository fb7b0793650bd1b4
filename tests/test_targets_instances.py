"""Training targets, probabilities -> instances, and intensity normalisation (pure arrays)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from nucleibatch import instances
from nucleibatch.errors import UsageError
from nucleibatch.instances import (
    InstanceParams,
    instance_labels,
    probabilities_to_labels,
    relabel_sequential,
    remove_small,
)
from nucleibatch.metrics import image_scores, iou_matrix
from nucleibatch.normalize import (
    NormStats,
    apply_stats,
    compute_stats,
    normalise_image,
    normalise_pixels,
    to_grey,
)
from nucleibatch.synthetic import synthetic_nuclei
from nucleibatch.targets import TARGET_CLASSES, make_targets


def box(shape, y0, y1, x0, x1) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[y0:y1, x0:x1] = True
    return out


def two_touching_squares() -> np.ndarray:
    """8x8 nucleus 1 at rows 4..11, cols 4..11 and nucleus 2 right beside it at cols 12..19."""
    labels = np.zeros((16, 24), dtype=np.int32)
    labels[4:12, 4:12] = 1
    labels[4:12, 12:20] = 2
    return labels


def two_touching_discs() -> np.ndarray:
    """Two discs of radius 10 whose centres are 19 px apart, split along the bisector."""
    yy, xx = np.mgrid[:64, :64]
    d1, d2 = np.hypot(yy - 32, xx - 22), np.hypot(yy - 32, xx - 41)
    inside = (d1 <= 10) | (d2 <= 10)
    return np.where(inside, np.where(d1 <= d2, 1, 2), 0).astype(np.int32)


# --- make_targets ---------------------------------------------------------------------------------


def test_targets_shape_dtype_and_body():
    labels = two_touching_squares()
    targets = make_targets(labels)
    assert TARGET_CLASSES == ("body", "contour", "contact")
    assert targets.shape == (3,) + labels.shape
    assert targets.dtype == np.float32
    assert set(np.unique(targets)) <= {0.0, 1.0}
    np.testing.assert_array_equal(targets[0], labels > 0)


def test_contact_pixels_of_two_touching_squares():
    # a pixel is contact when the 5x5 square around it (radius 2) holds both nuclei:
    # its columns c-2..c+2 must reach col <= 11 and col >= 12 -> c in 10..13, and its rows
    # r-2..r+2 must reach rows 4..11 -> r in 2..13 (background pixels in the gap count too)
    labels = two_touching_squares()
    contact = make_targets(labels)[2].astype(bool)
    np.testing.assert_array_equal(contact, box(labels.shape, 2, 14, 10, 14))
    # radius 1: 3x3 squares -> c in 11..12, r in 3..12
    contact_1 = make_targets(labels, contact_radius=1)[2].astype(bool)
    np.testing.assert_array_equal(contact_1, box(labels.shape, 3, 13, 11, 13))


def test_contour_of_two_touching_squares():
    # a body pixel is contour when another value lies within 2 px (Chebyshev): only the 4x4
    # centre of each 8x8 square is not contour, including along the shared edge
    labels = two_touching_squares()
    contour = make_targets(labels)[1].astype(bool)
    interior = box(labels.shape, 6, 10, 6, 10) | box(labels.shape, 6, 10, 14, 18)
    np.testing.assert_array_equal(contour, (labels > 0) & ~interior)


@pytest.mark.parametrize("width", [1, 2, 3])
def test_contour_ring_width(width):
    labels = np.zeros((20, 20), dtype=np.int32)
    labels[5:15, 5:15] = 1
    targets = make_targets(labels, contour_width=width)
    interior = box(labels.shape, 5 + width, 15 - width, 5 + width, 15 - width)
    np.testing.assert_array_equal(targets[1].astype(bool), (labels > 0) & ~interior)


# scipy.ndimage filters run through float64: the background sentinel must survive that
# (an int64-max sentinel once gave every nucleus false contact pixels).
def test_single_nucleus_has_no_contact():
    labels = np.zeros((20, 20), dtype=np.int32)
    labels[5:15, 5:15] = 1
    assert make_targets(labels)[2].sum() == 0


def test_no_contact_between_nuclei_farther_apart_than_the_radius():
    labels = np.zeros((16, 30), dtype=np.int32)
    labels[4:12, 4:12] = 1
    labels[4:12, 16:24] = 2  # 4 background columns (12..15) between them: no 5x5 square holds both
    assert make_targets(labels)[2].sum() == 0
    labels[4:12, 16:24] = 0
    labels[4:12, 15:23] = 2  # gap of 3: only column 13 sees both (cols 11..15)
    np.testing.assert_array_equal(make_targets(labels)[2].astype(bool), box(labels.shape, 2, 14, 13, 14))


def test_targets_do_not_depend_on_label_values():
    labels = two_touching_squares()
    renumbered = np.select([labels == 1, labels == 2], [70000, 3], 0).astype(np.uint32)
    np.testing.assert_array_equal(make_targets(renumbered), make_targets(labels))


def test_targets_of_an_empty_image_are_zero():
    assert make_targets(np.zeros((8, 9), np.uint16)).sum() == 0


# --- probabilities_to_labels ------------------------------------------------------------------------


def test_exact_targets_separate_two_touching_nuclei():
    labels = two_touching_discs()
    _, n_components = ndi.label(labels > 0)
    assert n_components == 1  # a plain foreground mask merges them
    result = probabilities_to_labels(make_targets(labels))
    assert result.dtype == np.int32
    assert result.max() == 2
    iou = iou_matrix(labels, result)
    assert iou.max(axis=1).min() > 0.95
    assert image_scores(labels, result)["map"] == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_round_trip_labels_targets_labels_on_synthetic_images(seed):
    _, labels = synthetic_nuclei((256, 256), n_nuclei=60, seed=seed)
    touching = (make_targets(labels)[2] * (labels > 0)).sum()
    assert touching > 0, "the synthetic image should hold touching nuclei"
    result = probabilities_to_labels(make_targets(labels))
    scores = image_scores(labels, result)
    assert scores["map"] >= 0.9
    assert scores["n_pred"] == scores["n_true"]
    naive, _ = ndi.label(labels > 0)
    assert scores["map"] > image_scores(labels, naive)["map"] + 0.2


def test_blurred_targets_still_beat_connected_components():
    # probabilities as a network would give them: soft edges
    maps, naive_maps = [], []
    for seed in range(3):
        _, labels = synthetic_nuclei((192, 192), n_nuclei=40, seed=seed)
        probabilities = np.stack([ndi.gaussian_filter(t, 1.0) for t in make_targets(labels)])
        maps.append(image_scores(labels, probabilities_to_labels(probabilities))["map"])
        naive_maps.append(image_scores(labels, ndi.label(labels > 0)[0])["map"])
    assert np.mean(maps) >= 0.8
    assert np.mean(maps) > np.mean(naive_maps) + 0.2


@pytest.mark.parametrize("params", [InstanceParams(), InstanceParams(0.3, 0.7, min_seed_size=20, min_size=30), InstanceParams(min_seed_size=1, min_size=1)])
def test_float16_probabilities_give_the_labels_of_their_float32_values(params):
    """segment's probabilities are float16 (bf16 network): their table lookups (widening, ``1 - p``)
    must give exactly the labels of the same values in float32 and float64."""
    _, labels = synthetic_nuclei((192, 224), n_nuclei=45, seed=7)
    probabilities = np.stack([ndi.gaussian_filter(t, 1.0) for t in make_targets(labels)]).astype(np.float16)
    probabilities[0, :4, :4] = np.nan  # NaN stays outside every mask and seed
    half = probabilities_to_labels(probabilities, params)
    assert half.max() >= 30
    for dtype in (np.float32, np.float64):
        np.testing.assert_array_equal(half, probabilities_to_labels(probabilities.astype(dtype), params))


def test_small_nucleus_without_a_big_enough_seed_is_kept():
    # a 5x5 nucleus: its seed (body minus a 2-px contour) is 1 px < min_seed_size 4, but the
    # unseeded mask component still becomes a nucleus (25 px >= min_size 8)
    labels = np.zeros((32, 32), dtype=np.int32)
    labels[4:9, 4:9] = 1
    labels[15:27, 15:27] = 2
    result = probabilities_to_labels(make_targets(labels))
    np.testing.assert_array_equal(result, labels)


def test_min_size_removes_tiny_objects_and_labels_are_sequential():
    labels = np.zeros((32, 32), dtype=np.int32)
    labels[1:3, 1:3] = 5  # 4 px: below min_size 8
    labels[10:20, 10:20] = 9
    labels[22:30, 2:10] = 3
    result = probabilities_to_labels(make_targets(labels), InstanceParams(min_size=8))
    assert result[1:3, 1:3].sum() == 0
    assert set(np.unique(result)) == {0, 1, 2}
    assert (result[10:20, 10:20] == 1).all()  # first in raster order
    assert (result[22:30, 2:10] == 2).all()


def test_empty_body_gives_empty_labels_and_bad_shapes_are_refused():
    assert probabilities_to_labels(np.zeros((3, 10, 12), np.float32)).shape == (10, 12)
    assert probabilities_to_labels(np.zeros((3, 10, 12), np.float32)).sum() == 0
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        probabilities_to_labels(np.zeros((10, 12), np.float32))


def test_instance_params_round_trip_and_unknown_keys():
    params = InstanceParams(mask_threshold=0.4, seed_threshold=0.6, min_seed_size=3, min_size=20)
    assert InstanceParams.from_dict(params.to_dict()) == params
    from nucleibatch.errors import UsageError

    with pytest.raises(UsageError, match="unknown post-processing settings"):
        InstanceParams.from_dict({"mask_treshold": 0.5})


def test_remove_small_and_relabel_sequential():
    labels = np.array([[0, 7, 7, 0], [3, 3, 3, 0], [0, 0, 0, 9]])
    np.testing.assert_array_equal(remove_small(labels.copy(), 2), np.array([[0, 7, 7, 0], [3, 3, 3, 0], [0, 0, 0, 0]]))
    np.testing.assert_array_equal(relabel_sequential(labels), np.array([[0, 1, 1, 0], [2, 2, 2, 0], [0, 0, 0, 3]]))
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 50, size=(40, 30)) * (rng.random((40, 30)) < 0.3)
    _, first = np.unique(noisy.ravel(), return_index=True)
    expected_order = np.unique(noisy.ravel())[np.argsort(first)]
    expected_order = expected_order[expected_order != 0]
    relabelled = relabel_sequential(noisy)
    for new_id, old_id in enumerate(expected_order, start=1):
        assert (relabelled[noisy == old_id] == new_id).all()
    assert relabelled.max() == expected_order.size and relabelled.dtype == np.int32


# --- normalisation ------------------------------------------------------------------------------------


def test_compute_stats_inverts_a_bright_background_only():
    image, labels = synthetic_nuclei((128, 128), seed=1, brightfield=True)
    stats = compute_stats(to_grey(image))
    assert stats.invert is True
    normalised = apply_stats(to_grey(image), stats)
    assert normalised[labels > 0].mean() > normalised[labels == 0].mean() + 0.3  # nuclei bright
    fluorescence, _ = synthetic_nuclei((128, 128), seed=1)
    assert compute_stats(to_grey(fluorescence)).invert is False
    assert compute_stats(to_grey(fluorescence), invert="always").invert is True
    assert compute_stats(to_grey(image), invert="never").invert is False


def test_apply_stats_range_and_formula():
    image, _ = synthetic_nuclei((128, 128), seed=2, dtype=np.uint16)
    grey = to_grey(image)
    stats = compute_stats(grey, percentiles=(1.0, 99.0))
    assert stats.low == pytest.approx(np.percentile(grey, 1.0))
    assert stats.high == pytest.approx(np.percentile(grey, 99.0))
    out = apply_stats(grey, stats)
    assert out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0  # the percentiles clip both ends
    inside = (grey > stats.low) & (grey < stats.high)
    np.testing.assert_allclose(out[inside], (grey[inside] - stats.low) / (stats.high - stats.low), rtol=1e-5, atol=1e-6)
    inverted = apply_stats(grey, NormStats(stats.low, stats.high, True))
    np.testing.assert_allclose(inverted, 1.0 - out, atol=1e-6)


def test_apply_stats_non_finite_and_flat_images():
    grey = np.array([[np.nan, 0.0], [5.0, 10.0]], dtype=np.float32)
    stats = NormStats(0.0, 10.0, False)
    np.testing.assert_allclose(apply_stats(grey, stats), [[0.0, 0.0], [0.5, 1.0]])
    flat = compute_stats(np.full((8, 8), 3.0, np.float32))
    assert flat.high > flat.low
    assert np.isfinite(apply_stats(np.full((8, 8), 3.0, np.float32), flat)).all()


def test_tiles_normalised_with_whole_image_stats_equal_the_normalised_image():
    image, _ = synthetic_nuclei((256, 256), n_nuclei=30, seed=5, dtype=np.uint16)
    grey = to_grey(image)
    stats = compute_stats(grey)
    whole = apply_stats(grey, stats)
    per_tile_differs = False
    for y in range(0, 256, 64):
        for x in range(0, 256, 64):
            tile = grey[y : y + 64, x : x + 64]
            np.testing.assert_array_equal(apply_stats(tile, stats), whole[y : y + 64, x : x + 64])
            own = apply_stats(tile, compute_stats(tile))
            per_tile_differs |= not np.allclose(own, whole[y : y + 64, x : x + 64], atol=0.02)
    assert per_tile_differs, "per-tile statistics should disagree with whole-image ones (the seams they cause)"


def test_normalize_image_of_rgb_equals_its_grey():
    image, _ = synthetic_nuclei((64, 64), seed=3)
    rgba = np.stack([image, image, image, np.full_like(image, 255)], axis=2)
    from_rgba, stats_rgba = normalise_image(rgba)
    from_grey, stats_grey = normalise_image(image)
    np.testing.assert_array_equal(from_rgba, from_grey)
    assert stats_rgba == stats_grey


@pytest.mark.parametrize(("dtype", "channels"), [(np.uint8, 4), (np.uint8, 3), (np.uint16, 3), (np.float32, 5), (np.float64, 4), (np.int32, 2)])
def test_to_grey_is_the_mean_of_the_colour_channels_bit_for_bit(dtype, channels):
    rng = np.random.default_rng(channels)
    image = (rng.random((37, 53, channels)) * (250 if dtype == np.uint8 else 6e4)).astype(dtype)
    if dtype == np.float64:
        image[0, 0, 0], image[1, 1, 1] = np.nan, np.inf
    colour = image[:, :, :3] if channels in (3, 4) else image  # RGBA alpha is left out
    grey = to_grey(image)
    # 64-bit pixels keep float64: their variation may lie below float32's resolution
    expected_dtype = np.float64 if dtype == np.float64 else np.float32
    assert grey.dtype == expected_dtype
    np.testing.assert_array_equal(grey, colour.astype(expected_dtype).mean(axis=2))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
@pytest.mark.parametrize(("shape", "channel"), [((41, 57), None), ((41, 57), 0), ((41, 57, 1), None), ((41, 57, 2), None), ((41, 57, 3), None), ((41, 57, 4), None), ((41, 57, 4), 2), ((41, 57, 6), None)])
@pytest.mark.parametrize("invert", [False, True])
def test_normalise_pixels_equals_apply_stats_of_to_grey_bit_for_bit(dtype, shape, channel, invert):
    """segment's normalisation of a block (tables for 8/16-bit images) gives exactly the
    arithmetic's float32 values, whatever the channels, the statistics and the inversion."""
    top = 255 if dtype == np.uint8 else 30000
    image = np.random.default_rng(len(shape) + shape[-1]).integers(0, top + 1, size=shape).astype(dtype)
    image.flat[:3] = (0, top, top // 2)
    for stats in (NormStats(3.0, top * 0.9, invert), NormStats(17.25, 17.5, invert), compute_stats(to_grey(image, channel))):
        np.testing.assert_array_equal(normalise_pixels(image, stats, channel), apply_stats(to_grey(image, channel), stats))


def test_normalise_pixels_refuses_a_missing_channel_as_to_grey_does():
    with pytest.raises(UsageError, match="--channel 3 is out of range"):
        normalise_pixels(np.zeros((8, 8, 3), np.uint8), NormStats(0.0, 1.0, False), channel=3)
    with pytest.raises(UsageError, match="single channel"):
        normalise_pixels(np.zeros((8, 8), np.uint16), NormStats(0.0, 1.0, False), channel=1)


@pytest.mark.parametrize("seed", range(3))
def test_flooding_of_the_crowded_pixels_equals_scikit_images_watershed(seed, monkeypatch):
    """instance_labels calls scikit-image's flooding loop on arrays built from the crowded pixels
    only; its labels equal those of the public watershed() on the whole block, ties included
    (float16 probabilities, flat at 1 inside nuclei; nuclei cut by every edge of the block)."""
    _, labels = synthetic_nuclei((160, 200), n_nuclei=70, radius=(7.0, 16.0), seed=seed)
    probabilities = np.stack([ndi.gaussian_filter(t, 1.0) for t in make_targets(labels)]).astype(np.float16)
    probabilities = probabilities[:, 5:-5, 5:-5]  # nuclei cut by the edges
    flooded = []
    flood = instances._flood
    monkeypatch.setattr(instances, "_flood", lambda shape, body, seeds, pixels: flooded.append(pixels.size) or flood(shape, body, seeds, pixels))
    fast = instance_labels(probabilities, InstanceParams())
    assert flooded and flooded[0] > 1000  # the watershed ran, on many pixels
    monkeypatch.setattr(instances, "_watershed_raveled", None)  # the fallback: watershed() itself
    assert np.array_equal(fast, instance_labels(probabilities, InstanceParams()))
    assert (fast[0] > 0).any() and (fast[:, -1] > 0).any()
    assert len(np.unique(fast)) > 30
