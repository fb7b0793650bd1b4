"""Training examples: normalised images + labels, random augmented patches (pure numpy).

Patches are normalised exactly as inference normalises (per-image statistics over
the whole image, :mod:`nucleibatch.normalize`) *before* cropping, then augmented. Stained
(haematoxylin input) examples keep their optical densities, so that each patch can be made
with a jittered stain vector (the stain varies between labs and scanners) and that image's
statistics under it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi

from ..annotated import AnnotatedImage
from ..normalize import (
    HAEMATOXYLIN_WEIGHTS,
    apply_stats,
    compute_stats,
    haematoxylin_density,
    normalise_pixels,
    stats_for_bundle,
)
from ..targets import make_targets

# optical densities kept per stained example for the statistics under a jittered stain vector
STAIN_SAMPLE_PIXELS = 65536


@dataclass
class StainPlanes:
    """Optical densities of a stained RGB image, for stain augmentation.

    density: ``(H, W, 3)`` float32, ``-log(x + 1)`` of R, G, B (:func:`haematoxylin_density` with
    weights of one); sample: ``(h, w, 3)`` float32, a regular subsample of it (percentiles);
    percentiles: those of the bundle's normalisation.
    """

    density: np.ndarray
    sample: np.ndarray
    percentiles: tuple[float, float]


@dataclass
class Example:
    """A normalised image ``(H, W)`` float32 in [0, 1] and its labels ``(H, W)`` int32 (and, for
    the haematoxylin input of an RGB image, its :class:`StainPlanes`)."""

    image_id: str
    image: np.ndarray
    labels: np.ndarray
    stain: StainPlanes | None = None


@dataclass(frozen=True)
class AugmentSettings:
    """Ranges of the random augmentations (flips and 90-degree rotations are always on)."""

    scale: tuple[float, float] = (0.6, 1.6)
    contrast: tuple[float, float] = (0.7, 1.3)
    brightness: tuple[float, float] = (-0.1, 0.1)
    gamma: tuple[float, float] = (0.7, 1.4)
    noise: float = 0.03
    # stained examples: each weight of the haematoxylin stain vector is scaled by exp(N(0, s))
    # and moved by N(0, s / 2) x its norm (0: off)
    stain: float = 0.0
    blur: float = 0.0  # probability of a Gaussian blur of sigma U(0.5, 1.5) px (focus, scanner optics)


def to_example(annotated: AnnotatedImage, normalization: dict) -> Example:
    """Normalise an annotated image with the bundle's normalisation settings."""
    stats = stats_for_bundle(annotated.image, normalization)
    image = normalise_pixels(annotated.image, stats)
    stain = None
    if stats.input == "haematoxylin" and annotated.image.ndim == 3 and annotated.image.shape[2] >= 3:
        density = np.stack([haematoxylin_density(annotated.image[:, :, c]) for c in range(3)], axis=-1)
        step = max(1, int(np.ceil(np.sqrt(density.shape[0] * density.shape[1] / STAIN_SAMPLE_PIXELS))))
        sample = np.ascontiguousarray(density[::step, ::step])
        stain = StainPlanes(density, sample, tuple(normalization.get("percentiles", (1.0, 99.8))))
    return Example(annotated.image_id, image, annotated.labels, stain)


def stained_window(stain: StainPlanes, window: tuple[int, int, int, int], rng: np.random.Generator, jitter: float) -> np.ndarray:
    """A window ``(y0, y1, x0, x1)`` of a stained image normalised as inference would, had the
    haematoxylin stain vector been jittered by ``jitter`` (see :class:`AugmentSettings`): the
    image's statistics are recomputed under the jittered vector. ``(y1 - y0, x1 - x0)`` float32."""
    weights = np.asarray(HAEMATOXYLIN_WEIGHTS, dtype=np.float64)
    weights = weights * np.exp(rng.normal(0.0, jitter, 3)) + rng.normal(0.0, jitter / 2, 3) * np.linalg.norm(weights)
    weights = weights.astype(np.float32)
    stats = compute_stats(stain.sample @ weights, stain.percentiles, "never", "haematoxylin")
    y0, y1, x0, x1 = window
    return apply_stats(stain.density[y0:y1, x0:x1] @ weights, stats)


