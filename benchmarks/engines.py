"""Wall time of the same small archive on each engine (issue: distributed execution).

    .venv/bin/python benchmarks/engines.py [--copies 4] [--model default] [--runs local ray:1 ray:2 dask:1 dask:2]

The archive: ``--copies`` copies of the 5 real DSB demo images (examples/dsb_demo) plus one
2048 x 2048 mosaic of them (a multi-block image at ``--block-size 1024``). Each run is
``python -m nucleibatch segment ARCHIVE -o OUT --engine E --workers N --device cpu`` in a child
process on this machine (Ray: a private local Ray; Dask: a LocalCluster, both on 127.0.0.1,
so the figures include starting the cluster; ``--address`` runs them on an existing cluster,
then ``--workdir`` must be a folder all its nodes see). Printed per run: the child's wall time, the run's
own wall time from run.json (after the model is loaded), MPix/s, nuclei, and a check that
every engine wrote the same labels as the first run.
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
import time
from pathlib import Path

import numpy as np

from nucleibatch.output.folder import OutputFolder, label_path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "dsb_demo"


def write_archive(root: Path, copies: int) -> None:
    """Copies of the demo images (DSB layout) and a 2048 x 2048 grey TIFF mosaic of them."""
    import tifffile
    from PIL import Image

    ids = sorted(p.name for p in DEMO.iterdir() if p.is_dir())
    tiles = []
    for k in range(copies):
        for image_id in ids:
            target = root / f"copy_{k}" / image_id / "images"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(DEMO / image_id / "images" / f"{image_id}.png", target)
    for image_id in ids:
        grey = np.asarray(Image.open(DEMO / image_id / "images" / f"{image_id}.png").convert("L"))
        tile = np.zeros((256, 256), np.uint8)
        tile[: min(256, grey.shape[0]), : min(256, grey.shape[1])] = grey[:256, :256]
        tiles.append(tile)
    cells = [tiles[(i * 8 + j) % len(tiles)] for i in range(8) for j in range(8)]
    mosaic = np.block([[cells[i * 8 + j] for j in range(8)] for i in range(8)])
    (root / "slides").mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(root / "slides" / "mosaic.tif", mosaic, tile=(256, 256), compression="zlib")


def labels_digest(out: Path) -> str:
    import hashlib

    import pandas as pd
    import zarr

    images = pd.read_parquet(OutputFolder(out).images).sort_values("image_id")
    root = zarr.open_group(str(OutputFolder(out).masks), mode="r")
    digest = hashlib.sha256()
    for row in images.itertuples():
        if row.status == "ok":
            digest.update(row.image_id.encode())
            digest.update(np.ascontiguousarray(root[row.store_path][label_path(0)][:]).tobytes())
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4, help="copies of the 5 demo images [4]")
    parser.add_argument("--model", default="default", help="model bundle [default]")
    parser.add_argument("--block-size", type=int, default=1024, help="segment --block-size [1024]")
    parser.add_argument("--runs", nargs="+", default=["local", "ray:1", "ray:2", "dask:1", "dask:2"], help="ENGINE[:WORKERS] ...")
    parser.add_argument("--workdir", default=None, help="work folder [temporary, removed]; on a cluster: a shared folder")
    parser.add_argument("--address", default=None, help="a Ray or Dask cluster to run on (ray/dask runs) [a private one on this machine]")
    parser.add_argument("--device", default="cpu", help="segment --device [cpu]")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="nb-engines-"))
    archive = workdir / "archive"
    if not archive.exists():
        write_archive(archive, args.copies)
    import torch

    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, python {platform.python_version()}")
    print(f"archive: {5 * args.copies} DSB demo images + one 2048 x 2048 mosaic; model {args.model}; --block-size {args.block_size}; device {args.device}; cluster {args.address or 'private, on this machine'}")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.setdefault("RAY_AUTH_MODE", "disabled")  # a private throwaway Ray on loopback
    reference = None
    try:
        for run in args.runs:
            engine, _, workers = run.partition(":")
            out = workdir / f"out-{engine}-{workers or 0}"
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, "-m", "nucleibatch", "segment", str(archive), "-o", str(out), "--model", args.model,
                       "--device", args.device, "--block-size", str(args.block_size), "--engine", engine, "--workers", workers or "0", "--json"]  # fmt: skip
            if args.address and engine != "local":
                command += ["--address", args.address]
            started = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
            wall = time.perf_counter() - started
            if result.returncode not in (0, 3):
                print(f"{run:>8}: exit {result.returncode}\n{result.stderr[-2000:]}")
                continue
            summary = json.loads(OutputFolder(out).run_json.read_text())
            digest = labels_digest(out)
            reference = reference or digest
            print(
                f"{run:>8}: {wall:6.1f} s wall (run {summary['wall_seconds']:6.1f} s), {summary['mpix_per_s']:.3f} MPix/s, "
                f"{summary['counts']['ok']} images, {summary['counts']['nuclei']} nuclei, labels {'identical' if digest == reference else 'DIFFERENT'} to the first run",
                flush=True,
            )
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
