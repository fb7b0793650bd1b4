"""Plain images: PNG / JPEG / BMP / GIF, decoded with PIL, whole (such files are small).

:func:`read_image_file` reads one image file into memory (TIFF too: the annotated images and
label images of training data); :class:`PlainSource` decodes a plain image once, on its first
read, and keeps it; the process keeps the last ones decoded (:class:`DecodedImages`), so that an
image's plan and its blocks' read, units of one process, decode it once. A header declaring more
than such a file can hold (a decompression bomb, a truncated file) is refused before anything is
allocated.
"""

from __future__ import annotations

import io
import re
import struct
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ImageReadError
from ..location import Location, fingerprint, is_remote, open_binary, to_location
from .files import TIFF_SUFFIXES, one_line, printable, read_head, sniff_format
from .source import MAX_IN_MEMORY_PIXELS, ArraySource, ProbedImage, check_image, native

# zlib (deflate) cannot compress more than 1032:1, so a complete PNG holds at least
# 1/1032 of its decoded scanlines; we refuse, with some margin, a PNG whose header
# declares more than this many times its file size when that is more than PNG_CHECK_BYTES.
PNG_MAX_RATIO = 1100
PNG_CHECK_BYTES = 2**24
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel of each PNG colour type
# Any PIL format (BMP, GIF, JPEG, ...): a header declaring more than PLAIN_CHECK_BYTES of
# decoded pixels, and more than PLAIN_MAX_RATIO times the file's size, is refused the same
# way (raw BMP rows must all be in the file; LZW, RLE and JPEG stay far below 10^4 : 1 on
# real images).
PLAIN_MAX_RATIO = 10_000
PLAIN_CHECK_BYTES = 2**26


def probe_plain(path: Location, size: int, head: bytes) -> ProbedImage:
    """The image of a PNG/JPEG/BMP/GIF file of ``size`` bytes starting with ``head``, from its
    header (``error`` set when it cannot or must not be decoded)."""
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


