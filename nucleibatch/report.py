"""QC report of a segment output: ``OUT/report.html``, built from OUT alone.

One self-contained HTML file (images as base64 JPEG, histograms as inline SVG, no external
resource: it opens offline and can be mailed) with

* the run summary: images ok / failed, nuclei, wall time, MPix/s, model, engine, device, date;
* a gallery of nucleus outlines drawn on up to :data:`GALLERY_SIZE` images picked
  deterministically (by a hash of ``image_id``, so a resumed run shows the same ones); an image
  larger than :data:`OVERVIEW_SIDE` is shown as its lowest pyramid level that fits plus a
  full-resolution crop of :data:`CROP_SIDE` px around its densest area;
* the images with the fewest and the most nuclei (thumbnails);
* histograms of area, mean intensity and eccentricity (at most :data:`MAX_HISTOGRAM_ROWS`
  nuclei, an even stride over ``nuclei.parquet``) and of nuclei per image;
* the failed images with their reasons.

Cost does not grow with the images' size (only one pyramid level <= 1024 px and one crop are
read per shown image) nor much with their number (a few dozen images are read; the tables are
streamed). :func:`write_report` raises only when OUT is not a segment output
(:class:`NotSegmentOutputError`); a section whose data is missing or damaged says so in the
report instead.

Layout: pure drawing functions (arrays in, arrays or text out) first, then the readers of OUT,
then the HTML assembly.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import NotSegmentOutputError  # noqa: F401  (raised through check_segment_output; the CLI maps it to exit 2)
from .io.location import Location, is_remote, open_binary
from .output.atomic import write_bytes_atomic
from .output.folder import IMAGES, MASKS, NUCLEI, REPORT, RUN, label_path
from .output.reader import (
    nuclei_files,
    open_masks,
    read_image_nuclei,
    read_images_with_records,
    read_run,
)
from .output.tables import check_segment_output

log = logging.getLogger(__name__)

REPORT_NAME = REPORT
GALLERY_SIZE = 12
EXTREMES = 3  # images with the fewest / the most nuclei
OVERVIEW_SIDE = 1024  # the overview is the lowest pyramid level whose sides are <= this
DISPLAY_SIDE = 768  # ... shown at most this large (outlines are drawn at the shown size)
CROP_SIDE = 512  # full-resolution crop of a large image
THUMB_SIDE = 160
MAX_HISTOGRAM_ROWS = 1_000_000
MAX_FAILED_ROWS = 200
OUTLINE_RGB = (57, 255, 20)  # neon green: visible on fluorescence (dark) and H&E (pink/purple)
BOX_RGB = (255, 0, 255)  # where the crop lies on the overview
JPEG_QUALITY = 85
# bytes of JPEG per picture (lower quality is used until it fits): 12 gallery images with crops
# and the thumbnails stay under ~5 MB of HTML whatever the images
OVERVIEW_BYTES, CROP_BYTES, THUMB_BYTES = 160_000, 120_000, 16_000
OVERVIEW_ALPHA = 0.6  # outlines on a downsampled view are blended, or small nuclei vanish under them
NUCLEI_COLUMNS_USED = ("area", "mean_intensity", "eccentricity")


# --------------------------------------------------------------------------- pure: arrays


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


def sample_ids(image_ids: Iterable[str], k: int) -> list[str]:
    """``k`` ids picked deterministically (smallest sha1 of the id), returned sorted: the same
    images whatever order the table is in and whichever other images a run adds."""
    ranked = sorted(set(image_ids), key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    return sorted(ranked[:k])


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
    lo_text, hi_text = (_number(edges[0] + (0.5 if integer else 0)), _number(edges[-1] - (0.5 if integer else 0)))
    parts.append(f'<text x="{left}" y="{base + 14}">{lo_text}</text>')
    parts.append(f'<text x="{left + plot_w}" y="{base + 14}" text-anchor="end">{hi_text}</text>')
    note = f"n = {values.size:,}, median {_number(float(np.median(values)))}"
    if outside:
        note += f", {outside:,} outside the range"
    parts.append(f'<text x="{left + plot_w / 2}" y="{base + 26}" text-anchor="middle" class="n">{html.escape(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _number(value: float) -> str:
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


# --------------------------------------------------------------------------- reading OUT


@dataclass
class View:
    """One rendered picture of an image: a data URL and what it shows."""

    url: str
    caption: str
    width: int
    height: int
    box: tuple[int, int, int, int] | None = None  # full-resolution (y0, y1, x0, x1) of a crop


@dataclass
class ImageViews:
    """The pictures of one image in the report (or why there are none)."""

    image_id: str
    views: list[View] = field(default_factory=list)
    note: str = ""


def sample_nuclei(out: Location, columns: Sequence[str] = NUCLEI_COLUMNS_USED, max_rows: int = MAX_HISTOGRAM_ROWS) -> tuple[dict[str, np.ndarray], int, list[str]]:
    """Columns of ``nuclei.parquet`` for at most ``max_rows`` nuclei (every k-th row), streamed
    in batches so memory stays bounded however many nuclei there are.

    Returns ``({column: float64 array}, total rows, problems)``; unreadable parts are skipped
    and named in ``problems``.
    """
    import pyarrow.parquet as pq

    problems: list[str] = []
    files = []
    total = 0
    for path in nuclei_files(out):
        try:
            handle = pq.ParquetFile(open_binary(path))
            files.append((path, handle))
            total += handle.metadata.num_rows
        except Exception as error:
            problems.append(f"{path.name}: {error}")
    stride = max(1, math.ceil(total / max_rows)) if max_rows > 0 else 1
    chunks: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    position = 0  # rows seen so far: every stride-th row of the whole table is kept
    for path, handle in files:
        present = [c for c in columns if c in handle.schema_arrow.names]
        if not present:
            problems.append(f"{path.name}: none of the columns {', '.join(columns)}")
            continue
        try:
            for batch in handle.iter_batches(batch_size=262_144, columns=present):
                start = (-position) % stride
                for c in columns:
                    if c in present:
                        values = batch.column(present.index(c)).to_numpy(zero_copy_only=False)
                        chunks[c].append(np.asarray(values[start::stride], dtype=np.float64))
                position += batch.num_rows
        except Exception as error:
            problems.append(f"{path.name}: {error}")
    data = {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in chunks.items()}
    return data, total, problems


def _centroids(out: Location, store_path: str, image_id: str) -> np.ndarray | None:
    """``(N, 2)`` centroids of one image from its nuclei rows (None if they cannot be read)."""
    try:
        table = read_image_nuclei(out, image_id, ["image_id", "centroid_y", "centroid_x"])
    except Exception:
        return None
    return table[["centroid_y", "centroid_x"]].to_numpy(dtype=np.float64)


def _levels(group) -> list[str]:
    """Paths of the group's pyramid levels, full resolution first (from the OME metadata, else probed)."""
    try:
        ome = group.attrs.asdict().get("ome") or group.attrs.asdict()
        paths = [d["path"] for d in ome["multiscales"][0]["datasets"]]
        if paths:
            return [str(p) for p in paths]
    except Exception:
        pass
    paths, level = [], 0
    while str(level) in group:
        paths.append(str(level))
        level += 1
    return paths


