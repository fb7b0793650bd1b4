"""The last step of an image: paint every block core from the owned nuclei of the blocks around
it, re-measure the nuclei cut at a seam, write the nuclei table part and pyramids, and return
the image's row."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from ..io.location import Location
from ..io.readers import ImageSource, open_source
from ..measure import concat_columns, measure_labels, physical_columns, touches_border
from ..normalize import to_grey
from ..output.folder import OutputFolder
from ..output.store import (
    label_array,
    open_root,
    write_pyramids,
)
from ..output.tables import (
    output_manifest,
    write_nuclei_part,
)
from ..stitching import block_offsets, paint_region
from ..tiling import Block
from .plan import BlockResult, ImagePlan, neighbours
from .rows import (
    choice_columns,
    plate_columns,
)
from .settings import SegmentSettings
from .steps import kept_block
from .timer import Timer


def paint_block(plan: ImagePlan, block: Block, results: dict[int, BlockResult], offsets: np.ndarray, image_group) -> dict[int, int]:
    """Write the labels of one block core from the owned nuclei of its neighbours.

    Returns ``{global_id: pixels lost to a smaller id}`` (usually empty).
    """
    pieces = [(results[b.index].owned, int(offsets[b.index])) for b in neighbours(plan, block)]
    labels, lost = paint_region(block.core, pieces)
    cy0, cy1, cx0, cx1 = block.core
    label_array(image_group)[cy0:cy1, cx0:cx1] = labels
    return lost


def remeasure(plan: ImagePlan, source: ImageSource, image_group, columns: dict[str, np.ndarray], global_ids: list[int], settings: SegmentSettings) -> None:
    """Re-measure nuclei that lost pixels at a seam from the final labels (in place): every
    column, the per-channel means too, from the raw pixels of the nucleus's whole box."""
    row_of = {int(label): i for i, label in enumerate(columns["label"])}
    for global_id in global_ids:
        i = row_of[global_id]
        y0, x0 = int(columns["bbox_min_y"][i]), int(columns["bbox_min_x"][i])
        y1, x1 = int(columns["bbox_max_y"][i]), int(columns["bbox_max_x"][i])
        labels = np.asarray(label_array(image_group)[y0:y1, x0:x1])
        mask = (labels == global_id).astype(np.int32)
        if not mask.any():
            columns["area"][i] = 0
            continue
        pixels = source.read(y0, y1, x0, x1)
        fresh = measure_labels(mask, to_grey(pixels, plan.channel), origin=(y0, x0), id_offset=global_id - 1, channels=pixels, channel_columns=plan.channel_columns)
        for key, values in fresh.items():
            columns[key][i] = values[0]


def finish_image(
    plan: ImagePlan,
    results: dict[int, BlockResult],
    offsets: np.ndarray,
    lost: dict[int, int],
    image_group,
    settings: SegmentSettings,
    out_dir: Location,
    timer: Timer,
) -> dict[str, Any]:
    """Last step of an image whose block cores are all painted: the nuclei table part (global ids,
    nuclei that lost pixels at a seam re-measured), the pyramids, then the completion record.

    Returns the image's images.parquet row.
    """
    with timer("measure"):
        parts = []
        for index in range(len(plan.blocks)):
            columns = dict(results[index].columns)
            columns["label"] = (columns["label"].astype(np.int64) + offsets[index]).astype(np.uint32)
            parts.append(columns)
        columns = concat_columns(parts, plan.channel_columns)
        if lost:
            source = open_source(plan.record)
            try:
                remeasure(plan, source, image_group, columns, sorted(lost), settings)
            finally:
                source.close()
            keep = columns["area"] > 0
            columns = {k: v[keep] for k, v in columns.items()}
        columns.update(physical_columns(columns, plan.record.pixel_size_um))
        columns["touches_border"] = touches_border(columns, plan.shape)
    with timer("write"):
        write_pyramids(image_group)
        write_nuclei_part(out_dir, plan.name, plan.record.image_id, columns, plan.channel_columns)
        outputs = output_manifest(out_dir, plan.name, plan.store_path)
    row = {
        "image_id": plan.record.image_id,
        "source": plan.record.source,
        "height": plan.shape[0],
        "width": plan.shape[1],
        "n_nuclei": int(len(columns["label"])),
        "status": "ok",
        "error": None,
        "seconds": None,  # set by the caller, who knows when the image started
        "store_path": plan.store_path,
        **choice_columns(plan.record),
        **plate_columns(plan.record),
        # kept in the completion record only (not in images.parquet): resume and verify read them
        "input": plan.input_fingerprint,
        "outputs": outputs,
        # the per-channel columns of its nuclei part: the run's schema part unites them (output/tables.py)
        "channel_columns": list(plan.channel_columns),
    }
    return row


