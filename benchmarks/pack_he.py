"""Pack the `he` model's training data small enough to travel to a lent GPU machine:

    python benchmarks/pack_he.py OUT [--shared ../shared/data] [--quality 90]

The device call sends the working tree, 64 MiB in all, and the repository alone is about 53 MB
(two bundles): the H&E tiles (52 MB as PNG) cannot travel as they are. OUT gets, in the
images/ + labels/ layout that `nucleibatch train` reads:

- ``monuseg/``: the 30 MoNuSeg tiles, images as JPEG of ``--quality`` (whole-slide scans are
  JPEG-compressed themselves, at lower quality), labels as 16-bit PNG, unchanged;
- ``dsb_stained/``: the DSB images the modality rule calls ``stained`` (as
  benchmarks/tissue_sets.py picks them), images as PNG, their per-nucleus masks as one label PNG;
- ``val.txt``: the validation ids of docs/performance.md (6 tiles, the stained DSB images of
  the default model's validation split).

Then, with OUT inside the repository and ignored by git (``echo /he_pack/ >> .git/info/exclude``),
and the `he` bundle moved out of the tree for the call (it is not needed to train):
``bash benchmarks/gpu.sh train-he $OUT_DIR .whl he_pack`` (see that script). It prints the sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tissue_sets import HE_VALIDATION_TILES  # noqa: E402

from nucleibatch.annotated import discover_annotated, load_annotated  # noqa: E402
from nucleibatch.io.readers import read_image_file  # noqa: E402
from nucleibatch.modality import classify_modality  # noqa: E402
from nucleibatch.model import DEFAULT_BUNDLE  # noqa: E402


def save_labels(labels: np.ndarray, path: Path) -> None:
    if labels.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"{path}: more than 65535 nuclei")
    Image.fromarray(labels.astype(np.uint16)).save(path, optimize=True)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (4:4:4) of the MoNuSeg tiles [90]")
    args = parser.parse_args()
    dsb, monuseg = args.shared / "dsb2018" / "stage1_train", args.shared / "monuseg2018_train"
    for sub in ("monuseg/images", "monuseg/labels", "dsb_stained/images", "dsb_stained/labels"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)

    for source in discover_annotated([monuseg]):
        rgb = read_image_file(source.image_path)[..., :3]
        Image.fromarray(np.ascontiguousarray(rgb)).save(args.out / "monuseg" / "images" / f"{source.image_id}.jpg", quality=args.quality, subsampling=0)
        save_labels(load_annotated(source).labels, args.out / "monuseg" / "labels" / f"{source.image_id}.png")

    default_val = set(json.loads((DEFAULT_BUNDLE / "config.json").read_text())["training"]["val_image_ids"])
    stained = []
    for source in discover_annotated([dsb]):
        image = read_image_file(source.image_path)
        if classify_modality(image).kind != "stained":
            continue
        stained.append(source.image_id)
        Image.fromarray(np.ascontiguousarray(image)).save(args.out / "dsb_stained" / "images" / f"{source.image_id}.png", optimize=True)
        save_labels(load_annotated(source).labels, args.out / "dsb_stained" / "labels" / f"{source.image_id}.png")
    validation = HE_VALIDATION_TILES + sorted(i for i in stained if i in default_val)
    (args.out / "val.txt").write_text("".join(f"{i}\n" for i in validation))
    for name in ("monuseg", "dsb_stained"):
        print(f"{name}: {len(list((args.out / name / 'images').iterdir()))} images, {folder_bytes(args.out / name) / 2**20:.1f} MiB")
    print(f"val.txt: {len(validation)} images; all: {folder_bytes(args.out) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
