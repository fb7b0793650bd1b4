"""Probability maps to instance labels on the network's device (torch): the post-processing of
:func:`nucleibatch.instances.instance_labels` as whole-array operations, so that a GPU does it
next to the network instead of CPU cores (``segment --instances-on device``).

The steps are those of the NumPy version: the same mask, the same seeds (the same float32
arithmetic), seeds under ``min_seed_size`` dropped, each seed grown inside the mask, mask
components without a seed kept as nuclei of their own. Two parts differ in kind:

* connected components are found by propagating the largest pixel index through each component
  (4-connected, as ``scipy.ndimage.label``), with pointer jumping: the same components;
* the watershed floods by ``levels`` bands of the body probability, from 1 down to the mask
  threshold: within a band a nucleus grows breadth-first, and where two meet in the same step
  the larger id wins. scikit-image's watershed floods pixel by pixel in the order of the
  probabilities, so the two differ on a few pixels where touching nuclei meet (see
  ``benchmarks/instances_device.py`` for the agreement on real blocks).
"""

from __future__ import annotations

import numpy as np
import torch

from .instances import InstanceParams

# propagation steps between two checks for convergence (each check waits for the device)
STEPS_PER_CHECK = 8
DEFAULT_LEVELS = 16


def _neighbour_max(labels: torch.Tensor) -> torch.Tensor:
    """Largest of the 4 neighbours' values of every pixel (0 beyond each image's edges):
    ``(..., H, W)`` -> ``(..., H, W)``; images of a batch do not touch."""
    padded = torch.nn.functional.pad(labels, (1, 1, 1, 1))
    return torch.maximum(torch.maximum(padded[..., :-2, 1:-1], padded[..., 2:, 1:-1]), torch.maximum(padded[..., 1:-1, :-2], padded[..., 1:-1, 2:]))


def _holding(largest: int) -> torch.dtype:
    """int32 where ``largest`` fits it, else int64."""
    return torch.int32 if largest <= torch.iinfo(torch.int32).max else torch.int64


def label_dtype(pixels: int) -> torch.dtype:
    """int32 where ids up to ``2 * pixels`` fit it (seeded ids, then unseeded ones after them),
    int64 for larger arrays (above about 1.07e9 pixels)."""
    return _holding(2 * pixels + 1)


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected components of a mask: ``(..., H, W)`` bool -> the same shape, int32 (int64 above
    about 1.07e9 pixels in all, :func:`label_dtype`), 0 outside the mask, each component labelled
    by 1 + the flat index of its last pixel (distinct over the batch, not consecutive)."""
    pixels = mask.numel()
    index = torch.arange(1, pixels + 1, device=mask.device, dtype=label_dtype(pixels)).view(mask.shape)
    labels = index * mask
    while True:
        before = labels
        for _ in range(STEPS_PER_CHECK):
            labels = torch.maximum(labels, _neighbour_max(labels)) * mask
            # a label names a pixel of the same component whose own label is at least as large:
            # taking it lets a large label cross a component in a few steps, not one pixel per step
            flat = labels.view(-1)
            labels = flat[(flat - 1).clamp_min(0)].view(mask.shape) * mask
        if torch.equal(labels, before):
            return labels


def _grow(labels: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Grow labelled regions breadth-first into unlabelled ``allowed`` pixels until none can grow
    (a pixel reached by several regions in the same step takes the largest id)."""
    steps = 1  # a band often adds nothing: the first check comes after one step
    while True:
        before = labels
        for _ in range(steps):
            labels = torch.where(allowed & (labels == 0), _neighbour_max(labels), labels)
        if torch.equal(labels, before):
            return labels
        steps = STEPS_PER_CHECK


