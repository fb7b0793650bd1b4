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


def select_owned(labels: np.ndarray, block: Block, image_shape: tuple[int, int], margin: int, min_size: int = 1) -> tuple[np.ndarray, OwnedObjects]:
    """Keep the objects of a block's read region whose centroid lies in its core.

    Args:
        labels: ``(h, w)`` int labels of the block's read region (``block.read_shape``), 0 =
            background; the ids need not be consecutive.
        block: the block.
        image_shape: ``(H, W)`` of the whole image (edges there are not cuts).
        margin: the block margin (for the error message).
        min_size: objects of fewer pixels are dropped (not owned).

    Returns:
        ``owned_labels`` ``(h, w)`` int32 (only owned objects, renumbered 1..n in raster order of
        their centroids, objects with the same centroid pixel in raster order of their first
        pixel: whatever the input ids, the same labels give the same result) and
        :class:`OwnedObjects` in image coordinates.

    Raises:
        ObjectTooLargeError: an owned object touches the read region's edge inside the image.
    """
    cy0, cy1, cx0, cx1 = block.core_in_read
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return np.zeros(labels.shape, np.int32), OwnedObjects(block.index, np.zeros(0, np.int64), np.zeros((0, 4), np.int64), [])
    count, sum_y, sum_x = _label_sums(labels, n)
    # floor of the centroid in exact integer arithmetic: neighbouring blocks must agree on it
    present = count[1:] > 0
    area = np.maximum(count[1:], 1)
    cy = sum_y[1:] // area
    cx = sum_x[1:] // area
    owned = present & (count[1:] >= min_size) & (cy >= cy0) & (cy < cy1) & (cx >= cx0) & (cx < cx1)
    owned_ids = np.flatnonzero(owned) + 1
    owned_cy, owned_cx = cy[owned], cx[owned]
    owned_ids = owned_ids[np.lexsort((_first_pixels_of_ties(labels, owned_ids, owned_cy, owned_cx), owned_cx, owned_cy))]
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[owned_ids] = np.arange(1, owned_ids.size + 1, dtype=np.int32)
    owned_labels = lut[labels]
    slices = ndi.find_objects(owned_labels, max_label=owned_ids.size)
    # (n, 4) y0, y1, x0, x1 in read coordinates (every owned id is present: no None)
    bounds = np.array([(ys.start, ys.stop, xs.start, xs.stop) for ys, xs in slices], dtype=np.int64).reshape(-1, 4)
    return owned_labels, owned_objects(owned_labels, bounds, block, image_shape, margin)


def owned_objects(owned_labels: np.ndarray, bounds: np.ndarray, block: Block, image_shape: tuple[int, int], margin: int) -> OwnedObjects:
    """:class:`OwnedObjects` of a block's owned labels (:func:`select_owned`, or its device twin
    :func:`nucleibatch.stitching_torch.select_owned_torch`).

    Args:
        owned_labels: ``(h, w)`` int32 over ``block.read``, owned objects numbered 1..n.
        bounds: ``(n, 4)`` int64 ``(y0, y1, x0, x1)`` half-open boxes of objects 1..n, read coordinates.

    Raises:
        ObjectTooLargeError: an owned object touches the read region's edge inside the image.
    """
    ry0, ry1, rx0, rx1 = block.read
    h, w = owned_labels.shape
    touches = (
        ((bounds[:, 0] == 0) & (ry0 > 0))
        | ((bounds[:, 1] == h) & (ry1 < image_shape[0]))
        | ((bounds[:, 2] == 0) & (rx0 > 0))
        | ((bounds[:, 3] == w) & (rx1 < image_shape[1]))
    )
    if touches.any():
        y0, _, x0, _ = (int(v) for v in bounds[np.argmax(touches)])  # the first in local id order
        raise ObjectTooLargeError(
            f"a nucleus near (y={ry0 + y0}, x={rx0 + x0}) reaches more than the block margin "
            f"({margin} px) beyond its block; raise --block-margin (e.g. to {2 * margin}) or --block-size"
        )
    masks = [owned_labels[y0:y1, x0:x1] == local_id for local_id, (y0, y1, x0, x1) in enumerate(bounds.tolist(), start=1)]
    return OwnedObjects(
        block.index,
        np.arange(1, len(bounds) + 1, dtype=np.int64),
        bounds + np.array([ry0, ry0, rx0, rx0], dtype=np.int64),
        masks,
    )


