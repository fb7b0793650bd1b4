"""The steps of an image, engine-agnostic: start it (plan, empty OME-Zarr group), read a block,
predict blocks, finish a block (owned nuclei, measurements, image copy). Engines schedule these
steps (through :mod:`nucleibatch.segment.units`); the image's last step is in
:mod:`nucleibatch.segment.stitch`.

Between a block's pixels and its owned nuclei, a run uses one of two step implementations
(:func:`block_steps`): the host's (:mod:`.host_steps`: normalised as read, nuclei found in the
block's CPU unit) or the device's (:mod:`.device_steps`: raw pixels to owned nuclei on the
network's device, in the model's step)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import ImageReadError
from ..instances import InstanceParams
from ..io.discover import ImageRecord
from ..io.location import Location
from ..io.readers import ImageSource, open_source
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
from ..tiling import Block
from .host_steps import HostSteps
from .plan import (
    BlockResult,
    ImagePlan,
    block_size_at,
    image_group,
    plan_image,
    prediction_region,
)
from .prediction import BlockItem, BlockPrediction, normalise_region
from .rows import input_fingerprint
from .settings import (
    SegmentSettings,
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


def read_and_normalise(plan: ImagePlan, block: Block, source: ImageSource, halo: int, timer: Timer, normalise: bool = True) -> tuple:
    """``(raw, region, normalised)`` of one block: its prediction region's pixels, box and network
    input (None without ``normalise``: the device's steps make it there, from the raw pixels)."""
    with timer("read"):
        raw, region = read_block(plan, block, source, halo)
    if not normalise:
        return raw, region, None
    with timer("normalise"):
        return raw, region, normalise_region(plan, raw)


class BlockSteps(Protocol):
    """How blocks go from their pixels to their owned nuclei: :class:`.host_steps.HostSteps` (the
    nuclei found on the host, in the block's CPU unit: :meth:`~.host_steps.HostSteps.find_nuclei`) or
    :class:`.device_steps.DeviceSteps` (found next to the network). :func:`block_steps` picks one for a run."""

    normalises_on_read: bool  # whether the reader makes the network input (on the host)

    def predict(
        self, items: Sequence[BlockItem], model: NucleiModel, settings: SegmentSettings, batch_size: int, normalised: list[np.ndarray] | None, timer: Timer
    ) -> list[BlockPrediction]:
        """The model's step of blocks: the predictions that :func:`find_block_nuclei` finishes."""
        ...


def block_steps(settings: SegmentSettings, device_type: str) -> BlockSteps:
    """The step implementation of a run whose network runs on ``device_type`` (``"cuda"``, ``"cpu"``):
    the device's where the nuclei are found there (:func:`~.settings.instances_on_device`), else the host's."""
    if instances_on_device(settings, device_type):
        # torch: imported where the model runs, never by the post-processing processes
        from .device_steps import DeviceSteps

        return DeviceSteps()
    return HostSteps()


def predict_blocks(
    items: list[BlockItem],
    model: NucleiModel,
    settings: SegmentSettings,
    batch_size: int = 4,
    normalised: list[np.ndarray] | None = None,
) -> list[BlockPrediction]:
    """The model's step of blocks (one image's, or several small images' whose tiles then share
    network calls): :meth:`BlockSteps.predict` of the run's step implementation. Each prediction's
    stage seconds are its share by pixels.

    Args:
        items: ``(plan, block, raw, region)``: ``raw`` the ``(h, w, C)`` pixels of ``region``
            (from :func:`read_block`).
        normalised: the items' network inputs, where the reader made them (the host's steps), else None.
    """
    return block_steps(settings, model.device.type).predict(items, model, settings, batch_size, normalised, Timer())


def find_block_nuclei(plan: ImagePlan, block: Block, prediction: BlockPrediction, settings: SegmentSettings, params: InstanceParams, image_group=None) -> BlockResult:
    """A block's owned nuclei and their measurements (found from its probabilities on the host, or
    as the device's steps found them next to the network); writes the block's image core."""
    timer = Timer()
    timer.add(prediction.seconds)
    if prediction.owned is None:
        owned, columns = HostSteps().find_nuclei(plan, block, prediction, settings, params.at_scale(plan.scale), timer)
    elif isinstance(prediction.owned, BaseException):
        raise prediction.owned
    else:  # found next to the network (DeviceSteps.predict)
        owned, columns = prediction.owned
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
