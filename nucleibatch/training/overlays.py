"""Validation overlays written while training: predicted against true outlines (pure arrays, plus one PNG writer).

Each epoch the rank-0 worker draws a few fixed validation images side by side, the image
as the network sees it (normalised grey, bright nuclei) with the true outlines in magenta
and the predicted ones in green on top, and saves ``RUN_DIR/overlays/epoch_XXX.png``.
The drawing reuses the QC report's :func:`~nucleibatch.report.drawing.draw_outlines`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..report.drawing import OUTLINE_RGB, draw_outlines, to_display_rgb

PREDICTED_RGB = tuple(OUTLINE_RGB)  # neon green, as in the QC report
TRUE_RGB = (255, 0, 255)  # magenta
OVERLAY_IMAGES = 3  # validation images per overlay
OVERLAY_CROP = 384  # larger images are shown by their central crop of this side
GAP = 4  # pixels of black between the images


def centre_crop_box(shape: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of the central ``size`` x ``size`` window of an image (the whole image if smaller)."""
    height, width = shape
    y0, x0 = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return y0, min(height, y0 + size), x0, min(width, x0 + size)


def overlay_image(image: np.ndarray, true_labels: np.ndarray, predicted_labels: np.ndarray, crop: int = OVERLAY_CROP) -> np.ndarray:
    """One normalised image ``(H, W)`` in [0, 1] with true (magenta) and predicted (green, on top)
    outlines: ``(h, w, 3)`` uint8 of its central ``crop`` window."""
    if not (image.shape == true_labels.shape == predicted_labels.shape):
        raise ValueError(f"image {image.shape}, true labels {true_labels.shape} and predicted labels {predicted_labels.shape} differ in size")
    y0, y1, x0, x1 = centre_crop_box(image.shape, crop)
    rgb = to_display_rgb(np.asarray(image, np.float32)[y0:y1, x0:x1], (0.0, 1.0))
    rgb = draw_outlines(rgb, np.asarray(true_labels)[y0:y1, x0:x1], TRUE_RGB)
    return draw_outlines(rgb, np.asarray(predicted_labels)[y0:y1, x0:x1], PREDICTED_RGB)


def overlay_panel(
    images: Sequence[np.ndarray], true_labels: Sequence[np.ndarray], predicted_labels: Sequence[np.ndarray], crop: int = OVERLAY_CROP, gap: int = GAP
) -> np.ndarray:
    """:func:`overlay_image` of several images side by side (top-aligned, black between): ``(h, w, 3)`` uint8."""
    tiles = [overlay_image(i, t, p, crop) for i, t, p in zip(images, true_labels, predicted_labels, strict=True)]
    if not tiles:
        raise ValueError("no image to draw")
    height = max(tile.shape[0] for tile in tiles)
    width = sum(tile.shape[1] for tile in tiles) + gap * (len(tiles) - 1)
    panel = np.zeros((height, width, 3), np.uint8)
    x = 0
    for tile in tiles:
        panel[: tile.shape[0], x : x + tile.shape[1]] = tile
        x += tile.shape[1] + gap
    return panel


def overlay_path(run_dir: str | Path, epoch: int) -> Path:
    """``RUN_DIR/overlays/epoch_XXX.png`` (``epoch`` as in metrics.csv, counted from 1)."""
    return Path(run_dir) / "overlays" / f"epoch_{epoch:03d}.png"


def write_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Save ``(H, W, 3)`` uint8 as PNG (written to a temporary name, then renamed)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(tmp, format="PNG")
    tmp.replace(path)
    return path
