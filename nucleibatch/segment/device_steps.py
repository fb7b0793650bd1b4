"""The device's step implementation (``segment --instances-on device``, the default on a GPU): a
block stays on the network's device from its raw pixels to its owned nuclei. Its 8- or 16-bit
pixels go up as read and are normalised and resampled there (:mod:`nucleibatch.normalize_torch`,
:mod:`nucleibatch.scale_torch`); the network's probabilities stay there; the blocks of one call
are labelled in one batch (:mod:`nucleibatch.instances_torch`), owned and measured there
(:mod:`nucleibatch.stitching_torch`); only the owned labels and the table rows come back. Its
twin, :mod:`.host_steps`, does the same on the host; the two give the same nuclei (tests run
this one on CPU tensors)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ObjectTooLargeError
from ..instances import InstanceParams
from ..instances_torch import instance_labels_batch
from ..normalize import to_grey
from ..normalize_torch import TABLE_DTYPES, grey_on_device, network_input_on_device, upload_pixels
from ..scale_torch import from_network_scale_on_device, to_network_scale_on_device
from ..stitching_torch import own_and_measure_on_device
from ..tiling import Block
from .plan import ImagePlan
from .prediction import (
    BlockItem,
    BlockPrediction,
    block_predictions,
    network_boxes,
    read_boxes,
    resamplings,
)
from .settings import SegmentSettings, instance_params
from .timer import Timer

if TYPE_CHECKING:
    from ..model.predict import NucleiModel


class DeviceSteps:
    """Network input, network and nuclei on the model's device."""

    normalises_on_read = False  # raw pixels go to the device: the reader does not normalise

    def predict(
        self, items: Sequence[BlockItem], model: NucleiModel, settings: SegmentSettings, batch_size: int, normalised: list[np.ndarray] | None, timer: Timer
    ) -> list[BlockPrediction]:
        """Upload the blocks' raw pixels, make their network input, run the model (the tiles of
        several blocks batched together), label the blocks of one scale in one batch, own and
        measure each block's nuclei: all on the model's device. Each prediction holds the block's
        ``owned`` = ``(OwnedObjects, columns)``, or the error its image fails with (a nucleus
        larger than the block margin: the other images of the call go on).

        ``normalised``: not used (the reader does not normalise for these steps:
        :attr:`normalises_on_read`); the network input is made on the device from the raw pixels.
        """
        device = model.device
        inners = read_boxes(items)
        with timer("normalise"):
            raws = [upload_pixels(raw, device) if raw.dtype in TABLE_DTYPES else None for _, _, raw, _ in items]
            inputs = [
                to_network_scale_on_device(network_input_on_device(raw, on_device, plan.stats, plan.channel, device), plan.scale)
                for (plan, _, raw, _), on_device in zip(items, raws, strict=True)
            ]
        boxes = network_boxes(items, inners, [tuple(image.shape) for image in inputs])
        with timer("predict"):
            probabilities = model.predict_many(inputs, batch_size=batch_size, tta=settings.tta, output_boxes=boxes, keep_half=True, on_device=True)
        del inputs
        params = instance_params(settings, model)
        with timer("instances"):
            labels = labels_on_device(probabilities, resamplings(items, boxes, inners), params, [plan.scale for plan, *_ in items])
        del probabilities
        pixels = [raw[y0:y1, x0:x1] for (_, _, raw, _), (y0, y1, x0, x1) in zip(items, inners, strict=True)]
        with timer("measure"):
            owned = [
                own_block(plan, block, block_labels, measured_intensity(plan, block_pixels, raw, inner), block_pixels, settings, params)
                for (plan, block, _, _), block_labels, block_pixels, raw, inner in zip(items, labels, pixels, raws, inners, strict=True)
            ]
        del labels, raws
        return block_predictions(items, pixels, timer, [None] * len(items), owned, [None] * len(items))


def measured_intensity(plan: ImagePlan, pixels: np.ndarray, raw: torch.Tensor | None, inner: tuple[int, int, int, int]) -> np.ndarray | torch.Tensor:
    """The intensity a block's nuclei are measured in (:func:`~nucleibatch.normalize.to_grey` over
    ``block.read``): made on the device from the uploaded pixels where they are there, else on the host."""
    if raw is None or plan.channel_columns:  # per-channel columns: measured on the host
        return to_grey(pixels, plan.channel)
    y0, y1, x0, x1 = inner
    return grey_on_device(raw[y0:y1, x0:x1], plan.channel)


def own_block(
    plan: ImagePlan, block: Block, labels: torch.Tensor, grey: np.ndarray | torch.Tensor, pixels: np.ndarray, settings: SegmentSettings, params: InstanceParams
) -> tuple | BaseException:
    """:func:`~nucleibatch.stitching_torch.own_and_measure_on_device` of a block's labels ``(h, w)``
    over ``block.read``; a nucleus larger than the block margin is returned as its image's error."""
    try:
        return own_and_measure_on_device(labels, block, plan.shape, settings.block_margin, params.at_scale(plan.scale).min_size, grey, pixels, plan.channel_columns)
    except ObjectTooLargeError as error:
        return error


def labels_on_device(probabilities: list[torch.Tensor], resamplings: list[tuple | None], params: InstanceParams, scales: list[float]) -> list[torch.Tensor]:
    """Instance labels of blocks' probabilities on the network's device: ``(K, h_i, w_i)`` tensors
    -> ``(h_i, w_i)`` int32 tensors there (raw ids, objects of every size), at the image's own
    pixels (probabilities at the network's scale of a resampled image are taken back first,
    there). Blocks of one scale are labelled in one batch (padded to a common shape with
    background), so that many small images cost the kernel launches of one."""
    labels: list = [None] * len(probabilities)
    at_pixels = [p if r is None else from_network_scale_on_device(p, *r) for p, r in zip(probabilities, resamplings, strict=True)]
    with torch.inference_mode():
        for scale in dict.fromkeys(scales):
            members = [k for k, s in enumerate(scales) if s == scale]
            height = max(at_pixels[k].shape[1] for k in members)
            width = max(at_pixels[k].shape[2] for k in members)
            batch = at_pixels[members[0]].new_zeros((len(members), 3, height, width))
            for row, k in enumerate(members):
                _, h, w = at_pixels[k].shape
                batch[row, :, :h, :w] = at_pixels[k][:3]
            found = instance_labels_batch(batch, params.at_scale(scale))
            for row, k in enumerate(members):
                labels[k] = found[row, : at_pixels[k].shape[1], : at_pixels[k].shape[2]]
    return labels
