"""Cyclic-GC pauses of a rank process: how many, how long, and the policy that bounds them.

A rank's step allocates thousands of short-lived container objects (the unpickled plan, its
sequences, tensors), all freed by reference counting; with CPython's default thresholds
(700, 10, 10) the collector still runs a young collection every ~30 steps and, as adapters
come and go in the host cache, middle and full collections that walk the process's tracked
objects — a stall of the step every rank waits for. ``serve_gc`` freezes the long-lived
state out of the collector (``gc.freeze`` after the model load) and raises the thresholds
for the serving loop: collections are rarer and cyclic garbage is still collected, later.
Measured through Ray on cpu-tiny with 10,000 adapters (one rank, ~2,000 steps a window):
defaults 69 young + 7 middle + 1 full collections, 60 ms in all, longest pause 20–22 ms;
``SERVE_THRESHOLDS`` 2–3 young ones, 18–20 ms, longest 8–13 ms. ``GCPauses`` records every
collection's duration by generation (``stats()``, in ``Cluster.rank_stats()`` and the
bench's ``rank_gc``), so the policy's effect stays measured.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

# A young collection every 20,000 net allocations instead of 700; a middle one every 20 young
# ones, a full one after 100 middle ones (and CPython's own 25 % rule).
SERVE_THRESHOLDS = (20_000, 20, 100)


class GCPauses:
    """Counts and times the process's cyclic-GC collections by generation (a gc callback)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: float | None = None
        self.count = [0, 0, 0]
        self.ms = [0.0, 0.0, 0.0]
        self.max_ms = 0.0
        self._installed = False

    def install(self) -> GCPauses:
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True
        return self

    def remove(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
            return
        if self._started is None:
            return
        ms = (now - self._started) * 1e3
        self._started = None
        gen = int(info.get("generation", 2))
        with self._lock:
            self.count[gen] += 1
            self.ms[gen] += ms
            self.max_ms = max(self.max_ms, ms)

    def stats(self) -> dict[str, Any]:
        """Collections and their total ms per generation, the longest pause, the thresholds
        in force and the objects frozen out of the collector."""
        with self._lock:
            return {"collections": list(self.count), "ms": [round(m, 3) for m in self.ms],
                    "max_ms": round(self.max_ms, 3), "thresholds": list(gc.get_threshold()),
                    "frozen": gc.get_freeze_count()}


def serve_gc(thresholds: tuple[int, int, int] = SERVE_THRESHOLDS) -> None:
    """Freeze what is alive now (it lives as long as the process) and raise the collection
    thresholds for the serving loop. For processes that only serve (rank actors)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


__all__ = ["SERVE_THRESHOLDS", "GCPauses", "serve_gc"]
