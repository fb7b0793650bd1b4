"""`--engine dask`: the work units of :mod:`..units` on a dask.distributed cluster.

``--address tcp://...`` joins a running scheduler (e.g. dask-jobqueue's SLURMCluster, see
cluster/dask_slurm.py); without it a LocalCluster of worker processes on 127.0.0.1 is started
and stopped with the run. Model units ask for the ``GPU`` resource; workers that can hold a
model declare it (``dask worker --resources "GPU=1"``; one per GPU on GPU nodes). Without any
such worker (a LocalCluster, a CPU-only cluster) they run on any worker. Each worker process
loads the model once, on first use, and keeps it.
"""

from __future__ import annotations

import logging
import operator
import threading
from typing import TYPE_CHECKING, Any

from ...runtime.allocator import environment_for_children, worker_environment
from ..plan import ImagePlan
from ..settings import SegmentSettings, instance_params
from ..units import BlockPredictor, block_nuclei_unit, start_unit, stitch_unit
from . import Engine, EngineRun, driver

if TYPE_CHECKING:
    from ...io.discover import ImageRecord
    from ...io.location import Location
    from ...model.predict import NucleiModel


log = logging.getLogger(__name__)
PRE_SPAWN_ENVIRON = "distributed.nanny.pre-spawn-environ"
_PREDICTORS: dict[str, BlockPredictor] = {}  # per worker process, by model sha256 + settings
_LOCK = threading.Lock()


def worker_allocator_config():
    """Dask config under which the nannies made now start their workers with
    :func:`~nucleibatch.runtime.allocator.worker_environment` (on top of Dask's own pre-spawn variables,
    whose ``MALLOC_TRIM_THRESHOLD_`` it replaces). A nanny's ``env=`` would come too late: it is
    applied after the worker process started, when glibc has read its variables already."""
    import dask

    return dask.config.set({PRE_SPAWN_ENVIRON: {**dask.config.get(PRE_SPAWN_ENVIRON, default={}), **worker_environment()}})


def start_local_cluster(n_workers: int):
    """A LocalCluster of ``n_workers`` single-threaded worker processes on 127.0.0.1, started
    with the allocator settings (:func:`worker_allocator_config`)."""
    from distributed import LocalCluster

    # Dask's nannies put the pre-spawn variables into this process's environment
    with worker_allocator_config(), environment_for_children({}):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0")


def predict_unit(model, device: str, settings: SegmentSettings, batch_size: int, units: list[tuple[ImagePlan, int]]):
    """Unit 2 on a Dask worker, with the worker's (cached) model."""
    key = f"{model.sha256}:{device}:{hash((settings, batch_size))}"
    with _LOCK:  # a worker with several threads loads the model once
        predictor = _PREDICTORS.get(key)
        if predictor is None:
            predictor = _PREDICTORS[key] = BlockPredictor(model, device, settings, batch_size)
    return predictor.predict(units)


class DaskExecutor:
    """:class:`.driver.Executor` on dask.distributed."""

    def __init__(self, client, model: NucleiModel, device: str, settings: SegmentSettings, batch_size: int, out_dir: Location, workers: int) -> None:
        from distributed import wait

        self.client, self._wait = client, wait
        info = client.scheduler_info()["workers"]
        gpu_workers = [w for w in info.values() if w.get("resources", {}).get("GPU")]
        self.resources = {"GPU": 1} if gpu_workers else None
        self.workers = workers or max(1, len(gpu_workers) or len(info))
        self.finish_slots = max(1, sum(int(w.get("nthreads", 1)) for w in info.values()))
        self.device = device if gpu_workers else ("cpu" if device == "auto" else device)
        log.info("dask engine: %d workers (%d declare GPU)", len(info), len(gpu_workers))
        [self.model] = client.scatter([model], broadcast=True)
        self.settings, self.batch_size, self.out_dir = settings, batch_size, out_dir
        self.params = instance_params(settings, model)
        self.model_config = model.config

    def _submit(self, fn, *args, **kwargs):
        # no `retries`: those would also repeat a unit's own errors (a bad image); a unit whose
        # worker died is rescheduled by the scheduler (distributed.scheduler.allowed-failures)
        return self.client.submit(fn, *args, pure=False, **kwargs)

    def start(self, record: ImageRecord) -> Any:
        return self._submit(start_unit, record, self.settings, self.model_config, self.out_dir)

    def predict(self, units: list[tuple[ImagePlan, int]]) -> list[Any]:
        group = self._submit(predict_unit, self.model, self.device, self.settings, self.batch_size, units, resources=self.resources)
        # one future per block, so that each find_block_nuclei unit receives only its own prediction
        return [self._submit(operator.getitem, group, k) for k in range(len(units))]

    def find_block_nuclei(self, plan: ImagePlan, block_index: int, prediction: Any) -> Any:
        return self._submit(block_nuclei_unit, plan, block_index, prediction, self.settings, self.params, self.out_dir)

    def stitch(self, plan: ImagePlan, results: list[Any]) -> Any:
        return self._submit(stitch_unit, plan, self.settings, self.out_dir, *results)

    def wait(self, futures: list[Any]) -> list[Any]:
        done, _ = self._wait(futures, return_when="FIRST_COMPLETED")
        return list(done)

    def result(self, future: Any) -> Any:
        return future.result()

    def cancel(self, futures: list[Any]) -> None:
        if futures:
            self.client.cancel(futures)

    def close(self) -> None:
        pass


class DaskEngine(Engine):
    """``--engine dask``: on the scheduler at ``--address``, else on a LocalCluster on 127.0.0.1
    started for the run."""

    name = "dask"

    def run(self, run: EngineRun) -> None:
        from distributed import Client

        # the scheduler's and nannies' INFO lines (about 45 a run, all harmless): warnings and errors
        # stay; the levels are put back after the run (a caller's own logging is not changed for good)
        quieted = {name: logging.getLogger(name).level for name in ("distributed", "distributed.nanny")}
        logging.getLogger("distributed").setLevel(logging.WARNING)
        cluster = None
        if self.options.address:
            client = Client(self.options.address)
        else:
            from ...cpus import usable_cpus

            cluster = start_local_cluster(self.options.workers or max(1, min(4, usable_cpus().count)))
            client = Client(cluster)
        try:
            executor = DaskExecutor(client, run.model, self.options.device, run.settings, run.batch_size, run.out_dir, self.options.workers)
            driver.run_distributed(executor, run.records, run.out_dir, run.timer, run.on_row, run.placement)
        finally:
            client.close()
            if cluster is not None:
                # a busy machine may take the nanny's 4 s to end a worker, which it then kills
                # with a warning: harmless for the cluster this run made and now throws away
                logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
                cluster.close()
            for name, level in quieted.items():
                logging.getLogger(name).setLevel(level)
