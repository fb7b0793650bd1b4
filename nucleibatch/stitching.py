"""Block labels to one global label image without seams (pure).

Every nucleus gets exactly one owner: the block whose *core* holds its centroid.
Instances are computed on the block's read region (core + margin), so an owned
nucleus is whole as long as it reaches less than the margin beyond the core; one
that touches the read region's inner edge raises :class:`ObjectTooLargeError`.
Owned objects are painted into every output region they touch; where two owned
objects claim a pixel (rare disagreement at a seam) the smaller global id wins,
whatever order the blocks finished in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .errors import ObjectTooLargeError
from .tiling import Block


@dataclass
class OwnedObjects:
    """The nuclei one block owns.

    ids: ``(n,)`` int64 block-local ids 1..n (global id = image offset of the block + local id).
    boxes: ``(n, 4)`` int64 ``(y0, y1, x0, x1)`` half-open, image coordinates.
    masks: n bool arrays, each the shape of its box.
    """

    block_index: int
    ids: np.ndarray
    boxes: np.ndarray
    masks: list[np.ndarray]

    @property
    def count(self) -> int:
        return int(self.ids.size)


def select_owned(labels: np.ndarray, block: Block, image_shape: tuple[int, int], margin: int) -> tuple[np.ndarray, OwnedObjects]:
    """Keep the objects of a block's read region whose centroid lies in its core.

    Args:
        labels: ``(h, w)`` int labels of the block's read region (``block.read_shape``).
        block: the block.
        image_shape: ``(H, W)`` of the whole image (edges there are not cuts).
        margin: the block margin (for the error message).

    Returns:
        ``owned_labels`` ``(h, w)`` int32 (only owned objects, renumbered 1..n in raster order of
        their centroids) and :class:`OwnedObjects` in image coordinates.

    Raises:
        ObjectTooLargeError: an owned object touches the read region's edge inside the image.
    """
    ry0, ry1, rx0, rx1 = block.read
    cy0, cy1, cx0, cx1 = block.core_in_read
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return np.zeros(labels.shape, np.int32), OwnedObjects(block.index, np.zeros(0, np.int64), np.zeros((0, 4), np.int64), [])
    # per-object crops, not whole-region float64 temporaries (those bound segment's memory)
    boxes_in_read = ndi.find_objects(labels, max_label=n)
    present = np.zeros(n, dtype=bool)
    cy = np.zeros(n, dtype=np.int64)
    cx = np.zeros(n, dtype=np.int64)
    for i, box in enumerate(boxes_in_read):
        if box is None:
            continue
        ys, xs = np.nonzero(labels[box] == i + 1)
        present[i] = True
        # floor of the centroid in exact integer arithmetic: neighbouring blocks must agree on it
        cy[i] = (int(ys.sum()) + box[0].start * ys.size) // ys.size
        cx[i] = (int(xs.sum()) + box[1].start * xs.size) // xs.size
    index = np.arange(1, n + 1)
    owned = present & (cy >= cy0) & (cy < cy1) & (cx >= cx0) & (cx < cx1)
    owned_ids = index[owned]
    order = np.lexsort((cx[owned], cy[owned]))
    owned_ids = owned_ids[order]
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[owned_ids] = np.arange(1, owned_ids.size + 1, dtype=np.int32)
    owned_labels = lut[labels]
    boxes, masks = [], []
    slices = ndi.find_objects(owned_labels)
    h, w = labels.shape
    for local_id, box in enumerate(slices, start=1):
        ys, xs = box
        touches = (
            (ys.start == 0 and ry0 > 0)
            or (ys.stop == h and ry1 < image_shape[0])
            or (xs.start == 0 and rx0 > 0)
            or (xs.stop == w and rx1 < image_shape[1])
        )
        if touches:
            raise ObjectTooLargeError(
                f"a nucleus near (y={ry0 + ys.start}, x={rx0 + xs.start}) reaches more than the block margin "
                f"({margin} px) beyond its block; raise --block-margin (e.g. to {2 * margin}) or --block-size"
            )
        boxes.append((ry0 + ys.start, ry0 + ys.stop, rx0 + xs.start, rx0 + xs.stop))
        masks.append(owned_labels[box] == local_id)
    return owned_labels, OwnedObjects(
        block.index,
        np.arange(1, len(boxes) + 1, dtype=np.int64),
        np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
        masks,
    )


def block_offsets(counts: Iterable[int]) -> np.ndarray:
    """Global id offsets of blocks in block order: ``offset[k] = sum(counts[:k])``."""
    counts = np.asarray(list(counts), dtype=np.int64)
    return np.concatenate([[0], np.cumsum(counts)[:-1]]) if counts.size else counts


def paint_region(region: tuple[int, int, int, int], objects: Iterable[tuple[OwnedObjects, int]], dtype=np.uint32) -> tuple[np.ndarray, dict[int, int]]:
    """Paint owned objects (with their blocks' id offsets) into one output region.

    Args:
        region: ``(y0, y1, x0, x1)`` in image coordinates.
        objects: ``(OwnedObjects, offset)`` pairs of every block whose objects may touch the region.

    Returns:
        ``(h, w)`` labels of ``dtype`` and ``{global_id: pixels_lost}`` for objects that lost pixels
        to a smaller id in this region.
    """
    y0, y1, x0, x1 = region
    out = np.zeros((y1 - y0, x1 - x0), dtype=dtype)
    claims: list[tuple[int, tuple[slice, slice], np.ndarray]] = []
    for owned, offset in objects:
        for local_id, box, mask in zip(owned.ids, owned.boxes, owned.masks, strict=True):
            by0, by1, bx0, bx1 = (int(v) for v in box)
            iy0, iy1, ix0, ix1 = max(y0, by0), min(y1, by1), max(x0, bx0), min(x1, bx1)
            if iy0 >= iy1 or ix0 >= ix1:
                continue
            piece = mask[iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0]
            claims.append((int(offset + local_id), (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0)), piece))
    lost: dict[int, int] = {}
    for global_id, where, piece in sorted(claims, key=lambda c: c[0]):
        target = out[where]
        free = piece & (target == 0)
        taken = int(piece.sum() - free.sum())
        if taken:
            lost[global_id] = lost.get(global_id, 0) + taken
        target[free] = global_id
    return out, lost
