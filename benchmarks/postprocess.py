"""What post-processing costs per megapixel, on one thread, apart from the network.

    .venv/bin/python benchmarks/postprocess.py [--dsb-mpix 4] [--big 4096] [--repeat 5]
        [--model default] [--dsb DIR]

The network predicts, once, the blocks of two workloads (with `segment`'s default settings):
(a) DSB 2018 stage1_train images in id order until they total ``--dsb-mpix`` megapixels, and
(b) one ``--big`` x ``--big`` synthetic nuclei image (benchmarks/memory.py's tiled TIFF; its
blocks are 2048² with their margins). Then :func:`nucleibatch.segment.steps.find_block_nuclei` (instances,
owned nuclei, measurements; no file writes) runs on every block ``--repeat`` times in this
thread. Printed per workload: the best repeat's seconds per stage and its CPU milliseconds per
megapixel of the blocks' read regions. On 2 cores every CPU-second of post-processing is taken
from the network (see docs/performance.md); on a GPU node it is what the
post-processing processes spend.

``find_block_nuclei`` is the per-block step of every engine, in this version of the code and in
earlier ones, so the script can be copied into an older checkout to compare.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from nucleibatch.runtime.allocator import tune_allocator

tune_allocator()

from pipeline import DSB, big_image, dsb_folder  # noqa: E402  (benchmarks/pipeline.py, beside this script)


def predicted_blocks(folder: Path, model) -> list:
    """``(plan, block, prediction)`` of every block of every image under ``folder``."""
    from nucleibatch.io.discover import discover_inputs
    from nucleibatch.segment.plan import context_pixels, plan_image
    from nucleibatch.segment.settings import SegmentSettings
    from nucleibatch.segment.steps import open_image, predict_blocks, read_block
    from nucleibatch.segment.timer import Timer

    settings = SegmentSettings()
    halo = context_pixels(model.config)
    blocks = []
    for record in discover_inputs([str(folder)]):
        source = open_image(record, Timer())
        try:
            plan = plan_image(record, source, settings, model.config, Timer())
            for block in plan.blocks:
                raw, region = read_block(plan, block, source, halo)
                blocks.append((plan, block, predict_blocks([(plan, block, raw, region)], model, settings)[0]))
        finally:
            source.close()
    return blocks


def time_post_processing(name: str, blocks: list, params, repeat: int) -> None:
    from nucleibatch.segment.settings import SegmentSettings
    from nucleibatch.segment.steps import find_block_nuclei

    settings = SegmentSettings(store_image=False)
    megapixels = sum(prediction.probabilities.shape[1] * prediction.probabilities.shape[2] for _, _, prediction in blocks) / 1e6
    best, nuclei = None, 0
    for _ in range(repeat):
        seconds: dict[str, float] = {}
        started = time.process_time()
        nuclei = 0
        for plan, block, prediction in blocks:
            prediction.seconds = {}  # the network's share is not post-processing
            result = find_block_nuclei(plan, block, prediction, settings, params)
            nuclei += result.owned.count
            for stage, value in result.seconds.items():
                seconds[stage] = seconds.get(stage, 0.0) + value
        cpu = time.process_time() - started
        if best is None or cpu < best[0]:
            best = (cpu, seconds)
    cpu, seconds = best
    stages = ", ".join(f"{stage} {value:.3f} s ({1000 * value / megapixels:.1f} ms/MPix)" for stage, value in seconds.items())
    print(f"{name}: {len(blocks)} blocks, {megapixels:.1f} MPix, {nuclei} nuclei owned")
    print(f"    best of {repeat}: {cpu:.3f} CPU-s = {1000 * cpu / megapixels:.1f} CPU-ms/MPix; {stages}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsb-mpix", type=float, default=4.0, help="megapixels of DSB images for workload (a) [4]")
    parser.add_argument("--big", type=int, default=4096, help="side of the synthetic image of workload (b) [4096]; 0 skips it")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dsb", type=Path, default=DSB)
    args = parser.parse_args(argv)

    import torch

    from nucleibatch.model import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(args.model, device="cpu")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), numpy post-processing on 1 thread")
    workdir = Path(tempfile.mkdtemp(prefix="nb-postprocess-"))
    try:
        folder = workdir / "dsb"
        total = dsb_folder(folder, args.dsb_mpix, args.dsb)
        time_post_processing(f"(a) DSB images ({total:.1f} MPix)", predicted_blocks(folder, model), model.postprocess, args.repeat)
        if args.big:
            image = workdir / "big" / "big.tif"
            image.parent.mkdir(parents=True)
            big_image(image, args.big)
            time_post_processing(f"(b) one {args.big} x {args.big} synthetic image", predicted_blocks(image.parent, model), model.postprocess, args.repeat)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
