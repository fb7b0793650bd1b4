"""The per-worker Ray Train loop (runs inside each Ray Train worker process).

Kept apart from the driver (:mod:`nucleibatch.training.run`) so that the worker
function is small: it only calls tested library functions.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..instances import InstanceParams, probabilities_to_labels
from ..metrics import image_scores
from ..model import build_network, predict_image
from .data import Example, PatchDataset
from .losses import segmentation_loss

STATE_NAME = "state.pt"
METRIC_COLUMNS = ("epoch", "train_loss", "val_map", "val_ap50", "val_ap75", "val_f1_50", "lr", "patches_per_s", "epoch_seconds")
PROGRESS_EVERY_S = 30.0


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up then cosine decay to 2% of ``peak`` (a pure function of the step, so resuming is exact)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def validate(network: torch.nn.Module, examples: list[Example], params: InstanceParams, device: torch.device, tile_size: int, halo: int) -> list[dict]:
    """Per-image DSB scores of ``network`` on normalised examples (same inference as segment)."""
    network.eval()
    rows = []
    for example in examples:
        probabilities = predict_image(network, example.image, tile_size=tile_size, halo=halo, batch_size=4, device=device)
        labels = probabilities_to_labels(probabilities, params)
        rows.append({"image_id": example.image_id, **image_scores(example.labels, labels)})
    return rows


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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: DDP training with per-epoch validation, report and checkpoint.

    ``config`` holds ``settings`` (a dict of TrainSettings), ``bundle_config``,
    ``train_ref`` / ``val_ref`` (Ray object refs of lists of :class:`Example`),
    ``run_dir`` and ``threads``.
    """
    import ray
    import ray.train
    import ray.train.torch

    settings = config["settings"]
    bundle_config = config["bundle_config"]
    torch.set_num_threads(int(config["threads"]))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    train_examples: list[Example] = ray.get(config["train_ref"])
    val_examples: list[Example] = ray.get(config["val_ref"])[rank::world]
    device = ray.train.torch.get_device()
    use_amp = device.type == "cuda"

    network = build_network(bundle_config)
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings["learning_rate"], weight_decay=1e-4)
    start_epoch, best_map, history = 0, -1.0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_NAME, map_location="cpu", weights_only=False)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_map, history = state["epoch"] + 1, state["best_map"], state["history"]
        if rank == 0:
            print(f"resuming from the checkpoint of epoch {state['epoch']} (best validation mAP {best_map:.4f})", flush=True)
    model = ray.train.torch.prepare_model(network)

    dataset = PatchDataset(train_examples, settings["patch_size"], settings["patches_per_epoch"], seed=settings["seed"])
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=settings["batch_size"],
        shuffle=True,
        num_workers=settings["loader_workers"],
        drop_last=True,
        persistent_workers=settings["loader_workers"] > 0,
    )
    loader = ray.train.torch.prepare_data_loader(loader)
    steps_per_epoch = max(1, len(loader))
    total_steps = steps_per_epoch * settings["epochs"]
    warmup = min(steps_per_epoch * 2, max(1, total_steps // 10))
    params = InstanceParams.from_dict(bundle_config["postprocess"])

    for epoch in range(start_epoch, settings["epochs"]):
        dataset.set_epoch(epoch)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        started = last_print = time.perf_counter()
        loss_sum, n_batches, n_patches = 0.0, 0, 0
        lr = settings["learning_rate"]
        for step, (x, y) in enumerate(loader):
            lr = learning_rate(epoch * steps_per_epoch + step, total_steps, settings["learning_rate"], warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
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
                    f"epoch {epoch + 1}/{settings['epochs']}: step {step + 1}/{steps_per_epoch}, "
                    f"loss {loss_sum / n_batches:.4f}, {n_patches / (now - started):.1f} patches/s",
                    flush=True,
                )
                last_print = now
        train_seconds = time.perf_counter() - started
        train_loss = _all_reduce_mean(loss_sum / max(1, n_batches), world)

        module = model.module if hasattr(model, "module") else model
        rows = validate(module, val_examples, params, device, bundle_config["tile_size"], bundle_config["halo"]) if val_examples else []
        sums = _all_reduce_sum(
            [sum(r[k] for r in rows) for k in ("map", "ap50", "ap75", "f1_50")] + [float(len(rows))], world
        )
        n_val = max(1.0, sums[-1])
        metrics = {
            "epoch": epoch,
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
                    {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "best_map": best_map, "history": history},
                    Path(tmp) / STATE_NAME,
                )
                write_metrics_files(Path(config["run_dir"]), history)
                print(
                    f"epoch {epoch + 1}/{settings['epochs']} done: loss {metrics['train_loss']:.4f}, "
                    f"val mAP {metrics['val_map']:.4f} (AP50 {metrics['val_ap50']:.3f}), "
                    f"{metrics['patches_per_s']:.1f} patches/s, {metrics['epoch_seconds']:.0f} s",
                    flush=True,
                )
                report_checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "score": score}, checkpoint=report_checkpoint)


def _all_reduce_sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _all_reduce_mean(value: float, world: int) -> float:
    return _all_reduce_sum([value], world)[0] / world


def threads_for(workers: int, cpus: float | None = None) -> int:
    """Torch threads per worker: the node's CPUs shared evenly (at least 1)."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(1, int(np.floor(cpus / max(1, workers))))
