"""The network's input made on its device (torch): raw pixels go up as they were read (8 or 16
bits, a quarter or half of float32's bytes) and are normalised there, the twin of
:func:`nucleibatch.normalize.normalise_pixels` for the device path (``segment --instances-on device``).

Same values: 8- and 16-bit images go through the very tables that ``normalise_pixels`` indexes
(a gather on the device gives them bit for bit); haematoxylin input sums the same per-channel
tables in the same order, then the same float32 arithmetic. Any other image (float pixels, many
channels) is normalised on the host as before and its float32 result uploaded.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .normalize import (
    HAEMATOXYLIN_WEIGHTS,
    NormStats,
    _density_table,
    _lookup_table,
    normalise_pixels,
)

TABLE_DTYPES = (np.uint8, np.uint16)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without waiting for the device: on CUDA through pinned memory
    with a non-blocking copy (a copy from ordinary memory would wait for all the work queued
    there), the device ordering it before the kernels that read it."""
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def upload_pixels(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """Raw 8- or 16-bit pixels ``(h, w[, C])`` to ``device``, as read: uint8 as uint8, uint16 as
    int32 values 0..65535 (torch computes little on uint16; the bits go up as int16, half the
    bytes of int32, and are widened there), by :func:`to_device`."""
    if pixels.dtype not in TABLE_DTYPES:
        raise ValueError(f"only uint8 and uint16 pixels go up raw, not {pixels.dtype}")
    on_device = to_device(np.ascontiguousarray(pixels).view(np.int16) if pixels.dtype == np.uint16 else pixels, device)
    return on_device.to(torch.int32).bitwise_and_(0xFFFF) if pixels.dtype == np.uint16 else on_device


def on_device_normalisable(pixels: np.ndarray, stats: NormStats, channel: int | None) -> bool:
    """Whether :func:`network_input_on_device` normalises these pixels on the device (else on the host)."""
    if pixels.dtype not in TABLE_DTYPES or pixels.ndim not in (2, 3):
        return False
    n_channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if channel is not None and channel not in range(n_channels):
        return False  # the host path raises the message for it
    if stats.input == "haematoxylin":
        return pixels.ndim == 2 or (channel is None and n_channels >= 3)
    return stats.input == "grey" and (pixels.ndim == 2 or channel is not None or n_channels <= 4)


def network_input_on_device(pixels: np.ndarray, raw: torch.Tensor | None, stats: NormStats, channel: int | None, device: torch.device) -> torch.Tensor:
    """:func:`~nucleibatch.normalize.normalise_pixels` of raw pixels ``(h, w[, C])`` on ``device``:
    ``(h, w)`` float32 in [0, 1], equal to the host's result.

    Args:
        pixels: the raw pixels on the host.
        raw: the same pixels on ``device`` (:func:`upload_pixels`), or None where they are not
            there (pixels normalised on the host then, :func:`on_device_normalisable`).
    """
    if raw is None or not on_device_normalisable(pixels, stats, channel):
        return to_device(normalise_pixels(pixels, stats, channel), device)
    if stats.input == "grey":
        index, n_summed = _grey_index(raw, channel)
        return _table(pixels.dtype.str, n_summed, stats, device)[index]
    planes = [raw] if raw.ndim == 2 else [raw[:, :, c] for c in range(3)]
    weights = (1.0,) if raw.ndim == 2 else HAEMATOXYLIN_WEIGHTS
    density = None
    for plane, weight in zip(planes, weights, strict=True):
        term = _density_on(pixels.dtype.str, float(weight), device)[plane.long()]
        density = term if density is None else density.add_(term)
    return apply_stats_on_device(density, stats)


def grey_on_device(raw: torch.Tensor, channel: int | None) -> torch.Tensor:
    """:func:`~nucleibatch.normalize.to_grey` of raw pixels on the device (the intensity that
    nuclei are measured in): ``(h, w)`` float32, the same values."""
    if raw.ndim == 2:
        return raw.float()
    if channel is not None:
        return raw[:, :, channel].float()
    colour = raw[:, :, :3] if raw.shape[2] in (3, 4) else raw
    total = colour[:, :, 0].float()
    for c in range(1, colour.shape[2]):
        total.add_(colour[:, :, c])
    # a tensor divisor: CUDA divides by a host scalar through its reciprocal (another rounding)
    return total.div_(torch.full((), float(colour.shape[2]), dtype=torch.float32, device=raw.device))


def apply_stats_on_device(grey: torch.Tensor, stats: NormStats) -> torch.Tensor:
    """:func:`~nucleibatch.normalize.apply_stats` of a float32 tensor, in place: the same float32 steps."""
    low = torch.full((), np.float32(stats.low), dtype=torch.float32, device=grey.device)
    span = torch.full((), np.float32(stats.high - stats.low), dtype=torch.float32, device=grey.device)
    out = grey.sub_(low).div_(span)
    torch.nan_to_num_(out, nan=0.0, posinf=1.0, neginf=0.0)
    out.clamp_(0.0, 1.0)
    if stats.invert:
        out = torch.sub(1.0, out, out=out)
    return out


def _grey_index(raw: torch.Tensor, channel: int | None) -> tuple[torch.Tensor, int]:
    """What :func:`~nucleibatch.normalize.normalise_pixels` indexes its table with: the plane, or the
    integer sum of the colour channels; and how many channels were summed."""
    if raw.ndim == 2:
        return raw.long(), 1
    if channel is not None:
        return raw[:, :, channel].long(), 1
    colour = raw[:, :, :3] if raw.shape[2] in (3, 4) else raw
    return colour.long().sum(dim=2), colour.shape[2]


@functools.lru_cache(maxsize=16)
def _table(dtype: str, channels: int, stats: NormStats, device: torch.device) -> torch.Tensor:
    return to_device(_lookup_table(dtype, channels, stats), device)


@functools.lru_cache(maxsize=8)
def _density_on(dtype: str, weight: float, device: torch.device) -> torch.Tensor:
    return to_device(_density_table(dtype, weight), device)
