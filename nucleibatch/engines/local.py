"""The local engine: one process, one device; threads overlap reading and post-processing with the model."""

from __future__ import annotations

import errno
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from ..io.discover import ImageRecord
from ..io.location import Location
from ..pipeline import (
    ImagePlan,
    SegmentSettings,
    Timer,
    read_and_normalise,
    record_failed_image,
    segment_record,
)

if TYPE_CHECKING:
    from ..model import NucleiModel

log = logging.getLogger(__name__)
# Images in flight at once: while one image is on the model, the other is read or post-processed.
IMAGES_IN_FLIGHT = 2


def is_fatal(error: BaseException) -> bool:
    """Errors about the output side (disk full, read-only, quota) stop the run; input errors do not."""
    return isinstance(error, MemoryError) or (
        isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT)
    )


def prefetching_reader(timer: Timer, depth: int = 1) -> Callable:
    """A block reader for :func:`segment_record` that reads and normalises ``depth`` blocks ahead
    in a background thread, while the model runs."""

    def reads(plan: ImagePlan, source, halo: int, settings: SegmentSettings) -> Iterator:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nb-read") as pool:
            ahead: deque = deque()
            for block in plan.blocks:
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
    """Segment ``records`` with up to ``in_flight`` images at once, calling ``on_row`` as each finishes."""
    queue = list(records)
    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="nb-image") as pool:
        running: set[Future] = set()
        while queue or running:
            while queue and len(running) < in_flight:
                running.add(pool.submit(segment_one, queue.pop(0), model, settings, out_dir, batch_size, timer))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    on_row(future.result())
                except BaseException:
                    for other in running:
                        other.cancel()
                    queue.clear()
                    raise
