"""Choices that the command line and the library share (importable without torch: `--help` stays fast)."""

from __future__ import annotations

PRECISIONS = ("auto", "float32", "bf16")
"""``--precision``: the network's arithmetic. ``auto`` is bf16 on CUDA and on CPUs with native bf16."""

TTA_CHOICES = ("auto", "on", "off")
"""``--tta``: flip test-time augmentation; ``auto`` is the model bundle's setting."""

INSTANCES_ON = ("auto", "cpu", "device")
"""``--instances-on``: where probabilities become instance labels; ``auto`` is the device on CUDA, else the CPU."""


def resolve_instances_on(choice: str, device_type: str) -> str:
    """Where an ``--instances-on`` choice makes the labels for a network on ``device_type``
    (``"cuda"``, ``"cpu"``): ``"device"`` or ``"cpu"``."""
    if choice not in INSTANCES_ON:
        raise ValueError(f"instances_on must be auto, cpu or device, got {choice!r}")
    return "device" if choice == "device" or (choice == "auto" and device_type == "cuda") else "cpu"
