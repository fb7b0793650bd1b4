"""Is the network slower inside `segment` than alone? Per-call times, in one process.

    .venv/bin/python benchmarks/network_calls.py [--big 8192] [--inputs DIR] [--model default]
        [-- SEGMENT OPTIONS]

Runs `segment` in this process (local engine, CPU) on ``--inputs`` (default: one ``--big`` x
``--big`` synthetic image, benchmarks/memory.py's tiled TIFF), recording the seconds of every
network call (the model's lock held, as run.json's ``model_busy_seconds`` counts them). Then
replays the same calls (same batch shapes, random input, after one warm-up call per shape) in
this process, right away. Printed: both totals, and per window shape the median / min / max
of the calls. Slow calls inside `segment` beside fast replays mean that the work running
beside the network (reading, post-processing, writing) slows it down; the same process and
minute make this comparison robust to a machine whose speed drifts.
"""

from __future__ import annotations

import argparse
import collections
import platform
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from nucleibatch.runtime.allocator import tune_allocator

tune_allocator()

import numpy as np  # noqa: E402


def record_calls() -> list[tuple[tuple[int, int, int], float]]:
    """Wrap :meth:`ModelUsage.running` so that every network call's shape and seconds are kept."""
    from nucleibatch import model

    calls: list[tuple[tuple[int, int, int], float]] = []
    running = model.ModelUsage.running
    lock = threading.Lock()

    @contextmanager
    def timed(self, batch_shape, tiles=None):
        with running(self, batch_shape, tiles):
            started = time.perf_counter()
            yield
            with lock:
                calls.append((tuple(batch_shape), time.perf_counter() - started))

    model.ModelUsage.running = timed
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", type=int, default=8192, help="side of the synthetic image when no --inputs [8192]")
    parser.add_argument("--inputs", type=Path, default=None, help="a folder of images to segment instead")
    parser.add_argument("--model", default="default")
    parser.add_argument("segment_options", nargs="*", help="more segment options (after --)")
    args = parser.parse_args(argv)

    from nucleibatch.cli import main as cli_main
    from nucleibatch.model import forward_batch, load_model

    workdir = Path(tempfile.mkdtemp(prefix="nb-network-calls-"))
    try:
        inputs = args.inputs
        if inputs is None:
            from pipeline import big_image  # benchmarks/pipeline.py, beside this script

            inputs = workdir / "big"
            inputs.mkdir()
            big_image(inputs / "big.tif", args.big)
        calls = record_calls()
        cli_main(["segment", str(inputs), "-o", str(workdir / "out"), "--model", args.model, "--device", "cpu", "--progress", "log", *args.segment_options])
        in_segment = collections.defaultdict(list)
        for shape, seconds in calls:
            in_segment[shape].append(seconds)
        model = load_model(args.model, device="cpu")
        rng = np.random.default_rng(0)
        replayed = collections.defaultdict(list)
        for shape, times in in_segment.items():
            batch = rng.random((shape[0], 1, *shape[1:]), dtype=np.float32)
            forward_batch(model.inference_network, batch, model.device, False, bf16=model.bf16)  # warm-up of the shape
            for _ in times:
                started = time.perf_counter()
                forward_batch(model.inference_network, batch, model.device, False, bf16=model.bf16)
                replayed[shape].append(time.perf_counter() - started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    total_segment = sum(map(sum, in_segment.values()))
    total_replayed = sum(map(sum, replayed.values()))
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}")
    print(f"{len(calls)} network calls: {total_segment:.1f} s inside segment, {total_replayed:.1f} s replayed alone ({total_segment / total_replayed:.2f}x)")
    for shape in sorted(in_segment, key=lambda s: -len(in_segment[s]))[:6]:
        inside, alone = np.array(in_segment[shape]), np.array(replayed[shape])
        print(
            f"    {shape}: {inside.size} calls; inside segment median {np.median(inside):.3f} s (min {inside.min():.3f}, max {inside.max():.3f}); "
            f"alone median {np.median(alone):.3f} s (min {alone.min():.3f}, max {alone.max():.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
