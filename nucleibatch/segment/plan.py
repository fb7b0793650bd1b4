"""An image planned for segmentation: its normalisation statistics and block grid, and where each
block reads from. Pure: no I/O but the reads of the image's overview."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..channels import intensity_columns, intensity_suffixes, resolve_channel
from ..errors import ImageReadError
from ..io.discover import ImageRecord
from ..io.readers import ImageSource
from ..normalize import NormStats, stats_for_bundle
from ..output.store import (
    store_name,
)
from ..scale import (
    scaled_shape,
)
from ..stitching import OwnedObjects
from ..tiling import PAD_MULTIPLE, Block, block_grid, floor_to, small_image_window
from .settings import SegmentSettings
from .timer import Timer

if TYPE_CHECKING:  # the post-processing processes import this module: no torch
    from ..model.config import BundleConfig


MIN_SIDE = 8


@dataclass
class ImagePlan:
    """One image ready to be processed block by block."""

    record: ImageRecord
    name: str
    shape: tuple[int, int]
    channels: int
    dtype: np.dtype
    stats: NormStats
    blocks: list[Block]
    input_fingerprint: str | None = None  # the input as it was when planned (resume redoes changed inputs)
    # blocks an earlier run finished (kept in OUT: nucleibatch.output.checkpoints); not done again
    done_blocks: tuple[int, ...] = ()
    channel: int | None = None  # the nuclear-stain channel's index in this image (--channel resolved; None: the mean of the colours)

    @property
    def store_path(self) -> str:
        """The image's group in masks.zarr (:func:`image_group`); :attr:`name` names its
        completion record, nuclei part and checkpoints."""
        return image_group(self.record)

    @property
    def scale(self) -> float:
        """The factor the network sees the image enlarged by (:mod:`nucleibatch.scale`; 1: as it is)."""
        return self.record.scale

    @property
    def channel_columns(self) -> tuple[str, ...]:
        """The image's per-channel mean columns (:func:`nucleibatch.channels.intensity_suffixes`; none for grey and colour images)."""
        return intensity_columns(intensity_suffixes(self.channels, self.dtype, self.record.channel_names))

    @property
    def blocks_to_do(self) -> list[Block]:
        """The blocks this run computes: all but :attr:`done_blocks`, in raster order."""
        done = set(self.done_blocks)
        return [block for block in self.blocks if block.index not in done]

    def checkpoint_key(self) -> dict[str, Any]:
        """What its finished blocks depend on beyond the OUT's model and settings (see
        :mod:`nucleibatch.output.checkpoints`)."""
        return {
            "input": self.input_fingerprint, "shape": list(self.shape), "scale": self.scale, "stats": asdict(self.stats),
            "blocks": [list(b.read) for b in self.blocks], "nucleibatch": __version__,
        }  # fmt: skip


@dataclass
class BlockResult:
    """What one block contributes: its owned nuclei and their measurements (block-local ids)."""

    block_index: int
    owned: OwnedObjects | None  # None: kept in the block's checkpoint (:func:`without_masks`)
    columns: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)
    unit: dict[str, Any] | None = None  # where its units ran (distributed engines)


def context_pixels(model_config: BundleConfig) -> int:
    """Pixels of image read around a block's read region: the model's halo. The network's tiles
    cover the read region (the block's output, :func:`nucleibatch.tiling.tiles_over_box`) and
    each sees this halo around its core, at a seam as inside a block."""
    return model_config.halo


def image_channel(record: ImageRecord, settings: SegmentSettings) -> int | None:
    """``--channel`` for one image: the index as given, or the index of the channel of that name
    (:func:`nucleibatch.channels.resolve_channel`; raises :class:`ImageReadError` where it has none)."""
    return resolve_channel(settings.channel, record.channel_names, record.channels)


def plan_image(record: ImageRecord, source: ImageSource, settings: SegmentSettings, model_config: BundleConfig, timer: Timer) -> ImagePlan:
    """Normalisation statistics (once, from the image's overview) and the block grid."""
    if record.error:
        raise ImageReadError(record.error)
    channel = image_channel(record, settings)
    height, width = source.shape
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ImageReadError(f"image too small ({height}x{width}); nuclei segmentation needs at least {MIN_SIDE}x{MIN_SIDE} pixels")
    with timer("read"):
        overview = source.overview()
    with timer("normalise"):
        stats = stats_for_bundle(overview, model_config.normalization, settings.invert, channel)
    blocks = block_grid((height, width), block_size_at(settings.block_size, record.scale, settings.block_margin), settings.block_margin)
    return ImagePlan(record, store_name(record.image_id), (height, width), source.channels, np.dtype(source.dtype), stats, blocks, channel=channel)


def image_group(record: ImageRecord) -> str:
    """The group of an image in masks.zarr: the one its OUT's layout gives it (plate fields,
    :mod:`nucleibatch.output.layout`), else the flat :func:`store_name` of its id."""
    return record.store_path or store_name(record.image_id)


def block_size_at(block_size: int, scale: float, margin: int) -> int:
    """The block size for an image the network sees enlarged ``scale`` times: ``--block-size``
    halved until the enlarged block is no larger than ``block_size`` (memory follows the network's
    pixels, not the image's), while it stays a multiple of 32 above ``margin``; halving keeps the
    zarr chunks dividing it."""
    size = block_size
    while scale * size > block_size * 1.0001 and size % 64 == 0 and size // 2 > margin:
        size //= 2
    return size


def prediction_region(block: Block, shape: tuple[int, int], halo: int) -> tuple[int, int, int, int]:
    """The block's read region grown by ``halo`` pixels of context for the network, clipped to
    the image; it starts on a multiple of PAD_MULTIPLE, so that the tiles laid from its corner
    are on the network's pixel grid of the whole image (:func:`nucleibatch.tiling.tiles_over_box`).
    An image resampled for the network is resampled block by block: there neighbouring blocks'
    grids may differ by a fraction of a pixel, and each nucleus still has one owner block."""
    y0, y1, x0, x1 = block.read
    return (max(0, floor_to(y0 - halo, PAD_MULTIPLE)), min(shape[0], y1 + halo), max(0, floor_to(x0 - halo, PAD_MULTIPLE)), min(shape[1], x1 + halo))


def one_tile_window(plan: ImagePlan, model_config: BundleConfig) -> tuple[int, int] | None:
    """The network window of an image small enough to be one tile of the network (most DSB
    fields), or None: engines batch the blocks of several such images of one window into one
    model call."""
    if len(plan.blocks) != 1:
        return None
    return small_image_window(scaled_shape(plan.shape, plan.scale), model_config.tile_size)


def neighbours(plan: ImagePlan, block: Block) -> list[Block]:
    """Blocks whose read region overlaps this block's core (their nuclei may reach into it)."""
    cy0, cy1, cx0, cx1 = block.core
    return [b for b in plan.blocks if b.read[0] < cy1 and b.read[1] > cy0 and b.read[2] < cx1 and b.read[3] > cx0]


def small_images_per_unit(batch_size: int, window: tuple[int, int]) -> int:
    """One-tile images of one network ``window`` grouped per predict unit: as many as one model
    call of ``batch_size`` 512² tiles' worth of pixels holds (a call holds one shape)."""
    from ..model.predict import windows_per_call

    return windows_per_call(max(1, batch_size), window)
