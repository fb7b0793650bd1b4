"""Ray Train throughput (patches/s) with 1 and 2 workers on this machine (or a cluster).

    .venv/bin/python benchmarks/train_throughput.py [--data DIR] [--workers 1 2] [--precision auto float32] [--gpu] [--address ADDR]

Each setting trains 2 short epochs (the first warms up) on real DSB images and prints
the second epoch's patches/s as reported by the training loop.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018" / "stage1_train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--address", default=None)
    parser.add_argument("--patches", type=int, default=96, help="patches per epoch")
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="per worker")
    parser.add_argument("--precision", nargs="+", default=["auto"], help="training arithmetic(s): auto (bf16 on CUDA and bf16 CPUs), float32, bf16")
    args = parser.parse_args()

    import ray
    import torch

    from nucleibatch.training.run import TrainSettings, run_training

    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, cuda={torch.cuda.is_available()}")
    for workers, precision in ((w, p) for w in args.workers for p in args.precision):
        with tempfile.TemporaryDirectory() as run_dir:
            settings = TrainSettings(
                data=[args.data], run_dir=run_dir, workers=workers, gpu=args.gpu, epochs=2,
                batch_size=max(1, args.batch_size // workers) if not args.gpu else args.batch_size,
                patch_size=args.patch_size, patches_per_epoch=args.patches, limit_images=64,
                val_fraction=0.05, tune_postprocess=False, address=args.address, precision=precision,
            )
            started = time.perf_counter()
            run_training(settings)
            with open(Path(run_dir) / "metrics.csv") as handle:
                rows = list(csv.DictReader(handle))
            print(f"workers={workers} precision={precision}: {float(rows[-1]['patches_per_s']):.2f} patches/s of {args.patch_size}x{args.patch_size} "
                  f"(global batch {settings.batch_size * workers}), run {time.perf_counter() - started:.0f} s", flush=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
