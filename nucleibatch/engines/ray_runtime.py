"""Joining or starting Ray (thin glue)."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``, as inside `ray job submit`), else start
    a private local Ray bound to 127.0.0.1. Does nothing when Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            dashboard_host="127.0.0.1",  # Ray Train's state queries go through the dashboard
            num_cpus=num_cpus,
            log_to_driver=True,
            configure_logging=False,
        )
