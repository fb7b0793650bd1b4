"""`--engine ray`: the work units of :mod:`..units` on a Ray cluster (or a private local Ray).

Why actors and tasks rather than Ray Data ``map_batches``: a block's four steps have different
shapes (one plan per image, a fan-out to blocks, a fan-in per image for stitching), and the
fan-in needs every block of an image at once; Ray Data's row/batch streams would need that
grouping rebuilt by hand. Actors (one per GPU, or per CPU slot without GPUs) keep the model
loaded; plain tasks do the CPU work; the driver bounds what is in flight (back-pressure) and
only ever holds object references.

Failures: a model actor that dies is restarted (``max_restarts``) and its calls retried
(``max_task_retries``); a task whose worker dies is retried (``max_retries``). Units write only
their own outputs, by overwriting or atomic rename, so a retried unit leaves no duplicate.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

from ...runtime.allocator import worker_environment
from ..plan import ImagePlan
from ..settings import SegmentSettings, instance_params
from ..units import BlockPredictor, block_nuclei_unit, start_unit, stitch_unit
from . import Engine, EngineRun, driver

if TYPE_CHECKING:
    from ...io.discover import ImageRecord
    from ...io.location import Location
    from ...model.predict import NucleiModel


log = logging.getLogger(__name__)
RETRIES = 3


class ModelHolder:
    """Holds the run's model on the driver's node; the model workers fetch it as they start or
    restart. They find it by name: Ray logs an error for every restartable actor whose
    constructor arguments hold an object reference or an actor handle (or are large)."""

    def __init__(self, model: NucleiModel) -> None:
        self.model = model

    def get(self) -> NucleiModel:
        return self.model


class RayBlockPredictor(BlockPredictor):
    """The model worker as a Ray actor; its model comes from the run's :class:`ModelHolder`, named ``holder_name``."""

    def __init__(self, holder_name: str, device: str, settings: SegmentSettings, batch_size: int) -> None:
        import ray

        holder = ray.get_actor(holder_name)
        super().__init__(ray.get(holder.get.remote()), device, settings, batch_size)

    def predict(self, units: list) -> Any:
        predictions = super().predict(units)
        return predictions[0] if len(predictions) == 1 else tuple(predictions)  # num_returns objects


