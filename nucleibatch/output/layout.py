"""How OUT/masks.zarr is laid out as a whole: where each image's group goes, and what its root is.

Three layouts, chosen once when an OUT is started and recorded in its settings (a resumed run
keeps its OUT's layout; :func:`layout_for_run`):

* ``plate``: every image of the run is a field of one OME-Zarr plate. The root of masks.zarr is
  that plate (NGFF 0.5 plate metadata); field ``0`` of well ``B/2`` is the group ``B/2/0``.
* ``collection``: anything else. Ordinary images keep their flat group names
  (:func:`~nucleibatch.output.store.store_name`); the fields of each plate go into a plate group
  named after the plate (``plateA/B/2/0``) that holds the plate metadata. The root follows the
  bioformats2raw transitional layout of NGFF 0.5: ``bioformats2raw.layout: 3`` at the root and
  an ``OME`` group whose ``series`` lists the image groups (plus ``OME/METADATA.ome.xml`` naming
  them, which napari-ome-zarr reads).
* ``flat``: OUTs started before plates were laid out: every image, plate fields included, has a
  flat group; the root is laid out as for ``collection``.

The plate, well and OME metadata are (re)written from the completion records when a run ends
(:func:`write_layout`), so they list exactly the images that were segmented.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace
from typing import Any
from xml.sax.saxutils import quoteattr

import zarr

from ..errors import UsageError
from ..io.discover import ImageRecord
from ..io.location import Location
from .atomic import write_bytes_atomic
from .folder import MASKS
from .store import NGFF_VERSION, store_name

FLAT = {"kind": "flat"}
COLLECTION = {"kind": "collection"}
# the bioformats2raw transitional layout's group that lists the images
OME_GROUP = "OME"
# NGFF: row, column and field names are alphanumeric
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")


def choose_layout(records: Iterable[ImageRecord]) -> dict[str, Any]:
    """The layout of a new OUT for these images: ``{"kind": "plate", "plate": ID}`` when every one
    is a field of the same plate, else :data:`COLLECTION`."""
    plates = {record.plate for record in records}
    if len(plates) == 1 and None not in plates:
        return {"kind": "plate", "plate": plates.pop()}
    return dict(COLLECTION)


def layout_for_run(recorded: dict[str, Any] | None, records: list[ImageRecord], out_dir: Location) -> dict[str, Any]:
    """The layout this run writes: OUT's recorded settings' (``recorded``; one without a layout
    predates them: :data:`FLAT`), or for a new OUT (``recorded`` None) :func:`choose_layout`.

    Raises:
        UsageError: OUT's root is a plate and this run has images of no plate or of another plate
            (they cannot go into that plate; the message says how to go on).
    """
    if recorded is None:
        return choose_layout(records)
    layout = recorded.get("layout", FLAT)
    if layout.get("kind") == "plate":
        strangers = [record for record in records if record.plate != layout.get("plate")]
        if strangers:
            raise UsageError(
                f"{out_dir}/{MASKS} holds the plate {layout.get('plate')!r} at its root, and {len(strangers)} image(s) of this run "
                f"are not fields of that plate (e.g. {strangers[0].image_id!r}); give them their own -o OUT, or pass --overwrite to "
                "lay OUT out for all of them"
            )
    return layout


def _alnum(name: str) -> str:
    """A row, column or field name as NGFF wants it (alphanumeric), from the input's."""
    return _NOT_ALNUM.sub("", name) or "0"


def plate_store_path(record: ImageRecord, layout: dict[str, Any]) -> str | None:
    """The group of a plate field in masks.zarr under ``layout`` (None: its flat name).

    ``<row>/<column>/<field>`` in the root plate, ``<plate group>/<row>/<column>/<field>`` in a
    collection; a field that the input split into several images (``#t1-z2``: one per time point
    or plane) gets that suffix in its field name (``0t1z2``) so each image has its own group.
    """
    if record.plate is None or record.well is None or record.field is None or layout.get("kind") == "flat":
        return None
    row, column = (_alnum(part) for part in record.well.split("/", 1))
    field_name = _alnum(record.field)
    if "#" in record.image_id:
        field_name += _alnum(record.image_id.rsplit("#", 1)[1])
    path = f"{row}/{column}/{field_name}"
    return path if layout.get("kind") == "plate" else f"{store_name(record.plate)}/{path}"


