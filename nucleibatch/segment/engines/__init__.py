"""Engines: where the work units of an image run. They schedule only: every engine runs the one
driver (:func:`.driver.run_distributed`) over the units of :mod:`nucleibatch.segment.units`, with
its own :class:`.driver.Executor`:

* ``local`` (:mod:`.local`): this machine, the model in one thread, the CPU units in threads or in
  the ``--post-workers`` processes (:mod:`.process_pool`);
* ``ray`` (:mod:`.ray_engine`): a Ray cluster, or a private one on 127.0.0.1;
* ``dask`` (:mod:`.dask_engine`): a dask.distributed scheduler, or a LocalCluster on 127.0.0.1.

The job (:mod:`nucleibatch.segment.job`) knows them through :class:`Engine` only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..settings import ENGINES, JobOptions
from ..timer import Timer

if TYPE_CHECKING:
    from ...io.discover import ImageRecord
    from ...io.location import Location
    from ...model.predict import NucleiModel
    from ..settings import SegmentSettings


@dataclass
class EngineRun:
    """One model's images of a job, as an engine gets them.

    ``on_row`` gets each image's images.parquet row as it is recorded; ``placement`` receives one
    entry per block unit (where its predict and finish units ran)."""

    records: Sequence[ImageRecord]
    model: NucleiModel
    settings: SegmentSettings
    out_dir: Location
    batch_size: int
    timer: Timer
    on_row: Callable[[dict[str, Any]], None]
    placement: list[dict[str, Any]]


class Engine:
    """What the job asks of an engine: cheap argument checks before OUT is touched, start-up and
    shut-down around the run (a context manager), the run itself, and its lines of run.json."""

    name = ""

    def __init__(self, options: JobOptions, settings: SegmentSettings) -> None:
        self.options, self.settings = options, settings

    @property
    def model_device(self) -> str:
        """Where the job loads its copy of the models (``--device`` here; distributed engines
        keep it on the CPU and ship it to their model workers, which resolve ``--device``)."""
        return "cpu"

    def check(self) -> None:
        """Refuse arguments this engine cannot run with (raises :class:`~nucleibatch.errors.UsageError`)."""
        from ...extras import require_extra
        from ...model.device import resolve_device_name

        require_extra(self.name, f"--engine {self.name}", "--engine local")
        if self.options.device != "auto":
            resolve_device_name(self.options.device)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def loaded(self, model: NucleiModel) -> None:
        """The job's models are loaded (on :attr:`model_device`), ``model`` the first of them."""

    def instances_on(self, choice: str, model: NucleiModel) -> str:
        """``--instances-on`` as recorded in OUT (distributed: as given; each model worker resolves
        ``auto`` for its own device, as the precision)."""
        return choice

    def run(self, run: EngineRun) -> None:
        """Segment ``run.records`` (every image recorded in OUT, ok or failed)."""
        raise NotImplementedError

    def run_figures(
        self,
        model: NucleiModel,
        busy_seconds: float,
        tiles: int,
        batch_shapes: dict,
        engine_seconds: float,
    ) -> dict[str, Any]:
        """This engine's entries of run.json: where the network ran and, where the job's own
        model copy ran it (local), how busy it was (``model.usage`` over the run)."""
        return {
            "device": self.options.device,
            "precision": model.precision,
            "post_workers": None,
            "model_busy_seconds": None,
            "model_idle_fraction": None,
            "model_tiles": None,
            "model_batches": None,
            "device_peak_bytes": None,
        }


def engine_for(options: JobOptions, settings: SegmentSettings) -> Engine:
    """The engine ``options.engine`` names (its module is imported here: Ray and Dask only when asked for).

    Raises:
        UsageError: an unknown engine name.
    """
    from ...errors import UsageError

    if options.engine == "local":
        from .local import LocalEngine

        return LocalEngine(options, settings)
    if options.engine == "ray":
        from .ray_engine import RayEngine

        return RayEngine(options, settings)
    if options.engine == "dask":
        from .dask_engine import DaskEngine

        return DaskEngine(options, settings)
    raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {options.engine!r}")
