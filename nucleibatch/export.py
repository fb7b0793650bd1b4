"""`nucleibatch export`: a finished `segment` output folder -> files other tools read.

Formats (one call exports the images of OUT whose status is 'ok'; failed ones are skipped
and named in the summary):

* ``geojson`` — ``DIR/<name>.geojson`` per image, a QuPath-compatible FeatureCollection with
  one detection Feature per nucleus (classification "Nucleus", the nuclei.parquet
  measurements, ``label`` and ``image_id``).
* ``dsb-rle`` — ``DIR/submission.csv``, the Data Science Bowl 2018 submission format
  (``ImageId,EncodedPixels``; one row per nucleus; an image without nuclei gets one row
  with empty EncodedPixels).
* ``png`` — ``DIR/<name>.png`` 16-bit greyscale label image (refused when a label > 65535).
* ``tiff`` — ``DIR/<name>.tif`` 32-bit label image, zlib-compressed, tiled like the zarr chunks.

``<name>`` is :func:`nucleibatch.output.store.store_name` of the image id (the image's zarr group name,
``store_path``, except for plate fields, whose groups are nested in their plate): file-system
safe, flat, stable, unique.

Outline convention (GeoJSON)
    Coordinates are image pixels, ``x`` = column, ``y`` = row, with pixel ``(row r, column c)``
    covering the unit square ``[c, c+1] x [r, r+1]`` (QuPath's convention). Outlines run along
    pixel edges: every vertex is a pixel corner (integer coordinates), collinear corners are
    dropped. A pixel belongs to the nucleus exactly when its centre ``(c + 0.5, r + 0.5)`` lies
    inside the polygon (and outside its holes), so rasterising by pixel centres
    (:func:`rasterise_geojson`, or :func:`skimage.draw.polygon` on the vertices minus 0.5)
    gives back the mask exactly, and the polygon's area equals the pixel count.
    Pixels of a nucleus are connected through their sides (4-connectivity): holes are kept as
    interior rings; a nucleus in several pieces (pixels touching only at a corner count as
    separate pieces) becomes a ``MultiPolygon`` with every piece, so no pixel is lost.
    Exterior rings are counter-clockwise and holes clockwise in the (x, y) numbers as written
    (RFC 7946's right-hand rule, ignoring that y points down on screen).

Memory
    The label image is never loaded whole for GeoJSON and RLE: nuclei are grouped by the zarr
    chunk holding their bounding box's top-left corner, and each group reads only the region
    covering its nuclei, through a small LRU cache of decoded chunks. TIFF is written tile by
    tile (tiles = zarr chunks); PNG is streamed row band by row band (one row of chunks at a
    time), with a zlib stream of our own, so its peak memory is one row of chunks.

The pure array functions (:func:`rle_encode`, :func:`rle_decode`, :func:`mask_outline`,
:func:`rasterise_polygons`) are apart from the I/O (:func:`export_run`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import struct
import sys
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .channels import INTENSITY_PREFIX
from .errors import NotSegmentOutputError, NucleibatchError, UsageError  # noqa: F401  (NotSegmentOutputError: raised by check_segment_output)
from .io.location import is_remote
from .output.atomic import replaced_on_success
from .output.folder import IMAGES, LABELS, MASKS, NUCLEI, OutputFolder
from .output.reader import label_image, open_masks, read_image_nuclei, read_images
from .output.store import store_name
from .output.tables import check_segment_output

if TYPE_CHECKING:  # pandas and scipy are imported where used: `nucleibatch --help` stays quick
    import pandas as pd

log = logging.getLogger(__name__)

FORMATS = ("geojson", "dsb-rle", "png", "tiff")
SUFFIX = {"geojson": ".geojson", "png": ".png", "tiff": ".tif"}
MEASUREMENTS = ("area", "perimeter", "eccentricity", "solidity", "mean_intensity", "centroid_y", "centroid_x")
_UUID_NAMESPACE = uuid.UUID("6c0b3c52-5d0e-4b8a-9a51-6e75636c6569")
# TIFF images up to this many pixels are written in one piece (strips); larger ones tiled
WHOLE_TIFF_PIXELS = 2048 * 2048


class ExportError(NucleibatchError):
    """OUT is inconsistent (a table names an image or nucleus that masks.zarr lacks)."""


# --------------------------------------------------------------------------- pure: RLE


def _runs_from_indices(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted 0-based flat indices -> (1-based starts, lengths) of their runs."""
    if index.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    first = np.concatenate(([0], breaks))
    last = np.concatenate((breaks, [index.size]))
    return index[first] + 1, last - first