def split_ids(image_ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split of image ids (same ids, fraction and seed -> same split)."""
    ids = sorted(image_ids)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and len(ids) > 1:
        n_val = min(max(n_val, 1), len(ids) - 1)
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


def random_patch(example: Example, patch_size: int, rng: np.random.Generator, augment: AugmentSettings = AugmentSettings()) -> tuple[np.ndarray, np.ndarray]:
    """One augmented patch and its targets.

    Returns:
        ``x`` ``(1, P, P)`` float32 and ``y`` ``(3, P, P)`` float32 (body, contour, contact).
    """
    image, labels = example.image, example.labels
    scale = float(np.exp(rng.uniform(np.log(augment.scale[0]), np.log(augment.scale[1]))))
    crop = max(8, int(round(patch_size / scale)))
    height, width = image.shape
    pad_y, pad_x = max(0, crop - height), max(0, crop - width)
    y0 = int(rng.integers(0, height + pad_y - crop + 1))
    x0 = int(rng.integers(0, width + pad_x - crop + 1))
    window = (y0, min(height, y0 + crop), x0, min(width, x0 + crop))
    if example.stain is not None and augment.stain > 0:
        image = stained_window(example.stain, window, rng, augment.stain)
    else:
        image = image[window[0] : window[1], window[2] : window[3]]
    labels = labels[window[0] : window[1], window[2] : window[3]]
    if pad_y or pad_x:  # an image smaller than the crop: background below and to the right
        image = np.pad(image, ((0, crop - image.shape[0]), (0, crop - image.shape[1])))
        labels = np.pad(labels, ((0, crop - labels.shape[0]), (0, crop - labels.shape[1])))
    if crop != patch_size:
        zoom = patch_size / crop
        image = ndi.zoom(image, zoom, order=1, grid_mode=True, mode="grid-constant")[:patch_size, :patch_size]
        labels = ndi.zoom(labels, zoom, order=0, grid_mode=True, mode="grid-constant")[:patch_size, :patch_size]
        image = _fit(image, patch_size)
        labels = _fit(labels, patch_size)
    k = int(rng.integers(0, 4))
    image, labels = np.rot90(image, k), np.rot90(labels, k)
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    if augment.blur > 0 and rng.random() < augment.blur:
        image = ndi.gaussian_filter(image, float(rng.uniform(0.5, 1.5)), mode="reflect")
    gamma = float(np.exp(rng.uniform(np.log(augment.gamma[0]), np.log(augment.gamma[1]))))
    image = np.clip(image, 0.0, 1.0) ** gamma
    image = image * rng.uniform(*augment.contrast) + rng.uniform(*augment.brightness)
    if augment.noise > 0:
        image = image + rng.normal(0.0, rng.uniform(0, augment.noise), image.shape)
    x = np.ascontiguousarray(image, dtype=np.float32)[None]
    y = make_targets(np.ascontiguousarray(labels))
    return x, y


def _fit(array: np.ndarray, size: int) -> np.ndarray:
    pad_y, pad_x = size - array.shape[0], size - array.shape[1]
    if pad_y > 0 or pad_x > 0:
        array = np.pad(array, ((0, max(0, pad_y)), (0, max(0, pad_x))), mode="edge")
    return array[:size, :size]


class PatchDataset(torch.utils.data.Dataset):
    """``length`` random patches per epoch; item ``i`` of epoch ``e`` is reproducible from the seed."""

    def __init__(self, examples: Sequence[Example], patch_size: int, length: int, seed: int = 0, augment: AugmentSettings = AugmentSettings()):
        if not examples:
            raise ValueError("no training images")
        self.examples = list(examples)
        self.patch_size = patch_size
        self.length = length
        self.seed = seed
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        example = self.examples[int(rng.integers(0, len(self.examples)))]
        x, y = random_patch(example, self.patch_size, rng, self.augment)
        return torch.from_numpy(x), torch.from_numpy(y)
