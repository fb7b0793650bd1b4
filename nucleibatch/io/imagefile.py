"""Reading one plain 2-D image file (PNG, JPEG, TIFF) into memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ImageReadError
from .location import Location, open_binary, to_location

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
TIFF_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = PIL_SUFFIXES | TIFF_SUFFIXES
# Refuse images whose header declares more pixels than this before decoding them
# (a decompression bomb: a tiny file that would allocate gigabytes).
MAX_IN_MEMORY_PIXELS = 1_000_000_000


def read_image_file(path: str | Path | Location) -> np.ndarray:
    """Read a PNG/JPEG/BMP/TIFF file as ``(H, W)`` or ``(H, W, C)`` with its stored dtype.

    Raises:
        ImageReadError: naming the file and the reason (missing, empty, truncated,
            not an image, too large).
    """
    path = to_location(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageReadError(f"{path}: cannot open ({error.strerror or error})") from None
    if size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    suffix = path.suffix.lower()
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            with open_binary(path) as stream, tifffile.TiffFile(stream, name=path.name) as tif:
                series = tif.series[0]
                _check_pixels(path, int(np.prod(series.shape)))
                array = series.asarray()
        else:
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = MAX_IN_MEMORY_PIXELS
            with open_binary(path) as stream, Image.open(stream) as handle:
                _check_pixels(path, handle.width * handle.height)
                if handle.mode == "P":
                    handle = handle.convert("RGBA" if "transparency" in handle.info else "RGB")
                elif handle.mode in ("I;16", "I;16B", "I;16L"):
                    return np.array(handle).astype(np.uint16)
                array = np.array(handle)
    except ImageReadError:
        raise
    except Exception as error:  # decoders raise many types; report one line
        raise ImageReadError(f"{path}: cannot decode as an image ({type(error).__name__}: {_one_line(error)})") from None
    return np.asarray(array)


def _check_pixels(path: Location, n_pixels: int) -> None:
    if n_pixels > MAX_IN_MEMORY_PIXELS:
        raise ImageReadError(
            f"{path}: declares {n_pixels:,} pixels, more than the {MAX_IN_MEMORY_PIXELS:,} read into memory; "
            "convert it to a tiled TIFF or OME-Zarr so it is read lazily"
        )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""
