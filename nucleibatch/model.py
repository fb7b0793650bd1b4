"""U-Net by name, model bundles (config.json + safetensors) and batched tiled prediction."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .errors import ModelBundleError, ModelNotFoundError, UsageError
from .instances import InstanceParams
from .normalize import check_input
from .options import PRECISIONS
from .targets import TARGET_CLASSES
from .tiling import (
    DEFAULT_HALO,
    PAD_MULTIPLE,
    block_grid,
    network_window,
    small_image_window,
    tiles_over_box,
)

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "nucleibatch-bundle/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_BUNDLE = Path(__file__).parent / "models" / "default"
# the bundles shipped in the package, by the name --model takes; `segment` without --model sends each
# image to the one serving its modality (nucleibatch.choose), the first listed where several do
SHIPPED_BUNDLES = {
    "default": DEFAULT_BUNDLE,  # fluorescence and grey brightfield; trained on DSB 2018 only (CC0)
    "he": DEFAULT_BUNDLE.parent / "he",  # H&E and other stained tissue; MoNuSeg 2018 (CC BY-NC-SA 4.0) + DSB's stained images
}
ARCHITECTURES = ("Unet", "UnetPlusPlus", "FPN", "Linknet")
# --batch-size counts pixels in tiles of this area: a call's memory does not depend on the window
REFERENCE_TILE_AREA = 512 * 512

CLASS_MEANING = {
    "body": "probability that the pixel belongs to a nucleus",
    "contour": "probability that the pixel lies on the inner rim (2 px) of a nucleus",
    "contact": "probability that the pixel lies within 2 px of two different nuclei",
}


def normalization_config(input: str = "grey") -> dict[str, Any]:
    """The bundle keys that follow from the network's input channel (:data:`nucleibatch.normalize.INPUTS`):
    ``normalization`` and the image kinds it ``serves`` (:data:`nucleibatch.modality.IMAGE_KINDS`)."""
    if check_input(input) == "haematoxylin":
        normalization = {
            "input": "haematoxylin",
            "grey": "haematoxylin density of the RGB channels (colour deconvolution, Ruifrok & Johnston), or the optical density of a single channel",
            "percentiles": [1.0, 99.8],
            "invert": "never",
            "range": "clip((x - p_low) / (p_high - p_low), 0, 1)",
        }
        return {"normalization": normalization, "serves": ["stained"]}
    normalization = {
        "input": "grey",
        "grey": "mean of the colour channels (RGB/RGBA), or the channel picked by --channel",
        "percentiles": [1.0, 99.8],
        "invert": "auto",
        "range": "clip((x - p_low) / (p_high - p_low), 0, 1); 1 - x when the background is bright",
    }
    return {"normalization": normalization, "serves": ["fluorescence", "brightfield"]}


def default_config(encoder: str = "resnet18", architecture: str = "Unet", tile_size: int = 1024, halo: int = DEFAULT_HALO, input: str = "grey") -> dict[str, Any]:
    """A complete bundle config for a fresh network (see the README's model bundle section)."""
    return {
        "format": BUNDLE_FORMAT,
        "name": f"nuclei-{architecture.lower()}-{encoder}",
        "architecture": architecture,
        "encoder": encoder,
        "encoder_depth": 5,
        "decoder_channels": [128, 64, 32, 16, 16],
        "encoder_weights": None,
        "in_channels": 1,
        "classes": list(TARGET_CLASSES),
        "class_meaning": {name: CLASS_MEANING[name] for name in TARGET_CLASSES},
        "activation": "sigmoid",
        **normalization_config(input),
        "tile_size": tile_size,
        "halo": halo,
        "pad_multiple": PAD_MULTIPLE,
        "tta": False,
        "postprocess": InstanceParams().to_dict(),
        "units": "pixels",
        "scale": {"nucleus_diameter_px": None, "pixel_size_um": None},
        "training": {},
        "metrics": {},
    }


def build_network(config: dict[str, Any]) -> torch.nn.Module:
    """Build the smp network a config describes (weights random unless ``encoder_weights`` names a set).

    Raises:
        UsageError: unknown architecture or encoder (the message lists valid names).
    """
    import segmentation_models_pytorch as smp

    architecture = config.get("architecture", "Unet")
    if architecture not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}")
    encoder = config["encoder"]
    valid_encoders = smp.encoders.get_encoder_names()
    if encoder not in valid_encoders and not encoder.startswith("tu-"):
        raise UsageError(
            f"unknown encoder {encoder!r}; light choices on a CPU: resnet18, resnet34, mobilenet_v2, "
            f"efficientnet-b0; all: {', '.join(sorted(valid_encoders))} or tu-<timm name>"
        )
    kwargs: dict[str, Any] = dict(
        encoder_name=encoder,
        encoder_weights=config.get("encoder_weights"),
        in_channels=int(config["in_channels"]),
        classes=len(config["classes"]),
        encoder_depth=int(config.get("encoder_depth", 5)),
    )
    if architecture in ("Unet", "UnetPlusPlus"):
        kwargs["decoder_channels"] = tuple(config.get("decoder_channels", (256, 128, 64, 32, 16)))
    return getattr(smp, architecture)(**kwargs)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_bundle(network: torch.nn.Module, config: dict[str, Any], directory: str | Path, half: bool = True) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (float16 unless ``half=False``) to ``directory``.

    The network may be DDP-wrapped; the unwrapped weights are saved. Returns the directory.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    module = network.module if hasattr(network, "module") else network
    dtype = torch.float16 if half else torch.float32
    state = {
        name: (tensor.detach().to("cpu", dtype) if tensor.is_floating_point() else tensor.detach().cpu()).contiguous()
        for name, tensor in module.state_dict().items()
    }
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": BUNDLE_FORMAT})
    tmp.replace(directory / WEIGHTS_NAME)
    config = copy.deepcopy(config)
    config["weights"] = WEIGHTS_NAME
    config["weights_dtype"] = str(dtype).replace("torch.", "")
    config["weights_sha256"] = sha256_file(directory / WEIGHTS_NAME)
    tmp = directory / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    tmp.replace(directory / CONFIG_NAME)
    return directory


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
    config: dict[str, Any]
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
        fast path its convolutions' and linear layers' weights stored in bf16 (what autocast casts
        them to on every call: the same results, bit for bit; other layers keep float32, as
        autocast runs them). Made on first use, once for all threads, and again when ``network``
        is replaced by another object or the precision or device changes (not when its weights
        change in place); ``network`` keeps the bundle's layers and weights, for training and saving."""
        key = (self.fast, str(self.device))
        with self._inference_lock:
            made = self._inference
            if made is None or made[0] is not self.network or made[1] != key:
                network = fold_batch_norms(self.network)
                if self.fast:
                    network = copy.deepcopy(network) if network is self.network else network
                    for module in network.modules():
                        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
                            module.to(torch.bfloat16)
                made = self._inference = (self.network, key, network)
            return made[2]

    @property
    def fast(self) -> bool:
        """Whether the network runs in bf16 (see :func:`uses_bf16`)."""
        return uses_bf16(self.precision, self.device)

    @property
    def name(self) -> str:
        return str(self.config.get("name", "unnamed"))

    @property
    def sha256(self) -> str:
        return str(self.config.get("weights_sha256", ""))

    @property
    def postprocess(self) -> InstanceParams:
        return InstanceParams.from_dict(self.config.get("postprocess", {}))

    def predict(self, image: np.ndarray, batch_size: int = 4, tta: bool | None = None, output_box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Probabilities of a normalised image: ``(H, W)`` float32 -> ``(3, h, w)`` float32 of ``output_box`` (default: all)."""
        return self.predict_many([image], batch_size, tta, [output_box])[0]

    def predict_many(
        self,
        images: Sequence[np.ndarray],
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
            tile_size=int(self.config.get("tile_size", 512)),
            halo=int(self.config.get("halo", DEFAULT_HALO)),
            batch_size=batch_size,
            device=self.device,
            tta=bool(self.config.get("tta", False)) if tta is None else tta,
            usage=self.usage,
            fast=self.fast,
            keep_half=keep_half,
            on_device=on_device,
        )


def resolve_device_name(device: str) -> str:
    """Check the form of a --device value (``auto``, ``cpu``, ``cuda``, ``cuda:N``), not that it exists here."""
    if device in ("auto", "cpu") or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise UsageError(f"--device must be auto, cpu or cuda[:N], got {device!r}")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a usage error."""
    resolve_device_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(device)


def bundle_folder(spec: str | Path) -> Path:
    """The folder of the bundle that ``spec`` names (a shipped name, a folder or its config.json),
    checked to hold a config (cheap: nothing is loaded).

    Raises:
        ModelNotFoundError: no such shipped name, or no bundle there.
    """
    shipped = str(spec) in SHIPPED_BUNDLES
    path = SHIPPED_BUNDLES[str(spec)] if shipped else Path(spec)
    if path.is_file() and path.name == CONFIG_NAME:
        path = path.parent
    if not (path / CONFIG_NAME).is_file():
        hint = f" (the shipped model {spec!r} is not in this installation; reinstall the package)" if shipped else ""
        raise ModelNotFoundError(f"{path}: not a model bundle, no {CONFIG_NAME} found{hint}; give --model {' or '.join(SHIPPED_BUNDLES)} or a folder written by `nucleibatch train`")
    return path


def load_model(spec: str | Path = "default", device: str | torch.device = "cpu", precision: str = "auto") -> NucleiModel:
    """Load a model bundle.

    Args:
        spec: the name of a bundle shipped in the package (:data:`SHIPPED_BUNDLES`: ``"default"``,
            ``"he"``) or a bundle folder (or its ``config.json``).
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` or a ``torch.device``.
        precision: ``"auto"`` (bf16 on CUDA and on CPUs with native bf16, else float32),
            ``"float32"`` or ``"bf16"``.

    Returns:
        :class:`NucleiModel` whose ``network`` is in eval mode on ``device``.

    Raises:
        ModelBundleError: missing folder/files, weights that do not match the config.
    """
    from safetensors.torch import load_file

    path = bundle_folder(spec)
    config_path = path / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelBundleError(f"{config_path}: unreadable config ({error})") from None
    for key in ("encoder", "in_channels", "classes"):
        if key not in config:
            raise ModelBundleError(f"{config_path}: config lacks {key!r}; re-export the bundle with `nucleibatch train`")
    weights_path = path / config.get("weights", WEIGHTS_NAME)
    if not weights_path.is_file():
        raise ModelBundleError(f"{path}: weights file {weights_path.name} is missing")
    config = dict(config)
    config["encoder_weights"] = None  # the bundle's own weights replace any pretrained ones
    try:
        network = build_network(config)
    except UsageError as error:
        raise ModelBundleError(f"{config_path}: {error}") from None
    try:
        state = load_file(str(weights_path))
        network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except Exception as error:
        raise ModelBundleError(f"{weights_path}: weights do not fit the network in {CONFIG_NAME} ({type(error).__name__}: {' '.join(str(error).split())[:300]})") from None
    torch_device = resolve_device(device) if isinstance(device, str) else device
    network = prepare_network(network, torch_device, fast=uses_bf16(precision, torch_device))
    return NucleiModel(network=network, config=config, path=path, device=torch_device, precision=precision)


def fold_batch_norms(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of an eval-mode network with every batch norm that directly follows a convolution
    folded into that convolution's weights and bias: the same function, one pass over the
    activations less per convolution (the default model's network runs 1.08-1.28x faster per
    call on a 2-core CPU in bf16, ``benchmarks/folding.py``).

    Pairs are the modules' consecutive children (a ``Conv2d`` registered just before a
    ``BatchNorm2d`` of its output channels, with running statistics), which is the order in which
    the U-Nets' encoders and decoders run them. Because registration order need not be the order
    of ``forward``, the copy is checked against the network on a small random input (float32, on
    the CPU: no TF32), and the network itself is returned, with a warning, if they differ or the
    fold fails; also, silently, if any module is in training mode (batch statistics) or there is
    no such pair.
    """
    if any(module.training for module in network.modules()):
        return network
    try:
        folded = copy.deepcopy(network)
        pairs = 0
        for parent in folded.modules():
            names = list(parent._modules)
            for first, second in zip(names, names[1:], strict=False):
                conv, norm = parent._modules[first], parent._modules[second]
                if (
                    isinstance(conv, torch.nn.Conv2d)
                    and isinstance(norm, torch.nn.BatchNorm2d)
                    and norm.num_features == conv.out_channels
                    and norm.running_mean is not None
                ):
                    fused = fuse_conv_bn_eval(conv, norm)
                    channels_last = conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
                    parent._modules[first] = fused.to(memory_format=torch.channels_last) if channels_last else fused
                    parent._modules[second] = torch.nn.Identity()
                    pairs += 1
        if not pairs:
            return network
        if _same_function(network, folded):
            return folded
        log.warning("the network's batch norms are not folded: the folded copy computes another function (layers registered in another order than they run)")
    except Exception as error:  # noqa: BLE001 - an optimisation: any failure keeps the network as it is
        log.warning("the network's batch norms are not folded (%s: %s)", type(error).__name__, error)
    return network


def _same_function(network: torch.nn.Module, folded: torch.nn.Module) -> bool:
    """Whether two networks agree, to float32 rounding, on a small random input (float32 copies on
    the CPU: a GPU's TF32 convolutions would differ by more than the fold)."""
    in_channels = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    x = torch.rand((1, in_channels, 64, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = copy.deepcopy(network).float().cpu()(x)
        got = copy.deepcopy(folded).float().cpu()(x)
    return bool(torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()) + 1e-5))


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 + channels-last
    runs the network 2.3-2.6x faster than float32 (an AMD EPYC with AVX512-BF16,
    benchmarks/bare_model.py) with the same validation mAP (0.635); elsewhere bf16 is emulated
    and slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Resolve ``--precision``: ``auto`` is bf16 on CUDA (tensor cores) and on CPUs with native bf16."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    return fast_inference(device)


def fast_inference(device: torch.device) -> bool:
    """bf16 autocast + channels-last memory layout by default: on CUDA and on CPUs with native bf16."""
    return device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu())


def prepare_network(network: torch.nn.Module, device: torch.device, fast: bool | None = None) -> torch.nn.Module:
    """Move a network to ``device`` in eval mode; channels-last weights where inference is fast,
    the standard layout otherwise (a network prepared for bf16 elsewhere, e.g. on the driver of
    a distributed run, is turned back)."""
    network = network.to(device).eval()
    fast = fast_inference(device) if fast is None else fast
    return network.to(memory_format=torch.channels_last if fast else torch.contiguous_format)


def _forward(network: torch.nn.Module, batch: np.ndarray, device: torch.device, tta: bool, fast: bool | None = None, crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """:func:`_forward_on_device` copied back to the host: ``(N, K, h, w)`` float16 or float32."""
    return _forward_on_device(network, batch, device, tta, fast, crop).cpu().numpy()


def _forward_on_device(network: torch.nn.Module, batch: np.ndarray, device: torch.device, tta: bool, fast: bool | None = None, crop: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Sigmoid probabilities of a batch ``(N, 1, h, w)`` float32 -> ``(N, K, h, w)`` on ``device``.

    ``fast`` (default: :func:`fast_inference`) runs under bf16 autocast with channels-last input, and returns
    float16: finer than the bf16 network's own rounding (a step of at most 4.9e-4 in [0, 1]),
    and the device-to-host copy halves. Otherwise float32. The same code runs on the CPU when asked
    (tests check it there: no GPU is needed to exercise it).

    ``crop`` = ``(y0, y1, x0, x1)``: return only this window of every tile, cut on the device
    before the copy (the halo that the caller drops is not copied back).
    """
    fast = fast_inference(device) if fast is None else fast
    x = torch.from_numpy(batch).to(device, non_blocking=True)
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=fast):
        if fast:
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
        if fast:
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
    fast: bool | None = None,
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
        fast: bf16 autocast + channels-last (default: :func:`fast_inference`); see :func:`_forward`.

    Returns:
        ``(K, h, w)`` float32 probabilities (K = number of classes) of ``output_box``.
    """
    return predict_images(network, [image], [output_box], tile_size, halo, batch_size, device, tta, usage, fast)[0]


def predict_images(
    network: torch.nn.Module,
    images: Sequence[np.ndarray],
    output_boxes: Sequence[tuple[int, int, int, int] | None] | None = None,
    tile_size: int = 512,
    halo: int = DEFAULT_HALO,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    tta: bool = False,
    usage: ModelUsage | None = None,
    fast: bool | None = None,
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
        images: ``(H_i, W_i)`` float32 normalised to [0, 1].
        output_boxes: per image, as ``output_box`` of :func:`predict_image` (None: all).

        keep_half: return float16 where the network's calls do (the ``fast`` path): the same
            values in half the memory (segment's blocks, sent to post-processing processes).
        pad_batches: fill a call up to the next power of two windows (at most the call's
            size; zeros, whose outputs are dropped). Default: on CUDA, where the padding costs
            next to nothing and each new batch shape costs cuDNN's set-up of every convolution
            again: a run makes a few shapes per window, not one per number of tiles left in a group.
        on_device: return torch tensors on ``device`` (nothing is copied back to the host).

    Returns:
        Per image, ``(K, h_i, w_i)`` float32 probabilities of its output box (float16 with
        ``keep_half`` on the fast path): NumPy arrays, or tensors on ``device`` with ``on_device``.
    """
    device = torch.device(device)
    pad_batches = device.type == "cuda" if pad_batches is None else pad_batches
    core = tile_size - 2 * halo
    if core <= 0:
        raise UsageError(f"tile size {tile_size} leaves no core with halo {halo}; use tile >= 2 * halo + 32")
    output_boxes = list(output_boxes) if output_boxes is not None else [None] * len(images)
    images = [np.asarray(image, dtype=np.float32) for image in images]
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
            batch = np.empty((padded, 1) + window, dtype=np.float32)
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
            forward = _forward_on_device if on_device else _forward
            if usage is None:
                probabilities = forward(network, batch, device, tta, fast, crop)
            else:
                with usage.running(batch.shape[:1] + window, tiles=len(chunk)):
                    probabilities = forward(network, batch, device, tta, fast, crop)
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


def _pad_to(tile: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    pad_y, pad_x = window[0] - tile.shape[0], window[1] - tile.shape[1]
    if pad_y == 0 and pad_x == 0:
        return tile
    return np.pad(tile, ((0, pad_y), (0, pad_x)), mode="symmetric")


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
