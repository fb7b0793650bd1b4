"""Writers of every kind of input file that `nucleibatch segment` reads, for tests.

Each writer takes arrays (from nucleibatch.synthetic or built here), writes real files
with the libraries users use (PIL, tifffile, zarr, ome-zarr-py) and returns what a
correct reader must give back. Nothing here is mocked.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nucleibatch.synthetic import synthetic_nuclei
from tests.helpers.bad_corpus import png_bomb, truncated
from tests.helpers.paths import DEMO


def grey(shape=(64, 80), seed=0, dtype=np.uint8) -> np.ndarray:
    """A synthetic nuclei image ``(H, W)`` of ``dtype`` (uint8, uint16 or float32)."""
    if np.dtype(dtype).kind == "f":
        image, _ = synthetic_nuclei(shape, n_nuclei=6, seed=seed, dtype=np.uint16)
        return (image / 65535.0).astype(dtype)
    image, _ = synthetic_nuclei(shape, n_nuclei=6, seed=seed, dtype=dtype)
    return image


def multichannel(shape=(64, 80), channels=3, seed=0, dtype=np.uint8) -> np.ndarray:
    """``(H, W, C)`` image whose channels differ (channel k = image of seed ``seed + k``)."""
    return np.stack([grey(shape, seed + k, dtype) for k in range(channels)], axis=-1)


def unique_values(shape: tuple[int, ...], dtype=np.uint16) -> np.ndarray:
    """An array whose every pixel value encodes its position (catches transposed/shifted reads)."""
    return (np.arange(int(np.prod(shape)), dtype=np.int64) % np.iinfo(dtype).max).astype(dtype).reshape(shape)


# --------------------------------------------------------------------------- plain files


def write_plain(path: Path, image: np.ndarray, **save_args) -> Path:
    """PNG / JPEG / BMP with PIL (format from the extension). uint16 grey goes to 16-bit PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if image.dtype == np.uint16:
        handle = Image.fromarray(image.astype(np.uint16))
    else:
        handle = Image.fromarray(image)
    handle.save(path, **save_args)
    return path


