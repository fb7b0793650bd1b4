"""Fine-tuning the default model on 20 images of a visually distinct group, against training from scratch.

    .venv/bin/python benchmarks/finetune.py [--data DIR] [--out runs/finetune_benchmark]
        [--train-images 20] [--epochs 8] [--patches-per-epoch 96] [--patch-size 256] [--seed 0]
        [--freeze-encoder-epochs 0 2] [--finetune-lr 1e-3]

The group: the colour images of DSB 2018 stage1_train (stained tissue, H&E-like), picked by
a rule anyone can rerun: an image belongs to it when the mean over its pixels of
|R - G| + |G - B| (8-bit values) exceeds 5. Grey fluorescence (and grey brightfield) images,
stored as RGB with equal channels, score 0; the colour ones score 15 to 183 here.

``--train-images`` of the group (drawn with ``--seed`` from those the default model was trained
on, so that the few group images the default model never saw stay in validation) are the
fine-tuning data; the rest of the group is validation. All of the training images are trained
on (``--val-fraction 0``: no checkpoint picking or threshold tuning on held-out images, so the
validation images are touched only by the final evaluation). Three models are scored on the
validation images with the DSB metric (``nucleibatch.evaluate.evaluate_model``, the inference of
``segment``):

    (a) the default model as is,
    (b) ``nucleibatch train --init default`` on the training images (learning rate 2e-4), once per
        ``--freeze-encoder-epochs`` value (the encoder frozen for the first N epochs), and once
        per ``--finetune-lr`` value (another peak learning rate, no freezing),
    (c) ``nucleibatch train`` from scratch on the same images, same epochs and patches (2e-3).

The default model saw most of the group in its own training (all but the images in its
``val_image_ids``), so the table also gives the mAP on the validation images it never saw.
Each training run is the real command in a subprocess (1 Ray Train worker); its wall time
includes starting Ray, reading the images and exporting the bundle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "dsb2018" / "stage1_train"
COLOUR_SPREAD = 5.0  # mean |R - G| + |G - B| above which an image is a colour (stained) one


def colour_spread(path: Path) -> float:
    """Mean over pixels of |R - G| + |G - B| of an image file (8-bit values); 0 for grey images."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    return float(np.abs(rgb[..., 0] - rgb[..., 1]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean())


def colour_group(data: Path) -> list[str]:
    """Ids (sorted) of the DSB-layout images in ``data`` whose colour spread exceeds COLOUR_SPREAD."""
    return sorted(d.name for d in data.iterdir() if (d / "images" / f"{d.name}.png").is_file() and colour_spread(d / "images" / f"{d.name}.png") > COLOUR_SPREAD)


def split(group: list[str], n_train: int, seed: int, unseen_by_default: set[str]) -> tuple[list[str], list[str]]:
    """``n_train`` ids drawn with ``seed`` from the group images the default model trained on; the rest validate."""
    candidates = [i for i in group if i not in unseen_by_default]
    rng = np.random.default_rng(seed)
    train = sorted(candidates[k] for k in rng.choice(len(candidates), size=n_train, replace=False))
    return train, [i for i in group if i not in set(train)]


def link_folder(data: Path, ids: list[str], folder: Path) -> Path:
    """A DSB-layout folder of ``ids`` (the training DATA of the runs), made of symbolic links to
    their files (discovery does not follow links to folders)."""
    shutil.rmtree(folder, ignore_errors=True)
    from nucleibatch.annotated import link_dsb_sample

    folder.mkdir(parents=True)
    for image_id in ids:
        link_dsb_sample(data / image_id, folder)
    return folder


def train(command: list[str]) -> float:
    """Run ``nucleibatch train ...`` (printing its command line); returns its wall seconds."""
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stdout[-5000:])
        raise SystemExit(f"training failed with exit status {result.returncode}")
    return seconds


