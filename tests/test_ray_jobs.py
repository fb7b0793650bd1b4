"""`ray job submit` of the jobs/ entrypoints against a real Ray head on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from nucleibatch import load_model
from tests.raycluster import RayHead


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = Path(tempfile.mkdtemp(prefix="nbray"))
    head = RayHead(num_cpus=2, tmp_dir=temp_dir)
    try:
        yield head
    finally:
        head.stop()
        left = subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True, text=True).stdout.split()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left running after the head was stopped: {left}"


@pytest.mark.slow
def test_train_job_submitted_to_a_ray_cluster_writes_a_bundle(ray_head, dsb_root, tmp_path):
    run_dir = tmp_path / "run"
    result = ray_head.job(
        "python", "jobs/train.py", str(dsb_root), "-o", str(run_dir),
        "--workers", "2", "--epochs", "1", "--limit-images", "4", "--patches-per-epoch", "8",
        "--batch-size", "2", "--patch-size", "128", "--no-tune",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    assert "epoch 1/1 done" in result.stdout  # the job log shows the training progress
    model = load_model(run_dir / "bundle")
    assert model.config["training"]["workers"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 1
