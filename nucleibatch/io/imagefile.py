"""Reading one plain 2-D image file (PNG, JPEG, TIFF) into memory, and the checks that keep
such reads safe: content sniffing (the bytes, not the extension, choose the decoder), and
refusing decompression bombs from their header before anything is allocated."""

from __future__ import annotations

import io
import stat
import struct
from pathlib import Path

import numpy as np

from ..errors import ImageReadError
from .location import Location, is_remote, open_binary, to_location

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
TIFF_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = PIL_SUFFIXES | TIFF_SUFFIXES
# Refuse images whose header declares more pixels than this before decoding them
# (a decompression bomb: a tiny file that would allocate gigabytes).
MAX_IN_MEMORY_PIXELS = 1_000_000_000
# Bytes read from the start of a file to tell its format and check its header.
HEAD_BYTES = 64
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


def sniff_format(head: bytes) -> str | None:
    """The format of a file from its first bytes: ``"tiff"``, ``"png"``, ``"jpeg"``,
    ``"gif"``, ``"bmp"``, or None when the bytes are none of these."""
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM":
        return "bmp"
    return None


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


def read_head(path: Location) -> tuple[str | None, int, bytes]:
    """``(error, size, first HEAD_BYTES bytes)`` of a file; ``error`` says why it cannot be
    read (cannot open, not a regular file, empty), else None."""
    try:
        info = path.stat()
    except OSError as error:
        return f"cannot open ({error.strerror or error})", 0, b""
    if not is_remote(path) and not stat.S_ISREG(info.st_mode):
        kind = "a named pipe" if stat.S_ISFIFO(info.st_mode) else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "a folder" if stat.S_ISDIR(info.st_mode) else "special"
        return f"not a regular file ({kind}); give the image file itself", 0, b""
    size = int(info.st_size)
    if size == 0:
        return "empty file (0 bytes)", 0, b""
    try:
        with open_binary(path) as handle:
            head = handle.read(HEAD_BYTES)
    except OSError as error:
        return f"cannot open ({error.strerror or error})", size, b""
    return None, size, head


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


def printable(text: str) -> str:
    """``text`` with what cannot be shown on one line escaped: file-name bytes that are not
    UTF-8 (Python's surrogate escapes) as ``\\xNN``, control and other unprintable characters
    (newline, tab, ...) as ``\\n``, ``\\t``, ``\\x1b``, ``\\u200b``. Printable text (any
    script, spaces included) is unchanged."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if "\udc80" <= char <= "\udcff":
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif char.isprintable():
            out.append(char)
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _check_pixels(name: str, n_pixels: int) -> None:  # TIFF series read whole (training data)
    if n_pixels > MAX_IN_MEMORY_PIXELS:
        raise ImageReadError(f"{name}: {too_many_pixels(n_pixels)}")


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return printable(lines[0])[:200] if lines else ""