def assign_store_paths(records: list[ImageRecord], layout: dict[str, Any]) -> list[ImageRecord]:
    """``records`` with their ``store_path`` set for ``layout``. Fields whose names would become
    the same group (names that differ only in characters NGFF does not allow) keep flat names."""
    paths = {record.image_id: plate_store_path(record, layout) for record in records}
    taken: dict[str, int] = defaultdict(int)
    for path in paths.values():
        if path is not None:
            taken[path] += 1
    return [replace(record, store_path=path) if (path := paths[record.image_id]) is not None and taken[path] == 1 else record for record in records]


def write_layout(root: zarr.Group, masks_dir: Location, rows: Iterable[dict[str, Any]], layout: dict[str, Any]) -> None:
    """(Re)write the metadata that makes masks.zarr's root open in OME-Zarr readers: the plate
    and well metadata of each plate, and the root's (a plate, or the bioformats2raw layout).

    ``rows``: the completion records of every image in OUT; only finished (``ok``) images with a
    group are listed (a failed field is no image of its well).
    """
    done = sorted((row for row in rows if row.get("status") == "ok" and row.get("store_path")), key=lambda row: row["store_path"])
    if layout.get("kind") == "plate":
        fields = [row for row in done if row.get("plate") == layout.get("plate")]
        root.attrs.put({"ome": _plate_metadata(root, "", fields, str(layout.get("plate")))} if fields else {})
        return
    plates: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in done:
        if row.get("plate") and row["store_path"].count("/") == 3:  # a collection's plate field: <plate>/<row>/<col>/<field>
            plates[row["plate"]].append(row)
    for plate, fields in plates.items():
        group = root.require_group(store_name(plate))
        group.attrs.put({"ome": _plate_metadata(root, store_name(plate), fields, plate)})
    series = [row["store_path"] for row in done]
    if not series and OME_GROUP not in root:
        return  # no image yet: nothing to list (a root that listed some before is emptied below)
    if any(path == OME_GROUP or path.startswith(f"{OME_GROUP}/") for path in series):
        return  # an image's own group is named OME: the layout's group cannot be written
    root.attrs.put({"ome": {"version": NGFF_VERSION, "bioformats2raw.layout": 3}})
    root.require_group(OME_GROUP).attrs.put({"ome": {"version": NGFF_VERSION, "series": series}})
    write_bytes_atomic(masks_dir / OME_GROUP / "METADATA.ome.xml", ome_xml(done).encode())


def _index_key(name: str) -> tuple[int, int, str]:
    """Sort key of row and column names: numbers by value (2 before 10), then letters (B before AA)."""
    return (0, int(name), name) if name.isdigit() else (1, len(name), name)


def _plate_metadata(root: zarr.Group, prefix: str, fields: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The NGFF 0.5 ``ome`` attributes of a plate group from its finished fields' rows; writes
    each well's metadata (the fields it holds) on the way."""
    wells: dict[tuple[str, str], list[str]] = defaultdict(list)
    for row in fields:
        path = row["store_path"][len(prefix) + 1 :] if prefix else row["store_path"]
        row_name, column_name, field_name = path.split("/")
        wells[(row_name, column_name)].append(field_name)
    row_names = sorted({r for r, _ in wells}, key=_index_key)
    column_names = sorted({c for _, c in wells}, key=_index_key)
    for (row_name, column_name), field_names in wells.items():
        well_path = f"{prefix}/{row_name}/{column_name}" if prefix else f"{row_name}/{column_name}"
        images = [{"path": field_name} for field_name in sorted(field_names, key=_index_key)]
        root.require_group(well_path).attrs.put({"ome": {"version": NGFF_VERSION, "well": {"images": images}}})
    return {
        "version": NGFF_VERSION,
        "plate": {
            "name": name,
            "rows": [{"name": r} for r in row_names],
            "columns": [{"name": c} for c in column_names],
            "wells": [
                {"path": f"{r}/{c}", "rowIndex": row_names.index(r), "columnIndex": column_names.index(c)}
                for r, c in sorted(wells, key=lambda well: (_index_key(well[0]), _index_key(well[1])))
            ],
            "field_count": max(len(names) for names in wells.values()),
        },
    }


def ome_xml(rows: list[dict[str, Any]]) -> str:
    """``OME/METADATA.ome.xml`` of the bioformats2raw layout: one ``Image`` per image group, its
    ``ID`` ``Image:<group path>`` (how napari-ome-zarr finds the groups) and its ``Name`` the
    image id. Only the images are listed: their pixels' metadata is in each group's multiscales."""
    images = "".join(f"  <Image ID={quoteattr('Image:' + row['store_path'])} Name={quoteattr(str(row['image_id']))}/>\n" for row in rows)
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">\n{images}</OME>\n'
