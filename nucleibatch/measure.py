"""Per-nucleus measurements (pure): labels + original intensities -> table columns (pixel units)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NUCLEI_COLUMNS = (
    "image_id", "label", "centroid_y", "centroid_x", "area", "perimeter", "eccentricity", "solidity",
    "mean_intensity", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x",
)  # fmt: skip
# the same in micrometres (null where the image's pixel size is unknown): column -> (pixel column, power)
PHYSICAL_COLUMNS = {"centroid_y_um": ("centroid_y", 1), "centroid_x_um": ("centroid_x", 1), "area_um2": ("area", 2), "perimeter_um": ("perimeter", 1)}


def physical_columns(columns: dict[str, np.ndarray], pixel_size_um: float | None) -> dict[str, np.ndarray]:
    """:data:`PHYSICAL_COLUMNS` of measured nuclei: their pixel columns x ``pixel_size_um`` (squared
    for areas), float64; NaN (null in the table) when the pixel size is unknown."""
    n = len(columns["label"])
    if pixel_size_um is None:
        return {name: np.full(n, np.nan) for name in PHYSICAL_COLUMNS}
    return {name: np.asarray(columns[pixels], dtype=np.float64) * float(pixel_size_um) ** power for name, (pixels, power) in PHYSICAL_COLUMNS.items()}


def measure_labels(
    labels: np.ndarray,
    intensity: np.ndarray,
    origin: tuple[int, int] = (0, 0),
    id_offset: int = 0,
    channels: np.ndarray | None = None,
    channel_columns: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Measure every object of a label image.

    The values are those of :func:`skimage.measure.regionprops` (``perimeter`` with 4-connectivity,
    ``eccentricity`` from the inertia tensor, ``solidity`` against the pixel-corner convex hull),
    computed for all objects at once with ``bincount`` over the label image instead of object by
    object, except the convex hulls (tests/test_measure.py checks them against regionprops).

    Args:
        labels: ``(h, w)`` int labels (0 = background), whole objects only.
        intensity: ``(h, w)`` float, the original image's nuclear channel (not normalised).
        origin: image coordinates ``(y, x)`` of ``labels[0, 0]``; added to positions and boxes.
        id_offset: added to the labels to give the global ``label`` column.
        channels: ``(h, w, C)`` the original image's raw pixels (any real dtype), for the
            per-channel means; only with ``channel_columns``.
        channel_columns: ``C`` column names (:func:`nucleibatch.channels.intensity_columns`), one
            per channel of ``channels``; empty: no per-channel columns.

    Returns:
        Columns of :data:`NUCLEI_COLUMNS` except ``image_id``: ``label`` uint32; positions,
        ``area`` (int64), shape and intensity float64. Bounding boxes are half-open.
        ``mean_intensity`` averages the finite pixels of a nucleus (NaN when it has none); so
        does each of ``channel_columns`` (float64) over its channel: the sum of the nucleus's
        finite pixels over their count, exact for any number of pixels.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (h, w), got shape {labels.shape}")
    flat = labels.ravel()
    inside = labels != 0  # shared by the indices here, the borders and the row runs below
    foreground = np.flatnonzero(inside)
    if channel_columns and (channels is None or np.ndim(channels) != 3 or np.shape(channels)[:2] != labels.shape or np.shape(channels)[2] != len(channel_columns)):
        raise ValueError(f"channels must be (h, w, {len(channel_columns)}) for the labels' {labels.shape}, got shape {np.shape(channels)}")
    if foreground.size == 0:
        return empty_columns(channel_columns)
    owner = flat[foreground].astype(np.intp)
    n_bins = int(owner.max()) + 1
    area_all = np.bincount(owner, minlength=n_bins)
    ids = np.flatnonzero(area_all)
    area = area_all[ids]
    width = labels.shape[1]
    y, x = np.divmod(foreground, width)

    def per_object(weights: np.ndarray) -> np.ndarray:
        return np.bincount(owner, weights=weights, minlength=n_bins)[ids]

    sum_y = np.bincount(owner, weights=y, minlength=n_bins)
    sum_x = np.bincount(owner, weights=x, minlength=n_bins)
    centroid_y = sum_y[ids] / area
    centroid_x = sum_x[ids] / area
    # central moments from per-pixel offsets (no large-sum cancellation)
    dy = y - sum_y[owner] / area_all[owner]
    dx = x - sum_x[owner] / area_all[owner]
    mu20, mu02, mu11 = per_object(dy * dy), per_object(dx * dx), per_object(dy * dx)
    # inertia tensor [[mu02, -mu11], [-mu11, mu20]] / area (skimage), its eigenvalues in closed form
    half_trace = (mu02 + mu20) / (2 * area)
    radius = np.sqrt(((mu02 - mu20) / (2 * area)) ** 2 + (mu11 / area) ** 2)
    l1 = np.clip(half_trace + radius, 0, None)
    l2 = np.clip(half_trace - radius, 0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        eccentricity = np.where(l1 == 0, 0.0, np.sqrt(np.clip(1 - l2 / np.where(l1 == 0, 1, l1), 0, None)))

    def finite_mean(values: np.ndarray) -> np.ndarray:
        values = values.astype(np.float64)
        finite = np.isfinite(values)
        with np.errstate(divide="ignore", invalid="ignore"):
            return per_object(np.where(finite, values, 0.0)) / per_object(finite.astype(np.float64))

    mean_intensity = finite_mean(np.asarray(intensity).ravel()[foreground])
    per_channel = {}
    if channel_columns:
        pixels = np.asarray(channels)[y, x]  # (pixels, C): only the nuclei's pixels are gathered
        per_channel = {name: finite_mean(pixels[:, c]) for c, name in enumerate(channel_columns)}

    # where a pixel's right / lower neighbour is another object (or background): the runs along
    # rows and the objects' borders both come from these two comparisons
    differs_right = labels[:, 1:] != labels[:, :-1]
    differs_below = labels[1:] != labels[:-1]
    rows = _row_extremes(labels, inside, ids, differs_right)
    bbox = _boxes(rows, ids.size)
    perimeter = _perimeters(labels, inside, differs_right, differs_below, n_bins)[ids]
    solidity = area / _convex_areas(labels.shape[0], rows, ids.size, bbox)
    oy, ox = origin
    return {
        "label": (ids + id_offset).astype(np.uint32),
        "centroid_y": centroid_y + oy,
        "centroid_x": centroid_x + ox,
        "area": area.astype(np.int64),
        "perimeter": perimeter,
        "eccentricity": eccentricity,
        "solidity": solidity,
        "mean_intensity": mean_intensity,
        "bbox_min_y": bbox[:, 0] + oy,
        "bbox_min_x": bbox[:, 1] + ox,
        "bbox_max_y": bbox[:, 2] + oy,
        "bbox_max_x": bbox[:, 3] + ox,
        **per_channel,
    }


# skimage.measure.perimeter's pattern weights: a border pixel's code is 1 + 2 x (its border
# 4-neighbours) + 10 x (its border diagonal neighbours), each pattern a length of outline
_PERIMETER_WEIGHTS = np.zeros(50, dtype=np.float64)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2


# neighbour offsets (dy, dx) and their weights in the pattern code below
_CODE_NEIGHBOURS = tuple((2, offset) for offset in ((-1, 0), (1, 0), (0, -1), (0, 1))) + tuple(
    (10, offset) for offset in ((-1, -1), (-1, 1), (1, -1), (1, 1))
)


def _perimeters(labels: np.ndarray, inside: np.ndarray, differs_right: np.ndarray, differs_below: np.ndarray, n_bins: int) -> np.ndarray:
    """``skimage.measure.perimeter(neighborhood=4)`` of every object at once: per label (index).

    ``inside``: ``(h, w)`` bool, ``labels != 0``. ``differs_right`` / ``differs_below``: ``(h, w - 1)`` / ``(h - 1, w)`` bool, whether a pixel's
    right / lower neighbour holds another label. Only border pixels are coded (a few percent of
    the pixels), by gathering their neighbours.
    """
    h, w = labels.shape
    # border: an object pixel with a 4-neighbour outside its object (the image's edge included)
    border = np.zeros((h, w), dtype=bool)
    border[:, 1:] |= differs_right
    border[:, :-1] |= differs_right
    border[1:] |= differs_below
    border[:-1] |= differs_below
    border[[0, -1]] = True
    border[:, [0, -1]] = True
    border &= inside
    width = w + 2  # flat indices in the labels padded by one pixel of background
    padded = np.pad(labels, 1).ravel()
    padded_border = np.pad(border, 1).ravel()
    at = np.flatnonzero(border)
    y, x = np.divmod(at, w)
    at = (y + 1) * width + (x + 1)
    own = padded[at]
    code = np.ones(at.size, dtype=np.uint8)
    for weight, (dy, dx) in _CODE_NEIGHBOURS:
        neighbour = at + (dy * width + dx)
        code += ((padded[neighbour] == own) & padded_border[neighbour]).view(np.uint8) * np.uint8(weight)
    # border pixels in raster order: the sums are those over every object pixel with weight 0 off the border
    return np.bincount(own, weights=_PERIMETER_WEIGHTS[code], minlength=n_bins)


def _convex_areas(h: int, rows: tuple[np.ndarray, ...], n: int, bbox: np.ndarray) -> np.ndarray:
    """``area_convex`` of regionprops for the ``n`` objects of ``rows`` (:func:`_row_extremes`): the
    pixels (grid points) inside or on the convex hull of the pixel-edge midpoints (each pixel's 4
    "diamond" points) of the object. ``h``: the label image's height; ``bbox``: ``(n, 4)`` boxes.

    For all objects at once, in exact integer arithmetic on doubled coordinates: a convex hull's
    rows are intervals whose right end, as a function of the row, is the concave majorant of the
    objects' rightmost diamond points (the left end likewise, mirrored), and only the pixels that
    end a run along a row can give those points.
    """
    row_obj, row_y, left, right = rows
    # every row of every box, for the objects whose rows have gaps too (a nucleus cut at a seam)
    heights = bbox[:, 2] - bbox[:, 0]
    eval_obj = np.repeat(np.arange(n), heights)
    eval_y = bbox[eval_obj, 0] + np.arange(eval_obj.size) - np.repeat(np.cumsum(heights) - heights, heights)
    kmax = _envelope_floor(row_obj, row_y, right, eval_obj, eval_y, h)
    kmin = -_envelope_floor(row_obj, row_y, -left, eval_obj, eval_y, h)
    return np.bincount(eval_obj, weights=np.clip(kmax - kmin + 1, 0, None), minlength=n)


def _row_extremes(labels: np.ndarray, inside: np.ndarray, ids: np.ndarray, differs_right: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per object row: ``(object index, y, leftmost x, rightmost x)``, int64, sorted by (object, y).

    ``inside``: ``(h, w)`` bool, ``labels != 0`` (not changed); ``ids``: the objects' labels,
    ascending (object index i is label ``ids[i]``); ``differs_right``: ``(h, w - 1)`` bool, a
    pixel's right neighbour holds another label.
    """
    h, w = labels.shape
    starts = inside.copy()
    starts[:, 1:] &= differs_right
    ends = inside.copy()
    ends[:, :-1] &= differs_right
    ys, xs = np.divmod(np.flatnonzero(starts), w)  # run starts, in raster order
    xe = np.flatnonzero(ends) % w  # run ends: the same runs, in the same order
    index = np.zeros(int(ids.max()) + 1, dtype=np.int64)
    index[ids] = np.arange(ids.size)
    keys = index[labels[ys, xs]] * h + ys
    order = np.argsort(keys, kind="stable")  # runs of a row stay in x order
    keys = keys[order]
    first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    last = np.r_[first[1:], keys.size] - 1
    row_obj, row_y = np.divmod(keys[first], h)
    return row_obj, row_y, xs[order][first].astype(np.int64), xe[order][last].astype(np.int64)


