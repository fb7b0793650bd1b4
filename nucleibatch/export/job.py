"""The export job: check a finished segment output, select its images and write them in one format.

Images whose status is 'ok' are exported; failed ones are skipped and named in the summary.
``<name>`` of the files is :func:`nucleibatch.output.store.store_name` of the image id.
"""

from __future__ import annotations

import csv
import logging
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ExportError, UsageError
from ..io.location import is_remote
from ..output.atomic import replaced_on_success
from ..output.folder import IMAGES, MASKS, OutputFolder, label_path
from ..output.reader import label_image, open_masks, read_image_nuclei, read_images
from ..output.store import store_name
from ..output.tables import check_segment_output
from .png import write_png16
from .writers import write_geojson, write_rle_rows, write_tiff

if TYPE_CHECKING:  # pandas is imported where used: `nucleibatch --help` stays quick
    import pandas as pd

log = logging.getLogger(__name__)

FORMATS = ("geojson", "dsb-rle", "png", "tiff")
SUFFIX = {"geojson": ".geojson", "png": ".png", "tiff": ".tif"}
SUBMISSION_CSV = "submission.csv"  # dsb-rle: one file for all images


@dataclass
class SegmentOutput:
    """What export reads of OUT: the ok images to export and the failed ones skipped."""

    out_dir: Path
    images: pd.DataFrame  # rows of images.parquet with status 'ok', selected
    failed: list[str]  # selected image ids whose status is not 'ok'


def open_segment_output(out: str | Path, image_ids: Sequence[str] | None = None) -> SegmentOutput:
    """Check that ``out`` is a finished segment output and select its images.

    Raises:
        NotSegmentOutputError: ``out`` is missing, or lacks images.parquet / masks.zarr.
        UsageError: an id of ``image_ids`` is not in images.parquet.
    """

    out_dir = check_segment_output(out, finished=True)
    if is_remote(out_dir):
        raise UsageError(f"{out_dir}: export reads local folders and file:// URLs; copy the run's outputs from the store first")
    images = read_images(out_dir)
    if image_ids:
        unknown = [i for i in dict.fromkeys(image_ids) if i not in set(images.image_id)]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise UsageError(f"--images: {shown} not in {OutputFolder(out_dir).images} (its image_id column lists the ids)")
        images = images[images.image_id.isin(set(image_ids))]
    ok = images.status == "ok"
    return SegmentOutput(out_dir, images[ok].sort_values("image_id").reset_index(drop=True), sorted(images.image_id[~ok]))


def _label_array(root, image: Any):
    """The level-0 label array of an ok image (a row of images.parquet), checked against the table's size."""
    try:
        array = label_image(root, image.store_path)
    except KeyError:
        raise ExportError(
            f"{MASKS} has no labels at {label_path(0, image.store_path)} for image {image.image_id!r} (status ok): OUT is damaged; "
            f"re-run segment with --overwrite, or leave this image out with --images"
        ) from None
    if tuple(array.shape) != (int(image.height), int(image.width)):
        raise ExportError(f"labels of {image.image_id!r} are {tuple(array.shape)}, {IMAGES} says {(image.height, image.width)}: OUT is damaged")
    return array


@dataclass
class ExportSummary:
    """What an export wrote."""

    format: str
    dest: Path
    n_images: int = 0
    n_nuclei: int = 0
    files: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # skipped: their segmentation failed
    seconds: float = 0.0

    def line(self) -> str:
        """The one-line summary printed by the CLI."""
        text = (
            f"exported {self.n_images} images, {self.n_nuclei} nuclei as {self.format} "
            f"to {len(self.files)} file{'s' if len(self.files) != 1 else ''} in {self.dest} ({self.seconds:.1f} s)"
        )
        return text


def failed_line(failed: Sequence[str]) -> str:
    """One line naming the images skipped because their segmentation failed."""
    shown = ", ".join(failed[:10]) + (f" and {len(failed) - 10} more" if len(failed) > 10 else "")
    return f"skipped {len(failed)} failed image{'s' if len(failed) != 1 else ''} (see {IMAGES} error column): {shown}"


