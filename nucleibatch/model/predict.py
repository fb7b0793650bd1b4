"""Prediction: a loaded bundle (:class:`NucleiModel`) and the tiled, batched prediction of
normalised images (:func:`predict_images`), on any device, in float32 or bf16."""

from __future__ import annotations

import copy
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from ..instances import InstanceParams
from ..tiling import (
    DEFAULT_HALO,
    block_grid,
    network_window,
    small_image_window,
    tiles_over_box,
)
from .config import BundleConfig
from .device import bf16_by_default, uses_bf16
from .network import fold_batch_norms

# --batch-size counts pixels in tiles of this area: a call's memory does not depend on the window
REFERENCE_TILE_AREA = 512 * 512


class ModelUsage:
    """Runs the network's calls one at a time and counts them: tiles, batch shapes, and the
    seconds the network ran (``wall - busy_seconds`` is the time the model sat idle).

    The local engine has two images in flight; letting both threads into the network at once
    would oversubscribe the cores (each call already uses all of torch's threads) while
    neither post-processes, so a call waits for the previous one."""

    def __init__(self) -> None:
        self._one_at_a_time = threading.Lock()
        self.busy_seconds = 0.0
        self.tiles = 0
        self.batch_shapes: Counter = Counter()  # (n, h, w) of each network call: replayable by a benchmark

    def __getstate__(self) -> dict:  # shipped to workers with the model: a fresh count there
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    @contextmanager
    def running(self, batch_shape: tuple[int, int, int], tiles: int | None = None):
        """Hold the network for one call of ``batch_shape`` = ``(n, h, w)`` holding ``tiles``
        tiles of images (default ``n``; fewer when the batch was padded)."""
        with self._one_at_a_time:
            started = time.perf_counter()
            try:
                yield
            finally:
                self.busy_seconds += time.perf_counter() - started
                self.tiles += batch_shape[0] if tiles is None else tiles
                self.batch_shapes[batch_shape] += 1


