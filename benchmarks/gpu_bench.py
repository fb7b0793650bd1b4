"""Issue 20's GPU figures in one device call (``bash benchmarks/gpu.sh bench`` runs it).

    python3 benchmarks/gpu_bench.py --fields DIR --out OUT [--mosaic 20480] [--n-fields 475]
        [--slide 65536] [--budget 420] [--device cuda]

Workloads, built here from ``--fields`` (``images/ID.png`` as benchmarks/pack_grey.py packs
DSB 2018 stage1_train, or ``ID/images/ID.png``):

1. ``mosaic``: ``--mosaic`` x ``--mosaic`` pixels of the dark-background 256² fields in id order
   (repeated as needed), written as a tiled TIFF (512² tiles, uncompressed);
2. ``fields``: the first ``--n-fields`` images in id order, as they are;
3. ``slide``: a ``--slide`` x ``--slide`` synthetic slide (benchmarks/memory.py's tiled TIFF), for
   the device's peak memory, which the batch settings should bound whatever the image's size;
4. the mosaic again with ``--instances-on cpu`` (the CPU path's instance labels): the share of
   its nuclei that the default (device) run finds identical (IoU >= 0.9).

Each is ``python -m nucleibatch segment`` with default settings, timed as a whole command, while
``nvidia-smi dmon`` samples the GPU each second. Printed per run: engine MPix/s (run.json
``engine_seconds``), whole-command MPix/s, start-up (command start to the engine's start),
SM busy (mean of dmon's ``sm`` over the engine phase), peak device memory (run.json
``device_peak_bytes``; dmon's ``fb`` for a run cut by the budget). Steps that would exceed
``--budget`` seconds in all are cut (said in the output). Results also go to OUT/gpu_bench.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nucleibatch.output.folder import OutputFolder, label_path

REPO = Path(__file__).resolve().parents[1]
FIELD = 256


def field_pngs(folder: Path) -> list[Path]:
    """The images of a DSB-layout folder, in id order."""
    pngs = sorted(folder.glob("images/*.png")) or sorted(folder.glob("*/images/*.png"))
    if not pngs:
        raise SystemExit(f"no images (images/ID.png or ID/images/ID.png) under {folder}")
    return pngs


def grey(path: Path) -> np.ndarray:
    from PIL import Image

    image = np.asarray(Image.open(path))
    return image if image.ndim == 2 else image[..., :3].mean(axis=-1).astype(np.uint8)


def write_mosaic(pngs: list[Path], path: Path, side: int) -> int:
    """A ``side`` x ``side`` uint8 tiled TIFF of the dark 256² fields, repeated; returns how many differ."""
    import tifffile

    fields = [g for g in (grey(p) for p in pngs) if g.shape == (FIELD, FIELD) and g.mean() < 100]
    if not fields:
        raise SystemExit("no dark 256 x 256 fields to build the mosaic from")
    per_row = side // FIELD

    def tiles():  # 512² tiles, row by row, each of 2 x 2 fields
        for ty in range(side // 512):
            for tx in range(side // 512):
                k = (ty * 2) * per_row + tx * 2
                top = np.concatenate([fields[k % len(fields)], fields[(k + 1) % len(fields)]], axis=1)
                bottom = np.concatenate([fields[(k + per_row) % len(fields)], fields[(k + per_row + 1) % len(fields)]], axis=1)
                yield np.concatenate([top, bottom], axis=0)

    tifffile.imwrite(path, tiles(), shape=(side, side), dtype=np.uint8, tile=(512, 512), photometric="minisblack", bigtiff=True)
    return len(fields)


class Dmon:
    """``nvidia-smi dmon -s um -d 1`` in the background: (unix time, {column: value}) per second."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.time()
        self.process = None
        if shutil.which("nvidia-smi"):  # none on a CPU machine: no samples
            self.process = subprocess.Popen(["nvidia-smi", "dmon", "-s", "um", "-d", "1", "-o", "T"], stdout=path.open("w"), stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> list[tuple[float, dict[str, float]]]:
        if self.process is None:
            return []
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait()
        samples, names = [], []
        day = time.strftime("%Y-%m-%d", time.localtime(self.started))
        for line in self.path.read_text().splitlines():
            fields = line.split()
            if line.startswith("#"):
                names = names or fields[1:]
                continue
            if not names or len(fields) != len(names):
                continue
            when = time.mktime(time.strptime(f"{day} {fields[0]}", "%Y-%m-%d %H:%M:%S"))
            samples.append((when, {n: float(v) for n, v in zip(names[1:], fields[1:], strict=True) if v.replace(".", "", 1).isdigit()}))
        return samples


def segment(name: str, inputs: Path, out_dir: Path, extra: list[str], timeout: float) -> dict:
    """One timed segment command with dmon sampling; returns its figures."""
    out = out_dir / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    dmon = Dmon(out_dir / f"dmon-{name}.txt")
    command = [sys.executable, "-m", "nucleibatch", "segment", str(inputs), "-o", str(out), "--progress", "log", *extra]
    started = time.time()
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout)
        returncode = result.returncode
        (out_dir / f"segment-{name}.log").write_text(result.stderr[-20000:])
    except subprocess.TimeoutExpired:
        returncode = None
    wall = time.time() - started
    samples = dmon.stop()
    figures: dict = {"name": name, "command_seconds": round(wall, 2), "returncode": returncode, "peak_fb_mib": max((s.get("fb", 0) for _, s in samples), default=None)}
    if returncode is None:
        figures["cut"] = f"stopped after {timeout:.0f} s (budget)"
        return figures
    run = json.loads(OutputFolder(out).run_json.read_text())
    mpix, engine = run["processed_megapixels"], run["engine_seconds"]
    begin = run["engine_started_unix"]
    during = [s["sm"] for when, s in samples if begin <= when <= begin + engine and "sm" in s]
    figures |= {
        "megapixels": mpix,
        "nuclei": run["counts"]["nuclei"],
        "engine_seconds": engine,
        "engine_mpix_per_s": round(mpix / engine, 2),
        "command_mpix_per_s": round(mpix / wall, 2),
        "startup_seconds": round(begin - started, 2),
        "sm_busy_percent": round(float(np.mean(during)), 1) if during else None,
        "device_peak_gib": round(run["device_peak_bytes"] / 2**30, 2) if run.get("device_peak_bytes") else None,
        "stage_seconds": run["stage_seconds"],
    }
    return figures