class _Progress:
    """tqdm on a terminal; otherwise a log line every 30 s (and at the end when it took that long)."""

    def __init__(self, total: int, desc: str, enabled: bool | None) -> None:
        self.total, self.done, self.started, self.last = total, 0, time.perf_counter(), time.perf_counter()
        self.bar = None
        if enabled if enabled is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True)

    def update(self, nuclei: int) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif time.perf_counter() - self.last > 30:
            log.info("export: %d/%d images, %d nuclei in the last one", self.done, self.total, nuclei)
            self.last = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def export_run(
    out: str | Path,
    fmt: str,
    dest: str | Path | None = None,
    image_ids: Sequence[str] | None = None,
    progress: bool | None = None,
) -> ExportSummary:
    """Export the 'ok' images of a segment output folder.

    Args:
        out: OUT of ``nucleibatch segment``.
        fmt: one of :data:`FORMATS`.
        dest: the folder written (default ``OUT/export/<fmt>``); existing files of the same
            names are replaced (each file is written to a temporary name, then renamed).
        image_ids: export only these images (default: all).
        progress: tqdm bar (None: when stderr is a terminal).

    Returns:
        An :class:`ExportSummary`. Failed images are skipped and listed in ``failed``.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    started = time.perf_counter()
    run = open_segment_output(out, image_ids)
    dest_dir = Path(dest) if dest is not None else OutputFolder(run.out_dir).export(fmt)
    if dest_dir.exists() and not dest_dir.is_dir():
        raise UsageError(f"-o {dest_dir} is a file; give a folder")
    summary = ExportSummary(fmt, dest_dir, failed=run.failed)
    if fmt == "png" and len(run.images):
        too_big = []
        for image in run.images.itertuples(index=False):
            labels = read_image_nuclei(run.out_dir, image.image_id, ["image_id", "label"]).label
            if len(labels) and int(labels.max()) > 65535:
                too_big.append(f"{image.image_id} (max label {int(labels.max())})")
        if too_big:
            raise UsageError(f"labels above 65535 do not fit a 16-bit PNG: {', '.join(too_big[:5])}; use --format tiff (32-bit)")
    dest_dir.mkdir(parents=True, exist_ok=True)
    root = open_masks(run.out_dir)
    bar = _Progress(len(run.images), f"export {fmt}", progress)
    csv_path = dest_dir / SUBMISSION_CSV
    try:
        with ExitStack() as csv_file:  # dsb-rle: one file for all images, in place only when all went well
            if fmt == "dsb-rle":
                csv_handle = csv_file.enter_context(open(csv_file.enter_context(replaced_on_success(csv_path)), "w", newline=""))
                writer = csv.writer(csv_handle, lineterminator="\n")
                writer.writerow(["ImageId", "EncodedPixels"])
            for image in run.images.itertuples(index=False):
                array = _label_array(root, image)
                n = 0
                if fmt in ("geojson", "dsb-rle"):
                    nuclei = read_image_nuclei(run.out_dir, image.image_id)
                    if fmt == "geojson":
                        path = dest_dir / f"{store_name(image.image_id)}{SUFFIX[fmt]}"
                        n = write_geojson(array, nuclei, image.image_id, path)
                        summary.files.append(path)
                    else:
                        n = write_rle_rows(writer, array, nuclei, image.image_id)
                else:
                    path = dest_dir / f"{store_name(image.image_id)}{SUFFIX[fmt]}"
                    (write_png16 if fmt == "png" else write_tiff)(array, path)
                    summary.files.append(path)
                    n = int(image.n_nuclei)
                summary.n_images += 1
                summary.n_nuclei += n
                bar.update(n)
        if fmt == "dsb-rle":
            summary.files.append(csv_path)
    finally:
        bar.close()
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary
