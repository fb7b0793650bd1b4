"""The per-image work of `segment`, engine-agnostic.

An image is planned once (open, normalisation statistics from its overview,
block grid), then each block is processed (read with margin and halo, normalise,
predict, instances, keep owned nuclei, measure them, write the block's image core),
then each block core's labels are painted from the owned nuclei of the blocks
around it, and the image is finished (pyramids, nuclei part, completion record).
Engines schedule these steps; they all call the functions here.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .channels import intensity_columns, intensity_suffixes, resolve_channel
from .errors import ImageReadError, ObjectTooLargeError, UsageError
from .instances import InstanceParams, instance_labels
from .io.discover import ImageRecord
from .io.location import Location, fingerprint, to_location
from .io.readers import ImageSource, open_source
from .measure import concat_columns, measure_labels, physical_columns, touches_border
from .normalize import NormStats, normalise_pixels, stats_for_bundle, to_grey
from .options import INSTANCES_ON, resolve_instances_on
from .output.checkpoints import drop_checkpoints, finished_blocks, load_block, save_block
from .output.folder import OutputFolder
from .output.store import (
    chunk_for_blocks,
    create_image_group,
    label_array,
    open_root,
    store_name,
    write_pyramids,
)
from .output.tables import output_manifest, remove_image_outputs, write_nuclei_part, write_record
from .scale import (
    check_diameter,
    check_pixel_size,
    from_network_scale,
    network_box,
    scaled_shape,
    to_network_scale,
)
from .stitching import OwnedObjects, block_offsets, paint_region, select_owned
from .tiling import PAD_MULTIPLE, Block, block_grid, floor_to, small_image_window

if TYPE_CHECKING:  # post-processing processes import this module: they need no torch
    from .model.config import BundleConfig
    from .model.predict import NucleiModel

log = logging.getLogger(__name__)
MIN_SIDE = 8
STAGES = ("read", "normalise", "predict", "instances", "stitch", "measure", "write")


@dataclass(frozen=True)
class SegmentSettings:
    """Settings of a segment run that change its results (saved in OUT and checked on resume)."""

    block_size: int = 2048
    block_margin: int = 128
    # --channel: an index, or a channel name resolved per image (image_channel); None: the mean of the colours
    channel: int | str | None = None
    invert: str | None = None  # None: the model's normalisation setting
    store_image: bool = True
    postprocess: dict | None = None  # None: the model's tuned values
    tta: bool | None = None  # None: the model's setting (flip test-time augmentation)
    # where probabilities become instance labels: "cpu" (scikit-image's watershed, in the
    # post-processing threads or processes), "device" (torch, next to the network:
    # nucleibatch.instances_torch), "auto" (device where the network runs on CUDA, else cpu)
    instances_on: str = "auto"
    pixel_size: float | None = None  # micrometres per pixel of every input (--pixel-size); None: each file's metadata
    diameter: float | str | None = None  # nucleus diameter in input pixels (--diameter), "auto" (estimated), None

    def validate(self) -> None:
        if self.block_size < 64 or self.block_size % 32:
            raise UsageError(f"--block-size must be a multiple of 32, at least 64 (got {self.block_size})")
        if not 0 <= self.block_margin < self.block_size:
            raise UsageError(f"--block-margin must be >= 0 and smaller than --block-size (got {self.block_margin})")
        if self.invert not in (None, "auto", "never", "always"):
            raise UsageError(f"--invert must be auto, never or always (got {self.invert})")
        if self.instances_on not in INSTANCES_ON:
            raise UsageError(f"--instances-on must be {', '.join(INSTANCES_ON)} (got {self.instances_on})")
        check_pixel_size(self.pixel_size)
        check_diameter(self.diameter)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImagePlan:
    """One image ready to be processed block by block."""

    record: ImageRecord
    name: str
    shape: tuple[int, int]
    channels: int
    dtype: np.dtype
    stats: NormStats
    blocks: list[Block]
    input_fingerprint: str | None = None  # the input as it was when planned (resume redoes changed inputs)
    # blocks an earlier run finished (kept in OUT: nucleibatch.output.checkpoints); not done again
    done_blocks: tuple[int, ...] = ()
    channel: int | None = None  # the nuclear-stain channel's index in this image (--channel resolved; None: the mean of the colours)

    @property
    def store_path(self) -> str:
        """The image's group in masks.zarr (:func:`image_group`); :attr:`name` names its
        completion record, nuclei part and checkpoints."""
        return image_group(self.record)

    @property
    def scale(self) -> float:
        """The factor the network sees the image enlarged by (:mod:`nucleibatch.scale`; 1: as it is)."""
        return self.record.scale

    @property
    def channel_columns(self) -> tuple[str, ...]:
        """The image's per-channel mean columns (:func:`nucleibatch.channels.intensity_suffixes`; none for grey and colour images)."""
        return intensity_columns(intensity_suffixes(self.channels, self.dtype, self.record.channel_names))

    @property
    def blocks_to_do(self) -> list[Block]:
        """The blocks this run computes: all but :attr:`done_blocks`, in raster order."""
        done = set(self.done_blocks)
        return [block for block in self.blocks if block.index not in done]

    def checkpoint_key(self) -> dict[str, Any]:
        """What its finished blocks depend on beyond the OUT's model and settings (see
        :mod:`nucleibatch.output.checkpoints`)."""
        return {
            "input": self.input_fingerprint, "shape": list(self.shape), "scale": self.scale, "stats": asdict(self.stats),
            "blocks": [list(b.read) for b in self.blocks], "nucleibatch": __version__,
        }  # fmt: skip


