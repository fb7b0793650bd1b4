"""The driver of every engine (local threads or processes, Ray, Dask): the same work units,
scheduled on this machine or on a cluster. This is the one orchestration of an image's steps.

Work units, per image (functions of :mod:`nucleibatch.pipeline`, run where the scheduler puts them):

1. ``start``   (CPU task)   plan the image (statistics, block grid), create its empty OME-Zarr group;
2. ``predict`` (model worker, one per GPU or CPU slot; it loads the model once)
               read one block with its context, normalise, run the model -> probabilities
               (``segment --post-workers``: a ``read`` CPU task reads and normalises, the
               model's thread only predicts);
3. ``finish_block`` (CPU task) instances, owned nuclei, measurements, the block's image copy;
4. ``complete`` (CPU task)  paint every block core, nuclei table part, pyramids, completion record.

The driver only passes references between them (block data never goes through it) and bounds
what is in flight: at most ``2 x model workers + CPU slots`` predict units between predict and
finish_block, a few images planned ahead, so memory stays bounded however large the archive.
Images that fit one network tile are grouped, by network window, as many to a predict unit as
one model call of ``batch_size`` tiles' pixels holds (:func:`small_images_per_unit`), so that a
GPU gets full batches and per-call scheduling overhead is paid once per group. Each unit's writes go to
places only that unit writes, by overwriting or atomic rename: a unit run twice (a retry after
its worker died) leaves the same outputs and no duplicate rows.

Executors adapt Ray and Dask to :class:`Executor`; the rest is here, shared.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import is_fatal
from ..io.discover import ImageRecord
from ..io.location import Location
from ..model.config import BundleConfig
from ..output.checkpoints import drop_checkpoints
from ..output.folder import OutputFolder
from ..output.store import open_root, store_name
from ..output.tables import write_record
from ..pipeline import ImagePlan, SegmentSettings, Timer, one_tile_window, record_failed_image
from ..scale import scaled_shape
from ..tiling import small_image_window

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
    def finish_block(self, plan: ImagePlan, block_index: int, prediction: Any) -> Any: ...
    def complete(self, plan: ImagePlan, results: list[Any]) -> Any:
        """The :func:`complete_unit` of an image, given its block result futures (in block order)."""
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
    results: dict[int, Any] = field(default_factory=dict)  # block index -> finish_block future
    blocks_done: int = 0


def batching_order(records: Sequence[ImageRecord], tile_size: int) -> list[ImageRecord]:
    """``records`` with the one-tile images grouped by network window (their order kept within a
    window; larger images first, in their order): the small images batched together then share
    window shapes, so a model call holds one shape instead of several partial batches."""

    def key(record: ImageRecord) -> tuple[int, int]:
        window = small_image_window(scaled_shape(record.shape, record.scale), tile_size) if record.shape else None
        return window or (0, 0)

    return sorted(records, key=key)


def small_images_per_unit(batch_size: int, window: tuple[int, int]) -> int:
    """One-tile images of one network ``window`` grouped per predict unit: as many as one model
    call of ``batch_size`` 512² tiles' worth of pixels holds (a call holds one shape)."""
    from ..model.predict import windows_per_call

    return windows_per_call(max(1, batch_size), window)


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
    A block unit's error reaches the driver through the image's ``complete`` unit, which depends
    on it (Ray and Dask both fail a task whose inputs failed, with the original exception).
    """
    tile_size = executor.model_config.tile_size
    pending = deque(batching_order(records, tile_size))

    def group_size(window: tuple[int, int]) -> int:
        return small_images_per_unit(executor.batch_size, window)

    windows = {small_image_window(scaled_shape(r.shape, r.scale), tile_size) for r in records if r.shape}
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
    completing: dict[Any, _Image] = {}
    small: dict[tuple[int, int], list[tuple[_Image, int]]] = {}  # one-tile images waiting, by window

    def submit(units: list[tuple[_Image, int]]) -> None:
        predictions = executor.predict([(image.plan, index) for image, index in units])
        for (image, index), prediction in zip(units, predictions, strict=True):
            future = executor.finish_block(image.plan, index, prediction)
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
            if not starting or sum(load.values()) < executor.workers:
                for units in small.values():  # partial groups rather than a model worker waiting for work
                    if units:
                        submit(units)
                small.clear()
            else:
                for units in small.values():  # the images being started will complete the groups
                    for image, index in reversed(units):
                        image.to_submit.appendleft(index)
                small.clear()
            for future in executor.wait([*starting, *blocks, *completing]):
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
                        completing[executor.complete(image.plan, [])] = image
                elif future in blocks:
                    image = blocks.pop(future)
                    load.pop(future)
                    image.blocks_done += 1
                    if image.blocks_done == len(image.plan.blocks):
                        results = [image.results[b.index] for b in image.plan.blocks_to_do]
                        completing[executor.complete(image.plan, results)] = image
                        image.results = {}
                else:
                    image = completing.pop(future)
                    try:
                        row, seconds, units = executor.result(future)
                    except Exception as error:
                        fail(image, error)
                        continue
                    row["seconds"] = round(time.perf_counter() - image.started, 4)
                    drop_checkpoints(out_dir, store_name(image.record.image_id))  # first: a kill between redoes the image whole
                    write_record(out_dir, store_name(image.record.image_id), row)
                    timer.add(seconds)
                    placement.extend(units)
                    images.pop(image.record.image_id, None)
                    on_row(row)
    except BaseException:
        executor.cancel([*starting, *blocks, *completing])
        raise


# --- the units, as run on the workers ------------------------------------------------------------


def current_worker() -> str:
    """Where this unit runs: the Ray node id, the Dask worker address, else host:pid."""
    import os
    import socket
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return f"ray-node:{ray.get_runtime_context().get_node_id()}/pid:{os.getpid()}"
    if "distributed" in sys.modules:
        from distributed import get_worker

        try:
            return f"dask-worker:{get_worker().address}"
        except ValueError:
            pass
    return f"{socket.gethostname()}:{os.getpid()}"


def start_unit(record: ImageRecord, settings: SegmentSettings, model_config: BundleConfig, out_dir: Location) -> ImagePlan:
    """Unit 1: :func:`nucleibatch.pipeline.start_image`."""
    from ..pipeline import start_image

    return start_image(record, settings, model_config, out_dir)


class BlockPredictor:
    """Unit 2, on a model worker: holds the model (loaded once) and the images it reads from."""

    def __init__(self, model, device: str, settings: SegmentSettings, batch_size: int) -> None:
        from ..model.device import prepare_network, resolve_device
        from ..runtime.allocator import tune_allocator

        # in full only where the worker process started with ALLOCATOR_ENV (the workers the engines
        # start do); elsewhere the arena count is fixed already, and mmap and trimming still go off
        tune_allocator()
        self.device = resolve_device(device)
        model.device = self.device
        model.network = prepare_network(model.network, self.device, bf16=model.bf16)  # precision resolved for this worker's device
        self.model, self.settings, self.batch_size = model, settings, batch_size
        self.images = OpenImages(keep=max(2, batch_size))

    def predict(self, units: list[tuple[ImagePlan, int]]) -> list[Any]:
        """Read and predict the blocks ``[(plan, block index), ...]`` (one block, or the blocks
        of several small images whose tiles then share network calls); one
        :class:`~nucleibatch.pipeline.BlockPrediction` per unit. In a group, a block whose read
        fails gets its exception in its place (its finish_block unit raises it): one bad image
        never fails the others of its group."""
        return self.predict_read(units, self.read(units))

    def read(self, units: list[tuple[ImagePlan, int]]) -> tuple[list, dict[int, BaseException], Timer]:
        """The reading half of :meth:`predict`: :func:`gather_reads` of the units' blocks, read
        one after the other (an error that fails the group stops the reading at once)."""
        from ..pipeline import context_pixels

        halo = context_pixels(self.model.config)
        return gather_reads(units, (self.images.read(plan, block_index, self.settings, halo) for plan, block_index in units))

    def predict_read(self, units: list[tuple[ImagePlan, int]], read: tuple[list, dict[int, BaseException], Timer]) -> list[Any]:
        """The model half of :meth:`predict`, on what :meth:`read` returned for ``units``."""
        from ..pipeline import predict_blocks
        from ..runtime.allocator import release_free_memory

        items, failed, timer = read
        predictions: list[Any] = []
        if items:
            predictions = predict_blocks([item[:4] for item in items], self.model, self.settings, self.batch_size, [item[4] for item in items])
        del items, read
        worker = current_worker()
        for prediction in predictions:
            for stage in ("read", "normalise"):
                prediction.seconds[stage] = prediction.seconds.get(stage, 0.0) + timer.seconds[stage] / len(units)
            prediction.worker = worker
            prediction.predict_group = len(units)
        for number in sorted(failed):
            predictions.insert(number, failed[number])
        release_free_memory()
        return predictions


def gather_reads(units: list[tuple[ImagePlan, int]], outcomes: Iterable[tuple | BaseException]) -> tuple[list, dict[int, BaseException], Timer]:
    """What a model call gets from the reads of a group of blocks: ``(items, failed, timer)``,
    items ``(plan, block, raw, region, normalised)`` of the blocks read, ``failed`` ``{position
    in units: error}``. A failed read fails its own image only, unless it is the group's only
    block or the error is fatal (the output side): then it is raised, and ``outcomes`` (lazy:
    each read as it is asked for) is read no further.

    Args:
        outcomes: per unit, in order, what :func:`read_block_outcome` returned.
    """
    timer = Timer()
    items, failed = [], {}
    for number, ((plan, block_index), outcome) in enumerate(zip(units, outcomes, strict=True)):
        if isinstance(outcome, BaseException):
            if len(units) == 1 or is_fatal(outcome):
                raise outcome
            failed[number] = outcome
            continue
        raw, region, normalised, seconds = outcome
        timer.add(seconds)
        items.append((plan, plan.blocks[block_index], raw, region, normalised))
    return items, failed, timer


def read_block_outcome(plan: ImagePlan, block_index: int, source, settings: SegmentSettings, halo: int) -> tuple | BaseException:
    """One block's ``(raw, region, normalised, stage seconds)``, or the exception that reading it
    raised, returned (see :func:`gather_reads`)."""
    from ..pipeline import read_and_normalise

    timer = Timer()
    try:
        raw, region, normalised = read_and_normalise(plan, plan.blocks[block_index], source, halo, settings, timer)
    except Exception as error:
        return error
    return raw, region, normalised, dict(timer.seconds)


class OpenImages:
    """The images a process reads blocks from, kept open for their next blocks (a slide is
    opened once, not once per block): the last ``keep``, each closed after its last block."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.open: OrderedDict[str, Any] = OrderedDict()  # image_id -> source, oldest first

    def read(self, plan: ImagePlan, block_index: int, settings: SegmentSettings, halo: int) -> tuple | BaseException:
        """:func:`read_block_outcome` of one block (an image that cannot be opened: its error, returned)."""
        from ..io.readers import open_source

        key = plan.record.image_id
        source = self.open.pop(key, None)
        if source is None:
            try:
                source = open_source(plan.record)
            except Exception as error:
                return error
        try:
            return read_block_outcome(plan, block_index, source, settings, halo)
        finally:
            if block_index + 1 == len(plan.blocks):
                source.close()
            else:
                self.open[key] = source
                while len(self.open) > self.keep:
                    self.open.popitem(last=False)[1].close()

    def close_all(self) -> None:
        """Close every image still open (a run that stopped before their last blocks)."""
        while self.open:
            self.open.popitem(last=False)[1].close()


