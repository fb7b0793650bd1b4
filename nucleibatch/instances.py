"""Probability maps to instance labels: seeded watershed (pure numpy / scikit-image)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

try:  # scikit-image's flooding loop, which its watershed() wraps (see _flood)
    from skimage.segmentation._watershed_cy import watershed_raveled as _watershed_raveled
except ImportError:  # pragma: no cover - a scikit-image that moved it: watershed() instead
    _watershed_raveled = None

from .errors import UsageError


@dataclass(frozen=True)
class InstanceParams:
    """Post-processing settings; tuned on validation and stored in the model bundle.

    mask_threshold: body probability above which a pixel belongs to a nucleus.
    seed_threshold: threshold on ``body * (1 - contour) * (1 - contact)`` for seeds.
    min_seed_size: seeds smaller than this (pixels) are dropped.
    min_size: final nuclei smaller than this (pixels) are dropped.
    """

    mask_threshold: float = 0.5
    seed_threshold: float = 0.5
    min_seed_size: int = 4
    min_size: int = 8

    def to_dict(self) -> dict:
        return asdict(self)

    def at_scale(self, scale: float) -> InstanceParams:
        """These settings for labels made at the input's resolution of an image that the network saw
        enlarged ``scale`` times: the sizes (pixels of the network's scale) divided by ``scale**2``."""
        if scale == 1.0:
            return self
        area = 1.0 / (scale * scale)
        return replace(self, min_seed_size=max(1, round(self.min_seed_size * area)), min_size=max(1, round(self.min_size * area)))

    @classmethod
    def from_dict(cls, values: dict) -> InstanceParams:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UsageError(f"unknown post-processing settings {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**values)


# every float16 value as float32: a table lookup converts 3x faster than numpy's cast (segment's
# probabilities are float16 where the network ran in bf16)
_FLOAT16_AS_FLOAT32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
# and ``1 - value`` of each, rounded to float32 as the float32 subtraction rounds it
with np.errstate(invalid="ignore"):  # inf - inf: NaN, as the subtraction gives
    _ONE_MINUS_FLOAT16 = np.subtract(1.0, _FLOAT16_AS_FLOAT32, dtype=np.float32)
_FLOAT16_INFINITY = 0x7C00  # the bits of +inf; above it NaNs, from 0x8000 the negative numbers


def _as_float32(channel: np.ndarray) -> np.ndarray:
    if channel.dtype == np.float16:
        return _FLOAT16_AS_FLOAT32[channel.view(np.uint16)]
    return np.asarray(channel, dtype=np.float32)


def _one_minus(channel: np.ndarray) -> np.ndarray:
    """``1 - channel`` as float32, a new array: ``(H, W)`` float16 or float -> float32."""
    if channel.dtype == np.float16:
        return _ONE_MINUS_FLOAT16[channel.view(np.uint16)]
    return np.subtract(1.0, channel, dtype=np.float32)


def probabilities_to_labels(probabilities: np.ndarray, params: InstanceParams = InstanceParams()) -> np.ndarray:
    """Instance labels from the model's body / contour / contact probabilities: the nuclei of
    :func:`instance_labels` of at least ``params.min_size`` pixels, numbered 1..N in raster order
    of their first pixel.

    Args:
        probabilities: ``(3, H, W)`` float in [0, 1] (body, contour, contact).
        params: thresholds and sizes.

    Returns:
        ``(H, W)`` int32 labels, 0 = background.
    """
    return relabel_sequential(remove_small(instance_labels(probabilities, params), params.min_size))


def instance_labels(probabilities: np.ndarray, params: InstanceParams = InstanceParams()) -> np.ndarray:
    """The nuclei of the model's body / contour / contact probabilities, before ``params.min_size``
    and renumbering (:func:`probabilities_to_labels` does both; segment leaves them to
    :func:`nucleibatch.stitching.select_owned`, which counts every object's pixels anyway).

    Seeds are connected components of ``body * (1 - contour) * (1 - contact) >
    seed_threshold``; a watershed on ``-body`` grows them inside ``body >
    mask_threshold``. Mask components that received no seed become nuclei of their own.

    A mask component holding at most one seed is one nucleus (the watershed would flood it
    whole), so the watershed runs only on the components that hold several: most nuclei touch
    no other.

    Args:
        probabilities: ``(3, H, W)`` float in [0, 1] (body, contour, contact).
        params: thresholds and sizes.

    Returns:
        ``(H, W)`` int32 labels, 0 = background; ids are distinct but neither consecutive nor in
        any documented order, and objects of any size are kept.
    """
    if probabilities.ndim != 3 or probabilities.shape[0] < 3:
        raise ValueError(f"expected (3, H, W) probabilities, got {probabilities.shape}")
    mask = _above(probabilities[0], params.mask_threshold)
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    # the scores, components and flooding below touch the mask's pixels (by flat index), not the
    # whole block: nuclei cover a fraction of it
    inside = np.flatnonzero(mask)
    body = _as_float32(probabilities[0].ravel()[inside])  # at the mask's pixels
    seed_score = _one_minus(probabilities[1].ravel()[inside])
    seed_score *= _one_minus(probabilities[2].ravel()[inside])
    seed_score *= body
    seed_pixels = inside[seed_score > params.seed_threshold]
    del seed_score
    seed_mask = np.zeros(mask.shape, dtype=bool)
    seed_mask.ravel()[seed_pixels] = True
    seeds, n_seeds = ndi.label(seed_mask)
    del seed_mask
    seed_ids = seeds.ravel()[seed_pixels]
    seed_sizes = np.bincount(seed_ids, minlength=n_seeds + 1)
    if n_seeds and params.min_seed_size > 1:
        small = seed_sizes < params.min_seed_size
        dropped = small[seed_ids]
        seeds.ravel()[seed_pixels[dropped]] = 0
        seed_pixels, seed_ids = seed_pixels[~dropped], seed_ids[~dropped]
        seed_sizes[small] = 0
    labels, n_components = ndi.label(mask)
    component_of_seed = np.zeros(n_seeds + 1, dtype=np.int64)
    component_of_seed[seed_ids] = labels.ravel()[seed_pixels]
    seeds_per_component = np.bincount(component_of_seed[1:][seed_sizes[1:] > 0], minlength=n_components + 1)
    del seed_pixels, seed_ids
    crowded = (seeds_per_component >= 2)[labels.ravel()[inside]]
    crowded_pixels = inside[crowded]
    del inside
    if crowded_pixels.size:
        flooded = _flood(mask.shape, body[crowded], seeds, crowded_pixels)
        labels.ravel()[crowded_pixels] = flooded + n_components  # ids apart from the components'
    return labels


def _above(channel: np.ndarray, threshold: float) -> np.ndarray:
    """``channel > threshold`` as float32 compares it: ``(H, W)`` float -> bool. float16 values
    are compared by their bits (ordered as the values for non-negative numbers), without
    widening the whole channel."""
    if channel.dtype != np.float16 or threshold < 0:
        return _as_float32(channel) > threshold
    values = _FLOAT16_AS_FLOAT32[: _FLOAT16_INFINITY + 1]  # 0, the positive numbers, +inf: increasing
    first = np.searchsorted(values, np.float32(threshold), side="right")  # the first value above it
    bits = channel.view(np.uint16)
    return (bits >= first) & (bits <= _FLOAT16_INFINITY)  # NaN and negative numbers: never above


def _flood(shape: tuple[int, int], body: np.ndarray, seeds: np.ndarray, crowded_pixels: np.ndarray) -> np.ndarray:
    """``watershed(-body image, markers=seeds in crowded, mask=crowded)`` at ``crowded_pixels``
    (flat indices of a ``shape`` block, ascending), ``body`` the float32 body probabilities
    there: ``(n,)`` int32 labels of those pixels.

    scikit-image's flooding is called on arrays built from the crowded pixels alone: its
    ``watershed`` copies, pads and scans the whole block about ten times, for a mask that
    covers a few percent of it. The arrays, the markers' order and the neighbour offsets are
    those it would build, so the labels are the same (``tests/test_targets_instances.py``).
    """
    height, width = shape
    markers = seeds.ravel()[crowded_pixels]
    if _watershed_raveled is None:  # scikit-image without the flooding function used below
        crowded = np.zeros(shape, dtype=bool)
        crowded.ravel()[crowded_pixels] = True
        marker_image = np.zeros(shape, dtype=np.int32)
        marker_image.ravel()[crowded_pixels] = markers
        image = np.zeros(shape, dtype=np.float32)  # outside the mask its values are never read
        image.ravel()[crowded_pixels] = -body
        return watershed(image, markers=marker_image, mask=crowded).ravel()[crowded_pixels]
    # watershed() pads by one pixel (the flooding never looks past the mask, which is 0 there)
    row = width + 2
    padded = (crowded_pixels // width + 1) * row + crowded_pixels % width + 1
    size = (height + 2) * row
    image = np.zeros(size, dtype=np.float64)  # only the crowded pixels are read: the rest stays untouched pages
    image[padded] = -body
    mask = np.zeros(size, dtype=np.int8)
    mask[padded] = 1
    output = np.zeros(size, dtype=np.int32)
    output[padded] = markers
    marker_locations = padded[markers != 0].astype(np.intp)
    neighbours = np.array([-row, -1, 1, row], dtype=np.intp)  # watershed()'s order for connectivity 1
    _watershed_raveled(image, marker_locations, neighbours, mask, np.array([row, 1], dtype=np.intp), 0.0, output, False)
    return output[padded]


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set labels with fewer than ``min_size`` pixels to 0, in place. ``(H, W)`` int -> the same array."""
    if min_size <= 1 or not labels.any():
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    labels[small[labels]] = 0
    return labels


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Renumber labels to 1..N in order of first appearance in raster order: ``(H, W)`` int -> int32.

    Per-object boxes instead of a sort of all pixels (whose int64 indices would bound memory).
    """
    labels = np.asarray(labels)
    if labels.size == 0 or not labels.any():
        return np.zeros(labels.shape, dtype=np.int32)
    labels2d = labels.reshape(labels.shape[0], -1) if labels.ndim == 2 else labels.reshape(1, -1)
    boxes = ndi.find_objects(labels2d)
    firsts = []
    for value, box in enumerate(boxes, start=1):
        if box is None:
            continue
        ys, xs = box
        row = labels2d[ys.start, xs]
        firsts.append((ys.start, xs.start + int(np.argmax(row == value)), value))
    firsts.sort()
    lut = np.zeros(len(boxes) + 1, dtype=np.int32)
    lut[[value for _, _, value in firsts]] = np.arange(1, len(firsts) + 1, dtype=np.int32)
    return lut[labels]
