"""The one reader of a finished (or partial) OUT, shared by ``segment`` (resume), ``report``,
``export`` and ``verify``: run.json, the images table, the nuclei parts, masks.zarr's groups
and label arrays. pandas, pyarrow and zarr are imported where used: ``nucleibatch --help``
stays quick, and the report's drawing functions (used by training) need no zarr.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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
