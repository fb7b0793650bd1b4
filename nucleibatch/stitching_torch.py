"""Ownership of a block's nuclei on the network's device (torch): the twin of
:func:`nucleibatch.stitching.select_owned`, so that a block's labels are kept, renumbered and
measured where they were made (``segment --instances-on device``), and only the owned labels and
the nuclei's table rows come back to the host.

Same rule, same result: a nucleus is owned by the block whose core holds the floor of its
centroid (exact integer sums), objects under ``min_size`` are dropped, and the owned ones are
numbered 1..n in raster order of their centroid pixels, ties by their first pixel.
"""

from __future__ import annotations

import numpy as np
import torch

from .measure import measure_labels
from .measure_torch import measure_labels_torch
from .stitching import OwnedObjects, owned_objects
from .tiling import Block


def select_owned_torch(labels: torch.Tensor, block: Block, min_size: int = 1) -> torch.Tensor:
    """The owned objects of a block's read region, renumbered, on the labels' device.

    Args:
        labels: ``(h, w)`` int32 or int64 labels of ``block.read`` (0 = background; ids distinct,
            not necessarily consecutive).
        block: the block (its core decides ownership).
        min_size: objects of fewer pixels are not owned.

    Returns:
        ``(h, w)`` int32 on the same device: owned objects 1..n in
        :func:`~nucleibatch.stitching.select_owned`'s order, 0 elsewhere.
    """
    height, width = labels.shape
    cy0, cy1, cx0, cx1 = block.core_in_read
    flat = labels.reshape(-1).long()
    at = torch.nonzero(flat > 0).squeeze(1)
    if at.numel() == 0:
        return torch.zeros((height, width), dtype=torch.int32, device=labels.device)
    ids = flat[at]
    n = int(ids.max())
    count = torch.zeros(n + 1, dtype=torch.int64, device=labels.device).index_add_(0, ids, torch.ones_like(ids))
    sum_y = torch.zeros_like(count).index_add_(0, ids, at // width)
    sum_x = torch.zeros_like(count).index_add_(0, ids, at % width)
    first = torch.full_like(count, height * width).scatter_reduce_(0, ids, at, reduce="amin")
    area = count.clamp_min(1)
    cy, cx = sum_y // area, sum_x // area  # floor: exact, as neighbouring blocks compute it
    owned = (count > 0) & (count >= min_size) & (cy >= cy0) & (cy < cy1) & (cx >= cx0) & (cx < cx1)
    owned[0] = False
    owned_ids = torch.nonzero(owned).squeeze(1)
    # raster order of the centroid pixels, ties by first pixel: one int64 key (< (h w + 1)^2)
    key = (cy[owned_ids] * (width + 1) + cx[owned_ids]) * (height * width + 1) + first[owned_ids]
    owned_ids = owned_ids[torch.argsort(key)]
    lut = torch.zeros(n + 1, dtype=torch.int32, device=labels.device)
    lut[owned_ids] = torch.arange(1, owned_ids.numel() + 1, dtype=torch.int32, device=labels.device)
    return lut[labels.long()]


def own_and_measure_on_device(
    labels: torch.Tensor,
    block: Block,
    image_shape: tuple[int, int],
    margin: int,
    min_size: int,
    grey: np.ndarray | torch.Tensor,
    channels: np.ndarray | None = None,
    channel_columns: tuple[str, ...] = (),
) -> tuple[OwnedObjects, dict[str, np.ndarray]]:
    """A block's owned nuclei and their measurements from its labels on the device.

    Args:
        labels: ``(h, w)`` int labels of ``block.read`` on the device (raw ids).
        grey: ``(h, w)`` float, the nuclear channel's raw values over ``block.read`` (for
            ``mean_intensity``): NumPy, or a tensor on the labels' device (NumPy with ``channel_columns``).
        channels, channel_columns: as :func:`nucleibatch.measure.measure_labels` takes them; an
            image with per-channel columns is measured on the host from the owned labels.

    Returns:
        :class:`OwnedObjects` and the columns of :func:`~nucleibatch.measure.measure_labels`
        (block-local labels 1..n, image coordinates), as :func:`~nucleibatch.stitching.select_owned`
        and ``measure_labels`` give them; only the owned labels and the rows came to the host.

    Raises:
        ObjectTooLargeError: an owned nucleus reaches the read region's inner edge.
    """
    origin = (block.read[0], block.read[2])
    owned_on_device = select_owned_torch(labels, block, min_size)
    if channel_columns:
        owned_labels = owned_on_device.cpu().numpy()
        columns = measure_labels(owned_labels, grey, origin=origin, channels=channels, channel_columns=channel_columns)
    else:
        intensity = grey if isinstance(grey, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(grey))
        columns = measure_labels_torch(owned_on_device, intensity.to(labels.device), origin=origin)
        owned_labels = owned_on_device.cpu().numpy()
    oy, ox = origin
    bounds = np.stack([columns["bbox_min_y"] - oy, columns["bbox_max_y"] - oy, columns["bbox_min_x"] - ox, columns["bbox_max_x"] - ox], axis=1).astype(np.int64)
    return owned_objects(owned_labels, bounds.reshape(-1, 4), block, image_shape, margin), columns
