"""A corpus of bad and awkward inputs for `nucleibatch segment` (issue 5, point 3).

``write_corpus(folder)`` writes, with the libraries users use (PIL, tifffile, zarr) or byte
by byte where a library would refuse to write such a file: empty, truncated and bit-flipped
PNG / JPEG / TIFF, wrong extensions, 1x1 / 1xN / 7x7 images, all-black, saturated and
constant images, NaN / inf floats, 16-bit images with a dynamic range of a few grey levels,
5-D arrays, decompression bombs (PNG, GIF, TIFF and zarr headers that declare 10^12 pixels,
and a PNG declaring 9 * 10^8 16-bit RGBA pixels in 100 bytes), TIFFs with a bogus IFD
offset or huge tiles, an OME-TIFF whose OME-XML contradicts its pages, zarr stores with a
missing chunk, a corrupt chunk or a corrupt zarr.json, a folder named like an image, BMP,
GIF, palette, RGBA, 2-channel, int8 / int32 / float16 / bool images, an unreadable file,
symbolic link loops and a dangling link, a FIFO, a link to /dev/zero, and file names with
spaces, Unicode, a newline and bytes that are not UTF-8.

It returns ``{image_id: Expected}``: what a correct ``segment`` run does with each item
(``ok``, with a sanity check on the nuclei count, ``failed`` with words of the reason, or
``skipped``: no row at all). The expectations are the rules; tests/test_bad_corpus.py
checks a real run against them.

The "committed generator" of the issue: ``python tests/helpers/bad_corpus.py DIR`` writes the corpus
to DIR and prints the table of items and expected outcomes.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# 10^12 pixels: what a decompression bomb declares in our corpus
BOMB_SIDE = 1_000_000


@dataclass(frozen=True)
class Expected:
    """What ``segment`` must do with one corpus item.

    outcome: ``"ok"`` (a row with status ok), ``"failed"`` (status failed; every word of
        ``words`` is in the one-line error) or ``"skipped"`` (no row: not an input).
    nuclei: for ``ok``: ``"none"`` (0 nuclei), ``"some"`` (> 0) or ``None`` (not checked).
    like: for ``ok``: the id of the item showing the same picture (:data:`REFERENCE`) whose
        nuclei this one must reproduce (another format, dtype, name or channel layout of the
        same pixels); None when the picture differs.
    note: why (printed in the table).
    """

    outcome: str
    words: tuple[str, ...] = ()
    nuclei: str | None = None
    note: str = ""
    like: str | None = None


# the reference image: most "ok" items hold the same picture in another form
REFERENCE = "good.png"


def ok(nuclei: str | None = "some", note: str = "", like: str | None = None) -> Expected:
    return Expected("ok", (), nuclei, note, like)


def same(note: str) -> Expected:
    """``ok`` with the nuclei of :data:`REFERENCE` (the same picture in another form)."""
    return Expected("ok", (), "some", note, REFERENCE)


def failed(*words: str, note: str = "") -> Expected:
    return Expected("failed", tuple(words), None, note, None)


def skipped(note: str = "") -> Expected:
    return Expected("skipped", (), None, note, None)


# --------------------------------------------------------------------------- image data


def nuclei_image(shape=(96, 128), seed=0) -> np.ndarray:
    """``(H, W)`` float64 in [0, 1]: synthetic nuclei (bright) on a dark background."""
    from nucleibatch.synthetic import synthetic_nuclei

    image, _ = synthetic_nuclei(shape, n_nuclei=8, seed=seed, dtype=np.uint16)
    return image / 65535.0


def as_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(image * 255).astype(np.uint8)


# --------------------------------------------------------------------------- byte-level damage


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(path: Path, width=100_000, height=100_000, bit_depth=8, colour_type=0) -> Path:
    """A tiny PNG whose header declares ``width x height`` pixels (a decompression bomb).

    ``colour_type`` 0 = grey, 2 = RGB, 6 = RGBA; ``bit_depth`` 8 or 16.
    """
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + png_chunk(b"IEND", b""))
    return path


def gif_bomb(path: Path, width=65535, height=65535) -> Path:
    """A GIF whose logical screen and only frame declare ``width x height`` pixels."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    path.write_bytes(screen + frame + b"\x3b")
    return path


