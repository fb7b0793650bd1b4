"""INPUT and OUT as object-store URLs (s3://), against moto's S3 server on 127.0.0.1.

The same archive read from the store and written to the store gives exactly the outputs of
local folders, on the local and the Dask engine; a re-run resumes from the store; the run lock
is a lease object that blocks a second live run but not a dead run's stale lease.
"""

from __future__ import annotations

import json
import time

import fsspec
import numpy as np
import pandas as pd
import pytest

from nucleibatch.cli import main
from nucleibatch.errors import OutputError
from nucleibatch.io.location import to_location
from nucleibatch.output.folder import IMAGES, LOCK, REPORT, RUN, STATE_DIR, OutputFolder
from nucleibatch.output.lock import Lock
from nucleibatch.segment.job import run_segment_job
from nucleibatch.segment.settings import SegmentSettings
from nucleibatch.synthetic import threshold_model
from tests.helpers import input_files as files
from tests.helpers.objectstore import new_bucket, s3_server, upload_folder
from tests.helpers.outputs import assert_same_masks_and_tables

SETTINGS = SegmentSettings(block_size=256, block_margin=64)
DIFFERS_BY_PLACE = ("source", "error")  # they name the file: a local path vs an s3:// URL


@pytest.fixture(scope="module")
def store():
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def bucket_archive(store, tmp_path_factory):
    """The small archive (DSB PNGs, a tiled TIFF, a text file named .tif, an OME-Zarr plate) as
    local folders and uploaded to a bucket, with the local engine's outputs of the local copy."""
    root = tmp_path_factory.mktemp("archive")
    ids = files.write_small_archive(root / "in")
    rng = np.random.default_rng(3)
    files.write_ome_zarr(root / "in" / "stores" / "well.zarr", (rng.random((2, 300, 280)) * 200).astype(np.uint8), axes="cyx")
    bucket = new_bucket()
    upload_folder(root / "in", f"{bucket}/in")
    model = threshold_model()
    summary = run_segment_job([str(root / "in")], root / "local", model=model, settings=SETTINGS, progress=False)
    assert summary.n_images == len(ids) + 1 and summary.n_failed == 1 and summary.n_nuclei > 50
    return {"root": root, "bucket": bucket, "model": model, "n_images": summary.n_images}


def test_an_archive_in_a_bucket_segments_into_a_bucket_like_local_folders(bucket_archive):
    out = f"{bucket_archive['bucket']}/runs/one"
    summary = run_segment_job([f"{bucket_archive['bucket']}/in"], out, model=bucket_archive["model"], settings=SETTINGS, progress=False)
    assert summary.exit_code == 3 and summary.n_images == bucket_archive["n_images"] and summary.n_failed == 1
    images = assert_same_masks_and_tables(bucket_archive["root"] / "local", out, ignore=DIFFERS_BY_PLACE)
    assert "stores/well" in set(images.image_id) and "slides/mosaic" in set(images.image_id)
    from_store = pd.read_parquet(f"{out}/{IMAGES}").set_index("image_id")
    assert all(source.startswith(f"{bucket_archive['bucket']}/in/") for source in from_store.source)
    assert "TIFF" in from_store.loc["slides/notes", "error"]
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    run = json.loads(fs.cat(f"{out}/{RUN}"))
    assert run["counts"]["ok"] == bucket_archive["n_images"] - 1 and run["inputs"] == [f"{bucket_archive['bucket']}/in"]
    assert not fs.exists(f"{out}/{STATE_DIR}/{LOCK}"), "the run's lease outlived it"
    report = fs.cat(f"{out}/{REPORT}").decode()
    assert "Nuclei segmentation report" in report and "slides/notes" in report  # drawn from the bucket, failure listed
    assert not [p for p in fs.find(out) if ".tmp-" in p or p.endswith(".partial")]

    again = run_segment_job([f"{bucket_archive['bucket']}/in"], out, model=bucket_archive["model"], settings=SETTINGS, progress=False)
    assert again.n_resumed == bucket_archive["n_images"] and again.n_nuclei == summary.n_nuclei

    redone = run_segment_job([f"{bucket_archive['bucket']}/in"], out, model=bucket_archive["model"], settings=SETTINGS, overwrite=True, progress=False)
    assert redone.n_resumed == 0 and redone.n_nuclei == summary.n_nuclei
    assert_same_masks_and_tables(bucket_archive["root"] / "local", out, ignore=DIFFERS_BY_PLACE)


def test_dask_workers_read_and_write_the_bucket(bucket_archive):
    out = f"{bucket_archive['bucket']}/runs/dask"
    summary = run_segment_job([f"{bucket_archive['bucket']}/in"], out, model=bucket_archive["model"], settings=SETTINGS, engine="dask", workers=2, progress=False)
    assert summary.n_images == bucket_archive["n_images"] and summary.n_failed == 1
    assert_same_masks_and_tables(bucket_archive["root"] / "local", out, ignore=DIFFERS_BY_PLACE)


def test_a_live_lease_refuses_a_second_run_and_a_stale_one_is_taken_over(bucket_archive, capsys):
    out = to_location(f"{bucket_archive['bucket']}/runs/locked")
    with Lock(out):
        with pytest.raises(OutputError, match="is being written by another run"):
            Lock(out).__enter__()
        code = main(["segment", f"{bucket_archive['bucket']}/in/copy_0", "-o", str(out), "--model", "default"])
        assert code == 1 and "being written by another run" in capsys.readouterr().err
    lease = OutputFolder(out).lock
    assert not lease.exists()
    lease.write_bytes(json.dumps({"owner": "pid 1 on a-dead-node", "renewed": time.time() - 10 * Lock.LEASE_STALE_S}).encode())
    with Lock(out) as lock:  # a dead run's lease does not block forever
        assert json.loads(lease.read_bytes())["owner"] == lock.owner


def test_a_bucket_that_does_not_exist_is_a_usage_error(store, tmp_path, capsys):
    code = main(["segment", "s3://nb-no-such-bucket/in", "-o", str(tmp_path / "out")])
    assert code == 2 and "s3://nb-no-such-bucket/in: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
