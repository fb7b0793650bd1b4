"""The steps of an image, engine-agnostic: start it (plan, empty OME-Zarr group), read and
normalise a block, predict blocks, finish a block (instances, owned nuclei, measurements, image
copy). Engines schedule these steps (through :mod:`nucleibatch.segment.units`); the image's last
step is in :mod:`nucleibatch.segment.stitch`."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ImageReadError, ObjectTooLargeError
from ..instances import InstanceParams, instance_labels
from ..io.discover import ImageRecord
from ..io.location import Location
from ..io.readers import ImageSource, open_source
from ..measure import measure_labels
from ..normalize import NormStats, normalise_pixels, to_grey
from ..output.checkpoints import (
    drop_checkpoints,
    finished_blocks,
    load_block,
    save_block,
)
from ..output.folder import OutputFolder
from ..output.store import (
    chunk_for_blocks,
    create_image_group,
    open_root,
    store_name,
)
from ..output.tables import (
    remove_image_outputs,
)
from ..scale import (
    from_network_scale,
    network_box,
    to_network_scale,
)
from ..stitching import OwnedObjects, select_owned
from ..tiling import Block
from .plan import (
    BlockResult,
    ImagePlan,
    block_size_at,
    image_group,
    plan_image,
    prediction_region,
)
from .rows import input_fingerprint
from .settings import (
    SegmentSettings,
    instance_params,
    instances_on_device,
)
from .timer import Timer

if TYPE_CHECKING:  # the post-processing processes import this module: no torch
    from ..model.config import BundleConfig
    from ..model.predict import NucleiModel


log = logging.getLogger(__name__)


def open_image(record: ImageRecord, timer: Timer) -> ImageSource:
    """Open an image's source (an unreadable one found at discovery raises :class:`ImageReadError`)."""
    if record.error:
        raise ImageReadError(record.error)
    with timer("read"):
        return open_source(record)


def start_image(
    record: ImageRecord, settings: SegmentSettings, model_config: BundleConfig, out_dir: Location, timer: Timer | None = None, source: ImageSource | None = None
) -> ImagePlan:
    """First step of an image: forget any earlier attempt, plan it, create its (empty) OME-Zarr group.

    ``source``: the image already open (kept open); else it is opened and closed here.
    """
    return _start_image(record, settings, model_config, out_dir, timer or Timer(), source)[0]


def _start_image(record: ImageRecord, settings: SegmentSettings, model_config: BundleConfig, out_dir: Location, timer: Timer, source: ImageSource | None):
    """:func:`start_image`, also returning the image's zarr group: new, or, for an image of several
    blocks some of which an earlier run finished (:mod:`nucleibatch.output.checkpoints`), the group
    that run wrote them into (``plan.done_blocks``)."""
    name, group_path = store_name(record.image_id), image_group(record)
    remove_image_outputs(out_dir, name)
    fingerprint = input_fingerprint(record)  # as discovered: a change since is seen by the next run
    own_source = source is None
    if own_source:
        source = open_image(record, timer)
    try:
        plan = plan_image(record, source, settings, model_config, timer)
        plan.input_fingerprint = fingerprint
    finally:
        if own_source:
            source.close()
    root = open_root(OutputFolder(out_dir).masks)
    if len(plan.blocks) > 1:
        plan.done_blocks = tuple(finished_blocks(out_dir, name, plan.checkpoint_key()))
        if plan.done_blocks and group_path in root:
            log.info("%s: resuming from %d of its %d blocks, finished by an earlier run", record.image_id, len(plan.done_blocks), len(plan.blocks))
            return plan, root[group_path]
        if plan.done_blocks:  # their image cores went with the group: start the checkpoints over
            drop_checkpoints(out_dir, name)
            plan.done_blocks = tuple(finished_blocks(out_dir, name, plan.checkpoint_key()))
    with timer("write"):
        chunk = chunk_for_blocks(block_size_at(settings.block_size, record.scale, settings.block_margin))
        group = create_image_group(
            root, group_path, record.image_id, plan.shape, plan.channels, plan.dtype, chunk=chunk, pixel_size_um=record.pixel_size_um, channel_names=record.channel_names
        )
    return plan, group


def keep_block(out_dir: Location, plan: ImagePlan, result: BlockResult) -> None:
    """Checkpoint a finished block of an image of several blocks (:mod:`nucleibatch.output.checkpoints`)."""
    if len(plan.blocks) > 1:
        save_block(out_dir, plan.name, result.block_index, result.owned, result.columns)


def kept_block(out_dir: Location, plan: ImagePlan, block_index: int) -> BlockResult:
    """A block an earlier run finished, as its :class:`BlockResult` (no stage seconds: done then)."""
    owned, columns = load_block(out_dir, plan.name, block_index)
    return BlockResult(block_index, owned, columns)


