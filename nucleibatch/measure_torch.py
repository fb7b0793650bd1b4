"""Per-nucleus measurements on the labels' device (torch): the columns of
:func:`nucleibatch.measure.measure_labels` from label and intensity tensors that stay where they
are (a GPU next to the network); only the table rows, and for the convex hulls each object row's
leftmost and rightmost pixel, come back to the host.

The arithmetic is that of the NumPy version, operation for operation: integer sums (areas, sums
of coordinates, counts of finite pixels) in int64, so exact on any device; moments, perimeters and
intensities in float64. The convex hulls (solidity) are computed on the host by the NumPy
version's own :func:`~nucleibatch.measure._convex_areas` from those row extremes, so solidity is
identical. On a GPU, float64 sums are made with atomic adds in no fixed order, so moments and
intensity means may differ from the NumPy version's in the last bits (the eccentricity of a nearly
round object, ``sqrt(1 - l2 / l1)``, turns a 1e-16 difference of ``l2 / l1`` into ~1e-8).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .measure import _CODE_NEIGHBOURS, _PERIMETER_WEIGHTS, _convex_areas, empty_columns

# object keys (image, label) are counted with a dense bincount while it has at most this many bins
# per pixel (plus a little): ids need not be consecutive, and a huge id falls back to torch.unique
_DENSE_BINS_PER_PIXEL = 2


def measure_labels_torch(
    labels: torch.Tensor,
    intensity: torch.Tensor,
    origin: tuple[int, int] = (0, 0),
    id_offset: int = 0,
) -> dict[str, np.ndarray]:
    """:func:`nucleibatch.measure.measure_labels` of a label image held by torch, on its device.

    Args:
        labels: ``(h, w)`` integer tensor (int32 or int64; 0 = background, other ids >= 1 and
            not necessarily consecutive), whole objects only, on any device.
        intensity: ``(h, w)`` float tensor on the same device, the original nuclear channel.
        origin: image coordinates ``(y, x)`` of ``labels[0, 0]``; added to positions and boxes.
        id_offset: added to the labels to give the global ``label`` column.

    Returns:
        NumPy columns with the names, dtypes and row order (ascending label) of
        :func:`~nucleibatch.measure.measure_labels`: ``label`` uint32, ``area`` and the half-open
        ``bbox_*`` int64, the rest float64; zero-length columns when there is no object.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (h, w), got shape {tuple(labels.shape)}")
    return measure_batch_torch(
        labels[None], intensity[None], origins=[origin], id_offsets=[id_offset]
    )[0]


