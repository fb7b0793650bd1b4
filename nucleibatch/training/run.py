"""The training driver: data, Ray Train TorchTrainer, resume, export of the best bundle."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..annotated import discover_annotated, iter_annotated
from ..errors import ModelBundleError, UsageError
from ..extras import require_extra
from ..model.bundle import CONFIG_NAME, load_model, save_bundle, sha256_file
from ..model.config import PRECISIONS, BundleConfig, default_config, normalization_config
from ..normalize import INPUTS
from ..tiling import DEFAULT_HALO
from .data import Example, split_ids, to_example
from .loop import (
    LOCAL_METRICS_NAME,
    STATE_NAME,
    LocalWorkerContext,
    load_checkpoint_state,
    numbered_from_one,
    run_epochs,
    tensorboard_writer_class,
    threads_for,
    train_loop_per_worker,
)
from .tune import tune_postprocess

log = logging.getLogger(__name__)
SETTINGS_NAME = "train_settings.json"
RAY_RUN_NAME = "ray_train"
# Settings that must not change when a run resumes (they change what the checkpoint means).
FIXED_ON_RESUME = ("encoder", "architecture", "patch_size", "val_fraction", "val_images", "seed", "data", "limit_images", "init", "engine", "input")
# settings files written before the setting existed
DEFAULTS_OF_OLDER_RUNS = {"engine": "ray", "val_images": None, "input": "grey"}
DEFAULT_STAIN_JITTER = 0.1  # --input haematoxylin: see AugmentSettings.stain
SCRATCH_LEARNING_RATE = 2e-3
FINETUNE_LR_FACTOR = 0.1  # --init: the default peak learning rate is 10x lower (2e-4)
SCRATCH_ENCODER = "resnet18"
SCRATCH_ARCHITECTURE = "Unet"


@dataclass
class TrainSettings:
    """Everything `nucleibatch train` takes; saved to RUN_DIR/train_settings.json."""

    data: list[str]
    run_dir: str
    workers: int = 1
    gpu: bool = False
    engine: str = "ray"  # "ray": Ray Train workers; "local": this process, one device, no Ray
    epochs: int = 40
    batch_size: int = 8
    patch_size: int = 256
    patches_per_epoch: int = 0  # 0: one patch per training image per epoch
    encoder: str | None = None  # None: resnet18 from scratch, the --init bundle's encoder otherwise
    architecture: str | None = None  # None: Unet from scratch, the --init bundle's otherwise
    learning_rate: float | None = None  # None: 2e-3 from scratch, 2e-4 (FINETUNE_LR_FACTOR x) with --init
    val_fraction: float = 0.1
    val_images: str | None = None  # a file of validation image ids (replaces val_fraction)
    input: str | None = None  # the network's input (normalize.INPUTS); None: grey, or the --init bundle's
    pixel_size: float | None = None  # micrometres per pixel of DATA, recorded as the bundle's scale
    stain_jitter: float | None = None  # None: DEFAULT_STAIN_JITTER with the haematoxylin input, else 0
    blur: float = 0.0
    scale_jitter: tuple[float, float] = (0.6, 1.6)  # AugmentSettings.scale
    precision: str = "auto"  # training arithmetic (options.PRECISIONS)
    licence: str | None = None  # of DATA, recorded in the bundle
    citation: str | None = None
    limit_images: int = 0
    seed: int = 0
    skip_bad: bool = False
    loader_workers: int = -1  # -1: 0 on CPU, 4 per worker on GPU
    cpus_per_worker: float = 0  # 0: the machine's CPUs shared by the workers
    max_failures: int = 3
    tune_postprocess: bool = True
    address: str | None = None
    tile_size: int = 1024
    halo: int = DEFAULT_HALO
    init: str | None = None  # "default" or a bundle folder: start from its weights (fine-tuning)
    freeze_encoder_epochs: int = 0  # with init: keep the encoder frozen for the first N epochs
    tensorboard: bool = False  # also log to RUN_DIR/tensorboard
    overlay_every: int = 1  # RUN_DIR/overlays/epoch_XXX.png every N epochs (and the last); 0: none
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        checks = [
            (self.workers >= 1, "--workers must be >= 1"),
            (self.engine in ("ray", "local"), f"--engine must be ray or local, not {self.engine!r}"),
            (self.engine == "ray" or self.workers == 1, "--engine local trains in this process: it takes --workers 1 only (use --engine ray for more)"),
            (self.engine == "ray" or not self.address, "--engine local runs no Ray: drop --address"),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.patch_size >= 64 and self.patch_size % 32 == 0, "--patch-size must be a multiple of 32, at least 64"),
            (0.0 <= self.val_fraction < 1.0, "--val-fraction must be in [0, 1)"),
            (self.limit_images >= 0, "--limit-images must be >= 0"),
            (self.learning_rate is None or self.learning_rate > 0, "--lr must be > 0"),
            (self.freeze_encoder_epochs >= 0, "--freeze-encoder-epochs must be >= 0"),
            (self.freeze_encoder_epochs == 0 or self.init, "--freeze-encoder-epochs needs --init (a frozen random encoder learns nothing)"),
            (self.overlay_every >= 0, "--overlay-every must be >= 0"),
            (self.input is None or self.input in INPUTS, f"--input must be one of {', '.join(INPUTS)}"),
            (self.pixel_size is None or (math.isfinite(self.pixel_size) and self.pixel_size > 0), "--pixel-size must be a positive number of micrometres"),
            (self.stain_jitter is None or 0 <= self.stain_jitter <= 1, "--stain-jitter must be in [0, 1]"),
            (0 <= self.blur <= 1, "--blur is a probability, in [0, 1]"),
            (0 < self.scale_jitter[0] <= 1 <= self.scale_jitter[1], "--scale-jitter LOW HIGH needs 0 < LOW <= 1 <= HIGH"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (self.val_images is None or Path(self.val_images).is_file(), f"--val-images {self.val_images}: no such file; give a text file with one image id per line"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.engine == "ray":
            require_extra("ray", "train --engine ray (Ray Train)", "--engine local (one device, no Ray)")
        if self.gpu and not torch.cuda.is_available() and (self.engine == "local" or (not self.address and not os.environ.get("RAY_ADDRESS"))):
            raise UsageError("--gpu asked for, but this machine has no CUDA GPU; drop --gpu or submit to a cluster with GPUs")
        if self.tensorboard and tensorboard_writer_class() is None:
            raise UsageError("--tensorboard needs tensorboardX (installed with ray[train]) or tensorboard: pip install tensorboardX, or drop --tensorboard")


def init_spec(init: str | None) -> str | None:
    """How a run records ``--init``: ``default``, or the bundle folder as an absolute path."""
    if not init or init == "default":
        return init or None
    path = Path(init).expanduser()
    if path.is_file() and path.name == CONFIG_NAME:
        path = path.parent
    return str(path.resolve())


def resolve_init(settings: TrainSettings) -> tuple[TrainSettings, BundleConfig, dict | None]:
    """Settings with encoder, architecture and learning rate filled in, the bundle config to train,
    and the ``--init`` bundle's weights (None from scratch).

    With ``init`` the architecture, encoder, normalisation, tile size and post-processing come
    from that bundle; an ``--encoder`` that differs from it is refused.

    Raises:
        UsageError: a bundle that cannot be loaded, or a conflicting ``--encoder``.
    """
    if not settings.init:
        config = default_config(settings.encoder or SCRATCH_ENCODER, settings.architecture or SCRATCH_ARCHITECTURE, settings.tile_size, settings.halo, settings.input or "grey")
        resolved = replace(
            settings,
            encoder=config.encoder,
            architecture=config.architecture,
            learning_rate=settings.learning_rate or SCRATCH_LEARNING_RATE,
        )
        return _with_input(resolved, config), config, None
    try:
        model = load_model(settings.init, precision="float32")  # only its weights are used: standard layout
    except ModelBundleError as error:
        raise UsageError(f"--init {settings.init}: {error}") from None
    source = model.config
    for option, key, asked in (("--encoder", "encoder", settings.encoder), ("architecture", "architecture", settings.architecture)):
        if asked is not None and asked != getattr(source, key):
            raise UsageError(
                f"{option} {asked} conflicts with --init {settings.init}, a {source.architecture} "
                f"with the {source.encoder} encoder: the network comes from the bundle, so drop {option} (or drop --init to train from scratch)"
            )
    init_record = {
        "name": model.name,
        "source": init_spec(settings.init),
        "sha256": sha256_file(model.path / source.weights_file),
    }
    config = replace(
        source,
        name=f"{model.name}-finetuned",
        encoder_weights=None,
        training={},
        metrics={},
        init=init_record,
        weights=None,
        weights_dtype=None,
        weights_sha256=None,
    )
    if settings.input and settings.input != config.input:
        config = replace(config, **normalization_config(settings.input))  # the same one-channel network, another channel fed to it
    resolved = replace(
        settings,
        init=init_record["source"],
        encoder=source.encoder,
        architecture=source.architecture,
        learning_rate=settings.learning_rate or SCRATCH_LEARNING_RATE * FINETUNE_LR_FACTOR,
        tile_size=source.tile_size,
        halo=source.halo,
        extra={**settings.extra, "init": init_record},
    )
    state = {name: tensor.detach().cpu() for name, tensor in model.network.state_dict().items()}
    return _with_input(resolved, config), config, state


def _with_input(settings: TrainSettings, config: BundleConfig) -> TrainSettings:
    """Settings with ``input`` and ``stain_jitter`` filled in from the bundle config to train."""
    input = config.input
    jitter = settings.stain_jitter if settings.stain_jitter is not None else (DEFAULT_STAIN_JITTER if input == "haematoxylin" else 0.0)
    return replace(settings, input=input, stain_jitter=jitter)


def load_examples(settings: TrainSettings, normalization: dict) -> tuple[list[Example], list[Example]]:
    """Read, normalise and split the annotated data (train, validation)."""
    sources = discover_annotated(settings.data)
    if settings.limit_images:
        sources = sources[: settings.limit_images]
    examples = [to_example(a, normalization) for a in iter_annotated(sources, skip_bad=settings.skip_bad)]
    if len(examples) < 1:
        raise UsageError("no usable annotated image; check the DATA folders")
    if settings.val_images:
        train_ids, val_ids = split_by_list([e.image_id for e in examples], read_id_list(settings.val_images))
    else:
        train_ids, val_ids = split_ids([e.image_id for e in examples], settings.val_fraction, settings.seed)
    by_id = {e.image_id: e for e in examples}
    return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]


def read_id_list(path: str | Path) -> list[str]:
    """Image ids of a text file, one per line (blank lines and ``#`` comments ignored)."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line]


def split_by_list(image_ids: list[str], val_ids: list[str]) -> tuple[list[str], list[str]]:
    """Train/validation split with the validation images named: ``(train ids, validation ids)``, sorted.

    Raises:
        UsageError: a named image is not in the data, or no training image is left.
    """
    missing = sorted(set(val_ids) - set(image_ids))
    if missing:
        raise UsageError(f"--val-images names {len(missing)} image(s) not in DATA, e.g. {missing[:3]}; list ids of the annotated images given")
    wanted = set(val_ids)
    train = sorted(i for i in image_ids if i not in wanted)
    if not train:
        raise UsageError("--val-images names every image of DATA: nothing is left to train on")
    return train, sorted(wanted)


def _check_resume(run_dir: Path, settings: TrainSettings, overwrite: bool) -> None:
    """Refuse to resume a run made with other settings (or clear it when ``overwrite``)."""
    if overwrite and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    settings_path = run_dir / SETTINGS_NAME
    if settings_path.is_file():
        previous = json.loads(settings_path.read_text())
        now = asdict(settings)
        previous = DEFAULTS_OF_OLDER_RUNS | previous
        changed = [key for key in FIXED_ON_RESUME if previous.get(key) != now.get(key)]
        if changed:
            what = ", ".join(f"{key} ({previous.get(key)}, now {now.get(key)})" for key in changed)
            raise UsageError(
                f"{run_dir} holds a run with other {what}; resume it with the same settings, "
                "pick a new RUN_DIR, or pass --overwrite to start over"
            )


def _save_settings(run_dir: Path, settings: TrainSettings) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SETTINGS_NAME).write_text(json.dumps(asdict(settings), indent=2) + "\n")