def _array(group, path: str):
    try:
        return group[path]
    except Exception:
        return None


def _image_present(array, store_image: bool) -> bool:
    """Whether the image copy was written (``--no-store-image`` leaves an empty array)."""
    if array is None or not store_image:
        return False
    try:
        return int(array.nchunks_initialized) > 0
    except Exception:
        return True


def _pick_level(shapes: list[tuple[int, ...]], max_side: int) -> int:
    for index, shape in enumerate(shapes):
        if max(shape[-2:]) <= max_side:
            return index
    return len(shapes) - 1


def render_image(root, out: Location, row: dict[str, Any], channel: int | None, store_image: bool, max_side: int = DISPLAY_SIDE, crop: bool = True) -> ImageViews:
    """Pictures of one image of the store: the overview (outlines on the lowest pyramid level
    <= :data:`OVERVIEW_SIDE`, shown at most ``max_side``) and, if ``crop`` and the image is
    larger than that level, a :data:`CROP_SIDE` full-resolution crop around its densest area.

    Reads one pyramid level and one crop: memory does not depend on the image's size.
    """
    image_id, store_path = str(row["image_id"]), row.get("store_path")
    result = ImageViews(image_id)
    if not store_path or store_path not in root:
        result.note = f"not in {MASKS}"
        return result
    group = root[store_path]
    paths = _levels(group)
    label_arrays = [_array(group, label_path(p)) for p in paths]
    usable = [(p, a) for p, a in zip(paths, label_arrays, strict=True) if a is not None]
    if not usable:
        result.note = f"no labels in {MASKS}"
        return result
    full_shape = tuple(usable[0][1].shape)
    index = _pick_level([a.shape for _, a in usable], OVERVIEW_SIDE)
    path, labels_array = usable[index]
    factor = 2 ** int(path) if path.isdigit() else 1
    # a level still larger than OVERVIEW_SIDE (a partial pyramid) is read with a stride
    stride = max(1, math.ceil(max(labels_array.shape) / OVERVIEW_SIDE))
    labels = np.asarray(labels_array[::stride, ::stride])
    image_array = _array(group, path)
    has_image = _image_present(image_array, store_image)
    if has_image:
        pixels = np.asarray(image_array[:, ::stride, ::stride])
        value_range = channel_range(pixels, channel)
        rgb = to_display_rgb(pixels, value_range, channel)
    else:
        value_range = None
        rgb = np.full(labels.shape + (3,), 24, np.uint8)
        result.note = "image not stored (--no-store-image): outlines on black"
    rgb, labels, reduce_factor = shrink(rgb, labels, max_side)
    scale = factor * stride * reduce_factor  # full-resolution pixels per shown pixel
    overview = draw_outlines(rgb, labels, alpha=1.0 if scale == 1 else OVERVIEW_ALPHA)
    box = None
    needs_crop = crop and max(full_shape) > OVERVIEW_SIDE
    if needs_crop:
        points = _centroids(out, store_path, image_id)
        if points is None or len(points) == 0:
            points = np.argwhere(labels > 0).astype(np.float64) * scale  # foreground instead of centroids
        y0, x0 = densest_window(points, full_shape, CROP_SIDE)
        box = (y0, min(full_shape[0], y0 + CROP_SIDE), x0, min(full_shape[1], x0 + CROP_SIDE))
        overview = draw_box(overview, tuple(int(round(v / scale)) for v in box), width=3 if max(overview.shape) > 400 else 2)
    size = f"{full_shape[0]}x{full_shape[1]}"
    caption = f"{size} px" if scale == 1 else f"{size} px, shown 1:{scale} (pyramid level {path})"
    budget = OVERVIEW_BYTES if max_side > THUMB_SIDE else THUMB_BYTES
    result.views.append(View(encode_jpeg(overview, max_bytes=budget), caption, overview.shape[1], overview.shape[0]))
    if box is not None:
        y0, y1, x0, x1 = box
        crop_labels = np.asarray(usable[0][1][y0:y1, x0:x1])
        level0 = _array(group, usable[0][0])
        if has_image and level0 is not None:
            crop_rgb = to_display_rgb(np.asarray(level0[:, y0:y1, x0:x1]), value_range, channel)
        else:
            crop_rgb = np.full(crop_labels.shape + (3,), 24, np.uint8)
        crop_view = draw_outlines(crop_rgb, crop_labels)
        caption = f"full resolution, y {y0}:{y1}, x {x0}:{x1} (densest area)"
        result.views.append(View(encode_jpeg(crop_view, max_bytes=CROP_BYTES), caption, crop_view.shape[1], crop_view.shape[0], box))
    return result


