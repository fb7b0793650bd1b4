"""Output tables and per-image completion records.

* ``OUT/nuclei.parquet/`` — a directory of parquet parts, one per image
  (``pandas.read_parquet(OUT / "nuclei.parquet")`` reads them all). Parts of multi-channel
  images have more columns (``mean_intensity_<channel>``) than the others; readers of a parquet
  dataset (pyarrow, hence pandas) take the columns from its first file, so a zero-row part
  carrying every part's columns, :data:`SCHEMA_PART`, is kept first in name order; the columns
  an image lacks read as null.
* ``OUT/.nucleibatch/records/<name>.json`` — one image's row, written LAST (after its
  labels and its nuclei part): an image is finished exactly when its record exists.
* ``OUT/images.parquet`` — rebuilt from the records at the end of every run.

Every file is written to a hidden temporary name and renamed into place, so a
reader (or a run killed at any moment) never sees half a file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import NotSegmentOutputError
from ..io.location import (
    Location,
    exists,
    file_size,
    file_sizes,
    fresh_listing,
    is_remote,
    read_many,
    remove,
)
from ..measure import NUCLEI_COLUMNS, PHYSICAL_COLUMNS
from ..runtime import faults
from .atomic import replaced_on_success, write_bytes_atomic
from .folder import IMAGES, MASKS, RUN, STATE_DIR, OutputFolder

IMAGE_COLUMNS = (
    "image_id", "source", "height", "width", "n_nuclei", "status", "error", "seconds", "store_path", "modality", "model", "pixel_size_um", "scale",
    "plate", "well", "field",
)  # fmt: skip  (plate, well, field came later: older OUTs' tables lack them until a run rewrites them)

NUCLEI_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("label", pa.uint32())]
    + [(name, pa.float64()) for name in ("centroid_y", "centroid_x")]
    + [("area", pa.int64())]
    + [(name, pa.float64()) for name in ("perimeter", "eccentricity", "solidity", "mean_intensity")]
    + [(name, pa.int64()) for name in ("bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x")]
    + [(name, pa.float64()) for name in PHYSICAL_COLUMNS]
)
IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()), ("source", pa.string()), ("height", pa.int64()), ("width", pa.int64()),
        ("n_nuclei", pa.int64()), ("status", pa.string()), ("error", pa.string()), ("seconds", pa.float64()),
        ("store_path", pa.string()), ("modality", pa.string()), ("model", pa.string()), ("pixel_size_um", pa.float64()),
        ("scale", pa.float64()),
        # OME-Zarr plate fields: the plate's id, the well's path (B/2), the field's path (0); null otherwise
        ("plate", pa.string()), ("well", pa.string()), ("field", pa.string()),
    ]
)  # fmt: skip
assert tuple(NUCLEI_SCHEMA.names) == NUCLEI_COLUMNS + tuple(PHYSICAL_COLUMNS)
assert tuple(IMAGES_SCHEMA.names) == IMAGE_COLUMNS
BORDER_COLUMN = "touches_border"


def nuclei_part_schema(channel_columns: Sequence[str] = ()) -> pa.Schema:
    """The schema of a nuclei part: :data:`NUCLEI_SCHEMA`, ``touches_border`` (bool), then the
    image's per-channel means ``channel_columns`` (float64, in channel order)."""
    return pa.schema(list(NUCLEI_SCHEMA) + [pa.field(BORDER_COLUMN, pa.bool_())] + [pa.field(name, pa.float64()) for name in channel_columns])