class DecodedImages:
    """The local plain images this process decoded last, read-only, by file and fingerprint (size
    and modification time: a file rewritten since is decoded again), up to ``max_bytes`` in all,
    the oldest dropped first. Object-store files are not kept: checking their fingerprint would
    cost requests that the decode itself does not."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._arrays: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        with self._lock:
            array = self._arrays.get(key)
            if array is not None:
                self._arrays.move_to_end(key)
            return array

    def put(self, key: tuple[str, str], array: np.ndarray) -> None:
        if array.nbytes > self.max_bytes:
            return
        with self._lock:
            self._arrays[key] = array
            self._arrays.move_to_end(key)
            while sum(a.nbytes for a in self._arrays.values()) > self.max_bytes:
                self._arrays.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._arrays.clear()


# plain images are small (a plate field, a DSB image): the images planned ahead of their read
# (a few dozen, the driver bounds them) fit, 0.3 to 4 MB each
DECODED = DecodedImages(96 * 2**20)


def forget_decoded_images() -> None:
    """Drop the decoded images this process keeps (a run's end: a long-lived process, a notebook
    that runs ``segment`` again and again, does not hold the last run's images)."""
    DECODED.clear()


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
                version = None if is_remote(self.path) else fingerprint(self.path)
                key = (str(self.path), version or "")
                array = DECODED.get(key) if version else None
                if array is None:
                    array = read_image_file(self.path)
                    if array.ndim == 2:
                        array = array[:, :, None]
                    array.flags.writeable = False  # reads copy; the pixels may be shared (DECODED)
                    if version:
                        DECODED.put(key, array)
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


def read_image_file(path: str | Path | Location) -> np.ndarray:
    """Read a PNG/JPEG/BMP/GIF/TIFF file as ``(H, W)`` or ``(H, W, C)`` with its stored dtype.

    The file's first bytes choose the decoder (a PNG named ``.tif`` is read as the PNG it
    is); the extension decides only for bytes of no known format.

    Raises:
        ImageReadError: naming the file and the reason (missing, empty, truncated,
            not an image, too large).
    """
    path = to_location(path)
    name = printable(str(path))
    error, size, head = read_head(path)
    if error:
        raise ImageReadError(f"{name}: {error}")
    form = sniff_format(head)
    bomb = png_header_error(head, size)
    if bomb:
        raise ImageReadError(f"{name}: {bomb}")
    try:
        if form == "tiff" or (form is None and path.suffix.lower() in TIFF_SUFFIXES):
            import tifffile

            with open_binary(path) as stream, tifffile.TiffFile(stream, name=path.name) as tif:
                series = tif.series[0]
                _check_pixels(name, int(np.prod(series.shape)))
                array = series.asarray()
        else:
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = MAX_IN_MEMORY_PIXELS
            with open_binary(path) as stream:
                # decoded whole anyway; from memory, a damaged length field (a PNG chunk of 4 GB)
                # makes PIL's read(n) return what there is instead of allocating n bytes first
                data = io.BytesIO(stream.read())
            with Image.open(data) as handle:
                refused = plain_size_error(handle.width, handle.height, pil_bytes_per_pixel(handle.mode), size)
                if refused:
                    raise ImageReadError(f"{name}: {refused}")
                if handle.mode == "P":
                    handle = handle.convert("RGBA" if "transparency" in handle.info else "RGB")
                elif handle.mode in ("I;16", "I;16B", "I;16L"):
                    return np.array(handle).astype(np.uint16)
                array = np.array(handle)
    except ImageReadError:
        raise
    except Exception as error:  # decoders raise many types; report one line
        raise ImageReadError(f"{name}: cannot decode as an image ({type(error).__name__}: {_one_line(error)})") from None
    return np.asarray(array)


def png_header_error(head: bytes, file_size: int) -> str | None:
    """Why a PNG must not be decoded, from its first 33 bytes and its size, or None.

    A header that declares more than ``MAX_IN_MEMORY_PIXELS`` pixels, or more decoded bytes
    than deflate's 1:1032 compression limit lets a file of ``file_size`` bytes hold (beyond
    ``PNG_CHECK_BYTES``), is a truncated file or a decompression bomb: decoding it would
    allocate the whole image first.
    """
    if sniff_format(head) != "png" or len(head) < 33 or head[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    pixels = width * height
    if pixels > MAX_IN_MEMORY_PIXELS:
        return too_many_pixels(pixels)
    row_bytes = 1 + -(-width * _PNG_SAMPLES.get(colour, 4) * max(depth, 1) // 8)
    decoded = height * row_bytes
    if decoded > PNG_CHECK_BYTES and decoded > PNG_MAX_RATIO * file_size:
        return (
            f"declares {width}x{height} pixels ({decoded / 1e6:,.0f} MB decoded) in a file of {file_size:,} bytes, "
            "more than PNG compression can hold: a truncated file or a decompression bomb"
        )
    return None


def plain_size_error(width: int, height: int, bytes_per_pixel: int, file_size: int) -> str | None:
    """Why a PNG/JPEG/BMP/GIF of this declared size must not be decoded whole, or None:
    more than ``MAX_IN_MEMORY_PIXELS`` pixels, or more decoded bytes than
    ``PLAIN_MAX_RATIO`` times the file size (above ``PLAIN_CHECK_BYTES``)."""
    pixels = width * height
    if pixels > MAX_IN_MEMORY_PIXELS:
        return too_many_pixels(pixels)
    decoded = pixels * bytes_per_pixel
    if decoded > PLAIN_CHECK_BYTES and decoded > PLAIN_MAX_RATIO * file_size:
        return (
            f"declares {width}x{height} pixels ({decoded / 1e6:,.0f} MB decoded) in a file of {file_size:,} bytes "
            f"(more than {PLAIN_MAX_RATIO:,}:1): a truncated file, a damaged header or a decompression bomb"
        )
    return None


def pil_bytes_per_pixel(mode: str) -> int:
    """Bytes per pixel of the array a PIL image of ``mode`` becomes (palette: RGB(A), 4)."""
    from PIL import ImageMode

    if mode in ("P", "PA"):
        return 4
    if mode.startswith("I;16"):
        return 2
    try:
        info = ImageMode.getmode(mode)
    except KeyError:
        return 4
    return max(1, len(info.bands) * np.dtype(info.typestr).itemsize)


def too_many_pixels(n_pixels: int) -> str:
    return (
        f"declares {n_pixels:,} pixels, more than the {MAX_IN_MEMORY_PIXELS:,} a PNG/JPEG/BMP/GIF may have (decoded whole into memory); "
        "convert it to a tiled TIFF or OME-Zarr so it is read lazily"
    )


def _check_pixels(name: str, n_pixels: int) -> None:  # TIFF series read whole (training data)
    if n_pixels > MAX_IN_MEMORY_PIXELS:
        raise ImageReadError(f"{name}: {too_many_pixels(n_pixels)}")


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return printable(lines[0])[:200] if lines else ""
