"""The work units of an image, as run where an engine puts them (model workers, CPU tasks): each
wraps steps of :mod:`nucleibatch.segment.steps` and :mod:`nucleibatch.segment.stitch`."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..errors import is_fatal
from ..io.discover import ImageRecord
from ..io.location import Location
from ..output.folder import OutputFolder
from ..output.store import (
    open_root,
)
from .plan import ImagePlan
from .settings import SegmentSettings
from .timer import Timer

if TYPE_CHECKING:  # the post-processing processes import this module: no torch
    from ..model.config import BundleConfig


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
    """Unit 1: :func:`nucleibatch.segment.steps.start_image`."""
    from .steps import start_image

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
        from .steps import block_steps

        self.steps = block_steps(settings, self.device.type)
        # the device's steps normalise the raw pixels there: the reader only reads
        self.normalise_on_read = self.steps.normalises_on_read

    def predict(self, units: list[tuple[ImagePlan, int]]) -> list[Any]:
        """Read and predict the blocks ``[(plan, block index), ...]`` (one block, or the blocks
        of several small images whose tiles then share network calls); one
        :class:`~nucleibatch.segment.prediction.BlockPrediction` per unit. In a group, a block whose read
        fails gets its exception in its place (its find_block_nuclei unit raises it): one bad image
        never fails the others of its group."""
        return self.predict_read(units, self.read(units))

    def read(self, units: list[tuple[ImagePlan, int]]) -> tuple[list, dict[int, BaseException], Timer]:
        """The reading half of :meth:`predict`: :func:`gather_reads` of the units' blocks, read
        one after the other (an error that fails the group stops the reading at once)."""
        from .plan import context_pixels

        halo = context_pixels(self.model.config)
        return gather_reads(units, (self.images.read(plan, block_index, halo, self.normalise_on_read) for plan, block_index in units))

    def predict_read(self, units: list[tuple[ImagePlan, int]], read: tuple[list, dict[int, BaseException], Timer]) -> list[Any]:
        """The model half of :meth:`predict`, on what :meth:`read` returned for ``units``."""
        from ..runtime.allocator import release_free_memory

        items, failed, timer = read
        predictions: list[Any] = []
        if items:
            normalised = [item[4] for item in items] if self.normalise_on_read else None
            predictions = self.steps.predict([item[:4] for item in items], self.model, self.settings, self.batch_size, normalised, Timer())
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


def read_block_outcome(plan: ImagePlan, block_index: int, source, halo: int, normalise: bool = True) -> tuple | BaseException:
    """One block's ``(raw, region, normalised, stage seconds)``, or the exception that reading it
    raised, returned (see :func:`gather_reads`). ``normalised`` is None without ``normalise``."""
    from .steps import read_and_normalise

    timer = Timer()
    try:
        raw, region, normalised = read_and_normalise(plan, plan.blocks[block_index], source, halo, timer, normalise)
    except Exception as error:
        return error
    return raw, region, normalised, dict(timer.seconds)


class OpenImages:
    """The images a process reads blocks from, kept open for their next blocks (a slide is
    opened once, not once per block): the last ``keep``, each closed after its last block."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.open: OrderedDict[str, Any] = OrderedDict()  # image_id -> source, oldest first

    def read(self, plan: ImagePlan, block_index: int, halo: int, normalise: bool = True) -> tuple | BaseException:
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
            return read_block_outcome(plan, block_index, source, halo, normalise)
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


def read_unit(plan: ImagePlan, block_index: int, halo: int, normalise: bool = True) -> tuple | BaseException:
    """Unit 2a, where the model's process hands reading off (``segment --post-workers``):
    :func:`read_block_outcome` in a post-processing process, the image kept open there for its
    next blocks (:class:`OpenImages`)."""
    return _UNIT_IMAGES.read(plan, block_index, halo, normalise)


def block_nuclei_unit(plan: ImagePlan, block_index: int, prediction, settings: SegmentSettings, params, out_dir: Location):
    """Unit 3: :func:`nucleibatch.segment.steps.find_block_nuclei`, writing into the image's group."""
    from ..runtime.allocator import release_free_memory
    from .steps import find_block_nuclei, keep_block, without_masks

    if isinstance(prediction, BaseException):  # its read failed inside a group of small images
        raise prediction
    group = open_root(OutputFolder(out_dir).masks)[plan.store_path]
    result = find_block_nuclei(plan, plan.blocks[block_index], prediction, settings, params, group)
    keep_block(out_dir, plan, result)
    result.unit = {"predict_worker": prediction.worker, "finish_worker": current_worker(), "predict_group": prediction.predict_group}
    del prediction
    result = without_masks(plan, result)  # a slide's masks wait in their checkpoints, not in memory
    release_free_memory()  # the worker goes on to other blocks: give back this one's pages
    return result


def stitch_unit(plan: ImagePlan, settings: SegmentSettings, out_dir: Location, *results) -> tuple[dict[str, Any], dict[str, float], list[dict]]:
    """Unit 4: :func:`nucleibatch.segment.stitch.stitch_image` (which adds the blocks an earlier run
    finished); returns the row, the summed stage seconds of the image's units and where its block
    units ran."""
    from ..runtime.allocator import release_free_memory
    from .stitch import stitch_image

    timer = Timer()
    for result in results:
        timer.add(result.seconds)
    row = stitch_image(plan, list(results), settings, out_dir, timer)
    release_free_memory()
    units = [{"image_id": plan.record.image_id, "block": r.block_index, **(r.unit or {})} for r in results]
    return row, dict(timer.seconds), units
