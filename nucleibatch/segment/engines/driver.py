"""The driver of every engine (local threads or processes, Ray, Dask): the same work units,
scheduled on this machine or on a cluster. This is the one orchestration of an image's steps.

Work units, per image (:mod:`nucleibatch.segment.units`, run where the scheduler puts them):

1. ``start``   (CPU task)   plan the image (statistics, block grid), create its empty OME-Zarr group;
2. ``predict`` (model worker, one per GPU or CPU slot; it loads the model once)
               read one block with its context, run the model's step of the run's step
               implementation (:func:`~..steps.block_steps`): the host's (normalise, network ->
               probabilities) or the device's (raw pixels -> owned nuclei there); with
               ``segment --post-workers`` a ``read`` CPU task reads (and normalises for the host's);
3. ``find_block_nuclei`` (CPU task) the host's steps: instances, owned nuclei, measurements;
               both: the block's image copy;
4. ``stitch`` (CPU task)    paint every block core, nuclei table part, pyramids, completion record.

The driver only passes references between them (block data never goes through it) and bounds
what is in flight: at most ``2 x model workers + CPU slots`` predict units between predict and
find_block_nuclei, a few images planned ahead, so memory stays bounded however large the archive.
Images that fit one network tile are grouped, by network window, as many to a predict unit as
one model call of ``batch_size`` tiles' pixels holds (:func:`~nucleibatch.segment.plan.small_images_per_unit`), so that a
GPU gets full batches and per-call scheduling overhead is paid once per group. Each unit's writes go to
places only that unit writes, by overwriting or atomic rename: a unit run twice (a retry after
its worker died) leaves the same outputs and no duplicate rows.

Executors adapt Ray and Dask to :class:`Executor`; the rest is here, shared.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ...errors import is_fatal
from ...scale import scaled_shape
from ...tiling import small_image_window
from ..plan import ImagePlan, one_tile_window, small_images_per_unit
from ..rows import record_failed_image, record_finished_image
from ..timer import Timer

if TYPE_CHECKING:
    from ...io.discover import ImageRecord
    from ...io.location import Location
    from ...model.config import BundleConfig

log = logging.getLogger(__name__)


class Executor(Protocol):
    """What the driver needs of a cluster scheduler. Futures are opaque handles."""

    workers: int  # model workers
    finish_slots: int  # CPU task slots of the cluster (post-processing runs this many blocks at once)
    batch_size: int  # tiles per network call: also the number of small images grouped per predict unit
    model_config: BundleConfig

    def start(self, record: ImageRecord) -> Any: ...
    def predict(self, units: list[tuple[ImagePlan, int]]) -> list[Any]:
        """One predict unit for ``[(plan, block index), ...]``; a prediction future per entry."""
        ...
    def find_block_nuclei(self, plan: ImagePlan, block_index: int, prediction: Any) -> Any: ...
    def stitch(self, plan: ImagePlan, results: list[Any]) -> Any:
        """The :func:`stitch_unit` of an image, given its block result futures (in block order)."""
        ...
    def wait(self, futures: list[Any]) -> list[Any]:
        """Block until at least one future is done; return the done ones."""
        ...

    def result(self, future: Any) -> Any:
        """The value of a done future, or raise the unit's own exception."""
        ...

    def cancel(self, futures: list[Any]) -> None: ...


@dataclass
class _Image:
    record: ImageRecord
    started: float
    plan: ImagePlan | None = None
    to_submit: deque = field(default_factory=deque)
    results: dict[int, Any] = field(default_factory=dict)  # block index -> find_block_nuclei future
    blocks_done: int = 0


def batching_order(records: Sequence[ImageRecord], tile_size: int) -> list[ImageRecord]:
    """``records`` with the one-tile images grouped by network window (their order kept within a
    window; larger images first, in their order): the small images batched together then share
    window shapes, so a model call holds one shape instead of several partial batches."""

    return sorted(records, key=lambda record: record_window(record, tile_size) or (0, 0))


def record_window(record: ImageRecord, tile_size: int) -> tuple[int, int] | None:
    """The network window of a one-tile image as discovery knows it (before its plan), or None."""
    return small_image_window(scaled_shape(record.shape, record.scale), tile_size) if record.shape else None