@dataclass
class BlockResult:
    """What one block contributes: its owned nuclei and their measurements (block-local ids)."""

    block_index: int
    owned: OwnedObjects | None  # None: kept in the block's checkpoint (:func:`without_masks`)
    columns: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)
    unit: dict[str, Any] | None = None  # where its units ran (distributed engines)


class Timer:
    """Accumulates seconds per stage: ``with timer("predict"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, stage: str) -> _Span:
        return _Span(self, stage)

    def add(self, other: dict[str, float]) -> None:
        for key, value in other.items():
            self.seconds[key] += value


class _Span:
    def __init__(self, timer: Timer, stage: str) -> None:
        self.timer, self.stage = timer, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.timer.seconds[self.stage] += time.perf_counter() - self.start


def instance_params(settings: SegmentSettings, model: NucleiModel) -> InstanceParams:
    """The post-processing of a run: ``settings.postprocess`` when given, else the model's tuned values."""
    return InstanceParams.from_dict(settings.postprocess) if settings.postprocess else model.postprocess


def instances_on_device(settings: SegmentSettings, device_type: str) -> bool:
    """Whether a block's instance labels are computed next to the network, on its device
    (``device_type``: ``"cuda"`` or ``"cpu"``), rather than from its probabilities on the CPU."""
    return resolve_instances_on(settings.instances_on, device_type) == "device"


def context_pixels(model_config: BundleConfig) -> int:
    """Pixels of image read around a block's read region: the model's halo. The network's tiles
    cover the read region (the block's output, :func:`nucleibatch.tiling.tiles_over_box`) and
    each sees this halo around its core, at a seam as inside a block."""
    return model_config.halo


def image_channel(record: ImageRecord, settings: SegmentSettings) -> int | None:
    """``--channel`` for one image: the index as given, or the index of the channel of that name
    (:func:`nucleibatch.channels.resolve_channel`; raises :class:`ImageReadError` where it has none)."""
    return resolve_channel(settings.channel, record.channel_names, record.channels)


