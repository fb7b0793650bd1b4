"""The output store masks.zarr: OME-Zarr (NGFF 0.5, zarr v3) image + labels groups per image.

Layout of one image group at ``store_path``::

    <store_path>/            multiscales of the ingested image, axes (c, y, x)
        0, 1, ...            levels: full resolution, then every 2nd pixel, ...
        labels/              {"ome": {"labels": ["nuclei"]}}
            nuclei/          multiscales, axes (y, x), uint32, 0 = background, "image-label"
                0, 1, ...
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.group import GroupMetadata
from zarr.storage import MemoryStore

from ..io.location import Location, to_location, zarr_store
from ..runtime import faults
from .folder import LABEL_NAME, LABELS, LABELS_GROUP, label_path

NGFF_VERSION = "0.5"
CHUNK = 1024
# Pyramid levels are added (each half the previous) until the image fits this size.
PYRAMID_MIN_SIDE = 1024
# Images with at most this many channels keep all of them in each chunk of the image copy.
CHANNELS_PER_CHUNK = 4
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


# Longest group name: OUT's files are named after it with up to 21 bytes and a PID (at most 7
# digits) more (".NAME.parquet.tmp-PID", ".NAME.geojson.tmp-PID"): 252 bytes at most, inside the 255
# that a file name may have on common file systems, whatever the input's name. Names that fitted
# before this bound keep their name (OUTs resume alike).
MAX_STORE_NAME = 224


def store_name(image_id: str) -> str:
    """A zarr-safe, flat group name for an image id: ASCII, at most :data:`MAX_STORE_NAME` bytes,
    stable across runs; a hash suffix keeps lossy (changed or shortened) names unique."""
    name = _UNSAFE.sub("_", image_id.replace("/", "__")).lstrip("._") or "image"
    if name != image_id or len(name) > MAX_STORE_NAME:
        digest = hashlib.sha1(image_id.encode()).hexdigest()
        if len(name) + 9 <= MAX_STORE_NAME:
            name = f"{name}-{digest[:8]}"
        else:  # shortened: the longer hash, since many long names may share their first bytes
            name = f"{name[: MAX_STORE_NAME - 17]}-{digest[:16]}"
    return name


def chunk_for_blocks(block_size: int, preferred: int = CHUNK) -> int:
    """Chunk side of the level-0 arrays: a divisor of ``block_size`` (at most ``preferred``), so
    that every chunk lies in exactly one block core and blocks written at once by different
    workers never share a chunk (a shared chunk's read-modify-write would lose one block's pixels)."""
    return math.gcd(block_size, preferred) if block_size > preferred else block_size


def pyramid_shapes(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Level shapes: ``shape``, then ``ceil(shape / 2**k)`` until the largest side <= PYRAMID_MIN_SIDE."""
    shapes = [tuple(shape)]
    while max(shapes[-1]) > PYRAMID_MIN_SIDE:
        shapes.append(tuple(-(-s // 2) for s in shapes[-1]))
    return shapes


def _multiscales(name: str, axes: list[dict], n_levels: int, pixel_size_um: float | None = None) -> list[dict]:
    """NGFF multiscales: level ``k`` is every ``2**k``-th pixel, its scale ``2**k`` pixels (or times
    ``pixel_size_um`` micrometres, where the pixel size is known) on the space axes."""
    datasets = []
    for level in range(n_levels):
        factor = float(2**level) * (pixel_size_um or 1.0)
        scale = [1.0 if a["type"] == "channel" else factor for a in axes]
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    return [{"name": name, "axes": axes, "datasets": datasets}]


def open_root(path: str | Path | Location, mode: str = "a") -> zarr.Group:
    """Open (or create) masks.zarr (a local folder or an object-store URL) as a zarr v3 group."""
    location = to_location(path)
    try:
        return zarr.open_group(zarr_store(location, read_only=mode == "r"), mode=mode, zarr_format=3)
    except zarr.errors.ContainsGroupError:
        if mode != "a":
            raise
        # another unit created the root between this one's check and its write: open that one
        return zarr.open_group(zarr_store(location), mode="r+", zarr_format=3)


def create_image_group(
    root: zarr.Group,
    name: str,
    image_id: str,
    shape: tuple[int, int],
    channels: int,
    dtype: np.dtype,
    chunk: int = CHUNK,
    pixel_size_um: float | None = None,
    channel_names: Sequence[str] | None = None,
) -> zarr.Group:
    """(Re)create the OME-Zarr group of one image with empty image and label levels.

    ``pixel_size_um``: where known, the space axes are in micrometres and the scales physical
    (NGFF ``unit: micrometer``); else in pixels. ``channel_names``: the input's channel names
    (one per channel, ``""`` unnamed), kept as ``omero.channels[].label`` (napari shows them,
    and ``--channel NAME`` finds them when the OUT is read back as annotated data).

    Any previous content under the group's path is removed first: an unfinished earlier
    attempt may have left a whole group, or only some of its nodes and chunks (a run killed
    while the nodes were being written, or while an old group was being deleted, leaves nodes
    without the group's own metadata, which ``name in root`` would not see).
    """
    prefix = f"{root.path}/{name}" if root.path else name
    zarr.core.sync.sync(root.store.delete_dir(prefix))
    levels = pyramid_shapes(shape)
    unit = "micrometer" if pixel_size_um else "pixel"
    space = [{"name": "y", "type": "space", "unit": unit}, {"name": "x", "type": "space", "unit": unit}]
    image_axes = [{"name": "c", "type": "channel"}] + space
    image_attrs: dict[str, Any] = {"version": NGFF_VERSION, "multiscales": _multiscales(image_id, image_axes, len(levels), pixel_size_um)}
    if channel_names and len(channel_names) == channels:
        image_attrs["omero"] = {"channels": [{"label": str(label), "active": True} for label in channel_names]}
    nodes: dict[str, Any] = {
        name: GroupMetadata(attributes={"ome": image_attrs}, zarr_format=3),
        f"{name}/{LABELS_GROUP}": GroupMetadata(attributes={"ome": {"version": NGFF_VERSION, "labels": [LABEL_NAME]}}, zarr_format=3),
        f"{name}/{LABELS}": GroupMetadata(
            attributes={
                "ome": {
                    "version": NGFF_VERSION,
                    "multiscales": _multiscales(LABEL_NAME, space, len(levels), pixel_size_um),
                    "image-label": {"version": NGFF_VERSION, "source": {"image": "../../"}},
                }
            },
            zarr_format=3,
        ),
    }
    # a chunk holds every colour of a pixel (one file, not one per channel) unless there are many
    channel_chunk = channels if channels <= CHANNELS_PER_CHUNK else 1
    for level, (h, w) in enumerate(levels):
        cy, cx = min(chunk, h), min(chunk, w)
        nodes[f"{name}/{level}"] = _array_metadata((channels, h, w), (channel_chunk, cy, cx), np.dtype(dtype), ("c", "y", "x"))
        nodes[label_path(level, name)] = _array_metadata((h, w), (cy, cx), np.dtype(np.uint32), ("y", "x"))
    # every node's metadata written at once (concurrently, one round trip), not node by node
    _quiet_sibling_write_errors()
    created = dict(root.create_hierarchy(nodes))
    faults.point("store:group")
    return created[name]


# the coroutine zarr's create_hierarchy wraps each metadata write in (zarr.core.group.create_nodes)
_NODE_WRITE = "_set_return_key"


@functools.cache  # once per process: zarr runs one event loop
def _quiet_sibling_write_errors() -> None:
    """Keep the errors of a failed :func:`create_image_group`'s other metadata writes off stderr.

    zarr writes the nodes as concurrent tasks and raises the first failure; when the disk is
    full the others fail too, and as nobody retrieves their exceptions asyncio logs each one
    ("Task exception was never retrieved") when it is collected, after the run has stopped with
    the first. Only those are dropped, on zarr's event loop; anything else is logged as before.
    """

    async def install() -> None:
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
            task = context.get("future")
            coroutine = task.get_coro() if isinstance(task, asyncio.Task) else None
            if isinstance(context.get("exception"), OSError) and getattr(coroutine, "__name__", "") == _NODE_WRITE:
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)

    zarr.core.sync.sync(install())


@functools.lru_cache(maxsize=256)  # images of an archive share a few shapes; building one costs ~0.4 ms
def _array_metadata(shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype, dimension_names: tuple[str, ...]):
    """The v3 metadata ``Group.create_array`` would write for an empty array (fill 0, default codecs)."""
    return zarr.create_array(store=MemoryStore(), shape=shape, chunks=chunks, dtype=dtype, fill_value=0, dimension_names=dimension_names).metadata


def label_array(group: zarr.Group, level: int = 0) -> zarr.Array:
    """Level ``level`` of an image group's label image: ``(H / 2**level, W / 2**level)`` uint32."""
    return group[label_path(level)]


def write_pyramids(group: zarr.Group, chunk: int = CHUNK) -> None:
    """Fill levels 1.. of the image and labels by striding (nearest neighbour: level k's pixel
    ``(y, x)`` is level 0's ``(y * 2**k, x * 2**k)``), chunk by chunk, each level from the one
    before it: level 0 is read once, not once per level."""
    levels = len(pyramid_shapes(group["0"].shape[-2:]))  # as create_image_group made them
    for level in range(1, levels):
        faults.point("store:pyramid")
        for source, target in ((group[str(level - 1)], group[str(level)]), (label_array(group, level - 1), label_array(group, level))):
            height, width = target.shape[-2:]
            for y in range(0, height, chunk):
                for x in range(0, width, chunk):
                    y1, x1 = min(height, y + chunk), min(width, x + chunk)
                    target[..., y:y1, x:x1] = source[..., 2 * y : 2 * y1 : 2, 2 * x : 2 * x1 : 2]