def mosaic_labels(out: Path) -> np.ndarray:
    import zarr

    root = zarr.open_group(str(OutputFolder(out).masks), mode="r")
    import pandas as pd

    (store_path,) = pd.read_parquet(OutputFolder(out).images)["store_path"]
    return np.asarray(root[label_path(0, store_path)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fields", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_bench"))
    parser.add_argument("--mosaic", type=int, default=20480)
    parser.add_argument("--n-fields", type=int, default=475)
    parser.add_argument("--slide", type=int, default=65536, help="side of the synthetic slide; 0 skips it")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all the steps")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    deadline = time.time() + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    (work / "mosaic").mkdir(parents=True)
    (work / "fields" / "images").mkdir(parents=True)
    pngs = field_pngs(args.fields)
    built = time.time()
    distinct = write_mosaic(pngs, work / "mosaic" / "mosaic.tif", args.mosaic)
    for png in pngs[: args.n_fields]:
        shutil.copy(png, work / "fields" / "images" / png.name)
    print(f"built: {args.mosaic}² mosaic of {distinct} distinct fields, {min(len(pngs), args.n_fields)} fields, in {time.time() - built:.1f} s", flush=True)
    results = []
    device = ["--device", args.device]
    for name, inputs, extra in (("mosaic", work / "mosaic", device), ("fields", work / "fields", device), ("mosaic-cpu-instances", work / "mosaic", [*device, "--instances-on", "cpu"])):
        left = deadline - time.time()
        if left < 20:
            print(f"{name}: not run (budget spent)", flush=True)
            continue
        figures = segment(name, inputs, work, extra, left)
        results.append(figures)
        print(json.dumps(figures), flush=True)
    if all(OutputFolder(work / f"out-{n}").run_json.exists() for n in ("mosaic", "mosaic-cpu-instances")):
        spec = importlib.util.spec_from_file_location("seams", REPO / "benchmarks" / "seams.py")
        seams = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(seams)
        share = seams.identical_share(mosaic_labels(work / "out-mosaic-cpu-instances"), mosaic_labels(work / "out-mosaic"))
        results.append({"name": "device vs CPU instances on the mosaic", "identical_share": round(share, 4)})
        print(f"mosaic: {share:.4f} of the CPU path's nuclei identical in the device run (IoU >= 0.9)", flush=True)
    if args.slide and deadline - time.time() > 30:
        spec = importlib.util.spec_from_file_location("memory_benchmark", REPO / "benchmarks" / "memory.py")
        memory = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(memory)
        (work / "slide").mkdir()
        memory.write_image(work / "slide" / "slide.tif", args.slide)
        figures = segment("slide", work / "slide", work, device, max(10.0, deadline - time.time()))
        results.append(figures)
        print(json.dumps(figures), flush=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(results, indent=1) + "\n")
    for name in ("dmon-mosaic.txt", "dmon-fields.txt", "dmon-slide.txt", "segment-mosaic.log"):
        if (work / name).exists():
            shutil.copy(work / name, args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