def plan_image(record: ImageRecord, source: ImageSource, settings: SegmentSettings, model_config: BundleConfig, timer: Timer) -> ImagePlan:
    """Normalisation statistics (once, from the image's overview) and the block grid."""
    if record.error:
        raise ImageReadError(record.error)
    channel = image_channel(record, settings)
    height, width = source.shape
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ImageReadError(f"image too small ({height}x{width}); nuclei segmentation needs at least {MIN_SIDE}x{MIN_SIDE} pixels")
    with timer("read"):
        overview = source.overview()
    with timer("normalise"):
        stats = stats_for_bundle(overview, model_config.normalization, settings.invert, channel)
    blocks = block_grid((height, width), block_size_at(settings.block_size, record.scale, settings.block_margin), settings.block_margin)
    return ImagePlan(record, store_name(record.image_id), (height, width), source.channels, np.dtype(source.dtype), stats, blocks, channel=channel)


def image_group(record: ImageRecord) -> str:
    """The group of an image in masks.zarr: the one its OUT's layout gives it (plate fields,
    :mod:`nucleibatch.output.layout`), else the flat :func:`store_name` of its id."""
    return record.store_path or store_name(record.image_id)


def block_size_at(block_size: int, scale: float, margin: int) -> int:
    """The block size for an image the network sees enlarged ``scale`` times: ``--block-size``
    halved until the enlarged block is no larger than ``block_size`` (memory follows the network's
    pixels, not the image's), while it stays a multiple of 32 above ``margin``; halving keeps the
    zarr chunks dividing it."""
    size = block_size
    while scale * size > block_size * 1.0001 and size % 64 == 0 and size // 2 > margin:
        size //= 2
    return size


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


def prediction_region(block: Block, shape: tuple[int, int], halo: int) -> tuple[int, int, int, int]:
    """The block's read region grown by ``halo`` pixels of context for the network, clipped to
    the image; it starts on a multiple of PAD_MULTIPLE, so that the tiles laid from its corner
    are on the network's pixel grid of the whole image (:func:`nucleibatch.tiling.tiles_over_box`).
    An image resampled for the network is resampled block by block: there neighbouring blocks'
    grids may differ by a fraction of a pixel, and each nucleus still has one owner block."""
    y0, y1, x0, x1 = block.read
    return (max(0, floor_to(y0 - halo, PAD_MULTIPLE)), min(shape[0], y1 + halo), max(0, floor_to(x0 - halo, PAD_MULTIPLE)), min(shape[1], x1 + halo))


def read_block(plan: ImagePlan, block: Block, source: ImageSource, halo: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Raw pixels ``(h, w, C)`` of the block's prediction region and that region's box.

    ``halo``: the network's context in its own pixels (:func:`context_pixels`), as many of the
    image's pixels where the image is resampled for it (``plan.scale``)."""
    region = prediction_region(block, plan.shape, math.ceil(halo / plan.scale))
    return source.read(*region), region


@dataclass
class BlockPrediction:
    """The model's output for one block: what the post-processing of the block needs.

    probabilities: ``(K, h, w)`` over ``block.read``, float16 where the network ran in bf16, else
        float32; None where the labels were made on the network's device. For an image resampled
        for the network, at the network's scale (see ``resampling`` and :func:`at_image_pixels`).
    pixels: ``(h, w, C)`` the image's raw pixels over ``block.read`` (for intensities and the image copy).
    owned: where the labels were made on the network's device (:func:`instances_on_device`), what
        :func:`finish_block` would compute from them, computed there too (:func:`finish_on_device`):
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
    network's scale, and :func:`finish_block` takes them back to the image's pixels (outside the
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
            owned = [finish_on_device(plan, block, block_labels, block_pixels, settings, params) for (plan, block, _, _), block_labels, block_pixels in zip(items, labels, pixels, strict=True)]
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


def finish_on_device(plan: ImagePlan, block: Block, labels, pixels: np.ndarray, settings: SegmentSettings, params: InstanceParams) -> tuple | BaseException:
    """:func:`finish_block`'s ownership and measurements of a block whose labels (``(h, w)`` tensor
    over ``block.read``) are on the network's device, done there
    (:func:`nucleibatch.stitching_torch.own_and_measure_on_device`); a nucleus larger than the
    block margin is returned as the error its image fails with (the other images of the call go on)."""
    from .stitching_torch import own_and_measure_on_device

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

    from .instances_torch import instance_labels_batch

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


def one_tile_window(plan: ImagePlan, model_config: BundleConfig) -> tuple[int, int] | None:
    """The network window of an image small enough to be one tile of the network (most DSB
    fields), or None: engines batch the blocks of several such images of one window into one
    model call."""
    if len(plan.blocks) != 1:
        return None
    return small_image_window(scaled_shape(plan.shape, plan.scale), model_config.tile_size)


def finish_block(plan: ImagePlan, block: Block, prediction: BlockPrediction, settings: SegmentSettings, params: InstanceParams, image_group=None) -> BlockResult:
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


def neighbours(plan: ImagePlan, block: Block) -> list[Block]:
    """Blocks whose read region overlaps this block's core (their nuclei may reach into it)."""
    cy0, cy1, cx0, cx1 = block.core
    return [b for b in plan.blocks if b.read[0] < cy1 and b.read[1] > cy0 and b.read[2] < cx1 and b.read[3] > cx0]


