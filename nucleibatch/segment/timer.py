"""Seconds per stage of the per-image flow, summed over the units that ran it."""

from __future__ import annotations

import time
from collections import defaultdict

STAGES = ("read", "normalise", "predict", "instances", "stitch", "measure", "write")


class Timer:
    """Accumulates seconds per stage: ``with timer("predict"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, stage: str) -> _Span:
        return _Span(self, stage)

    def add(self, other: dict[str, float]) -> None:
        for key, value in other.items():
            self.seconds[key] += value


class _Span:
    def __init__(self, timer: Timer, stage: str) -> None:
        self.timer, self.stage = timer, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.timer.seconds[self.stage] += time.perf_counter() - self.start
