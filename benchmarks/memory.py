"""Peak resident memory of `nucleibatch segment` against image size (it should depend on the block size only).

    .venv/bin/python benchmarks/memory.py [--sizes 2048 8192 16384] [--model default|PATH]
        [--block-size 2048] [--block-margin 128] [--workdir DIR] [--env KEY=VALUE ...]

For each size N, writes a square N x N synthetic nuclei image as a tiled, zlib-compressed
TIFF (tiles of 512, written tile by tile from a generator, so the writer never holds the
whole image: every band of 2048 rows repeats one 2048 x 2048 `synthetic_nuclei` image of
its own seed across the width), then runs `python -m nucleibatch segment` on it as a
child process with the same settings each time and reports the child's peak resident
set size (``ru_maxrss`` of exactly that child, from ``os.wait4``), its wall time, the
nuclei found, and when the peak happened (RSS sampled from /proc every 0.2 s).

Goal checked at the end: the largest image's peak <= 2 GB and <= 1.3 x the smallest's
(stated for 16k vs 2k). ``--model`` defaults to the shipped bundle when it is installed,
else to a tiny random-weight bundle built in the work folder (the one tests use:
resnet18, encoder depth 3, tile 256, halo 32), so that figures are about nucleibatch's
memory, not about a model's quality. ``--env MALLOC_ARENA_MAX=2`` etc. passes variables
to the child (to tell allocator effects from state that nucleibatch keeps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nucleibatch.output.folder import OutputFolder

REPO = Path(__file__).resolve().parents[1]
TILE = 512
BASE = 2048  # side of the synthetic image repeated across each band
GOAL_BYTES = 2 * 1024**3
GOAL_RATIO = 1.3


def tiles(size: int, seed: int = 0) -> Iterator[np.ndarray]:
    """``TILE x TILE`` uint8 tiles of a ``size x size`` image in row-major tile order.

    Holds one ``BASE x BASE`` synthetic image at a time (plus one tile).
    """
    from nucleibatch.synthetic import synthetic_nuclei

    n_nuclei = 40 * (BASE // 256) ** 2  # the density of synthetic_nuclei's default 256 x 256 image
    for band_y in range(0, size, BASE):
        base, _ = synthetic_nuclei((BASE, BASE), n_nuclei=n_nuclei, seed=seed + band_y // BASE)
        mirrored = np.ascontiguousarray(base[:, ::-1])
        for tile_y in range(band_y, min(size, band_y + BASE), TILE):
            y = tile_y - band_y
            for tile_x in range(0, size, TILE):
                source = base if (tile_x // BASE) % 2 == 0 else mirrored
                x = tile_x % BASE
                tile = np.zeros((TILE, TILE), np.uint8)
                piece = source[y : y + TILE, x : x + TILE]
                tile[: piece.shape[0], : piece.shape[1]] = piece
                yield tile
        del base, mirrored


def write_image(path: Path, size: int) -> float:
    """Write the ``size x size`` tiled TIFF; returns seconds spent."""
    import tifffile

    started = time.perf_counter()
    tifffile.imwrite(
        path, tiles(size), shape=(size, size), dtype=np.uint8, tile=(TILE, TILE),
        compression="zlib", compressionargs={"level": 1}, photometric="minisblack", bigtiff=True,
    )  # fmt: skip
    return time.perf_counter() - started


def tiny_bundle(directory: Path) -> Path:
    """The random-weight bundle of tests/conftest.py (deterministic: seed 0)."""
    from dataclasses import replace

    import torch

    from nucleibatch.model import build_network, default_config, save_bundle

    torch.manual_seed(0)
    config = replace(default_config("resnet18", tile_size=256, halo=32), name="tiny-benchmark", encoder_depth=3, decoder_channels=[32, 16, 8])
    return save_bundle(build_network(config), config, directory / "tiny-bundle")


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure(command: list[str], env: dict[str, str], log_path: Path) -> dict:
    """Run ``command`` as a child; its peak RSS (bytes), wall time, exit status and RSS samples."""
    samples: list[tuple[float, int]] = []
    with open(log_path, "w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                rss = _rss_bytes(proc.pid)
                if rss is not None:
                    samples.append((time.perf_counter() - started, rss))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # the rusage of exactly this child
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    peak_at = max(samples, key=lambda s: s[1])[0] if samples else float("nan")
    return {"peak_rss": usage.ru_maxrss * 1024, "wall": wall, "returncode": proc.returncode, "peak_at": peak_at, "samples": samples}


def fmt_mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 16384], help="image sides in pixels [2048 8192 16384]")
    parser.add_argument("--model", default=None, help="'default' or a bundle folder [default when installed, else a tiny random bundle]")
    parser.add_argument("--block-size", type=int, default=2048, help="segment --block-size [2048, the CLI default]")
    parser.add_argument("--block-margin", type=int, default=128, help="segment --block-margin [128, the CLI default]")
    parser.add_argument("--batch-size", type=int, default=4, help="segment --batch-size [4]")
    parser.add_argument("--workdir", default=None, help="where images and outputs go [a temporary folder, removed at the end]")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="extra environment variables for the child")
    parser.add_argument("--trace", action="store_true", help="print the RSS samples of every run (MB every 0.2 s)")
    args = parser.parse_args(argv)

    import torch

    from nucleibatch.model import DEFAULT_BUNDLE

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="nb-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    model = args.model or ("default" if (DEFAULT_BUNDLE / "config.json").is_file() else str(tiny_bundle(workdir)))
    settings = ["--device", "cpu", "--block-size", str(args.block_size), "--block-margin", str(args.block_margin), "--batch-size", str(args.batch_size)]
    print(f"machine: {platform.node()}, {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}")  # fmt: skip
    print(f"model: {model}; settings: {' '.join(settings)}; extra env: {' '.join(args.env) or '-'}")

    baseline = measure(
        [sys.executable, "-c", f"from nucleibatch.model import load_model; load_model({model!r}, device='cpu')"],
        env, workdir / "baseline.log",
    )  # fmt: skip
    print(f"baseline (python + nucleibatch + torch import, model loaded): peak RSS {fmt_mb(baseline['peak_rss'])}")

    results = {}
    try:
        for size in args.sizes:
            image = workdir / f"image-{size}.tif"
            seconds = write_image(image, size)
            out = workdir / f"out-{size}"
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, "-m", "nucleibatch", "segment", str(image), "-o", str(out), "--model", model, *settings]
            run = measure(command, env, workdir / f"segment-{size}.log")
            row = {}
            if OutputFolder(out).images.is_file():
                import pyarrow.parquet as pq

                row = pq.read_table(OutputFolder(out).images).to_pylist()[0]
            stages = json.loads(OutputFolder(out).run_json.read_text()).get("stage_seconds", {}) if OutputFolder(out).run_json.is_file() else {}
            results[size] = run
            status = row.get("status", "no result") if run["returncode"] in (0, 3) else f"exit {run['returncode']}"
            print(
                f"{size:>6} x {size:<6} {size * size / 1e6:7.1f} MPix  peak RSS {fmt_mb(run['peak_rss']):>9}  "
                f"(at {run['peak_at']:.0f} s of {run['wall']:.0f} s)  nuclei {row.get('n_nuclei', 0):,}  status {status}"
                f"{'  error: ' + row['error'] if row.get('error') else ''}  [tiff written in {seconds:.0f} s, {image.stat().st_size / 2**20:.0f} MB]",
                flush=True,
            )
            if stages:
                print("         stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
            if args.trace:
                print("         RSS MB: " + " ".join(f"{t:.0f}s:{rss / 2**20:.0f}" for t, rss in run["samples"][::5]))
            image.unlink()
            shutil.rmtree(OutputFolder(out).masks, ignore_errors=True)
    finally:
        if not (args.keep or args.workdir):
            shutil.rmtree(workdir, ignore_errors=True)

    if len(results) >= 2:
        small, large = min(results), max(results)
        ratio = results[large]["peak_rss"] / results[small]["peak_rss"]
        ok = results[large]["peak_rss"] <= GOAL_BYTES and ratio <= GOAL_RATIO
        print(f"peak {large}/{small}: {ratio:.2f}x; goal (16k peak <= 2 GB and <= {GOAL_RATIO}x the 2k peak, "
              f"here {large} vs {small}): {'met' if ok else 'NOT met'}")  # fmt: skip
        if large != 16384 or small != 2048:
            print("note: the goal is stated for 16384 vs 2048; run with --sizes 2048 16384 to check it as stated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
