"""Reading and comparing OUT folders that `nucleibatch segment` wrote (names from OutputFolder)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from nucleibatch.io.location import Location, to_location
from nucleibatch.output.folder import OutputFolder, label_path
from nucleibatch.output.layout import OME_GROUP
from nucleibatch.output.store import open_root
from tests.helpers.paths import DEMO

# the two demo images of demo_segment_out (tests/conftest.py)
DEMO_OUT_IDS = (
    "00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552",  # 256 x 256 fluorescence
    "00ae65c1c6631ae6f2be1a449902976e6eb8483bf6b0740d00530220832c6d3e",  # 256 x 320 tissue
)
DEMO_OUT_FAILED = "broken"  # the empty PNG beside them


def write_demo_segment_out(root: Path) -> Path:
    """Segment (shipped model, CPU) the DEMO_OUT_IDS images, as DSB folders under ``root/in/dsb``,
    and an empty PNG ``root/in/loose/broken.png`` that fails; returns the OUT ``root/out``."""
    from nucleibatch.segment.job import run_segment_job

    for image_id in DEMO_OUT_IDS:
        shutil.copytree(DEMO / image_id / "images", root / "in" / "dsb" / image_id / "images")
    (root / "in" / "loose").mkdir(parents=True)
    (root / "in" / "loose" / f"{DEMO_OUT_FAILED}.png").write_bytes(b"")
    summary = run_segment_job([str(root / "in" / "dsb"), str(root / "in" / "loose")], root / "out", model="default", device="cpu", progress=False)
    assert (summary.n_ok, summary.n_failed) == (2, 1)
    return root / "out"


def image_groups(root) -> list[str]:
    """The groups at the root of a masks store that are images (flat names: not the OME group of
    the root's bioformats2raw layout, which lists them)."""
    return [name for name in root.group_keys() if name != OME_GROUP]


def labels_of(out: Location | str, image_id: str) -> np.ndarray:
    """The full-resolution labels ``(H, W)`` (unsigned integers) of ``image_id`` in OUT."""
    images = pd.read_parquet(str(OutputFolder(out).images)).set_index("image_id")
    return open_root(OutputFolder(out).masks, mode="r")[label_path(0, images.loc[image_id, "store_path"])][...]


def assert_same_masks_and_tables(a: Location | str, b: Location | str, ignore: tuple[str, ...] = ()) -> pd.DataFrame:
    """Assert OUT folders or store URLs ``a`` and ``b`` hold identical masks (each ok image's
    labels and stored image at level 0, and its labels at level 1 where it has one; the same
    groups at the root) and tables (images, apart from timings and the columns in ``ignore``;
    nuclei). Returns a's images table."""
    a, b = to_location(a), to_location(b)
    images_a = pd.read_parquet(str(OutputFolder(a).images)).sort_values("image_id").reset_index(drop=True)
    images_b = pd.read_parquet(str(OutputFolder(b).images)).sort_values("image_id").reset_index(drop=True)
    dropped = ["seconds", *ignore]
    pd.testing.assert_frame_equal(images_a.drop(columns=dropped), images_b.drop(columns=dropped))
    nuclei_a = pd.read_parquet(str(OutputFolder(a).nuclei)).sort_values(["image_id", "label"]).reset_index(drop=True)
    nuclei_b = pd.read_parquet(str(OutputFolder(b).nuclei)).sort_values(["image_id", "label"]).reset_index(drop=True)
    assert not nuclei_a.duplicated(["image_id", "label"]).any() and not nuclei_b.duplicated(["image_id", "label"]).any()
    pd.testing.assert_frame_equal(nuclei_a, nuclei_b)
    root_a, root_b = open_root(OutputFolder(a).masks, mode="r"), open_root(OutputFolder(b).masks, mode="r")
    for row in images_a.itertuples():
        if row.status != "ok":
            continue
        for path in (label_path(0), "0", label_path(1) if "1" in root_a[row.store_path] else "0"):
            np.testing.assert_array_equal(root_a[row.store_path][path][:], root_b[row.store_path][path][:], err_msg=f"{row.image_id} {path}")
    assert sorted(root_a.group_keys()) == sorted(root_b.group_keys())  # the image groups and the root layout's OME group
    return images_a