def _format_runs(starts: np.ndarray, lengths: np.ndarray) -> str:
    pairs = np.empty(2 * starts.size, dtype=np.int64)
    pairs[0::2], pairs[1::2] = starts, lengths
    return " ".join(map(str, pairs.tolist()))


def rle_encode_crop(crop: np.ndarray, origin: tuple[int, int], height: int) -> str:
    """DSB run-length encoding of a mask given as a crop of a taller image.

    Args:
        crop: ``(h, w)`` bool, the mask inside its box.
        origin: ``(y0, x0)`` image position of ``crop[0, 0]``.
        height: ``H`` of the whole image (pixels are numbered column by column).

    Returns:
        ``"start length start length ..."``, 1-based, column-major, as :func:`rle_encode`
        of the whole-image mask.
    """
    cols, rows = np.nonzero(np.asarray(crop, dtype=bool).T)  # column-major order, sorted
    index = (cols.astype(np.int64) + origin[1]) * height + (rows.astype(np.int64) + origin[0])
    return _format_runs(*_runs_from_indices(index))


def rle_encode(mask: np.ndarray) -> str:
    """DSB 2018 run-length encoding of one mask.

    Args:
        mask: ``(H, W)`` bool (or 0/1) array.

    Returns:
        ``"start length ..."``: pixels are numbered from 1, top to bottom then left to right
        (the order of ``mask.T.flatten()``); runs are increasing and non-overlapping;
        ``""`` for an empty mask.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode needs a 2-D mask, got shape {mask.shape}")
    return rle_encode_crop(mask, (0, 0), mask.shape[0])


def rle_decode(text: str, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`rle_encode`: ``"start length ..."`` -> ``(H, W)`` bool mask.

    Raises ValueError on an odd number of values or a run outside the image.
    """
    height, width = shape
    values = np.array(text.split(), dtype=np.int64) if text and text.strip() else np.zeros(0, np.int64)
    if values.size % 2:
        raise ValueError("an RLE string needs pairs of 'start length'")
    starts, lengths = values[0::2] - 1, values[1::2]
    if starts.size and (starts.min() < 0 or (starts + lengths).max() > height * width or lengths.min() < 1):
        raise ValueError(f"RLE runs fall outside an image of shape {shape}")
    flat = np.zeros(height * width + 1, dtype=np.int32)  # +1 sentinel: run ends may equal H*W
    np.add.at(flat, starts, 1)
    np.add.at(flat, starts + lengths, -1)
    return np.cumsum(flat[:-1]).astype(bool).reshape(width, height).T


# --------------------------------------------------------------------------- pure: outlines


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a closed ring of (x, y) rows (positive = counter-clockwise in x, y)."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def _corner_ring(contour: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
    """A closed find_contours contour of a 0/1 mask -> closed ring of pixel corners, (x, y) int64.

    find_contours at level 0.5 on a binary mask puts one point on the midpoint of every pixel
    edge between inside and outside, in order; consecutive midpoints share one pixel corner,
    ``round(mean)`` of the two (in corner coordinates = centre coordinates + 0.5).
    """
    points = contour + 0.5  # (row, col) in pixel-corner coordinates
    corners = np.rint((points[:-1] + points[1:]) / 2).astype(np.int64)  # n-1 corners, cyclic
    step = np.roll(corners, -1, axis=0) - corners
    turn = np.any(step != np.roll(step, 1, axis=0), axis=1)  # keep corners where the direction changes
    corners = corners[turn] if turn.any() else corners
    ring = np.column_stack((corners[:, 1] + origin[1], corners[:, 0] + origin[0]))  # (x, y)
    return np.vstack((ring, ring[:1]))


