"""DSB 2018 run-length encoding of nucleus masks (pure numpy).

Pixels are numbered from 1, top to bottom then left to right (column-major); a mask is
``"start length start length ..."`` with increasing, non-overlapping runs.
"""

from __future__ import annotations

import numpy as np


def _runs_from_indices(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted 0-based flat indices -> (1-based starts, lengths) of their runs."""
    if index.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    first = np.concatenate(([0], breaks))
    last = np.concatenate((breaks, [index.size]))
    return index[first] + 1, last - first


def _format_runs(starts: np.ndarray, lengths: np.ndarray) -> str:
    pairs = np.empty(2 * starts.size, dtype=np.int64)
    pairs[0::2], pairs[1::2] = starts, lengths
    return " ".join(map(str, pairs.tolist()))


def rle_encode_crop(crop: np.ndarray, origin: tuple[int, int], height: int) -> str:
    """DSB run-length encoding of a mask given as a crop of a taller image.

    Args:
        crop: ``(h, w)`` bool, the mask inside its box.
        origin: ``(y0, x0)`` image position of ``crop[0, 0]``.
        height: ``H`` of the whole image (pixels are numbered column by column).

    Returns:
        ``"start length start length ..."``, 1-based, column-major, as :func:`rle_encode`
        of the whole-image mask.
    """
    cols, rows = np.nonzero(np.asarray(crop, dtype=bool).T)  # column-major order, sorted
    index = (cols.astype(np.int64) + origin[1]) * height + (rows.astype(np.int64) + origin[0])
    return _format_runs(*_runs_from_indices(index))


def rle_encode(mask: np.ndarray) -> str:
    """DSB 2018 run-length encoding of one mask.

    Args:
        mask: ``(H, W)`` bool (or 0/1) array.

    Returns:
        ``"start length ..."``: pixels are numbered from 1, top to bottom then left to right
        (the order of ``mask.T.flatten()``); runs are increasing and non-overlapping;
        ``""`` for an empty mask.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode needs a 2-D mask, got shape {mask.shape}")
    return rle_encode_crop(mask, (0, 0), mask.shape[0])


def rle_decode(text: str, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`rle_encode`: ``"start length ..."`` -> ``(H, W)`` bool mask.

    Raises ValueError on an odd number of values or a run outside the image.
    """
    height, width = shape
    values = np.array(text.split(), dtype=np.int64) if text and text.strip() else np.zeros(0, np.int64)
    if values.size % 2:
        raise ValueError("an RLE string needs pairs of 'start length'")
    starts, lengths = values[0::2] - 1, values[1::2]
    if starts.size and (starts.min() < 0 or (starts + lengths).max() > height * width or lengths.min() < 1):
        raise ValueError(f"RLE runs fall outside an image of shape {shape}")
    flat = np.zeros(height * width + 1, dtype=np.int32)  # +1 sentinel: run ends may equal H*W
    np.add.at(flat, starts, 1)
    np.add.at(flat, starts + lengths, -1)
    return np.cumsum(flat[:-1]).astype(bool).reshape(width, height).T
