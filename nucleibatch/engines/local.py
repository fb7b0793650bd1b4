"""The local engine: one process, one device; threads overlap reading and post-processing with the model."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from itertools import groupby
from typing import TYPE_CHECKING, Any

from ..errors import is_fatal
from ..io.discover import ImageRecord
from ..io.location import Location
from ..pipeline import (
    ImagePlan,
    SegmentSettings,
    Timer,
    read_and_normalise,
    record_failed_image,
    segment_record,
    segment_small_records,
)
from ..scale import scaled_shape
from ..tiling import small_image_window

if TYPE_CHECKING:
    from ..model.predict import NucleiModel

log = logging.getLogger(__name__)
# Images in flight at once: while one image is on the model, the other is read or post-processed.
IMAGES_IN_FLIGHT = 2


def prefetching_reader(timer: Timer, depth: int = 1) -> Callable:
    """A block reader for :func:`segment_record` that reads and normalises ``depth`` blocks ahead
    in a background thread, while the model runs."""

    def reads(plan: ImagePlan, source, halo: int, settings: SegmentSettings) -> Iterator:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nb-read") as pool:
            ahead: deque = deque()
            for block in plan.blocks_to_do:
                ahead.append((block, pool.submit(read_and_normalise, plan, block, source, halo, settings, timer)))
                if len(ahead) > depth:
                    done_block, future = ahead.popleft()
                    yield (done_block, *future.result())
            while ahead:
                done_block, future = ahead.popleft()
                yield (done_block, *future.result())

    return reads


def segment_one(record: ImageRecord, model: NucleiModel, settings: SegmentSettings, out_dir: Location, batch_size: int, timer: Timer) -> dict[str, Any]:
    """Segment one image; a per-image error becomes a 'failed' row (and record), a fatal one is raised."""
    started = time.perf_counter()
    try:
        return segment_record(record, model, settings, out_dir, batch_size=batch_size, timer=timer, prefetch=prefetching_reader(timer))
    except Exception as error:  # each image's failure is recorded, the run goes on
        if is_fatal(error):
            raise
        log.debug("image %s failed", record.image_id, exc_info=True)
        return record_failed_image(out_dir, record, error, time.perf_counter() - started)


def segment_group(records: list[ImageRecord], model: NucleiModel, settings: SegmentSettings, out_dir: Location, batch_size: int, timer: Timer) -> list[dict[str, Any]]:
    """Segment one image (:func:`segment_one`) or a group of one-tile images sharing network
    calls; an image's error becomes its 'failed' row, a fatal one is raised."""
    if len(records) == 1:
        return [segment_one(records[0], model, settings, out_dir, batch_size, timer)]
    started = time.perf_counter()
    rows = []
    for record, outcome in zip(records, segment_small_records(records, model, settings, out_dir, batch_size, timer), strict=True):
        if isinstance(outcome, BaseException):
            log.debug("image %s failed", record.image_id, exc_info=outcome)
            outcome = record_failed_image(out_dir, record, outcome, time.perf_counter() - started)
        rows.append(outcome)
    return rows


def group_small_images(records: Sequence[ImageRecord], tile_size: int, block_size: int, batch_size: int) -> list[list[ImageRecord]]:
    """``records`` in units of work, in :func:`~nucleibatch.engines.distributed.batching_order`
    (larger images first, in their order, then the one-tile images by window shape): each image
    alone, except images that are one block and one network window each (their shape known at
    discovery), which go in groups of as many as one network call of ``batch_size`` holds
    (:func:`~nucleibatch.model.predict.windows_per_call`; a call holds one shape)."""
    from ..model.predict import windows_per_call
    from .distributed import batching_order

    def window(record: ImageRecord) -> tuple[int, int] | None:
        one_block = record.shape is not None and not record.error and max(record.shape) <= block_size
        return small_image_window(scaled_shape(record.shape, record.scale), tile_size) if one_block else None

    groups: list[list[ImageRecord]] = []
    for shape, run in groupby(batching_order(records, tile_size), key=window):
        members = list(run)
        size = 1 if shape is None else windows_per_call(batch_size, shape)
        groups.extend(members[start : start + size] for start in range(0, len(members), size))
    return groups


def run_local(
    records: Sequence[ImageRecord],
    model: NucleiModel,
    settings: SegmentSettings,
    out_dir: Location,
    batch_size: int,
    timer: Timer,
    on_row: Callable[[dict[str, Any]], None],
    in_flight: int = IMAGES_IN_FLIGHT,
) -> None:
    """Segment ``records`` with up to ``in_flight`` units of work at once (an image, or a group
    of small images: :func:`group_small_images`), calling ``on_row`` as each image finishes."""
    queue = group_small_images(records, model.config.tile_size, settings.block_size, batch_size)
    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="nb-image") as pool:
        running: set[Future] = set()
        while queue or running:
            while queue and len(running) < in_flight:
                running.add(pool.submit(segment_group, queue.pop(0), model, settings, out_dir, batch_size, timer))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    for row in future.result():
                        on_row(row)
                except BaseException:
                    for other in running:
                        other.cancel()
                    queue.clear()
                    raise
