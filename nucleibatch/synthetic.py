"""Synthetic nuclei images with exact instance labels, for tests, demos and benchmarks.

Nuclei are filled ellipses with textured intensity on a noisy, slowly varying
background; some touch, none overlap (later nuclei are painted only on free pixels).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def synthetic_nuclei(
    shape: tuple[int, int] = (256, 256),
    n_nuclei: int = 40,
    radius: tuple[float, float] = (6.0, 14.0),
    seed: int = 0,
    dtype: type = np.uint8,
    brightfield: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Make one synthetic fluorescence (or brightfield-like) image with its labels.

    Args:
        shape: ``(H, W)`` of the image.
        n_nuclei: number of ellipses attempted (placed at random, may touch).
        radius: range of the ellipses' semi-axes in pixels.
        seed: random seed; the same seed gives the same image.
        dtype: ``np.uint8`` or ``np.uint16`` for the image.
        brightfield: dark nuclei on a bright background when True.

    Returns:
        ``image`` ``(H, W)`` of ``dtype`` and ``labels`` ``(H, W)`` uint32 (0 = background,
        1..N consecutive).
    """
    rng = np.random.default_rng(seed)
    height, width = shape
    labels = np.zeros(shape, dtype=np.uint32)
    next_label = 1
    for _ in range(n_nuclei):
        ry, rx = rng.uniform(radius[0], radius[1], size=2)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        angle = rng.uniform(0, np.pi)
        r = int(np.ceil(max(ry, rx))) + 1
        y0, y1 = max(0, int(cy) - r), min(height, int(cy) + r + 1)
        x0, x1 = max(0, int(cx) - r), min(width, int(cx) + r + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dy, dx = yy - cy, xx - cx
        u = dy * np.cos(angle) + dx * np.sin(angle)
        v = -dy * np.sin(angle) + dx * np.cos(angle)
        inside = (u / ry) ** 2 + (v / rx) ** 2 <= 1.0
        window = labels[y0:y1, x0:x1]
        free = inside & (window == 0)
        if free.sum() < 0.6 * max(1, inside.sum()) or free.sum() < 9:
            continue
        window[free] = next_label
        next_label += 1
    # keep each label one connected piece (painting around neighbours can cut one)
    labels = _largest_components(labels)
    background = ndi.gaussian_filter(rng.normal(0, 1, shape), sigma=max(shape) / 8)
    background = 0.08 + 0.04 * background / (np.abs(background).max() + 1e-9)
    texture = ndi.gaussian_filter(rng.normal(0, 1, shape), sigma=1.5)
    brightness = rng.uniform(0.5, 1.0, size=next_label)
    brightness[0] = 0.0
    signal = brightness[labels] * (0.85 + 0.3 * texture)
    signal = ndi.gaussian_filter(signal, sigma=0.8)
    image = background + signal + rng.normal(0, 0.02, shape)
    if brightfield:
        image = 1.0 - image
    image = np.clip(image, 0, 1)
    max_value = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    return (image * max_value).astype(dtype), labels


def _largest_components(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest 4-connected piece of each label and renumber 1..N."""
    out = np.zeros_like(labels)
    next_label = 1
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        piece = labels[box] == index
        components, n = ndi.label(piece)
        if n > 1:
            sizes = np.bincount(components.ravel())[1:]
            piece = components == (1 + int(np.argmax(sizes)))
        out[box][piece] = next_label
        next_label += 1
    return out


def synthetic_mosaic(tiles: int = 3, tile_shape=(256, 256), seed: int = 0, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """A ``tiles x tiles`` grid of synthetic images with globally unique labels: ``(H, W)`` image and uint32 labels."""
    rows_img, rows_lab = [], []
    offset = 0
    for i in range(tiles):
        row_img, row_lab = [], []
        for j in range(tiles):
            image, labels = synthetic_nuclei(tile_shape, seed=seed * 1000 + i * tiles + j, **kwargs)
            labels = np.where(labels > 0, labels + offset, 0).astype(np.uint32)
            offset = int(labels.max()) if labels.any() else offset
            row_img.append(image)
            row_lab.append(labels)
        rows_img.append(np.concatenate(row_img, axis=1))
        rows_lab.append(np.concatenate(row_lab, axis=1))
    return np.concatenate(rows_img, axis=0), np.concatenate(rows_lab, axis=0)


def threshold_model(tile_size: int = 256, halo: int = 32):
    """A deterministic stand-in for a trained model: body = smoothed intensity above 0.35.

    Its network is a fixed 3x3 mean followed by a threshold (receptive field 3 px), so tiled
    and whole-image predictions agree exactly: the oracle for tiling and stitching tests.
    Returns a :class:`nucleibatch.model.NucleiModel` on the CPU.
    """
    from dataclasses import replace

    import torch

    from .model.config import default_config
    from .model.predict import NucleiModel

    class ThresholdNetwork(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            smooth = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
            body = 40.0 * (smooth - 0.35)
            rest = torch.full_like(body, -20.0)
            return torch.cat([body, rest, rest], dim=1)

    config = replace(
        default_config(tile_size=tile_size, halo=halo),
        name="threshold-oracle",
        weights_sha256="threshold-oracle",
        postprocess={"mask_threshold": 0.5, "seed_threshold": 0.5, "min_seed_size": 1, "min_size": 1},
    )
    return NucleiModel(network=ThresholdNetwork().eval(), config=config)
