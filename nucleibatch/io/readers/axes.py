"""The axes rule: how an N-D array with named axes becomes 2-D images with channels.

``y`` and ``x`` are the image plane; ``c`` / ``s`` (channels, samples) are stacked into the
channel axis ``C`` of every read; every other axis (``t``, ``z``, ``i`` pages, ...) indexes
separate images. At most one axis of unknown meaning (tifffile's ``Q``/``I``) is accepted, as an
image index. Written up for users in docs/inputs.md; TIFF and zarr readers both apply it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np

# More channels than this means an axis was probably mislabelled as channels.
MAX_CHANNELS = 256
# Axis names (lower case) with a fixed meaning. tifffile's one-letter axes are lower-cased.
CHANNEL_AXES = frozenset({"c", "s", "channel", "channels", "sample", "samples", "rgb", "band", "bands"})
# tifffile: Q = unknown ("other"), I = a plain sequence of pages.
UNKNOWN_AXES = frozenset({"q", "i", "other", "sequence", ""})


@dataclass(frozen=True)
class AxesPlan:
    """How an N-D array maps to 2-D images with channels.

    ``names`` are lower-case axis names of the full-resolution array of ``shape``;
    ``y``/``x`` are the positions of the image axes, ``channel_axes`` those stacked into
    the channel axis (in array order), ``index_axes`` those that select one image.
    """

    names: tuple[str, ...]
    shape: tuple[int, ...]
    y: int
    x: int
    channel_axes: tuple[int, ...]
    index_axes: tuple[int, ...]

    @property
    def channels(self) -> int:
        return int(np.prod([self.shape[a] for a in self.channel_axes], dtype=np.int64))

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.shape[self.y]), int(self.shape[self.x])

    def planes(self) -> list[dict[str, int]]:
        """Every image of the array: ``{axis name: index}`` over the index axes, in C order."""
        axes = self.index_axes
        return [dict(zip((self.names[a] for a in axes), values, strict=True)) for values in product(*(range(self.shape[a]) for a in axes))]


def plan_axes(names: Sequence[str], shape: Sequence[int]) -> AxesPlan:
    """Apply the axes rule to an array with named axes.

    Args:
        names: one name per axis (``"y"``, ``"x"``, ``"c"``, ``"t"``, ...; case-insensitive).
        shape: the array's shape.

    Raises:
        ValueError: a one-line reason (no y/x axis, repeated axes, several unknown axes,
            too many channels) that says how to fix the file.
    """
    names = tuple(str(n).lower() for n in names)
    shape = tuple(int(s) for s in shape)
    label = f"axes {axes_text(names)} of shape {shape}"
    if len(names) != len(shape):
        raise ValueError(f"{label}: {len(names)} axis names for a {len(shape)}-D array")
    repeated = sorted({n for n in names if names.count(n) > 1 and n not in UNKNOWN_AXES})
    if repeated:
        raise ValueError(f"{label}: axis {repeated[0]!r} occurs more than once")
    if "y" not in names or "x" not in names:
        raise ValueError(f"{label}: no y and x axes, so no 2-D image plane; label the axes (OME-TIFF / OME-Zarr axes, or zarr dimension_names)")
    unknown = [i for i, n in enumerate(names) if n in UNKNOWN_AXES]
    if len(unknown) > 1:
        raise ValueError(
            f"{label}: {len(unknown)} axes of unknown meaning, so channels cannot be told from separate images; "
            "write OME-TIFF/OME-Zarr with axes metadata (e.g. 'TCYX') or one image per file"
        )
    channel_axes = tuple(i for i, n in enumerate(names) if n in CHANNEL_AXES)
    index_axes = tuple(i for i, n in enumerate(names) if n not in CHANNEL_AXES and n not in ("y", "x"))
    plan = AxesPlan(names, shape, names.index("y"), names.index("x"), channel_axes, index_axes)
    if plan.channels > MAX_CHANNELS:
        raise ValueError(f"{label}: {plan.channels} channels, more than the {MAX_CHANNELS} supported; is an axis mislabelled as channels?")
    return plan


def axes_text(names: Sequence[str]) -> str:
    """``('t', 'c', 'y', 'x')`` -> ``TCYX``; longer names are listed: ``[time, y, x]``."""
    if all(len(n) == 1 for n in names):
        return "".join(names).upper()
    return "[" + ", ".join(names) + "]"


def guess_axes(shape: Sequence[int]) -> tuple[str, ...]:
    """Axis names of an array that carries none (a plain zarr array).

    ``(H, W)`` -> ``yx``; ``(H, W, C)`` when the last axis is <= 4 and the first is not;
    ``(C, H, W)`` when the first axis is <= 4 and the last is not. Anything else is
    ambiguous.

    Raises:
        ValueError: the shape is ambiguous; the message says how to label the axes.
    """
    shape = tuple(shape)
    fix = "name the axes (zarr v3 dimension_names, e.g. ['c', 'y', 'x'], or the _ARRAY_DIMENSIONS attribute) or write OME-Zarr"
    if len(shape) == 2:
        return ("y", "x")
    if len(shape) == 3:
        if shape[2] <= 4 < shape[0]:
            return ("y", "x", "c")
        if shape[0] <= 4 < shape[2]:
            return ("c", "y", "x")
        raise ValueError(f"3-D array of shape {shape} without axis names: cannot tell (H, W, C) from (C, H, W) or (Z, H, W); {fix}")
    raise ValueError(f"{len(shape)}-D array of shape {shape} without axis names; {fix}")
