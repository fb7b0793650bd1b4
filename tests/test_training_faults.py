"""Training faults (issue 5): a Ray Train worker killed mid-run, and a corrupt checkpoint.

Real `python -m nucleibatch train` processes (2 DDP workers on the CPU, a private Ray on
127.0.0.1), tiny runs on the 6 small generated DSB-layout images.
* A worker process SIGKILLed after the first checkpoint: Ray Train restarts the worker group
  from the last checkpoint (FailureConfig), the command finishes with status 0 and every epoch
  appears once in metrics.csv.
* The newest checkpoint's state file truncated: a resumed run warns and resumes from the
  previous good checkpoint, and finishes.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.paths import REPO
from tests.helpers.processes import child_environment, descendants
from tests.helpers.training import SMALL_RUN

TINY = [*SMALL_RUN, "--no-tune"]


def train_command(data: Path, run_dir: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "nucleibatch", "train", str(data), "-o", str(run_dir), "--epochs", str(epochs), *TINY]


def epochs_in_metrics(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "ray_train").glob("checkpoint_*") if p.is_dir())


def registered_checkpoints(run_dir: Path) -> list[str]:
    """The checkpoints Ray Train's controller has registered (its manager's snapshot, written as it
    takes each one): only these are restored when a worker group restarts. A checkpoint folder
    alone is not one of them yet: the controller polls the workers' reports every few seconds."""
    try:
        snapshot = json.loads((run_dir / "ray_train" / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return []
    return [result["checkpoint_dir_name"] for result in snapshot.get("checkpoint_results", [])]


@pytest.mark.slow
def test_a_training_worker_killed_mid_run_resumes_from_the_last_checkpoint(small_dsb_root, tmp_path):
    run_dir = tmp_path / "run"
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(train_command(small_dsb_root, run_dir, 6), cwd=REPO, env=child_environment(RAY_DISABLE_USAGE_STATS="1"), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 400
        while proc.poll() is None and not registered_checkpoints(run_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = sorted(pid for pid, cmd in descendants(proc.pid).items() if cmd.startswith("ray::RayTrainWorker"))
        assert proc.poll() is None and workers, f"no training worker to kill:\n{(tmp_path / 'train.log').read_text()[-3000:]}"
        os.kill(workers[0], signal.SIGKILL)
        status = proc.wait(timeout=600)
    text = (tmp_path / "train.log").read_text()
    assert status == 0, text[-4000:]
    assert "resuming after epoch" in text, text[-4000:]
    assert epochs_in_metrics(run_dir) == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "bundle" / "config.json").is_file()


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_skipped_for_the_previous_good_one(small_dsb_root, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.run(train_command(small_dsb_root, run_dir, 2), cwd=REPO, env=child_environment(RAY_DISABLE_USAGE_STATS="1"), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    kept = checkpoints(run_dir)
    assert len(kept) == 2
    state = kept[-1] / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])  # the newest one, truncated
    again = subprocess.run(train_command(small_dsb_root, run_dir, 3), cwd=REPO, env=child_environment(RAY_DISABLE_USAGE_STATS="1"), capture_output=True, text=True, timeout=600)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-4000:]
    assert f"checkpoint {kept[-1].name} is unreadable" in output and f"resuming from the older checkpoint {kept[0].name} (epoch 1)" in output, output[-4000:]
    assert epochs_in_metrics(run_dir) == [1, 2, 3]