def check_segment_output(out: str | Location, finished: bool = False) -> Location:
    """``out`` (a path or URL) as a location, if it holds the outputs of ``nucleibatch segment``.

    Args:
        finished: also require ``images.parquet`` and ``masks.zarr`` (written when a run ends);
            otherwise a run still going or killed (completion records only) is accepted.

    Raises:
        NotSegmentOutputError: missing, a file, or none of the outputs (the message says what to do).
    """
    folder = OutputFolder(out)
    location = folder.root
    hint = f"give the -o folder of a `nucleibatch segment` run (run `nucleibatch segment INPUT... -o {location}` first)"
    if not exists(location):
        raise NotSegmentOutputError(f"{location} does not exist: {hint}")
    if not location.is_dir():
        raise NotSegmentOutputError(f"{location} is a file, not a folder: {hint}")
    required = ((IMAGES, folder.images), (MASKS, folder.masks)) if finished else ()
    missing = [name for name, path in required if not path.exists()]
    if not finished and not any(path.exists() for path in (folder.run_json, folder.images, folder.records)):
        missing = [f"{RUN}, {IMAGES} and {STATE_DIR}/{folder.records.name}"]
    if missing:
        if folder.state.is_dir():
            hint = "the run did not finish: re-run the same `nucleibatch segment ... -o OUT` command to resume it"
        raise NotSegmentOutputError(f"{location} is not a segment output ({' and '.join(missing)} missing): {hint}")
    return location


def remove_stale_temporaries(out_dir: Location) -> int:
    """Delete temporary files that a killed writer left (call while holding OUT's lock).

    Returns how many were removed: our hidden ``.NAME.tmp-PID`` files and zarr's ``*.partial``.
    An object store has none (every object is written in one PUT).
    """
    if is_remote(out_dir):
        return 0
    removed = 0
    folder = OutputFolder(out_dir)
    for directory in (folder.root, folder.nuclei, folder.state, folder.records):
        if directory.is_dir():
            for path in directory.glob(".*.tmp-*"):
                path.unlink(missing_ok=True)
                removed += 1
    store = folder.masks
    if store.is_dir():
        for path in store.rglob("*.partial"):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def write_nuclei_part(out_dir: Location, name: str, image_id: str, columns: dict[str, np.ndarray], channel_columns: Sequence[str] = ()) -> Location:
    """Write one image's nuclei (columns of :func:`nucleibatch.measure.measure_labels` and
    :func:`~nucleibatch.measure.physical_columns`, whose NaN become nulls, ``touches_border`` and
    the per-channel means ``channel_columns``) as a parquet part (:func:`nuclei_part_schema`)."""
    n = len(columns["label"])
    schema = nuclei_part_schema(channel_columns)
    arrays = {"image_id": pa.array([image_id] * n, pa.string())}
    arrays.update({key: pa.array(columns[key], NUCLEI_SCHEMA.field(key).type) for key in NUCLEI_COLUMNS if key != "image_id"})
    arrays.update({key: pa.array(columns[key], pa.float64(), from_pandas=True) for key in PHYSICAL_COLUMNS})
    arrays[BORDER_COLUMN] = pa.array(columns[BORDER_COLUMN], pa.bool_())
    # a channel's mean is NaN where none of the nucleus's pixels is finite, as mean_intensity's
    arrays.update({key: pa.array(columns[key], pa.float64()) for key in channel_columns})
    table = pa.table(arrays, schema=schema)
    path = OutputFolder(out_dir).nuclei_part(name)
    if is_remote(path):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_bytes_atomic(path, sink.getvalue().to_pybytes())
        return path
    with replaced_on_success(path, fsync=True, fail_point="part") as tmp:
        pq.write_table(table, tmp)  # straight to disk: no second in-memory copy of a big table
    return path


EMPTY_PART = "nucleibatch-no-nuclei.parquet"
# zero rows, every part's columns; "!" sorts before every store name (letters, digits, ".", "_", "-")
SCHEMA_PART = "!nucleibatch-schema.parquet"
TABLE_HELPERS = frozenset({EMPTY_PART, SCHEMA_PART})


