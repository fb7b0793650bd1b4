"""Pipeline vs bare model: does `segment` keep the network busy? (issue: performance)

    .venv/bin/python benchmarks/pipeline.py [--dsb-mpix 16] [--big 8192] [--model default] [--device cpu]

Two workloads, each segmented by ``python -m nucleibatch segment`` in a child process (local
engine, default settings):

(a) DSB 2018 stage1_train images (../shared/data), in id order, until they total ``--dsb-mpix``
    megapixels;
(b) one ``--big`` x ``--big`` synthetic nuclei image (the tiled TIFF of benchmarks/memory.py).

The run records every network call's batch shape (run.json ``model_batches``). The bare
model then replays exactly those calls on random input (same batch sizes and tile shapes,
same device and precision, after a warm-up) in this process. Printed per workload: bare
and pipeline MPix/s (image megapixels / seconds), their ratio (target >= 0.85 on CPU), the
model's idle fraction during the run, and seconds per stage (summed over threads).
"""

from __future__ import annotations

import argparse
import importlib.util
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

REPO = Path(__file__).resolve().parents[1]
DSB = REPO.parent / "shared" / "data" / "dsb2018" / "stage1_train"


def dsb_folder(target: Path, megapixels: float) -> float:
    """Copy DSB images (in id order) into ``target`` until they total ``megapixels``; returns the total."""
    from PIL import Image

    total = 0.0
    for image_dir in sorted(p for p in DSB.iterdir() if p.is_dir()):
        png = image_dir / "images" / f"{image_dir.name}.png"
        with Image.open(png) as image:
            total += image.width * image.height / 1e6
        destination = target / image_dir.name / "images"
        destination.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, destination)
        if total >= megapixels:
            break
    return total


def big_image(path: Path, size: int) -> None:
    spec = importlib.util.spec_from_file_location("memory_benchmark", REPO / "benchmarks" / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    memory.write_image(path, size)


def segment(inputs: Path, out: Path, model: str, device: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "nucleibatch", "segment", str(inputs), "-o", str(out), "--model", model, "--device", device, "--progress", "log"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode not in (0, 3):
        raise SystemExit(f"segment failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads((out / "run.json").read_text())


def bare_seconds(model_name: str, device: str, batches: list[list[int]], tta: bool) -> float:
    """Seconds the bare network takes for exactly these calls ``[n, h, w, count]`` on random input."""
    import torch

    from nucleibatch.model import _forward, load_model

    model = load_model(model_name, device=device)
    rng = np.random.default_rng(0)
    inputs = {(n, h, w): rng.random((n, 1, h, w), dtype=np.float32) for n, h, w, _ in batches}
    for key in inputs:  # warm-up: allocator, kernels, autotuning
        _forward(model.network, inputs[key], model.device, tta)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for n, h, w, count in batches:
        for _ in range(count):
            _forward(model.network, inputs[(n, h, w)], model.device, tta)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def report(name: str, run: dict, bare: float) -> float:
    mpix = run["processed_megapixels"]
    pipeline = run["engine_seconds"]
    ratio = bare / pipeline
    stages = ", ".join(f"{k} {v:.1f}" for k, v in run["stage_seconds"].items())
    print(f"{name}: {mpix:.1f} MPix, {run['counts']['ok']} images, {run['counts']['nuclei']} nuclei, {run['model_tiles']} tiles")
    print(f"    bare model {mpix / bare:.3f} MPix/s ({bare:.1f} s)   pipeline {mpix / pipeline:.3f} MPix/s ({pipeline:.1f} s)   ratio {ratio:.3f}")
    print(f"    model busy {run['model_busy_seconds']:.1f} s, idle {100 * run['model_idle_fraction']:.1f} % of the run; stage seconds: {stages}", flush=True)
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsb-mpix", type=float, default=16.0, help="megapixels of DSB images for workload (a) [16]")
    parser.add_argument("--big", type=int, default=8192, help="side of the image of workload (b) [8192]; 0 skips it")
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu", help="cpu | cuda [cpu]")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    import torch

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="nb-pipeline-"))
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, device {args.device} ({device_name}), torch {torch.__version__} ({torch.get_num_threads()} threads)")
    ratios = []
    try:
        folder = workdir / "dsb"
        total = dsb_folder(folder, args.dsb_mpix)
        run = segment(folder, workdir / "out-dsb", args.model, args.device)
        ratios.append(report(f"(a) DSB folder ({total:.1f} MPix)", run, bare_seconds(args.model, args.device, run["model_batches"], bool(run["settings"].get("tta")))))
        if args.big:
            image = workdir / "big" / "big.tif"
            image.parent.mkdir(parents=True, exist_ok=True)
            big_image(image, args.big)
            run = segment(image.parent, workdir / "out-big", args.model, args.device)
            ratios.append(report(f"(b) one {args.big} x {args.big} image", run, bare_seconds(args.model, args.device, run["model_batches"], bool(run["settings"].get("tta")))))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"target: pipeline >= 0.85 of the bare model on CPU: {'met' if min(ratios) >= 0.85 else 'NOT met'} (lowest ratio {min(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
