"""Choices that the command line and the library share (importable without torch: `--help` stays fast)."""

from __future__ import annotations

PRECISIONS = ("auto", "float32", "bf16")
"""``--precision``: the network's arithmetic. ``auto`` is bf16 on CUDA and on CPUs with native bf16."""

TTA_CHOICES = ("auto", "on", "off")
"""``--tta``: flip test-time augmentation; ``auto`` is the model bundle's setting."""

INSTANCES_ON = ("auto", "cpu", "device")
"""``--instances-on``: where probabilities become instance labels; ``auto`` is the device on CUDA, else the CPU."""
