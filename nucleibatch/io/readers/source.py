"""What every reader gives and every image passes.

:class:`ImageSource` is one 2-D image (with channels) whose regions are read without loading it
all; :class:`ArraySource` is one already in memory, :class:`AxesSource` one image of an N-D array
(zarr, tifffile's zarr store, a memory map) picked by the axes rule (:mod:`.axes`).
:class:`ProbedImage` is what a format's probe finds in a file, before any pixel is decoded, and
:func:`check_image` the limits on images we segment, whatever the format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import ImageReadError
from .axes import AxesPlan
from .files import one_line

# Smallest image side we segment (the network's receptive field needs some context).
MIN_SIDE = 8
# Largest image (H x W) we segment, whatever the format: 10^11 pixels is ~7x the largest
# whole-slide scans; a header declaring more is damaged or a decompression bomb (a 150-byte
# TIFF can declare 10^6 x 10^6 pixels of missing tiles, that would take days to "segment").
MAX_IMAGE_PIXELS = 100_000_000_000
# Refuse images whose header declares more pixels than this before decoding them whole (a
# decompression bomb: a tiny file that would allocate gigabytes), and storage chunks (TIFF
# strips/tiles, zarr chunks) larger than this, which a region read must decode whole.
MAX_IN_MEMORY_PIXELS = 1_000_000_000
# Headers declaring more pixel bytes than this are checked against what the file can hold.
CHECK_BYTES = 2**24
# overview(): bytes decoded per block while striding a level with no smaller pyramid level.
OVERVIEW_BLOCK_BYTES = 4 * 2**20
DEFAULT_OVERVIEW_PIXELS = 4_000_000
SUPPORTED_DTYPES = "unsigned or signed integers (uint8, uint16, int32, ...) or floats (float32, float64)"


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
    pixel_size_um: float | None = None  # from the file's metadata (readers/pixelsize.py), None when unknown
    # a field of an OME-Zarr plate (NGFF plate -> well -> field metadata): (the plate group's
    # path in the store, "" for the store itself; the well's path "B/2"; the field's path "0")
    plate: tuple[str, str, str] | None = None
    channel_names: tuple[str, ...] | None = None  # one per channel ("" unnamed), from the metadata (tiff.py, ome_zarr.py)


def _as_int(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"region bounds must be integers, got {value!r}")
    return int(value)
