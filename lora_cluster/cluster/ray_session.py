"""Joining or starting Ray: embedded local by default, ``address`` to join an existing cluster."""

from __future__ import annotations

import os

import ray

from lora_cluster.errors import ClusterError


def ensure_ray(address: str | None, namespace: str) -> None:
    """Connect this process to Ray once (reuse an existing connection, e.g. in tests)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    try:
        if address is None:
            # "local" never attaches to a stray cluster on this machine.
            ray.init(address="local", namespace=namespace, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, namespace=namespace, log_to_driver=False,
                     configure_logging=False)
    except ConnectionError as exc:
        raise ClusterError(f"address: cannot reach a Ray cluster at {address!r} ({exc})",
                           field="address") from exc