def _first_pixels_of_ties(labels: np.ndarray, ids: np.ndarray, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    """Flat index of the first pixel of each object that shares its centroid pixel ``(cy, cx)``
    with another (rare: two nuclei cannot share a pixel), 0 for the others: ``(n,)`` int64."""
    first = np.zeros(ids.size, dtype=np.int64)
    keys = cy.astype(np.int64) * (labels.shape[1] + 1) + cx
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    for i in np.flatnonzero(counts[inverse] > 1):
        first[i] = np.argmax(labels.ravel() == ids[i])
    return first


# pixels per chunk of rows in _label_sums: bounds its temporaries to a few MB, not whole-region
# int64/float64 arrays (those would bound segment's memory)
_SUM_CHUNK_PIXELS = 1 << 18


def _label_sums(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel count and sums of the row and column indices of every label.

    Args:
        labels: ``(h, w)`` int labels (values <= 0 are background).
        n: the largest label.

    Returns:
        ``count``, ``sum_y``, ``sum_x``: ``(n + 1,)`` int64, indexed by label (index 0 unused).
    """
    h, w = labels.shape
    count = np.zeros(n + 1, dtype=np.int64)
    sum_y = np.zeros(n + 1, dtype=np.int64)
    sum_x = np.zeros(n + 1, dtype=np.int64)
    # at least n pixels per chunk, so the per-chunk (n + 1,) bincounts cost no more than the pixels
    rows = max(1, max(_SUM_CHUNK_PIXELS, n) // max(w, 1))
    for r0 in range(0, h, rows):
        chunk = labels[r0 : r0 + rows]
        flat = np.flatnonzero(chunk > 0)
        ids = chunk.ravel()[flat].astype(np.intp, copy=False)
        y, x = np.divmod(flat, w)
        chunk_count = np.bincount(ids, minlength=n + 1)
        count += chunk_count
        # bincount sums weights in float64: still exact integers, as a chunk's sums stay below
        # h * w * max(h, w) < 2**53 for read regions under 200,000 px a side
        sum_y += np.bincount(ids, weights=y, minlength=n + 1).astype(np.int64) + r0 * chunk_count
        sum_x += np.bincount(ids, weights=x, minlength=n + 1).astype(np.int64)
    return count, sum_y, sum_x


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
    claims, masks = _claims(region, objects)
    # ascending global id (stable: equal ids, a block passed twice, keep the order of ``objects``)
    claims = claims[np.argsort(claims[:, 0], kind="stable")]
    lost: dict[int, int] = {}
    for global_id, k, i, oy0, oy1, ox0, ox1, my0, my1, mx0, mx1 in claims.tolist():
        piece = masks[k][i][my0:my1, mx0:mx1]
        target = out[oy0:oy1, ox0:ox1]
        free = piece & (target == 0)
        taken = int(np.count_nonzero(piece)) - int(np.count_nonzero(free))
        if taken:
            lost[global_id] = lost.get(global_id, 0) + taken
        target[free] = global_id
    return out, lost


def _claims(region: tuple[int, int, int, int], objects: Iterable[tuple[OwnedObjects, int]]) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """Every object that meets the region, as one row of int64 numbers.

    Returns:
        ``(m, 11)`` int64 rows ``(global_id, k, i, oy0, oy1, ox0, ox1, my0, my1, mx0, mx1)``: object
        ``i`` of the ``k``-th pair of ``objects``, its box in region coordinates and the same box in
        its mask's coordinates; and the masks of every pair (``masks[k][i]``).
    """
    y0, y1, x0, x1 = region
    tables, masks = [], []
    for k, (owned, offset) in enumerate(objects):
        masks.append(owned.masks)
        boxes = np.asarray(owned.boxes, dtype=np.int64).reshape(-1, 4)
        if not boxes.shape[0] == owned.ids.size == len(owned.masks):
            raise ValueError(f"block {owned.block_index}: {owned.ids.size} ids, {boxes.shape[0]} boxes and {len(owned.masks)} masks")
        # most objects of a neighbouring block lie outside the region: select with array operations
        iy0, iy1 = np.maximum(boxes[:, 0], y0), np.minimum(boxes[:, 1], y1)
        ix0, ix1 = np.maximum(boxes[:, 2], x0), np.minimum(boxes[:, 3], x1)
        hit = np.flatnonzero((iy0 < iy1) & (ix0 < ix1))
        if hit.size == 0:
            continue
        iy0, iy1, ix0, ix1 = iy0[hit], iy1[hit], ix0[hit], ix1[hit]
        by0, bx0 = boxes[hit, 0], boxes[hit, 2]
        tables.append(
            np.stack(
                [offset + owned.ids[hit].astype(np.int64), np.full(hit.size, k), hit, iy0 - y0, iy1 - y0, ix0 - x0, ix1 - x0, iy0 - by0, iy1 - by0, ix0 - bx0, ix1 - bx0],
                axis=1,
            )
        )
    return (np.concatenate(tables) if tables else np.zeros((0, 11), dtype=np.int64)), masks
