"""The per-image writers of ``export``: GeoJSON FeatureCollections (QuPath), DSB RLE csv rows and
32-bit TIFF label images (the 16-bit PNG writer is :func:`.png.write_png16`).

Every file is written through :func:`nucleibatch.output.atomic.replaced_on_success`: a
temporary name, renamed into place only when it is complete.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..channels import INTENSITY_PREFIX
from ..errors import ExportError
from ..output.atomic import replaced_on_success
from ..output.folder import NUCLEI
from .chunks import ChunkCache, iter_nucleus_masks
from .outlines import mask_outline, outline_geometry
from .rle import rle_encode_crop

if TYPE_CHECKING:  # pandas is imported where used: `nucleibatch --help` stays quick
    import pandas as pd

MEASUREMENTS = ("area", "perimeter", "eccentricity", "solidity", "mean_intensity", "centroid_y", "centroid_x")
_UUID_NAMESPACE = uuid.UUID("6c0b3c52-5d0e-4b8a-9a51-6e75636c6569")
# TIFF images up to this many pixels are written in one piece (strips); larger ones tiled
WHOLE_TIFF_PIXELS = 2048 * 2048


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
