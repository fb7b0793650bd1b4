"""Do tile and block seams change the result? One image segmented in tiles and blocks against the same image in one network window.

    .venv/bin/python benchmarks/seams.py [--fields 8] [--offsets 0 64 128 192] [--block-size 512] [--halo H] [--model default]
        [--instances-on cpu|device] [--no-window]

The image is a mosaic of ``fields x fields`` DSB 2018 stage1_train fluorescence fields of
256 x 256 (../shared/data, in id order, grey), cut from a mosaic one field larger at each of
``--offsets`` (pixels, down and right): where a seam falls on a border between fields it costs
nothing, so the figures are averaged over the offsets, which move the borders under the seams. It is segmented by ``run_segment_job`` on the
CPU three ways: the reference, one block in one network window (the model's ``tile_size``
raised to the image's size: no seam at all); one block in the model's windows (tile seams);
blocks of ``--block-size`` (block and tile seams). Printed: the nuclei found each way and the
DSB metric of the last two against the reference (mAP@[.5:.95], AP@0.5, AP@0.75; 1.0 means
the seams changed nothing), and the share of the one-block run's nuclei that the blocked run
finds identical (IoU >= 0.9: what block seams alone change). ``--no-window`` leaves out the
one-window reference (a 4352² window does not fit this machine's memory).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from nucleibatch.output.folder import OutputFolder, label_path
from nucleibatch.runtime.allocator import tune_allocator

tune_allocator()

import numpy as np  # noqa: E402

DSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018" / "stage1_train"


def dsb_mosaic(fields: int, source: Path = DSB) -> np.ndarray:
    """``(fields * 256, fields * 256)`` uint8: ``fields**2`` dark-background 256² DSB fields in id order, grey
    (the 271 of stage1_train repeated in that order for larger mosaics)."""
    from PIL import Image

    tiles = []
    for png in sorted(source.glob("*/images/*.png")):
        grey = np.asarray(Image.open(png))[..., :3].mean(axis=-1)
        if grey.shape == (256, 256) and grey.mean() < 100:
            tiles.append(grey.astype(np.uint8))
        if len(tiles) == fields * fields:
            break
    if not tiles:
        raise SystemExit(f"no 256 x 256 fluorescence fields under {source}")
    tiles = [tiles[k % len(tiles)] for k in range(fields * fields)]  # repeated where there are too few
    return np.concatenate([np.concatenate(tiles[row * fields : (row + 1) * fields], axis=1) for row in range(fields)], axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fields", type=int, default=8, help="the mosaic is fields x fields DSB fields of 256² [8]")
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 64, 128, 192], help="where the image is cut from the larger mosaic [0 64 128 192]")
    parser.add_argument("--block-size", type=int, default=512, help="block size of the blocked run [512]")
    parser.add_argument("--halo", type=int, default=None, help="the tiles' halo in the tiled runs [the model's]")
    parser.add_argument("--model", default="default")
    parser.add_argument("--dsb", type=Path, default=DSB)
    parser.add_argument("--instances-on", default="cpu", choices=["cpu", "device"], help="where the instance labels are made (the CPU path or the device path on CPU tensors) [cpu]")
    parser.add_argument("--no-window", action="store_true", help="skip the one-window reference (large mosaics)")
    args = parser.parse_args()

    from dataclasses import replace

    from nucleibatch.metrics import image_scores
    from nucleibatch.model import load_model
    from nucleibatch.tiling import PAD_MULTIPLE, padded_size

    larger = dsb_mosaic(args.fields + 1, args.dsb)
    side = args.fields * 256
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs; images {side} x {side} of DSB fields, offsets {args.offsets}")
    one_block = padded_size(side, PAD_MULTIPLE)  # one block, and as a window one that holds the image
    whole = load_model(args.model, device="cpu")
    whole.config = replace(whole.config, tile_size=one_block)  # one network window: no seam
    tiled = load_model(args.model, device="cpu")
    if args.halo is not None:
        tiled.config = replace(tiled.config, halo=args.halo)
    print(f"tiles: {tiled.config.tile_size}² windows, halo {tiled.config.halo}")
    ways = {"one block, tiles": (tiled, one_block), f"blocks of {args.block_size}, tiles": (tiled, args.block_size)}
    scores: dict[str, list[dict]] = {way: [] for way in ways}
    identical: list[float] = []
    for offset in args.offsets:
        image = larger[offset : offset + side, offset : offset + side]
        found = {way: segment_labels(image, model, block_size, args.instances_on) for way, (model, block_size) in ways.items()}
        whole_block, blocked = found.values()
        identical.append(identical_share(whole_block, blocked))
        line = f"offset {offset}: one block {int(whole_block.max())} nuclei, blocked {int(blocked.max())}; identical (IoU >= 0.9) {identical[-1]:.4f}"
        if not args.no_window:
            reference = segment_labels(image, whole, one_block)
            for way, labels in found.items():
                scores[way].append(image_scores(reference, labels))
            line += f"; one window {int(reference.max())} nuclei; " + "; ".join(f"{way} mAP {s[-1]['map']:.4f}" for way, s in scores.items())
        print(line, flush=True)
    print(f"blocks of {args.block_size} against one block: {np.mean(identical):.4f} of the nuclei identical (IoU >= 0.9), mean over the offsets")
    for way, found_scores in scores.items() if not args.no_window else ():
        mean = {key: float(np.mean([f[key] for f in found_scores])) for key in ("map", "ap50", "ap75")}
        print(f"{way}, against one window, mean over the offsets: mAP@[.5:.95] {mean['map']:.4f}  AP@0.5 {mean['ap50']:.4f}  AP@0.75 {mean['ap75']:.4f}")


def identical_share(reference: np.ndarray, other: np.ndarray, threshold: float = 0.9) -> float:
    """Share of ``reference``'s nuclei that ``other`` has with IoU >= ``threshold`` (``(H, W)``
    label images; sparse pair counts, so that 100k nuclei need no dense IoU matrix)."""
    both = (reference > 0) & (other > 0)
    pairs, overlap = np.unique(reference[both].astype(np.uint64) << np.uint64(32) | other[both].astype(np.uint64), return_counts=True)
    ref_ids, other_ids = (pairs >> np.uint64(32)).astype(np.int64), (pairs & np.uint64(0xFFFFFFFF)).astype(np.int64)
    ref_area = np.bincount(reference.ravel().astype(np.int64))
    other_area = np.bincount(other.ravel().astype(np.int64))
    iou = overlap / (ref_area[ref_ids] + other_area[other_ids] - overlap)
    n_reference = int(np.count_nonzero(ref_area[1:]))
    return float(np.unique(ref_ids[iou >= threshold]).size / max(n_reference, 1))

def segment_labels(image: np.ndarray, model, block_size: int, instances_on: str = "cpu") -> np.ndarray:
    """``run_segment_job`` of one image on the CPU: its ``(H, W)`` labels."""
    import tifffile
    import zarr

    from nucleibatch.segment.job import run_segment_job
    from nucleibatch.segment.settings import SegmentSettings

    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "in").mkdir()
        tifffile.imwrite(Path(work) / "in" / "mosaic.tif", image, tile=(256, 256))
        run_segment_job([str(Path(work) / "in")], Path(work) / "out", model=model, device="cpu", settings=SegmentSettings(block_size=block_size, instances_on=instances_on), progress=False)
        root = zarr.open_group(str(OutputFolder(Path(work) / "out").masks), mode="r")
        (name,) = list(root.group_keys())
        return np.asarray(root[label_path(0, name)])


if __name__ == "__main__":
    main()