def paint_block(plan: ImagePlan, block: Block, results: dict[int, BlockResult], offsets: np.ndarray, image_group) -> dict[int, int]:
    """Write the labels of one block core from the owned nuclei of its neighbours.

    Returns ``{global_id: pixels lost to a smaller id}`` (usually empty).
    """
    pieces = [(results[b.index].owned, int(offsets[b.index])) for b in neighbours(plan, block)]
    labels, lost = paint_region(block.core, pieces)
    cy0, cy1, cx0, cx1 = block.core
    label_array(image_group)[cy0:cy1, cx0:cx1] = labels
    return lost


def remeasure(plan: ImagePlan, source: ImageSource, image_group, columns: dict[str, np.ndarray], global_ids: list[int], settings: SegmentSettings) -> None:
    """Re-measure nuclei that lost pixels at a seam from the final labels (in place): every
    column, the per-channel means too, from the raw pixels of the nucleus's whole box."""
    row_of = {int(label): i for i, label in enumerate(columns["label"])}
    for global_id in global_ids:
        i = row_of[global_id]
        y0, x0 = int(columns["bbox_min_y"][i]), int(columns["bbox_min_x"][i])
        y1, x1 = int(columns["bbox_max_y"][i]), int(columns["bbox_max_x"][i])
        labels = np.asarray(label_array(image_group)[y0:y1, x0:x1])
        mask = (labels == global_id).astype(np.int32)
        if not mask.any():
            columns["area"][i] = 0
            continue
        pixels = source.read(y0, y1, x0, x1)
        fresh = measure_labels(mask, to_grey(pixels, plan.channel), origin=(y0, x0), id_offset=global_id - 1, channels=pixels, channel_columns=plan.channel_columns)
        for key, values in fresh.items():
            columns[key][i] = values[0]


