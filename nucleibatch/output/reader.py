"""The one reader of a finished (or partial) OUT, shared by ``segment`` (resume), ``report``,
``export`` and ``verify``: run.json, the images table, the nuclei parts (one image's rows, or an
even sample of some columns of all), masks.zarr's groups, their pyramid levels and label arrays. pandas, pyarrow and zarr are imported where used: ``nucleibatch --help``
stays quick, and the report's drawing functions (used by training) need no zarr.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..io.location import Location, fresh_listing, is_remote, open_binary, read_many
from .folder import OutputFolder, label_path
from .tables import IMAGE_COLUMNS, read_records

if TYPE_CHECKING:
    import pandas as pd
    import zarr

log = logging.getLogger(__name__)


def read_run(out: Location) -> dict[str, Any] | None:
    """``OUT/run.json`` as the last run wrote it (None: none, unreadable, or not an object)."""
    path = OutputFolder(out).run_json
    data = read_many(fresh_listing(path.parent, path.name)).get(str(path))
    try:
        run = json.loads(data) if data else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return run if isinstance(run, dict) else None


def read_images(out: Location) -> pd.DataFrame:
    """``OUT/images.parquet`` as written (one row per image, :data:`~nucleibatch.output.tables.IMAGE_COLUMNS`;
    tables of older versions lack the later columns).

    Raises:
        OSError, pyarrow.ArrowException: the table is missing or unreadable.
    """
    import pandas as pd

    return pd.read_parquet(str(OutputFolder(out).images))


def read_images_with_records(out: Location) -> pd.DataFrame:
    """The image rows: ``images.parquet`` updated with the completion records (a run still going
    or killed before it rebuilt the table has records the table lacks). A DataFrame with the
    columns :data:`~nucleibatch.output.tables.IMAGE_COLUMNS`, sorted by image_id (empty when
    there is nothing); ``n_nuclei`` int64, ``height``/``width``/``seconds`` numeric, ``status``
    str ('unknown' where missing). A damaged table is logged and its rows come from the records."""
    import pandas as pd

    rows: dict[str, dict[str, Any]] = {}
    path = OutputFolder(out).images
    if path.exists():
        try:
            for row in read_images(out).to_dict("records"):
                rows[str(row["image_id"])] = row
        except Exception as error:  # damaged table: the records below still count
            log.warning("report: cannot read %s (%s)", path, error)
    rows.update(read_records(out))
    table = pd.DataFrame([{c: row.get(c) for c in IMAGE_COLUMNS} for row in rows.values()], columns=list(IMAGE_COLUMNS))
    table["n_nuclei"] = pd.to_numeric(table["n_nuclei"], errors="coerce").fillna(0).astype("int64")
    for column in ("height", "width", "seconds"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    table["status"] = table["status"].fillna("unknown").astype(str)
    return table.sort_values("image_id", kind="stable").reset_index(drop=True)


def nuclei_files(out: Location) -> list[Location]:
    """The parquet files that make ``nuclei.parquet``: its parts (the folder's ``*.parquet``, hidden
    and ``_`` names left out), or the file itself where it is one file."""
    path = OutputFolder(out).nuclei
    if path.is_file():
        return [path]
    return [p for p in fresh_listing(path, "*.parquet") if not p.name.startswith((".", "_"))]


def sample_nuclei(out: Location, columns: Sequence[str], max_rows: int) -> tuple[dict[str, np.ndarray], int, list[str]]:
    """Columns of ``nuclei.parquet`` for at most ``max_rows`` nuclei (every k-th row), streamed
    in batches so memory stays bounded however many nuclei there are.

    Returns ``({column: float64 array}, total rows, problems)``; unreadable parts are skipped
    and named in ``problems``.
    """
    import pyarrow.parquet as pq

    problems: list[str] = []
    files = []
    total = 0
    for path in nuclei_files(out):
        try:
            handle = pq.ParquetFile(open_binary(path))
            files.append((path, handle))
            total += handle.metadata.num_rows
        except Exception as error:
            problems.append(f"{path.name}: {error}")
    stride = max(1, math.ceil(total / max_rows)) if max_rows > 0 else 1
    chunks: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    position = 0  # rows seen so far: every stride-th row of the whole table is kept
    for path, handle in files:
        present = [c for c in columns if c in handle.schema_arrow.names]
        if not present:
            problems.append(f"{path.name}: none of the columns {', '.join(columns)}")
            continue
        try:
            for batch in handle.iter_batches(batch_size=262_144, columns=present):
                start = (-position) % stride
                for c in columns:
                    if c in present:
                        values = batch.column(present.index(c)).to_numpy(zero_copy_only=False)
                        chunks[c].append(np.asarray(values[start::stride], dtype=np.float64))
                position += batch.num_rows
        except Exception as error:
            problems.append(f"{path.name}: {error}")
    data = {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in chunks.items()}
    return data, total, problems


def read_image_nuclei(out: Location, image_id: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The ``nuclei.parquet`` rows of one image: from its own part when there is one, else a
    filtered read of the whole table. ``columns``: only these (None: all).

    Raises:
        OSError, pyarrow.ArrowException: the part or table is unreadable.
    """
    import pyarrow.parquet as pq

    from .store import store_name  # zarr: imported only by readers of the store

    folder = OutputFolder(out)
    wanted = list(columns) if columns else None
    part = folder.nuclei_part(store_name(image_id))  # flat, also for a plate field's nested group
    if part.is_file():
        with open_binary(part) as stream:
            frame = pq.read_table(stream, columns=wanted).to_pandas()
        return frame[frame.image_id == image_id] if "image_id" in frame else frame
    if is_remote(folder.nuclei):
        table = pq.read_table(folder.nuclei.path, filesystem=folder.nuclei.fs, columns=wanted, filters=[("image_id", "==", image_id)])
    else:
        table = pq.read_table(folder.nuclei, columns=wanted, filters=[("image_id", "==", image_id)])
    return table.to_pandas()


def open_masks(out: Location) -> zarr.Group:
    """``OUT/masks.zarr`` opened read-only.

    Raises:
        FileNotFoundError: OUT has no masks.zarr.
    """
    from .store import open_root

    path = OutputFolder(out).masks
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return open_root(path, mode="r")


def label_image(root: zarr.Group, store_path: str, level: int | str = 0) -> zarr.Array:
    """Pyramid level ``level`` of the label image of the image group ``store_path`` of
    :func:`open_masks`: ``(H / 2**level, W / 2**level)`` unsigned int, 0 = background.

    Raises:
        KeyError: masks.zarr has no such group or level.
    """
    return root[label_path(level, store_path)]


def pyramid_levels(group: zarr.Group) -> list[str]:
    """Paths of an image group's pyramid levels (``["0", "1", ...]``), full resolution first:
    from its OME multiscales metadata, else probed (damaged or missing metadata)."""
    try:
        ome = group.attrs.asdict().get("ome") or group.attrs.asdict()
        paths = [d["path"] for d in ome["multiscales"][0]["datasets"]]
        if paths:
            return [str(p) for p in paths]
    except Exception:
        pass
    paths, level = [], 0
    while str(level) in group:
        paths.append(str(level))
        level += 1
    return paths


def image_written(array: zarr.Array) -> bool:
    """Whether an image group's copy of the pixels holds data (``--no-store-image`` leaves the
    array unwritten); True when the store cannot say."""
    try:
        return int(array.nchunks_initialized) > 0
    except Exception:
        return True
