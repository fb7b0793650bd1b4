"""The per-worker Ray Train loop (runs inside each Ray Train worker process).

Kept apart from the driver (:mod:`nucleibatch.training.run`) so that the worker
function is small: it only calls tested library functions.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..instances import InstanceParams, probabilities_to_labels
from ..metrics import image_scores
from ..model.config import BundleConfig
from ..model.device import uses_bf16
from ..model.network import build_network
from ..model.predict import predict_image
from .data import AugmentSettings, Example, PatchDataset
from .losses import segmentation_loss
from .overlays import OVERLAY_IMAGES, overlay_panel, overlay_path, write_png

STATE_NAME = "state.pt"
LOCAL_RUN_NAME = "local_train"  # --engine local: its checkpoints
LOCAL_METRICS_NAME = "metrics.json"
METRIC_COLUMNS = ("epoch", "train_loss", "val_map", "val_ap50", "val_ap75", "val_f1_50", "lr", "patches_per_s", "epoch_seconds")
PROGRESS_EVERY_S = 30.0
EPOCH_BASE = 1
"""Epochs are numbered from 1 wherever a user sees them: the log lines ("epoch 3/40"),
metrics.csv's ``epoch`` column, ``overlays/epoch_003.png``, the checkpoints' states and metrics,
TensorBoard's steps, the summary's and the bundle's ``best_epoch``. The loop's own index (data
seeds, learning-rate schedule, frozen epochs) still counts from 0: epoch number = index + 1.
States and metrics written by earlier versions counted from 0 and lack the ``epoch_base`` key:
:func:`numbered_from_one` converts them, so that such runs resume."""


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up then cosine decay to 2% of ``peak`` (a pure function of the step, so resuming is exact)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def validate(
    network: torch.nn.Module,
    examples: list[Example],
    params: InstanceParams,
    device: torch.device,
    tile_size: int,
    halo: int,
    keep_labels: list[np.ndarray] | None = None,
    n_keep: int = 0,
) -> list[dict]:
    """Per-image DSB scores of ``network`` on normalised examples (same inference as segment).

    The predicted labels of the first ``n_keep`` examples are appended to ``keep_labels``.
    """
    network.eval()
    rows = []
    for number, example in enumerate(examples):
        probabilities = predict_image(network, example.image, tile_size=tile_size, halo=halo, batch_size=4, device=device)
        labels = probabilities_to_labels(probabilities, params)
        rows.append({"image_id": example.image_id, **image_scores(example.labels, labels)})
        if keep_labels is not None and number < n_keep:
            keep_labels.append(labels)
    return rows


def encoder_of(network: torch.nn.Module) -> torch.nn.Module:
    """The encoder of an smp network (DDP-wrapped or not)."""
    module = network.module if hasattr(network, "module") else network
    encoder = getattr(module, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        raise ValueError(f"{type(module).__name__} has no .encoder to freeze")
    return encoder


def set_encoder_trainable(network: torch.nn.Module, trainable: bool) -> int:
    """Freeze (``requires_grad=False``) or unfreeze the encoder's parameters; returns how many tensors.

    Frozen parameters get no gradient (``zero_grad(set_to_none=True)`` leaves it None), and
    AdamW skips parameters without a gradient: no step and no weight decay touches them.
    Put the encoder in eval mode too while frozen, so that its batch-norm statistics stay put
    (the training loop does, after ``model.train()``).
    """
    parameters = list(encoder_of(network).parameters())
    for parameter in parameters:
        parameter.requires_grad_(trainable)
    return len(parameters)


def wrap_for_phase(network: torch.nn.Module, frozen: bool, wrap) -> torch.nn.Module:
    """Freeze or unfreeze the encoder, then ``wrap`` the network for data-parallel training
    (``ray.train.torch.prepare_model``, or ``DistributedDataParallel``).

    DDP synchronises only the parameters that required gradients when it was built, so the
    wrapper must be rebuilt whenever the encoder is frozen or unfrozen; drop the old wrapper
    first (its gradient hooks go with it). Every rank calls this at the same epoch.
    """
    set_encoder_trainable(network, not frozen)
    gc.collect()
    return wrap(network)


def numbered_from_one(record: dict) -> dict:
    """A checkpoint's state (``epoch``, ``history``) or reported metrics (``epoch``) with epochs
    numbered from 1 (:data:`EPOCH_BASE`): records of earlier versions (no ``epoch_base`` key)
    counted from 0 and are shifted by one; the others are returned as they are."""
    if record.get("epoch_base") == EPOCH_BASE:
        return record
    record = {**record, "epoch": int(record["epoch"]) + 1, "epoch_base": EPOCH_BASE}
    if "history" in record:
        record["history"] = [{**row, "epoch": int(row["epoch"]) + 1} for row in record["history"]]
    return record


def starting_state(network: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint_state: dict | None, init_state: dict | None) -> tuple[int, float, list[dict], str]:
    """Load where training starts: the run's checkpoint if there is one (resume wins), else the
    ``--init`` bundle's weights, else nothing (random weights).

    Returns ``(start_epoch, best score, history, source)`` with source ``checkpoint``, ``init`` or
    ``scratch``; ``start_epoch`` is the loop's index (from 0) of the first epoch to run, which is
    the number (from 1) of the checkpoint's epoch: the epochs finished.
    """
    if checkpoint_state is not None:
        checkpoint_state = numbered_from_one(checkpoint_state)
        network.load_state_dict(checkpoint_state["model"])
        optimizer.load_state_dict(checkpoint_state["optimizer"])
        return int(checkpoint_state["epoch"]), checkpoint_state["best_map"], checkpoint_state["history"], "checkpoint"
    if init_state is not None:
        network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in init_state.items()})
        return 0, -1.0, [], "init"
    return 0, -1.0, [], "scratch"


def optimizer_state_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Move the optimizer's state tensors (AdamW moments) to the parameters' device."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)


def tensorboard_writer_class():
    """``SummaryWriter`` of tensorboardX (installed with ray[train]), else of
    ``torch.utils.tensorboard`` (needs the ``tensorboard`` package), else None."""
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError:
        return None


def write_tensorboard(writer, metrics: dict, overlay: np.ndarray | None) -> None:
    """One epoch in TensorBoard: the metrics.csv columns as scalars (step = the epoch's number, from 1) and the overlay image."""
    epoch = int(metrics["epoch"])
    for key in METRIC_COLUMNS:
        value = metrics.get(key)
        if key != "epoch" and value is not None and math.isfinite(float(value)):
            writer.add_scalar(key, float(value), epoch)
    if overlay is not None:
        writer.add_image("validation_overlay", overlay, epoch, dataformats="HWC")
    writer.flush()


def write_metrics_files(run_dir: Path, history: list[dict]) -> None:
    """``metrics.csv`` (one row per epoch) and ``curves.png`` (loss and validation mAP)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(run_dir / "metrics.csv")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [row["train_loss"] for row in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, label in (("val_map", "mAP@[.5:.95]"), ("val_ap50", "AP@0.5"), ("val_ap75", "AP@0.75")):
        right.plot(epochs, [row[key] for row in history], marker="o", label=label)
    right.set(xlabel="epoch", ylabel="validation (DSB metric)", title="validation", ylim=(0, 1))
    right.legend()
    figure.tight_layout()
    figure.savefig(run_dir / "curves.png.tmp.png", dpi=80)
    plt.close(figure)
    (run_dir / "curves.png.tmp.png").replace(run_dir / "curves.png")


def load_checkpoint_state(checkpoint: Any, announce: bool = True) -> dict | None:
    """The training state to resume from: that of the latest ``checkpoint`` (Ray's, or a folder); when its state file
    cannot be read (truncated by a full disk, a partial copy), the newest readable one among the
    run's other checkpoints (``checkpoint_<time>`` folders beside it), with a warning. None when
    there is no checkpoint (a new run) or none is readable (the run starts over, with a warning).
    Epochs in the state are numbered from 1, also in states of earlier versions (:func:`numbered_from_one`)."""
    if checkpoint is None:
        return None
    latest = Path(getattr(checkpoint, "path", checkpoint))
    candidates = [latest] + sorted((p for p in latest.parent.glob("checkpoint_*") if p.is_dir() and p != latest), reverse=True)  # names hold the time
    for directory in candidates:
        try:
            state = torch.load(directory / STATE_NAME, map_location="cpu", weights_only=False)
            if not {"model", "optimizer", "epoch", "history", "best_map"} <= set(state):
                raise ValueError(f"missing {sorted({'model', 'optimizer', 'epoch', 'history', 'best_map'} - set(state))}")
        except Exception as error:
            message = f"checkpoint {directory.name} is unreadable ({type(error).__name__}: {str(error).strip()[:120]}); trying the previous one"
            if announce:  # the worker's stdout is the training log
                print(f"warning: {message}", flush=True)
            continue
        state = numbered_from_one(state)
        if directory != latest and announce:
            print(f"warning: resuming from the older checkpoint {directory.name} (epoch {state['epoch']})", flush=True)
        return state
    if announce:
        print("warning: no readable checkpoint: training starts over", flush=True)
    return None


def _quiet_ray_train_reports() -> None:
    """Ray Train logs each report (the whole metrics dict) at INFO under a logger named after its
    module's file, outside the ``ray.train`` logger that ``LoggingConfig`` sets: quieted here,
    in the worker; a Ray that moved the module keeps its lines."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "generated new fontManager" on a fresh node


class RayWorkerContext:
    """What the epoch loop needs from Ray Train, inside a Ray Train worker."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray
        import ray.train
        import ray.train.torch

        self._ray, self._train, self._torch = ray, ray.train, ray.train.torch
        _quiet_ray_train_reports()
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.train_examples: list[Example] = ray.get(config["train_ref"])
        self.val_examples: list[Example] = ray.get(config["val_ref"])
        self._init_ref = config.get("init_ref")

    def checkpoint_state(self) -> dict | None:
        return load_checkpoint_state(self._train.get_checkpoint(), announce=self.rank == 0)

    def init_state(self) -> dict | None:
        return self._ray.get(self._init_ref) if self._init_ref is not None else None

    def prepare_loader(self, loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
        return self._torch.prepare_data_loader(loader)

    def prepare_model(self, network: torch.nn.Module) -> torch.nn.Module:
        return self._torch.prepare_model(network)

    def report(self, metrics: dict, state_dir: Path | None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(str(state_dir)) if state_dir is not None else None
        self._train.report(metrics, checkpoint=checkpoint)


class DeviceLoader:
    """A DataLoader whose batches arrive on ``device`` (what Ray's prepare_data_loader does)."""

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class LocalWorkerContext:
    """The same for ``--engine local``: one process, one device, no Ray.

    Checkpoints go to ``RUN_DIR/local_train/checkpoint_<epoch>/`` (the epoch's number, from 1), each with its metrics
    (``metrics.json``, written last: it marks the checkpoint finished); the latest and the best
    by ``score`` are kept, as Ray's CheckpointConfig keeps them.
    """

    def __init__(self, run_dir: Path, device: torch.device, train_examples: list[Example], val_examples: list[Example], init_state: dict | None) -> None:
        self.rank, self.world, self.device = 0, 1, device
        self.train_examples, self.val_examples = train_examples, val_examples
        self._init_state = init_state
        self.directory = Path(run_dir) / LOCAL_RUN_NAME
        self.directory.mkdir(parents=True, exist_ok=True)

    def checkpoints(self) -> list[Path]:
        """The finished checkpoints, oldest first."""
        return sorted(p for p in self.directory.glob("checkpoint_*") if (p / LOCAL_METRICS_NAME).is_file())

    def checkpoint_state(self) -> dict | None:
        finished = self.checkpoints()
        return load_checkpoint_state(finished[-1]) if finished else None

    def init_state(self) -> dict | None:
        return self._init_state

    def prepare_loader(self, loader: torch.utils.data.DataLoader) -> DeviceLoader:
        return DeviceLoader(loader, self.device)

    def prepare_model(self, network: torch.nn.Module) -> torch.nn.Module:
        return network.to(self.device)

    def report(self, metrics: dict, state_dir: Path | None) -> None:
        if state_dir is None:
            return
        target = self.directory / f"checkpoint_{int(metrics['epoch']):06d}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(state_dir, target)
        (target / LOCAL_METRICS_NAME).write_text(json.dumps(metrics))
        finished = self.checkpoints()
        best = max(finished, key=lambda p: json.loads((p / LOCAL_METRICS_NAME).read_text())["score"])
        for old in finished[:-1]:
            if old != best:
                shutil.rmtree(old, ignore_errors=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: DDP training with per-epoch validation, report and checkpoint.

    ``config`` holds ``settings`` (a dict of TrainSettings), ``bundle_config``,
    ``train_ref`` / ``val_ref`` / ``init_ref`` (Ray object refs: lists of :class:`Example`, the
    ``--init`` weights or None), ``run_dir`` and ``threads``.
    """
    from ..runtime.allocator import tune_allocator

    tune_allocator()  # complete where the worker started with the settings (init_ray's job environment)
    torch.set_num_threads(int(config["threads"]))
    run_epochs(RayWorkerContext(config), config["settings"], config["bundle_config"], Path(config["run_dir"]))


def run_epochs(context: RayWorkerContext | LocalWorkerContext, settings: dict[str, Any], bundle_config: BundleConfig, run_dir: Path) -> None:
    """The epoch loop of one worker: train, validate, checkpoint and report each epoch."""
    rank, world, device = context.rank, context.world, context.device
    train_examples = context.train_examples
    val_examples = context.val_examples[rank::world]
    use_amp = uses_bf16(settings.get("precision", "auto"), device)

    network = build_network(bundle_config)
    if use_amp and device.type == "cpu":  # bf16 convolutions on the CPU want channels-last
        network = network.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings["learning_rate"], weight_decay=1e-4)
    checkpoint_state = context.checkpoint_state()
    init_state = context.init_state() if checkpoint_state is None else None

    start_epoch, best_map, history, source = starting_state(network, optimizer, checkpoint_state, init_state)
    if rank == 0 and source == "checkpoint":
        print(f"resuming after epoch {start_epoch}/{settings['epochs']} (its checkpoint; best validation mAP {best_map:.4f})", flush=True)
    elif rank == 0 and source == "init":
        print(f"starting from the weights of {settings['init']}", flush=True)
    del checkpoint_state, init_state
    freeze_epochs = int(settings.get("freeze_encoder_epochs", 0))
    model, frozen = None, None

    augment = AugmentSettings(
        scale=tuple(settings.get("scale_jitter", AugmentSettings.scale)), stain=float(settings.get("stain_jitter") or 0.0), blur=float(settings.get("blur", 0.0))
    )
    dataset = PatchDataset(train_examples, settings["patch_size"], settings["patches_per_epoch"], seed=settings["seed"], augment=augment)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=settings["batch_size"],
        shuffle=True,
        num_workers=settings["loader_workers"],
        drop_last=True,
        persistent_workers=settings["loader_workers"] > 0,
        pin_memory=device.type == "cuda",
    )
    loader = context.prepare_loader(loader)
    steps_per_epoch = max(1, len(loader))
    total_steps = steps_per_epoch * settings["epochs"]
    warmup = min(steps_per_epoch * 2, max(1, total_steps // 10))
    params = bundle_config.postprocess_params
    overlay_every = int(settings.get("overlay_every", 1))
    writer = None
    if rank == 0 and settings.get("tensorboard"):
        writer_class = tensorboard_writer_class()
        if writer_class is not None:
            writer = writer_class(str(run_dir / "tensorboard"))

    for epoch in range(start_epoch, settings["epochs"]):  # the index, from 0; users see number = epoch + 1 (EPOCH_BASE)
        number = epoch + EPOCH_BASE
        if model is None or (epoch < freeze_epochs) != frozen:  # see wrap_for_phase
            frozen = epoch < freeze_epochs
            model = None  # the old DDP wrapper, with its gradient hooks, goes first
            model = wrap_for_phase(network, frozen, context.prepare_model)
            optimizer_state_to(optimizer, device)  # a resumed state was loaded onto the CPU
            if rank == 0 and freeze_epochs:
                print(f"epoch {number}: encoder {'frozen' if frozen else 'trainable'}", flush=True)
        dataset.set_epoch(epoch)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        if frozen:
            encoder_of(model).eval()  # batch-norm statistics of the frozen encoder stay as loaded
        started = last_print = time.perf_counter()
        loss_sum, n_batches, n_patches = 0.0, 0, 0
        lr = settings["learning_rate"]
        for step, (x, y) in enumerate(loader):
            lr = learning_rate(epoch * steps_per_epoch + step, total_steps, settings["learning_rate"], warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if use_amp and device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
            loss = segmentation_loss(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach())
            n_batches += 1
            n_patches += x.shape[0] * world
            now = time.perf_counter()
            if rank == 0 and now - last_print > PROGRESS_EVERY_S:
                print(
                    f"epoch {number}/{settings['epochs']}: step {step + 1}/{steps_per_epoch}, "
                    f"loss {loss_sum / n_batches:.4f}, {n_patches / (now - started):.1f} patches/s",
                    flush=True,
                )
                last_print = now
        train_seconds = time.perf_counter() - started
        train_loss = _all_reduce_mean(loss_sum / max(1, n_batches), world)

        module = model.module if hasattr(model, "module") else model
        draw = rank == 0 and overlay_every > 0 and (epoch % overlay_every == 0 or epoch == settings["epochs"] - 1)
        kept: list[np.ndarray] = []
        n_overlay = min(OVERLAY_IMAGES, len(val_examples)) if draw else 0
        rows = validate(module, val_examples, params, device, bundle_config.tile_size, bundle_config.halo, kept, n_overlay) if val_examples else []
        sums = _all_reduce_sum(
            [sum(r[k] for r in rows) for k in ("map", "ap50", "ap75", "f1_50")] + [float(len(rows))], world
        )
        n_val = max(1.0, sums[-1])
        metrics = {
            "epoch": number,
            "train_loss": round(train_loss, 5),
            "val_map": round(sums[0] / n_val, 5) if sums[-1] else float("nan"),
            "val_ap50": round(sums[1] / n_val, 5) if sums[-1] else float("nan"),
            "val_ap75": round(sums[2] / n_val, 5) if sums[-1] else float("nan"),
            "val_f1_50": round(sums[3] / n_val, 5) if sums[-1] else float("nan"),
            "lr": lr,
            "patches_per_s": round(n_patches / max(train_seconds, 1e-9), 3),
            "epoch_seconds": round(time.perf_counter() - started, 2),
        }
        history.append(metrics)
        score = metrics["val_map"] if not math.isnan(metrics["val_map"]) else -metrics["train_loss"]
        best_map = max(best_map, score)
        with tempfile.TemporaryDirectory() as tmp:
            report_checkpoint = None
            if rank == 0:
                torch.save(
                    {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "epoch": number, "epoch_base": EPOCH_BASE, "best_map": best_map, "history": history},
                    Path(tmp) / STATE_NAME,
                )
                write_metrics_files(run_dir, history)
                overlay = None
                if kept:
                    shown = val_examples[: len(kept)]
                    overlay = overlay_panel([e.image for e in shown], [e.labels for e in shown], kept)
                    write_png(overlay, overlay_path(run_dir, number))
                if writer is not None:
                    write_tensorboard(writer, metrics, overlay)
                print(
                    f"epoch {number}/{settings['epochs']} done: loss {metrics['train_loss']:.4f}, "
                    f"val mAP {metrics['val_map']:.4f} (AP50 {metrics['val_ap50']:.3f}), "
                    f"{metrics['patches_per_s']:.1f} patches/s, {metrics['epoch_seconds']:.0f} s",
                    flush=True,
                )
                report_checkpoint = Path(tmp)
            context.report({**metrics, "score": score, "epoch_base": EPOCH_BASE}, report_checkpoint)
    if writer is not None:
        writer.close()


def _all_reduce_sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _all_reduce_mean(value: float, world: int) -> float:
    return _all_reduce_sum([value], world)[0] / world


def threads_for(workers: int, cpus: float | None = None) -> int:
    """Torch threads per worker: the node's usable CPUs (:func:`~nucleibatch.cpus.usable_cpus`)
    shared evenly (at least 1)."""
    from ..cpus import usable_cpus

    cpus = cpus if cpus is not None else usable_cpus().count
    return max(1, int(np.floor(cpus / max(1, workers))))
