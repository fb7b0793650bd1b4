"""Pixel-edge outlines of nucleus masks as GeoJSON geometry, and their rasterisation back (pure arrays).

Coordinates are image pixels, ``x`` = column, ``y`` = row, with pixel ``(row r, column c)``
covering the unit square ``[c, c+1] x [r, r+1]`` (QuPath's convention). Outlines run along
pixel edges: every vertex is a pixel corner (integer coordinates), collinear corners are
dropped. A pixel belongs to the nucleus exactly when its centre ``(c + 0.5, r + 0.5)`` lies
inside the polygon (and outside its holes), so rasterising by pixel centres
(:func:`rasterise_geojson`, or :func:`skimage.draw.polygon` on the vertices minus 0.5) gives
back the mask exactly, and the polygon's area equals the pixel count.

Pixels of a nucleus are connected through their sides (4-connectivity): holes are kept as
interior rings; a nucleus in several pieces (pixels touching only at a corner count as
separate pieces) becomes a ``MultiPolygon`` with every piece, so no pixel is lost. Exterior
rings are counter-clockwise and holes clockwise in the (x, y) numbers as written (RFC 7946's
right-hand rule, ignoring that y points down on screen).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a closed ring of (x, y) rows (positive = counter-clockwise in x, y)."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def _corner_ring(contour: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
    """A closed find_contours contour of a 0/1 mask -> closed ring of pixel corners, (x, y) int64.

    find_contours at level 0.5 on a binary mask puts one point on the midpoint of every pixel
    edge between inside and outside, in order; consecutive midpoints share one pixel corner,
    ``round(mean)`` of the two (in corner coordinates = centre coordinates + 0.5).
    """
    points = contour + 0.5  # (row, col) in pixel-corner coordinates
    corners = np.rint((points[:-1] + points[1:]) / 2).astype(np.int64)  # n-1 corners, cyclic
    step = np.roll(corners, -1, axis=0) - corners
    turn = np.any(step != np.roll(step, 1, axis=0), axis=1)  # keep corners where the direction changes
    corners = corners[turn] if turn.any() else corners
    ring = np.column_stack((corners[:, 1] + origin[1], corners[:, 0] + origin[0]))  # (x, y)
    return np.vstack((ring, ring[:1]))


def mask_outline(crop: np.ndarray, origin: tuple[int, int] = (0, 0)) -> list[list[np.ndarray]]:
    """Pixel-edge outline of one nucleus mask, as GeoJSON-ready polygons.

    Args:
        crop: ``(h, w)`` bool mask of the nucleus (typically cut to its bounding box).
        origin: ``(y0, x0)`` image position of ``crop[0, 0]``, added to the coordinates.

    Returns:
        One polygon per 4-connected piece of the mask (largest first); each polygon is a list
        of rings, the exterior first then its holes; each ring is a closed ``(n, 2)`` int64
        array of pixel corners ``(x, y)`` (first row == last row). Exterior rings have positive
        shoelace area in (x, y), holes negative. ``[]`` for an empty mask. Rasterising by
        pixel centres (:func:`rasterise_polygons`) reproduces ``crop`` exactly.
    """
    from scipy import ndimage as ndi
    from skimage.measure import find_contours

    mask = np.asarray(crop, dtype=bool)
    if not mask.any():
        return []
    padded = _pad(mask)
    contours = find_contours(padded, 0.5)
    if len(contours) == 1:  # the common case: one piece without holes
        return [[_oriented(_corner_ring(contours[0], (origin[0] - 1, origin[1] - 1)), 1)]]
    pieces, n_pieces = ndi.label(mask)  # 4-connected, as find_contours' default ("low" fully connected)
    polygons = []
    order = np.argsort(-np.bincount(pieces.ravel())[1:], kind="stable") + 1
    boxes = ndi.find_objects(pieces)
    for piece in order:
        box = boxes[piece - 1]
        sub = _pad(pieces[box] == piece) if n_pieces > 1 else padded
        sub_origin = (origin[0] + box[0].start - 1, origin[1] + box[1].start - 1) if n_pieces > 1 else (origin[0] - 1, origin[1] - 1)
        rings = [_corner_ring(c, sub_origin) for c in (find_contours(sub, 0.5) if n_pieces > 1 else contours)]
        areas = [abs(_signed_area(r)) for r in rings]
        outer = int(np.argmax(areas))  # the exterior encloses the piece's holes
        polygons.append([_oriented(rings[outer], 1)] + [_oriented(r, -1) for i, r in enumerate(rings) if i != outer])
    return polygons


def _pad(mask: np.ndarray) -> np.ndarray:
    """``mask`` as uint8 with a 1-pixel frame of zeros (so that every contour closes)."""
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = mask
    return padded


def _oriented(ring: np.ndarray, sign: int) -> np.ndarray:
    """``ring`` reversed if needed so that its shoelace area in (x, y) has the sign ``sign``."""
    return ring if _signed_area(ring) * sign > 0 else ring[::-1]


def outline_geometry(polygons: list[list[np.ndarray]]) -> dict[str, Any] | None:
    """GeoJSON geometry of :func:`mask_outline`'s polygons: Polygon for one piece, MultiPolygon for several."""
    if not polygons:
        return None
    as_lists = [[ring.tolist() for ring in polygon] for polygon in polygons]
    if len(as_lists) == 1:
        return {"type": "Polygon", "coordinates": as_lists[0]}
    return {"type": "MultiPolygon", "coordinates": as_lists}


