"""Joining a Ray cluster or starting a private local Ray, for the ray engine and Ray Train (thin glue)."""

from __future__ import annotations

import logging
import os
import threading


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``, as inside `ray job submit`), else start
    a private local Ray bound to 127.0.0.1. Does nothing when Ray is already initialised.

    The private Ray's job starts every worker process (Ray Train's included) with the allocator
    settings (:func:`nucleibatch.runtime.allocator.worker_environment`), which glibc reads only as a
    process starts: one CPU training worker makes 1.6-1.8x the patches/s with them. On a cluster
    the job's own runtime environment decides (see README, Distributed runs).
    """
    import signal

    import ray

    if ray.is_initialized():
        return
    ours = signal.getsignal(signal.SIGTERM)  # ray.init puts its own in (sys.exit): ours stops the run as documented
    try:
        _init(address, num_cpus)
    finally:
        if callable(ours) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, ours)


def _init(address: str | None, num_cpus: int | None) -> None:
    import ray

    from .allocator import worker_environment

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Ray swaps 127.0.0.1 for the machine's external address unless told this is a
        # single-machine Ray; then every Ray server binds to loopback only
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes Ray starts
        try:  # Ray's private constant, read when this process picks the node address (no public switch)
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
        except ImportError:  # a Ray that moved it: the variable above, read by the processes it starts
            pass
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # DDP's gloo pairs on loopback too
        # Ray >= 2.60 turns token authentication on for a new local Ray (~/.ray/auth_token) and
        # says so on every run: the protection stays, the notice goes
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            dashboard_host="127.0.0.1",  # Ray Train's state queries go through the dashboard
            num_cpus=num_cpus,
            log_to_driver=True,
            configure_logging=False,
            runtime_env={"env_vars": worker_environment()},
        )
