"""The data of docs/performance.md's tissue figures, made from ../shared/data:

    python benchmarks/tissue_sets.py OUT [--shared ../shared/data]

writes under OUT:

- ``dsb_stained/``: the DSB 2018 images the modality rule calls ``stained`` (their folders, made of symlinks to their files);
- ``he_val.txt``: the `he` model's validation images: 6 MoNuSeg tiles (one per organ group) and
  the stained DSB images of the default model's validation split;
- ``mon_val_40x/``, ``mon_val_20x/``: the 6 validation tiles as OME-TIFF (images/ + labels/) at
  0.25 um/px, and at 20x (2 x 2 box average, labels by nearest neighbour) at 0.5 um/px;
- ``dsb_val_1x/``, ``dsb_val_2x/``: the default model's 54 validation images (images/ + labels/),
  as they are and upscaled 2x (bilinear; labels nearest).

It prints how many images each holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from nucleibatch.annotated import discover_annotated, iter_annotated, link_dsb_sample
from nucleibatch.io.readers import read_image_file
from nucleibatch.modality import classify_modality
from nucleibatch.model import DEFAULT_BUNDLE

HE_VALIDATION_TILES = [
    "TCGA-21-5786-01Z-00-DX1",  # liver
    "TCGA-AR-A1AS-01Z-00-DX1",  # breast
    "TCGA-B0-5710-01Z-00-DX1",  # kidney
    "TCGA-G9-6348-01Z-00-DX1",  # prostate
    "TCGA-DK-A2I6-01A-01-TS1",  # bladder
    "TCGA-NH-A8F7-01A-01-TS1",  # colon
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    dsb, monuseg = args.shared / "dsb2018" / "stage1_train", args.shared / "monuseg2018_train"
    default_val = set(json.loads((DEFAULT_BUNDLE / "config.json").read_text())["training"]["val_image_ids"])
    args.out.mkdir(parents=True, exist_ok=True)

    stained = [s for s in discover_annotated([dsb]) if classify_modality(read_image_file(s.image_path)).kind == "stained"]
    (args.out / "dsb_stained").mkdir(exist_ok=True)
    for source in stained:  # links to files: discovery does not follow links to folders
        link_dsb_sample(source.image_path.parents[1], args.out / "dsb_stained")
    dsb_val = sorted(s.image_id for s in stained if s.image_id in default_val)
    (args.out / "he_val.txt").write_text(
        "# MoNuSeg validation tiles (one per organ group)\n" + "\n".join(HE_VALIDATION_TILES)
        + "\n# DSB stained images of the default model's validation split\n" + "\n".join(dsb_val) + "\n"
    )  # fmt: skip
    print(f"dsb_stained: {len(stained)} images; he_val.txt: {len(HE_VALIDATION_TILES)} tiles + {len(dsb_val)} DSB images")

    tiles = [s for s in discover_annotated([monuseg]) if s.image_id in HE_VALIDATION_TILES]
    for name, factor, pixel_size in (("mon_val_40x", 1, 0.25), ("mon_val_20x", 2, 0.5)):
        folder = args.out / name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "labels").mkdir(exist_ok=True)
        for annotated in iter_annotated(tiles):
            image, labels = annotated.image[..., :3], annotated.labels.astype(np.uint16)
            if factor != 1:
                height, width = image.shape[0] // factor, image.shape[1] // factor
                image = np.asarray(Image.fromarray(image).resize((width, height), Image.BOX))
                labels = labels[factor // 2 :: factor, factor // 2 :: factor][:height, :width]
            metadata = {"axes": "YXS", "PhysicalSizeX": pixel_size, "PhysicalSizeY": pixel_size}
            tifffile.imwrite(folder / "images" / f"{annotated.image_id}.ome.tif", image, photometric="rgb", metadata=metadata)
            tifffile.imwrite(folder / "labels" / f"{annotated.image_id}.ome.tif", labels, metadata=None)
        print(f"{name}: {len(tiles)} tiles at {pixel_size} um/px")

    validation = [s for s in discover_annotated([dsb]) if s.image_id in default_val]
    for name, factor in (("dsb_val_1x", 1), ("dsb_val_2x", 2)):
        folder = args.out / name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "labels").mkdir(exist_ok=True)
        for annotated in iter_annotated(validation):
            image, labels = Image.fromarray(annotated.image), Image.fromarray(annotated.labels.astype(np.uint16))
            if factor != 1:
                image = image.resize((image.width * factor, image.height * factor), Image.BILINEAR)
                labels = labels.resize((labels.width * factor, labels.height * factor), Image.NEAREST)
            image.save(folder / "images" / f"{annotated.image_id}.png")
            labels.save(folder / "labels" / f"{annotated.image_id}.png")
        print(f"{name}: {len(validation)} images")


if __name__ == "__main__":
    main()
