"""Nucleus masks read from a label array chunk by chunk, so the label image is never loaded whole.

Nuclei are grouped by the zarr chunk holding their bounding box's top-left corner, and each
group reads only the region covering its nuclei, through a small LRU cache of decoded chunks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pandas is imported where used: `nucleibatch --help` stays quick
    import pandas as pd


class ChunkCache:
    """Read rectangles of a 2-D zarr array through an LRU cache of whole decoded chunks.

    Args:
        array: a 2-D zarr array (or anything with ``shape``, ``chunks`` and slicing).
        max_bytes: the cache's size limit (at least one chunk is always kept).
    """

    def __init__(self, array, max_bytes: int = 128 * 2**20) -> None:
        self.array = array
        self.chunks = tuple(int(c) for c in array.chunks)
        self.max_bytes = max_bytes
        self.cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.bytes = 0
        self.reads = 0

    def _chunk(self, i: int, j: int) -> np.ndarray:
        key = (i, j)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        ch, cw = self.chunks
        data = np.asarray(self.array[i * ch : (i + 1) * ch, j * cw : (j + 1) * cw])
        self.reads += 1
        self.cache[key] = data
        self.bytes += data.nbytes
        while self.bytes > self.max_bytes and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.bytes -= old.nbytes
        return data

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """``array[y0:y1, x0:x1]`` as a numpy array (``(y1-y0, x1-x0)``, the array's dtype)."""
        ch, cw = self.chunks
        out = np.empty((y1 - y0, x1 - x0), dtype=self.array.dtype)
        for i in range(y0 // ch, (y1 - 1) // ch + 1):
            for j in range(x0 // cw, (x1 - 1) // cw + 1):
                chunk = self._chunk(i, j)
                cy0, cx0 = i * ch, j * cw
                ay0, ay1 = max(y0, cy0), min(y1, cy0 + chunk.shape[0])
                ax0, ax1 = max(x0, cx0), min(x1, cx0 + chunk.shape[1])
                out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = chunk[ay0 - cy0 : ay1 - cy0, ax0 - cx0 : ax1 - cx0]
        return out


def iter_nucleus_masks(array, nuclei: pd.DataFrame, cache_bytes: int = 128 * 2**20) -> Iterator[tuple[Any, np.ndarray]]:
    """Yield ``(row, crop)`` for every nucleus of one image, reading the labels chunk by chunk.

    Args:
        array: the image's 2-D label array (zarr), ``(H, W)`` unsigned int.
        nuclei: the image's rows of nuclei.parquet (needs ``label`` and the bbox columns).
        cache_bytes: size of the decoded-chunk cache.

    Yields:
        ``row`` (a namedtuple of ``nuclei``'s columns) and ``crop``, the ``(h, w)`` bool mask
        ``labels[bbox] == label``. Nuclei come grouped by the chunk holding their bbox's
        top-left corner; each group reads only the region covering its boxes.
    """
    if nuclei.empty:
        return
    reader = ChunkCache(array, cache_bytes)
    ch, cw = reader.chunks
    frame = nuclei.assign(_ty=nuclei.bbox_min_y // ch, _tx=nuclei.bbox_min_x // cw).sort_values(["_ty", "_tx", "label"], kind="stable")
    for _, group in frame.groupby(["_ty", "_tx"], sort=False):
        y0, x0 = int(group.bbox_min_y.min()), int(group.bbox_min_x.min())
        y1, x1 = int(group.bbox_max_y.max()), int(group.bbox_max_x.max())
        region = reader.read(y0, y1, x0, x1)
        for row in group.itertuples(index=False):
            crop = region[row.bbox_min_y - y0 : row.bbox_max_y - y0, row.bbox_min_x - x0 : row.bbox_max_x - x0] == row.label
            yield row, crop
