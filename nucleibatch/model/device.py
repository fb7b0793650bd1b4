"""Device and precision policy: which device a run uses, and whether its network runs in bf16
(autocast, channels-last weights) or float32."""

from __future__ import annotations

import torch

from ..errors import UsageError
from .config import PRECISIONS


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
    return bf16_by_default(device)


def bf16_by_default(device: torch.device) -> bool:
    """Whether ``--precision auto`` runs bf16 autocast + channels-last memory layout on ``device``:
    on CUDA and on CPUs with native bf16."""
    return device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu())


def prepare_network(network: torch.nn.Module, device: torch.device, bf16: bool | None = None) -> torch.nn.Module:
    """Move a network to ``device`` in eval mode; channels-last weights where it runs in ``bf16``
    (default: :func:`bf16_by_default`), the standard layout otherwise (a network prepared for
    bf16 elsewhere, e.g. on the driver of a distributed run, is turned back)."""
    network = network.to(device).eval()
    bf16 = bf16_by_default(device) if bf16 is None else bf16
    return network.to(memory_format=torch.channels_last if bf16 else torch.contiguous_format)
