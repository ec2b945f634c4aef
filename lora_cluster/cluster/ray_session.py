"""Joining or starting Ray: embedded local by default, ``address`` to join an existing cluster."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import ray

from lora_cluster.errors import ClusterError

# Where `ray start` records the newest head on this machine (what address="auto" reads).
CURRENT_CLUSTER_FILE = "/tmp/ray/ray_current_cluster"


def ensure_ray(address: str | None, namespace: str, connect_timeout_s: float = 0.0) -> None:
    """Connect this process to Ray once (reuse an existing connection, e.g. in tests).

    ``connect_timeout_s`` retries a cluster that is still coming up (a head just started).
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    if address is None:
        # "local" never attaches to a stray cluster on this machine.
        ray.init(address="local", namespace=namespace, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        return
    target = _resolve(address)
    deadline = time.monotonic() + connect_timeout_s
    while True:
        # Probe first: ray.init on a dead GCS address retries for minutes before failing.
        if target is None or _reachable(target):
            try:
                ray.init(address=address, namespace=namespace, log_to_driver=False,
                         configure_logging=False)
                return
            except ConnectionError as exc:
                error = str(exc)
        else:
            error = "nothing is listening there"
        if time.monotonic() > deadline:
            raise ClusterError(f"address: cannot reach a Ray cluster at {address!r}"
                               f"{f' ({target})' if target and target != address else ''}: "
                               f"{error}", field="address")
        time.sleep(1.0)


def _resolve(address: str) -> str | None:
    """host:port a GCS address points at (None: a ray:// client address, not probed)."""
    if address.startswith("ray://"):
        return None
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not address:
            try:
                address = Path(CURRENT_CLUSTER_FILE).read_text().strip()
            except OSError:
                raise ClusterError("address: no Ray cluster is running on this machine "
                                   "(start one with `lora-cluster start`, or pass --address)",
                                   field="address") from None
    return address


def _reachable(host_port: str, timeout_s: float = 2.0) -> bool:
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False