def write_tiff(path: Path, data: np.ndarray, **kwargs) -> Path:
    """Any TIFF with tifffile.imwrite (kwargs: tile, compression, photometric, ome, imagej, metadata)."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data, **kwargs)
    return path


def write_plate_tree(root: Path) -> dict[str, np.ndarray]:
    """A plate tree of PNG/JPEG/TIFF fields plus files that must be ignored.

    Returns ``{expected image_id: array as stored}`` (the JPEG's array is what PIL decodes).
    """
    from PIL import Image

    expected = {}
    expected["plateA/B02/field_1"] = grey((64, 80), 1)
    write_plain(root / "plateA/B02/field_1.png", expected["plateA/B02/field_1"])
    write_plain(root / "plateA/B02/field_2.jpg", multichannel((48, 72), 3, 2), quality=95)
    expected["plateA/B02/field_2"] = np.asarray(Image.open(root / "plateA/B02/field_2.jpg"))
    expected["plateA/B03/field_1"] = grey((40, 56), 3, np.uint16)
    write_tiff(root / "plateA/B03/field_1.tif", expected["plateA/B03/field_1"])
    expected["plateB/C01/field_1"] = multichannel((32, 40), 4, 4)
    write_plain(root / "plateB/C01/field_1.png", expected["plateB/C01/field_1"])  # RGBA
    # ignored: not images, hidden files and folders
    (root / "plateA/notes.txt").write_text("not an image\n")
    (root / "plateA/B02/table.csv").write_text("a,b\n1,2\n")
    (root / "plateB/meta.json").write_text("{}")
    write_plain(root / "plateA/.hidden.png", grey((16, 16), 5))
    write_plain(root / ".cache/thumb.png", grey((16, 16), 6))
    return expected


def write_dsb_tree(root: Path, ids=("aaa111", "bbb222"), shape=(48, 64)) -> dict[str, np.ndarray]:
    """DSB 2018 layout ``<root>/<id>/images/<id>.png`` with binary PNG masks in ``<id>/masks/``."""
    expected = {}
    for number, image_id in enumerate(ids):
        image, labels = synthetic_nuclei(shape, n_nuclei=5, seed=10 + number)
        rgba = np.dstack([image, image, image, np.full_like(image, 255)])  # DSB PNGs are RGBA
        write_plain(root / image_id / "images" / f"{image_id}.png", rgba)
        for label in range(1, int(labels.max()) + 1):
            write_plain(root / image_id / "masks" / f"m{label}.png", ((labels == label) * 255).astype(np.uint8))
        expected[image_id] = rgba
    return expected


# --------------------------------------------------------------------------- multi-image TIFF


def write_pyramid_tiff(path: Path, image: np.ndarray, n_levels=3, tile=(128, 128), compression="zlib", bigtiff=True, ome=False, axes=None) -> list[np.ndarray]:
    """Tiled pyramidal (Big)TIFF, levels in SubIFDs (the OME-TIFF / QuPath way).

    ``image`` is ``(H, W)``, ``(H, W, 3)`` RGB or, with ``axes='CYX'``, ``(C, H, W)``.
    Level k is level 0 sampled every 2**k pixels. Returns the levels as written.
    """
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    spatial = (-3, -2) if image.ndim == 3 and axes != "CYX" else (-2, -1)
    levels = []
    for k in range(n_levels):
        key = [slice(None)] * image.ndim
        key[spatial[0]] = slice(None, None, 2**k)
        key[spatial[1]] = slice(None, None, 2**k)
        levels.append(np.ascontiguousarray(image[tuple(key)]))
    rgb = image.ndim == 3 and axes != "CYX"
    options = dict(tile=tile, compression=compression, photometric="rgb" if rgb else "minisblack")
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=ome) as writer:
        metadata = {"axes": axes} if (ome and axes) else ({} if ome else None)
        writer.write(levels[0], subifds=n_levels - 1, metadata=metadata, **options)
        for level in levels[1:]:
            writer.write(level, subfiletype=1, **options)
    return levels


def write_svs_like(path: Path, image: np.ndarray) -> None:
    """An Aperio-SVS-structured TIFF: tiled JPEG baseline, thumbnail, 1/4 level, label, macro.

    ``image`` is ``(H, W, 3)`` uint8. Same page layout and ImageDescription prefix as
    Aperio's writer, so tifffile reads it as SVS (series Baseline/Thumbnail/Label/Macro).
    """
    import tifffile

    height, width = image.shape[:2]
    header = f"Aperio Image Library vTest\r\n{width}x{height} [0,0 {width}x{height}] (256x256) JPEG/RGB Q=90|AppMag = 20|MPP = 0.5"
    with tifffile.TiffWriter(path) as writer:
        writer.write(image, tile=(256, 256), photometric="rgb", compression="jpeg", description=header, metadata=None)
        writer.write(np.ascontiguousarray(image[::8, ::8]), photometric="rgb", description="Aperio thumbnail", metadata=None)
        writer.write(np.ascontiguousarray(image[::4, ::4]), tile=(256, 256), photometric="rgb", compression="jpeg", description="Aperio level", metadata=None)
        writer.write(np.full((40, 60, 3), 200, np.uint8), photometric="rgb", subfiletype=1, description="Aperio label", metadata=None)
        writer.write(np.full((50, 70, 3), 100, np.uint8), photometric="rgb", subfiletype=9, description="Aperio macro", metadata=None)


def write_multiseries_ome_tiff(path: Path) -> dict[str, np.ndarray]:
    """OME-TIFF with two series: ``YX`` uint8 and ``ZCYX`` uint16 (2 planes x 3 channels).

    Returns ``{id suffix: (H, W, C) array}``.
    """
    import tifffile

    first = grey((64, 80), 21)
    second = np.stack([np.stack([grey((40, 48), 30 + 3 * z + c, np.uint16) for c in range(3)]) for z in range(2)])  # (Z, C, Y, X)
    with tifffile.TiffWriter(path, ome=True) as writer:
        writer.write(first, metadata={"axes": "YX"})
        writer.write(second, metadata={"axes": "ZCYX"}, tile=(16, 16), compression="zlib")
    return {
        "s0": first[:, :, None],
        "s1-z0": np.moveaxis(second[0], 0, -1),
        "s1-z1": np.moveaxis(second[1], 0, -1),
    }


# --------------------------------------------------------------------------- zarr


def write_zarr_array(path: Path, data: np.ndarray, zarr_format=3, dimension_names=None, chunks=None) -> Path:
    """A plain zarr array (v2 or v3), optionally with axis names (v3 dimension_names / v2 _ARRAY_DIMENSIONS)."""
    import zarr

    kwargs = {}
    if dimension_names is not None and zarr_format == 3:
        kwargs["dimension_names"] = list(dimension_names)
    array = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=chunks or tuple(min(s, 32) for s in data.shape), zarr_format=zarr_format, **kwargs)
    array[...] = data
    if dimension_names is not None and zarr_format == 2:
        array.attrs["_ARRAY_DIMENSIONS"] = list(dimension_names)
    return path


def write_ome_zarr(path: Path, data: np.ndarray, axes: str, version="0.5", n_levels=3, group=None) -> list[np.ndarray]:
    """OME-Zarr image with ome-zarr-py (NGFF 0.5 on zarr v3, or 0.4 on zarr v2).

    Level k is ``data`` downsampled 2**k on y/x (as ome-zarr-py writes it); returns the
    levels read back, which a reader must reproduce. ``group``: a sub-path inside the
    store (e.g. a plate's ``A/1/0``).
    """
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV05() if version == "0.5" else FormatV04()
    root = zarr.open_group(str(path), mode="a", zarr_format=3 if version == "0.5" else 2)
    target = root.require_group(group) if group else root
    scale_factors = [2**k for k in range(1, n_levels)]
    write_image(data, target, axes=axes, fmt=fmt, scale_factors=scale_factors)
    multiscales = target.attrs.asdict()
    multiscales = (multiscales.get("ome") or multiscales)["multiscales"][0]
    return [np.asarray(target[d["path"]][...]) for d in multiscales["datasets"]]


# --------------------------------------------------------------------------- manifests


def write_manifest_txt(path: Path, lines: list[str]) -> Path:
    path.write_text("# images to segment\n\n" + "\n".join(lines) + "\n")
    return path


def write_manifest_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- bad inputs


def write_bad_inputs(folder: Path) -> dict[str, str]:
    """Files that must become records with an error (or fail at read): a few of each kind,
    for discovery tests (the whole corpus of bad and awkward inputs is tests/helpers/bad_corpus.py).

    Returns ``{expected image_id: word the error must contain}``; a value of ``"read"``
    means the header is fine and the damage shows up as ImageReadError on read.
    """
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    (folder / "empty.png").write_bytes(b"")
    expected["empty"] = "empty"
    good = folder / "tmp_good.png"
    write_plain(good, grey((64, 64), 40))
    (folder / "half.png").write_bytes(truncated(good.read_bytes(), 0.5))
    good.unlink()
    expected["half"] = "read"
    tiled = folder / "tmp_tiled.tif"
    tifffile.imwrite(tiled, grey((256, 256), 41), tile=(64, 64), compression="zlib")
    (folder / "cut.tif").write_bytes(truncated(tiled.read_bytes(), 1 / 3))  # the IFD (written last) is cut off
    tiled.unlink()
    expected["cut"] = "read"  # the header survives; the missing tiles fail to decode
    (folder / "text.tif").write_text("this is not a TIFF\n")
    expected["text"] = "TIFF"
    write_plain(folder / "dot.png", np.zeros((1, 1), np.uint8))
    expected["dot"] = "8x8"
    tifffile.imwrite(folder / "mask.tif", np.zeros((32, 32), bool))
    expected["mask"] = "bool"
    png_bomb(folder / "bomb.png")
    expected["bomb"] = "pixels"
    os.symlink("loop.png", folder / "loop.png")  # a symlink to itself
    expected["loop"] = "cannot open"
    os.symlink("does-not-exist.png", folder / "dangling.png")  # stands for an unreadable file (tests run as root)
    expected["dangling"] = "cannot open"
    return expected


def write_small_archive(root: Path, copies: int = 1, bad_file: bool = True) -> set[str]:
    """A small archive for engine comparisons: the 5 real DSB demo images (``copies`` times, in
    folders copy_K), a 512 x 768 mosaic of them as a tiled TIFF (several blocks at --block-size
    256), and (``bad_file``) a text file named .tif (a failed row). Returns the image ids."""
    import shutil

    from PIL import Image

    ids = sorted(p.name for p in DEMO.iterdir() if p.is_dir())
    for k in range(copies):
        for image_id in ids:
            target = root / f"copy_{k}" / image_id / "images"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(DEMO / image_id / "images" / f"{image_id}.png", target / f"{image_id}.png")
    tiles = []
    for image_id in ids:
        rgb = np.asarray(Image.open(DEMO / image_id / "images" / f"{image_id}.png").convert("L"))
        tile = np.zeros((256, 256), np.uint8)
        tile[: min(256, rgb.shape[0]), : min(256, rgb.shape[1])] = rgb[:256, :256]
        tiles.append(tile)
    tiles.append(tiles[0][::-1])
    mosaic = np.concatenate([np.concatenate(tiles[:3], axis=1), np.concatenate(tiles[3:6], axis=1)], axis=0)
    write_tiff(root / "slides" / "mosaic.tif", mosaic, tile=(128, 128), compression="zlib")
    if bad_file:
        (root / "slides" / "notes.tif").write_text("a text file named like a TIFF\n")
    return {f"copy_{k}/{i}" for k in range(copies) for i in ids} | {"slides/mosaic"} | ({"slides/notes"} if bad_file else set())