def run_distributed(
    executor: Executor,
    records: Sequence[ImageRecord],
    out_dir: Location,
    timer: Timer,
    on_row: Callable[[dict[str, Any]], None],
    placement: list[dict[str, Any]],
) -> None:
    """Segment ``records`` with ``executor``; ``on_row`` gets each image's row as it finishes.

    ``placement`` receives one entry per block unit: ``{image_id, block, predict_worker, finish_worker}``.
    A block unit's error reaches the driver through the image's ``stitch`` unit, which depends
    on it (Ray and Dask both fail a task whose inputs failed, with the original exception).
    """
    tile_size = executor.model_config.tile_size
    pending = deque(batching_order(records, tile_size))

    def group_size(window: tuple[int, int]) -> int:
        return small_images_per_unit(executor.batch_size, window)

    windows = {record_window(r, tile_size) for r in records}
    largest_group = max([group_size(w) for w in windows if w] or [1])
    # in flight: 2 predict units per model worker, a unit being one block or a group of small
    # images, plus one per CPU slot: post-processing takes far longer than predicting (on a GPU
    # node, ~20x), so the CPU workers need that many blocks waiting to all be busy
    max_load = max(2, 2 * executor.workers + executor.finish_slots)
    max_images = max_load * largest_group
    images: dict[str, _Image] = {}
    starting: dict[Any, _Image] = {}
    blocks: dict[Any, _Image] = {}
    load: dict[Any, float] = {}  # finish future -> its share of a predict unit
    stitching: dict[Any, _Image] = {}
    small: dict[tuple[int, int], list[tuple[_Image, int]]] = {}  # one-tile images waiting, by window

    def submit(units: list[tuple[_Image, int]]) -> None:
        predictions = executor.predict([(image.plan, index) for image, index in units])
        for (image, index), prediction in zip(units, predictions, strict=True):
            future = executor.find_block_nuclei(image.plan, index, prediction)
            image.results[index] = future
            blocks[future] = image
            load[future] = 1 / len(units)

    def waiting() -> float:
        return sum(len(units) / group_size(window) for window, units in small.items())

    def fail(image: _Image, error: BaseException) -> None:
        if is_fatal(error):
            raise error
        log.debug("image %s failed: %s", image.record.image_id, error)
        row = record_failed_image(out_dir, image.record, error, time.perf_counter() - image.started)
        images.pop(image.record.image_id, None)
        on_row(row)

    try:
        while pending or images:
            while pending and len(images) < max_images:
                image = _Image(pending.popleft(), time.perf_counter())
                images[image.record.image_id] = image
                starting[executor.start(image.record)] = image
            # blocks of the images started first go first: images complete in order, memory stays low
            for image in list(images.values()):
                while image.to_submit and sum(load.values()) + waiting() < max_load:
                    index = image.to_submit.popleft()
                    window = one_tile_window(image.plan, executor.model_config)
                    if window is not None:
                        small.setdefault(window, []).append((image, index))
                    else:
                        submit([(image, index)])
            for window, units in small.items():
                while len(units) >= group_size(window):
                    submit(units[: group_size(window)])
                    del units[: group_size(window)]
            model_waits = sum(load.values()) < executor.workers - 1e-9  # load: sums of 1/len(group)
            coming = {record_window(image.record, tile_size) for image in starting.values()}
            for window, units in small.items():
                # a partial group rather than a model worker waiting for work, unless images being
                # started will fill it: small calls cost a CPU twice the network time per pixel
                if units and model_waits and window not in coming:
                    submit(units)
                else:
                    for image, index in reversed(units):
                        image.to_submit.appendleft(index)
            small.clear()
            for future in executor.wait([*starting, *blocks, *stitching]):
                if future in starting:
                    image = starting.pop(future)
                    try:
                        image.plan = executor.result(future)
                    except Exception as error:
                        fail(image, error)
                        continue
                    image.to_submit.extend(b.index for b in image.plan.blocks_to_do)
                    image.blocks_done = len(image.plan.done_blocks)
                    if not image.to_submit:  # every block was finished by an earlier run
                        stitching[executor.stitch(image.plan, [])] = image
                elif future in blocks:
                    image = blocks.pop(future)
                    load.pop(future)
                    image.blocks_done += 1
                    if image.blocks_done == len(image.plan.blocks):
                        results = [image.results[b.index] for b in image.plan.blocks_to_do]
                        stitching[executor.stitch(image.plan, results)] = image
                        image.results = {}
                else:
                    image = stitching.pop(future)
                    try:
                        row, seconds, units = executor.result(future)
                    except Exception as error:
                        fail(image, error)
                        continue
                    row["seconds"] = round(time.perf_counter() - image.started, 4)
                    record_finished_image(out_dir, image.record, row)
                    timer.add(seconds)
                    placement.extend(units)
                    images.pop(image.record.image_id, None)
                    on_row(row)
    except BaseException:
        executor.cancel([*starting, *blocks, *stitching])
        raise