def complete_image(
    plan: ImagePlan,
    results: dict[int, BlockResult],
    offsets: np.ndarray,
    lost: dict[int, int],
    image_group,
    settings: SegmentSettings,
    out_dir: Location,
    timer: Timer,
) -> dict[str, Any]:
    """Last step of an image whose block cores are all painted: the nuclei table part (global ids,
    nuclei that lost pixels at a seam re-measured), the pyramids, then the completion record.

    Returns the image's images.parquet row.
    """
    with timer("measure"):
        parts = []
        for index in range(len(plan.blocks)):
            columns = dict(results[index].columns)
            columns["label"] = (columns["label"].astype(np.int64) + offsets[index]).astype(np.uint32)
            parts.append(columns)
        columns = concat_columns(parts, plan.channel_columns)
        if lost:
            source = open_source(plan.record)
            try:
                remeasure(plan, source, image_group, columns, sorted(lost), settings)
            finally:
                source.close()
            keep = columns["area"] > 0
            columns = {k: v[keep] for k, v in columns.items()}
        columns.update(physical_columns(columns, plan.record.pixel_size_um))
        columns["touches_border"] = touches_border(columns, plan.shape)
    with timer("write"):
        write_pyramids(image_group)
        write_nuclei_part(out_dir, plan.name, plan.record.image_id, columns, plan.channel_columns)
        outputs = output_manifest(out_dir, plan.name, plan.store_path)
    row = {
        "image_id": plan.record.image_id,
        "source": plan.record.source,
        "height": plan.shape[0],
        "width": plan.shape[1],
        "n_nuclei": int(len(columns["label"])),
        "status": "ok",
        "error": None,
        "seconds": None,  # set by the caller, who knows when the image started
        "store_path": plan.store_path,
        **choice_columns(plan.record),
        **plate_columns(plan.record),
        # kept in the completion record only (not in images.parquet): resume and verify read them
        "input": plan.input_fingerprint,
        "outputs": outputs,
        # the per-channel columns of its nuclei part: the run's schema part unites them (output/tables.py)
        "channel_columns": list(plan.channel_columns),
    }
    return row


def paint_and_complete(plan: ImagePlan, results: list[BlockResult], settings: SegmentSettings, out_dir: Location, timer: Timer) -> dict[str, Any]:
    """The last step of an image whose blocks are all finished: paint every block core, in raster
    order, from the owned nuclei of the blocks around it (:class:`ImageStitcher`), then
    :func:`complete_image`. Returns the row (not yet recorded).

    ``results``: the blocks finished by this run, in any order. A block that an earlier run
    finished (``plan.done_blocks``), or whose result comes without its nuclei's masks (an image of
    several blocks: :func:`without_masks`, its masks in its checkpoint), is read back from its
    checkpoint as its turn comes; the stitcher frees each block's masks once every core that needs
    them is painted, so memory stays bounded by a few rows of blocks however large the image.
    """
    by_index = {r.block_index: r for r in results}
    covered = sorted(set(by_index) | set(plan.done_blocks))
    if covered != [b.index for b in plan.blocks]:
        raise ValueError(f"{plan.record.image_id}: block results {covered} do not cover the {len(plan.blocks)} blocks")
    group = open_root(OutputFolder(out_dir).masks)[plan.store_path]
    stitcher = ImageStitcher(plan, group, timer)
    for block in plan.blocks:
        result = by_index.pop(block.index, None)
        if result is None or result.owned is None:
            result = kept_block(out_dir, plan, block.index)
        stitcher.add(result)
    return complete_image(plan, stitcher.results, stitcher.offsets, stitcher.lost, group, settings, out_dir, timer)


def without_masks(plan: ImagePlan, result: BlockResult) -> BlockResult:
    """What a finished block passes on to its image's last step: for an image of several blocks,
    whose block results are checkpointed (:func:`keep_block`), the result without its owned nuclei
    (:func:`paint_and_complete` reads them back in their turn), so that the blocks of a whole
    slide waiting for its last step hold their measurements only; else the result itself."""
    if len(plan.blocks) == 1:
        return result
    return BlockResult(result.block_index, None, result.columns, result.seconds, result.unit)