def classic_tiff(entries: list[tuple[int, int, int, int | bytes]], data: bytes = b"", ifd_offset: int | None = None) -> bytes:
    """A little-endian classic TIFF with one IFD built from raw tag entries.

    ``entries``: ``(tag, type, count, value)``; ``type`` 3 (SHORT) or 4 (LONG) with an int
    value, or any type with ``bytes`` (stored after the IFD when longer than 4 bytes). The
    pixel ``data`` follows; a LONG value of ``-1`` is replaced by the data's offset (for
    StripOffsets / TileOffsets). ``ifd_offset`` overrides the header's IFD offset (damage).
    """
    entries = sorted(entries)
    n = len(entries)
    extra_at = 8 + 2 + 12 * n + 4
    extra = b"".join(v for _, _, _, v in entries if isinstance(v, bytes) and len(v) > 4)
    data_at = extra_at + len(extra)
    body, cursor = struct.pack("<H", n), extra_at
    for tag, kind, count, value in entries:
        if isinstance(value, bytes):
            if len(value) > 4:
                body += struct.pack("<HHII", tag, kind, count, cursor)
                cursor += len(value)
            else:
                body += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")
        elif kind == 3:
            body += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            body += struct.pack("<HHII", tag, kind, count, data_at if value == -1 else value)
    body += struct.pack("<I", 0)
    header = b"II*\x00" + struct.pack("<I", 8 if ifd_offset is None else ifd_offset)
    return header + body + extra + data


def tiff_bomb(path: Path, side: int = BOMB_SIDE, tiled: bool = True) -> Path:
    """A ~150-byte TIFF declaring ``side x side`` uint8 pixels.

    tiled: zlib tiles of 1024 x 1024 whose offset/bytecount arrays point past the end of the
    file (tifffile reads the missing tiles as zeros: lazily, a 10^12-pixel image of nothing);
    otherwise one uncompressed strip of 4 GB declared in a file of a few bytes.
    """
    common = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 1, 8), (262, 3, 1, 1), (277, 3, 1, 1)]
    if tiled:
        tiles = (-(-side // 1024)) ** 2
        entries = common + [(259, 3, 1, 8), (322, 4, 1, 1024), (323, 4, 1, 1024), (324, 4, tiles, 200), (325, 4, tiles, 200)]
    else:
        entries = common + [(259, 3, 1, 1), (278, 4, 1, side), (273, 4, 1, -1), (279, 4, 1, 2**32 - 1)]
    path.write_bytes(classic_tiff(entries, zlib.compress(b"\x00" * 1000)))
    return path


def tiff_shared_tile_bomb(path: Path, side: int = 60_000, tile: int = 1024) -> Path:
    """A ~30 kB TIFF declaring ``side x side`` uint8 pixels in zlib tiles that all point at the
    same one compressed tile of zeros (valid structure; 10^5 : 1 "compression")."""
    tiles = (-(-side // tile)) ** 2
    payload = zlib.compress(b"\x00" * tile * tile)
    entries = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1), (277, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile)]
    counts = struct.pack(f"<{tiles}I", *([len(payload)] * tiles))
    data_at = 8 + 2 + 12 * (len(entries) + 2) + 4 + 2 * len(counts)  # after the IFD and both arrays
    offsets = struct.pack(f"<{tiles}I", *([data_at] * tiles))
    data = classic_tiff(entries + [(324, 4, tiles, offsets), (325, 4, tiles, counts)], payload)
    assert data[data_at:] == payload
    path.write_bytes(data)
    return path


def flip_bits(data: bytes, positions: list[int]) -> bytes:
    """``data`` with bit ``p % 8`` of byte ``p // 8`` inverted for every ``p``."""
    out = bytearray(data)
    for p in positions:
        out[p // 8] ^= 1 << (p % 8)
    return bytes(out)


def png_idat_span(data: bytes) -> tuple[int, int]:
    """Byte range ``[start, end)`` of the first IDAT chunk's data in a PNG."""
    at = 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        if data[at + 4 : at + 8] == b"IDAT":
            return at + 8, at + 8 + length
        at += 12 + length
    raise ValueError("no IDAT chunk")


def tiff_strip(data: bytes) -> tuple[int, int]:
    """``(offset, byte count)`` of the first strip or tile of a TIFF held in ``data``."""
    import io

    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages.first
        return int(page.dataoffsets[0]), int(page.databytecounts[0])


def truncated(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


# --------------------------------------------------------------------------- writers


def _png_bytes(image: np.ndarray, **save_args) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=save_args.pop("format", "PNG"), **save_args)
    return buffer.getvalue()


def _tiff_bytes(image: np.ndarray, **kwargs) -> bytes:
    import io

    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, **kwargs)
    return buffer.getvalue()


def _save(path: Path, image, **save_args) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, **save_args)


def _tiff(path: Path, data: np.ndarray, **kwargs) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data, **kwargs)


