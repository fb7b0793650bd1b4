"""Resampling for the network on its device (torch): the twins of
:func:`nucleibatch.scale.to_network_scale` and :func:`~nucleibatch.scale.from_network_scale`, so
that an image whose scale asks for it is resampled where it is normalised, predicted and
labelled (``segment --instances-on device``).

Same sample positions and weights (computed on the host, as there, and copied up without
waiting for the device), the same float32 interpolation; the smoothing sums its taps in float64,
as ``scipy.ndimage`` does (in another order: a float32 result could differ in its last bit).
"""

from __future__ import annotations

import numpy as np
import torch

from .normalize_torch import to_device
from .scale import _shrink_sigma, scaled_shape

TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default reach, in sigmas


def to_network_scale_on_device(image: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`~nucleibatch.scale.to_network_scale` of ``(H, W)`` float32 on its device: ``(h, w)`` float32."""
    if scale == 1.0:
        return image
    shape = scaled_shape(tuple(image.shape), scale)
    out = image.float()
    if scale < 1.0:
        out = gaussian_on_device(out, _shrink_sigma(1.0 / scale))
    for axis, size in enumerate(shape):
        out = _interpolate(out, axis, (np.arange(size) + 0.5) / scale - 0.5)
    return out


def from_network_scale_on_device(array: torch.Tensor, scale: float, origin: tuple[int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
    """:func:`~nucleibatch.scale.from_network_scale` of ``(K, h', w')`` on its device:
    ``(K, y1 - y0, x1 - x0)`` in the dtype of ``array``."""
    y0, y1, x0, x1 = box
    out = array.float()
    if scale > 1.0:
        out = gaussian_on_device(out, _shrink_sigma(scale))
    out = _interpolate(out, 1, (np.arange(y0, y1) + 0.5) * scale - 0.5 - origin[0])
    out = _interpolate(out, 2, (np.arange(x0, x1) + 0.5) * scale - 0.5 - origin[1])
    return out.to(array.dtype)


def gaussian_on_device(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(image, sigma, mode="nearest")`` over the last two axes of
    ``(..., H, W)`` float32 (the others not smoothed): each axis in turn, its taps summed in
    float64, rounded to float32 after each axis."""
    radius = int(TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (sigma * sigma) * offsets**2)
    weights = weights / weights.sum()
    out = image
    for axis in (out.ndim - 2, out.ndim - 1):
        size = out.shape[axis]
        wide = out.double()
        total = torch.zeros_like(wide)
        for offset, weight in zip(offsets, weights, strict=True):
            index = torch.clamp(torch.arange(size, device=out.device) + int(offset), 0, size - 1)  # mode "nearest", made there
            total += float(weight) * wide.index_select(axis, index)
        out = total.float()
    return out


def _interpolate(array: torch.Tensor, axis: int, positions: np.ndarray) -> torch.Tensor:
    """:func:`nucleibatch.scale._interpolate` on the device: linear along ``axis`` at ``positions``
    (edge values beyond the ends), float32."""
    size = array.shape[axis]
    positions = np.clip(positions, 0.0, size - 1)
    below = np.floor(positions).astype(np.int64)
    above = np.minimum(below + 1, size - 1)
    shape = [1] * array.ndim
    shape[axis] = -1
    weight = to_device((positions - below).astype(np.float32), array.device).reshape(shape)
    low = array.index_select(axis, to_device(below, array.device))
    high = array.index_select(axis, to_device(above, array.device))
    low *= 1.0 - weight
    high *= weight
    return low.add_(high)
