"""What the report shows of OUT, gathered through the one OUT reader (:mod:`nucleibatch.output.reader`).

Which images the gallery shows (:func:`sample_ids`) and the pictures of one image
(:func:`render_image`): the lowest pyramid level that fits with its outlines and, for a large
image, a full-resolution crop of its densest area. At most one level and one crop are read per
image, so memory does not grow with the image's size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..io.location import Location
from ..output.folder import MASKS, label_path
from ..output.reader import image_written, pyramid_levels, read_image_nuclei
from .drawing import (
    channel_range,
    densest_window,
    draw_box,
    draw_outlines,
    encode_jpeg,
    shrink,
    to_display_rgb,
)

OVERVIEW_SIDE = 1024  # the overview is the lowest pyramid level whose sides are <= this
DISPLAY_SIDE = 768  # ... shown at most this large (outlines are drawn at the shown size)
CROP_SIDE = 512  # full-resolution crop of a large image
THUMB_SIDE = 160
MAX_HISTOGRAM_ROWS = 1_000_000  # nuclei sampled (an even stride over nuclei.parquet) for the histograms
# bytes of JPEG per picture (lower quality is used until it fits): 12 gallery images with crops
# and the thumbnails stay under ~5 MB of HTML whatever the images
OVERVIEW_BYTES, CROP_BYTES, THUMB_BYTES = 160_000, 120_000, 16_000
OVERVIEW_ALPHA = 0.6  # outlines on a downsampled view are blended, or small nuclei vanish under them
NUCLEI_COLUMNS_USED = ("area", "mean_intensity", "eccentricity")  # the histograms' columns


def sample_ids(image_ids: Iterable[str], k: int) -> list[str]:
    """``k`` ids picked deterministically (smallest sha1 of the id), returned sorted: the same
    images whatever order the table is in and whichever other images a run adds."""
    ranked = sorted(set(image_ids), key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    return sorted(ranked[:k])


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


def _centroids(out: Location, store_path: str, image_id: str) -> np.ndarray | None:
    """``(N, 2)`` centroids of one image from its nuclei rows (None if they cannot be read)."""
    try:
        table = read_image_nuclei(out, image_id, ["image_id", "centroid_y", "centroid_x"])
    except Exception:
        return None
    return table[["centroid_y", "centroid_x"]].to_numpy(dtype=np.float64)


def _array(group, path: str):
    """``group[path]``, or None where it is missing or damaged (the picture says so instead)."""
    try:
        return group[path]
    except Exception:
        return None


def _pick_level(shapes: list[tuple[int, ...]], max_side: int) -> int:
    """Index of the first (largest) level whose sides are <= ``max_side``, else the smallest."""
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
    paths = pyramid_levels(group)
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
    has_image = store_image and image_array is not None and image_written(image_array)
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