def read_block(plan: ImagePlan, block: Block, source: ImageSource, halo: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Raw pixels ``(h, w, C)`` of the block's prediction region and that region's box.

    ``halo``: the network's context in its own pixels (:func:`context_pixels`), as many of the
    image's pixels where the image is resampled for it (``plan.scale``)."""
    region = prediction_region(block, plan.shape, math.ceil(halo / plan.scale))
    return source.read(*region), region


def read_and_normalise(plan: ImagePlan, block: Block, source: ImageSource, halo: int, settings: SegmentSettings, timer: Timer) -> tuple:
    """``(raw, region, normalised)`` of one block: its prediction region's pixels, box and network input."""
    with timer("read"):
        raw, region = read_block(plan, block, source, halo)
    with timer("normalise"):
        return raw, region, normalise_region(plan, raw, settings)


@dataclass
class BlockPrediction:
    """The model's output for one block: what the post-processing of the block needs.

    probabilities: ``(K, h, w)`` over ``block.read``, float16 where the network ran in bf16, else
        float32; None where the labels were made on the network's device. For an image resampled
        for the network, at the network's scale (see ``resampling`` and :func:`at_image_pixels`).
    pixels: ``(h, w, C)`` the image's raw pixels over ``block.read`` (for intensities and the image copy).
    owned: where the labels were made on the network's device (:func:`instances_on_device`), what
        :func:`find_block_nuclei` would compute from them, computed there too (:func:`find_nuclei_on_device`):
        ``(OwnedObjects, columns)``, or the error that the block's image fails with;
        else None.
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


def normalise_region(plan: ImagePlan, raw: np.ndarray, settings: SegmentSettings) -> np.ndarray:
    """:func:`network_input` of a block's raw pixels ``(h, w, C)``."""
    return network_input(raw, plan.stats, plan.channel, plan.scale)


def predict_blocks(
    items: list[tuple[ImagePlan, Block, np.ndarray, tuple[int, int, int, int]]],
    model: NucleiModel,
    settings: SegmentSettings,
    batch_size: int = 4,
    normalised: list[np.ndarray] | None = None,
) -> list[BlockPrediction]:
    """Normalise the blocks' prediction regions and run the model on them: the tiles of several
    blocks (of one image or of several small ones) are batched together. Each prediction's
    stage seconds are its share by pixels. Where :func:`instances_on_device`, each block's
    instance labels are made on the model's device too (at the image's own pixels), and replace
    its probabilities; else the probabilities of an image resampled for the network stay at the
    network's scale, and :func:`find_block_nuclei` takes them back to the image's pixels (outside the
    model's thread).

    Args:
        items: ``(plan, block, raw, region)``: ``raw`` the ``(h, w, C)`` pixels of ``region``
            (from :func:`read_block`).

    ``normalised``: the items' :func:`normalise_region` already computed (by a reader thread).
    """
    timer = Timer()
    inners = []
    for _, block, _, region in items:
        ry0, ry1, rx0, rx1 = block.read
        inners.append((ry0 - region[0], ry1 - region[0], rx0 - region[2], rx1 - region[2]))
    if normalised is None:
        with timer("normalise"):
            normalised = [normalise_region(plan, raw, settings) for plan, _, raw, _ in items]
    scales = [plan.scale for plan, *_ in items]
    # the part of each (resampled) region that the block's read region needs
    boxes = [inner if scale == 1.0 else network_box(inner, scale, image.shape) for inner, scale, image in zip(inners, scales, normalised, strict=True)]
    on_device = instances_on_device(settings, model.device.type)
    with timer("predict"):
        probabilities = model.predict_many(normalised, batch_size=batch_size, tta=settings.tta, output_boxes=boxes, keep_half=True, on_device=on_device)
    del normalised
    resamplings = [None if scale == 1.0 else (scale, (box[0], box[2]), inner) for scale, box, inner in zip(scales, boxes, inners, strict=True)]
    pixels = [raw[y0:y1, x0:x1] for (_, _, raw, _), (y0, y1, x0, x1) in zip(items, inners, strict=True)]
    owned: list[tuple | BaseException | None] = [None] * len(items)
    if on_device:
        params = instance_params(settings, model)
        with timer("instances"):
            labels = labels_on_device(probabilities, resamplings, params, scales)
        with timer("measure"):
            owned = [find_nuclei_on_device(plan, block, block_labels, block_pixels, settings, params) for (plan, block, _, _), block_labels, block_pixels in zip(items, labels, pixels, strict=True)]
        del labels
        probabilities = [None] * len(items)
        resamplings = [None] * len(items)
    total = sum(p.shape[0] * p.shape[1] for p in pixels)
    predictions = []
    for (_, block, _, _), block_probabilities, block_owned, block_pixels, resampling in zip(items, probabilities, owned, pixels, resamplings, strict=True):
        share = block_pixels.shape[0] * block_pixels.shape[1] / total
        seconds = {stage: value * share for stage, value in timer.seconds.items()}
        predictions.append(BlockPrediction(block.index, block_probabilities, block_pixels, seconds, owned=block_owned, resampling=resampling))
    return predictions


def find_nuclei_on_device(plan: ImagePlan, block: Block, labels, pixels: np.ndarray, settings: SegmentSettings, params: InstanceParams) -> tuple | BaseException:
    """:func:`find_block_nuclei`'s ownership and measurements of a block whose labels (``(h, w)`` tensor
    over ``block.read``) are on the network's device, done there
    (:func:`nucleibatch.stitching_torch.own_and_measure_on_device`); a nucleus larger than the
    block margin is returned as the error its image fails with (the other images of the call go on)."""
    from ..stitching_torch import own_and_measure_on_device

    try:
        return own_and_measure_on_device(
            labels, block, plan.shape, settings.block_margin, params.at_scale(plan.scale).min_size, to_grey(pixels, plan.channel), pixels, plan.channel_columns
        )
    except ObjectTooLargeError as error:
        return error


def labels_on_device(probabilities: list, resamplings: list[tuple | None], params: InstanceParams, scales: list[float]) -> list:
    """Instance labels of blocks' probabilities that are on the network's device: ``(K, h_i, w_i)``
    tensors -> ``(h_i, w_i)`` int32 tensors there (raw ids, objects of every size). Blocks of one
    scale are labelled in one batch (padded to a common shape with background), so that many small
    images cost the kernel launches of one. Probabilities at the network's scale of a resampled
    image go through the host to be taken back to the image's pixels."""
    import torch

    from ..instances_torch import instance_labels_batch

    labels: list = [None] * len(probabilities)
    at_pixels = []
    for block_probabilities, resampling in zip(probabilities, resamplings, strict=True):
        if resampling is not None:
            block_probabilities = torch.from_numpy(at_image_pixels(block_probabilities.cpu().numpy(), resampling)).to(block_probabilities.device)
        at_pixels.append(block_probabilities)
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


def at_image_pixels(probabilities: np.ndarray, resampling: tuple | None) -> np.ndarray:
    """Probabilities of a block's read region at the image's own pixels: as they are, or taken back
    from the network's scale (``resampling`` = ``(scale, origin, box)``, see :class:`BlockPrediction`)."""
    return probabilities if resampling is None else from_network_scale(probabilities, *resampling)


def find_block_nuclei(plan: ImagePlan, block: Block, prediction: BlockPrediction, settings: SegmentSettings, params: InstanceParams, image_group=None) -> BlockResult:
    """Instances of one block, its owned nuclei and their measurements; writes the block's image core."""
    timer = Timer()
    timer.add(prediction.seconds)
    ry0, ry1, rx0, rx1 = block.read
    params = params.at_scale(plan.scale)  # the labels are made at the image's own pixels
    if isinstance(prediction.owned, BaseException):
        raise prediction.owned
    if prediction.owned is not None:
        owned, columns = prediction.owned
    else:
        with timer("instances"):
            labels = instance_labels(at_image_pixels(prediction.probabilities, prediction.resampling), params)
            owned_labels, owned = select_owned(labels, block, plan.shape, settings.block_margin, params.min_size)
            del labels
        with timer("measure"):
            columns = measure_labels(owned_labels, to_grey(prediction.pixels, plan.channel), origin=(ry0, rx0), channels=prediction.pixels, channel_columns=plan.channel_columns)
    if image_group is not None and settings.store_image:
        with timer("write"):
            cy0, cy1, cx0, cx1 = block.core_in_read
            image_group["0"][:, block.core[0] : block.core[1], block.core[2] : block.core[3]] = np.moveaxis(prediction.pixels[cy0:cy1, cx0:cx1], -1, 0)
    return BlockResult(block.index, owned, columns, dict(timer.seconds))


def without_masks(plan: ImagePlan, result: BlockResult) -> BlockResult:
    """What a finished block passes on to its image's last step: for an image of several blocks,
    whose block results are checkpointed (:func:`keep_block`), the result without its owned nuclei
    (:func:`stitch_image` reads them back in their turn), so that the blocks of a whole
    slide waiting for its last step hold their measurements only; else the result itself."""
    if len(plan.blocks) == 1:
        return result
    return BlockResult(result.block_index, None, result.columns, result.seconds, result.unit)