def scores(model, data: Path, val_ids: list[str], unseen: set[str]) -> dict[str, float]:
    from nucleibatch.evaluate import evaluate_model

    summary, rows = evaluate_model(model, [data], image_ids=val_ids)
    unseen_rows = [r for r in rows if r["image_id"] in unseen]
    return {
        "map": summary["map"],
        "ap50": summary["ap50"],
        "n": summary["n_images"],
        "map_unseen": float(np.mean([r["map"] for r in unseen_rows])) if unseen_rows else float("nan"),
        "n_unseen": len(unseen_rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune_benchmark")
    parser.add_argument("--train-images", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--patches-per-epoch", type=int, default=96, help="a multiple of --batch-size (whole batches only)")
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--freeze-encoder-epochs", type=int, nargs="+", default=[0, 2], help="one fine-tuning run (b) per value")
    parser.add_argument("--finetune-lr", type=float, nargs="*", default=[1e-3], help="one more fine-tuning run (b) per value")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    import nucleibatch
    from nucleibatch.model import load_model

    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at the start, "
        f"torch {torch.__version__}, CUDA GPU: {torch.cuda.is_available()}, nucleibatch {nucleibatch.__version__}",
        flush=True,
    )
    default = load_model("default")
    unseen_by_default = set(default.config.training["val_image_ids"])
    group = colour_group(args.data)
    train_ids, val_ids = split(group, args.train_images, args.seed, unseen_by_default)
    unseen = {i for i in val_ids if i in unseen_by_default}
    print(
        f"group: {len(group)} colour images of {sum(1 for _ in args.data.iterdir())} (mean |R-G|+|G-B| > {COLOUR_SPREAD:g}); "
        f"training {len(train_ids)}, validation {len(val_ids)} ({len(unseen)} of them never seen by the default model)",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "split.json").write_text(json.dumps({"train": train_ids, "val": val_ids, "val_unseen_by_default": sorted(unseen)}, indent=2) + "\n")
    train_data = link_folder(args.data, train_ids, args.out / "train_data")

    exe = str(Path(sys.executable).with_name("nucleibatch"))
    common = [
        "--workers", "1", "--epochs", str(args.epochs), "--patches-per-epoch", str(args.patches_per_epoch),
        "--patch-size", str(args.patch_size), "--batch-size", str(args.batch_size), "--val-fraction", "0",
        "--seed", str(args.seed), "--overwrite",
    ]  # fmt: skip
    runs = [("(a) default model as is", None, None)]
    for n in args.freeze_encoder_epochs:
        title = "(b) fine-tuned from default" + (f", encoder frozen {n} epochs" if n else "")
        runs.append((title, f"finetune_freeze{n}", ["--init", "default", "--freeze-encoder-epochs", str(n)]))
    for lr in args.finetune_lr:
        runs.append((f"(b) fine-tuned from default, lr {lr:g}", f"finetune_lr{lr:g}", ["--init", "default", "--lr", f"{lr:g}"]))
    runs.append(("(c) from scratch", "scratch", []))
    table = []
    for title, name, extra in runs:
        if name is None:
            model, seconds, lr, settings = default, None, None, default.config.postprocess
        else:
            run_dir = args.out / name
            seconds = train([exe, "train", str(train_data), "-o", str(run_dir), *common, *extra])
            model = load_model(run_dir / "bundle")
            lr, settings = model.config.training["learning_rate"], model.config.postprocess
        result = scores(model, args.data, val_ids, unseen)
        table.append((title, seconds, lr, result))
        print(f"{title}: mAP {result['map']:.4f} on {result['n']} images ({result['map_unseen']:.4f} on the {result['n_unseen']} unseen); post-processing {settings}", flush=True)

    print()
    print(f"| model | training images | epochs x patches ({args.patch_size} px) | peak lr | training wall time | val mAP@[.5:.95] ({len(val_ids)} images) | val AP@0.5 | mAP, {len(unseen)} images the default never saw |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for title, seconds, lr, result in table:
        budget = "-" if seconds is None else f"{args.epochs} x {args.patches_per_epoch}"
        wall = "-" if seconds is None else f"{seconds:.0f} s"
        images = "-" if seconds is None else str(len(train_ids))
        print(
            f"| {title} | {images} | {budget} | {'-' if lr is None else f'{lr:g}'} | {wall} | "
            f"{result['map']:.3f} | {result['ap50']:.3f} | {result['map_unseen']:.3f} |"
        )
    print(f"\nwhole benchmark: {time.perf_counter() - started:.0f} s wall; bundles under {args.out}")


if __name__ == "__main__":
    main()
