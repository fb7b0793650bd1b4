"""Per-nucleus measurements (pure): labels + original intensities -> table columns (pixel units)."""

from __future__ import annotations

import numpy as np
from skimage.measure import regionprops_table

NUCLEI_COLUMNS = (
    "image_id", "label", "centroid_y", "centroid_x", "area", "perimeter", "eccentricity", "solidity",
    "mean_intensity", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x",
)  # fmt: skip
_PROPERTIES = ("label", "centroid", "area", "perimeter", "eccentricity", "solidity", "intensity_mean", "bbox")


def measure_labels(labels: np.ndarray, intensity: np.ndarray, origin: tuple[int, int] = (0, 0), id_offset: int = 0) -> dict[str, np.ndarray]:
    """Measure every object of a label image.

    Args:
        labels: ``(h, w)`` int labels (0 = background), whole objects only.
        intensity: ``(h, w)`` float, the original image's nuclear channel (not normalised).
        origin: image coordinates ``(y, x)`` of ``labels[0, 0]``; added to positions and boxes.
        id_offset: added to the labels to give the global ``label`` column.

    Returns:
        Columns of :data:`NUCLEI_COLUMNS` except ``image_id``: ``label`` uint32; positions,
        ``area`` (int64), shape and intensity float64. Bounding boxes are half-open.
    """
    if not labels.any():
        return empty_columns()
    props = regionprops_table(labels.astype(np.int32, copy=False), intensity_image=np.asarray(intensity, dtype=np.float32), properties=_PROPERTIES)
    oy, ox = origin
    return {
        "label": (props["label"] + id_offset).astype(np.uint32),
        "centroid_y": props["centroid-0"] + oy,
        "centroid_x": props["centroid-1"] + ox,
        "area": props["area"].astype(np.int64),
        "perimeter": props["perimeter"].astype(np.float64),
        "eccentricity": props["eccentricity"].astype(np.float64),
        "solidity": props["solidity"].astype(np.float64),
        "mean_intensity": props["intensity_mean"].astype(np.float64),
        "bbox_min_y": (props["bbox-0"] + oy).astype(np.int64),
        "bbox_min_x": (props["bbox-1"] + ox).astype(np.int64),
        "bbox_max_y": (props["bbox-2"] + oy).astype(np.int64),
        "bbox_max_x": (props["bbox-3"] + ox).astype(np.int64),
    }


def empty_columns() -> dict[str, np.ndarray]:
    """The measurement columns with zero rows and their dtypes."""
    ints = ("area", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x")
    return {
        name: np.zeros(0, dtype=np.uint32 if name == "label" else np.int64 if name in ints else np.float64)
        for name in NUCLEI_COLUMNS
        if name != "image_id"
    }


def concat_columns(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate column dicts of :func:`measure_labels` (empty list -> empty columns)."""
    parts = [p for p in parts if p["label"].size]
    if not parts:
        return empty_columns()
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
