"""A 16-bit greyscale PNG encoder that streams a label array band by band.

A zlib stream of our own (PNG 'Sub' filter) is fed one band of rows at a time, so peak memory
is one band (at most one row of chunks) whatever the image's size.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..output.atomic import replaced_on_success


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