def mask_outline(crop: np.ndarray, origin: tuple[int, int] = (0, 0)) -> list[list[np.ndarray]]:
    """Pixel-edge outline of one nucleus mask, as GeoJSON-ready polygons.

    Args:
        crop: ``(h, w)`` bool mask of the nucleus (typically cut to its bounding box).
        origin: ``(y0, x0)`` image position of ``crop[0, 0]``, added to the coordinates.

    Returns:
        One polygon per 4-connected piece of the mask (largest first); each polygon is a list
        of rings, the exterior first then its holes; each ring is a closed ``(n, 2)`` int64
        array of pixel corners ``(x, y)`` (first row == last row). Exterior rings have positive
        shoelace area in (x, y), holes negative. ``[]`` for an empty mask. Rasterising by
        pixel centres (:func:`rasterise_polygons`) reproduces ``crop`` exactly.
    """
    from scipy import ndimage as ndi
    from skimage.measure import find_contours

    mask = np.asarray(crop, dtype=bool)
    if not mask.any():
        return []
    padded = _pad(mask)
    contours = find_contours(padded, 0.5)
    if len(contours) == 1:  # the common case: one piece without holes
        return [[_oriented(_corner_ring(contours[0], (origin[0] - 1, origin[1] - 1)), 1)]]
    pieces, n_pieces = ndi.label(mask)  # 4-connected, as find_contours' default ("low" fully connected)
    polygons = []
    order = np.argsort(-np.bincount(pieces.ravel())[1:], kind="stable") + 1
    boxes = ndi.find_objects(pieces)
    for piece in order:
        box = boxes[piece - 1]
        sub = _pad(pieces[box] == piece) if n_pieces > 1 else padded
        sub_origin = (origin[0] + box[0].start - 1, origin[1] + box[1].start - 1) if n_pieces > 1 else (origin[0] - 1, origin[1] - 1)
        rings = [_corner_ring(c, sub_origin) for c in (find_contours(sub, 0.5) if n_pieces > 1 else contours)]
        areas = [abs(_signed_area(r)) for r in rings]
        outer = int(np.argmax(areas))  # the exterior encloses the piece's holes
        polygons.append([_oriented(rings[outer], 1)] + [_oriented(r, -1) for i, r in enumerate(rings) if i != outer])
    return polygons


def _pad(mask: np.ndarray) -> np.ndarray:
    """``mask`` as uint8 with a 1-pixel frame of zeros (so that every contour closes)."""
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = mask
    return padded


def _oriented(ring: np.ndarray, sign: int) -> np.ndarray:
    """``ring`` reversed if needed so that its shoelace area in (x, y) has the sign ``sign``."""
    return ring if _signed_area(ring) * sign > 0 else ring[::-1]


def outline_geometry(polygons: list[list[np.ndarray]]) -> dict[str, Any] | None:
    """GeoJSON geometry of :func:`mask_outline`'s polygons: Polygon for one piece, MultiPolygon for several."""
    if not polygons:
        return None
    as_lists = [[ring.tolist() for ring in polygon] for polygon in polygons]
    if len(as_lists) == 1:
        return {"type": "Polygon", "coordinates": as_lists[0]}
    return {"type": "MultiPolygon", "coordinates": as_lists}


def rasterise_polygons(polygons: Sequence[Sequence[Sequence[Sequence[float]]]], shape: tuple[int, int], out: np.ndarray | None = None, value: int = 1) -> np.ndarray:
    """Paint polygons (lists of rings of ``(x, y)`` points, exterior first) by pixel centres.

    Pixel ``(r, c)`` is painted when ``(c + 0.5, r + 0.5)`` is inside an exterior ring and
    outside that polygon's holes (the convention of :func:`mask_outline`).

    Args:
        polygons: GeoJSON-style polygon coordinates (a Polygon's ``coordinates`` is one item).
        shape: ``(H, W)`` of the target image.
        out: ``(H, W)`` array to paint into (default: a new uint32 zeros array).
        value: the value painted.

    Returns:
        ``out``.
    """
    from skimage.draw import polygon as fill

    if out is None:
        out = np.zeros(shape, dtype=np.uint32)
    for polygon in polygons:
        rings = [np.asarray(ring, dtype=np.float64).reshape(-1, 2) for ring in polygon]
        # work in the exterior's bounding box: memory is the nucleus's, not the image's
        y0, x0 = (max(0, int(np.floor(rings[0][:, k].min()))) for k in (1, 0))
        y1, x1 = (min(s, int(np.ceil(rings[0][:, k].max()))) for s, k in zip(shape, (1, 0), strict=True))
        if y1 <= y0 or x1 <= x0:
            continue
        box = (y1 - y0, x1 - x0)
        inside = np.zeros(box, dtype=bool)
        for number, ring in enumerate(rings):
            rows, cols = fill(ring[:, 1] - 0.5 - y0, ring[:, 0] - 0.5 - x0, box)
            inside[rows, cols] = number == 0  # the exterior paints, holes clear
        out[y0:y1, x0:x1][inside] = value
    return out


