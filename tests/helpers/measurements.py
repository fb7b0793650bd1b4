"""Measurement columns: comparing two implementations, and label shapes that trip them up."""

from __future__ import annotations

import numpy as np

from nucleibatch.measure import NUCLEI_COLUMNS

INTEGER_COLUMNS = ("label", "area", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x")
# Float columns: on the CPU the torch version sums the same float64 terms in the same (raster)
# order as the NumPy version, so the two differ by a few ulp at most (seen: 1e-16 in
# eccentricity); 1e-9 relative (and absolute, for values near 0 such as the eccentricity of a
# round nucleus) leaves room for other vector instructions while any wrong formula, offset or
# pixel would show up far above it (one pixel of a 100-pixel nucleus moves its centroid ~1e-2).
RTOL = ATOL = 1e-9


def assert_same_measurement_columns(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> int:
    """Assert two measurement column dicts (device and NumPy) agree: integers exactly, floats to
    RTOL; returns the number of rows."""
    assert set(ours) == set(reference) == set(NUCLEI_COLUMNS) - {"image_id"}
    for column, expected in reference.items():
        assert ours[column].dtype == expected.dtype, column
        assert ours[column].shape == expected.shape, column
        if column in INTEGER_COLUMNS:
            np.testing.assert_array_equal(ours[column], expected, err_msg=column)
        else:
            np.testing.assert_allclose(
                ours[column], expected, rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=column
            )
    return len(reference["label"])


def awkward_shapes(dtype=np.int32) -> np.ndarray:
    """``(40, 50)`` labels of 8 objects that measurement code gets wrong first: one pixel in a
    corner, a 1-pixel line and column, a ring, objects on the edges and touching along a side,
    diagonal pixels of one object, an L (not convex)."""
    labels = np.zeros((40, 50), dtype)
    labels[0, 0] = 3  # one pixel, in a corner
    labels[5, 2:30] = 7  # a 1 x 28 line
    labels[8:30, 45] = 8  # a 22 x 1 column
    labels[10:30, 10:30] = 12  # a ring: a square with a hole
    labels[15:25, 15:25] = 0
    labels[32:40, 0:10] = 20  # touching the bottom and left edges
    labels[32:40, 10:20] = 21  # touching object 20 along a whole side
    labels[20, 40] = labels[21, 41] = labels[22, 42] = 30  # diagonal neighbours of one object
    labels[35:40, 40:50] = 31  # an L: not convex
    labels[30:35, 45:50] = 31
    return labels
