"""Lazy region readers for every input kind, and the probes that discovery uses.

Three kinds of input (``ImageRecord.kind``):

* ``"plain"`` -- PNG / JPEG / BMP / GIF, decoded with PIL. Such files are small: the
  whole image is decoded once, on the first :meth:`ImageSource.read`, and kept.
* ``"tiff"`` -- TIFF, BigTIFF, OME-TIFF, ImageJ hyperstacks, Aperio SVS and other
  whole-slide TIFFs. Read lazily: uncompressed contiguous data is memory-mapped,
  everything else goes through tifffile's zarr store (``TiffPageSeries.aszarr``), so a
  region read decodes only the strips/tiles that overlap it. Pyramid levels (SubIFDs,
  SVS resolutions, reduced-resolution pages) are used for :meth:`ImageSource.overview`.
* ``"zarr"`` -- zarr v2/v3 arrays and OME-Zarr (NGFF 0.1-0.5) images, read lazily with
  zarr; OME-Zarr multiscale levels are used for :meth:`ImageSource.overview`.

How an N-D array becomes 2-D images with channels (the *axes rule*, see docs/inputs.md):
``y`` and ``x`` are the image plane; ``c`` / ``s`` (channels, samples) are stacked into
the channel axis ``C`` of every read; every other axis (``t``, ``z``, ``i`` pages, ...)
indexes separate images. At most one axis of unknown meaning (tifffile's ``Q``/``I``)
is accepted, as an image index.

Sources hold open files: they cannot be pickled. Send :class:`ImageRecord` objects to
workers and call :func:`open_source` there.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ImageReadError
from .channelnames import ome_zarr_channel_names, tiff_channel_names
from .imagefile import (
    MAX_IN_MEMORY_PIXELS,
    pil_bytes_per_pixel,
    plain_size_error,
    png_header_error,
    printable,
    read_head,
    read_image_file,
    sniff_format,
    too_many_pixels,
)
from .location import Location, is_remote, open_binary, to_location, zarr_store
from .pixelsize import ome_zarr_pixel_size, tiff_pixel_size

if TYPE_CHECKING:
    from .discover import ImageRecord

# Smallest image side we segment (the network's receptive field needs some context).
MIN_SIDE = 8
# More channels than this means an axis was probably mislabelled as channels.
MAX_CHANNELS = 256
# Largest image (H x W) we segment, whatever the format: 10^11 pixels is ~7x the largest
# whole-slide scans; a header declaring more is damaged or a decompression bomb (a 150-byte
# TIFF can declare 10^6 x 10^6 pixels of missing tiles, that would take days to "segment").
MAX_IMAGE_PIXELS = 100_000_000_000
# A TIFF whose pixels (uncompressed) are more than MAX_TIFF_RATIO times its file size, and
# more than CHECK_BYTES, is refused as a decompression bomb: real compressed microscopy is
# < 100:1 (JPEG) and deflate / LZW cannot exceed ~3000:1. (Without it a damaged header can
# make a 2 kB file a 10^6 x 40 image whose 10^5 missing tiles take minutes to "read".)
MAX_TIFF_RATIO = 10_000
# A zarr array of more than CHECK_BYTES with fewer than 1 in MAX_UNWRITTEN_CHUNKS of its
# chunks stored is refused: a few bytes of zarr.json declaring a huge image of fill values
# (unfinished or damaged store, or a bomb that would keep a worker busy for hours). Real
# images store nearly every chunk.
MAX_UNWRITTEN_CHUNKS = 100
CHECK_BYTES = 2**24
# overview(): bytes decoded per block while striding a level with no smaller pyramid level.
OVERVIEW_BLOCK_BYTES = 4 * 2**20
DEFAULT_OVERVIEW_PIXELS = 4_000_000
SUPPORTED_DTYPES = "unsigned or signed integers (uint8, uint16, int32, ...) or floats (float32, float64)"

# Axis names (lower case) with a fixed meaning. tifffile's one-letter axes are lower-cased.
CHANNEL_AXES = frozenset({"c", "s", "channel", "channels", "sample", "samples", "rgb", "band", "bands"})
# tifffile: Q = unknown ("other"), I = a plain sequence of pages.
UNKNOWN_AXES = frozenset({"q", "i", "other", "sequence", ""})
# Whole-slide TIFF flavours whose extra series are slide pictures, not the specimen.
WSI_KINDS = frozenset({"svs", "ndpi", "philips", "scn", "bif", "qpi"})
ASSOCIATED_SERIES = frozenset({"thumbnail", "label", "macro", "map", "overview"})


# --------------------------------------------------------------------------- axes rule


@dataclass(frozen=True)
class AxesPlan:
    """How an N-D array maps to 2-D images with channels.

    ``names`` are lower-case axis names of the full-resolution array of ``shape``;
    ``y``/``x`` are the positions of the image axes, ``channel_axes`` those stacked into
    the channel axis (in array order), ``index_axes`` those that select one image.
    """

    names: tuple[str, ...]
    shape: tuple[int, ...]
    y: int
    x: int
    channel_axes: tuple[int, ...]
    index_axes: tuple[int, ...]

    @property
    def channels(self) -> int:
        return int(np.prod([self.shape[a] for a in self.channel_axes], dtype=np.int64))

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.shape[self.y]), int(self.shape[self.x])

    def planes(self) -> list[dict[str, int]]:
        """Every image of the array: ``{axis name: index}`` over the index axes, in C order."""
        axes = self.index_axes
        return [dict(zip((self.names[a] for a in axes), values, strict=True)) for values in product(*(range(self.shape[a]) for a in axes))]



def plan_axes(names: Sequence[str], shape: Sequence[int]) -> AxesPlan:
    """Apply the axes rule to an array with named axes.

    Args:
        names: one name per axis (``"y"``, ``"x"``, ``"c"``, ``"t"``, ...; case-insensitive).
        shape: the array's shape.

    Raises:
        ValueError: a one-line reason (no y/x axis, repeated axes, several unknown axes,
            too many channels) that says how to fix the file.
    """
    names = tuple(str(n).lower() for n in names)
    shape = tuple(int(s) for s in shape)
    label = f"axes {axes_text(names)} of shape {shape}"
    if len(names) != len(shape):
        raise ValueError(f"{label}: {len(names)} axis names for a {len(shape)}-D array")
    repeated = sorted({n for n in names if names.count(n) > 1 and n not in UNKNOWN_AXES})
    if repeated:
        raise ValueError(f"{label}: axis {repeated[0]!r} occurs more than once")
    if "y" not in names or "x" not in names:
        raise ValueError(f"{label}: no y and x axes, so no 2-D image plane; label the axes (OME-TIFF / OME-Zarr axes, or zarr dimension_names)")
    unknown = [i for i, n in enumerate(names) if n in UNKNOWN_AXES]
    if len(unknown) > 1:
        raise ValueError(
            f"{label}: {len(unknown)} axes of unknown meaning, so channels cannot be told from separate images; "
            "write OME-TIFF/OME-Zarr with axes metadata (e.g. 'TCYX') or one image per file"
        )
    channel_axes = tuple(i for i, n in enumerate(names) if n in CHANNEL_AXES)
    index_axes = tuple(i for i, n in enumerate(names) if n not in CHANNEL_AXES and n not in ("y", "x"))
    plan = AxesPlan(names, shape, names.index("y"), names.index("x"), channel_axes, index_axes)
    if plan.channels > MAX_CHANNELS:
        raise ValueError(f"{label}: {plan.channels} channels, more than the {MAX_CHANNELS} supported; is an axis mislabelled as channels?")
    return plan


def axes_text(names: Sequence[str]) -> str:
    """``('t', 'c', 'y', 'x')`` -> ``TCYX``; longer names are listed: ``[time, y, x]``."""
    if all(len(n) == 1 for n in names):
        return "".join(names).upper()
    return "[" + ", ".join(names) + "]"


def guess_axes(shape: Sequence[int]) -> tuple[str, ...]:
    """Axis names of an array that carries none (a plain zarr array).

    ``(H, W)`` -> ``yx``; ``(H, W, C)`` when the last axis is <= 4 and the first is not;
    ``(C, H, W)`` when the first axis is <= 4 and the last is not. Anything else is
    ambiguous.

    Raises:
        ValueError: the shape is ambiguous; the message says how to label the axes.
    """
    shape = tuple(shape)
    fix = "name the axes (zarr v3 dimension_names, e.g. ['c', 'y', 'x'], or the _ARRAY_DIMENSIONS attribute) or write OME-Zarr"
    if len(shape) == 2:
        return ("y", "x")
    if len(shape) == 3:
        if shape[2] <= 4 < shape[0]:
            return ("y", "x", "c")
        if shape[0] <= 4 < shape[2]:
            return ("c", "y", "x")
        raise ValueError(f"3-D array of shape {shape} without axis names: cannot tell (H, W, C) from (C, H, W) or (Z, H, W); {fix}")
    raise ValueError(f"{len(shape)}-D array of shape {shape} without axis names; {fix}")


def check_image(hw: tuple[int, int], channels: int, dtype: np.dtype) -> None:
    """Refuse images we cannot segment.

    Raises:
        ValueError: unsupported pixel type, more than ``MAX_IMAGE_PIXELS`` pixels, or
            smaller than ``MIN_SIDE`` x ``MIN_SIDE``.
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "uif":
        raise ValueError(f"pixel type {dtype} is not supported; convert to {SUPPORTED_DTYPES}")
    if hw[0] * hw[1] > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"declares {hw[0] * hw[1]:,} pixels ({hw[0]}x{hw[1]}), more than the {MAX_IMAGE_PIXELS:,} segmented per image: "
            "a damaged header or a decompression bomb (split a real image this large into tiles)"
        )
    if hw[0] < MIN_SIDE or hw[1] < MIN_SIDE:
        raise ValueError(f"image is {hw[0]}x{hw[1]} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed to segment it")
    if channels < 1:
        raise ValueError(f"image has {channels} channels")