def rasterise_geojson(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a GeoJSON written by ``export --format geojson`` back into a label image.

    Args:
        path: the ``.geojson`` file (a FeatureCollection).
        shape: ``(H, W)`` of the image.

    Returns:
        ``(H, W)`` uint32 labels: each feature painted with its ``properties.label`` (features
        without one get 1, 2, ... in file order), by pixel centres.
    """
    with open(path) as handle:
        collection = json.load(handle)
    labels = np.zeros(shape, dtype=np.uint32)
    for number, feature in enumerate(collection["features"], start=1):
        geometry = feature["geometry"]
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        rasterise_polygons(polygons, shape, out=labels, value=int(feature.get("properties", {}).get("label", number)))
    return labels


# --------------------------------------------------------------------------- reading OUT


class ChunkCache:
    """Read rectangles of a 2-D zarr array through an LRU cache of whole decoded chunks.

    Args:
        array: a 2-D zarr array (or anything with ``shape``, ``chunks`` and slicing).
        max_bytes: the cache's size limit (at least one chunk is always kept).
    """

    def __init__(self, array, max_bytes: int = 128 * 2**20) -> None:
        self.array = array
        self.chunks = tuple(int(c) for c in array.chunks)
        self.max_bytes = max_bytes
        self.cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.bytes = 0
        self.reads = 0

    def _chunk(self, i: int, j: int) -> np.ndarray:
        key = (i, j)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        ch, cw = self.chunks
        data = np.asarray(self.array[i * ch : (i + 1) * ch, j * cw : (j + 1) * cw])
        self.reads += 1
        self.cache[key] = data
        self.bytes += data.nbytes
        while self.bytes > self.max_bytes and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.bytes -= old.nbytes
        return data

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """``array[y0:y1, x0:x1]`` as a numpy array (``(y1-y0, x1-x0)``, the array's dtype)."""
        ch, cw = self.chunks
        out = np.empty((y1 - y0, x1 - x0), dtype=self.array.dtype)
        for i in range(y0 // ch, (y1 - 1) // ch + 1):
            for j in range(x0 // cw, (x1 - 1) // cw + 1):
                chunk = self._chunk(i, j)
                cy0, cx0 = i * ch, j * cw
                ay0, ay1 = max(y0, cy0), min(y1, cy0 + chunk.shape[0])
                ax0, ax1 = max(x0, cx0), min(x1, cx0 + chunk.shape[1])
                out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = chunk[ay0 - cy0 : ay1 - cy0, ax0 - cx0 : ax1 - cx0]
        return out


def iter_nucleus_masks(array, nuclei: pd.DataFrame, cache_bytes: int = 128 * 2**20) -> Iterator[tuple[Any, np.ndarray]]:
    """Yield ``(row, crop)`` for every nucleus of one image, reading the labels chunk by chunk.

    Args:
        array: the image's 2-D label array (zarr), ``(H, W)`` unsigned int.
        nuclei: the image's rows of nuclei.parquet (needs ``label`` and the bbox columns).
        cache_bytes: size of the decoded-chunk cache.

    Yields:
        ``row`` (a namedtuple of ``nuclei``'s columns) and ``crop``, the ``(h, w)`` bool mask
        ``labels[bbox] == label``. Nuclei come grouped by the chunk holding their bbox's
        top-left corner; each group reads only the region covering its boxes.
    """
    if nuclei.empty:
        return
    reader = ChunkCache(array, cache_bytes)
    ch, cw = reader.chunks
    frame = nuclei.assign(_ty=nuclei.bbox_min_y // ch, _tx=nuclei.bbox_min_x // cw).sort_values(["_ty", "_tx", "label"], kind="stable")
    for _, group in frame.groupby(["_ty", "_tx"], sort=False):
        y0, x0 = int(group.bbox_min_y.min()), int(group.bbox_min_x.min())
        y1, x1 = int(group.bbox_max_y.max()), int(group.bbox_max_x.max())
        region = reader.read(y0, y1, x0, x1)
        for row in group.itertuples(index=False):
            crop = region[row.bbox_min_y - y0 : row.bbox_max_y - y0, row.bbox_min_x - x0 : row.bbox_max_x - x0] == row.label
            yield row, crop


@dataclass
class SegmentOutput:
    """What export reads of OUT: the ok images to export and the failed ones skipped."""

    out_dir: Path
    images: pd.DataFrame  # rows of images.parquet with status 'ok', selected
    failed: list[str]  # selected image ids whose status is not 'ok'


def open_segment_output(out: str | Path, image_ids: Sequence[str] | None = None) -> SegmentOutput:
    """Check that ``out`` is a finished segment output and select its images.

    Raises:
        NotSegmentOutputError: ``out`` is missing, or lacks images.parquet / masks.zarr.
        UsageError: an id of ``image_ids`` is not in images.parquet.
    """

    out_dir = check_segment_output(out, finished=True)
    if is_remote(out_dir):
        raise UsageError(f"{out_dir}: export reads local folders and file:// URLs; copy the run's outputs from the store first")
    images = read_images(out_dir)
    if image_ids:
        unknown = [i for i in dict.fromkeys(image_ids) if i not in set(images.image_id)]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise UsageError(f"--images: {shown} not in {OutputFolder(out_dir).images} (its image_id column lists the ids)")
        images = images[images.image_id.isin(set(image_ids))]
    ok = images.status == "ok"
    return SegmentOutput(out_dir, images[ok].sort_values("image_id").reset_index(drop=True), sorted(images.image_id[~ok]))


def _label_array(root, image: Any):
    try:
        array = label_image(root, image.store_path)
    except KeyError:
        raise ExportError(
            f"{MASKS} has no labels at {image.store_path}/{LABELS}/0 for image {image.image_id!r} (status ok): OUT is damaged; "
            f"re-run segment with --overwrite, or leave this image out with --images"
        ) from None
    if tuple(array.shape) != (int(image.height), int(image.width)):
        raise ExportError(f"labels of {image.image_id!r} are {tuple(array.shape)}, {IMAGES} says {(image.height, image.width)}: OUT is damaged")
    return array


# --------------------------------------------------------------------------- writers


def _clean(value: Any) -> Any:
    """A JSON-safe scalar (numpy -> Python, NaN/inf -> None)."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def feature_id(image_id: str, label: int) -> str:
    """Stable UUID of a nucleus (uuid5 of image id and label): the same on every export."""
    return str(uuid.uuid5(_UUID_NAMESPACE, f"{image_id}\x00{int(label)}"))


def write_geojson(array, nuclei: pd.DataFrame, image_id: str, path: Path) -> int:
    """Write one image's nuclei as a QuPath GeoJSON FeatureCollection, feature by feature.

    Args:
        array: the ``(H, W)`` uint label array (zarr; read chunk by chunk).
        nuclei: the image's nuclei.parquet rows.
        image_id: written into every feature's properties.
        path: the ``.geojson`` file (written to a temporary name, then renamed).

    Returns:
        The number of features written. A table row whose label is absent from the array
        raises :class:`ExportError`.
    """
    count = 0
    measured = [name for name in MEASUREMENTS if name in nuclei.columns]
    # the image's own per-channel means (the table's other images' channels read as all-null here)
    measured += [name for name in nuclei.columns if name.startswith(INTENSITY_PREFIX) and nuclei[name].notna().any()]
    with replaced_on_success(path) as tmp, open(tmp, "w") as handle:
        handle.write('{"type": "FeatureCollection", "features": [')
        for row, crop in iter_nucleus_masks(array, nuclei):
            geometry = outline_geometry(mask_outline(crop, (int(row.bbox_min_y), int(row.bbox_min_x))))
            if geometry is None:
                raise ExportError(f"nucleus {row.label} of {image_id!r} is in {NUCLEI} but not in its label image: OUT is damaged")
            feature = {
                "type": "Feature",
                "id": feature_id(image_id, row.label),
                "geometry": geometry,
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": "Nucleus"},
                    "measurements": {name: _clean(getattr(row, name)) for name in measured},
                    "label": int(row.label),
                    "image_id": image_id,
                },
            }
            handle.write(("\n" if count == 0 else ",\n") + json.dumps(feature, separators=(",", ":")))
            count += 1
        handle.write("\n]}\n")
    return count


def write_rle_rows(writer, array, nuclei: pd.DataFrame, image_id: str) -> int:
    """Append one image's DSB rows (``ImageId, EncodedPixels``) to a csv writer; returns the rows' nuclei count."""
    height = int(array.shape[0])
    count = 0
    for row, crop in iter_nucleus_masks(array, nuclei):
        text = rle_encode_crop(crop, (int(row.bbox_min_y), int(row.bbox_min_x)), height)
        if not text:
            raise ExportError(f"nucleus {row.label} of {image_id!r} is in {NUCLEI} but not in its label image: OUT is damaged")
        writer.writerow([image_id, text])
        count += 1
    if count == 0:
        writer.writerow([image_id, ""])
    return count


def write_tiff(array, path: Path, whole_pixels: int = WHOLE_TIFF_PIXELS) -> None:
    """Write a label array as a uint32 TIFF (zlib + horizontal predictor).

    Images up to ``whole_pixels`` are read at once; larger ones are written tiled, one tile per
    zarr chunk (or 512 x 512 when the chunks are not multiples of 16), so memory stays one chunk.
    """
    import tifffile

    height, width = (int(s) for s in array.shape)
    options = {"compression": "zlib", "predictor": True, "photometric": "minisblack", "metadata": None}
    with replaced_on_success(path) as tmp:
        if height * width <= whole_pixels:
            tifffile.imwrite(tmp, np.asarray(array[:], dtype=np.uint32), **options)
            return
        chunks = tuple(int(c) for c in array.chunks)
        tile = chunks if all(c % 16 == 0 for c in chunks) else (512, 512)
        reader = ChunkCache(array, 64 * 2**20)

        def tiles() -> Iterator[np.ndarray]:
            for y in range(0, height, tile[0]):
                for x in range(0, width, tile[1]):
                    yield reader.read(y, min(height, y + tile[0]), x, min(width, x + tile[1])).astype(np.uint32, copy=False)

        tifffile.imwrite(tmp, tiles(), shape=(height, width), dtype=np.uint32, tile=tile, bigtiff=height * width * 4 > 2**31, **options)


def _png_chunk(handle, tag: bytes, data: bytes) -> None:
    handle.write(struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)) & 0xFFFFFFFF))


def write_png16(array, path: Path, band_bytes: int = 64 * 2**20) -> None:
    """Write a label array as a 16-bit greyscale PNG, streamed band by band (PNG 'Sub' filter, zlib).

    Raises:
        UsageError: a label exceeds 65535 (nothing is left at ``path``); use TIFF.
    """
    height, width = (int(s) for s in array.shape)
    band = max(1, min(int(array.chunks[0]), band_bytes // max(1, 4 * width)))
    with replaced_on_success(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(b"\x89PNG\r\n\x1a\n")
            _png_chunk(handle, b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
            compressor = zlib.compressobj(6)
            pending = io.BytesIO()
            for y in range(0, height, band):
                rows = np.asarray(array[y : min(height, y + band), :])
                if rows.size and rows.max() > 65535:
                    raise UsageError(f"{path.name}: label {int(rows.max())} > 65535 does not fit a 16-bit PNG; use --format tiff")
                raw = rows.astype(">u2").view(np.uint8).reshape(rows.shape[0], 2 * width)
                filtered = np.empty((rows.shape[0], 2 * width + 1), dtype=np.uint8)
                filtered[:, 0] = 1  # Sub: each byte minus the byte of the previous pixel
                filtered[:, 1:3] = raw[:, :2]
                filtered[:, 3:] = raw[:, 2:] - raw[:, :-2]
                pending.write(compressor.compress(filtered.tobytes()))
                if pending.tell() > 2**20:
                    _png_chunk(handle, b"IDAT", pending.getvalue())
                    pending = io.BytesIO()
            pending.write(compressor.flush())
            _png_chunk(handle, b"IDAT", pending.getvalue())
            _png_chunk(handle, b"IEND", b"")


# --------------------------------------------------------------------------- the job


@dataclass
class ExportSummary:
    """What an export wrote."""

    format: str
    dest: Path
    n_images: int = 0
    n_nuclei: int = 0
    files: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # skipped: their segmentation failed
    seconds: float = 0.0

    def line(self) -> str:
        """The one-line summary printed by the CLI."""
        text = (
            f"exported {self.n_images} images, {self.n_nuclei} nuclei as {self.format} "
            f"to {len(self.files)} file{'s' if len(self.files) != 1 else ''} in {self.dest} ({self.seconds:.1f} s)"
        )
        return text


def failed_line(failed: Sequence[str]) -> str:
    """One line naming the images skipped because their segmentation failed."""
    shown = ", ".join(failed[:10]) + (f" and {len(failed) - 10} more" if len(failed) > 10 else "")
    return f"skipped {len(failed)} failed image{'s' if len(failed) != 1 else ''} (see {IMAGES} error column): {shown}"


class _Progress:
    """tqdm on a terminal; otherwise a log line every 30 s (and at the end when it took that long)."""

    def __init__(self, total: int, desc: str, enabled: bool | None) -> None:
        self.total, self.done, self.started, self.last = total, 0, time.perf_counter(), time.perf_counter()
        self.bar = None
        if enabled if enabled is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True)

    def update(self, nuclei: int) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif time.perf_counter() - self.last > 30:
            log.info("export: %d/%d images, %d nuclei in the last one", self.done, self.total, nuclei)
            self.last = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def export_run(
    out: str | Path,
    fmt: str,
    dest: str | Path | None = None,
    image_ids: Sequence[str] | None = None,
    progress: bool | None = None,
) -> ExportSummary:
    """Export the 'ok' images of a segment output folder.

    Args:
        out: OUT of ``nucleibatch segment``.
        fmt: one of :data:`FORMATS`.
        dest: the folder written (default ``OUT/export/<fmt>``); existing files of the same
            names are replaced (each file is written to a temporary name, then renamed).
        image_ids: export only these images (default: all).
        progress: tqdm bar (None: when stderr is a terminal).

    Returns:
        An :class:`ExportSummary`. Failed images are skipped and listed in ``failed``.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    started = time.perf_counter()
    run = open_segment_output(out, image_ids)
    dest_dir = Path(dest) if dest is not None else OutputFolder(run.out_dir).export(fmt)
    if dest_dir.exists() and not dest_dir.is_dir():
        raise UsageError(f"-o {dest_dir} is a file; give a folder")
    summary = ExportSummary(fmt, dest_dir, failed=run.failed)
    if fmt == "png" and len(run.images):
        too_big = []
        for image in run.images.itertuples(index=False):
            labels = read_image_nuclei(run.out_dir, image.image_id, ["image_id", "label"]).label
            if len(labels) and int(labels.max()) > 65535:
                too_big.append(f"{image.image_id} (max label {int(labels.max())})")
        if too_big:
            raise UsageError(f"labels above 65535 do not fit a 16-bit PNG: {', '.join(too_big[:5])}; use --format tiff (32-bit)")
    dest_dir.mkdir(parents=True, exist_ok=True)
    root = open_masks(run.out_dir)
    bar = _Progress(len(run.images), f"export {fmt}", progress)
    csv_path = dest_dir / "submission.csv"
    try:
        with ExitStack() as csv_file:  # dsb-rle: one file for all images, in place only when all went well
            if fmt == "dsb-rle":
                csv_handle = csv_file.enter_context(open(csv_file.enter_context(replaced_on_success(csv_path)), "w", newline=""))
                writer = csv.writer(csv_handle, lineterminator="\n")
                writer.writerow(["ImageId", "EncodedPixels"])
            for image in run.images.itertuples(index=False):
                array = _label_array(root, image)
                n = 0
                if fmt in ("geojson", "dsb-rle"):
                    nuclei = read_image_nuclei(run.out_dir, image.image_id)
                    if fmt == "geojson":
                        path = dest_dir / f"{store_name(image.image_id)}{SUFFIX[fmt]}"
                        n = write_geojson(array, nuclei, image.image_id, path)
                        summary.files.append(path)
                    else:
                        n = write_rle_rows(writer, array, nuclei, image.image_id)
                else:
                    path = dest_dir / f"{store_name(image.image_id)}{SUFFIX[fmt]}"
                    (write_png16 if fmt == "png" else write_tiff)(array, path)
                    summary.files.append(path)
                    n = int(image.n_nuclei)
                summary.n_images += 1
                summary.n_nuclei += n
                bar.update(n)
        if fmt == "dsb-rle":
            summary.files.append(csv_path)
    finally:
        bar.close()
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary
