"""Tiny `nucleibatch train` runs and reading what they write."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

# 2 DDP workers, 6 images, 16 patches of 128 px per epoch: plumbing, not model quality
SMALL_RUN = ["--workers", "2", "--limit-images", "6", "--patches-per-epoch", "16", "--batch-size", "2", "--patch-size", "128"]
METRIC_COLUMNS = ["epoch", "train_loss", "val_map", "val_ap50", "val_ap75", "val_f1_50", "lr", "patches_per_s", "epoch_seconds"]


def train_argv(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """The arguments of a SMALL_RUN `train` of ``data`` into ``run_dir``."""
    return ["train", str(data), "-o", str(run_dir), *SMALL_RUN, *extra]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """The rows of RUN_DIR/metrics.csv (its columns checked)."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == METRIC_COLUMNS
        return list(reader)


def png_rgb(path: Path) -> np.ndarray:
    """A PNG file (checked by its signature) as ``(H, W, 3)`` uint8."""
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def has_colour(rgb: np.ndarray, colour) -> bool:
    """Whether any pixel of ``(H, W, 3)`` ``rgb`` is exactly ``colour``."""
    return bool((rgb == np.asarray(colour, np.uint8)).all(axis=-1).any())


def tiny_network():
    """A resnet18 U-Net with narrow decoder channels at full depth (every encoder parameter is
    used), the same weights on every call (seed 0)."""
    from dataclasses import replace

    import torch

    from nucleibatch.model import build_network, default_config

    torch.manual_seed(0)
    config = replace(default_config("resnet18"), decoder_channels=[16, 8, 8, 8, 8])
    return build_network(config)