def rasterise_polygons(polygons: Sequence[Sequence[Sequence[Sequence[float]]]], shape: tuple[int, int], out: np.ndarray | None = None, value: int = 1) -> np.ndarray:
    """Paint polygons (lists of rings of ``(x, y)`` points, exterior first) by pixel centres.

    Pixel ``(r, c)`` is painted when ``(c + 0.5, r + 0.5)`` is inside an exterior ring and
    outside that polygon's holes (the convention of :func:`mask_outline`).

    Args:
        polygons: GeoJSON-style polygon coordinates (a Polygon's ``coordinates`` is one item).
        shape: ``(H, W)`` of the target image.
        out: ``(H, W)`` array to paint into (default: a new uint32 zeros array).
        value: the value painted.

    Returns:
        ``out``.
    """
    from skimage.draw import polygon as fill

    if out is None:
        out = np.zeros(shape, dtype=np.uint32)
    for polygon in polygons:
        rings = [np.asarray(ring, dtype=np.float64).reshape(-1, 2) for ring in polygon]
        # work in the exterior's bounding box: memory is the nucleus's, not the image's
        y0, x0 = (max(0, int(np.floor(rings[0][:, k].min()))) for k in (1, 0))
        y1, x1 = (min(s, int(np.ceil(rings[0][:, k].max()))) for s, k in zip(shape, (1, 0), strict=True))
        if y1 <= y0 or x1 <= x0:
            continue
        box = (y1 - y0, x1 - x0)
        inside = np.zeros(box, dtype=bool)
        for number, ring in enumerate(rings):
            rows, cols = fill(ring[:, 1] - 0.5 - y0, ring[:, 0] - 0.5 - x0, box)
            inside[rows, cols] = number == 0  # the exterior paints, holes clear
        out[y0:y1, x0:x1][inside] = value
    return out


def rasterise_geojson(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a GeoJSON written by ``export --format geojson`` back into a label image.

    Args:
        path: the ``.geojson`` file (a FeatureCollection).
        shape: ``(H, W)`` of the image.

    Returns:
        ``(H, W)`` uint32 labels: each feature painted with its ``properties.label`` (features
        without one get 1, 2, ... in file order), by pixel centres.
    """
    with open(path) as handle:
        collection = json.load(handle)
    labels = np.zeros(shape, dtype=np.uint32)
    for number, feature in enumerate(collection["features"], start=1):
        geometry = feature["geometry"]
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        rasterise_polygons(polygons, shape, out=labels, value=int(feature.get("properties", {}).get("label", number)))
    return labels
