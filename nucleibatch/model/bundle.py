"""Model bundles on disk: a folder holding ``config.json`` (:class:`~nucleibatch.model.config.BundleConfig`)
and ``model.safetensors``; the bundles shipped in the package; loading one as a :class:`NucleiModel`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import ModelBundleError, ModelNotFoundError, UsageError
from .config import BUNDLE_FORMAT, WEIGHTS_NAME, BundleConfig
from .device import prepare_network, resolve_device, uses_bf16
from .network import build_network
from .predict import NucleiModel

CONFIG_NAME = "config.json"
DEFAULT_BUNDLE = Path(__file__).parent.parent / "models" / "default"
# the bundles shipped in the package, by the name --model takes; `segment` without --model sends each
# image to the one serving its modality (nucleibatch.segment.choose), the first listed where several do
SHIPPED_BUNDLES = {
    "default": DEFAULT_BUNDLE,  # fluorescence and grey brightfield; trained on DSB 2018 only (CC0)
    "he": DEFAULT_BUNDLE.parent / "he",  # H&E and other stained tissue; MoNuSeg 2018 (CC BY-NC-SA 4.0) + DSB's stained images
}


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes (a bundle records its weights')."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_bundle(network: torch.nn.Module, config: BundleConfig, directory: str | Path, half: bool = True) -> Path:
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
    config = replace(config, weights=WEIGHTS_NAME, weights_dtype=str(dtype).replace("torch.", ""), weights_sha256=sha256_file(directory / WEIGHTS_NAME))
    tmp = directory / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=False) + "\n")
    tmp.replace(directory / CONFIG_NAME)
    return directory


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


def read_config(config_path: Path) -> BundleConfig:
    """The config of a bundle's ``config.json``, of any format version (:meth:`BundleConfig.from_dict`).

    Raises:
        ModelBundleError: unreadable JSON, a config that lacks a required key or is of a newer format.
    """
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelBundleError(f"{config_path}: unreadable config ({error})") from None
    try:
        return BundleConfig.from_dict(raw)
    except ModelBundleError as error:
        raise ModelBundleError(f"{config_path}: {error}") from None


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
    # the bundle's own weights replace any pretrained ones
    config = replace(read_config(config_path), encoder_weights=None)
    weights_path = path / config.weights_file
    if not weights_path.is_file():
        raise ModelBundleError(f"{path}: weights file {weights_path.name} is missing")
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
    network = prepare_network(network, torch_device, bf16=uses_bf16(precision, torch_device))
    return NucleiModel(network=network, config=config, path=path, device=torch_device, precision=precision)