def _boxes(rows: tuple[np.ndarray, ...], n: int) -> np.ndarray:
    """``(n, 4)`` int64 half-open boxes ``(y0, x0, y1, x1)`` of the ``n`` objects of ``rows``
    (:func:`_row_extremes`; every object has a row)."""
    row_obj, row_y, left, right = rows
    first = np.searchsorted(row_obj, np.arange(n))
    last = np.r_[first[1:], row_obj.size] - 1
    return np.stack([row_y[first], np.minimum.reduceat(left, first), row_y[last] + 1, np.maximum.reduceat(right, first) + 1], axis=1)


def _envelope_floor(row_obj: np.ndarray, row_y: np.ndarray, extreme: np.ndarray, eval_obj: np.ndarray, eval_y: np.ndarray, h: int) -> np.ndarray:
    """``floor(X(y))`` at the rows ``eval_y`` of the objects ``eval_obj``, where X is the concave
    majorant of each object's diamond points ``(y, extreme)``, ``(y, extreme + 1/2)``, ``(y +- 1/2, extreme)``."""
    # doubled coordinates, shifted so that t >= 0: a pixel row y is t = 2y + 1, its edges 2y and 2y + 2
    t = (2 * row_y[:, None] + np.array([0, 1, 2])).ravel()
    x = (2 * extreme[:, None] + np.array([0, 1, 0])).ravel()
    obj = np.repeat(row_obj, 3)
    while t.size >= 3:  # drop every point on or under the chord of its neighbours until none is
        t0, t1, t2 = t[:-2], t[1:-1], t[2:]
        under = (obj[:-2] == obj[2:]) & (x[1:-1] * (t2 - t0) <= x[:-2] * (t2 - t1) + x[2:] * (t1 - t0))
        if not under.any():
            break
        keep = np.r_[True, ~under, True]
        obj, t, x = obj[keep], t[keep], x[keep]
    span = 2 * h + 3
    query_t = 2 * eval_y + 1
    a = np.searchsorted(obj * span + t, eval_obj * span + query_t, side="right") - 1  # t[a] < query_t < t[a + 1]
    dt = t[a + 1] - t[a]
    return (x[a] * dt + (x[a + 1] - x[a]) * (query_t - t[a])) // (2 * dt)


