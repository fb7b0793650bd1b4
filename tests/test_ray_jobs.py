"""`ray job submit` of the jobs/ entrypoints against a real Ray head on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from nucleibatch import load_model
from nucleibatch.output.folder import OutputFolder
from tests.helpers.outputs import assert_same_masks_and_tables
from tests.helpers.raycluster import RayHead


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = Path(tempfile.mkdtemp(prefix="nbray"))
    head = RayHead(num_cpus=2, tmp_dir=temp_dir)
    try:
        yield head
    finally:
        head.stop()
        deadline = time.time() + 20  # processes killed a moment ago may still be exiting
        while (left := subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True, text=True).stdout.split()) and time.time() < deadline:
            time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left running after the head was stopped: {left}"


@pytest.mark.slow
def test_train_job_submitted_to_a_ray_cluster_writes_a_bundle(ray_head, small_dsb_root, tmp_path):
    run_dir = tmp_path / "run"
    result = ray_head.job(
        "python", "jobs/train.py", str(small_dsb_root), "-o", str(run_dir),
        "--workers", "2", "--epochs", "1", "--limit-images", "4", "--patches-per-epoch", "8",
        "--batch-size", "2", "--patch-size", "128", "--no-tune",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    assert "epoch 1/1 done" in result.stdout  # the job log shows the training progress
    model = load_model(run_dir / "bundle")
    assert model.config.training["workers"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 1


SEGMENT_FLAGS = ("--model", "default", "--device", "cpu", "--block-size", "256", "--block-margin", "64")


@pytest.fixture(scope="module")
def two_nodes(ray_head):
    """The head plus a second Ray node on this machine: 2 + 2 logical CPUs."""
    if not ray_head.nodes:
        ray_head.add_worker_node(num_cpus=2)
    return ray_head


@pytest.fixture(scope="module")
def two_copies_reference(tmp_path_factory):
    """A small archive (2 copies of the demo images, a multi-block mosaic) and the
    local engine's outputs on it."""
    from nucleibatch.segment.job import run_segment_job
    from nucleibatch.segment.settings import SegmentSettings
    from tests.helpers import input_files as files

    root = tmp_path_factory.mktemp("ray-archive")
    files.write_small_archive(root / "in", copies=2, bad_file=False)
    settings = SegmentSettings(block_size=256, block_margin=64)
    summary = run_segment_job([str(root / "in")], root / "local", model="default", device="cpu", settings=settings, progress=False)
    assert summary.n_failed == 0 and summary.n_ok == 11
    return root


def _nodes_of(run: dict) -> set[str]:
    return {w for w, counts in run["placement"]["workers"].items() if counts["predict"]}


@pytest.mark.slow
def test_segment_job_on_two_ray_nodes_matches_the_local_engine(two_nodes, two_copies_reference, tmp_path):
    out = tmp_path / "ray"
    result = two_nodes.job("python", "jobs/segment.py", str(two_copies_reference / "in"), "-o", str(out), "--engine", "ray", *SEGMENT_FLAGS)
    logs = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in logs, logs[-3000:]
    assert "ray engine: 2 model worker(s)" in logs and "11/11 images" in logs and "segmented 11/11 images" in logs  # progress, summary
    images = assert_same_masks_and_tables(two_copies_reference / "local", out)
    assert (images.status == "ok").all() and len(images) == 11
    run = json.loads(OutputFolder(out).run_json.read_text())
    assert run["engine"] == "ray" and len(_nodes_of(run)) == 2, run["placement"]  # work spread over both nodes
    units = [json.loads(line) for line in OutputFolder(out).placement.read_text().splitlines()]
    assert len(units) == run["placement"]["block_units"] and all(u["predict_worker"].startswith("ray-node:") for u in units)


@pytest.mark.slow
def test_killing_a_model_worker_mid_job_changes_nothing(two_nodes, two_copies_reference, tmp_path):
    """SIGKILL a Ray worker process while it runs a predict unit: the actor restarts, its units are
    retried, and the outputs are exactly the local engine's, without duplicate rows."""
    out = tmp_path / "ray-killed"
    job_id = two_nodes.submit("python", "jobs/segment.py", str(two_copies_reference / "in"), "-o", str(out), "--engine", "ray", *SEGMENT_FLAGS)
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline:
        for line in subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines():
            pid, _, args = line.strip().partition(" ")
            if args.startswith("ray::RayBlockPredictor.predict"):  # Ray's process title while a unit runs
                os.kill(int(pid), signal.SIGKILL)
                killed = int(pid)
                break
        time.sleep(0.05)
    assert killed, "no model worker was seen running a unit"
    status, logs = two_nodes.wait_job(job_id)
    assert status == "SUCCEEDED" and "segmented 11/11 images" in logs, logs[-3000:]
    assert_same_masks_and_tables(two_copies_reference / "local", out)
    units = [json.loads(line) for line in OutputFolder(out).placement.read_text().splitlines()]
    assert len({(u["image_id"], u["block"]) for u in units}) == len(units)  # each block unit recorded once
    predict_pids = {int(u["predict_worker"].rpartition("/pid:")[2]) for u in units}
    assert killed not in predict_pids or len(predict_pids) >= 3  # the killed unit ran again elsewhere: a restarted actor
