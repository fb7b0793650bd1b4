"""nucleibatch: nuclei segmentation of microscopy archives at scale."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(spec="default", device="cpu", precision="auto"):
    """Load a model bundle: ``"default"`` or a bundle folder. See :func:`nucleibatch.model.load_model`."""
    from .model import load_model as _load_model

    return _load_model(spec, device=device, precision=precision)
