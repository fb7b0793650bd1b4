"""A successful run prints nucleibatch's own lines only: no Ray or Dask chatter on stderr."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO

OUR_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) nucleibatch[.:]")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ray", "dask"])
def test_a_successful_distributed_run_prints_only_its_own_lines(engine, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "nucleibatch", "segment", str(REPO / "examples" / "dsb_demo"), "-o", str(tmp_path / "out"), "--engine", engine, "--workers", "1"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    foreign = [line for line in done.stderr.splitlines() if line.strip() and not OUR_LINE.match(line)]
    assert foreign == [], "\n".join(foreign)
    assert done.stdout.startswith("segmented 5/5 images")


# Ray Train's controller creates its own restartable actor with an object reference as an
# argument, and Ray logs an error for it: not ours to change
RAY_TRAIN_OWN = "Actor with class name: 'PreemptionWatcher'"
OUR_WORKER_LINE = re.compile(r"^\S*\(RayTrainWorker pid=\d+\)\S* epoch \d+/\d+ done: ")


@pytest.mark.slow
def test_a_ray_train_run_prints_its_epochs_and_not_ray_trains_bookkeeping(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "nucleibatch", "train", str(REPO / "examples" / "dsb_demo"), "-o", str(tmp_path / "run"), "--workers", "1",
         "--epochs", "2", "--patches-per-epoch", "4", "--batch-size", "2", "--patch-size", "64", "--no-tune", "--overlay-every", "0"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    epochs = [line for line in lines if OUR_WORKER_LINE.match(line)]
    assert [line.split(" epoch ")[1][:3] for line in epochs] == ["1/2", "2/2"]
    foreign = [line for line in lines if not OUR_LINE.match(line) and line not in epochs and RAY_TRAIN_OWN not in line]
    assert foreign == [], "\n".join(foreign)
