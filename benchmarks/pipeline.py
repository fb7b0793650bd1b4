"""Pipeline vs bare model: does `segment` keep the network busy? (issue: performance)

    .venv/bin/python benchmarks/pipeline.py [--dsb-mpix 16] [--big 8192] [--model default] [--device cpu]
        [--dsb DIR] [--batch-size 4] [--precision auto|float32|bf16] [--post-workers N]
        [--engine local|dask] [--dask-cpu-workers N] [--instances-on auto|cpu|device]

Two workloads, each segmented by ``python -m nucleibatch segment`` in a child process (local
engine, default settings):

(a) DSB 2018 stage1_train images (../shared/data), in id order, until they total ``--dsb-mpix``
    megapixels;
(b) one ``--big`` x ``--big`` synthetic nuclei image (the tiled TIFF of benchmarks/memory.py).

``--dsb DIR`` takes the images from another folder (DSB layout ``ID/images/ID.png``, or
``images/ID.png``). ``--engine dask --dask-cpu-workers N`` runs `segment` on a Dask cluster
started here on 127.0.0.1: one worker declaring the ``GPU`` resource (model units) and N
single-threaded CPU workers (post-processing), as on a GPU node.

The run records every network call's batch shape (run.json ``model_batches``). The bare
model then replays exactly those calls on random input (same batch sizes and tile shapes,
same device, precision and allocator settings (nucleibatch/runtime/allocator.py; NUCLEIBATCH_DEFAULT_MALLOC=1
for glibc's defaults in both), after a warm-up) in this process. Printed per workload: bare
and pipeline MPix/s (image megapixels / seconds), their ratio (target >= 0.85 on CPU), the
model's idle fraction during the run, and seconds per stage (summed over threads).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nucleibatch.model.config import PRECISIONS
from nucleibatch.output.folder import OutputFolder
from nucleibatch.runtime.allocator import tune_allocator
from nucleibatch.segment.settings import INSTANCES_ON

tune_allocator()  # before any thread: the network runs with segment's allocator settings (NUCLEIBATCH_DEFAULT_MALLOC=1: glibc's)

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DSB = REPO.parent / "shared" / "data" / "dsb2018" / "stage1_train"


def dsb_folder(target: Path, megapixels: float, source: Path = DSB) -> float:
    """Copy DSB images (in id order) into ``target`` until they total ``megapixels``; returns the total."""
    from PIL import Image

    total = 0.0
    pngs = sorted(source.glob("*/images/*.png")) or sorted(source.glob("images/*.png"))
    if not pngs:
        raise SystemExit(f"no DSB images (ID/images/ID.png or images/ID.png) under {source}")
    for png in sorted(pngs, key=lambda path: path.stem):
        with Image.open(png) as image:
            total += image.width * image.height / 1e6
        destination = target / png.stem / "images"
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


def segment(inputs: Path, out: Path, model: str, device: str, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "nucleibatch", "segment", str(inputs), "-o", str(out), "--model", model, "--device", device, "--progress", "log", *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode not in (0, 3):
        raise SystemExit(f"segment failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(OutputFolder(out).run_json.read_text())


def gpu_node_cluster(cpu_workers: int):
    """A Dask cluster on 127.0.0.1 shaped like a GPU node: one GPU worker, ``cpu_workers`` CPU workers."""
    from distributed import Nanny, Scheduler, SpecCluster

    options = {"nthreads": 1, "host": "127.0.0.1"}
    workers = {"gpu": {"cls": Nanny, "options": {**options, "resources": {"GPU": 1}}}}
    workers |= {f"cpu-{i}": {"cls": Nanny, "options": dict(options)} for i in range(cpu_workers)}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    from nucleibatch.segment.engines.dask_engine import worker_allocator_config

    with worker_allocator_config():  # as the dask engine's own LocalCluster
        return SpecCluster(scheduler=scheduler, workers=workers, silence_logs=logging.WARNING)


def bare_seconds(model_name: str, device: str, batches: list[list[int]], tta: bool, precision: str = "auto") -> float:
    """Seconds the bare network takes for exactly these calls ``[n, h, w, count]`` on random input."""
    import torch

    from nucleibatch.model import forward_batch, load_model

    model = load_model(model_name, device=device, precision=precision)
    rng = np.random.default_rng(0)
    inputs = {(n, h, w): rng.random((n, 1, h, w), dtype=np.float32) for n, h, w, _ in batches}
    for key in inputs:  # warm-up: allocator, kernels, autotuning
        forward_batch(model.inference_network, inputs[key], model.device, tta, bf16=model.bf16)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for n, h, w, count in batches:
        for _ in range(count):
            forward_batch(model.inference_network, inputs[(n, h, w)], model.device, tta, bf16=model.bf16)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def report(name: str, run: dict, bare: float) -> float:
    mpix = run["processed_megapixels"]
    pipeline = run["engine_seconds"]
    ratio = bare / pipeline
    stages = ", ".join(f"{k} {v:.1f}" for k, v in run["stage_seconds"].items())
    tiles = f", {run['model_tiles']} tiles" if run.get("model_tiles") is not None else ""
    print(f"{name}: {mpix:.1f} MPix, {run['counts']['ok']} images, {run['counts']['nuclei']} nuclei{tiles}")
    print(f"    bare model {mpix / bare:.3f} MPix/s ({bare:.1f} s)   pipeline {mpix / pipeline:.3f} MPix/s ({pipeline:.1f} s)   ratio {ratio:.3f}")
    if run.get("model_busy_seconds") is not None:
        print(f"    model busy {run['model_busy_seconds']:.1f} s, idle {100 * run['model_idle_fraction']:.1f} % of the run; stage seconds: {stages}", flush=True)
    else:
        print(f"    stage seconds (summed over workers): {stages}", flush=True)
    return ratio


def workload(name: str, inputs: Path, out: Path, args, dask_extra: list[str] | None) -> list[float]:
    """Segment ``inputs`` with the local engine (whose network calls the bare model replays), and
    on the Dask cluster too when ``dask_extra``; returns the ratios."""
    local_extra = ["--batch-size", str(args.batch_size), "--precision", args.precision]
    if args.post_workers is not None:
        local_extra += ["--post-workers", str(args.post_workers)]
    if args.instances_on is not None:
        local_extra += ["--instances-on", args.instances_on]
    run = segment(inputs, out, args.model, args.device, local_extra)
    bare = bare_seconds(args.model, args.device, run["model_batches"], bool(run["settings"].get("tta")), args.precision)
    ratios = [report(f"{name}, local engine", run, bare)]
    if dask_extra is not None:
        run = segment(inputs, out, args.model, args.device, [*local_extra, *dask_extra])
        ratios.append(report(f"{name}, dask engine", run, bare))
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsb-mpix", type=float, default=16.0, help="megapixels of DSB images for workload (a) [16]")
    parser.add_argument("--big", type=int, default=8192, help="side of the image of workload (b) [8192]; 0 skips it")
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu", help="cpu | cuda [cpu]")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="segment --precision, and the bare model's [auto]")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--dsb", type=Path, default=DSB, help="folder of DSB images for workload (a) [../shared/data/dsb2018/stage1_train]")
    parser.add_argument("--batch-size", type=int, default=4, help="segment --batch-size [4]")
    parser.add_argument("--post-workers", type=int, default=None, help="segment --post-workers (local engine) [segment's default]")
    parser.add_argument("--instances-on", default=None, choices=INSTANCES_ON, help="segment --instances-on [segment's default: device on CUDA, else cpu]")
    parser.add_argument("--engine", default="local", choices=("local", "dask"))
    parser.add_argument("--dask-cpu-workers", type=int, default=2, help="with --engine dask: CPU workers beside the one GPU worker [2]")
    args = parser.parse_args(argv)

    import torch

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="nb-pipeline-"))
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, device {args.device} ({device_name}), torch {torch.__version__} ({torch.get_num_threads()} threads)")
    ratios = []
    cluster, dask_extra = None, None
    if args.engine == "dask":
        cluster = gpu_node_cluster(args.dask_cpu_workers)
        dask_extra = ["--engine", "dask", "--address", cluster.scheduler_address]
        print(f"dask: 1 GPU worker + {args.dask_cpu_workers} CPU workers at {cluster.scheduler_address}")
    try:
        folder = workdir / "dsb"
        total = dsb_folder(folder, args.dsb_mpix, args.dsb)
        ratios.append(workload(f"(a) DSB folder ({total:.1f} MPix)", folder, workdir / "out-dsb", args, dask_extra))
        if args.big:
            image = workdir / "big" / "big.tif"
            image.parent.mkdir(parents=True, exist_ok=True)
            big_image(image, args.big)
            ratios.append(workload(f"(b) one {args.big} x {args.big} image", image.parent, workdir / "out-big", args, dask_extra))
    finally:
        if cluster is not None:
            cluster.close()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    target = 0.85 if args.device == "cpu" else 0.7
    print(f"target: pipeline >= {target} of the bare model on {args.device}: {'met' if min(max(r) for r in ratios) >= target else 'NOT met'} (best engine per workload: {', '.join(f'{max(r):.3f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