# read_unit's open images in this process
_UNIT_IMAGES = OpenImages(keep=2)


def read_unit(plan: ImagePlan, block_index: int, settings: SegmentSettings, halo: int) -> tuple | BaseException:
    """Unit 2a, where the model's process hands reading off (``segment --post-workers``):
    :func:`read_block_outcome` in a post-processing process, the image kept open there for its
    next blocks (:class:`OpenImages`)."""
    return _UNIT_IMAGES.read(plan, block_index, settings, halo)


def finish_block_unit(plan: ImagePlan, block_index: int, prediction, settings: SegmentSettings, params, out_dir: Location):
    """Unit 3: :func:`nucleibatch.pipeline.finish_block`, writing into the image's group."""
    from ..pipeline import finish_block, keep_block, without_masks
    from ..runtime.allocator import release_free_memory

    if isinstance(prediction, BaseException):  # its read failed inside a group of small images
        raise prediction
    group = open_root(OutputFolder(out_dir).masks)[plan.store_path]
    result = finish_block(plan, plan.blocks[block_index], prediction, settings, params, group)
    keep_block(out_dir, plan, result)
    result.unit = {"predict_worker": prediction.worker, "finish_worker": current_worker(), "predict_group": prediction.predict_group}
    del prediction
    result = without_masks(plan, result)  # a slide's masks wait in their checkpoints, not in memory
    release_free_memory()  # the worker goes on to other blocks: give back this one's pages
    return result


def complete_unit(plan: ImagePlan, settings: SegmentSettings, out_dir: Location, *results) -> tuple[dict[str, Any], dict[str, float], list[dict]]:
    """Unit 4: :func:`nucleibatch.pipeline.paint_and_complete` (which adds the blocks an earlier run
    finished); returns the row, the summed stage seconds of the image's units and where its block
    units ran."""
    from ..pipeline import paint_and_complete
    from ..runtime.allocator import release_free_memory

    timer = Timer()
    for result in results:
        timer.add(result.seconds)
    row = paint_and_complete(plan, list(results), settings, out_dir, timer)
    release_free_memory()
    units = [{"image_id": plan.record.image_id, "block": r.block_index, **(r.unit or {})} for r in results]
    return row, dict(timer.seconds), units
