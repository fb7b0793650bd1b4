"""The local engine with post-processing in worker processes (``segment --post-workers N``).

The model stays in this process, in one thread that only predicts; the CPU units of
:mod:`.distributed` (plan an image, read and normalise a block, finish a block: instances,
measurements, image copy; complete an image: paint, tables, pyramids) run in ``N`` worker
processes, so that the work around the network uses every core without the GIL and keeps up
with a GPU.
The driver (:func:`.distributed.run_distributed`) is the one of the Ray and Dask engines: the
same units, the same bounds on what is in flight, the same outputs.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    CancelledError,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from typing import TYPE_CHECKING, Any

from ..allocator import environment_for_children, tune_allocator, worker_environment
from ..io.discover import ImageRecord
from ..io.location import Location
from ..pipeline import ImagePlan, SegmentSettings, Timer, context_pixels, instance_params
from . import distributed

if TYPE_CHECKING:  # the processes import this module (their initializer): they need no torch
    from ..model.predict import NucleiModel


def default_post_workers(device_type: str, cpus: int | None = None) -> int:
    """Post-processing processes when ``--post-workers`` is not given: on a GPU, every usable CPU
    (:func:`~nucleibatch.cpus.usable_cpus`: the node's share, not its size) but two (the model
    thread's and the driver's); on a CPU none, as the network already uses every core there and
    threads of this process post-process between its calls."""
    from ..cpus import usable_cpus

    cpus = cpus or usable_cpus().count
    return max(1, cpus - 2) if device_type == "cuda" else 0


def start_post_pool(post_workers: int) -> ProcessPoolExecutor:
    """Start ``post_workers`` post-processing processes and return at once: they need a second or
    more to start, which the caller spends loading the model. The caller shuts the pool down.

    The processes are spawned (a fork of a process running torch threads can deadlock) with the
    allocator settings in their environment (glibc reads them at start), and import the units'
    modules before their first unit.
    """
    if post_workers < 1:
        raise ValueError(f"post_workers must be >= 1, got {post_workers}")
    with environment_for_children(worker_environment()):
        pool = ProcessPoolExecutor(max_workers=post_workers, mp_context=multiprocessing.get_context("spawn"), initializer=_prepare_worker)
        # a pool starts a process per task submitted while none is idle: these start them all now
        for _ in range(post_workers):
            pool.submit(os.getpid)
    return pool


def _prepare_worker() -> None:
    tune_allocator()
    # what the units import, before the first unit arrives (torch is not among them): the
    # modules, and pandas, which pyarrow imports on its first table written (~0.5 s)
    import pandas  # noqa: F401

    from .. import pipeline  # noqa: F401


class PoolExecutor:
    """:class:`.distributed.Executor` on this machine: predict units in one thread of this
    process (with ``model``), CPU units in the processes of ``pool``."""

    def __init__(self, model: NucleiModel, settings: SegmentSettings, batch_size: int, out_dir: Location, pool: ProcessPoolExecutor, post_workers: int) -> None:
        self.settings, self.batch_size, self.out_dir = settings, batch_size, out_dir
        self.params = instance_params(settings, model)
        self.model_config = model.config
        self.workers = 1
        self.finish_slots = post_workers
        self.predictor = distributed.BlockPredictor(model, str(model.device), settings, batch_size)
        self.halo = context_pixels(model.config)
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nb-model")
        self.pool = pool

    def start(self, record: ImageRecord) -> Future:
        return self.pool.submit(distributed.start_unit, record, self.settings, self.model_config, self.out_dir)

    def predict(self, units: list[tuple[ImagePlan, int]]) -> list[Future]:
        # the processes read and normalise the blocks (in parallel, and off this process's GIL,
        # which the model thread needs between its kernel launches)
        reads = [self.pool.submit(distributed.read_unit, plan, index, self.settings, self.halo) for plan, index in units]
        group = _after_all(reads, lambda values: self.model_thread.submit(self._predict_reads, units, values))
        return [_then(group, lambda predictions, k=k: _done(predictions[k])) for k in range(len(units))]

    def _predict_reads(self, units: list[tuple[ImagePlan, int]], outcomes: list[Any]) -> list[Any]:
        """:meth:`.distributed.BlockPredictor.predict_read` on what the read units returned."""
        return self.predictor.predict_read(units, distributed.gather_reads(units, outcomes))

    def finish_block(self, plan: ImagePlan, block_index: int, prediction: Future) -> Future:
        return _then(prediction, lambda value: self.pool.submit(distributed.finish_block_unit, plan, block_index, value, self.settings, self.params, self.out_dir))

    def complete(self, plan: ImagePlan, results: list[Future]) -> Future:
        return _after_all(results, lambda values: self.pool.submit(distributed.complete_unit, plan, self.settings, self.out_dir, *values))

    def wait(self, futures: list[Future]) -> list[Future]:
        done, _ = wait(futures, return_when=FIRST_COMPLETED)
        return list(done)

    def result(self, future: Future) -> Any:
        return future.result()

    def cancel(self, futures: list[Future]) -> None:
        for future in futures:
            future.cancel()

    def close(self) -> None:
        self.model_thread.shutdown(wait=True, cancel_futures=True)


def _done(value: Any) -> Future:
    future: Future = Future()
    if isinstance(value, BaseException):  # a block whose read failed inside a group of small images
        future.set_exception(value)
    else:
        future.set_result(value)
    return future


def _then(source: Future, next_step: Callable[[Any], Future]) -> Future:
    """A future of ``next_step(source's value)`` (itself a future), or of ``source``'s exception."""
    return _after_all([source], lambda values: next_step(values[0]))


def _after_all(sources: list[Future], next_step: Callable[[list[Any]], Future]) -> Future:
    """A future of ``next_step([values of sources])``, or of the first exception among them: as a
    Dask or Ray task whose inputs failed fails with their exception."""
    out: Future = Future()
    remaining = [len(sources)]
    lock = threading.Lock()  # the sources finish in different threads (model thread, pool)

    def settle(inner: Future) -> None:
        error = inner.exception() if not inner.cancelled() else CancelledError()
        with lock:
            if out.done():  # cancelled by the driver
                return
            if error is not None:
                out.set_exception(error)
            else:
                out.set_result(inner.result())

    def on_source_done(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        failed = next((source for source in sources if source.cancelled() or source.exception() is not None), None)
        if failed is not None:
            settle(failed)
            return
        try:
            step = next_step([source.result() for source in sources])
        except BaseException as error:  # e.g. the pool was shut down by a failing run
            step = Future()
            step.set_exception(error)
        step.add_done_callback(settle)

    for source in sources:
        source.add_done_callback(on_source_done)
    if not sources:  # nothing to wait for (an image whose blocks an earlier run all finished)
        remaining[0] = 1
        on_source_done(out)
    return out


def run_pool(
    records: Sequence[ImageRecord],
    model: NucleiModel,
    settings: SegmentSettings,
    out_dir: Location,
    batch_size: int,
    timer: Timer,
    on_row: Callable[[dict[str, Any]], None],
    placement: list[dict[str, Any]],
    pool: ProcessPoolExecutor,
    post_workers: int,
) -> None:
    """Segment ``records`` with the model here and the ``post_workers`` processes of ``pool``
    (from :func:`start_post_pool`; the caller shuts it down)."""
    executor = PoolExecutor(model, settings, batch_size, out_dir, pool, post_workers)
    try:
        distributed.run_distributed(executor, records, out_dir, timer, on_row, placement)
    finally:
        executor.close()
