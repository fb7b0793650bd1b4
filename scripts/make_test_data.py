"""Generate the small annotated test data committed in tests/data (the fixtures small_dsb_root and
small_monuseg_root), in the on-disk formats of the real sets in ../shared/data:

    python scripts/make_test_data.py            # rewrites tests/data/dsb and tests/data/monuseg
    python scripts/make_test_data.py --out DIR  # writes them under DIR (tests/test_small_data.py)

* ``dsb/<id>/images/<id>.png``: an RGBA PNG (grey stored as RGB, alpha 255), and
  ``dsb/<id>/masks/<k>.png``: one 0/255 PNG per nucleus, as DSB 2018 stage1_train. 6 fluorescence
  fields (4 of 256 x 256, 2 of 256 x 320): enough for ``train --limit-images 6``.
* ``monuseg/images/<id>.png``: an RGB PNG of H&E-like tissue, and ``monuseg/labels/<id>.png``:
  uint16 instance labels, as MoNuSeg 2018. 3 tiles (the first 400 x 480, the others 288 x 288):
  a window of 256 x 256 at (100, 200) fits the first; ``he_crops`` takes 256 px of each.

Deterministic: the nuclei (ellipses, some touching) come from :func:`nucleibatch.synthetic.synthetic_nuclei`
with fixed seeds, the pixels are drawn here with fixed seeds: smooth textures, no pixel noise
(so that the PNGs stay small: the whole set is about 360 KB). The tissue is made by the Beer-Lambert law from
the haematoxylin and eosin stain vectors that colour deconvolution assumes (Ruifrok & Johnston).
Generated data, no third-party pixels: CC0, like the code.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from nucleibatch.synthetic import synthetic_nuclei

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "data"
# (id, (height, width), seed); sorted by id, the order discovery gives
DSB_FIELDS = [
    ("fluo-01", (256, 256), 11),
    ("fluo-02", (256, 256), 12),
    ("fluo-03", (256, 256), 13),
    ("fluo-04", (256, 320), 14),
    ("fluo-05", (256, 256), 15),
    ("fluo-06", (256, 320), 16),
]
MONUSEG_TILES = [
    ("tissue-01", (400, 480), 21),
    ("tissue-02", (288, 288), 22),
    ("tissue-03", (288, 288), 23),
]
# optical density per unit of stain, R G B (Ruifrok & Johnston 2001, as scikit-image's rgb2hed)
HAEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29])
EOSIN_OD = np.array([0.07, 0.99, 0.11])


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian noise blurred by ``sigma`` px, scaled to [-1, 1]: ``(H, W)`` float64."""
    field = ndi.gaussian_filter(rng.normal(0, 1, shape), sigma)
    return field / (np.abs(field).max() + 1e-12)


def fluorescence_field(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey fluorescence field ``(H, W)`` uint8 (bright nuclei on a dark, slowly varying
    background) and its uint32 labels ``(H, W)``."""
    _, labels = synthetic_nuclei(shape, n_nuclei=30, radius=(6.0, 13.0), seed=seed)
    rng = np.random.default_rng(seed)
    brightness = rng.uniform(0.45, 0.95, int(labels.max()) + 1)
    brightness[0] = 0.0
    signal = ndi.gaussian_filter(brightness[labels] * (0.9 + 0.1 * smooth_noise(rng, shape, 2.0)), 1.0)
    background = 0.06 + 0.03 * smooth_noise(rng, shape, max(shape) / 6)
    image = background + signal
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), labels


def he_tile(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like RGB tile ``(H, W, 3)`` uint8 (purple nuclei in pink tissue) and its uint32
    labels ``(H, W)``."""
    _, labels = synthetic_nuclei(shape, n_nuclei=int(shape[0] * shape[1] / 2500), radius=(7.0, 14.0), seed=seed)
    rng = np.random.default_rng(seed)
    amount = rng.uniform(0.7, 1.3, int(labels.max()) + 1)
    amount[0] = 0.0
    haematoxylin = 0.08 + ndi.gaussian_filter(amount[labels] * (0.85 + 0.15 * smooth_noise(rng, shape, 1.5)), 1.0)
    eosin = 0.35 + 0.25 * smooth_noise(rng, shape, 12.0)  # uneven, as real tissue: stain jitter shows
    density = haematoxylin[..., None] * HAEMATOXYLIN_OD + eosin[..., None] * EOSIN_OD
    rgb = 255 * np.exp(-density)
    return np.clip(rgb, 0, 255).round().astype(np.uint8), labels


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, optimize=True)


def write_dsb(root: Path) -> None:
    """The DSB layout: one folder per image with images/<id>.png and one mask PNG per nucleus."""
    for image_id, shape, seed in DSB_FIELDS:
        grey, labels = fluorescence_field(shape, seed)
        rgba = np.dstack([grey, grey, grey, np.full(shape, 255, np.uint8)])
        write_png(root / image_id / "images" / f"{image_id}.png", rgba)
        for value in range(1, int(labels.max()) + 1):
            write_png(root / image_id / "masks" / f"nucleus-{value:03d}.png", np.where(labels == value, 255, 0).astype(np.uint8))


def write_monuseg(root: Path) -> None:
    """The MoNuSeg layout: images/<id>.png (RGB) beside labels/<id>.png (uint16 labels)."""
    for image_id, shape, seed in MONUSEG_TILES:
        rgb, labels = he_tile(shape, seed)
        write_png(root / "images" / f"{image_id}.png", rgb)
        write_png(root / "labels" / f"{image_id}.png", labels.astype(np.uint16))


def make_test_data(out: Path) -> list[Path]:
    """(Re)write ``out/dsb`` and ``out/monuseg``; returns every file written, sorted."""
    for name, write in (("dsb", write_dsb), ("monuseg", write_monuseg)):
        shutil.rmtree(out / name, ignore_errors=True)
        write(out / name)
    return sorted(p for name in ("dsb", "monuseg") for p in (out / name).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where dsb/ and monuseg/ go (default {DEFAULT_OUT})")
    arguments = parser.parse_args(argv)
    written = make_test_data(arguments.out)
    size = sum(p.stat().st_size for p in written)
    print(f"{len(written)} files, {size / 1024:.0f} KiB, in {arguments.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
