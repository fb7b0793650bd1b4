"""Usable CPUs on shared nodes (issue 22): affinity (taskset), cgroup quotas, SLURM; and what
they size (post-processing processes, torch threads), printed at the start of a run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nucleibatch.cpus import cgroup_quota, usable_cpus
from nucleibatch.segment.engines.process_pool import default_post_workers
from tests.helpers.paths import REPO


def fake_cgroup(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        path = tmp_path / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_cgroup_v2_quota_rounds_up_and_max_is_no_limit(tmp_path):
    assert cgroup_quota(fake_cgroup(tmp_path / "a", **{"cpu.max": "250000 100000\n"})).count == 3
    assert cgroup_quota(fake_cgroup(tmp_path / "b", **{"cpu.max": "max 100000\n"})) is None
    assert cgroup_quota(tmp_path / "none") is None


def test_cgroup_v1_quota(tmp_path):
    root = fake_cgroup(tmp_path, **{"cpu__cpu.cfs_quota_us": "800000\n", "cpu__cpu.cfs_period_us": "100000\n"})
    assert cgroup_quota(root).count == 8
    root = fake_cgroup(tmp_path / "unlimited", **{"cpu__cpu.cfs_quota_us": "-1\n", "cpu__cpu.cfs_period_us": "100000\n"})
    assert cgroup_quota(root) is None


def test_the_smallest_limit_wins(tmp_path):
    cgroup = fake_cgroup(tmp_path, **{"cpu.max": "800000 100000\n"})
    assert usable_cpus({}, cgroup, affinity=128).count == 8 and usable_cpus({}, cgroup, affinity=128).source == "cgroup cpu.max"
    slurm = usable_cpus({"SLURM_CPUS_PER_TASK": "4"}, cgroup, affinity=128)
    assert (slurm.count, slurm.source) == (4, "SLURM_CPUS_PER_TASK")
    assert usable_cpus({"SLURM_CPUS_PER_TASK": "junk"}, tmp_path / "none", affinity=6).count == 6
    # a 128-core node with 8 allotted: 6 post-processing processes on a GPU, not 126
    assert default_post_workers("cuda", "cpu", usable_cpus({}, cgroup, affinity=128).count) == 6


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) not installed")
def test_taskset_limits_the_usable_cpus_and_torch_threads():
    code = (
        "import torch; from nucleibatch.cpus import usable_cpus, limit_torch_threads; "
        "n = usable_cpus(); limit_torch_threads(n.count); print(n.count, n.source, torch.get_num_threads())"
    )
    done = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "affinity", "1"]


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) not installed")
def test_a_run_says_its_device_and_cpus_at_the_start(tmp_path, tiny_bundle):
    import torch

    from nucleibatch.synthetic import synthetic_nuclei
    from tests.helpers import input_files as files

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device auto takes it")
    image, _ = synthetic_nuclei((64, 64), n_nuclei=3, seed=1)
    (tmp_path / "in").mkdir()
    files.write_plain(tmp_path / "in" / "a.png", image)
    done = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-m", "nucleibatch", "segment", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(tiny_bundle)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "device cpu (--device auto: no CUDA GPU here), 1 (affinity) usable CPUs, post-processing in this process" in done.stderr


def test_version():
    done = subprocess.run([sys.executable, "-m", "nucleibatch", "--version"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("nucleibatch ")