def run_training(settings: TrainSettings, overwrite: bool = False) -> dict[str, Any]:
    """Train (Ray Train workers, or this process with ``engine="local"``) and export the best
    checkpoint as RUN_DIR/bundle.

    Resumes from RUN_DIR's latest checkpoint when it holds a run with the same settings.
    Returns a summary dict (best validation metrics, bundle path, throughput).
    """
    settings.validate()
    settings, bundle_config, init_state = resolve_init(settings)
    run_dir = Path(settings.run_dir).resolve()
    _check_resume(run_dir, settings, overwrite)
    started = time.perf_counter()
    train_examples, val_examples = load_examples(settings, bundle_config.normalization)
    _save_settings(run_dir, settings)  # only once the data is known good: a failed start locks nothing
    log.info("data: %d training and %d validation images (%.0f s to read)", len(train_examples), len(val_examples), time.perf_counter() - started)
    patches_per_epoch = settings.patches_per_epoch or len(train_examples)
    patches_per_epoch = max(patches_per_epoch, settings.batch_size * settings.workers)

    loader_workers = settings.loader_workers if settings.loader_workers >= 0 else (4 if settings.gpu else 0)
    worker_settings = asdict(settings) | {"patches_per_epoch": patches_per_epoch, "loader_workers": loader_workers}
    training = {
        "data": [str(Path(d)) for d in settings.data],
        "n_train_images": len(train_examples),
        "n_val_images": len(val_examples),
        "val_image_ids": [e.image_id for e in val_examples],
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "patch_size": settings.patch_size,
        "patches_per_epoch": patches_per_epoch,
        "learning_rate": settings.learning_rate,
        "seed": settings.seed,
        "workers": settings.workers,
        "gpu": settings.gpu,
        "engine": settings.engine,
        "init": bundle_config.init,
        "freeze_encoder_epochs": settings.freeze_encoder_epochs,
        "input": settings.input,
        "augment": {"stain_jitter": settings.stain_jitter, "blur": settings.blur, "scale": list(settings.scale_jitter)},
        "precision": settings.precision,
    }
    bundle_config = replace(bundle_config, training=training, scale=training_scale(train_examples, settings.pixel_size))
    if settings.licence or settings.citation:
        bundle_config = replace(bundle_config, licence=licence_record(settings.licence, settings.citation, settings.data))
    if settings.engine == "local":
        state, best_metrics, history = _train_here(settings, worker_settings, bundle_config, run_dir, train_examples, val_examples, init_state)
    else:
        state, best_metrics, history = _train_with_ray(settings, worker_settings, bundle_config, run_dir, train_examples, val_examples, init_state)
    bundle_dir = export_bundle(state["model"], bundle_config, val_examples, run_dir / "bundle", settings.tune_postprocess, best_metrics, history)
    summary = {
        "bundle": str(bundle_dir),
        "best_epoch": int(best_metrics["epoch"]),
        "best_val_map": best_metrics.get("val_map"),
        "epochs_run": len(history),
        "patches_per_s": float(np.median([row["patches_per_s"] for row in history])) if history else None,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "init": bundle_config.init,
        "metrics": json.loads((bundle_dir / "config.json").read_text())["metrics"],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def licence_record(name: str | None, citation: str | None, data: list[str]) -> dict[str, Any]:
    """A bundle's ``licence``: the terms of its training data, which the weights inherit."""
    return {"name": name, "citation": citation, "training_data": [str(Path(d)) for d in data]}


def training_scale(examples: list[Example], pixel_size: float | None) -> dict[str, Any]:
    """The scale a bundle is trained at: the median equivalent diameter (px) of the training
    images' nuclei, and the data's pixel size (micrometres, None when unknown)."""
    from ..scale import median_diameter

    areas = np.concatenate([np.bincount(e.labels.ravel())[1:] for e in examples]) if examples else np.zeros(0)
    return {"nucleus_diameter_px": round(median_diameter(areas), 2), "pixel_size_um": pixel_size}


def _train_with_ray(
    settings: TrainSettings,
    worker_settings: dict[str, Any],
    bundle_config: BundleConfig,
    run_dir: Path,
    train_examples: list[Example],
    val_examples: list[Example],
    init_state: dict | None,
) -> tuple[dict, dict, list[dict]]:
    """Ray Train's TorchTrainer over ``settings.workers`` workers; returns (best state, its metrics, history)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..runtime.ray_start import init_ray

    init_ray(settings.address)
    cluster_cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    cpus_per_worker = settings.cpus_per_worker or max(1.0, math.floor(cluster_cpus / settings.workers))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "settings": worker_settings,
            "bundle_config": bundle_config,
            "train_ref": ray.put(train_examples),
            "val_ref": ray.put(val_examples),
            "init_ref": ray.put(init_state) if init_state is not None else None,
            "run_dir": str(run_dir),
            "threads": int(threads_for(1, cpus_per_worker)),
        },
        scaling_config=ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if settings.gpu else {})},
        ),
        run_config=RunConfig(
            name=RAY_RUN_NAME,
            storage_path=str(run_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="score", checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=settings.max_failures),
            # Ray Train's own INFO lines (resources requested, worker group started, checkpoint
            # reported, each about 10 an epoch) hide the epoch lines; its warnings stay
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    state, best_metrics = load_best_state(result.best_checkpoints)
    return state, best_metrics, load_checkpoint_state(result.checkpoint)["history"]


def load_best_state(scored: list[tuple[Any, dict]]) -> tuple[dict, dict]:
    """The training state of the best-scoring checkpoint that can be read, and its metrics.

    ``scored``: ``(checkpoint, metrics)`` pairs, a checkpoint being a Ray ``Checkpoint`` or a
    folder. A checkpoint whose state file is unreadable (truncated by a full disk, a partial
    copy) is skipped for the next best, with a warning, as resuming skips it.
    """
    for checkpoint, metrics in sorted(scored, key=lambda item: item[1].get("score", -math.inf), reverse=True):
        metrics = numbered_from_one(metrics)  # epochs from 1, also in a checkpoint of an earlier version
        try:
            if isinstance(checkpoint, Path):
                return torch.load(checkpoint / STATE_NAME, map_location="cpu", weights_only=False), metrics
            with checkpoint.as_directory() as directory:
                return torch.load(Path(directory) / STATE_NAME, map_location="cpu", weights_only=False), metrics
        except Exception as error:
            log.warning("checkpoint of epoch %s is unreadable (%s: %s); exporting the next best", metrics.get("epoch"), type(error).__name__, str(error).strip()[:120])
    raise RuntimeError("no checkpoint of this run can be read; run again with --overwrite to start over")


def _train_here(
    settings: TrainSettings,
    worker_settings: dict[str, Any],
    bundle_config: BundleConfig,
    run_dir: Path,
    train_examples: list[Example],
    val_examples: list[Example],
    init_state: dict | None,
) -> tuple[dict, dict, list[dict]]:
    """``--engine local``: the same epoch loop in this process on one device; returns (best state, its metrics, history)."""
    device = torch.device("cuda" if settings.gpu else "cpu")
    context = LocalWorkerContext(run_dir, device, train_examples, val_examples, init_state)
    run_epochs(context, worker_settings, bundle_config, run_dir)
    finished = context.checkpoints()
    scored = [(path, json.loads((path / LOCAL_METRICS_NAME).read_text())) for path in finished]
    state, best_metrics = load_best_state(scored)
    latest = state if best_metrics is scored[-1][1] else load_checkpoint_state(finished[-1])
    return state, best_metrics, latest["history"]


def export_bundle(
    state_dict: dict,
    bundle_config: BundleConfig,
    val_examples: list[Example],
    directory: Path,
    tune: bool,
    best_metrics: dict[str, Any],
    history: list[dict],
) -> Path:
    """Save the best weights as a bundle, with post-processing tuned on the validation images."""
    from ..model.network import build_network

    network = build_network(bundle_config)
    network.load_state_dict(state_dict)
    save_bundle(network, bundle_config, directory)
    metrics = {"best_epoch": int(best_metrics["epoch"]), "val_map_at_training": best_metrics.get("val_map")}
    postprocess = bundle_config.postprocess
    if val_examples:
        model = load_model(directory)  # evaluate the weights exactly as shipped (float16 round trip)
        params, tuned = tune_postprocess(model, val_examples, bundle_config.postprocess_params, search=tune)
        postprocess = params.to_dict()
        metrics.update({f"val_{k}": round(v, 4) for k, v in tuned.items()})
        metrics["val_images"] = len(val_examples)
    metrics["epochs"] = len(history)
    return save_bundle(network, replace(bundle_config, postprocess=postprocess, metrics=metrics), directory)