def permissions_block_reading(path: Path) -> bool:
    """True when this process cannot read ``path`` (chmod 000 does not stop root, or CAP_DAC_OVERRIDE)."""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except PermissionError:
        return True
    return False


def permissions_block_listing(folder: Path) -> bool:
    """True when this process cannot list ``folder`` (see :func:`permissions_block_reading`)."""
    try:
        os.listdir(folder)
    except PermissionError:
        return True
    return False


def write_corpus(folder: str | os.PathLike) -> dict[str, Expected]:
    """Write every bad and awkward input into ``folder`` (created; must not hold other files).

    Returns ``{image_id: Expected}`` for a ``segment`` run whose INPUT is ``folder``. Items
    that are not inputs at all are listed with outcome ``skipped`` (no row may have that id).
    Everything is deterministic (fixed seeds, fixed bit positions), except the unreadable
    file and folder: when this process can read a chmod-000 file anyway (root, as in CI
    containers), their expectation is ``ok`` and the note says so. (A non-root user removes
    the corpus with ``chmod -R u+rwx DIR && rm -rf DIR``.)
    """
    import tifffile
    import zarr
    from PIL import Image

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Expected] = {}
    base = nuclei_image((96, 128), seed=1)
    u8 = as_uint8(base)

    # ---- references that must simply work
    _save(root / "good.png", u8)
    expected["good.png"] = ok(note="reference PNG (good.jpg beside it: both ids keep their extension)")
    _save(root / "good.jpg", u8, quality=95)
    expected["good.jpg"] = same("reference JPEG")
    _save(root / "with space and ünïcødé 核.png", u8)
    expected["with space and ünïcødé 核"] = same("spaces and Unicode in the name")
    _save(root / "UPPER.PNG", u8)
    expected["UPPER"] = same("upper-case extension")
    _save(root / "new\nline.png", u8)
    expected["new\\nline"] = same("a newline in the name: the id escapes it (ids are one line)")
    with open(os.path.join(os.fsencode(root), b"latin1-caf\xe9-\xff.png"), "wb") as handle:
        handle.write(_png_bytes(u8))
    expected["latin1-caf\\xe9-\\xff"] = same("name bytes that are not UTF-8: read; the id writes them as \\xNN escapes")

    # ---- empty, truncated, bit-flipped
    for name in ("zero.png", "zero.tif", "zero.jpg"):
        (root / name).write_bytes(b"")
    expected["zero.png"] = failed("empty file", note="0 bytes")
    expected["zero.tif"] = failed("empty file", note="0 bytes")
    expected["zero.jpg"] = failed("empty file", note="0 bytes")
    png = _png_bytes(u8)
    (root / "truncated.png").write_bytes(truncated(png, 0.5))
    expected["truncated.png"] = failed("truncated", note="header intact, half the pixel data: fails when decoded")
    (root / "truncated.jpg").write_bytes(truncated(_png_bytes(u8, format="JPEG", quality=90), 0.5))
    expected["truncated.jpg"] = failed("truncated", note="JPEG cut in half")
    tiled = _tiff_bytes(as_uint8(nuclei_image((256, 256), seed=2)), tile=(64, 64), compression="zlib")
    (root / "truncated.tif").write_bytes(truncated(tiled, 0.33))
    expected["truncated.tif"] = failed("cannot read", note="tiled zlib TIFF cut to a third: its tiles fail to decode")
    (root / "truncated_header.tif").write_bytes(tiled[:10])
    expected["truncated_header"] = failed("not a readable TIFF", note="10 bytes: the IFD is gone")
    start, end = png_idat_span(png)
    (root / "bitflip.png").write_bytes(flip_bits(png, [8 * (start + 2) + 3, 8 * (start + (end - start) // 2) + 5]))
    expected["bitflip.png"] = failed("cannot decode", note="2 bits flipped in the zlib stream: PNG CRC / zlib error")
    plain_tiff = _tiff_bytes(as_uint8(nuclei_image((64, 64), seed=3)), compression="zlib")
    start, length = tiff_strip(plain_tiff)
    (root / "bitflip.tif").write_bytes(flip_bits(plain_tiff, [8 * (start + 1) + 1, 8 * (start + length // 2) + 6, 8 * (start + length - 3)]))
    expected["bitflip.tif"] = failed("cannot read", note="bits flipped in the zlib strip")

    # ---- not what the extension says
    (root / "png_named.tif").write_bytes(png)
    expected["png_named"] = same("a PNG named .tif: the content decides the reader")
    (root / "tiff_named.png").write_bytes(_tiff_bytes(u8))
    expected["tiff_named"] = same("a TIFF named .png: read lazily as the TIFF it is")
    (root / "jpeg_named.png").write_bytes(_png_bytes(u8, format="JPEG", quality=95))
    expected["jpeg_named"] = same("a JPEG named .png")
    (root / "text.png").write_text("this is not an image\n")
    expected["text.png"] = failed("cannot decode", note="text named .png")
    (root / "text.tif").write_text("this is not an image\n")
    expected["text.tif"] = failed("not a readable TIFF", note="text named .tif")
    with open(os.path.join(os.fsencode(root), b"bad\nname.tif"), "wb") as handle:
        handle.write(b"not a TIFF either\n")
    expected["bad\\nname"] = failed("not a readable TIFF", note="a newline in the name of a bad file: the reason stays one line")
    (root / "folder.png").mkdir()
    _save(root / "folder.png" / "inner.png", u8)
    expected["folder.png/inner"] = same("a folder named like an image is a folder")
    (root / "empty_folder.tif").mkdir()
    expected["empty_folder"] = skipped("an empty folder named .tif is a folder, with nothing in it")
    (root / "no_metadata.zarr").mkdir()
    expected["no_metadata"] = failed("not a zarr store", note="a folder named .zarr without zarr.json / .zarray")

    # ---- sizes
    _save(root / "dot.png", np.full((1, 1), 200, np.uint8))
    expected["dot"] = failed("1x1", "8x8", note="1x1")
    _save(root / "row.png", as_uint8(nuclei_image((8, 300), 4))[:1])
    expected["row"] = failed("1x300", note="1xN")
    _tiff(root / "column.tif", as_uint8(nuclei_image((300, 8), 5))[:, :1])
    expected["column"] = failed("300x1", note="Nx1")
    _save(root / "tiny7.png", u8[:7, :7])
    expected["tiny7"] = failed("7x7", "8x8", note="below MIN_SIDE")
    zarr.create_array(str(root / "zero_size.zarr"), shape=(0, 64), dtype="uint8", chunks=(8, 8))
    expected["zero_size"] = failed("0x64", note="zarr array with a 0-length axis")

    # ---- intensities
    _save(root / "black.png", np.zeros((64, 64), np.uint8))
    expected["black"] = ok("none", note="all 0: no nuclei")
    _save(root / "saturated.png", np.full((64, 64), 255, np.uint8))
    expected["saturated"] = ok("none", note="all 255: no nuclei")
    _save(root / "clipped.png", np.clip(base * 4 * 255, 0, 255).astype(np.uint8))
    expected["clipped"] = ok(note="nuclei saturated at 255")
    _tiff(root / "u16_constant.tif", np.full((64, 64), 4321, np.uint16))
    expected["u16_constant"] = ok("none", note="16-bit, one value")
    _tiff(root / "u16_tiny_range.tif", (1000 + np.round(base * 4)).astype(np.uint16))
    expected["u16_tiny_range"] = same("16-bit, values 1000..1004 only: the percentiles stretch them")
    rng = np.random.default_rng(7)
    holes = rng.random(base.shape) < 0.03
    with_nan = base.astype(np.float32)
    with_nan[holes] = np.nan
    _tiff(root / "float_nan.tif", with_nan)
    expected["float_nan"] = same("3% NaN pixels: left out of the statistics, read as background")
    with_inf = base.astype(np.float32)
    with_inf[holes] = np.where(rng.random(int(holes.sum())) < 0.5, np.inf, -np.inf)
    _tiff(root / "float_inf.tif", with_inf)
    expected["float_inf"] = same("3% +-inf pixels: left out of the statistics; +inf reads as the brightest value, -inf as the darkest")
    _tiff(root / "float_all_nan.tif", np.full((64, 64), np.nan, np.float32))
    expected["float_all_nan"] = failed("no finite pixel values", note="nothing to normalise")
    _tiff(root / "float_big.tif", ((base * 2 - 1) * 1e30).astype(np.float32))
    expected["float_big"] = same("float32 spanning -1e30..1e30")
    _tiff(root / "float_extreme.tif", (base * 2 - 1) * 1e308)
    expected["float_extreme"] = same("float64 spanning -1e308..1e308: normalised in float64, over its largest value (no overflow)")
    _tiff(root / "float16.tif", base.astype(np.float16))
    expected["float16"] = same("float16")
    _tiff(root / "int8.tif", (np.round(base * 255) - 128).astype(np.int8))
    expected["int8"] = same("int8, negative values")
    _tiff(root / "int32.tif", (np.round(base * 2e9) - 1e9).astype(np.int32))
    expected["int32"] = same("int32, large negative and positive values")
    _tiff(root / "bool.tif", base > 0.3)
    expected["bool"] = failed("bool", "not supported", note="a mask, not an image")
    _save(root / "onebit.png", Image.fromarray(base > 0.3).convert("1"))
    expected["onebit"] = failed("bool", "not supported", note="1-bit PNG (PIL mode 1): a mask")

    # ---- layouts and channels
    _save(root / "palette.png", Image.fromarray(u8).convert("P"))
    expected["palette"] = same("palette PNG -> RGB")
    with_alpha = Image.fromarray(u8).convert("P")
    with_alpha.info["transparency"] = 0
    _save(root / "palette_alpha.png", with_alpha, transparency=0)
    expected["palette_alpha"] = same("palette PNG with transparency -> RGBA")
    _save(root / "rgba.png", np.dstack([u8, u8 // 2, u8 // 3, np.full_like(u8, 255)]))
    expected["rgba"] = same("RGBA: alpha ignored")
    _save(root / "grey_alpha.png", Image.fromarray(np.dstack([u8, np.full_like(u8, 255)]), "LA"))
    expected["grey_alpha"] = same("2 channels (grey + alpha)")
    _tiff(root / "two_channel.ome.tif", np.stack([as_uint8(base), as_uint8(nuclei_image((96, 128), 9)) // 4]), ome=True, metadata={"axes": "CYX"})
    expected["two_channel"] = ok(note="OME-TIFF, 2 channels")
    _save(root / "bitmap.bmp", u8)
    expected["bitmap"] = same("BMP")
    frames = [Image.fromarray(u8).convert("P"), Image.fromarray(255 - u8).convert("P")]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])
    expected["animated"] = same("2-frame GIF: the first frame is read")
    _tiff(root / "many_channels.ome.tif", np.zeros((300, 16, 16), np.uint8), ome=True, metadata={"axes": "CYX"})
    expected["many_channels"] = failed("300 channels", note="more than 256 channels")
    _tiff(root / "fived.tif", np.zeros((2, 3, 2, 16, 16), np.uint8))
    expected["fived.tif"] = failed("(2, 3, 2, 16, 16)", "unknown meaning", note="5-D, no axes metadata")
    stack = np.stack([np.stack([np.stack([as_uint8(nuclei_image((48, 64), 10 + 4 * t + 2 * z + c)) for c in range(2)]) for z in range(2)]) for t in range(2)])
    _tiff(root / "fived_ome.ome.tif", stack.transpose(0, 2, 1, 3, 4), ome=True, metadata={"axes": "TCZYX"})
    for t in range(2):
        for z in range(2):
            expected[f"fived_ome#t{t}-z{z}"] = ok(None, note="5-D OME-TIFF TCZYX: one image per (t, z), 2 channels")
    zarr.create_array(str(root / "fived.zarr"), shape=(2, 2, 2, 16, 16), dtype="uint8", chunks=(1, 1, 1, 16, 16))
    expected["fived.zarr"] = failed("5-D array", "axis names", note="5-D zarr without axis names")

    # ---- decompression bombs (refused from the header, before any pixel is allocated)
    png_bomb(root / "bomb.png", BOMB_SIDE, BOMB_SIDE)
    expected["bomb.png"] = failed("declares", "1,000,000,000,000 pixels", note="PNG header: 10^6 x 10^6 in ~100 bytes")
    png_bomb(root / "bomb_rgba16.png", 30_000, 30_000, bit_depth=16, colour_type=6)
    expected["bomb_rgba16"] = failed("declares", "30000x30000", note="9*10^8 RGBA 16-bit pixels (7 GB decoded) in ~100 bytes: below the pixel limit, refused by PNG's maximum compression ratio")
    gif_bomb(root / "bomb.gif")
    expected["bomb.gif"] = failed("declares", "4,294,836,225 pixels", note="GIF header 65535 x 65535")
    tiff_bomb(root / "bomb.tif", tiled=True)
    expected["bomb.tif"] = failed("declares", "1,000,000,000,000 pixels", note="TIFF header: 10^6 x 10^6 zlib tiles in ~150 bytes")
    tiff_bomb(root / "bomb_strip.tif", tiled=False)
    expected["bomb_strip"] = failed("declares", "1,000,000,000,000 pixels", note="TIFF header: 10^6 x 10^6 uncompressed in ~150 bytes")
    tiff_shared_tile_bomb(root / "bomb_ratio.tif")
    expected["bomb_ratio"] = failed("declares", "3,600,000,000 bytes", "decompression bomb", note="6*10^4 x 6*10^4 in 3,481 tiles that all point at one 1 kB tile (~30 kB file)")
    tiff_bomb(root / "bomb_small.tif", side=60_000, tiled=False)
    expected["bomb_small"] = failed("pixel data", "past the end", note="6*10^4 x 6*10^4 uncompressed declared in ~150 bytes (under the pixel limit): the data would lie past the end of the file")
    zarr.create_array(str(root / "bomb.zarr"), shape=(BOMB_SIDE, BOMB_SIDE), dtype="uint8", chunks=(1024, 1024))
    expected["bomb.zarr"] = failed("declares", "1,000,000,000,000 pixels", note="zarr.json declaring 10^6 x 10^6 (no chunks written)")
    sparse = zarr.create_array(str(root / "sparse_bomb.zarr"), shape=(60_000, 60_000), dtype="uint8", chunks=(1024, 1024))
    sparse[:64, :64] = 1
    expected["sparse_bomb"] = failed("declares", "only 1 are stored", note="zarr 6*10^4 x 6*10^4 (under the pixel limit) with 1 of 3,481 chunks stored")

    # ---- damaged TIFF structure
    (root / "bad_ifd_offset.tif").write_bytes(b"II*\x00" + struct.pack("<I", 0x7FFFFFF0) + plain_tiff[8:])
    expected["bad_ifd_offset"] = failed("no image series", note="first IFD offset points past the end of the file")
    huge_tiles = [(256, 4, 1, 64), (257, 4, 1, 64), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1), (277, 3, 1, 1), (322, 4, 1, 2**20), (323, 4, 1, 2**20), (324, 4, 1, -1), (325, 4, 1, 12)]
    (root / "huge_tiles.tif").write_bytes(classic_tiff(huge_tiles, zlib.compress(b"\x00" * 64)))
    expected["huge_tiles"] = failed("tile", note="a 64x64 image in one 2^20 x 2^20 tile")
    ome_lie = tifffile.OmeXml()
    ome_lie.addimage(np.uint16, (5, 4096, 4096), (5, 1, 1, 4096, 4096, 1), axes="CYX")
    _tiff(root / "ome_inconsistent.ome.tif", as_uint8(base), description=ome_lie.tostring(), metadata=None)
    expected["ome_inconsistent"] = same("OME-XML says 5 x 4096 x 4096 uint16, the one page is 96 x 128 uint8: the pages win")

    # ---- damaged zarr stores
    data = as_uint8(nuclei_image((64, 64), 11))
    array = zarr.create_array(str(root / "missing_chunk.zarr"), shape=data.shape, dtype="uint8", chunks=(32, 32), fill_value=0)
    array[...] = data
    (root / "missing_chunk.zarr" / "c" / "1" / "1").unlink()
    expected["missing_chunk"] = ok(None, note="a chunk file deleted: zarr reads the fill value (0) there")
    array = zarr.create_array(str(root / "corrupt_chunk.zarr"), shape=data.shape, dtype="uint8", chunks=(32, 32), compressors=[zarr.codecs.ZstdCodec()])
    array[...] = data
    (root / "corrupt_chunk.zarr" / "c" / "0" / "1").write_bytes(b"\x28\xb5\x2f\xfd garbage, not zstd")
    expected["corrupt_chunk"] = failed("cannot read", note="a chunk replaced by garbage")
    (root / "corrupt_json.zarr").mkdir()
    (root / "corrupt_json.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "arr')
    expected["corrupt_json"] = failed("not a readable zarr store", note="zarr.json is not JSON")
    (root / "wrong_json.zarr").mkdir()
    (root / "wrong_json.zarr" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "array", "shape": "big"}))
    expected["wrong_json"] = failed("not a readable zarr store", note="zarr.json is JSON but not zarr metadata")

    zarr.create_array(str(root / "huge_chunk.zarr"), shape=(64, 64), dtype="uint8", chunks=(40_000, 40_000))
    expected["huge_chunk"] = failed("too large to read in pieces", note="a 64x64 zarr array in one chunk of 40,000 x 40,000 (reading it would decode 1.6 GB)")

    # ---- file-system oddities
    _save(root / "unreadable.png", u8)
    os.chmod(root / "unreadable.png", 0)
    if permissions_block_reading(root / "unreadable.png"):
        expected["unreadable"] = failed("cannot open", "Permission denied", note="chmod 000")
    else:
        expected["unreadable"] = same("chmod 000, but this process (root) reads it anyway: expected ok here, 'cannot open (Permission denied)' for other users")
    (root / "locked").mkdir()
    _save(root / "locked" / "inside.png", u8)
    os.chmod(root / "locked", 0)
    if permissions_block_listing(root / "locked"):
        expected["locked/inside"] = skipped("in a folder that cannot be listed (chmod 000): skipped with a warning in the log")
    else:
        expected["locked/inside"] = same("in a chmod-000 folder that this process (root) lists anyway; others: skipped with a warning")
    os.symlink("loop_b.png", root / "loop_a.png")
    os.symlink("loop_a.png", root / "loop_b.png")
    expected["loop_a"] = failed("cannot open", "symbolic links", note="a -> b -> a")
    expected["loop_b"] = failed("cannot open", "symbolic links", note="b -> a -> b")
    os.symlink("does-not-exist.png", root / "dangling.png")
    expected["dangling"] = failed("cannot open", "No such file", note="link to nothing")
    os.symlink("good.png", root / "link_to_good.png")
    expected["link_to_good"] = skipped("a link to good.png: the same file, discovered once (as good.png)")
    (root / "links").mkdir()
    _save(root / "links" / "inside.png", u8)
    os.symlink("..", root / "links" / "up", target_is_directory=True)
    expected["links/inside"] = same("beside a link to its parent folder")
    expected["links/up/good.png"] = skipped("links to folders are not followed (no loop)")
    expected["links/up/links/inside"] = skipped("links to folders are not followed (no loop)")
    os.mkfifo(root / "fifo.png")
    expected["fifo"] = failed("not a regular file", note="a named pipe: opening it would wait for a writer forever")
    os.symlink("/dev/zero", root / "devzero.tif")
    expected["devzero"] = failed("not a regular file", note="a link to /dev/zero: endless bytes")
    (root / ".hidden.png").write_bytes(png)
    expected[".hidden"] = skipped("hidden files are not inputs")
    (root / "notes.txt").write_text("not an input\n")
    expected["notes"] = skipped("other extensions are not inputs")
    return expected


def describe(expected: dict[str, Expected]) -> str:
    """The corpus as a text table: id, expected outcome, reason words, note."""
    lines = []
    for image_id in sorted(expected):
        item = expected[image_id]
        what = item.outcome + (f" ({item.nuclei} nuclei)" if item.outcome == "ok" and item.nuclei else "")
        words = " / ".join(item.words)
        lines.append(f"{image_id!r:42} {what:18} {words:40} {item.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python tests/helpers/bad_corpus.py DIR  (writes the bad-inputs corpus into DIR)", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    if folder.exists() and any(folder.iterdir()):
        print(f"{folder} is not empty; give a new folder", file=sys.stderr)
        return 2
    expected = write_corpus(folder)
    print(describe(expected))
    print(f"{len(expected)} items written to {folder}; segment them with: nucleibatch segment {folder} -o OUT (exit status 3: some fail)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: nucleibatch
    sys.exit(main())
