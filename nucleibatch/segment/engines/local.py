"""The local engine: this machine, one device, the driver of every engine
(:func:`.driver.run_distributed`) with the units of :mod:`..units` run here.

The model stays in this process, in one thread that only predicts. The CPU units (plan an image,
find a block's nuclei: instances, measurements, image copy; stitch an image: paint, tables, pyramids)
run in threads of this process, or in the processes of ``segment --post-workers N``
(:mod:`.process_pool`), which also read the blocks (and normalise them for the host's steps,
:mod:`..host_steps`; the device's steps normalise next to the network). Without processes the
blocks are read in one thread ahead of the model: an image is read by one thread at a time, as
its readers are not thread-safe.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import (
    FIRST_COMPLETED,
    CancelledError,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from typing import TYPE_CHECKING, Any

from ...cpus import limit_torch_threads, usable_cpus
from ..plan import ImagePlan, context_pixels
from ..settings import JobOptions, SegmentSettings, instance_params, resolve_instances_on
from ..summary import device_peak_bytes
from ..units import (
    BlockPredictor,
    block_nuclei_unit,
    gather_reads,
    read_unit,
    start_unit,
    stitch_unit,
)
from . import Engine, EngineRun, driver
from .process_pool import default_post_workers, start_post_pool

if TYPE_CHECKING:
    from ...io.discover import ImageRecord
    from ...io.location import Location
    from ...model.predict import NucleiModel

log = logging.getLogger(__name__)


class LocalExecutor:
    """:class:`.driver.Executor` on this machine: predict units in one thread of this process
    (with ``model``), CPU units in ``cpu_pool`` (threads, or the processes of
    :func:`.process_pool.start_post_pool`) with ``cpu_slots`` workers."""

    def __init__(self, model: NucleiModel, settings: SegmentSettings, batch_size: int, out_dir: Location, cpu_pool: Executor, cpu_slots: int) -> None:
        self.settings, self.batch_size, self.out_dir = settings, batch_size, out_dir
        self.params = instance_params(settings, model)
        self.model_config = model.config
        self.workers = 1
        self.finish_slots = cpu_slots
        self.predictor = BlockPredictor(model, str(model.device), settings, batch_size)
        self.halo = context_pixels(model.config)
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nb-model")
        self.cpu_pool = cpu_pool
        # processes read in parallel, each its own handle of an image; threads share the
        # predictor's open images, so one thread reads
        self.reader = None if isinstance(cpu_pool, ProcessPoolExecutor) else ThreadPoolExecutor(max_workers=1, thread_name_prefix="nb-read")

    def start(self, record: ImageRecord) -> Future:
        return self.cpu_pool.submit(start_unit, record, self.settings, self.model_config, self.out_dir)

    def predict(self, units: list[tuple[ImagePlan, int]]) -> list[Future]:
        if self.reader is not None:
            read = self.reader.submit(self.predictor.read, units)
            group = _then(read, lambda values: self.model_thread.submit(self.predictor.predict_read, units, values))
        else:  # the processes read (and normalise for the host's steps), off this process's GIL, which the model thread needs
            reads = [self.cpu_pool.submit(read_unit, plan, index, self.halo, self.predictor.normalise_on_read) for plan, index in units]
            group = _after_all(reads, lambda values: self.model_thread.submit(self._predict_reads, units, values))
        return [_then(group, lambda predictions, k=k: _done(predictions[k])) for k in range(len(units))]

    def _predict_reads(self, units: list[tuple[ImagePlan, int]], outcomes: list[Any]) -> list[Any]:
        """:meth:`..units.BlockPredictor.predict_read` on what the read units returned."""
        return self.predictor.predict_read(units, gather_reads(units, outcomes))

    def find_block_nuclei(self, plan: ImagePlan, block_index: int, prediction: Future) -> Future:
        return _then(prediction, lambda value: self.cpu_pool.submit(block_nuclei_unit, plan, block_index, value, self.settings, self.params, self.out_dir))

    def stitch(self, plan: ImagePlan, results: list[Future]) -> Future:
        return _after_all(results, lambda values: self.cpu_pool.submit(stitch_unit, plan, self.settings, self.out_dir, *values))

    def wait(self, futures: list[Future]) -> list[Future]:
        done, _ = wait(futures, return_when=FIRST_COMPLETED)
        return list(done)

    def result(self, future: Future) -> Any:
        return future.result()

    def cancel(self, futures: list[Future]) -> None:
        for future in futures:
            future.cancel()

    def close(self) -> None:
        for pool in (self.reader, self.model_thread):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self.predictor.images.close_all()


class LocalEngine(Engine):
    """``--engine local``: the model on ``--device`` here, in one thread; the CPU units in
    ``--post-workers`` processes (started before the models load: they take a second or more),
    or, without, in threads of this process, one per usable CPU."""

    name = "local"

    def __init__(self, options: JobOptions, settings: SegmentSettings) -> None:
        super().__init__(options, settings)
        self.cpus = usable_cpus()
        self.post_workers = options.post_workers
        self.post_pool: ProcessPoolExecutor | None = None

    @property
    def model_device(self) -> str:
        return self.options.device

    def check(self) -> None:
        if isinstance(self.options.model, str):  # a loaded model's device is settled
            from ...model.device import resolve_device

            resolve_device(self.options.device)

    def __enter__(self) -> LocalEngine:
        if self.post_workers is None:
            from ...model.device import resolve_device

            model = self.options.model
            device_type = resolve_device(self.options.device).type if isinstance(model, str) else model.device.type
            self.post_workers = default_post_workers(device_type, self.settings.instances_on)
        if self.post_workers:
            self.post_pool = start_post_pool(self.post_workers)  # the processes start while the models load
        limit_torch_threads(self.cpus.count)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.post_pool is not None:
            self.post_pool.shutdown(wait=True, cancel_futures=True)

    def loaded(self, model: NucleiModel) -> None:
        # said once the arguments and OUT are known good (a usage error stays one line)
        fallback = " (--device auto: no CUDA GPU here)" if self.options.device == "auto" and model.device.type == "cpu" else ""
        where = f"{self.post_workers} post-processing processes" if self.post_workers else "post-processing in this process"
        log.info("device %s%s, %s usable CPUs, %s", model.device, fallback, self.cpus, where)

    def instances_on(self, choice: str, model: NucleiModel) -> str:
        # "auto" recorded as what it means here: a GPU rerun must not mix methods
        return resolve_instances_on(choice, model.device.type)

    def run(self, run: EngineRun) -> None:
        threads = None if self.post_pool is not None else ThreadPoolExecutor(max_workers=max(1, self.cpus.count), thread_name_prefix="nb-post")
        slots = self.post_workers if self.post_pool is not None else max(1, self.cpus.count)
        executor = LocalExecutor(run.model, run.settings, run.batch_size, run.out_dir, self.post_pool or threads, slots)
        try:
            driver.run_distributed(executor, run.records, run.out_dir, run.timer, run.on_row, run.placement)
        finally:
            executor.close()
            if threads is not None:
                threads.shutdown(wait=True, cancel_futures=True)

    def run_figures(self, model: NucleiModel, busy_seconds: float, tiles: int, batch_shapes: dict, engine_seconds: float) -> dict[str, Any]:
        return {
            "device": str(model.device),
            "precision": "bf16" if model.bf16 else "float32",
            "post_workers": self.post_workers,
            "model_busy_seconds": round(busy_seconds, 3),
            "model_idle_fraction": round(max(0.0, 1 - busy_seconds / engine_seconds), 4) if engine_seconds > 0 else None,
            "model_tiles": tiles,
            "model_batches": [[*shape, count] for shape, count in sorted(batch_shapes.items())],
            "device_peak_bytes": device_peak_bytes(model.device),
        }


# --- concurrent.futures chained as Ray and Dask chain tasks ----------------------------------


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
    # each source keeps its done callbacks (and so this list) for as long as it lives: a cycle
    # that holds the sources' values (a block's probabilities) until the garbage collector's
    # rare full pass; emptied once read, the values go as soon as the next step has them
    pending = list(sources)
    remaining = [len(pending)]
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
        failed = next((source for source in pending if source.cancelled() or source.exception() is not None), None)
        values = None if failed is not None else [source.result() for source in pending]
        pending.clear()
        if failed is not None:
            settle(failed)
            return
        try:
            step = next_step(values)
        except BaseException as error:  # e.g. the pool was shut down by a failing run
            step = Future()
            step.set_exception(error)
        del values
        step.add_done_callback(settle)

    for source in pending:
        source.add_done_callback(on_source_done)
    if not sources:  # nothing to wait for (an image whose blocks an earlier run all finished)
        remaining[0] = 1
        on_source_done(out)
    return out
