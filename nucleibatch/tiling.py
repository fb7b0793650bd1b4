"""Tile and block geometry (pure functions on shapes; no arrays are touched).

A grid covers an image of shape ``(H, W)`` with *cores* of size ``core`` (the last
ones may be smaller). Each core is extended by ``margin`` on every side and
clipped to the image: that is the region read and processed. With ``n = ceil(H / core)``
cores along an axis, core ``i`` spans ``[i * core, min((i + 1) * core, H))`` and its
read region spans ``[max(0, i * core - margin), min(H, (i + 1) * core + margin))``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError

# U-Nets take sides that are multiples of 32 (five halvings)
PAD_MULTIPLE = 32
# Smallest network window side: 2 pixels at the U-Net's deepest level (1/32). Windows of 32 px
# (1 pixel there) gave NaN or different probabilities from one identical call to the next in
# oneDNN's bf16 channels-last kernels on some CPUs (issue 21): narrow images are padded instead.
MIN_WINDOW = 64
# Context each network tile reads around its core (and each block around its read region). The
# U-Net sees further than this, so probabilities near a tile's edge depend a little on where the
# tiles are cut: with 64 px, 512-px blocks kept 99.0 % of a one-block run's nuclei on a 4352²
# mosaic of DSB fields (IoU >= 0.9), with 96 px 99.6 %, with 128 px 99.8 % (benchmarks/seams.py),
# at 1.31x, 1.51x and 1.78x the network pixels of the 1024² windows' cores.
DEFAULT_HALO = 96


@dataclass(frozen=True)
class Block:
    """One cell of a grid. All boxes are ``(y0, y1, x0, x1)``, half-open, image coordinates."""

    index: int
    grid_position: tuple[int, int]
    core: tuple[int, int, int, int]
    read: tuple[int, int, int, int]

    @property
    def core_in_read(self) -> tuple[int, int, int, int]:
        """The core box relative to the read region's origin."""
        y0, y1, x0, x1 = self.core
        ry, rx = self.read[0], self.read[2]
        return (y0 - ry, y1 - ry, x0 - rx, x1 - rx)

    @property
    def read_shape(self) -> tuple[int, int]:
        return (self.read[1] - self.read[0], self.read[3] - self.read[2])


def _spans(length: int, core: int, margin: int) -> list[tuple[int, int, int, int]]:
    n = max(1, -(-length // core))
    spans = []
    for i in range(n):
        c0, c1 = i * core, min((i + 1) * core, length)
        spans.append((c0, c1, max(0, c0 - margin), min(length, c1 + margin)))
    return spans


def block_grid(shape: tuple[int, int], core: int, margin: int) -> list[Block]:
    """All blocks of an image, in raster order of their cores.

    Args:
        shape: ``(H, W)`` of the image.
        core: side of each block's core (the region it owns), > 0.
        margin: extra context read on each side, >= 0.

    Returns:
        ``ceil(H / core) * ceil(W / core)`` blocks; their cores partition the image.
    """
    if core <= 0 or margin < 0:
        raise UsageError(f"block size must be > 0 and margin >= 0, got {core} and {margin}")
    if shape[0] <= 0 or shape[1] <= 0:
        raise UsageError(f"cannot tile an empty image of shape {shape}")
    blocks = []
    rows, cols = _spans(shape[0], core, margin), _spans(shape[1], core, margin)
    for i, (cy0, cy1, ry0, ry1) in enumerate(rows):
        for j, (cx0, cx1, rx0, rx1) in enumerate(cols):
            blocks.append(Block(len(blocks), (i, j), (cy0, cy1, cx0, cx1), (ry0, ry1, rx0, rx1)))
    return blocks


def tiles_over_box(shape: tuple[int, int], box: tuple[int, int, int, int], core: int, halo: int, align: int = PAD_MULTIPLE) -> list[Block]:
    """Network tiles for the part ``box`` of an image: their cores partition ``box`` into as few
    rows and columns as cores of at most ``core`` allow, of about equal sizes (so that a block's
    windows share few shapes), cut at multiples of ``align``; each tile reads ``halo`` pixels
    of context around its core (from the multiple of ``align`` at or before), cut at the
    image's edges, not at the box's: the image around the box is context. Image coordinates,
    raster order.

    Why the multiples: the U-Net downsamples by 32, and is not shift-invariant. A tile read
    from a multiple of 32 computes on the same pixel grid as the whole image in one window, so
    away from its edges it gives the same output; cut at other offsets, tiles of one block
    disagreed with one-window predictions (mAP 0.92 between them against 1.00,
    benchmarks/seams.py).

    Args:
        shape: ``(H, W)`` of the image.
        box: ``(y0, y1, x0, x1)`` inside the image, not empty.
        core: the longest core side, > ``align``.
    """
    oy0, oy1, ox0, ox1 = box
    if not (0 <= oy0 < oy1 <= shape[0] and 0 <= ox0 < ox1 <= shape[1]):
        raise UsageError(f"box {box} is not a non-empty part of an image of shape {shape}")
    if core <= align or halo < 0:
        raise UsageError(f"tile core must be > {align} and halo >= 0, got {core} and {halo}")
    rows, cols = _aligned_cuts(oy0, oy1, core, align), _aligned_cuts(ox0, ox1, core, align)
    tiles = []
    for i, (cy0, cy1) in enumerate(rows):
        for j, (cx0, cx1) in enumerate(cols):
            read = (max(0, floor_to(cy0 - halo, align)), min(shape[0], cy1 + halo), max(0, floor_to(cx0 - halo, align)), min(shape[1], cx1 + halo))
            tiles.append(Block(len(tiles), (i, j), (cy0, cy1, cx0, cx1), read))
    return tiles


def _aligned_cuts(start: int, stop: int, longest: int, align: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into few pieces of at most ``longest`` and about equal lengths, the
    cuts inside it at multiples of ``align``."""
    step = longest - align  # room for each cut to move down to a multiple of align
    pieces = -(-(stop - start) // step)
    edges = [start]
    for k in range(1, pieces):
        cut = floor_to(start + (stop - start) * k // pieces, align)
        if cut > edges[-1]:
            edges.append(cut)
    edges.append(stop)
    return list(zip(edges[:-1], edges[1:], strict=True))


def small_image_window(shape: tuple[int, int], tile_size: int) -> tuple[int, int] | None:
    """The network's input window for an image that is one tile (:func:`network_window` of its
    shape), or None for a larger image (tiled in ``tile_size`` windows)."""
    height, width = shape
    if height > tile_size or width > tile_size:
        return None
    return network_window(height, width)


def network_window(height: int, width: int) -> tuple[int, int]:
    """The network's input window for ``height x width`` pixels: the sides rounded up to multiples
    of :data:`PAD_MULTIPLE`, and at least :data:`MIN_WINDOW` (the pixels beyond are the image
    mirrored, and dropped from the output)."""
    return max(MIN_WINDOW, padded_size(height, PAD_MULTIPLE)), max(MIN_WINDOW, padded_size(width, PAD_MULTIPLE))


def floor_to(value: int, multiple: int) -> int:
    """Largest multiple of ``multiple`` that is <= ``value`` (the start of a read on the network's pixel grid)."""
    return value // multiple * multiple


def padded_size(length: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``length`` (U-Nets need multiples of 32)."""
    return -(-length // multiple) * multiple
