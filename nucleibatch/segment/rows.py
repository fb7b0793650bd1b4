"""An image's row in images.parquet and its completion record: finished, failed or forgotten."""

from __future__ import annotations

import logging
from typing import Any

from ..io.discover import ImageRecord
from ..io.location import Location, fingerprint, to_location
from ..output.checkpoints import (
    drop_checkpoints,
)
from ..output.folder import OutputFolder
from ..output.store import (
    open_root,
    store_name,
)
from ..output.tables import (
    remove_image_outputs,
    write_record,
)
from .plan import image_group

log = logging.getLogger(__name__)


def input_fingerprint(record: ImageRecord) -> str | None:
    """The fingerprint (:func:`nucleibatch.io.location.fingerprint`) of the file or store an image
    comes from, as discovery found it (taken now for a record made without one)."""
    if record.fingerprint is not None or record.error:
        return record.fingerprint
    return fingerprint(to_location(record.path))


def failed_row(record: ImageRecord, error: BaseException | str, seconds: float) -> dict[str, Any]:
    """The images.parquet row of an image that could not be segmented (one-line reason)."""
    message = error if isinstance(error, str) else (str(error) or type(error).__name__)
    message = " ".join(message.split())[:500]
    shape = record.shape or (None, None)
    return {
        "image_id": record.image_id,
        "source": record.source,
        "height": shape[0],
        "width": shape[1],
        "n_nuclei": 0,
        "status": "failed",
        "error": message,
        "seconds": round(seconds, 4),
        "store_path": None,  # a failed image has no group in masks.zarr
        **choice_columns(record),
        **plate_columns(record),
    }


def choice_columns(record: ImageRecord) -> dict[str, Any]:
    """The images.parquet columns of how an image was treated (:mod:`nucleibatch.segment.choose`)."""
    return {"modality": record.modality, "model": record.model, "pixel_size_um": record.pixel_size_um, "scale": float(record.scale)}


def plate_columns(record: ImageRecord) -> dict[str, Any]:
    """The images.parquet columns that place a plate field (null for other images)."""
    return {"plate": record.plate, "well": record.well, "field": record.field}


def record_finished_image(out_dir: Location, record: ImageRecord, row: dict[str, Any]) -> None:
    """Record an image as done with ``row`` (ok, from :func:`~nucleibatch.segment.stitch.stitch_image`):
    its block checkpoints are dropped first, so that a kill in between redoes the image whole."""
    drop_checkpoints(out_dir, store_name(record.image_id))
    write_record(out_dir, store_name(record.image_id), row)


def record_failed_image(out_dir: Location, record: ImageRecord, error: BaseException | str, seconds: float) -> dict[str, Any]:
    """Record an image as failed: drop what an earlier run wrote for it (nuclei part, record,
    OME-Zarr group), write its completion record (the 'failed' row of :func:`failed_row`) and
    return that row."""
    row = failed_row(record, error, seconds)
    row["input"] = input_fingerprint(record)
    forget_image(out_dir, record.image_id, image_group(record))
    write_record(out_dir, store_name(record.image_id), row)
    return row


def forget_image(out_dir: Location, image_id: str, group: str | None = None) -> None:
    """Remove everything OUT holds for an image: its completion record, nuclei part, block
    checkpoints and OME-Zarr group (``group``: its store_path; None: the flat name of its id)."""
    name = store_name(image_id)
    group = group or name
    remove_image_outputs(out_dir, name)
    drop_checkpoints(out_dir, name)
    try:
        root = open_root(OutputFolder(out_dir).masks)
        if group in root:
            del root[group]
    except Exception:  # best effort: the group is replaced when the image is redone
        log.debug("could not remove the group of %s", image_id, exc_info=True)
