"""How many CPUs this process may really use, on a laptop as on a shared node.

``os.cpu_count()`` counts the machine's cores: on a 128-core SLURM or Kubernetes node with 8
cores allotted it says 128, and a process pool sized by it starts 126 processes that fight over
8 cores. The usable count is the smallest of:

* the CPU affinity mask (``taskset``, SLURM's and Kubernetes' cpusets): ``os.sched_getaffinity``;
* the cgroup CPU quota (Kubernetes CPU limits, systemd ``CPUQuota``, Docker ``--cpus``):
  cgroup v2 ``cpu.max``, or cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, rounded up;
* ``SLURM_CPUS_PER_TASK``, where SLURM set it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class UsableCpus:
    """``count`` CPUs, limited by ``source`` (``"affinity"``, ``"cgroup cpu.max"``,
    ``"SLURM_CPUS_PER_TASK"``, ...)."""

    count: int
    source: str

    def __str__(self) -> str:
        return f"{self.count} ({self.source})"


def usable_cpus(environ: Mapping[str, str] | None = None, cgroup_root: Path = CGROUP_ROOT, affinity: int | None = None) -> UsableCpus:
    """The CPUs this process may use (see the module docstring); at least 1.

    Args:
        environ: the environment to read ``SLURM_CPUS_PER_TASK`` from (default: ``os.environ``).
        cgroup_root: where the cgroup files are (tests give a folder of fake ones).
        affinity: the affinity mask's size (default: this process's).
    """
    environ = os.environ if environ is None else environ
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limits = [UsableCpus(max(1, affinity), "affinity")]
    quota = cgroup_quota(cgroup_root)
    if quota is not None:
        limits.append(quota)
    slurm = environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        limits.append(UsableCpus(int(slurm), "SLURM_CPUS_PER_TASK"))
    return min(limits, key=lambda limit: limit.count)


def limit_torch_threads(cpus: int) -> None:
    """Keep torch's intra-op threads within ``cpus`` (its default counts the node's cores)."""
    import torch

    if torch.get_num_threads() > cpus:
        torch.set_num_threads(max(1, cpus))


def cgroup_quota(cgroup_root: Path = CGROUP_ROOT) -> UsableCpus | None:
    """The cgroup's CPU quota in whole CPUs (rounded up), or None where there is none."""
    found = []
    for path in (cgroup_root / "cpu.max", *_own_cgroup_v2(cgroup_root)):
        try:
            quota, period = path.read_text().split()[:2]
            if quota != "max" and int(period) > 0:
                found.append(max(1, math.ceil(int(quota) / int(period))))
        except (OSError, ValueError):
            continue
    if found:
        return UsableCpus(min(found), "cgroup cpu.max")
    try:
        quota_us = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota_us > 0 and period_us > 0:
        return UsableCpus(max(1, math.ceil(quota_us / period_us)), "cgroup cpu.cfs_quota_us")
    return None


def _own_cgroup_v2(cgroup_root: Path) -> list[Path]:
    """The ``cpu.max`` of this process's own cgroup (v2: ``0::/path`` in /proc/self/cgroup), where
    the root's file is not the one that applies (systemd slices, nested containers)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    paths = [line.split("::", 1)[1] for line in lines if line.startswith("0::")]
    return [cgroup_root / p.lstrip("/") / "cpu.max" for p in paths if p.strip("/")]
