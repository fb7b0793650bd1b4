"""Comparing label images."""

from __future__ import annotations

import numpy as np


def same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images describe the same partition (0 fixed as background)."""
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))
