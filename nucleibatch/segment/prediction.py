"""What the model's step of a block hands on (:class:`BlockPrediction`), and the network input
of a block's pixels: shared by the two step implementations (:mod:`.host_steps`,
:mod:`.device_steps`) and by :mod:`.array`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..normalize import NormStats, normalise_pixels
from ..scale import from_network_scale, network_box, to_network_scale
from ..stitching import OwnedObjects
from ..tiling import Block
from .plan import ImagePlan
from .timer import Timer

# a block as the model's step gets it: (plan, block, raw (h, w, C) pixels of region, region)
BlockItem = tuple[ImagePlan, Block, np.ndarray, tuple[int, int, int, int]]


@dataclass
class BlockPrediction:
    """The model's output for one block: what the post-processing of the block needs.

    probabilities: ``(K, h, w)`` over ``block.read``, float16 where the network ran in bf16, else
        float32 (:mod:`.host_steps`); None where the nuclei were found next to the network
        (:mod:`.device_steps`). For an image resampled for the network, at the network's scale
        (see ``resampling`` and :func:`at_image_pixels`).
    pixels: ``(h, w, C)`` the image's raw pixels over ``block.read`` (for intensities and the image copy).
    owned: where the nuclei were found next to the network, the block's ``(OwnedObjects, columns)``
        found there, or the error that the block's image fails with; else None.
    """

    block_index: int
    probabilities: np.ndarray | None
    pixels: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)
    worker: str | None = None  # where it ran (distributed engines)
    predict_group: int = 1  # blocks predicted in the same model call (small images are grouped)
    owned: tuple[OwnedObjects, dict[str, np.ndarray]] | BaseException | None = None
    # probabilities at the network's scale, of an image resampled for it: (scale, origin of the
    # probabilities in the resampled region, block.read in the region's own pixels)
    resampling: tuple[float, tuple[int, int], tuple[int, int, int, int]] | None = None


def network_input(pixels: np.ndarray, stats: NormStats, channel: int | None, scale: float) -> np.ndarray:
    """The network's input for raw pixels ``(h, w[, C])`` of an image: ``(h', w')`` float32,
    normalised with the image's statistics and resampled by its scale
    (:func:`~nucleibatch.scale.to_network_scale`; ``h' = h`` at scale 1)."""
    return to_network_scale(normalise_pixels(pixels, stats, channel), scale)


def normalise_region(plan: ImagePlan, raw: np.ndarray) -> np.ndarray:
    """:func:`network_input` of a block's raw pixels ``(h, w, C)``."""
    return network_input(raw, plan.stats, plan.channel, plan.scale)


def at_image_pixels(probabilities: np.ndarray, resampling: tuple | None) -> np.ndarray:
    """Probabilities of a block's read region at the image's own pixels: as they are, or taken back
    from the network's scale (``resampling`` = ``(scale, origin, box)``, see :class:`BlockPrediction`)."""
    return probabilities if resampling is None else from_network_scale(probabilities, *resampling)


def read_boxes(items: Sequence[BlockItem]) -> list[tuple[int, int, int, int]]:
    """Each block's read region inside its prediction region ``(y0, y1, x0, x1)``."""
    boxes = []
    for _, block, _, region in items:
        ry0, ry1, rx0, rx1 = block.read
        boxes.append((ry0 - region[0], ry1 - region[0], rx0 - region[2], rx1 - region[2]))
    return boxes


def network_boxes(items: Sequence[BlockItem], inners: list[tuple[int, int, int, int]], shapes: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """The part of each block's network input (resampled, of shape ``shapes``) that its read region needs."""
    return [inner if plan.scale == 1.0 else network_box(inner, plan.scale, shape) for (plan, *_), inner, shape in zip(items, inners, shapes, strict=True)]


def resamplings(items: Sequence[BlockItem], boxes: list, inners: list) -> list[tuple | None]:
    """Each block's :attr:`BlockPrediction.resampling` (None at scale 1)."""
    return [None if plan.scale == 1.0 else (plan.scale, (box[0], box[2]), inner) for (plan, *_), box, inner in zip(items, boxes, inners, strict=True)]


def block_predictions(items: Sequence[BlockItem], pixels: list[np.ndarray], timer: Timer, probabilities: Sequence, owned: Sequence, resampling: Sequence) -> list[BlockPrediction]:
    """One :class:`BlockPrediction` per item, each with its share (by pixels) of the call's stage seconds."""
    total = sum(p.shape[0] * p.shape[1] for p in pixels)
    predictions = []
    for (_, block, _, _), block_pixels, block_probabilities, block_owned, block_resampling in zip(items, pixels, probabilities, owned, resampling, strict=True):
        share = block_pixels.shape[0] * block_pixels.shape[1] / total
        seconds = {stage: value * share for stage, value in timer.seconds.items()}
        predictions.append(BlockPrediction(block.index, block_probabilities, block_pixels, seconds, owned=block_owned, resampling=block_resampling))
    return predictions
