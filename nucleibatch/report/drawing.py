"""The report's pure drawing: arrays in, arrays or text out (no file is read or written).

Display ranges and RGB views of store images, nucleus outlines and boxes drawn on them,
downsizing, the densest window of a set of points, inline SVG histograms and JPEG data URLs.
Training's validation overlays (:mod:`nucleibatch.training.overlays`) draw with the same
functions.
"""

from __future__ import annotations

import base64
import html
import io
import math
import threading
from collections.abc import Sequence

import numpy as np

OUTLINE_RGB = (57, 255, 20)  # neon green: visible on fluorescence (dark) and H&E (pink/purple)
BOX_RGB = (255, 0, 255)  # where the crop lies on the overview
JPEG_QUALITY = 85


def display_range(image: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.8), max_values: int = 1_000_000) -> tuple[float, float]:
    """Intensity range ``(low, high)`` to map to black / white: percentiles of the finite values.

    Args:
        image: any-shape real array (``(C, H, W)`` or ``(H, W)``); NaN / inf are ignored.
        percentiles: lower and upper percentile.
        max_values: at most this many values are looked at (an even stride).

    Returns:
        ``(low, high)`` with ``high > low`` (a constant image gives ``(v, v + 1)``).
    """
    flat = np.asarray(image).ravel()
    step = max(1, flat.size // max_values)
    sample = flat[::step].astype(np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(sample, percentiles))
    if not high > low:
        low, high = float(sample.min()), float(sample.max())
    if not high > low:
        high = low + 1.0
    return low, high


def to_display_rgb(image: np.ndarray, value_range: tuple[float, float], channel: int | None = None) -> np.ndarray:
    """An image of the store (``(C, H, W)``, any real dtype) as ``(H, W, 3)`` uint8 for the eye.

    Three or four channels (RGB / RGBA) are shown in colour, alpha dropped; otherwise one grey
    channel: ``channel`` if given and present, else the mean of the channels. ``value_range``
    (from :func:`display_range`) is stretched to 0..255, so 16-bit and float images show.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {image.shape}")
    n_channels = image.shape[0]
    if n_channels in (3, 4):
        planes = image[:3].astype(np.float32)
    elif channel is not None and 0 <= channel < n_channels:
        planes = image[channel : channel + 1].astype(np.float32)
    else:
        planes = image.astype(np.float32).mean(axis=0, keepdims=True)
    low, high = value_range
    scaled = (planes - low) * (255.0 / (high - low))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    rgb = np.clip(scaled, 0, 255).astype(np.uint8)
    if rgb.shape[0] == 1:
        rgb = np.repeat(rgb, 3, axis=0)
    return np.ascontiguousarray(np.moveaxis(rgb, 0, -1))


def channel_range(image: np.ndarray, channel: int | None = None) -> tuple[float, float]:
    """:func:`display_range` of the values :func:`to_display_rgb` shows (colour or one channel)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    n_channels = image.shape[0]
    if n_channels in (3, 4):
        return display_range(image[:3])
    if channel is not None and 0 <= channel < n_channels:
        return display_range(image[channel])
    step = max(1, int(math.sqrt(image[0].size / 250_000)))
    return display_range(image[:, ::step, ::step].astype(np.float32).mean(axis=0))


def draw_outlines(rgb: np.ndarray, labels: np.ndarray, colour: Sequence[int] = OUTLINE_RGB, alpha: float = 1.0) -> np.ndarray:
    """Nucleus outlines on an image: a copy of ``rgb`` ``(H, W, 3)`` uint8 whose pixels on the
    inner boundary of each label of ``labels`` ``(H, W)`` (0 = background) are ``colour``
    (``alpha`` < 1 blends it with the image)."""
    from skimage.segmentation import find_boundaries

    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {rgb.shape[:2]} differ in size")
    out = rgb.copy()
    if labels.any():
        edge = find_boundaries(labels, mode="inner")
        paint = np.asarray(colour, np.float32)
        out[edge] = np.round(alpha * paint + (1 - alpha) * out[edge].astype(np.float32)).astype(np.uint8)
    return out


def draw_box(rgb: np.ndarray, box: tuple[int, int, int, int], colour: Sequence[int] = BOX_RGB, width: int = 2) -> np.ndarray:
    """A copy of ``rgb`` ``(H, W, 3)`` with the rectangle ``box = (y0, y1, x0, x1)`` (half-open) drawn."""
    out = rgb.copy()
    height, width_px = out.shape[:2]
    y0, y1, x0, x1 = (int(v) for v in box)
    y0, x0 = max(0, y0), max(0, x0)
    y1, x1 = min(height, max(y1, y0 + 1)), min(width_px, max(x1, x0 + 1))
    if y0 >= height or x0 >= width_px:
        return out
    out[y0 : min(y1, y0 + width), x0:x1] = colour
    out[max(y0, y1 - width) : y1, x0:x1] = colour
    out[y0:y1, x0 : min(x1, x0 + width)] = colour
    out[y0:y1, max(x0, x1 - width) : x1] = colour
    return out


def shrink(rgb: np.ndarray, labels: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Reduce an image ``(H, W, 3)`` uint8 and its labels ``(H, W)`` by an integer factor until
    both sides are <= ``max_side``: box-averaged pixels, every factor-th label (nearest).

    Returns ``(rgb, labels, factor)`` (factor 1: unchanged).
    """
    factor = max(1, math.ceil(max(rgb.shape[:2]) / max_side))
    if factor == 1:
        return rgb, labels, 1
    from PIL import Image

    reduced = np.asarray(Image.fromarray(rgb).reduce(factor))
    small = labels[::factor, ::factor][: reduced.shape[0], : reduced.shape[1]]
    return reduced[: small.shape[0], : small.shape[1]], small, factor


def densest_window(points_yx: np.ndarray, shape: tuple[int, int], size: int, cells: int = 4) -> tuple[int, int]:
    """Top-left corner ``(y0, x0)`` of the ``size`` x ``size`` window of an image of ``shape``
    holding the most points (nucleus centroids), on a grid of ``size / cells`` px.

    The window lies inside the image (it is the whole image along a side shorter than ``size``);
    ties go to the first window in raster order, an empty set of points to the centre.
    """
    height, width = int(shape[0]), int(shape[1])
    if height <= size and width <= size:
        return 0, 0
    cell = max(1, size // cells)
    n_y, n_x = math.ceil(height / cell), math.ceil(width / cell)
    points = np.asarray(points_yx, dtype=np.float64).reshape(-1, 2)
    points = points[np.isfinite(points).all(axis=1)]
    if points.size == 0:
        return max(0, (height - size) // 2), max(0, (width - size) // 2)
    iy = np.clip((points[:, 0] // cell).astype(np.int64), 0, n_y - 1)
    ix = np.clip((points[:, 1] // cell).astype(np.int64), 0, n_x - 1)
    counts = np.zeros((n_y + 1, n_x + 1), np.int64)
    np.add.at(counts, (iy + 1, ix + 1), 1)
    integral = counts.cumsum(0).cumsum(1)
    wy, wx = min(cells, n_y), min(cells, n_x)
    sums = integral[wy:, wx:] - integral[:-wy, wx:] - integral[wy:, :-wx] + integral[:-wy, :-wx]
    by, bx = np.unravel_index(int(np.argmax(sums)), sums.shape)
    y0 = min(int(by) * cell, max(0, height - size))
    x0 = min(int(bx) * cell, max(0, width - size))
    return y0, x0


def histogram_svg(values: np.ndarray, title: str, bins: int = 40, value_range: tuple[float, float] | None = None, clip_percentiles: tuple[float, float] | None = None, integer: bool = False) -> str:
    """An inline SVG histogram of ``values`` (1-D, NaN ignored) with its count, median and range.

    ``value_range`` fixes the x range; else ``clip_percentiles`` (e.g. ``(0.5, 99.5)``) cuts
    the tails (their counts are said), else min..max. ``integer``: bins of whole units.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    w, h, left, bottom, top = 380, 190, 44, 30, 26
    parts = [f'<svg class="hist" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{html.escape(title)}">']
    parts.append(f'<text x="{w / 2}" y="15" text-anchor="middle" class="t">{html.escape(title)}</text>')
    if values.size == 0:
        parts.append(f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(parts)
    if value_range is not None:
        low, high = value_range
    elif clip_percentiles is not None:
        low, high = (float(v) for v in np.percentile(values, clip_percentiles))
    else:
        low, high = float(values.min()), float(values.max())
    if integer:
        low, high = math.floor(low), math.ceil(high)
        width_bin = max(1, math.ceil((high - low + 1) / bins))
        edges = np.arange(low, high + width_bin + 1, width_bin, dtype=np.float64) - 0.5
    else:
        if not high > low:
            high = low + 1.0
        edges = np.linspace(low, high, bins + 1)
    outside = int(np.sum((values < edges[0]) | (values > edges[-1])))
    counts, _ = np.histogram(values, bins=edges)
    peak = max(1, int(counts.max()))
    plot_w, plot_h = w - left - 10, h - bottom - top
    bar_w = plot_w / len(counts)
    for i, count in enumerate(counts):
        if count:
            bar_h = plot_h * count / peak
            parts.append(f'<rect x="{left + i * bar_w:.1f}" y="{top + plot_h - bar_h:.1f}" width="{max(bar_w - 1, 0.5):.1f}" height="{bar_h:.1f}"/>')
    base = top + plot_h
    parts.append(f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" class="a"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" class="a"/>')
    parts.append(f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{peak}</text>')
    parts.append(f'<text x="{left - 4}" y="{base}" text-anchor="end">0</text>')
    lo_text, hi_text = (format_number(edges[0] + (0.5 if integer else 0)), format_number(edges[-1] - (0.5 if integer else 0)))
    parts.append(f'<text x="{left}" y="{base + 14}">{lo_text}</text>')
    parts.append(f'<text x="{left + plot_w}" y="{base + 14}" text-anchor="end">{hi_text}</text>')
    note = f"n = {values.size:,}, median {format_number(float(np.median(values)))}"
    if outside:
        note += f", {outside:,} outside the range"
    parts.append(f'<text x="{left + plot_w / 2}" y="{base + 26}" text-anchor="middle" class="n">{html.escape(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def format_number(value: float) -> str:
    """A number as the report prints it: "–" when missing or not finite, thousands separated
    and no decimals from 1000 or for whole values, else three significant digits."""
    if value is None or not math.isfinite(value):
        return "–"
    if abs(value) >= 1000 or float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:.3g}"


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY, max_bytes: int | None = None) -> str:
    """``(H, W, 3)`` uint8 as a ``data:image/jpeg;base64,...`` URL (optimised Huffman tables, no
    chroma subsampling, so one-pixel coloured outlines stay sharp). With ``max_bytes``, lower
    qualities (down to 40) are tried until the JPEG fits."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(rgb))
    data = b""
    for q in [quality] + [q for q in (75, 65, 50, 40) if q < quality]:
        data = _jpeg_bytes(picture, q)
        if max_bytes is None or len(data) <= max_bytes:
            break
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


_PILLOW_BUFFER_LOCK = threading.Lock()


def _jpeg_bytes(picture, quality: int) -> bytes:
    from PIL import ImageFile

    buffer = io.BytesIO()
    # Pillow writes an optimised JPEG from one buffer of max(ImageFile.MAXBLOCK, a byte per pixel):
    # busier pictures (thousands of coloured outlines) failed with 'broken data stream'. Room for
    # any JPEG of the picture (at most its raw pixels plus headers); the lock keeps another thread
    # from lowering it mid-save.
    with _PILLOW_BUFFER_LOCK:
        ImageFile.MAXBLOCK = max(ImageFile.MAXBLOCK, 4 * picture.width * picture.height + (1 << 16))
        picture.save(buffer, "JPEG", quality=quality, subsampling=0, optimize=True)
    return buffer.getvalue()
