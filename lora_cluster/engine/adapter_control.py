"""The controller's adapter side: registry, tier decisions, and the commands that mirror them.

Every decision (which version goes to which slot, what leaves the host cache) is recorded in
``Residency`` only after every rank executed the matching command, so the controller's view
equals each rank's. Also the scheduler's ``SlotProvider``: a sequence binds the current
version of its adapter at first admission and keeps it until it finishes.

Locking (owned by ``ControllerCore``): ``exec_lock`` serializes everything sent to the ranks
(steps and adapter commands: an adapter never changes in the middle of a step); ``lock``
guards the state. Order is always exec_lock → lock. Methods named ``*_locked`` expect both.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from lora_cluster.api_types import AdapterInfo
from lora_cluster.api_types import Residency as ResidencyName
from lora_cluster.config import ClusterConfig
from lora_cluster.engine.adapter_source import inspect_adapter
from lora_cluster.engine.messages import (
    AdapterCommand,
    AdapterKey,
    DropAdapter,
    LoadAdapter,
    LoadResult,
    PlaceAdapter,
    RankReply,
    UpdateAdapter,
)
from lora_cluster.engine.registry import AdapterMeta, AdapterRecord, FailedLoads
from lora_cluster.engine.residency import Residency
from lora_cluster.errors import (
    AdapterError,
    CapacityError,
    ClusterError,
    LoRAClusterError,
    RequestError,
    UnknownAdapterError,
)
from lora_cluster.model.spec import ModelSpec

SendAll = Callable[[Callable[[int], AdapterCommand]], tuple[RankReply, ...]]


def _first_error(replies: tuple[RankReply, ...]) -> LoRAClusterError | None:
    for reply in replies:
        if reply.error is not None:
            err = reply.error
            if isinstance(err, LoRAClusterError):
                return err
            return ClusterError(f"rank {reply.rank}: {type(err).__name__}: {err}", rank=reply.rank)
    return None


class AdapterControl:
    """Registry + residency of one replica's adapters (see module docstring for locking)."""

    def __init__(self, config: ClusterConfig, spec: ModelSpec, send_all: SendAll) -> None:
        self.config = config
        self.spec = spec
        self._send_all = send_all
        self.records: dict[str, AdapterRecord] = {}
        self.loading: dict[str, AdapterRecord | None] = {}
        self.residency = Residency(config.max_loras, config.max_cpu_loras)
        self.failed = FailedLoads(config.failed_load_ttl_s)
        self.paths: dict[AdapterKey, str] = {}  # every live version's source directory
        self.bound: Counter[AdapterKey] = Counter()
        self._versions: dict[str, int] = {}
        self._pending_drops: list[AdapterKey] = []

    # ---------------------------------------------------------------- inspection
    def inspect(self, name: str, source: str) -> tuple[str, AdapterMeta]:
        """Resolve and validate (header-level) on the controller; typed error if refused."""
        if not isinstance(name, str) or not name.strip():
            raise RequestError("name: an adapter needs a non-empty name", field="name")
        if not isinstance(source, str) or not source:
            raise RequestError(f"source: adapter {name!r} needs a source path or hub id",
                               field="source")
        return inspect_adapter(source, self.spec, self.config)

    def next_version(self, name: str) -> int:
        """Versions never repeat for a name, so an old one can stay resident beside a new one."""
        version = self._versions.get(name, 0) + 1
        self._versions[name] = version
        return version

    # ---------------------------------------------------------------- rank commands
    def _run(self, build: Callable[[int], AdapterCommand]) -> list[Any]:
        replies = self._send_all(build)
        err = _first_error(replies)
        if err is not None:
            raise err
        return [r.result for r in replies]

    def load_locked(self, key: AdapterKey, path: str, *, update: bool = False) -> list[LoadResult]:
        """Read ``key`` into every rank's host cache (room must exist); atomic across ranks."""
        name, version = key
        if update:
            replies = self._send_all(lambda seq: UpdateAdapter(seq=seq, name=name, version=version,
                                                               path=path))
        else:
            replies = self._send_all(lambda seq: LoadAdapter(seq=seq, name=name, version=version,
                                                             path=path))
        err = _first_error(replies)
        if err is not None:
            # Ranks that succeeded drop their copy again: all or nothing.
            self._run(lambda seq: DropAdapter(seq=seq, name=name, version=version))
            raise err
        self.residency.added_to_host(key)
        self.paths[key] = path
        return [r.result for r in replies if isinstance(r.result, LoadResult)]

    def drop_locked(self, key: AdapterKey, *, evicted: bool = True) -> None:
        self._run(lambda seq: DropAdapter(seq=seq, name=key[0], version=key[1]))
        self.residency.dropped(key, evicted=evicted)
        if not self._is_current(key) and not self.bound[key]:
            self.paths.pop(key, None)

    def make_host_room_locked(self) -> bool:
        """Drop LRU versions until one more fits; False when everything left is held."""
        while self.residency.host_full():
            victim = self.residency.host_victim()
            if victim is None:
                return False
            self.drop_locked(victim)
        return True

    def place_locked(self, key: AdapterKey, slot: int) -> None:
        self._run(lambda seq: PlaceAdapter(seq=seq, name=key[0], version=key[1], slot=slot))
        self.residency.placed(key, slot)

    def flush_drops_locked(self) -> None:
        """Drop old versions whose last sequence finished (queued by ``unbind``)."""
        drops, self._pending_drops = self._pending_drops, []
        for key in drops:
            if not self.bound[key] and not self._is_current(key):
                self.residency.protected.discard(key)
                if self.residency.on_host(key):
                    self.drop_locked(key, evicted=False)
                self.paths.pop(key, None)

    def _is_current(self, key: AdapterKey) -> bool:
        rec = self.records.get(key[0])
        return rec is not None and rec.version == key[1]

    def retire_locked(self, key: AdapterKey) -> None:
        """``key`` is no longer current: drop it now, or once its last sequence finishes."""
        self.residency.user_pinned.discard(key)
        if self.bound[key]:
            self.residency.protected.add(key)
        else:
            self._pending_drops.append(key)
            self.flush_drops_locked()

    # ---------------------------------------------------------------- SlotProvider
    def acquire(self, name: str, bound: AdapterKey | None) -> tuple[AdapterKey, int] | None:
        """Called by the scheduler with both locks held (inside the step loop)."""
        if bound is None:
            rec = self.records.get(name)
            if rec is None:
                raise UnknownAdapterError(f"adapter {name!r} is not registered (it was unloaded)",
                                          name=name)
            key = rec.key
        else:
            key = bound
        slot = self.residency.slot_of(key)
        if slot is None:
            if self.residency.slots_all_user_pinned_except(key):
                raise CapacityError(
                    f"adapter {name!r}: every device slot ({self.config.max_loras}) is held by "
                    f"pin_adapter; unpin one to serve other adapters", name=name)
            slot = self.residency.free_slot()
            if slot is None:
                return None  # every slot is pinned by running sequences: wait
            self.residency.device_counters.misses += 1
            if not self.residency.on_host(key):
                self.residency.host_counters.misses += 1
                if not self.make_host_room_locked():
                    return None
                self._reload_locked(key)
            else:
                self.residency.host_counters.hits += 1
            self.place_locked(key, slot)
        else:
            self.residency.device_counters.hits += 1
        self.residency.pin(key)
        self.residency.touch(key)
        if bound is None:
            self.bound[key] += 1
        return key, slot

    def release(self, key: AdapterKey) -> None:
        self.residency.unpin(key)

    def unbind(self, key: AdapterKey) -> None:
        self.bound[key] -= 1
        if self.bound[key] <= 0:
            del self.bound[key]
            if not self._is_current(key):
                # Commands need the exec lock, which the caller may not hold: defer.
                self._pending_drops.append(key)

    def _reload_locked(self, key: AdapterKey) -> None:
        """Bring a version back from its source after LRU eviction (transparent to callers)."""
        rec = self.records.get(key[0])
        start = time.perf_counter()
        try:
            results = self.load_locked(key, self.paths[key])
        except LoRAClusterError as err:
            if rec is not None and rec.version == key[1]:
                rec.error = f"reload failed: {err}"
            raise
        if rec is not None and rec.version == key[1]:
            rec.record_load(results, (time.perf_counter() - start) * 1e3)

    def ensure_device_locked(self, key: AdapterKey) -> int:
        """Make ``key`` device-resident now (pin_adapter); CapacityError if no slot can be had."""
        slot = self.residency.slot_of(key)
        if slot is not None:
            return slot
        slot = self.residency.free_slot()
        if slot is None or (not self.residency.on_host(key) and not self.make_host_room_locked()):
            raise CapacityError(
                f"adapter {key[0]!r}: no device slot can be freed (all {self.config.max_loras} "
                f"are pinned by running requests or pin_adapter)", name=key[0])
        if not self.residency.on_host(key):
            self._reload_locked(key)
        self.place_locked(key, slot)
        return slot

    def restore_locked(self) -> None:
        """After a rank-group restart: reload every host version and re-place device ones."""
        host = list(self.residency.host_lru)
        device = dict(self.residency.device_lru)
        user_pinned = set(self.residency.user_pinned)
        for key in host:
            self.residency.dropped(key, evicted=False)
            self.residency.protected.discard(key)
        for key in host:
            try:
                self._reload_locked(key)
            except AdapterError:
                continue  # its source went bad: recorded on the adapter, retried on next use
            if key in device:
                self.place_locked(key, device[key])
        self.residency.user_pinned = user_pinned
        for key in self.bound:
            if not self._is_current(key):
                self.residency.protected.add(key)

    # ---------------------------------------------------------------- views
    def residency_of(self, rec: AdapterRecord) -> ResidencyName:
        key = rec.key
        if self.residency.slot_of(key) is not None:
            return "device"
        if self.residency.on_host(key):
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
                       "load_breakdown_ms": dict(rec.load_breakdown_ms)}
            for rec in self.records.values()
        }
        return {"adapters": per_adapter, "tiers": self.residency.stats(),
                "failed_loads_by_cause": dict(self.failed.by_cause),
                "old_versions_in_use": {f"{k[0]}@v{k[1]}": n for k, n in self.bound.items()
                                        if not self._is_current(k)}}
