"""What a rerun on an existing OUT does again: images renamed since, failed ones, changed inputs,
damaged outputs."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import UsageError
from ..io.discover import ImageRecord
from ..io.location import Location
from ..verify import verify_records
from .rows import forget_image, input_fingerprint

log = logging.getLogger(__name__)


def reconcile_renamed(out_dir: Location, records: list[ImageRecord], finished: dict[str, dict[str, Any]]) -> None:
    """Images OUT holds under another id than this run gives them (never two rows for one file).

    * An INPUT added beside those that started OUT prefixes the ids that clash with its own
      (``a`` becomes ``r2/a``): redoing every image of the first INPUT under new ids is rarely
      wanted, so the run is refused, saying how to go on.
    * A file of the same name added beside one (``x.tif`` beside ``x.png``: both keep their
      extension in their ids): the few renamed images lose their old outputs and are redone
      under their new ids (``finished`` loses them too).

    Raises:
        UsageError: the first case, with an example and how to go on.
    """
    finished_as = {row.get("source"): image_id for image_id, row in finished.items()}
    renamed = [(finished_as[r.source], r.image_id) for r in records if r.source in finished_as and finished_as[r.source] != r.image_id]
    prefixed = [(old, new) for old, new in renamed if new.endswith("/" + old)]
    for old, new in renamed if not prefixed else []:
        log.info("%s: now has the id %r (a file of the same name beside it); its outputs as %r are replaced", finished[old].get("source"), new, old)
        forget_image(out_dir, old, finished[old].get("store_path"))
        finished.pop(old)
    if prefixed:
        old, new = prefixed[0]
        raise UsageError(
            f"{len(prefixed)} image(s) that OUT holds would get another id in this run (e.g. {old!r} is now {new!r}: ids come "
            "from the INPUTs, and an INPUT added beside those that started OUT prefixes the ids that clash); give the INPUTs "
            "of the run that started OUT (and the new ones their own -o OUT), or list every file in a CSV manifest with an "
            "image_id column, or pass --overwrite to start OUT over"
        )


def images_to_redo(
    out_dir: Location, records: list[ImageRecord], finished: dict[str, dict[str, Any]], retry_failed: bool, verify: bool
) -> set[str]:
    """The finished images a resumed run must do again: failed ones with ``retry_failed``, those
    whose input changed since (size/mtime or ETag), and with ``verify`` those whose outputs are damaged."""
    redo: set[str] = set()
    for record in records:
        row = finished.get(record.image_id)
        if row is None:
            continue
        if retry_failed and row["status"] != "ok":
            redo.add(record.image_id)
        # records from before fingerprints were kept lack "input"; None: the input was unreadable then
        elif "input" in row and row["input"] != input_fingerprint(record):
            log.info("%s changed since it was processed: redone", record.source)
            redo.add(record.image_id)
    if verify:
        report = verify_records(out_dir, {r.image_id: finished[r.image_id] for r in records if r.image_id in finished and r.image_id not in redo})
        for line in report.lines():
            log.info("verify: %s", line.strip())
        redo.update(damage.image_id for damage in report.damaged)
    return redo
