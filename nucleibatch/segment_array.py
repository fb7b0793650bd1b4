"""Segmentation of one in-memory image: the same steps as the block pipeline, in one block."""

from __future__ import annotations

import numpy as np

from .instances import InstanceParams, probabilities_to_labels, relabel_sequential, remove_small
from .model import NucleiModel
from .normalize import apply_stats, stats_for_bundle, to_grey
from .options import resolve_instances_on


def segment_image(
    image: np.ndarray,
    model: NucleiModel,
    channel: int | None = None,
    params: InstanceParams | None = None,
    batch_size: int = 4,
    instances_on: str = "cpu",
) -> np.ndarray:
    """Instance labels of an in-memory image.

    Args:
        image: ``(H, W)`` or ``(H, W, C)``, any real dtype.
        model: a loaded bundle.
        channel: the nuclear-stain channel (``None``: mean of the colour channels).
        params: post-processing (default: the bundle's tuned values).
        instances_on: ``"cpu"`` (scikit-image's watershed), ``"device"`` (torch on the model's
            device, :mod:`nucleibatch.instances_torch`) or ``"auto"`` (device on CUDA), as
            ``segment --instances-on``.

    Returns:
        ``(H, W)`` int32 labels, 0 = background.
    """
    grey = to_grey(image, channel)
    stats = stats_for_bundle(grey, model.config.get("normalization", {}))
    probabilities = model.predict(apply_stats(grey, stats), batch_size=batch_size)
    params = params or model.postprocess
    if resolve_instances_on(instances_on, model.device.type) == "device":
        from .instances_torch import instance_labels_on

        return relabel_sequential(remove_small(instance_labels_on(model.device, probabilities, params), params.min_size))
    return probabilities_to_labels(probabilities, params)
