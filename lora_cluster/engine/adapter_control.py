"""The controller's adapter side: registry, tier decisions, and the commands that mirror them.

Tier decisions come from ``adapters.AdapterTiers`` (LRU at both tiers, in-flight refs, pins),
keyed by adapter *version* so an old version can stay resident beside a new one. This module
holds the registry (validation, versions, records, registration) and its views; the mixins
it is built from mirror the tier decisions on the ranks (``engine/adapter_residency.py``:
loads, placements, drops, standalone or riding on a step, and prefetch's part in them) and
serve the scheduler as its ``SlotProvider`` (``engine/adapter_slots.py``: binding, pins,
reloads, restore after a restart).

Locking (owned by ``ControllerCore``): ``exec_lock`` serializes everything sent to the ranks
(steps and adapter commands: an adapter never changes in the middle of a step); ``lock``
guards the state. Order is always exec_lock → lock. Methods named ``*_locked`` expect both.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from lora_cluster.adapters import AdapterTiers, FailedLoads
from lora_cluster.api_types import AdapterInfo
from lora_cluster.api_types import Residency as ResidencyName
from lora_cluster.config import ClusterConfig
from lora_cluster.engine.adapter_commands import AdapterCommands, SendAll
from lora_cluster.engine.adapter_residency import tier_id
from lora_cluster.engine.adapter_slots import SlotBinding
from lora_cluster.engine.adapter_source import inspect_adapter
from lora_cluster.engine.messages import AdapterKey
from lora_cluster.engine.prefetch_book import PrefetchBook
from lora_cluster.engine.registry import AdapterMeta, AdapterRecord
from lora_cluster.engine.step_ops import StepOps
from lora_cluster.errors import LoRAClusterError, RequestError, UnknownAdapterError
from lora_cluster.model.spec import ModelSpec

__all__ = ["AdapterControl", "tier_id"]


class AdapterControl(SlotBinding):
    """Registry + residency of one replica's adapters (see module docstring for locking)."""

    def __init__(self, config: ClusterConfig, spec: ModelSpec, send_all: SendAll) -> None:
        self.config = config
        self.spec = spec
        self.records: dict[str, AdapterRecord] = {}
        self.loading: dict[str, AdapterRecord | None] = {}
        self.tiers = AdapterTiers(config.max_loras, config.max_cpu_loras)
        self.failed = FailedLoads(config.failed_load_ttl_s)
        self.failures_by_cause: Counter[str] = Counter()
        self.keys: dict[str, AdapterKey] = {}  # tier id → version, for every live version
        self.paths: dict[AdapterKey, str] = {}  # every live version's source directory
        self.bound: Counter[AdapterKey] = Counter()
        self.staging: set[AdapterKey] = set()  # versions an in-place update is staging
        self.update_failures_by_cause: Counter[str] = Counter()
        self.reload_failures_by_cause: Counter[str] = Counter()
        self._versions: dict[str, int] = {}
        self._pending_drops: list[AdapterKey] = []
        self.prefetch = PrefetchBook()  # versions admitted ahead of use, their victims
        self.step_ops = StepOps()  # placements and drops riding on the step being planned
        self.commands = AdapterCommands(send_all, self.prefetch, self.step_ops)

    # ---------------------------------------------------------------- inspection
    def inspect(self, name: str, source: str) -> tuple[str, AdapterMeta]:
        """Resolve and validate (header-level) on the controller; typed error if refused."""
        if not isinstance(name, str) or not name.strip():
            raise RequestError("name: an adapter needs a non-empty name", field="name")
        if not isinstance(source, str) or not source:
            raise RequestError(f"source: adapter {name!r} needs a source path or hub id",
                               field="source")
        return inspect_adapter(name, source, self.spec, self.config)

    def remember_failure(self, name: str, source: str, err: LoRAClusterError) -> None:
        self.failures_by_cause[err.code] += 1
        self.failed.record(f"{name}\0{source}", err)

    def check_failed(self, name: str, source: str) -> None:
        """Re-raise a recent failure of the same load (fail fast for ``failed_load_ttl_s``)."""
        self.failed.check(f"{name}\0{source}")

    def next_version(self, name: str) -> int:
        """Versions never repeat for a name, so an old one can stay resident beside a new one."""
        version = self._versions.get(name, 0) + 1
        self._versions[name] = version
        return version

    def record(self, name: str) -> AdapterRecord:
        rec = self.records.get(name)
        if rec is None:
            raise UnknownAdapterError(f"adapter {name!r} is not registered", name=name)
        return rec

    # ---------------------------------------------------------------- registration
    def register_locked(self, name: str, source: str, path: str, meta: AdapterMeta) -> AdapterInfo:
        """Read a validated adapter into every rank's host cache, then register it."""
        key = (name, self.next_version(name))
        rec = AdapterRecord(name=name, source=source, path=path, meta=meta, version=key[1])
        self.loading[name] = rec
        start = time.perf_counter()
        results = self.load_locked(key, path)
        rec.record_load(results, (time.perf_counter() - start) * 1e3)
        self.records[name] = rec
        return rec.info(self.residency_of(rec))

    def inspect_many(self, sources: Mapping[str, str] | Sequence[tuple[str, str]]
                     ) -> list[tuple[str, str, str, AdapterMeta]]:
        """(name, source, path, meta) of every adapter, validated; the first refusal raises
        (and is remembered like a failed load). No lock needed: nothing shared is read."""
        items = list(sources.items()) if isinstance(sources, Mapping) else list(sources)
        seen: dict[str, str] = {}
        for name, source in items:
            if seen.setdefault(name, source) != source:
                raise RequestError(f"name: adapter {name!r} is listed twice with different "
                                   f"sources ({seen[name]!r}, {source!r})", field="name")
        out = []
        for name, source in seen.items():
            source = str(source)
            self.check_failed(name, source)
            try:
                path, meta = self.inspect(name, source)
            except LoRAClusterError as err:
                self.remember_failure(name, source, err)
                raise
            out.append((name, source, path, meta))
        return out

    def register_on_disk(self, checked: list[tuple[str, str, str, AdapterMeta]]
                         ) -> list[AdapterInfo]:
        """Register validated adapters without reading their tensors (residency "registered");
        each one's first request loads it like an evicted adapter. All or nothing; a name
        already registered from the same source is left as it is. Needs ``lock`` only: no
        rank command is sent."""
        for name, source, _, _ in checked:
            rec = self.records.get(name)
            if rec is not None and rec.source != source:
                raise RequestError(
                    f"adapter {name!r} is already registered from {rec.source!r}; use "
                    f"update_adapter to replace its weights or evict_adapter first", field="name")
        out = []
        for name, source, path, meta in checked:
            if name not in self.records:
                key = (name, self.next_version(name))
                self.records[name] = AdapterRecord(name=name, source=source, path=path,
                                                   meta=meta, version=key[1])
                self.keys[tier_id(key)] = key
                self.paths[key] = path
            out.append(self.info(name))
        return out

    def unregister_locked(self, name: str) -> None:
        rec = self.record(name)
        del self.records[name]
        self.failed.forget(f"{name}\0{rec.source}")
        self.retire_locked(rec.key)

    # ---------------------------------------------------------------- views
    def residency_of(self, rec: AdapterRecord) -> ResidencyName:
        tid = tier_id(rec.key)
        if rec.key in self.prefetch.admitted:
            return "loading"  # read ahead for a waiting request, not confirmed yet
        if self.tiers.slot_of(tid) is not None:
            return "device"
        if self.tiers.in_host(tid):
            return "host"
        return "failed" if rec.error else "registered"

    def info(self, name: str) -> AdapterInfo:
        rec = self.records.get(name)
        if rec is None:
            raise UnknownAdapterError(f"adapter {name!r} is not registered", name=name)
        return rec.info(self.residency_of(rec))

    def infos(self) -> list[AdapterInfo]:
        out = [rec.info(self.residency_of(rec)) for rec in self.records.values()]
        out += [rec.info("loading") for rec in self.loading.values() if rec is not None]
        return sorted(out, key=lambda i: i.name)

    def stats(self) -> dict[str, Any]:
        per_adapter = {
            rec.name: {"version": rec.version, "residency": self.residency_of(rec),
                       "requests": rec.requests, "pinned": rec.pinned,
                       "bytes_per_rank": list(rec.bytes_per_rank), "load_ms": rec.load_ms,
                       "load_breakdown_ms": dict(rec.load_breakdown_ms),
                       "place_ms": rec.place_ms, "places": rec.places, "updates": rec.updates}
            for rec in self.records.values()
        }
        return {"adapters": per_adapter,
                "tiers": {**self.tiers.stats(), "device_slots": self.tiers.device_slots(),
                          "host_lru": self.tiers.host_names()},
                "failed_loads_by_cause": dict(self.failures_by_cause),
                "failed_updates_by_cause": dict(self.update_failures_by_cause),
                "failed_reloads_by_cause": dict(self.reload_failures_by_cause),
                "failures_by_cause": dict(self.failures_by_cause + self.update_failures_by_cause
                                          + self.reload_failures_by_cause),
                "old_versions_in_use": {tier_id(k): n for k, n in self.bound.items()
                                        if not self._is_current(k)}}
