"""The host's step implementation (``segment --instances-on cpu``, the default on CPU machines):
blocks are normalised on the host as they are read, the network's probabilities come back to the
host, and each block's nuclei are found there, in a CPU unit (scikit-image's seeded watershed,
ownership, measurements: pure NumPy). Its twin, :mod:`.device_steps`, keeps a block on the
network's device from its raw pixels to its owned nuclei; the two give the same nuclei."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..instances import InstanceParams, instance_labels
from ..measure import measure_labels
from ..normalize import to_grey
from ..stitching import OwnedObjects, select_owned
from ..tiling import Block
from .plan import ImagePlan
from .prediction import (
    BlockItem,
    BlockPrediction,
    at_image_pixels,
    block_predictions,
    network_boxes,
    normalise_region,
    read_boxes,
    resamplings,
)
from .settings import SegmentSettings
from .timer import Timer

if TYPE_CHECKING:  # the post-processing processes import this module: no torch
    from ..model.predict import NucleiModel


class HostSteps:
    """Network input and nuclei on the host; only the network on the model's device."""

    normalises_on_read = True  # the reader makes the network input (:func:`.prediction.normalise_region`)

    def predict(
        self, items: Sequence[BlockItem], model: NucleiModel, settings: SegmentSettings, batch_size: int, normalised: list[np.ndarray] | None, timer: Timer
    ) -> list[BlockPrediction]:
        """Run the model on the blocks' network inputs (the tiles of several blocks, of one image
        or of several small ones, batched together); each block's probabilities come to the host,
        those of an image resampled for the network at the network's scale (:meth:`find_nuclei`
        takes them back to the image's pixels, outside the model's thread).

        ``normalised``: the items' :func:`~.prediction.normalise_region` made by the reader, or None.
        """
        inners = read_boxes(items)
        if normalised is None:
            with timer("normalise"):
                normalised = [normalise_region(plan, raw) for plan, _, raw, _ in items]
        boxes = network_boxes(items, inners, [image.shape for image in normalised])
        with timer("predict"):
            probabilities = model.predict_many(normalised, batch_size=batch_size, tta=settings.tta, output_boxes=boxes, keep_half=True)
        del normalised
        pixels = [raw[y0:y1, x0:x1] for (_, _, raw, _), (y0, y1, x0, x1) in zip(items, inners, strict=True)]
        return block_predictions(items, pixels, timer, probabilities, [None] * len(items), resamplings(items, boxes, inners))

    def find_nuclei(
        self, plan: ImagePlan, block: Block, prediction: BlockPrediction, settings: SegmentSettings, params: InstanceParams, timer: Timer
    ) -> tuple[OwnedObjects, dict[str, np.ndarray]]:
        """A block's owned nuclei and their measurements from its probabilities, on the host.

        ``params``: at the image's own pixels (:meth:`InstanceParams.at_scale`).

        Raises:
            ObjectTooLargeError: an owned nucleus reaches the read region's inner edge.
        """
        ry0, _, rx0, _ = block.read
        with timer("instances"):
            labels = instance_labels(at_image_pixels(prediction.probabilities, prediction.resampling), params)
            owned_labels, owned = select_owned(labels, block, plan.shape, settings.block_margin, params.min_size)
            del labels
        with timer("measure"):
            columns = measure_labels(owned_labels, to_grey(prediction.pixels, plan.channel), origin=(ry0, rx0), channels=prediction.pixels, channel_columns=plan.channel_columns)
        return owned, columns
