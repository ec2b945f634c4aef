"""Per-replica serving counters and the adapter-load latency histogram (cheap, thread-safe).

Nothing here runs per token: counters move once per request, and loads are detected from
the registry's own records (each load — explicit, on demand, or an LRU reload — rewrites an
adapter's ``load_ms``), so the step loop is never touched.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

from lora_cluster.api_types import AdapterInfo
from lora_cluster.config import ClusterConfig

# Upper bounds (ms) of the load-latency buckets; the last bucket is +Inf.
LOAD_BUCKETS_MS: tuple[float, ...] = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
                                      30000, 60000)
BASE = "(base)"  # how base-model requests are labelled in per-adapter counters


class LoadHistogram:
    """Counts of adapter-load latencies per bucket, their sum and count."""

    def __init__(self, buckets_ms: tuple[float, ...] = LOAD_BUCKETS_MS) -> None:
        self.buckets_ms = buckets_ms
        self.counts = [0] * (len(buckets_ms) + 1)
        self.sum_ms = 0.0
        self.count = 0

    def observe(self, ms: float) -> None:
        self.counts[bisect.bisect_left(self.buckets_ms, ms)] += 1
        self.sum_ms += ms
        self.count += 1

    def as_dict(self) -> dict[str, Any]:
        return {"buckets_ms": list(self.buckets_ms), "counts": list(self.counts),
                "sum_ms": self.sum_ms, "count": self.count}


class LoadWatcher:
    """Observes every load into a histogram by diffing (name, version, load_ms) snapshots."""

    def __init__(self) -> None:
        self.histogram = LoadHistogram()
        self._last: dict[str, tuple[int, float]] = {}

    def observe(self, infos: Iterable[AdapterInfo]) -> None:
        current: dict[str, tuple[int, float]] = {}
        for info in infos:
            if info.load_ms <= 0 or info.residency == "loading":
                continue
            key = (info.version, info.load_ms)
            current[info.name] = key
            if self._last.get(info.name) != key:
                self.histogram.observe(info.load_ms)
        self._last = current


class ServingCounters:
    """Requests per adapter and where each adapter was when its request arrived."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.arrivals: Counter[str] = Counter()
        self.ongoing = 0

    def arrived(self, adapter: str | None, kind: str, prompts: int) -> None:
        with self._lock:
            self.requests[adapter or BASE] += prompts
            self.arrivals[kind] += prompts
            self.ongoing += 1

    def left(self) -> None:
        with self._lock:
            self.ongoing -= 1

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"requests_by_adapter": dict(self.requests),
                    "arrivals_by_residency": dict(self.arrivals), "ongoing": self.ongoing}


def replica_report(replica_id: str, stats: dict[str, Any], config: ClusterConfig,
                   residency: dict[str, str], loads: LoadWatcher, counters: ServingCounters,
                   generation: int) -> dict[str, Any]:
    """What a replica sends the directory each period (the source of every metric)."""
    tiers = stats.get("tiers", {})
    return {
        "replica_id": replica_id,
        "world_size": stats.get("world_size", 1),
        "device": stats.get("device"),
        "max_loras": config.max_loras,
        "max_cpu_loras": config.max_cpu_loras,
        "slots_used": sum(1 for s in tiers.get("device_slots", []) if s is not None),
        "host_used": len(tiers.get("host_lru", ())),
        "residency": residency,
        "queue_depth": stats.get("queue_depth", 0),
        "running": stats.get("num_running", 0),
        "tokens_per_s": stats.get("tokens_per_s", 0.0),
        "generated_tokens": stats.get("generated_tokens", 0),
        "rank_group_restarts": stats.get("rank_group_restarts", 0),
        "load_failures_by_cause": dict(stats.get("failed_loads_by_cause", {})),
        "load_histogram": loads.histogram.as_dict(),
        "generation": generation,
        **counters.as_dict(),
    }
