"""Do block seams change the result? One image segmented in small blocks against the same image as one block.

    .venv/bin/python benchmarks/seams.py [--fields 8] [--block-size 512] [--model default]

The image is a mosaic of ``fields x fields`` DSB 2018 stage1_train fluorescence fields of
256 x 256 (../shared/data, in id order, grey). It is segmented by ``run_segment_job`` twice on
the CPU: with ``--block-size`` (several blocks, seams between them) and with one block covering
it. Printed: the nuclei found each way and the DSB metric of the blocked labels against the
one-block labels (mAP@[.5:.95], AP@0.5, AP@0.75; 1.0 means seams changed nothing).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from nucleibatch.allocator import tune_allocator

tune_allocator()

import numpy as np  # noqa: E402

DSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018" / "stage1_train"


def dsb_mosaic(fields: int, source: Path = DSB) -> np.ndarray:
    """``(fields * 256, fields * 256)`` uint8: dark-background 256² DSB fields in id order, grey."""
    from PIL import Image

    tiles = []
    for png in sorted(source.glob("*/images/*.png")):
        grey = np.asarray(Image.open(png))[..., :3].mean(axis=-1)
        if grey.shape == (256, 256) and grey.mean() < 100:
            tiles.append(grey.astype(np.uint8))
        if len(tiles) == fields * fields:
            break
    if len(tiles) < fields * fields:
        raise SystemExit(f"only {len(tiles)} 256 x 256 fluorescence fields under {source}; ask for fewer --fields")
    return np.concatenate([np.concatenate(tiles[row * fields : (row + 1) * fields], axis=1) for row in range(fields)], axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fields", type=int, default=8, help="the mosaic is fields x fields DSB fields of 256² [8]")
    parser.add_argument("--block-size", type=int, default=512, help="block size of the blocked run [512]")
    parser.add_argument("--model", default="default")
    parser.add_argument("--dsb", type=Path, default=DSB)
    args = parser.parse_args()

    import tifffile
    import zarr

    from nucleibatch.metrics import image_scores
    from nucleibatch.pipeline import SegmentSettings
    from nucleibatch.segment import run_segment_job

    mosaic = dsb_mosaic(args.fields, args.dsb)
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs; mosaic {mosaic.shape[0]} x {mosaic.shape[1]} of {args.fields ** 2} DSB fields")
    labels = {}
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "in").mkdir()
        tifffile.imwrite(Path(work) / "in" / "mosaic.tif", mosaic, tile=(256, 256))
        for block_size in (max(mosaic.shape) // 32 * 32 + 32, args.block_size):
            out = Path(work) / f"out{block_size}"
            run_segment_job([str(Path(work) / "in")], out, model=args.model, device="cpu", settings=SegmentSettings(block_size=block_size), progress=False)
            root = zarr.open_group(str(out / "masks.zarr"), mode="r")
            (name,) = list(root.group_keys())
            labels[block_size] = np.asarray(root[f"{name}/labels/nuclei/0"])
    (one, one_labels), (blocked, blocked_labels) = labels.items()
    scores = image_scores(one_labels, blocked_labels)
    print(f"one block ({one}²): {int(scores['n_true'])} nuclei; blocks of {blocked}²: {int(scores['n_pred'])} nuclei")
    print(f"blocked against one block: mAP@[.5:.95] {scores['map']:.4f}  AP@0.5 {scores['ap50']:.4f}  AP@0.75 {scores['ap75']:.4f}")


if __name__ == "__main__":
    main()