@dataclass
class NucleiModel:
    """A loaded bundle: ``network`` (eval mode, ``(N, C, H, W)`` float32 -> logits) and ``config``."""

    network: torch.nn.Module
    config: BundleConfig
    path: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    usage: ModelUsage = field(default_factory=ModelUsage, repr=False, compare=False)
    precision: str = "auto"  # see PRECISIONS; resolved for the device where the network runs
    _inference: tuple[torch.nn.Module, tuple[bool, str], torch.nn.Module] | None = field(default=None, init=False, repr=False, compare=False)
    _inference_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:  # the inference copy is remade where the model is used
        return {key: value for key, value in self.__dict__.items() if key not in ("_inference", "_inference_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _inference=None, _inference_lock=threading.Lock())

    @property
    def inference_network(self) -> torch.nn.Module:
        """The network as predictions run it: :func:`fold_batch_norms` of ``network``, and on the
        bf16 path its convolutions' and linear layers' weights stored in bf16 (what autocast casts
        them to on every call: the same results, bit for bit; other layers keep float32, as
        autocast runs them). Made on first use, once for all threads, and again when ``network``
        is replaced by another object or the precision or device changes (not when its weights
        change in place); ``network`` keeps the bundle's layers and weights, for training and saving."""
        key = (self.bf16, str(self.device))
        with self._inference_lock:
            made = self._inference
            if made is None or made[0] is not self.network or made[1] != key:
                network = fold_batch_norms(self.network)
                if self.bf16:
                    network = copy.deepcopy(network) if network is self.network else network
                    for module in network.modules():
                        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
                            module.to(torch.bfloat16)
                made = self._inference = (self.network, key, network)
            return made[2]

    @property
    def bf16(self) -> bool:
        """Whether the network runs in bf16 (see :func:`~nucleibatch.model.device.uses_bf16`); else float32."""
        return uses_bf16(self.precision, self.device)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def sha256(self) -> str:
        return self.config.weights_sha256 or ""

    @property
    def postprocess(self) -> InstanceParams:
        return self.config.postprocess_params

    def predict(self, image: np.ndarray, batch_size: int = 4, tta: bool | None = None, output_box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Probabilities of a normalised image: ``(H, W)`` float32 -> ``(3, h, w)`` float32 of ``output_box`` (default: all)."""
        return self.predict_many([image], batch_size, tta, [output_box])[0]

    def predict_many(
        self,
        images: Sequence[np.ndarray] | Sequence[torch.Tensor],
        batch_size: int = 4,
        tta: bool | None = None,
        output_boxes: Sequence[tuple[int, int, int, int] | None] | None = None,
        keep_half: bool = False,
        on_device: bool = False,
    ) -> list[np.ndarray] | list[torch.Tensor]:
        """:meth:`predict` of several images, their tiles batched together (see :func:`predict_images`)."""
        return predict_images(
            self.inference_network,
            images,
            output_boxes,
            tile_size=self.config.tile_size,
            halo=self.config.halo,
            batch_size=batch_size,
            device=self.device,
            tta=self.config.tta if tta is None else tta,
            usage=self.usage,
            bf16=self.bf16,
            keep_half=keep_half,
            on_device=on_device,
        )


def forward_batch(network: torch.nn.Module, batch: np.ndarray, device: torch.device, tta: bool, bf16: bool | None = None, crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """:func:`forward_batch_on_device` copied back to the host: ``(N, K, h, w)`` float16 or float32."""
    return forward_batch_on_device(network, batch, device, tta, bf16, crop).cpu().numpy()


def forward_batch_on_device(network: torch.nn.Module, batch: np.ndarray | torch.Tensor, device: torch.device, tta: bool, bf16: bool | None = None, crop: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Sigmoid probabilities of a batch ``(N, 1, h, w)`` float32 (NumPy, or a tensor on ``device``)
    -> ``(N, K, h, w)`` on ``device``.

    ``bf16`` (default: :func:`bf16_by_default`) runs under bf16 autocast with channels-last input, and returns
    float16: finer than the bf16 network's own rounding (a step of at most 4.9e-4 in [0, 1]),
    and the device-to-host copy halves. Otherwise float32. The same code runs on the CPU when asked
    (tests check it there: no GPU is needed to exercise it).

    ``crop`` = ``(y0, y1, x0, x1)``: return only this window of every tile, cut on the device
    before the copy (the halo that the caller drops is not copied back).
    """
    bf16 = bf16_by_default(device) if bf16 is None else bf16
    x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch).to(device, non_blocking=True)
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        if bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        if not tta:
            out = torch.sigmoid(network(x).float())
        else:
            total = None
            for dims in ((), (2,), (3,), (2, 3)):
                xi = torch.flip(x, dims) if dims else x
                yi = torch.sigmoid(network(xi).float())
                yi = torch.flip(yi, dims) if dims else yi
                total = yi if total is None else total + yi
            out = total / 4.0
        if crop is not None:
            out = out[:, :, crop[0] : crop[1], crop[2] : crop[3]]
        if bf16:
            out = out.to(torch.float16)
    return out


def predict_image(
    network: torch.nn.Module,
    image: np.ndarray,
    tile_size: int = 512,
    halo: int = DEFAULT_HALO,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    tta: bool = False,
    output_box: tuple[int, int, int, int] | None = None,
    usage: ModelUsage | None = None,
    bf16: bool | None = None,
) -> np.ndarray:
    """Tiled prediction of an in-memory normalised image.

    Tiles of ``tile_size`` (cores of ``tile_size - 2 * halo`` plus the halo, reflect-padded
    at the image border) are batched to the network; only each tile's core is kept.

    Args:
        network: in eval mode, on ``device``.
        image: ``(H, W)`` float32 normalised to [0, 1].
        output_box: ``(y0, y1, x0, x1)``: return probabilities of this part of the image only
            (the rest is context; tiles whose core misses the box are not run). Default: all.
        usage: counts the tiles and the seconds the network ran.
        bf16: bf16 autocast + channels-last (default: :func:`bf16_by_default`); see :func:`forward_batch`.

    Returns:
        ``(K, h, w)`` float32 probabilities (K = number of classes) of ``output_box``.
    """
    return predict_images(network, [image], [output_box], tile_size, halo, batch_size, device, tta, usage, bf16)[0]


def predict_images(
    network: torch.nn.Module,
    images: Sequence[np.ndarray] | Sequence[torch.Tensor],
    output_boxes: Sequence[tuple[int, int, int, int] | None] | None = None,
    tile_size: int = 512,
    halo: int = DEFAULT_HALO,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    tta: bool = False,
    usage: ModelUsage | None = None,
    bf16: bool | None = None,
    keep_half: bool = False,
    pad_batches: bool | None = None,
    on_device: bool = False,
) -> list[np.ndarray] | list[torch.Tensor]:
    """:func:`predict_image` of several images at once: tiles of the same shape share network calls.

    ``batch_size`` counts pixels, in 512 x 512 tiles' worth (:func:`windows_per_call`): a call
    holds ``batch_size`` windows of 512², a quarter as many of 1024² (at least one), four times
    as many small 256² images, so that the network's memory per call does not depend on the
    window. Small images (one tile each, e.g. 256 x 320 DSB fields) are batched across images,
    so a GPU gets full calls instead of one image per call. A tile's probabilities do not depend
    on which tiles share its batch (the network is in eval mode; on the CPU in float32 they are
    bit-identical, in bf16 on AVX512-BF16 the convolutions round differently with the batch size).

    Args:
        images: ``(H_i, W_i)`` float32 normalised to [0, 1]: NumPy arrays, or tensors on
            ``device`` (normalised there: the windows are cut and padded there too).
        output_boxes: per image, as ``output_box`` of :func:`predict_image` (None: all).

        keep_half: return float16 where the network's calls do (in ``bf16``): the same
            values in half the memory (segment's blocks, sent to post-processing processes).
        pad_batches: fill a call up to the next power of two windows (at most the call's
            size; zeros, whose outputs are dropped). Default: on CUDA, where the padding costs
            next to nothing and each new batch shape costs cuDNN's set-up of every convolution
            again: a run makes a few shapes per window, not one per number of tiles left in a group.
        on_device: return torch tensors on ``device`` (nothing is copied back to the host).

    Returns:
        Per image, ``(K, h_i, w_i)`` float32 probabilities of its output box (float16 with
        ``keep_half`` in bf16): NumPy arrays, or tensors on ``device`` with ``on_device``.
    """
    device = torch.device(device)
    pad_batches = device.type == "cuda" if pad_batches is None else pad_batches
    core = tile_size - 2 * halo
    if core <= 0:
        raise UsageError(f"tile size {tile_size} leaves no core with halo {halo}; use tile >= 2 * halo + 32")
    output_boxes = list(output_boxes) if output_boxes is not None else [None] * len(images)
    # normalised on the host (NumPy), or already on ``device`` (tensors: windows are cut there)
    images = [image if isinstance(image, torch.Tensor) else np.asarray(image, dtype=np.float32) for image in images]
    boxes, tiles_by_window = [], defaultdict(list)  # window shape -> [(image number, tile block)]
    for number, (image, output_box) in enumerate(zip(images, output_boxes, strict=True)):
        height, width = image.shape
        oy0, oy1, ox0, ox1 = output_box or (0, height, 0, width)
        if not (0 <= oy0 < oy1 <= height and 0 <= ox0 < ox1 <= width):
            raise ValueError(f"output_box {output_box} is not inside the image {image.shape}")
        boxes.append((oy0, oy1, ox0, ox1))
        window = small_image_window((height, width), tile_size)
        if window is not None:
            tiles_by_window[window].extend((number, tile) for tile in block_grid((height, width), max(height, width), 0))
        else:  # only the output box is tiled: the image around it is the tiles' context
            for tile in tiles_over_box((height, width), (oy0, oy1, ox0, ox1), core, halo):
                tiles_by_window[_tile_window(tile)].append((number, tile))
    outputs: list[np.ndarray | None] = [None] * len(images)
    for window, tiles in tiles_by_window.items():
        per_call = windows_per_call(batch_size, window)
        for chunk in _chunks(tiles, per_call):
            padded = min(per_call, 1 << (len(chunk) - 1).bit_length()) if pad_batches else len(chunk)
            batch = _new_batch((padded, 1) + window, images[chunk[0][0]], device)
            batch[len(chunk) :] = 0.0
            for k, (number, tile) in enumerate(chunk):
                ry0, ry1, rx0, rx1 = tile.read
                batch[k, 0] = _pad_to(images[number][ry0:ry1, rx0:rx1], window)
            # per tile, the part kept: its core inside its image's output box (image coordinates)
            kept = [_kept_window(tile.core, boxes[number]) for number, tile in chunk]
            reads = [(tile.read[0], tile.read[2]) for _, tile in chunk]
            # one window of the tiles (tile coordinates) holding every tile's kept part: only it is copied back
            in_tile = [(y0 - ry, y1 - ry, x0 - rx, x1 - rx) for (y0, y1, x0, x1), (ry, rx) in zip(kept, reads, strict=True)]
            crop = (min(w[0] for w in in_tile), max(w[1] for w in in_tile), min(w[2] for w in in_tile), max(w[3] for w in in_tile))
            forward = forward_batch_on_device if on_device else forward_batch
            if usage is None:
                probabilities = forward(network, batch, device, tta, bf16, crop)
            else:
                with usage.running(batch.shape[:1] + window, tiles=len(chunk)):
                    probabilities = forward(network, batch, device, tta, bf16, crop)
                    if on_device and device.type == "cuda":  # the network's time, not its launch's
                        torch.cuda.synchronize(device)
            for k, ((number, _), (y0, y1, x0, x1), (ry, rx)) in enumerate(zip(chunk, kept, reads, strict=True)):
                oy0, oy1, ox0, ox1 = boxes[number]
                if outputs[number] is None:
                    shape = (probabilities.shape[1], oy1 - oy0, ox1 - ox0)
                    if on_device:
                        outputs[number] = torch.empty(shape, dtype=probabilities.dtype if keep_half else torch.float32, device=device)
                    else:
                        outputs[number] = np.empty(shape, dtype=probabilities.dtype if keep_half else np.float32)
                ty, tx = ry + crop[0], rx + crop[2]  # image coordinates of the copied window's corner
                outputs[number][:, y0 - oy0 : y1 - oy0, x0 - ox0 : x1 - ox0] = probabilities[k, :, y0 - ty : y1 - ty, x0 - tx : x1 - tx]
    assert all(output is not None for output in outputs)
    return outputs  # type: ignore[return-value]


def windows_per_call(batch_size: int, window: tuple[int, int]) -> int:
    """Network windows of shape ``window`` in one call of ``batch_size`` 512² tiles' worth of pixels (at least 1)."""
    return max(1, batch_size * REFERENCE_TILE_AREA // (window[0] * window[1]))


def _tile_window(tile) -> tuple[int, int]:
    """The network window of one tile of a larger image: its read region (core and halo, cut at
    the image's edges) as :func:`~nucleibatch.tiling.network_window` makes it; not above ``tile_size`` where
    the halo is a multiple of 32, as the bundles' is. The network computes no padding beyond
    that rounding (with 1024² windows, a 2048² image costs
    5.3 MPix of windows instead of the 9.4 of full windows)."""
    ry0, ry1, rx0, rx1 = tile.read
    return network_window(ry1 - ry0, rx1 - rx0)


def _kept_window(core: tuple[int, int, int, int], box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The part of a tile's core inside an output box, ``(y0, y1, x0, x1)`` in image coordinates."""
    return max(core[0], box[0]), min(core[1], box[1]), max(core[2], box[2]), min(core[3], box[3])


def _new_batch(shape: tuple[int, ...], like: np.ndarray | torch.Tensor, device: torch.device) -> np.ndarray | torch.Tensor:
    """An uninitialised float32 batch where the images are: on the host, or on ``device``."""
    if isinstance(like, torch.Tensor):
        return torch.empty(shape, dtype=torch.float32, device=device)
    return np.empty(shape, dtype=np.float32)


def _pad_to(tile: np.ndarray | torch.Tensor, window: tuple[int, int]) -> np.ndarray | torch.Tensor:
    """``tile`` ``(h, w)`` padded at its bottom and right to ``window``, mirrored with its edge
    pixels repeated (NumPy's ``"symmetric"``, on the tile's device for a tensor)."""
    pad_y, pad_x = window[0] - tile.shape[0], window[1] - tile.shape[1]
    if pad_y == 0 and pad_x == 0:
        return tile
    if isinstance(tile, torch.Tensor):
        rows = _symmetric_index(tile.shape[0], window[0], tile.device)
        columns = _symmetric_index(tile.shape[1], window[1], tile.device)
        return tile.index_select(0, rows).index_select(1, columns)
    return np.pad(tile, ((0, pad_y), (0, pad_x)), mode="symmetric")


def _symmetric_index(size: int, padded: int, device: torch.device) -> torch.Tensor:
    """Which of ``size`` positions each of ``padded`` positions takes under NumPy's ``"symmetric"``
    padding at the end (the positions mirrored with the edge repeated, again and again), made on
    ``device`` (nothing to copy up)."""
    period = torch.arange(padded, device=device) % (2 * size)
    return torch.where(period < size, period, 2 * size - 1 - period)


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