def stitch_image(plan: ImagePlan, results: list[BlockResult], settings: SegmentSettings, out_dir: Location, timer: Timer) -> dict[str, Any]:
    """The last step of an image whose blocks are all finished: paint every block core, in raster
    order, from the owned nuclei of the blocks around it (:class:`ImageStitcher`), then
    :func:`finish_image`. Returns the row (not yet recorded).

    ``results``: the blocks finished by this run, in any order. A block that an earlier run
    finished (``plan.done_blocks``), or whose result comes without its nuclei's masks (an image of
    several blocks: :func:`without_masks`, its masks in its checkpoint), is read back from its
    checkpoint as its turn comes; the stitcher frees each block's masks once every core that needs
    them is painted, so memory stays bounded by a few rows of blocks however large the image.
    """
    by_index = {r.block_index: r for r in results}
    covered = sorted(set(by_index) | set(plan.done_blocks))
    if covered != [b.index for b in plan.blocks]:
        raise ValueError(f"{plan.record.image_id}: block results {covered} do not cover the {len(plan.blocks)} blocks")
    group = open_root(OutputFolder(out_dir).masks)[plan.store_path]
    stitcher = ImageStitcher(plan, group, timer)
    for block in plan.blocks:
        result = by_index.pop(block.index, None)
        if result is None or result.owned is None:
            result = kept_block(out_dir, plan, block.index)
        stitcher.add(result)
    return finish_image(plan, stitcher.results, stitcher.offsets, stitcher.lost, group, settings, out_dir, timer)


class ImageStitcher:
    """Paints an image's block cores as the block results are added (in raster order): each core
    as soon as all its neighbours are there, then frees the nuclei no core still needs."""

    def __init__(self, plan: ImagePlan, group, timer: Timer) -> None:
        self.plan, self.group, self.timer = plan, group, timer
        self.results: dict[int, BlockResult] = {}
        self.offsets = np.zeros(0, dtype=np.int64)
        self.lost: dict[int, int] = {}
        self.painted: set[int] = set()
        self.by_index = {b.index: b for b in plan.blocks}
        self.waits_for = {b.index: {n.index for n in neighbours(plan, b)} for b in plan.blocks}
        self.needed_by: dict[int, set[int]] = defaultdict(set)
        for index, waits in self.waits_for.items():
            for neighbour in waits:
                self.needed_by[neighbour].add(index)

    def add(self, result: BlockResult) -> None:
        """Take one block's result; paint what it completes."""
        self.results[result.block_index] = result
        self.offsets = block_offsets(self.results[i].owned.count for i in range(len(self.results)))
        with self.timer("stitch"):
            for index in sorted(self.needed_by[result.block_index]):  # only these may have become ready
                if self.waits_for[index] <= self.results.keys() and index not in self.painted:
                    self.lost.update(paint_block(self.plan, self.by_index[index], self.results, self.offsets, self.group))
                    self.painted.add(index)
            for index, done in self.results.items():
                if self.needed_by[index] <= self.painted and done.owned.masks:
                    done.owned.masks = []