# --------------------------------------------------------------------------- HTML


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1240px;padding:16px 24px;color:#1d232a;background:#fafbfc}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.15em;margin:1.6em 0 .5em;border-bottom:1px solid #d5dbe1;padding-bottom:.2em}
nav a{margin-right:1em}table{border-collapse:collapse;font-size:.9em}td,th{padding:3px 10px;border-bottom:1px solid #e3e7eb;text-align:left;vertical-align:top}
th{background:#eef1f4}.kv td:first-child{color:#56606b}.num{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#b00020;font-weight:600}.ok{color:#137333;font-weight:600}.muted{color:#6a737d;font-size:.85em}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #d5dbe1;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:1.45em}.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #d5dbe1;border-radius:6px;padding:8px}figure img{max-width:100%;height:auto;display:block}.gallery img{width:100%}img.px{image-rendering:pixelated}
figcaption{font-size:.8em;color:#454e57;overflow-wrap:anywhere;margin-top:4px}.pair{display:flex;gap:6px;flex-wrap:wrap}.pair img{width:calc(50% - 3px)}figure.wide{grid-column:span 2}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}.thumbs figure{width:180px}.hists{display:flex;flex-wrap:wrap;gap:14px}
svg.hist{background:#fff;border:1px solid #d5dbe1;border-radius:6px;font-size:10px}svg.hist rect{fill:#3b6fb6}svg.hist .a{stroke:#444}svg.hist .t{font-size:12px;font-weight:600}
svg.hist .n{fill:#56606b}code{font-size:.9em}details{margin:.5em 0}
"""

# Records script errors and failed image loads, and once loaded how many images decoded, on
# <body data-...>: a headless browser (tests) reads them from the DOM; a person never sees them.
_SCRIPT = """
(function(){var errors=[];
window.addEventListener('error',function(e){var t=e.target;errors.push(t&&t.tagName?('failed to load '+t.tagName+(t.alt?' '+t.alt:'')):String(e.message));},true);
window.addEventListener('load',function(){var all=document.querySelectorAll('img'),decoded=0,gallery=0,galleryDecoded=0;
for(var i=0;i<all.length;i++){var ok=all[i].complete&&all[i].naturalWidth>0;if(ok)decoded++;if(all[i].closest('.gallery')){gallery++;if(ok)galleryDecoded++;}}
var b=document.body;b.setAttribute('data-images',all.length);b.setAttribute('data-images-decoded',decoded);
b.setAttribute('data-gallery-images',gallery);b.setAttribute('data-gallery-decoded',galleryDecoded);
b.setAttribute('data-errors',errors.join(' | '));b.setAttribute('data-report-loaded','1');});})();
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt_seconds(seconds: Any) -> str:
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(seconds):
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _guarded(anchor: str, title: str, build, *args) -> str:
    """A section, or a note saying why it could not be built (the report is still written)."""
    try:
        return _section(anchor, title, build(*args))
    except Exception as error:
        log.warning("report: section %r failed: %s", title, error, exc_info=True)
        return _section(anchor, title, f'<p class="bad">this section could not be built: {_e(type(error).__name__)}: {_e(error)}</p>')


def _summary_html(out: Location, run: dict[str, Any], images) -> str:
    n_ok = int((images["status"] == "ok").sum())
    n_failed = len(images) - n_ok
    n_nuclei = int(images.loc[images["status"] == "ok", "n_nuclei"].sum())
    model = run.get("model") or {}
    sha = str(model.get("sha256") or "")
    cards = [
        ("images", f"{len(images):,}"),
        ("ok", f'<span class="ok">{n_ok:,}</span>'),
        ("failed", f'<span class="{"bad" if n_failed else "ok"}">{n_failed:,}</span>'),
        ("nuclei", f"{n_nuclei:,}"),
        ("wall time", _fmt_seconds(run.get("wall_seconds"))),
        ("MPix/s", _number(run["mpix_per_s"]) if isinstance(run.get("mpix_per_s"), (int, float)) else "–"),
    ]
    body = ['<div class="cards" id="summary-cards">']
    for name, value in cards:
        body.append(f'<div class="card" data-name="{_e(name)}"><b>{value}</b>{_e(name)}</div>')
    body.append("</div>")
    settings = run.get("settings") or {}
    megapixels = float((images.loc[images["status"] == "ok", "height"] * images.loc[images["status"] == "ok", "width"]).sum()) / 1e6
    rows = [
        ("output", _e(out if is_remote(out) else out.resolve())),
        ("model", f"{_e(model.get('name') or '–')} <code>sha256 {_e(sha[:12]) or '–'}</code>"),
        *(
            (f"model {_e(entry.get('name'))}", f"{_e(', '.join(entry.get('serves') or []) or 'every image')}: {int(entry.get('images') or 0):,} images <code>sha256 {_e(str(entry.get('sha256') or '')[:12])}</code>")
            for entry in (run.get("models") or [])
            if len(run.get("models") or []) > 1
        ),
        ("engine / device", f"{_e(run.get('engine') or '–')} / {_e(run.get('device') or '–')}"),
        ("started", _e(run.get("started") or "–")),
        ("megapixels (ok images)", f"{megapixels:,.2f}"),
        ("nucleibatch", _e(run.get("nucleibatch_version") or "–")),
        ("settings", _e(", ".join(f"{k}={v}" for k, v in settings.items())) or "–"),
        ("inputs", _e(" ".join(str(i) for i in run.get("inputs") or [])) or "–"),
    ]
    if not run:
        rows.insert(0, (RUN, '<span class="bad">missing or unreadable: the run may still be going or was stopped</span>'))
    counts = run.get("counts") or {}
    if counts and (counts.get("images"), counts.get("ok")) != (len(images), n_ok):
        rows.append(("note", _e(f"{RUN} counts the last run's inputs ({counts.get('ok')} ok of {counts.get('images')}); this report counts every image in OUT")))
    body.append('<table class="kv">' + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows) + "</table>")
    stages = run.get("stage_seconds") or {}
    if stages:
        total = sum(float(v) for v in stages.values() if isinstance(v, (int, float))) or 1.0
        cells = "".join(
            f'<tr><td>{_e(k)}</td><td class="num">{float(v):.2f} s</td><td><svg width="200" height="10"><rect width="{200 * float(v) / total:.1f}" height="10" fill="#3b6fb6"/></svg></td></tr>'
            for k, v in stages.items()
            if isinstance(v, (int, float))
        )
        note = _e(run.get("stage_seconds_note") or "")
        body.append(f"<details><summary>seconds per stage</summary><table>{cells}</table><p class=\"muted\">{note}</p></details>")
    return "".join(body)


def _figure(views: ImageViews, title: str, extra: str = "", thumb: bool = False) -> str:
    label = _e(title)
    if not views.views:
        return f'<figure class="missing"><figcaption><b>{label}</b> {_e(extra)}<br><span class="bad">{_e(views.note or "no picture")}</span></figcaption></figure>'
    images = "".join(
        f'<img src="{v.url}" alt="{_e(views.image_id)}" title="{_e(v.caption)}" width="{v.width}" height="{v.height}"'
        + (' class="px"' if v.width < 360 and not thumb else "")
        + (f' data-crop="{",".join(str(c) for c in v.box)}"' if v.box else "") + ">"
        for v in views.views
    )
    wide = ""
    if len(views.views) > 1:
        images = f'<div class="pair">{images}</div>'
        wide = ' class="wide"'
    captions = "" if thumb else "<br>" + " | ".join(_e(v.caption) for v in views.views)
    note = f'<br><span class="muted">{_e(views.note)}</span>' if views.note else ""
    return f'<figure{wide} data-image-id="{_e(views.image_id)}">{images}<figcaption><b>{label}</b> {_e(extra)}{captions}{note}</figcaption></figure>'


def _render_safely(root, out, row, channel, store_image, max_side, crop) -> ImageViews:
    try:
        return render_image(root, out, row, channel, store_image, max_side, crop)
    except Exception as error:
        log.warning("report: cannot draw %s: %s", row.get("image_id"), error, exc_info=True)
        return ImageViews(str(row.get("image_id")), note=f"cannot draw: {type(error).__name__}: {error}")


def _gallery_html(out: Location, run: dict[str, Any], images, root) -> str:
    ok = images[images["status"] == "ok"]
    if ok.empty:
        return "<p>no image was segmented.</p>"
    settings = run.get("settings") or {}
    channel, store_image = settings.get("channel"), settings.get("store_image", True) is not False
    chosen = sample_ids(ok["image_id"], GALLERY_SIZE)
    by_id = ok.set_index("image_id", drop=False)
    figures = []
    for image_id in chosen:
        row = by_id.loc[image_id].to_dict()
        views = _render_safely(root, out, row, channel, store_image, DISPLAY_SIDE, True)
        figures.append(_figure(views, image_id, f"— {int(row['n_nuclei']):,} nuclei"))
    intro = f'<p class="muted">{len(chosen)} of {len(ok):,} segmented images (picked by a hash of image_id), nucleus outlines in green'
    intro += "; large images: a downsampled whole view (the magenta box is the crop) and a full-resolution crop of the densest area.</p>"
    return intro + f'<div class="gallery">{"".join(figures)}</div>'


def _extremes_html(out: Location, run: dict[str, Any], images, root) -> str:
    ok = images[images["status"] == "ok"].sort_values(["n_nuclei", "image_id"], kind="stable")
    if ok.empty:
        return "<p>no image was segmented.</p>"
    settings = run.get("settings") or {}
    channel, store_image = settings.get("channel"), settings.get("store_image", True) is not False
    parts = []
    for title, rows in (("fewest nuclei", ok.head(EXTREMES)), ("most nuclei", ok.tail(EXTREMES).iloc[::-1])):
        figures = []
        for row in rows.to_dict("records"):
            views = _render_safely(root, out, row, channel, store_image, THUMB_SIDE, False)
            extra = f"{int(row['n_nuclei']):,} nuclei, {int(row['height'] or 0)}x{int(row['width'] or 0)}"
            figures.append(_figure(views, str(row["image_id"]), extra, thumb=True))
        parts.append(f'<h3>{_e(title)}</h3><div class="thumbs" data-kind="{_e(title)}">{"".join(figures)}</div>')
    return "".join(parts)


def _histograms_html(out: Location, images) -> str:
    data, total, problems = sample_nuclei(out)
    ok = images[images["status"] == "ok"]
    charts = [
        histogram_svg(data["area"], "area (px)", clip_percentiles=(0.5, 99.5)),
        histogram_svg(data["mean_intensity"], "mean intensity", clip_percentiles=(0.5, 99.5)),
        histogram_svg(data["eccentricity"], "eccentricity", value_range=(0.0, 1.0)),
        histogram_svg(ok["n_nuclei"].to_numpy(), "nuclei per image", integer=True),
    ]
    shown = len(data["area"])
    note = f"{total:,} nuclei in {NUCLEI}" + (f"; every {math.ceil(total / shown)}th of them shown ({shown:,})" if total > shown > 0 else "")
    note += "; area and intensity axes cut at the 0.5 and 99.5th percentiles."
    if problems:
        note += " Unreadable parts skipped: " + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
    return f'<div class="hists">{"".join(charts)}</div><p class="muted">{_e(note)}</p>'


def _failed_html(images) -> str:
    failed = images[images["status"] != "ok"]
    if failed.empty:
        return '<p class="ok" id="no-failed">every image was segmented.</p>'
    reasons: dict[str, int] = {}
    for row in failed.to_dict("records"):
        reason = str(row.get("error") or "no reason recorded")
        for name in (row.get("source"), row.get("image_id")):
            if name:
                reason = reason.replace(str(name), "…")
        reasons[reason] = reasons.get(reason, 0) + 1
    top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    body = [f'<p class="bad">{len(failed):,} image(s) failed. Most frequent reasons:</p><table><tr><th>images</th><th>reason</th></tr>']
    body += [f'<tr><td class="num">{n}</td><td>{_e(r)}</td></tr>' for r, n in top]
    body.append('</table><p></p><table id="failed-table"><tr><th>image_id</th><th>source</th><th>error</th></tr>')
    for row in failed.head(MAX_FAILED_ROWS).to_dict("records"):
        body.append(f"<tr><td>{_e(row['image_id'])}</td><td>{_e(row.get('source'))}</td><td>{_e(row.get('error') or 'no reason recorded')}</td></tr>")
    body.append("</table>")
    if len(failed) > MAX_FAILED_ROWS:
        body.append(f'<p class="muted">first {MAX_FAILED_ROWS} of {len(failed):,}: all are in {IMAGES} (status = \'failed\').</p>')
    body.append('<p class="muted">Fix the inputs (or the settings the reasons name), then re-run the same command with --retry-failed.</p>')
    return "".join(body)


def build_report_html(out_dir: str | Location) -> str:
    """The report of a segment output as an HTML string (see :func:`write_report`)."""
    started = time.perf_counter()
    out = check_segment_output(out_dir)
    run = read_run(out) or {}
    images = read_images_with_records(out)
    try:
        root = open_masks(out)
        store_problem = None
    except Exception as error:
        root, store_problem = None, f"{type(error).__name__}: {error}"

    def need_store(build):
        def wrapped(*args):
            if root is None:
                return f'<p class="bad">{MASKS} cannot be opened: {_e(store_problem)}</p>'
            return build(*args, root)

        return wrapped

    sections = [
        _guarded("summary", "Run summary", _summary_html, out, run, images),
        _guarded("gallery", "Gallery", need_store(_gallery_html), out, run, images),
        _guarded("extremes", "Fewest and most nuclei", need_store(_extremes_html), out, run, images),
        _guarded("histograms", "Nucleus measurements", _histograms_html, out, images),
        _guarded("failed", "Failed images", _failed_html, images),
    ]
    made = time.strftime("%Y-%m-%d %H:%M:%S %z")
    nav = " ".join(f'<a href="#{a}">{t}</a>' for a, t in (("summary", "summary"), ("gallery", "gallery"), ("extremes", "fewest / most"), ("histograms", "measurements"), ("failed", "failed")))
    footer = f'<p class="muted">made by nucleibatch report from {_e(out if is_remote(out) else out.resolve())} at {_e(made)} in {time.perf_counter() - started:.1f} s; rebuild with <code>nucleibatch report {_e(out)}</code>.</p>'
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>nucleibatch report: {_e((out if is_remote(out) else out.resolve()).name)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head>"
        f'<body><h1>Nuclei segmentation report</h1><nav>{nav}</nav>{"".join(sections)}{footer}</body></html>\n'
    )


def write_report(out_dir: str | Location) -> Location:
    """Write ``OUT/report.html``: a self-contained QC report of a segment output, from OUT alone.

    Safe to call at the end of every run and on partial outputs (a run still going or killed):
    missing or damaged parts are reported in the page, not raised. Reads at most one pyramid
    level <= 1024 px and one 512 px crop per shown image and streams the nuclei table, so it
    takes seconds and bounded memory whatever the size of the run.

    Args:
        out_dir: the ``-o`` folder of ``nucleibatch segment``.

    Returns:
        The path of ``report.html`` (written atomically).

    Raises:
        NotSegmentOutputError: ``out_dir`` is not a segment output (exit status 2 on the CLI).
    """
    out = check_segment_output(out_dir)
    page = build_report_html(out)
    path = out / REPORT_NAME
    write_bytes_atomic(path, page.encode("utf-8"))  # a reader never sees half a report
    return path
