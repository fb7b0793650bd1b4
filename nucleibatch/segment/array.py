"""Segmentation of one in-memory image (``evaluate``): the block pipeline's steps
(:mod:`nucleibatch.segment.steps`: network input, prediction, labels at the image's pixels) on the
whole image as one block; and the nucleus size of an image, estimated by segmenting it
(``--diameter auto``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from ..instances import InstanceParams, probabilities_to_labels, relabel_sequential, remove_small
from ..normalize import NormStats, stats_for_bundle
from ..scale import median_diameter, resample_scale
from .prediction import at_image_pixels, network_input
from .settings import resolve_instances_on

if TYPE_CHECKING:  # the post-processing processes import this module: no torch
    from ..model.predict import NucleiModel


# --diameter auto segments at most this many pixels of an image (the densest window of its overview)
ESTIMATE_WINDOW = 1024


def segment_image(
    image: np.ndarray,
    model: NucleiModel,
    channel: int | None = None,
    params: InstanceParams | None = None,
    batch_size: int = 4,
    instances_on: str = "cpu",
    scale: float = 1.0,
    invert: str | None = None,
    stats: NormStats | None = None,
) -> np.ndarray:
    """Instance labels of an in-memory image.

    Args:
        image: ``(H, W)`` or ``(H, W, C)``, any real dtype.
        model: a loaded bundle.
        channel: the nuclear-stain channel (``None``: mean of the colour channels).
        params: post-processing (default: the bundle's tuned values), at the network's scale.
        instances_on: ``"cpu"`` (scikit-image's watershed), ``"device"`` (torch on the model's
            device, :mod:`nucleibatch.instances_torch`) or ``"auto"`` (device on CUDA), as
            ``segment --instances-on``.
        scale: the network sees the image enlarged ``scale`` times (:mod:`nucleibatch.scale`); the
            labels are made at the image's own pixels.
        invert: overrides the bundle's ``invert`` (``segment --invert``).
        stats: the image's normalisation statistics, when they come from elsewhere (a crop of a
            larger image normalises as the whole image does); default: computed from ``image``.

    Returns:
        ``(H, W)`` int32 labels, 0 = background.
    """
    stats = stats or stats_for_bundle(image, model.config.normalization, invert, channel)
    probabilities = model.predict(network_input(image, stats, channel, scale), batch_size=batch_size)
    probabilities = at_image_pixels(probabilities, None if scale == 1.0 else (scale, (0, 0), (0, image.shape[0], 0, image.shape[1])))
    params = (params or model.postprocess).at_scale(scale)
    if resolve_instances_on(instances_on, model.device.type) == "device":
        from ..instances_torch import instance_labels_on

        return relabel_sequential(remove_small(instance_labels_on(model.device, probabilities, params), params.min_size))
    return probabilities_to_labels(probabilities, params)


def estimate_diameter(image: np.ndarray, model: NucleiModel, channel: int | None = None, invert: str | None = None, stats: NormStats | None = None) -> float | None:
    """The median nucleus diameter of an image in its own pixels, found by segmenting it twice, as
    Cellpose's size model anchors its estimate: once as it is, then resampled so that the nuclei
    found have the bundle's training diameter, and measured again (a first pass at a wrong scale
    splits large nuclei and misses small ones). The size is the equivalent diameter
    ``sqrt(4 area / pi)``, as the bundle's ``scale.nucleus_diameter_px`` is.

    Args:
        image: ``(H, W[, C])``: the image, or a window of it (with the whole image's ``stats``).

    Returns:
        The diameter in pixels, or None when no nucleus is found (or the bundle records no
        training diameter).
    """
    model_scale = model.config.scale
    if not model_scale.get("nucleus_diameter_px"):
        return None
    diameter = None
    scale = 1.0
    for _ in range(2):
        labels = segment_image(image, model, channel, scale=scale, invert=invert, stats=stats)
        found = median_diameter(np.bincount(labels.ravel())[1:])
        if not math.isfinite(found):
            return diameter
        diameter = found
        new_scale = resample_scale(model_scale, diameter_px=diameter)
        if new_scale == scale:
            break
        scale = new_scale
    return diameter


def densest_window(network_input: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """The ``size`` x ``size`` window (or the whole image, when smaller) of a normalised image
    ``(H, W)`` float32 (nuclei bright) with the most signal: ``(y0, y1, x0, x1)``."""
    height, width = network_input.shape
    wy, wx = min(size, height), min(size, width)
    if (wy, wx) == (height, width):
        return 0, height, 0, width
    mean = ndi.uniform_filter(network_input.astype(np.float32), (wy, wx), mode="constant")
    # centres that keep the window inside the image
    cy0, cx0 = wy // 2, wx // 2
    inside = mean[cy0 : height - (wy - cy0) + 1, cx0 : width - (wx - cx0) + 1]
    y, x = np.unravel_index(int(np.argmax(inside)), inside.shape)
    return int(y), int(y) + wy, int(x), int(x) + wx