class ImageStitcher:
    """Paints an image's block cores as the block results are added (in raster order): each core
    as soon as all its neighbours are there, then frees the nuclei no core still needs."""

    def __init__(self, plan: ImagePlan, group, timer: Timer) -> None:
        self.plan, self.group, self.timer = plan, group, timer
        self.results: dict[int, BlockResult] = {}
        self.offsets = np.zeros(0, dtype=np.int64)
        self.lost: dict[int, int] = {}
        self.painted: set[int] = set()
        self.by_index = {b.index: b for b in plan.blocks}
        self.waits_for = {b.index: {n.index for n in neighbours(plan, b)} for b in plan.blocks}
        self.needed_by: dict[int, set[int]] = defaultdict(set)
        for index, waits in self.waits_for.items():
            for neighbour in waits:
                self.needed_by[neighbour].add(index)

    def add(self, result: BlockResult) -> None:
        """Take one block's result; paint what it completes."""
        self.results[result.block_index] = result
        self.offsets = block_offsets(self.results[i].owned.count for i in range(len(self.results)))
        with self.timer("stitch"):
            for index in sorted(self.needed_by[result.block_index]):  # only these may have become ready
                if self.waits_for[index] <= self.results.keys() and index not in self.painted:
                    self.lost.update(paint_block(self.plan, self.by_index[index], self.results, self.offsets, self.group))
                    self.painted.add(index)
            for index, done in self.results.items():
                if self.needed_by[index] <= self.painted and done.owned.masks:
                    done.owned.masks = []


def read_and_normalise(plan: ImagePlan, block: Block, source: ImageSource, halo: int, settings: SegmentSettings, timer: Timer) -> tuple:
    """``(raw, region, normalised)`` of one block: its prediction region's pixels, box and network input."""
    with timer("read"):
        raw, region = read_block(plan, block, source, halo)
    with timer("normalise"):
        return raw, region, normalise_region(plan, raw, settings)


def input_fingerprint(record: ImageRecord) -> str | None:
    """The fingerprint (:func:`nucleibatch.io.location.fingerprint`) of the file or store an image
    comes from, as discovery found it (taken now for a record made without one)."""
    if record.fingerprint is not None or record.error:
        return record.fingerprint
    return fingerprint(to_location(record.path))


def failed_row(record: ImageRecord, error: BaseException | str, seconds: float) -> dict[str, Any]:
    """The images.parquet row of an image that could not be segmented (one-line reason)."""
    message = error if isinstance(error, str) else (str(error) or type(error).__name__)
    message = " ".join(message.split())[:500]
    shape = record.shape or (None, None)
    return {
        "image_id": record.image_id,
        "source": record.source,
        "height": shape[0],
        "width": shape[1],
        "n_nuclei": 0,
        "status": "failed",
        "error": message,
        "seconds": round(seconds, 4),
        "store_path": None,  # a failed image has no group in masks.zarr
        **choice_columns(record),
        **plate_columns(record),
    }


def choice_columns(record: ImageRecord) -> dict[str, Any]:
    """The images.parquet columns of how an image was treated (:mod:`nucleibatch.choose`)."""
    return {"modality": record.modality, "model": record.model, "pixel_size_um": record.pixel_size_um, "scale": float(record.scale)}


def plate_columns(record: ImageRecord) -> dict[str, Any]:
    """The images.parquet columns that place a plate field (null for other images)."""
    return {"plate": record.plate, "well": record.well, "field": record.field}


def record_failed_image(out_dir: Location, record: ImageRecord, error: BaseException | str, seconds: float) -> dict[str, Any]:
    """Record an image as failed: drop what an earlier run wrote for it (nuclei part, record,
    OME-Zarr group), write its completion record (the 'failed' row of :func:`failed_row`) and
    return that row."""
    row = failed_row(record, error, seconds)
    row["input"] = input_fingerprint(record)
    forget_image(out_dir, record.image_id, image_group(record))
    write_record(out_dir, store_name(record.image_id), row)
    return row


def forget_image(out_dir: Location, image_id: str, group: str | None = None) -> None:
    """Remove everything OUT holds for an image: its completion record, nuclei part, block
    checkpoints and OME-Zarr group (``group``: its store_path; None: the flat name of its id)."""
    name = store_name(image_id)
    group = group or name
    remove_image_outputs(out_dir, name)
    drop_checkpoints(out_dir, name)
    try:
        root = open_root(OutputFolder(out_dir).masks)
        if group in root:
            del root[group]
    except Exception:  # best effort: the group is replaced when the image is redone
        log.debug("could not remove the group of %s", image_id, exc_info=True)
