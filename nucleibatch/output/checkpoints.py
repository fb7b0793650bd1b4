"""Block checkpoints: a whole slide killed in the middle resumes from its finished blocks.

An image of several blocks keeps, while it is being segmented, under
``OUT/.nucleibatch/blocks/<store name>/``:

* ``key.json`` — what the blocks were made from: the input's fingerprint, the image's shape, its
  blocks, its scale and its normalisation statistics. A later run reuses the blocks only when
  all of these are the same (the model and settings are the OUT's own, checked on resume);
* ``<block index>.npz`` — one finished block: its owned nuclei (ids, boxes, masks) and their
  measurements, written after the block's image core went into masks.zarr.

The folder goes when the image's completion record is written (or the image fails).
No pickle: plain arrays, so reading a checkpoint runs no code.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np

from ..io.location import Location, fresh_listing, is_remote, read_many, remove
from ..runtime import faults
from ..stitching import OwnedObjects
from .atomic import write_bytes_atomic
from .folder import OutputFolder

KEY_NAME = "key.json"


def checkpoint_dir(out_dir: Location, name: str) -> Location:
    """The checkpoint folder of the image whose zarr group is ``name``."""
    return OutputFolder(out_dir).checkpoints(name)


def finished_blocks(out_dir: Location, name: str, key: dict[str, Any]) -> list[int]:
    """The indices of the blocks an earlier run finished for this image, when it planned the same
    blocks (``key``); otherwise (or with none) the folder is started afresh with ``key``, and []."""
    folder = checkpoint_dir(out_dir, name)
    listing = fresh_listing(folder)
    contents = read_many([p for p in listing if p.name == KEY_NAME])
    recorded = next(iter(contents.values()), None)
    try:
        same = recorded is not None and json.loads(recorded) == json.loads(json.dumps(key))
    except (json.JSONDecodeError, UnicodeDecodeError):
        same = False
    if same:
        return sorted(int(p.stem) for p in listing if p.suffix == ".npz" and p.stem.isdigit() and _whole(p))
    remove(folder)
    write_bytes_atomic(folder / KEY_NAME, json.dumps(key, sort_keys=True).encode())
    return []


def _whole(path: Location) -> bool:
    """A local checkpoint's zip directory is there (always, as written atomically; a file damaged
    since is not reused: its block is done again). Object stores: trusted (one PUT)."""
    if is_remote(path):
        return True
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def drop_finished(out_dir: Location, finished: set[str]) -> None:
    """Remove the checkpoint folders of finished images (``finished``: their store names) that a
    run stopped between the two steps left."""
    for folder in fresh_listing(OutputFolder(out_dir).blocks):
        if folder.name in finished:
            remove(folder)


def save_block(out_dir: Location, name: str, block_index: int, owned: OwnedObjects, columns: dict[str, np.ndarray]) -> None:
    """Keep one finished block (before its nuclei masks are freed by the stitcher)."""
    sizes = np.array([m.size for m in owned.masks], dtype=np.int64)
    flat = np.concatenate([m.ravel() for m in owned.masks]) if owned.masks else np.zeros(0, bool)
    arrays = {"ids": owned.ids, "boxes": owned.boxes, "mask_sizes": sizes, "mask_bits": np.packbits(flat)}
    arrays.update({f"column.{key}": np.asarray(value) for key, value in columns.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(checkpoint_dir(out_dir, name) / f"{block_index}.npz", buffer.getvalue())
    faults.point("block")


def load_block(out_dir: Location, name: str, block_index: int) -> tuple[OwnedObjects, dict[str, np.ndarray]]:
    """A block kept by :func:`save_block`: its owned nuclei and their measurements.

    Raises:
        OSError, ValueError: the checkpoint is gone or damaged (the caller redoes the image).
    """
    data = read_many([checkpoint_dir(out_dir, name) / f"{block_index}.npz"]).popitem()[1]
    if data is None:
        raise FileNotFoundError(f"block checkpoint {block_index} of {name} is gone")
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        boxes = arrays["boxes"]
        sizes = arrays["mask_sizes"]
        flat = np.unpackbits(arrays["mask_bits"], count=int(sizes.sum())).astype(bool)
        columns = {key.removeprefix("column."): arrays[key] for key in arrays.files if key.startswith("column.")}
        ids = arrays["ids"]
    ends = np.cumsum(sizes)
    masks = [flat[end - size : end].reshape(int(y1 - y0), int(x1 - x0)) for end, size, (y0, y1, x0, x1) in zip(ends, sizes, boxes, strict=True)]
    return OwnedObjects(block_index, ids, boxes, masks), columns


def drop_checkpoints(out_dir: Location, name: str) -> None:
    """Forget an image's block checkpoints (it is finished, failed or started over)."""
    remove(checkpoint_dir(out_dir, name))
