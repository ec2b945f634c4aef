"""Prometheus exposition of the app, built from the directory's snapshot at scrape time.

Every number comes from the replicas' periodic reports (no per-token work anywhere), so a
scrape costs one directory call. Residency is reported for every registered adapter on every
live replica — idle adapters included — as a state set over device / host / none.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from deploy.directory_state import DirectorySnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RESIDENCY_STATES = ("device", "host", "none")
Samples = Sequence[tuple[tuple[Any, ...], Any]]  # (label values, value)


def _state(residency: str | None) -> str:
    return residency if residency in ("device", "host") else "none"


class SnapshotCollector:
    """A one-shot collector over a ``DirectorySnapshot``."""

    def __init__(self, snapshot: DirectorySnapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        reports = [(r.replica_id, r.stats) for r in snap.replicas]
        yield _gauge("lora_replicas_live", "Replicas that reported recently.", [],
                     [((), len(reports))])
        yield _gauge("lora_adapters_registered", "Adapters registered app-wide.", [],
                     [((), len(snap.adapters))])
        used: list[Any] = []
        total: list[Any] = []
        host_used: list[Any] = []
        host_total: list[Any] = []
        for rid, st in reports:
            for rank in range(int(st.get("world_size", 1))):
                # Every rank of a replica holds the same slots (the controller mirrors them).
                used.append(((rid, str(rank)), st.get("slots_used", 0)))
                total.append(((rid, str(rank)), st.get("max_loras", 0)))
            host_used.append(((rid,), st.get("host_used", 0)))
            host_total.append(((rid,), st.get("max_cpu_loras", 0)))
        yield _gauge("lora_device_slots_used", "Adapter slots in use on the compute device.",
                     ["replica", "rank"], used)
        yield _gauge("lora_device_slots_total", "Adapter slots on the compute device.",
                     ["replica", "rank"], total)
        yield _gauge("lora_host_cache_used", "Adapters in the host-memory cache.", ["replica"],
                     host_used)
        yield _gauge("lora_host_cache_total", "Capacity of the host-memory cache.", ["replica"],
                     host_total)
        yield from self._residency(reports)
        yield from self._loads(reports)
        yield from self._traffic(reports)

    def _residency(self, reports: list[tuple[str, dict[str, Any]]]) -> Iterator[Metric]:
        per_replica: list[Any] = []
        counts: list[Any] = []
        for entry in self.snapshot.adapters:
            states = [_state(st.get("residency", {}).get(entry.name)) for _, st in reports]
            for (rid, _), state in zip(reports, states):
                for s in RESIDENCY_STATES:
                    per_replica.append(((entry.name, rid, s), 1 if s == state else 0))
            for s in RESIDENCY_STATES:
                counts.append(((entry.name, s), states.count(s)))
        yield _gauge("lora_adapter_residency",
                     "1 for the tier (device/host/none) each adapter is in on each replica.",
                     ["adapter", "replica", "state"], per_replica)
        yield _gauge("lora_adapter_replicas", "Replicas holding each adapter in each tier.",
                     ["adapter", "state"], counts)

    def _loads(self, reports: list[tuple[str, dict[str, Any]]]) -> Iterator[Metric]:
        hist = HistogramMetricFamily("lora_adapter_load_seconds",
                                     "Adapter load latency (explicit, on-demand and reloads).",
                                     labels=["replica"])
        failures = CounterMetricFamily("lora_adapter_load_failures",
                                       "Adapter loads refused, by cause.",
                                       labels=["replica", "cause"])
        for rid, st in reports:
            h = st.get("load_histogram") or {}
            bounds, counts = h.get("buckets_ms", []), h.get("counts", [])
            if counts:
                cumulative, buckets = 0, []
                for bound, n in zip([*bounds, float("inf")], counts):
                    cumulative += n
                    buckets.append(("+Inf" if bound == float("inf") else f"{bound / 1e3:g}",
                                    cumulative))
                hist.add_metric([rid], buckets, h.get("sum_ms", 0.0) / 1e3)
            for cause, n in sorted(st.get("load_failures_by_cause", {}).items()):
                failures.add_metric([rid, cause], n)
        yield hist
        yield failures

    def _traffic(self, reports: list[tuple[str, dict[str, Any]]]) -> Iterator[Metric]:
        def per(key: str) -> Samples:
            return [((rid,), float(st.get(key, 0) or 0)) for rid, st in reports]

        yield _gauge("lora_tokens_per_second", "Generated tokens per second (last 10 s).",
                     ["replica"], per("tokens_per_s"))
        yield _counter("lora_generated_tokens", "Tokens generated.", ["replica"],
                       per("generated_tokens"))
        yield _gauge("lora_queue_depth", "Requests waiting for admission in the engine.",
                     ["replica"], per("queue_depth"))
        yield _gauge("lora_running_requests", "Requests running in the engine.", ["replica"],
                     per("running"))
        yield _gauge("lora_ongoing_requests", "Requests inside the replica (any stage).",
                     ["replica"], per("ongoing"))
        yield _counter("lora_rank_group_restarts", "Rank-group rebuilds after a rank failure.",
                       ["replica"], per("rank_group_restarts"))
        by_adapter = [((name, rid), n) for rid, st in reports
                      for name, n in sorted(st.get("requests_by_adapter", {}).items())]
        yield _counter("lora_requests", "Prompts served, by adapter ('(base)' for none).",
                       ["adapter", "replica"], by_adapter)
        arrivals = [((kind, rid), n) for rid, st in reports
                    for kind, n in sorted(st.get("arrivals_by_residency", {}).items())]
        yield _counter("lora_request_arrivals",
                       "Requests by where their adapter was on the replica that got them.",
                       ["residency", "replica"], arrivals)
        yield _counter("lora_routing_decisions", "Router decisions (hits, spills, cold, base).",
                       ["decision"], [((k,), n) for k, n in
                                      sorted(self.snapshot.router_decisions.items())])


def _gauge(name: str, doc: str, labels: list[str], samples: Samples) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


def _counter(name: str, doc: str, labels: list[str], samples: Samples) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


def render(snapshot: DirectorySnapshot) -> bytes:
    """Prometheus text for ``snapshot``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))  # type: ignore[arg-type]
    return generate_latest(registry)
