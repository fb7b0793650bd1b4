"""The post-processing processes of the local engine (``segment --post-workers N``): the CPU units
of :mod:`..units` (plan an image, read and normalise a block, find a block's nuclei, stitch an
image) run in ``N`` worker processes, so that the work around the network uses every core without
the GIL and keeps up with a GPU (:class:`.local.LocalExecutor` schedules them).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

from ...runtime.allocator import environment_for_children, tune_allocator, worker_environment


def default_post_workers(device_type: str, instances_on: str = "auto", cpus: int | None = None) -> int:
    """Post-processing processes when ``--post-workers`` is not given: where a GPU runs the network
    and the CPU makes the instances (``--instances-on cpu``), every usable CPU
    (:func:`~nucleibatch.cpus.usable_cpus`: the node's share, not its size) but two (the model
    thread's and the driver's); else none: on a CPU the network already uses every core and threads
    of this process post-process between its calls, and where the instances and measurements are
    made on the device, what is left for the host (image copies, tables, pyramids) runs in threads,
    without pickling each block's pixels to another process."""
    from ...cpus import usable_cpus
    from ..settings import resolve_instances_on

    if device_type != "cuda" or resolve_instances_on(instances_on, device_type) == "device":
        return 0
    cpus = cpus or usable_cpus().count
    return max(1, cpus - 2)


def start_post_pool(post_workers: int) -> ProcessPoolExecutor:
    """Start ``post_workers`` post-processing processes and return at once: they need a second or
    more to start, which the caller spends loading the model. The caller shuts the pool down.

    The processes are spawned (a fork of a process running torch threads can deadlock) with the
    allocator settings in their environment (glibc reads them at start), and import the units'
    modules before their first unit.
    """
    if post_workers < 1:
        raise ValueError(f"post_workers must be >= 1, got {post_workers}")
    with environment_for_children(worker_environment()):
        pool = ProcessPoolExecutor(max_workers=post_workers, mp_context=multiprocessing.get_context("spawn"), initializer=_prepare_worker)
        # a pool starts a process per task submitted while none is idle: these start them all now
        for _ in range(post_workers):
            pool.submit(os.getpid)
    return pool


def _prepare_worker() -> None:
    tune_allocator()
    # what the units import, before the first unit arrives (torch is not among them): the
    # modules, and pandas, which pyarrow imports on its first table written (~0.5 s)
    import pandas  # noqa: F401

    from .. import steps, stitch, units  # noqa: F401