def finish_nuclei_dataset(out_dir: Location, finished: set[str], channel_columns: Sequence[str] = ()) -> None:
    """Make ``nuclei.parquet/`` hold exactly the parts of the finished images, readable even when
    no image produced nuclei (call while holding OUT's lock, when no image is being written).

    Parts of no finished image (``finished``: their store names), left by a run killed between
    part and record, are removed. With no image part, a zero-row part carrying the schema is
    written (so pandas reads an empty table with the right columns); once real parts exist, that
    placeholder is removed.

    ``channel_columns``: the per-channel columns of all the finished images' parts (from their
    completion records). When there are any, :data:`SCHEMA_PART` holds them all (written when
    they change), so that readers that take a dataset's columns from its first file see them.
    """
    directory = OutputFolder(out_dir).nuclei
    placeholder = directory / EMPTY_PART
    listed = fresh_listing(directory, "*.parquet")
    for part in [p for p in listed if p.name not in TABLE_HELPERS and p.name.removesuffix(".parquet") not in finished]:
        remove(part)
        listed.remove(part)
    parts = [p for p in listed if p.name not in TABLE_HELPERS]
    if parts:
        if any(p.name == EMPTY_PART for p in listed):
            remove(placeholder)
    elif not any(p.name == EMPTY_PART for p in listed):
        _write_empty_part(placeholder, nuclei_part_schema())
    schema_part = directory / SCHEMA_PART
    has_schema_part = any(p.name == SCHEMA_PART for p in listed)
    if channel_columns and parts:
        wanted = nuclei_part_schema(channel_columns)
        if not has_schema_part or not _schema_of(schema_part, wanted):
            _write_empty_part(schema_part, wanted)
    elif has_schema_part:
        remove(schema_part)


def _write_empty_part(path: Location, schema: pa.Schema) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    write_bytes_atomic(path, sink.getvalue().to_pybytes())


def _schema_of(path: Location, schema: pa.Schema) -> bool:
    """Whether the parquet file at ``path`` has exactly ``schema``'s columns (unreadable: no)."""
    data = read_many([path]).popitem()[1]
    try:
        return data is not None and pq.read_schema(pa.BufferReader(data)).remove_metadata().equals(schema)
    except (pa.ArrowException, OSError):
        return False


def write_record(out_dir: Location, name: str, row: dict[str, Any]) -> None:
    """The completion record of one image (its images.parquet row), written last."""
    faults.point("record")
    write_bytes_atomic(OutputFolder(out_dir).record(name), (json.dumps(row, sort_keys=True) + "\n").encode())


def read_records(out_dir: Location) -> dict[str, dict[str, Any]]:
    """All completion records by image_id (unreadable ones are ignored: their images get redone)."""
    records = {}
    for data in read_many(fresh_listing(OutputFolder(out_dir).records, "*.json")).values():
        try:
            row = json.loads(data) if data is not None else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(row, dict) and "image_id" in row:
            records[row["image_id"]] = row
    return records


def output_manifest(out_dir: Location, name: str, group: str | None = None) -> dict[str, Any]:
    """What a finished image wrote, for :mod:`nucleibatch.verify`: the size of every file of its
    masks.zarr group (``group``, its store_path; None: ``name``) and of its nuclei part (``name``)."""
    folder = OutputFolder(out_dir)
    return {"masks": file_sizes(folder.image_group(group or name)), "nuclei_part": file_size(folder.nuclei_part(name))}


def remove_image_outputs(out_dir: Location, name: str) -> None:
    """Delete an image's record and nuclei part (before it is redone)."""
    folder = OutputFolder(out_dir)
    for path in (folder.record(name), folder.nuclei_part(name)):
        remove(path)


def write_images_table(out_dir: Location, rows: list[dict[str, Any]]) -> Location:
    """``OUT/images.parquet`` from image rows (sorted by image_id)."""
    rows = sorted(rows, key=lambda r: r["image_id"])
    table = pa.table({name: pa.array([r.get(name) for r in rows], IMAGES_SCHEMA.field(name).type) for name in IMAGES_SCHEMA.names}, schema=IMAGES_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    path = OutputFolder(out_dir).images
    write_bytes_atomic(path, sink.getvalue().to_pybytes())
    return path
