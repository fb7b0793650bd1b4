"""The settings of a segment run: what changes its results (recorded in OUT, checked on resume),
the job's options (how it runs), and the recorded values of settings that older runs lacked."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..instances import InstanceParams
from ..scale import (
    check_diameter,
    check_pixel_size,
)

if TYPE_CHECKING:  # the post-processing processes import this module: no torch
    from ..model.predict import NucleiModel


ENGINES = ("local", "ray", "dask")

# the tables' columns: 2 added the micrometre and model-choice columns, 3 touches_border and the
# per-channel means (an OUT of an earlier version would mix parts of two schemas in
# nuclei.parquet: refused, start it over)
TABLES_VERSION = 3

# --tta: flip test-time augmentation; "auto" is the model bundle's setting
TTA_CHOICES = ("auto", "on", "off")

# --instances-on: where probabilities become instance labels: "cpu" (scikit-image), "device" (torch,
# on the network's device, which is the CPU where the network runs there), "auto" (device on CUDA, else cpu)
INSTANCES_ON = ("auto", "cpu", "device")


def resolve_instances_on(choice: str, device_type: str) -> str:
    """Where an ``--instances-on`` choice makes the labels for a network on ``device_type``
    (``"cuda"``, ``"cpu"``): ``"device"`` or ``"cpu"``."""
    if choice not in INSTANCES_ON:
        raise ValueError(f"instances_on must be auto, cpu or device, got {choice!r}")
    return "device" if choice == "device" or (choice == "auto" and device_type == "cuda") else "cpu"


@dataclass(frozen=True)
class SegmentSettings:
    """Settings of a segment run that change its results (saved in OUT and checked on resume)."""

    block_size: int = 2048
    block_margin: int = 128
    # --channel: an index, or a channel name resolved per image (image_channel); None: the mean of the colours
    channel: int | str | None = None
    invert: str | None = None  # None: the model's normalisation setting
    store_image: bool = True
    postprocess: dict | None = None  # None: the model's tuned values
    tta: bool | None = None  # None: the model's setting (flip test-time augmentation)
    # where probabilities become instance labels: "cpu" (scikit-image's watershed, in the
    # post-processing threads or processes), "device" (torch, next to the network:
    # nucleibatch.instances_torch), "auto" (device where the network runs on CUDA, else cpu)
    instances_on: str = "auto"
    pixel_size: float | None = None  # micrometres per pixel of every input (--pixel-size); None: each file's metadata
    diameter: float | str | None = None  # nucleus diameter in input pixels (--diameter), "auto" (estimated), None

    def validate(self) -> None:
        if self.block_size < 64 or self.block_size % 32:
            raise UsageError(f"--block-size must be a multiple of 32, at least 64 (got {self.block_size})")
        if not 0 <= self.block_margin < self.block_size:
            raise UsageError(f"--block-margin must be >= 0 and smaller than --block-size (got {self.block_margin})")
        if self.invert not in (None, "auto", "never", "always"):
            raise UsageError(f"--invert must be auto, never or always (got {self.invert})")
        if self.instances_on not in INSTANCES_ON:
            raise UsageError(f"--instances-on must be {', '.join(INSTANCES_ON)} (got {self.instances_on})")
        check_pixel_size(self.pixel_size)
        check_diameter(self.diameter)

    def to_dict(self) -> dict:
        return asdict(self)


def instances_on_device(settings: SegmentSettings, device_type: str) -> bool:
    """Whether a block's instance labels are computed next to the network, on its device
    (``device_type``: ``"cuda"`` or ``"cpu"``), rather than from its probabilities on the CPU."""
    return resolve_instances_on(settings.instances_on, device_type) == "device"


def instance_params(settings: SegmentSettings, model: NucleiModel) -> InstanceParams:
    """The post-processing of a run: ``settings.postprocess`` when given, else the model's tuned values."""
    return InstanceParams.from_dict(settings.postprocess) if settings.postprocess else model.postprocess


def settings_of_older_runs() -> dict[str, Any]:
    """The value each setting takes for an OUT started before the setting existed: the one that
    matches what the older code did (instances were always made on the CPU), so that an older
    run resumes only where its results would be alike (:func:`nucleibatch.output.state.check_settings`)."""
    return {**SegmentSettings().to_dict(), "instances_on": "cpu"}


@dataclass(frozen=True)
class JobOptions:
    """How a segment job runs: what does not change its results (not checked on resume).

    ``model``: ``"auto"`` (each image to the shipped bundle of its modality, :mod:`nucleibatch.segment.choose`),
    a shipped bundle's name, a bundle folder, or a loaded model (every image to it).
    ``include``: ``--include`` globs; only the files they match are segmented
    (:func:`~nucleibatch.io.discover.included`). Like the INPUTs, a rerun with another filter adds
    the images it matches to OUT and keeps the ones done before.
    ``post_workers`` (local engine): processes that post-process while this process runs the
    model (None: :func:`~nucleibatch.segment.engines.process_pool.default_post_workers`; 0:
    threads here). ``progress``: a bar (True), log lines (False), or a bar on a terminal (None).
    """

    model: str | NucleiModel = "auto"
    engine: str = "local"
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 4
    overwrite: bool = False
    retry_failed: bool = False
    verify: bool = False
    address: str | None = None
    workers: int = 0
    gpus_per_worker: float = 1.0
    post_workers: int | None = None
    progress: bool | None = None
    include: tuple[str, ...] = ()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def validate(self) -> None:
        """Raises :class:`~nucleibatch.errors.UsageError` for an option out of its range."""
        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        if self.workers < 0 or self.gpus_per_worker <= 0:
            raise UsageError("--workers must be >= 0 (0: automatic) and --gpus-per-worker > 0")
        if self.post_workers is not None and self.post_workers < 0:
            raise UsageError(f"--post-workers must be >= 0 (0: post-process in the model's process), got {self.post_workers}")