def native(dtype: Any) -> np.dtype:
    """The dtype in the machine's byte order (big-endian TIFFs come back as native arrays), in its
    canonical flavour: ``long long`` (what TIFF readers give for 64-bit integers) becomes the
    ``int64`` that zarr knows, though numpy calls them equal."""
    return np.dtype(np.dtype(dtype).newbyteorder("=").str)


# --------------------------------------------------------------------------- sources


class ImageSource:
    """One 2-D image (with channels) whose regions can be read without loading it all.

    Attributes:
        shape: ``(H, W)`` of the full-resolution image.
        channels: ``C >= 1``.
        dtype: native numpy dtype of every array returned.
        level_shapes: ``(H, W)`` of each pyramid level, full resolution first
            (``[shape]`` for images without a pyramid).
        source: the human-readable origin, for messages.
    """

    shape: tuple[int, int]
    channels: int
    dtype: np.dtype
    level_shapes: list[tuple[int, int]]
    source: str

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read the full-resolution region ``[y0:y1, x0:x1]``.

        Returns:
            ``(y1 - y0, x1 - x0, C)`` array of :attr:`dtype`.

        Raises:
            ValueError: the region is empty or not inside the image.
            ImageReadError: the file cannot be decoded there (truncated, corrupt).
        """
        y0, y1, x0, x1 = (_as_int(v) for v in (y0, y1, x0, x1))
        height, width = self.shape
        if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
            raise ValueError(f"region y[{y0}:{y1}] x[{x0}:{x1}] is empty or outside the {height}x{width} image {self.source}")
        return self._checked_read(0, y0, y1, x0, x1)

    def overview(self, max_pixels: int = DEFAULT_OVERVIEW_PIXELS) -> np.ndarray:
        """A downsampled view of the whole image, for statistics computed once per image.

        Takes the smallest pyramid level with at least ``min(max_pixels, H * W)`` pixels;
        if that level has more than ``max_pixels`` pixels, keeps every ``s``-th row and
        column with the smallest integer ``s`` that brings it to about ``max_pixels``,
        reading the level block by block (at most ``OVERVIEW_BLOCK_BYTES`` decoded at a
        time), so that memory stays ~ ``max_pixels * C * itemsize`` whatever the image size.

        Returns:
            ``(h, w, C)`` array of :attr:`dtype`; the whole image when it has at most
            ``max_pixels`` pixels.
        """
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        height, width = self.shape
        wanted = min(max_pixels, height * width)
        candidates = [i for i, (h, w) in enumerate(self.level_shapes) if h * w >= wanted] or [0]
        level = min(candidates, key=lambda i: self.level_shapes[i][0] * self.level_shapes[i][1])
        h, w = self.level_shapes[level]
        step = max(1, math.ceil(math.sqrt(h * w / max_pixels)))
        if step == 1:
            return self._checked_read(level, 0, h, 0, w)
        return self._strided(level, step)

    def close(self) -> None:
        """Release open files. Reading after ``close`` is an error."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, shape={self.shape}, channels={self.channels}, dtype={self.dtype}, levels={len(self.level_shapes)})"

    # -- what subclasses provide
    def _read_level(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """``(h, w, C)`` region of pyramid level ``level`` (coordinates of that level)."""
        raise NotImplementedError

    def _chunk_shape(self, level: int) -> tuple[int, int]:
        """``(rows, cols)`` of the storage chunks of a level (what a decoder reads at once)."""
        return self.level_shapes[level]

    # -- shared machinery
    def _checked_read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        try:
            out = self._read_level(level, y0, y1, x0, x1)
        except ImageReadError:
            raise
        except Exception as error:  # decoders raise many types (ValueError too: a bad compression code); report one line
            raise ImageReadError(f"{self.source}: cannot read region y[{y0}:{y1}] x[{x0}:{x1}] ({type(error).__name__}: {one_line(error)})") from None
        return np.ascontiguousarray(out, dtype=self.dtype)

    def _strided(self, level: int, step: int) -> np.ndarray:
        h, w = self.level_shapes[level]
        out = np.empty((-(-h // step), -(-w // step), self.channels), dtype=self.dtype)
        chunk_h, chunk_w = self._chunk_shape(level)
        chunk_h, chunk_w = max(1, min(chunk_h, h)), max(1, min(chunk_w, w))
        block_pixels = max(1, OVERVIEW_BLOCK_BYTES // (self.channels * self.dtype.itemsize))
        # blocks are whole chunks, so that every chunk is decoded exactly once
        block_w = min(w, chunk_w * max(1, int(math.sqrt(block_pixels)) // chunk_w))
        block_h = min(h, chunk_h * max(1, (block_pixels // block_w) // chunk_h))
        for by in range(0, h, block_h):
            first_y = -(-by // step) * step  # first kept row in this block
            if first_y >= min(h, by + block_h):
                continue
            for bx in range(0, w, block_w):
                first_x = -(-bx // step) * step
                if first_x >= min(w, bx + block_w):
                    continue
                block = self._checked_read(level, by, min(h, by + block_h), bx, min(w, bx + block_w))
                kept = block[first_y - by :: step, first_x - bx :: step]
                oy, ox = first_y // step, first_x // step
                out[oy : oy + kept.shape[0], ox : ox + kept.shape[1]] = kept
                del block, kept  # free before decoding the next block
        return out


class ArraySource(ImageSource):
    """An image already in memory: ``(H, W)`` or ``(H, W, C)`` array of a supported dtype."""

    def __init__(self, array: np.ndarray, source: str = "<array>") -> None:
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3:
            raise ImageReadError(f"{source}: expected (H, W) or (H, W, C), got shape {array.shape}")
        try:
            check_image(array.shape[:2], array.shape[2], array.dtype)
        except ValueError as error:
            raise ImageReadError(f"{source}: {error}") from None
        self.source = source
        self.dtype = native(array.dtype)
        self.shape = (int(array.shape[0]), int(array.shape[1]))
        self.channels = int(array.shape[2])
        self.level_shapes = [self.shape]
        self._array: np.ndarray | None = array

    def _data(self) -> np.ndarray:
        if self._array is None:
            raise ImageReadError(f"{self.source}: the source is closed")
        return self._array

    def _read_level(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self._data()[y0:y1, x0:x1].copy()

    def overview(self, max_pixels: int = DEFAULT_OVERVIEW_PIXELS) -> np.ndarray:
        data = self._data()  # already in memory: stride it directly
        height, width = self.shape
        step = max(1, math.ceil(math.sqrt(height * width / max(1, max_pixels))))
        return np.ascontiguousarray(data[::step, ::step], dtype=self.dtype)

    def close(self) -> None:
        self._array = None


class PlainSource(ArraySource):
    """A PNG/JPEG/BMP/GIF file, decoded whole on first use (these files are small)."""

    def __init__(self, path: str | Path | Location, shape: tuple[int, int], channels: int, dtype: Any, source: str | None = None) -> None:
        self.path = to_location(path)
        self.source = source or str(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.channels = int(channels)
        self.dtype = native(dtype)
        self.level_shapes = [self.shape]
        self._array = None
        self._lock = threading.Lock()
        self._closed = False

    def _data(self) -> np.ndarray:
        with self._lock:
            if self._closed:
                raise ImageReadError(f"{self.source}: the source is closed")
            if self._array is None:
                array = read_image_file(self.path)
                if array.ndim == 2:
                    array = array[:, :, None]
                if array.shape != (*self.shape, self.channels) or native(array.dtype) != self.dtype:
                    raise ImageReadError(
                        f"{self.source}: decoded as {array.shape} {array.dtype}, but its header said "
                        f"{(*self.shape, self.channels)} {self.dtype}; the file changed since discovery or is damaged"
                    )
                self._array = array
            return self._array

    def close(self) -> None:
        with self._lock:
            self._array = None
            self._closed = True


class AxesSource(ImageSource):
    """One image of an N-D array (zarr array, tifffile zarr store, memmap), with pyramid levels.

    Args:
        levels: array-likes supporting basic indexing (``a[3, 0:10, :]``), full resolution
            first; every level has the same axes as ``plan``. Levels whose non-spatial axes
            differ from level 0 are not used.
        plan: the axes rule applied to level 0.
        index: ``{axis name: index}`` of this image along the plan's index axes.
        source: for messages.
        on_close: called by :meth:`close` (closes the file).
    """

    def __init__(self, levels: Sequence[Any], plan: AxesPlan, index: dict[str, int], source: str, on_close: Any = None) -> None:
        self.source = source
        self._plan = plan
        self._on_close = on_close
        base = levels[0]
        if tuple(base.shape) != plan.shape:
            raise ImageReadError(f"{source}: array shape {tuple(base.shape)} differs from {plan.shape}")
        missing = [plan.names[a] for a in plan.index_axes if plan.names[a] not in index]
        if missing:
            raise ImageReadError(f"{source}: no index given for axes {missing}")
        for axis in plan.index_axes:
            value = int(index[plan.names[axis]])
            if not 0 <= value < plan.shape[axis]:
                raise ImageReadError(f"{source}: index {value} out of range for axis {plan.names[axis]!r} of size {plan.shape[axis]}")
        self._index = {plan.names[a]: int(index[plan.names[a]]) for a in plan.index_axes}
        self._levels: list[Any] = []
        self.level_shapes = []
        for level in levels:
            shape = tuple(level.shape)
            if len(shape) != len(plan.shape) or any(shape[a] != plan.shape[a] for a in plan.channel_axes):
                continue
            if shape[plan.y] > plan.shape[plan.y] or shape[plan.x] > plan.shape[plan.x] or min(shape[plan.y], shape[plan.x]) < 1:
                continue
            self._levels.append(level)
            self.level_shapes.append((int(shape[plan.y]), int(shape[plan.x])))
        self.shape = plan.hw
        self.channels = plan.channels
        self.dtype = native(base.dtype)

    def _read_level(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if not self._levels:
            raise ImageReadError(f"{self.source}: the source is closed")
        plan, array = self._plan, self._levels[level]
        shape = tuple(array.shape)
        key: list[Any] = []
        for axis, name in enumerate(plan.names):
            if axis == plan.y:
                key.append(slice(y0, y1))
            elif axis == plan.x:
                key.append(slice(x0, x1))
            elif axis in plan.channel_axes:
                key.append(slice(None))
            else:  # index axis; lower levels may be downsampled along it too (z in 3-D pyramids)
                key.append(min(shape[axis] - 1, self._index[name] * shape[axis] // plan.shape[axis]))
        data = array[tuple(key)]
        data = np.array(data) if isinstance(data, np.memmap) else np.asarray(data)  # never hand out views of a mapped file
        kept = [a for a in range(len(plan.names)) if a not in plan.index_axes]
        order = [kept.index(plan.y), kept.index(plan.x), *(kept.index(a) for a in plan.channel_axes)]
        return data.transpose(order).reshape(y1 - y0, x1 - x0, self.channels)

    def _chunk_shape(self, level: int) -> tuple[int, int]:
        array, plan = self._levels[level], self._plan
        chunks = getattr(array, "shards", None) or getattr(array, "chunks", None)
        if not chunks or isinstance(array, np.ndarray):  # memmap / in memory: any block works
            return 1, int(array.shape[plan.x])
        return int(chunks[plan.y]), int(chunks[plan.x])

    def close(self) -> None:
        self._levels = []
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()


# --------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class ProbedImage:
    """One image found inside a file or zarr store (what discovery turns into a record).

    ``parts``: ``(("series", 1), ("t", 3))``-style position of the image inside the file
    (empty when the file holds one image); ``node``: path of the zarr array or OME-Zarr
    image group inside the store (``""`` for the store itself, and for files); ``kind``:
    the reader the file's content asks for (``"plain"`` / ``"tiff"``, which may differ from
    its extension's: a PNG named ``.tif``), None to keep the extension's.
    """

    parts: tuple[tuple[str, int], ...] = ()
    node: str = ""
    selector: dict = field(default_factory=dict)
    shape: tuple[int, int] | None = None
    channels: int | None = None
    dtype: str | None = None
    error: str | None = None
    kind: str | None = None
    pixel_size_um: float | None = None  # from the file's metadata (io/pixelsize.py), None when unknown
    # a field of an OME-Zarr plate (NGFF plate -> well -> field metadata): (the plate group's
    # path in the store, "" for the store itself; the well's path "B/2"; the field's path "0")
    plate: tuple[str, str, str] | None = None
    channel_names: tuple[str, ...] | None = None  # one per channel ("" unnamed), from the metadata (io/channelnames.py)


def probe(path: str | Path | Location, kind: str) -> list[ProbedImage]:
    """List the images of one file or zarr store from its header/metadata (no pixel decoding).

    Never raises for a bad file: problems come back as a :class:`ProbedImage` with ``error``.
    For files (``kind`` ``"plain"`` or ``"tiff"``) the first bytes choose the reader: a TIFF
    named ``.png`` is probed as a TIFF and its images carry ``kind="tiff"``.
    """
    try:
        path = to_location(path)
        if kind in ("plain", "tiff"):
            error, size, head = read_head(path)
            if error:
                return [ProbedImage(error=error)]
            form = sniff_format(head)
            actual = "tiff" if form == "tiff" else ("plain" if form is not None else kind)
            found = [_probe_plain(path, size, head)] if actual == "plain" else _probe_tiff(path, size)
            return [replace(image, kind=actual) for image in found] if actual != kind else found
        if kind == "zarr":
            return _probe_zarr(path)
        return [ProbedImage(error=f"unknown input kind {kind!r}")]
    except Exception as error:  # a probe must not stop discovery
        return [ProbedImage(error=f"cannot read ({type(error).__name__}: {one_line(error)})")]


class _CappedReader(io.BufferedReader):
    """A local file whose ``read(n)`` never asks for more than what is left in it.

    A damaged TIFF can declare a strip of 2 GB in a 2 kB file; tifffile then calls
    ``read(2 GB)``, and a plain file object allocates the 2 GB before finding 2 kB to read.
    (fsspec files, for object stores, already cap their reads this way.)
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(0, self._size - self.tell()))
        return super().read(size)


def _ifd_chain_error(stream: Any) -> str | None:
    """Why the chain of IFDs (pages) of a TIFF cannot be followed, or None.

    tifffile follows the next-IFD offsets without remembering where it has been: an IFD that
    points back to itself or to an earlier one (one damaged offset) makes it list pages for
    ever. We walk the chain first and refuse a loop. Other damage is left to tifffile's own
    messages. NDPI files (8-byte next-IFD offsets in a classic TIFF) are not checked.
    """
    stream.seek(0)
    head = stream.read(16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None or len(head) < 16:
        return None
    version = struct.unpack(order + "H", head[2:4])[0]
    if version == 42:
        count_format, count_size, tag_size, offset_format, offset_size = "H", 2, 12, "I", 4
        offset = struct.unpack(order + "I", head[4:8])[0]
    elif version == 43:
        count_format, count_size, tag_size, offset_format, offset_size = "Q", 8, 20, "Q", 8
        offset = struct.unpack(order + "Q", head[8:16])[0]
    else:
        return None
    seen: set[int] = set()
    while offset:
        if offset in seen:
            return f"its chain of pages (IFDs) loops back to offset {offset} after {len(seen)} page(s): the file is damaged"
        seen.add(offset)
        stream.seek(offset)
        raw = stream.read(count_size)
        if len(raw) < count_size:
            break
        n_tags = struct.unpack(order + count_format, raw)[0]
        if n_tags > 4096:  # tifffile stops there itself ("suspicious number of tags")
            break
        if len(seen) == 1 and version == 42:
            tags = stream.read(n_tags * tag_size)
            if any(struct.unpack(order + "H", tags[i : i + 2])[0] == 65420 for i in range(0, len(tags) - 1, tag_size)):
                break  # Hamamatsu NDPI: offsets are 8 bytes, tifffile knows
        stream.seek(offset + count_size + n_tags * tag_size)
        raw = stream.read(offset_size)
        if len(raw) < offset_size:
            break
        offset = struct.unpack(order + offset_format, raw)[0]
    return None


def _open_tiff_file(path: Location) -> Any:
    """A tifffile.TiffFile of a local file or an object-store object (closing it closes the stream).

    Raises:
        ValueError: the chain of pages loops (:func:`_ifd_chain_error`).
    """
    import tifffile

    stream = open_binary(path) if is_remote(path) else _CappedReader(path)
    try:
        loop = _ifd_chain_error(stream)
        if loop:
            raise ValueError(loop)
        stream.seek(0)
        tif = tifffile.TiffFile(stream, name=path.name)
    except BaseException:
        stream.close()
        raise
    close_tif = tif.close

    def close() -> None:  # tifffile leaves a stream it was given open
        close_tif()
        stream.close()

    tif.close = close
    return tif


def _probe_plain(path: Location, size: int, head: bytes) -> ProbedImage:
    bomb = png_header_error(head, size)
    if bomb:
        return ProbedImage(error=bomb)
    from PIL import Image, ImageMode

    Image.MAX_IMAGE_PIXELS = MAX_IN_MEMORY_PIXELS  # same limit as read_image_file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_binary(path) as stream, Image.open(stream) as handle:
                mode, (width, height) = handle.mode, handle.size
                transparent = "transparency" in handle.info
    except Image.DecompressionBombError as error:  # "Image size (N pixels) exceeds limit of M pixels, ..."
        declared = re.search(r"\((\d+) pixels\)", str(error))
        return ProbedImage(error=too_many_pixels(int(declared.group(1)) if declared else MAX_IN_MEMORY_PIXELS + 1))
    except Exception as error:  # PIL raises many types
        return ProbedImage(error=f"cannot decode as an image ({type(error).__name__}: {one_line(error)})")
    refused = plain_size_error(width, height, pil_bytes_per_pixel(mode), size)
    if refused:
        return ProbedImage(error=refused)
    if mode == "P":
        channels, dtype = (4 if transparent else 3), np.dtype(np.uint8)
    elif mode.startswith("I;16"):
        channels, dtype = 1, np.dtype(np.uint16)
    else:
        try:
            info = ImageMode.getmode(mode)
        except KeyError:
            return ProbedImage(error=f"PIL image mode {mode!r} is not supported; save it as grey, RGB or RGBA")
        channels, dtype = len(info.bands), np.dtype(info.typestr)
    try:
        check_image((height, width), channels, dtype)
    except ValueError as error:
        return ProbedImage(error=str(error))
    return ProbedImage(shape=(height, width), channels=channels, dtype=str(native(dtype)))


def _is_associated(series: Any) -> bool:
    """A whole-slide file's label / macro / thumbnail picture (not the specimen)."""
    return str(getattr(series, "kind", "")).lower() in WSI_KINDS and str(series.name).lower() in ASSOCIATED_SERIES


def _tiff_plan(series: Any) -> AxesPlan:
    return plan_axes(tuple(series.axes.lower()), tuple(series.shape))


def _tiff_data_error(series: Any, file_size: int) -> str | None:
    """Why a TIFF series' pixel data cannot be there (checked from the header alone), or None:
    uncompressed data that would end past the end of the file, no strip/tile offsets at all,
    or more pixels than a file of this size can hold compressed (a decompression bomb)."""
    nbytes = int(series.nbytes)
    if series.dataoffset is not None:
        end = int(series.dataoffset) + nbytes
        if end > file_size:
            return (
                f"declares {nbytes:,} bytes of uncompressed pixel data, ending past the end of the {file_size:,}-byte file: "
                "a truncated file or a damaged header"
            )
        return None
    offsets = getattr(series.keyframe, "dataoffsets", ())
    if len(offsets) == 0 or not any(offsets):
        return "no strip or tile offsets (missing or unreadable tags): no pixel data to read; the file is damaged"
    if nbytes > CHECK_BYTES and nbytes > MAX_TIFF_RATIO * file_size:
        return (
            f"declares {nbytes:,} bytes of pixels in a file of {file_size:,} bytes (more than {MAX_TIFF_RATIO:,}:1): "
            "a damaged header or a decompression bomb"
        )
    return None


def _probe_tiff(path: Location, file_size: int) -> list[ProbedImage]:
    try:
        tif = _open_tiff_file(path)
    except Exception as error:
        return [ProbedImage(error=f"not a readable TIFF ({type(error).__name__}: {one_line(error)})")]
    with tif:
        try:
            all_series = list(tif.series)
        except Exception as error:
            return [ProbedImage(error=f"cannot list the TIFF's images ({type(error).__name__}: {one_line(error)})")]
        series_list = [(i, s) for i, s in enumerate(all_series) if not _is_associated(s)]
        if not series_list:
            return [ProbedImage(error="the TIFF holds no image series")]
        prefix_needed = len(series_list) > 1
        found: list[ProbedImage] = []
        for number, series in series_list:
            prefix = (("series", number),) if prefix_needed else ()
            try:
                plan = _tiff_plan(series)
                check_image(plan.hw, plan.channels, series.dtype)
                damage = _tiff_data_error(series, file_size)
                if damage:
                    raise ValueError(damage)
                if series.dataoffset is None:  # not memory-mappable: read by strips/tiles
                    chunk = tuple(series.keyframe.chunks)
                    chunk_pixels = int(np.prod(chunk[:2]))
                    if chunk_pixels > MAX_IN_MEMORY_PIXELS:
                        raise ValueError(
                            f"stored as one compressed strip/tile of {chunk_pixels:,} pixels, too large to read in pieces; "
                            "re-save it tiled (e.g. tifffile.imwrite(..., tile=(512, 512)))"
                        )
            except Exception as error:
                found.append(ProbedImage(parts=prefix, selector={"series": number}, error=f"{one_line(error)}"))
                continue
            pixel_size = tiff_pixel_size(tif, number)
            names = tiff_channel_names(tif, number, plan.channels)
            for index in plan.planes():
                parts = prefix + tuple((name, value) for name, value in index.items() if plan.shape[plan.names.index(name)] > 1)
                found.append(
                    ProbedImage(
                        parts=parts,
                        selector={"series": number, "axes": list(plan.names), "index": index},
                        shape=plan.hw,
                        channels=plan.channels,
                        dtype=str(native(series.dtype)),
                        pixel_size_um=pixel_size,
                        channel_names=names,
                    )
                )
        return found


def _ome_multiscales(attrs: dict) -> dict | None:
    """The first OME-Zarr multiscales entry of a group's attributes (NGFF 0.1-0.4 or 0.5)."""
    ome = attrs.get("ome")
    multiscales = ome.get("multiscales") if isinstance(ome, dict) else attrs.get("multiscales")
    if isinstance(multiscales, list) and multiscales and isinstance(multiscales[0], dict):
        return multiscales[0]
    return None


def _array_axis_names(array: Any) -> tuple[str, ...] | None:
    """Axis names a zarr array carries (v3 dimension_names, or xarray's _ARRAY_DIMENSIONS)."""
    names = getattr(array.metadata, "dimension_names", None)
    if not names:
        names = array.attrs.get("_ARRAY_DIMENSIONS")
    if names and len(names) == array.ndim and all(isinstance(n, str) and n for n in names):
        return tuple(n.lower() for n in names)
    return None


def _ome_axis_names(multiscale: dict, ndim: int) -> tuple[str, ...] | None:
    axes = multiscale.get("axes")
    if axes is None:
        return ("t", "c", "z", "y", "x") if ndim == 5 else None  # NGFF 0.1/0.2: always 5-D tczyx
    names = []
    for axis in axes:
        if isinstance(axis, dict):
            name = str(axis.get("name", "")).lower()
            names.append("c" if axis.get("type") == "channel" and name not in CHANNEL_AXES else name)
        else:
            names.append(str(axis).lower())
    return tuple(names)


def _zarr_image(
    node_path: str, levels: list[Any], level_paths: list[str], names: tuple[str, ...] | None, pixel_size_um: float | None = None, attrs: dict | None = None
) -> list[ProbedImage]:
    """The images of one zarr array (or OME-Zarr multiscale image, ``attrs`` its group's attributes)."""
    base = levels[0]
    try:
        if names is None:
            names = _array_axis_names(base) or guess_axes(base.shape)
        plan = plan_axes(names, base.shape)
        check_image(plan.hw, plan.channels, base.dtype)
        chunk_elements = int(np.prod(base.chunks, dtype=np.float64))
        if chunk_elements > MAX_IN_MEMORY_PIXELS:  # a read decodes whole chunks
            raise ValueError(
                f"stored in chunks of {chunk_elements:,} values (chunk shape {tuple(base.chunks)}), too large to read in pieces; "
                "rewrite it with smaller chunks (e.g. 1024 x 1024)"
            )
        if base.nbytes > CHECK_BYTES:
            written, total = base.nchunks_initialized, base.nchunks
            if written * MAX_UNWRITTEN_CHUNKS < total:
                raise ValueError(
                    f"declares {base.nbytes:,} bytes of pixels in {total:,} chunks but only {written:,} are stored: "
                    "an unfinished or damaged store (every missing chunk reads as the fill value)"
                )
    except Exception as error:
        return [ProbedImage(node=node_path, error=one_line(error))]
    channel_names = ome_zarr_channel_names(attrs, plan.channels) if attrs else None
    found = []
    for index in plan.planes():
        parts = tuple((name, value) for name, value in index.items() if plan.shape[plan.names.index(name)] > 1)
        selector = {"node": node_path, "levels": level_paths, "axes": list(plan.names), "index": index}
        found.append(
            ProbedImage(
                parts=parts, node=node_path, selector=selector, shape=plan.hw, channels=plan.channels, dtype=str(native(base.dtype)),
                pixel_size_um=pixel_size_um, channel_names=channel_names,
            )
        )  # fmt: skip
    return found


def _probe_zarr(path: Location) -> list[ProbedImage]:
    import zarr

    if not any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray")):
        return [ProbedImage(error="not a zarr store: no zarr.json, .zgroup or .zarray in the folder")]
    try:
        root = zarr.open(zarr_store(path, read_only=True), mode="r")
    except Exception as error:
        return [ProbedImage(error=f"not a readable zarr store ({type(error).__name__}: {one_line(error)})")]
    found: list[ProbedImage] = []
    plates: dict[str, dict[str, list[str]]] = {}
    _visit_zarr(root, "", found, plates)
    if not found:
        return [ProbedImage(error="the zarr store holds no array")]
    return [replace(image, plate=plate_position(image.node, plates)) for image in found]


def _ome_attrs(attrs: dict, key: str) -> Any:
    """An OME-Zarr attribute (``plate``, ``well``...) of NGFF 0.5 (under ``ome``) or 0.1-0.4."""
    ome = attrs.get("ome")
    return ome.get(key) if isinstance(ome, dict) and key in ome else attrs.get(key)


def _plate_wells(node: Any, plate: Any) -> dict[str, list[str]]:
    """The wells of an NGFF plate group and the field paths each well's metadata lists
    (``{"B/2": ["0", "1"]}``); wells or fields whose metadata is missing or malformed are left out
    (their images are then ordinary images of the store)."""
    wells: dict[str, list[str]] = {}
    for well in plate.get("wells", []) if isinstance(plate, dict) else []:
        path = well.get("path") if isinstance(well, dict) else None
        if not isinstance(path, str) or path.count("/") != 1:
            continue
        try:
            metadata = _ome_attrs(node[path].attrs.asdict(), "well")
        except Exception:  # a well listed but absent: no field of it is found either
            continue
        images = metadata.get("images", []) if isinstance(metadata, dict) else []
        wells[path] = [str(image["path"]) for image in images if isinstance(image, dict) and "path" in image]
    return wells


def plate_position(node_path: str, plates: dict[str, dict[str, list[str]]]) -> tuple[str, str, str] | None:
    """``(plate, well, field)`` of the image at ``node_path`` when it is a field that a plate's
    well metadata lists (``plates``: plate group path -> well path -> field paths), else None."""
    for plate_path, wells in plates.items():
        prefix = f"{plate_path}/" if plate_path else ""
        if not node_path.startswith(prefix):
            continue
        parts = node_path[len(prefix) :].split("/")
        if len(parts) == 3 and parts[2] in wells.get(f"{parts[0]}/{parts[1]}", ()):
            return plate_path, f"{parts[0]}/{parts[1]}", parts[2]
    return None


def _visit_zarr(node: Any, node_path: str, found: list[ProbedImage], plates: dict[str, dict[str, list[str]]]) -> None:
    import zarr

    if isinstance(node, zarr.Array):
        found.extend(_zarr_image(node_path, [node], [""], None))
        return
    try:
        attrs = node.attrs.asdict()
        plate = _ome_attrs(attrs, "plate")
        if plate is not None:
            plates[node_path] = _plate_wells(node, plate)
        multiscale = _ome_multiscales(attrs)
        if multiscale is not None:
            paths = [str(d["path"]) for d in multiscale.get("datasets", [])]
            if not paths:
                raise ValueError("OME-Zarr multiscales without datasets")
            levels = [node[p] for p in paths]
            if not all(isinstance(level, zarr.Array) for level in levels):
                raise ValueError("an OME-Zarr dataset path is not an array")
            found.extend(_zarr_image(node_path, levels, paths, _ome_axis_names(multiscale, levels[0].ndim), ome_zarr_pixel_size(multiscale), attrs))
            return
        members = sorted(node.members(), key=lambda m: m[0])
    except Exception as error:
        found.append(ProbedImage(node=node_path, error=f"cannot read zarr group ({type(error).__name__}: {one_line(error)})"))
        return
    for name, child in members:
        if name.startswith(".") or name == "labels":  # OME-Zarr label images are outputs, not inputs
            continue
        _visit_zarr(child, f"{node_path}/{name}" if node_path else name, found, plates)


# --------------------------------------------------------------------------- open


def open_source(record: ImageRecord) -> ImageSource:
    """Open the image a discovery record points at, for region reads.

    Raises:
        ImageReadError: one line naming the source and the reason (the record's own
            error, a file that vanished or changed since discovery, an undecodable file).
    """
    if record.error:
        raise ImageReadError(f"{record.source}: {record.error}")
    try:
        if record.kind == "plain":
            source: ImageSource = PlainSource(record.path, record.shape, record.channels, record.dtype, record.source)
        elif record.kind == "tiff":
            source = _open_tiff(record)
        elif record.kind == "zarr":
            source = _open_zarr(record)
        else:
            raise ImageReadError(f"{record.source}: unknown input kind {record.kind!r}; expected 'plain', 'tiff' or 'zarr'")
    except ImageReadError:
        raise
    except Exception as error:
        raise ImageReadError(f"{record.source}: cannot open ({type(error).__name__}: {one_line(error)})") from None
    found = (source.shape, source.channels, str(source.dtype))
    expected = (tuple(record.shape or ()), record.channels, record.dtype)
    if found != expected:
        source.close()
        raise ImageReadError(f"{record.source}: is now {found}, discovery saw {expected}; the file changed since discovery, discover again")
    return source


def _open_tiff(record: ImageRecord) -> ImageSource:
    import zarr

    selector = record.selector
    location = to_location(record.path)
    try:
        tif = _open_tiff_file(location)
    except Exception as error:
        raise ImageReadError(f"{record.source}: not a readable TIFF ({type(error).__name__}: {one_line(error)})") from None
    try:
        series = tif.series[int(selector["series"])]
        plan = _tiff_plan(series)
        if list(plan.names) != list(selector["axes"]):
            raise ImageReadError(f"{record.source}: axes are now {plan.names}, discovery saw {selector['axes']}; discover again")
        levels: list[Any] = []
        for number, level in enumerate(series.levels):
            if number == 0 and series.dataoffset is not None and getattr(series, "transform", None) is None and not is_remote(location):
                # uncompressed and contiguous: map it, no decoding at all
                dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
                levels.append(np.memmap(record.path, dtype=dtype, mode="r", offset=series.dataoffset, shape=tuple(series.shape)))
                continue
            try:
                levels.append(zarr.open_array(series.aszarr(level=number), mode="r"))
            except Exception:
                if number == 0:
                    if int(np.prod(level.shape)) > MAX_IN_MEMORY_PIXELS:
                        raise
                    levels.append(level.asarray())  # odd layouts tifffile's zarr store refuses: small enough to decode
        return AxesSource(levels, plan, selector["index"], record.source, on_close=tif.close)
    except BaseException:
        tif.close()
        raise


def _open_zarr(record: ImageRecord) -> ImageSource:
    import zarr

    selector = record.selector
    try:
        root = zarr.open(zarr_store(to_location(record.path), read_only=True), mode="r")
        node = root[selector["node"]] if selector["node"] else root
        levels = [node if path == "" else node[path] for path in selector["levels"]]
    except Exception as error:
        raise ImageReadError(f"{record.source}: cannot open the zarr array ({type(error).__name__}: {one_line(error)})") from None
    plan = plan_axes(selector["axes"], levels[0].shape)
    return AxesSource(levels, plan, selector["index"], record.source)


# --------------------------------------------------------------------------- helpers


def one_line(error: BaseException) -> str:
    """The first line of an exception's message, printable (:func:`printable`), at most 200 characters."""
    text = str(error).strip().splitlines()
    return printable(text[0])[:200] if text else type(error).__name__


def _as_int(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"region bounds must be integers, got {value!r}")
    return int(value)


def file_pixel_size(path: str | Path | Location) -> float | None:
    """The pixel size (micrometres) that an image file's metadata declares for its first image,
    or None (unknown, or not a file we read metadata from: :mod:`nucleibatch.io.pixelsize`)."""
    found = probe(path, "plain")  # the file's first bytes choose the reader
    return found[0].pixel_size_um if found else None