def instance_labels_torch(probabilities: torch.Tensor, params: InstanceParams | None = None, levels: int = DEFAULT_LEVELS) -> torch.Tensor:
    """Nuclei of the body / contour / contact probabilities, on their device.

    Args:
        probabilities: ``(3, H, W)`` float16 or float32 in [0, 1] (body, contour, contact).
        params: thresholds and sizes (default: :class:`InstanceParams`'s; ``min_size`` is left to the caller, as in
            :func:`nucleibatch.instances.instance_labels`).
        levels: bands of the body probability that the seeds flood in turn (more: closer to a
            pixel-by-pixel watershed, more steps).

    Returns:
        ``(H, W)`` int32 on the same device (int64 above 2**31 pixels), 0 = background; ids
        1..N, in no documented order.
    """
    if probabilities.ndim != 3 or probabilities.shape[0] < 3:
        raise ValueError(f"expected (3, H, W) probabilities, got {tuple(probabilities.shape)}")
    return instance_labels_batch(probabilities[None], params, levels)[0]


def instance_labels_batch(probabilities: torch.Tensor, params: InstanceParams | None = None, levels: int = DEFAULT_LEVELS) -> torch.Tensor:
    """:func:`instance_labels_torch` of a batch of images in the same few kernel launches as one:
    ``(B, 3, H, W)`` -> ``(B, H, W)`` (int32; int64 above about 1.07e9 pixels in all). Each image's
    nuclei are those it would get alone (images of other sizes padded with zero probabilities:
    background); ids are distinct over the batch, 1..N in all."""
    if probabilities.ndim != 4 or probabilities.shape[1] < 3:
        raise ValueError(f"expected (B, 3, H, W) probabilities, got {tuple(probabilities.shape)}")
    params = params or InstanceParams()
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    probabilities = probabilities.contiguous()  # the steps below view the labels flat
    pixels = probabilities.shape[0] * probabilities.shape[2] * probabilities.shape[3]
    body, contour, contact = (probabilities[:, k].float() for k in range(3))
    mask = body > params.mask_threshold
    if not bool(mask.any()):
        return torch.zeros(mask.shape, dtype=_holding(pixels), device=probabilities.device)
    # float32, in the order of the NumPy version: the same seeds, bit for bit
    seed_mask = mask & ((1.0 - contour) * (1.0 - contact) * body > params.seed_threshold)
    seeds = connected_components(seed_mask)
    if params.min_seed_size > 1:
        sizes = torch.bincount(seeds.view(-1), minlength=pixels + 1)
        small = sizes < params.min_seed_size
        small[0] = False
        seeds = torch.where(small[seeds], 0, seeds)
    labels = seeds
    # bands from 1 down to the mask threshold, each flooded before the next; the last is the mask
    for level in range(1, levels + 1):
        edge = 1.0 - (1.0 - params.mask_threshold) * level / levels
        labels = _grow(labels, body > edge if level < levels else mask)
    unseeded = mask & (labels == 0)
    if bool(unseeded.any()):
        labels = torch.where(unseeded, connected_components(unseeded) + pixels, labels)  # ids apart from the seeds' ids
    # ids 1..N: select_owned's per-id sums then take N entries, not 2 * B * H * W
    present = torch.zeros(2 * pixels + 1, dtype=torch.bool, device=labels.device)
    present[labels.view(-1)] = True
    present[0] = False
    renumber = torch.cumsum(present, 0, dtype=_holding(pixels))  # ids 1..N: N nuclei <= pixels
    return renumber[labels]


def instance_labels_on(device: torch.device, probabilities: np.ndarray, params: InstanceParams | None = None, levels: int = DEFAULT_LEVELS) -> np.ndarray:
    """:func:`instance_labels_torch` of host probabilities ``(3, H, W)`` computed on ``device``;
    returns ``(H, W)`` int32 (int64 above 2**31 pixels) on the host."""
    with torch.inference_mode():
        labels = instance_labels_torch(torch.from_numpy(np.ascontiguousarray(probabilities[:3], dtype=probabilities.dtype.newbyteorder("="))).to(device), params, levels)
        return labels.cpu().numpy()