def measure_batch_torch(
    labels: torch.Tensor,
    intensity: torch.Tensor,
    origins: Sequence[tuple[int, int]] | None = None,
    id_offsets: Sequence[int] | None = None,
) -> list[dict[str, np.ndarray]]:
    """:func:`measure_labels_torch` of a batch of label images at once (one pass over the batch,
    one transfer of rows to the host, one convex-hull computation for all objects).

    Args:
        labels: ``(B, h, w)`` integer tensor (0 = background); the images' ids are independent.
        intensity: ``(B, h, w)`` float tensor on the same device.
        origins: per image ``(y, x)`` of its pixel ``[0, 0]``; ``(0, 0)`` for all when None.
        id_offsets: per image, added to its labels; 0 for all when None.

    Returns:
        ``B`` column dicts, image by image, each as :func:`measure_labels_torch` returns it.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (B, h, w), got shape {tuple(labels.shape)}")
    if tuple(intensity.shape) != tuple(labels.shape):
        raise ValueError(
            f"intensity has shape {tuple(intensity.shape)}, labels {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    batch, h, w = labels.shape
    origins = [(0, 0)] * batch if origins is None else list(origins)
    id_offsets = [0] * batch if id_offsets is None else list(id_offsets)
    if len(origins) != batch or len(id_offsets) != batch:
        raise ValueError(
            f"need {batch} origins and id_offsets, got {len(origins)} and {len(id_offsets)}"
        )
    measured = _measure_on_device(labels, intensity)
    if measured is None:
        return [empty_columns() for _ in range(batch)]
    ints, floats, rows = measured
    image, label, area, y0, x0, y1, x1 = ints
    centroid_y, centroid_x, perimeter, eccentricity, mean_intensity = floats
    bbox = np.stack([y0, x0, y1, x1], axis=1)
    # the convex hulls on the host, by the NumPy version's own code: solidity is the same
    solidity = area / _convex_areas(h, rows, area.size, bbox)
    bounds = np.searchsorted(image, np.arange(batch + 1))  # objects are sorted by (image, label)
    columns = []
    for b in range(batch):
        part = slice(bounds[b], bounds[b + 1])
        if bounds[b] == bounds[b + 1]:
            columns.append(empty_columns())
            continue
        oy, ox = origins[b]
        columns.append(
            {
                "label": (label[part] + id_offsets[b]).astype(np.uint32),
                "centroid_y": centroid_y[part] + oy,
                "centroid_x": centroid_x[part] + ox,
                "area": area[part].astype(np.int64),
                "perimeter": perimeter[part],
                "eccentricity": eccentricity[part],
                "solidity": solidity[part],
                "mean_intensity": mean_intensity[part],
                "bbox_min_y": bbox[part, 0] + oy,
                "bbox_min_x": bbox[part, 1] + ox,
                "bbox_max_y": bbox[part, 2] + oy,
                "bbox_max_x": bbox[part, 3] + ox,
            }
        )
    return columns


def _measure_on_device(
    labels: torch.Tensor, intensity: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]] | None:
    """The per-object columns of a ``(B, h, w)`` batch, computed on the labels' device.

    Returns None when no image holds an object, else host arrays ``(ints, floats, rows)``:
    ``ints`` ``(7, n)`` int64 rows image, label, area, y0, x0, y1, x1 (half-open boxes, image
    coordinates); ``floats`` ``(5, n)`` float64 rows centroid_y, centroid_x, perimeter,
    eccentricity, mean_intensity; ``rows`` the ``(object, y, leftmost x, rightmost x)`` int64
    arrays of :func:`~nucleibatch.measure._row_extremes` (sorted by (object, y)) for
    :func:`~nucleibatch.measure._convex_areas`. Objects are ordered by (image, label), and object
    indices are over the whole batch.
    """
    device = labels.device
    batch, h, w = labels.shape
    plane = h * w
    flat = labels.reshape(-1)
    inside = flat != 0
    fg = torch.nonzero(inside).squeeze(1)  # int64 flat indices of object pixels, raster order
    if fg.numel() == 0:
        return None
    own = flat[fg].to(torch.int64)
    image = fg // plane
    rest = fg - image * plane
    y = rest // w
    x = rest - y * w

    # objects: the distinct (image, label) keys, ascending; obj = each pixel's object index
    stride = int(own.max()) + 1  # one wait for the device
    key = own if batch == 1 else image * stride + own
    bins = batch * stride
    if bins <= _DENSE_BINS_PER_PIXEL * flat.numel() + 1024:
        counts = torch.bincount(key, minlength=bins)
        keys = torch.nonzero(counts).squeeze(1)
        area = counts[keys]
        lookup = torch.empty(bins, dtype=torch.int64, device=device)
        lookup[keys] = torch.arange(keys.numel(), device=device)
        obj = lookup[key]
    else:  # ids far beyond the pixel count: sort instead of a bincount of that length
        keys, obj, area = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
    n = keys.numel()

    def int_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.int64, device=device).index_add_(0, obj, values)

    def float_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, obj, values)

    # centroids from exact integer sums (the NumPy version's float64 sums of integers are exact too)
    area_f = area.to(torch.float64)
    mean_y = int_sum(y).to(torch.float64) / area_f
    mean_x = int_sum(x).to(torch.float64) / area_f
    # central moments from per-pixel offsets, as the NumPy version (no large-sum cancellation)
    dy = y.to(torch.float64) - mean_y[obj]
    dx = x.to(torch.float64) - mean_x[obj]
    mu20, mu02, mu11 = float_sum(dy * dy), float_sum(dx * dx), float_sum(dy * dx)
    half_trace = (mu02 + mu20) / (2 * area_f)
    radius = torch.sqrt(((mu02 - mu20) / (2 * area_f)) ** 2 + (mu11 / area_f) ** 2)
    l1 = torch.clamp(half_trace + radius, min=0)
    l2 = torch.clamp(half_trace - radius, min=0)
    round_ = l1 == 0
    eccentricity = torch.where(
        round_, 0.0, torch.sqrt(torch.clamp(1 - l2 / torch.where(round_, 1.0, l1), min=0))
    )

    values = intensity.reshape(-1)[fg].to(torch.float64)
    finite = torch.isfinite(values)
    # NaN where no pixel is finite (0 / 0), as the NumPy version
    mean_intensity = float_sum(torch.where(finite, values, 0.0)) / int_sum(
        finite.to(torch.int64)
    ).to(torch.float64)

    # each pixel against its 4 neighbours in the labels padded by one pixel of background (so the
    # images' edges count as borders and the images of the batch do not touch)
    padded = torch.nn.functional.pad(labels, (1, 1, 1, 1))
    centre = padded[:, 1:-1, 1:-1]
    differs_left = (padded[:, 1:-1, :-2] != centre).reshape(-1)[fg]
    differs_right = (padded[:, 1:-1, 2:] != centre).reshape(-1)[fg]
    differs_vertically = (
        (padded[:, :-2, 1:-1] != centre) | (padded[:, 2:, 1:-1] != centre)
    ).reshape(-1)[fg]
    border = differs_left | differs_right | differs_vertically  # over the object pixels fg
    perimeter = _perimeters(
        padded, own[border], image[border], y[border], x[border], obj[border], n
    )

    rows = _row_extremes(
        obj[differs_left], y[differs_left], x[differs_left], x[differs_right], h, w
    )
    row_obj, row_y, left, right = rows
    # boxes from the row extremes (a few values per object row instead of every pixel)

    def reduce_rows(values: torch.Tensor, start: int, reduce: str) -> torch.Tensor:
        return torch.full((n,), start, dtype=torch.int64, device=device).scatter_reduce_(0, row_obj, values, reduce)

    y0, y1 = reduce_rows(row_y, h, "amin"), reduce_rows(row_y, -1, "amax") + 1
    x0, x1 = reduce_rows(left, w, "amin"), reduce_rows(right, -1, "amax") + 1

    # the only transfers: three stacks
    key_image = keys // stride if batch > 1 else torch.zeros_like(keys)
    ints = torch.stack([key_image, keys - key_image * stride, area, y0, x0, y1, x1]).cpu().numpy()
    floats = torch.stack([mean_y, mean_x, perimeter, eccentricity, mean_intensity]).cpu().numpy()
    row_arrays = torch.stack(list(rows)).cpu().numpy()
    return ints, floats, tuple(row_arrays)


def _perimeters(
    padded: torch.Tensor,
    own: torch.Tensor,
    image: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    obj: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """``skimage.measure.perimeter(neighborhood=4)`` of the ``n`` objects: ``(n,)`` float64.

    ``padded``: ``(B, h + 2, w + 2)`` labels with a border of background; the border pixels (an
    object pixel with a 4-neighbour outside its object), in raster order: ``own`` their labels,
    ``image``, ``y``, ``x`` their positions and ``obj`` their object indices, all ``(k,)`` int64. Each border
    pixel's pattern code is gathered from its 8 neighbours as in the NumPy version, with the same
    :data:`~nucleibatch.measure._PERIMETER_WEIGHTS`.
    """
    device = padded.device
    batch, hp, wp = padded.shape
    flat = padded.reshape(-1)
    # which padded pixels are border pixels (a neighbour counts only if it is one of its object's)
    padded_border = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
    here = image * (hp * wp) + (y + 1) * wp + (x + 1)
    padded_border[here] = True
    code = torch.ones(own.numel(), dtype=torch.int64, device=device)
    for weight, (dy, dx) in _CODE_NEIGHBOURS:
        neighbour = here + (dy * wp + dx)  # inside the padding: never out of the batch
        code += ((flat[neighbour].to(torch.int64) == own) & padded_border[neighbour]).to(
            torch.int64
        ) * weight
    weights = torch.as_tensor(_PERIMETER_WEIGHTS, dtype=torch.float64, device=device)
    # summed in raster order, as the NumPy version's bincount (on a CPU the same float sums)
    return torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, obj, weights[code])


def _row_extremes(
    start_obj: torch.Tensor,
    start_y: torch.Tensor,
    start_x: torch.Tensor,
    end_x: torch.Tensor,
    h: int,
    w: int,
) -> tuple[torch.Tensor, ...]:
    """Per object row ``(object index, y, leftmost x, rightmost x)``, ``(r,)`` int64 each on the
    device, sorted by (object, y): the ``rows`` of :func:`~nucleibatch.measure._row_extremes`.

    ``start_*``: the object, row and x of every run's first pixel along a row; ``end_x``: the x
    of its last pixel; both in raster order, so the i-th start and the i-th end are one run.
    """
    row_key = start_obj * h + start_y
    keys, row = torch.unique(row_key, sorted=True, return_inverse=True)
    left = torch.full((keys.numel(),), w, dtype=torch.int64, device=keys.device).scatter_reduce_(
        0, row, start_x, "amin"
    )
    right = torch.full((keys.numel(),), -1, dtype=torch.int64, device=keys.device).scatter_reduce_(
        0, row, end_x, "amax"
    )
    row_obj = keys // h
    return row_obj, keys - row_obj * h, left, right
