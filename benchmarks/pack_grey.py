"""Pack annotated DSB-layout data small enough to send to a lent GPU machine (benchmarks/gpu.sh).

    .venv/bin/python benchmarks/pack_grey.py ../shared/data/dsb2018/stage1_train .gpu/dsb_grey

Each image is reduced to grey exactly as inference reduces it (``nucleibatch.normalize.to_grey``:
the mean of R, G, B), rounded to uint8 (at most 1/3 of a grey level off), and its masks are
merged into one uint16 instance-label PNG: ``images/ID.png`` + ``labels/ID.png``, a layout
`nucleibatch train` reads. Stage1_train: 152 MB -> 31 MB, same ids (so the same split).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from nucleibatch.annotated import discover_annotated, iter_annotated
from nucleibatch.normalize import to_grey


def main(source: str, target: str) -> int:
    out = Path(target)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    count, worst = 0, 0.0
    for annotated in iter_annotated(discover_annotated([source])):
        grey = to_grey(annotated.image)
        rounded = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        worst = max(worst, float(np.abs(rounded - grey).max()))
        if annotated.labels.max() >= 2**16:
            raise SystemExit(f"{annotated.image_id}: more than 65535 nuclei do not fit a uint16 label PNG")
        Image.fromarray(rounded).save(out / "images" / f"{annotated.image_id}.png", optimize=True)
        Image.fromarray(annotated.labels.astype(np.uint16)).save(out / "labels" / f"{annotated.image_id}.png", optimize=True)
        count += 1
    print(f"{count} images packed into {out}; largest rounding of a grey value: {worst:.3f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