def spread_over_nodes(nodes: list[dict], resource: str, amount: float, count: int) -> list[Any]:
    """Scheduling strategies that deal ``count`` model workers round-robin over the alive nodes
    of ``ray.nodes()``, each node taking at most as many as its total ``resource`` holds at
    ``amount`` per worker.

    Ray's ``"SPREAD"`` only considers nodes with the resource free at that moment, so a node busy
    for a second (a previous job's workers exiting) got no model worker at all. A soft node
    affinity waits for the chosen node instead, and still goes elsewhere if that node dies
    (restarted actors). Workers beyond what the nodes hold, or all of them while no node has
    the resource (GPU nodes still booting or started on demand), get ``"SPREAD"``: pending, they
    make the autoscaler add nodes.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    capacity = {}
    for node in nodes:
        total = node.get("Resources", {}).get(resource, 0) if node.get("Alive") else 0
        if total > 0 and total >= amount:
            capacity[node["NodeID"]] = int(total // amount + 1e-9) if amount > 0 else count
    placements: list[Any] = []
    while len(placements) < count and any(capacity.values()):
        for node_id in sorted(capacity):
            if capacity[node_id] and len(placements) < count:
                placements.append(NodeAffinitySchedulingStrategy(node_id, soft=True))
                capacity[node_id] -= 1
    return placements + ["SPREAD"] * (count - len(placements))


class RayExecutor:
    """:class:`.driver.Executor` on Ray."""

    def __init__(self, model: NucleiModel, device: str, settings: SegmentSettings, batch_size: int, out_dir: Location, workers: int, gpus_per_worker: float) -> None:
        import ray

        self.ray = ray
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        use_gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
        if use_gpu and gpus == 0:
            # GPU nodes may still be booting, or start on demand: the model workers wait for
            # them (pending actors are what makes the Ray autoscaler add GPU nodes)
            log.warning("--device %s: no GPU in the Ray cluster yet; the model workers wait until a GPU node joins", device)
        if use_gpu:
            self.workers = workers or max(1, int(gpus / gpus_per_worker))
            options = {"num_gpus": gpus_per_worker, "num_cpus": 1}
        else:
            cpus = resources.get("CPU", 1)
            self.workers = workers or max(1, int(cpus // 2))
            # the CPU tasks (plan, post-processing) must always find a free CPU slot: model
            # actors reserve at most what leaves one, else they would wait on each other forever
            options = {"num_cpus": min(1.0, max(0.0, (cpus - 1) / self.workers))}
            device = "cpu"
        self.finish_slots = max(1, int(resources.get("CPU", 1)))  # CPU tasks take one CPU each
        log.info("ray engine: %d model worker(s) (%s), cluster %s", self.workers, "GPU" if use_gpu else "CPU", {k: v for k, v in resources.items() if k in ("CPU", "GPU")})
        predictor = ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)(RayBlockPredictor)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node (the run does not outlive it), for the whole run: restarted model workers fetch the model again
        holder_name = f"nucleibatch-model-{uuid.uuid4().hex}"
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.holder = ray.remote(num_cpus=0)(ModelHolder).options(name=holder_name, scheduling_strategy=here).remote(model)
        placements = spread_over_nodes(ray.nodes(), "GPU" if use_gpu else "CPU", options["num_gpus" if use_gpu else "num_cpus"], self.workers)
        self.predictors = [
            predictor.options(**options, scheduling_strategy=placement, runtime_env={"env_vars": worker_environment()}).remote(holder_name, device, settings, batch_size)
            for placement in placements
        ]
        self.next_predictor = 0
        task = ray.remote(num_cpus=1, max_retries=RETRIES)
        self._start = task(start_unit)
        self._finish = task(block_nuclei_unit)
        self._stitch = task(stitch_unit)
        self.settings, self.out_dir = settings, out_dir
        self.params = instance_params(settings, model)
        self.model_config = model.config
        self.model_config_ref = ray.put(model.config)
        self.batch_size = batch_size

    def start(self, record: ImageRecord) -> Any:
        return self._start.remote(record, self.settings, self.model_config_ref, self.out_dir)

    def predict(self, units: list[tuple[ImagePlan, int]]) -> list[Any]:
        actor = self.predictors[self.next_predictor]
        self.next_predictor = (self.next_predictor + 1) % len(self.predictors)
        # one object per block: each find_block_nuclei task fetches only its own prediction
        futures = actor.predict.options(num_returns=len(units)).remote(units)
        return [futures] if len(units) == 1 else list(futures)

    def find_block_nuclei(self, plan: ImagePlan, block_index: int, prediction: Any) -> Any:
        return self._finish.remote(plan, block_index, prediction, self.settings, self.params, self.out_dir)

    def stitch(self, plan: ImagePlan, results: list[Any]) -> Any:
        return self._stitch.remote(plan, self.settings, self.out_dir, *results)

    def wait(self, futures: list[Any]) -> list[Any]:
        done, _ = self.ray.wait(futures, num_returns=1, fetch_local=False)
        # and whatever else is done already, without waiting
        more, _ = self.ray.wait([f for f in futures if f not in done], num_returns=len(futures) - len(done), timeout=0, fetch_local=False) if len(futures) > 1 else ([], [])
        return [*done, *more]

    def result(self, future: Any) -> Any:
        try:
            return self.ray.get(future)
        except self.ray.exceptions.RayTaskError as error:
            cause = error.cause if isinstance(error.cause, BaseException) else None
            if cause is not None:
                raise cause from None
            raise

    def cancel(self, futures: list[Any]) -> None:
        for future in futures:
            try:
                self.ray.cancel(future)
            except Exception:  # actor calls cannot always be cancelled: they finish and are dropped
                pass

    def close(self) -> None:
        for actor in [*self.predictors, self.holder]:
            self.ray.kill(actor)


class RayEngine(Engine):
    """``--engine ray``: on ``--address`` (or ``$RAY_ADDRESS`` inside `ray job submit`), else on a
    private Ray started on 127.0.0.1 for the run."""

    name = "ray"

    def run(self, run: EngineRun) -> None:
        from ...runtime.ray_start import init_ray

        init_ray(self.options.address)
        options = self.options
        executor = RayExecutor(run.model, options.device, run.settings, run.batch_size, run.out_dir, options.workers, options.gpus_per_worker)
        try:
            driver.run_distributed(executor, run.records, run.out_dir, run.timer, run.on_row, run.placement)
        finally:
            executor.close()
