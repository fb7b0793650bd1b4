"""Comparing two segment outputs (engine equivalence): labels bit for bit, tables row for row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import zarr


def assert_same_outputs(a: Path, b: Path) -> pd.DataFrame:
    """Assert OUT folders ``a`` and ``b`` hold identical labels, images and nuclei tables
    (apart from timings and the failure messages' wording of workers). Returns a's images table."""
    images_a = pd.read_parquet(a / "images.parquet").sort_values("image_id").reset_index(drop=True)
    images_b = pd.read_parquet(b / "images.parquet").sort_values("image_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(images_a.drop(columns=["seconds"]), images_b.drop(columns=["seconds"]))
    nuclei_a = pd.read_parquet(a / "nuclei.parquet").sort_values(["image_id", "label"]).reset_index(drop=True)
    nuclei_b = pd.read_parquet(b / "nuclei.parquet").sort_values(["image_id", "label"]).reset_index(drop=True)
    assert not nuclei_a.duplicated(["image_id", "label"]).any() and not nuclei_b.duplicated(["image_id", "label"]).any()
    pd.testing.assert_frame_equal(nuclei_a, nuclei_b)
    root_a, root_b = zarr.open_group(str(a / "masks.zarr"), mode="r"), zarr.open_group(str(b / "masks.zarr"), mode="r")
    for row in images_a.itertuples():
        if row.status != "ok":
            continue
        for path in ("labels/nuclei/0", "0", "labels/nuclei/1" if "1" in root_a[row.store_path] else "0"):
            np.testing.assert_array_equal(root_a[row.store_path][path][:], root_b[row.store_path][path][:], err_msg=f"{row.image_id} {path}")
    assert sorted(root_a.group_keys()) == sorted(root_b.group_keys())
    return images_a