def empty_columns(channel_columns: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The measurement columns (and the per-channel means ``channel_columns``, float64) with zero
    rows and their dtypes."""
    ints = ("area", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x")
    columns = {
        name: np.zeros(0, dtype=np.uint32 if name == "label" else np.int64 if name in ints else np.float64)
        for name in NUCLEI_COLUMNS
        if name != "image_id"
    }
    columns.update({name: np.zeros(0, dtype=np.float64) for name in channel_columns})
    return columns


def touches_border(columns: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """``(n,)`` bool: whether each nucleus has a pixel on the image's first or last row or column.

    Args:
        columns: measured nuclei, with the half-open ``bbox_*`` columns in image pixels (int).
        shape: ``(H, W)`` of the full-resolution image.

    A box is the tight box of the nucleus's pixels, so it reaches an edge exactly when a pixel does.
    """
    height, width = shape
    return (
        (np.asarray(columns["bbox_min_y"]) <= 0) | (np.asarray(columns["bbox_min_x"]) <= 0)
        | (np.asarray(columns["bbox_max_y"]) >= height) | (np.asarray(columns["bbox_max_x"]) >= width)
    )  # fmt: skip


def concat_columns(parts: list[dict[str, np.ndarray]], channel_columns: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Concatenate column dicts of :func:`measure_labels` (no rows -> empty columns, with
    ``channel_columns``)."""
    parts = [p for p in parts if p["label"].size]
    if not parts:
        return empty_columns(channel_columns)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
