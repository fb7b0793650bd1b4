"""Intensity normalisation shared by training and inference (pure array functions).

The model sees one channel in [0, 1] with nuclei bright on a dark background: the grey of the
image (``input: "grey"``, fluorescence and unstained brightfield) or its haematoxylin density
by colour deconvolution (``input: "haematoxylin"``, H&E and other stained brightfield).
Statistics (percentiles, inversion) are computed ONCE per image and applied to every tile, so
that tiles of one image agree and leave no seams.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np

from .errors import ImageReadError, UsageError

INVERT_MODES = ("auto", "never", "always")
# what the network's one input channel is made of (a bundle's normalization["input"])
INPUTS = ("grey", "haematoxylin")
# haematoxylin's row of the colour deconvolution of Ruifrok & Johnston (scikit-image's
# hed_from_rgb[:, 0]): density = sum over R, G, B of optical density x weight
HAEMATOXYLIN_WEIGHTS = (1.87798274, -0.06590806, -0.60190736)
# Percentiles are computed on at most this many pixels (a regular subsample):
# enough for stable percentiles, and cheap for a whole slide's low-resolution level.
MAX_STATS_PIXELS = 4_000_000


@dataclass(frozen=True)
class NormStats:
    """Per-image normalisation: ``x -> clip((x - low) / (high - low), 0, 1)``, then ``1 - x`` if invert."""

    low: float
    high: float
    invert: bool
    input: str = "grey"  # see INPUTS: how raw pixels become the channel these statistics apply to

    def to_dict(self) -> dict:
        return asdict(self)


def check_input(name: str) -> str:
    """``name`` if it is one of :data:`INPUTS`, else :class:`UsageError` listing them."""
    if name not in INPUTS:
        raise UsageError(f"unknown network input {name!r}; valid: {', '.join(INPUTS)}")
    return name


def network_channel(image: np.ndarray, channel: int | None = None, input: str = "grey") -> np.ndarray:
    """The one channel a network reads, before normalisation: ``(H, W[, C])`` -> ``(H, W)`` float32.

    ``input="grey"``: :func:`to_grey`. ``input="haematoxylin"``: :func:`haematoxylin_density` of
    the RGB channels (of the ``channel`` plane alone when one is picked, or of a single-channel
    image: its optical density).
    """
    if check_input(input) == "grey":
        return to_grey(image, channel)
    if image.ndim == 3 and channel is None and image.shape[2] >= 3:
        return haematoxylin_density(image)
    return haematoxylin_density(to_grey(image, channel) if image.ndim == 3 else image)


def haematoxylin_density(image: np.ndarray) -> np.ndarray:
    """Haematoxylin density of a brightfield image by colour deconvolution (Ruifrok & Johnston,
    scikit-image's ``rgb2hed``), up to a constant: nuclei high, background and eosin low.

    Args:
        image: ``(H, W, C)`` with C >= 3 (R, G, B first; alpha ignored) or ``(H, W)`` (one
            transmitted-light channel: its optical density), any real dtype.

    Returns:
        ``(H, W)`` float32: ``sum_c -log(x_c + e) * w_c`` with ``w`` = :data:`HAEMATOXYLIN_WEIGHTS`
        (one weight of 1 for a single channel), ``e`` = 1 for integer images and 1/256 for float
        ones (read as [0, 1]). Percentile normalisation is affine, so the offset that raw units
        add to every optical density (``log`` of the full scale) drops out.
    """
    planes = [image] if image.ndim == 2 else [image[:, :, c] for c in range(3)]
    weights = (1.0,) if image.ndim == 2 else HAEMATOXYLIN_WEIGHTS
    total = None
    for plane, weight in zip(planes, weights, strict=True):
        term = _density_term(plane, weight)
        total = term if total is None else np.add(total, term, out=total)
    return total


def _density_term(plane: np.ndarray, weight: float) -> np.ndarray:
    """``-log(plane + e) * weight`` as float32 (a table of every value for 8/16-bit planes)."""
    if plane.dtype in (np.uint8, np.uint16):
        return _density_table(plane.dtype.str, float(weight))[plane]
    offset = np.float32(1.0) if np.issubdtype(plane.dtype, np.integer) else np.float32(1.0 / 256.0)
    values = np.maximum(plane.astype(np.float32), np.float32(0.0))
    values += offset
    np.log(values, out=values)
    values *= np.float32(-weight)
    return values


@functools.lru_cache(maxsize=16)
def _density_table(dtype: str, weight: float) -> np.ndarray:
    values = np.arange(np.iinfo(np.dtype(dtype)).max + 1, dtype=np.float32) + np.float32(1.0)
    np.log(values, out=values)
    values *= np.float32(-weight)
    return values


def to_grey(image: np.ndarray, channel: int | None = None) -> np.ndarray:
    """Reduce an image to the one channel the model reads.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array of any real dtype. RGBA alpha is ignored.
        channel: index of the nuclear-stain channel; ``None`` averages the colour
            channels (the first three of RGB/RGBA, all of them otherwise).

    Returns:
        ``(H, W)`` float32 array in the input's intensity units; float64 for 64-bit pixels
        (float64, int64, uint64), whose variation may lie below float32's resolution at their
        level (1e9 + small signal): :func:`apply_stats` subtracts the low level in float64.
    """
    if image.dtype.itemsize == 8 and image.dtype.kind in "fiu":
        return _grey_of(image, channel, np.float64)
    return _grey_of(image, channel, np.float32)


def _grey_of(image: np.ndarray, channel: int | None, dtype: type) -> np.ndarray:
    if image.ndim == 2:
        if channel not in (None, 0):
            raise UsageError(f"--channel {channel} asked for, but the image has a single channel; drop --channel")
        return image.astype(dtype, copy=False)
    if image.ndim != 3:
        raise ImageReadError(f"expected a 2-D image (H, W) or (H, W, C), got shape {image.shape}")
    n_channels = image.shape[2]
    if channel is not None:
        if not 0 <= channel < n_channels:
            raise UsageError(f"--channel {channel} is out of range: the image has {n_channels} channels (0..{n_channels - 1})")
        return image[:, :, channel].astype(dtype)
    colour = image[:, :, :3] if n_channels in (3, 4) else image
    # the channels' mean, summed plane by plane: bit-identical to mean(axis=2) in float32 (which
    # adds them in the same order), without its strided reduction over the last axis
    total = colour[:, :, 0].astype(dtype)
    for c in range(1, colour.shape[2]):
        np.add(total, colour[:, :, c], out=total, dtype=dtype)
    total /= dtype(colour.shape[2])
    return total


def compute_stats(
    grey: np.ndarray,
    percentiles: tuple[float, float] = (1.0, 99.8),
    invert: str = "auto",
    input: str = "grey",
) -> NormStats:
    """Normalisation statistics of one whole image (or of its low-resolution level).

    Args:
        grey: ``(H, W)`` float array (output of :func:`network_channel`); NaN/inf are ignored.
        percentiles: lower and upper percentile mapped to 0 and 1.
        invert: ``"auto"`` inverts when the background is bright (brightfield, H&E),
            i.e. when the median lies in the upper half of the percentile range;
            ``"never"`` / ``"always"`` force it.
        input: what ``grey`` was made of (recorded in the statistics).

    Returns:
        :class:`NormStats`.
    """
    if invert not in INVERT_MODES:
        raise UsageError(f"invert must be one of {INVERT_MODES}, got {invert!r}")
    step = max(1, int(np.ceil(np.sqrt(grey.size / MAX_STATS_PIXELS))))
    sample = np.asarray(grey[::step, ::step], dtype=np.float64 if grey.dtype == np.float64 else np.float32).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        raise ImageReadError("the image has no finite pixel values (all NaN or inf)")
    low, high, median = np.percentile(sample, [percentiles[0], percentiles[1], 50.0])
    if high <= low:  # flat image: any positive range maps it to a constant
        high = low + 1.0
    if invert == "auto":
        size = max(abs(low), abs(high), 1.0)  # float64 values up to 1.8e308: their differences must not overflow
        do_invert = bool((median / size - low / size) / (high / size - low / size) > 0.5)
    else:
        do_invert = invert == "always"
    return NormStats(float(low), float(high), do_invert, check_input(input))


def stats_for_bundle(image: np.ndarray, normalization: dict, invert: str | None = None, channel: int | None = None) -> NormStats:
    """:func:`compute_stats` of an image's :func:`network_channel` with a bundle's ``normalization``
    settings (``input``, ``percentiles``, ``invert``; ``invert`` given here overrides the bundle's).

    The one place training, ``segment`` and ``evaluate`` read those settings, so all three
    normalise alike.

    Args:
        image: ``(H, W[, C])`` the raw image or its overview, any real dtype.
    """
    percentiles = tuple(normalization.get("percentiles", (1.0, 99.8)))
    input = normalization.get("input", "grey")
    return compute_stats(network_channel(image, channel, input), percentiles, invert or normalization.get("invert", "auto"), input)


def apply_stats(grey: np.ndarray, stats: NormStats) -> np.ndarray:
    """Normalise a tile (or a whole image) with precomputed statistics.

    Args:
        grey: ``(H, W)`` float array in the image's intensity units.
        stats: from :func:`compute_stats` on the whole image.

    Returns:
        ``(H, W)`` float32 in [0, 1], nuclei bright. Non-finite pixels become 0.
    """
    if grey.dtype == np.float64:  # 64-bit pixels: their level off in float64, the small rest in float32
        size = max(abs(stats.low), abs(stats.high), 1.0)  # over it, a range up to 1.8e308 cannot overflow
        out = np.subtract(grey / size, stats.low / size).astype(np.float32)
        out /= np.float32(stats.high / size - stats.low / size)
        return _finish_normalised(out, stats)
    out = np.subtract(grey, np.float32(stats.low), dtype=np.float32)  # the one new array; the rest in place
    out /= np.float32(stats.high - stats.low)
    return _finish_normalised(out, stats)


def _finish_normalised(out: np.ndarray, stats: NormStats) -> np.ndarray:
    """:func:`apply_stats`'s last steps, in place: non-finite to 0 (or 1), clip, invert."""
    np.nan_to_num(out, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    np.clip(out, 0.0, 1.0, out=out)
    if stats.invert:
        np.subtract(np.float32(1.0), out, out=out)
    return out


def normalise_pixels(image: np.ndarray, stats: NormStats, channel: int | None = None) -> np.ndarray:
    """``apply_stats(network_channel(image, channel, stats.input), stats)``, bit for bit, for an
    image read from a file: ``(H, W)`` or ``(H, W, C)`` -> ``(H, W)`` float32 in [0, 1].

    For the grey input, 8- and 16-bit unsigned images go through a table of every value's result
    (3x fewer passes over a block): the grey of an integer image is an integer (one channel) or
    a sum of integers divided by the channel count, so the table holds exactly what the
    arithmetic gives.
    """
    if stats.input != "grey":
        return apply_stats(network_channel(image, channel, stats.input), stats)
    if (
        image.dtype not in (np.uint8, np.uint16)
        or image.ndim not in (2, 3)
        or (image.ndim == 3 and image.shape[2] > 4)  # many channels: a table per sum would be large
        or (channel is not None and channel not in range(1 if image.ndim == 2 else image.shape[2]))  # to_grey's error
    ):
        return apply_stats(to_grey(image, channel), stats)
    if image.ndim == 2 or channel is not None:
        plane = image if image.ndim == 2 else image[:, :, channel]
        return _lookup_table(image.dtype.str, 1, stats)[plane]
    colour = image[:, :, :3] if image.shape[2] in (3, 4) else image
    total = colour[:, :, 0].astype(np.uint32 if image.dtype == np.uint16 else np.uint16)
    for c in range(1, colour.shape[2]):
        total += colour[:, :, c]
    return _lookup_table(image.dtype.str, colour.shape[2], stats)[total]


@functools.lru_cache(maxsize=64)
def _lookup_table(dtype: str, channels: int, stats: NormStats) -> np.ndarray:
    """What :func:`apply_stats` gives for a grey of ``sum / channels``, for every sum of
    ``channels`` values of ``dtype``: ``(channels * max + 1,)`` float32."""
    sums = np.arange(channels * np.iinfo(np.dtype(dtype)).max + 1, dtype=np.float32)
    if channels > 1:
        sums /= np.float32(channels)
    return apply_stats(sums, stats)


def normalise_image(image: np.ndarray, channel: int | None = None, percentiles=(1.0, 99.8), invert: str = "auto") -> tuple[np.ndarray, NormStats]:
    """Grey + statistics + normalisation of an in-memory image: ``(H, W[, C]) -> (H, W) float32``."""
    grey = to_grey(image, channel)
    stats = compute_stats(grey, percentiles, invert)
    return apply_stats(grey, stats), stats
