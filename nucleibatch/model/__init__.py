"""Model bundles (config.json + safetensors), the U-Net they describe, and batched tiled prediction.

* :mod:`.config`: :class:`BundleConfig`, the typed, versioned bundle config (no torch).
* :mod:`.bundle`: bundle folders on disk, the shipped bundles, :func:`load_model`, :func:`save_bundle`.
* :mod:`.network`: the segmentation_models_pytorch network of a config; batch-norm folding.
* :mod:`.device`: device and precision (bf16 or float32) policy.
* :mod:`.predict`: :class:`NucleiModel` and tiled prediction (:func:`predict_images`).

The config's names are imported here; the rest on first use (PEP 562), so that a module needing
only the config (``from nucleibatch.model.config import BundleConfig``, as the post-processing
processes do through :mod:`nucleibatch.segment.units`) does not import torch.
"""

from __future__ import annotations

import importlib

from .config import BUNDLE_FORMAT, WEIGHTS_NAME, BundleConfig, default_config, normalization_config

_LAZY = {
    "bundle": ("CONFIG_NAME", "DEFAULT_BUNDLE", "SHIPPED_BUNDLES", "bundle_folder", "load_model", "read_config", "save_bundle", "sha256_file"),
    "device": ("bf16_by_default", "native_bf16_cpu", "prepare_network", "resolve_device", "resolve_device_name", "uses_bf16"),
    "network": ("ARCHITECTURES", "build_network", "fold_batch_norms"),
    "predict": ("ModelUsage", "NucleiModel", "forward_batch", "forward_batch_on_device", "predict_image", "predict_images", "windows_per_call"),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["BUNDLE_FORMAT", "WEIGHTS_NAME", "BundleConfig", "default_config", "normalization_config", *_MODULE_OF]


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
