"""The controller's adapter side: registry, tier decisions, and the commands that mirror them.

Tier decisions come from ``adapters.AdapterTiers`` (LRU at both tiers, in-flight refs, pins),
keyed by adapter *version* so an old version can stay resident beside a new one. Each
decision is sent to every rank (``adapter_commands``) and undone in the tiers if a rank
refuses it, so the controller's view equals each rank's; while a step is planned
(``riding``) placements and drops ride on that step instead (``engine/step_ops.py``), and so
does the load of a prefetched version the output rank reported read (``prefetch.ready``):
no round trip, and — with asynchronous steps — no wait for the step in flight. Also the
scheduler's ``SlotProvider``: a sequence
binds the current version of its adapter at first admission and keeps it until it finishes;
an old version that bound sequences still use is held (a tier pin) until the last finishes.

Prefetch (``engine/prefetch.py``) may admit a version to the host tier ahead of its first
request, under ``lock`` alone: it is then in ``prefetch.admitted`` (the ranks are reading it
beside the stream) until a ``LoadAdapter`` confirms it, and the victims that made room for it
wait in ``prefetch.queued_drops`` until the next command or step under ``exec_lock``, which
carries their drops first, so a rank's host cache follows the tiers before a load needs room.

Locking (owned by ``ControllerCore``): ``exec_lock`` serializes everything sent to the ranks
(steps and adapter commands: an adapter never changes in the middle of a step); ``lock``
guards the state. Order is always exec_lock → lock. Methods named ``*_locked`` expect both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from lora_cluster.adapters import AdapterTiers, FailedLoads
from lora_cluster.api_types import AdapterInfo
from lora_cluster.api_types import Residency as ResidencyName
from lora_cluster.config import ClusterConfig
from lora_cluster.engine.adapter_commands import AdapterCommands, SendAll, first_error
from lora_cluster.engine.adapter_source import inspect_adapter
from lora_cluster.engine.messages import (
    AdapterCommand,
    AdapterKey,
    DropAdapter,
    LoadAdapter,
    LoadResult,
    PlaceAdapter,
    PlaceResult,
)
from lora_cluster.engine.prefetch_book import PrefetchBook
from lora_cluster.engine.registry import AdapterMeta, AdapterRecord
from lora_cluster.engine.step_ops import StepOp, StepOps
from lora_cluster.errors import (
    AdapterError,
    CapacityError,
    LoRAClusterError,
    RequestError,
    UnknownAdapterError,
)
from lora_cluster.model.spec import ModelSpec

logger = logging.getLogger("lora_cluster.engine")

def tier_id(key: AdapterKey) -> str:
    """The tiers' name for one adapter version."""
    return f"{key[0]}@v{key[1]}"


class AdapterControl:
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

    # ---------------------------------------------------------------- rank commands
    def _run(self, build: Callable[[int], AdapterCommand]) -> list[Any]:
        return self.commands.run(build)

    def send_queued_drops(self) -> None:
        self.commands.send_queued_drops()

    @contextlib.contextmanager
    def riding(self) -> Iterator[StepOps]:
        """Record placements and drops for the step being planned (caller holds both locks);
        what the caller has not taken (``step_ops.take()``) is sent standalone on exit."""
        self.step_ops.begin()
        try:
            yield self.step_ops
        finally:
            unloaded: set[AdapterKey] = set()
            for op in self.step_ops.take():
                if isinstance(op, LoadAdapter):
                    if not self._load_now(op):
                        unloaded.add(op.key)
                elif isinstance(op, PlaceAdapter):
                    if op.key in unloaded:
                        with contextlib.suppress(LoRAClusterError):
                            self.tiers.evict_device(tier_id(op.key))
                    else:
                        self._place_now(op.key, op.slot)
                else:
                    self.commands.send_quietly(op, "planned with no step to ride")

    def ops_applied(self, ops: tuple[StepOp, ...], results: tuple[Any, ...]) -> None:
        """Record the ranks' reports on the ops a finished step carried."""
        for i, op in enumerate(ops):
            # (a test double may report no results)
            if isinstance(op, PlaceAdapter):
                self._record_place(op.key, list(results[i:i + 1]))
            elif isinstance(op, LoadAdapter):
                self._record_ridden_load(op.key, results[i] if i < len(results) else None)

    # ---------------------------------------------------------------- ridden loads
    def _can_ride(self, key: AdapterKey) -> bool:
        """A prefetched version the output rank reported read, while a step is planned."""
        return (self.step_ops.open and key in self.prefetch.ready
                and key in self.prefetch.admitted)

    def _ride_load(self, key: AdapterKey) -> None:
        """Confirm ``key`` by a load riding on the step being planned (its host-tier entry
        was made when it was read ahead); the outcome is recorded when the step lands."""
        path = self.prefetch.admitted[key]
        self.prefetch.confirm(key)
        self.keys[tier_id(key)] = key
        self.paths[key] = path
        self.step_ops.load(key, path)

    def _record_ridden_load(self, key: AdapterKey, result: Any) -> None:
        self.prefetch.record_ridden(result if isinstance(result, LoadResult) else None)
        rec = self.records.get(key[0])
        if rec is None or rec.version != key[1] or not isinstance(result, LoadResult):
            return
        known = rec.bytes_per_rank
        rec.record_load([result], result.total_ms)  # the output rank's report only
        if self.config.world_size > 1 and known:
            rec.bytes_per_rank = known

    def ridden_load_failed(self, key: AdapterKey, cause: LoRAClusterError) -> None:
        """A step failed on its ridden load of ``key`` (the group is rebuilt from the tiers,
        where a reload of a bad source fails again and is left out)."""
        self.reload_failures_by_cause[cause.code] += 1
        rec = self.records.get(key[0])
        if rec is not None and rec.version == key[1]:
            rec.error = f"reload failed: {cause}"

    def _load_now(self, op: LoadAdapter) -> bool:
        """A ridden load planned with no step to ride: send it alone; undone on a refusal."""
        replies = self.commands.send(lambda seq: dataclasses.replace(op, seq=seq))
        err = first_error(replies)
        if err is None:
            for reply in replies[:1]:
                self._record_ridden_load(op.key, reply.result)
            return True
        logger.warning("load of %s@v%d (planned with no step to ride) failed: %s",
                       op.name, op.version, err)
        self.tiers.remove(tier_id(op.key))
        self._drop_on_ranks(op.key)
        self._forget_if_dead(op.key)
        return False

    def _drop_on_ranks(self, key: AdapterKey) -> None:
        self.prefetch.forget(key)
        if self.step_ops.open:
            self.step_ops.drop(key)
            return
        self._run(lambda seq: DropAdapter(seq=seq, name=key[0], version=key[1]))

    def load_locked(self, key: AdapterKey, path: str) -> list[LoadResult]:
        """Admit ``key`` to the host tier (dropping LRU victims) and read it on every rank,
        all or nothing. CapacityError when every host entry is held. A prefetched version is
        already admitted: the load confirms it (the ranks take what they read ahead)."""
        tid = tier_id(key)
        confirming = self.prefetch.confirm(key)
        if not confirming:
            for victim in self.tiers.admit_host(tid):
                self._drop_on_ranks(self.keys[victim])
                self._forget_if_dead(self.keys[victim])
        self.keys[tid] = key
        name, version = key
        replies = self.commands.send(lambda seq: LoadAdapter(seq=seq, name=name, version=version,
                                                     path=path))
        self.prefetch.record_load(replies, confirming)
        err = first_error(replies)
        if err is not None:
            # Ranks that succeeded drop their copy again: all or nothing.
            self.tiers.remove(tid)
            self._drop_on_ranks(key)
            self._forget_if_dead(key)
            raise err
        self.paths[key] = path
        return [r.result for r in replies if isinstance(r.result, LoadResult)]

    def _place_locked(self, key: AdapterKey) -> int:
        """Give host-resident ``key`` a device slot (CapacityError if every slot is held)."""
        tid = tier_id(key)
        hit = self.tiers.slot_of(tid) is not None
        placement = self.tiers.acquire(tid)  # a hit only refreshes its LRU position
        if hit:
            return placement.slot
        if self.step_ops.open:
            self.step_ops.place(key, placement.slot)  # the step carries it; its result later
        else:
            self._place_now(key, placement.slot)
        return placement.slot

    def _place_now(self, key: AdapterKey, slot: int) -> None:
        """Send a placement the tiers already made; undone in the tiers if a rank refuses."""
        try:
            results = self._run(lambda seq: PlaceAdapter(seq=seq, name=key[0], version=key[1],
                                                         slot=slot))
        except LoRAClusterError:
            self.tiers.evict_device(tier_id(key))
            raise
        self._record_place(key, results)

    def _record_place(self, key: AdapterKey, results: list[Any]) -> None:
        rec = self.records.get(key[0])
        if rec is not None and rec.version == key[1]:
            rec.place_ms = max((r.ms for r in results if isinstance(r, PlaceResult)), default=0.0)
            rec.places += 1

    def _forget_if_dead(self, key: AdapterKey) -> None:
        """Forget the path of a version nothing will ever load again."""
        if not self._is_current(key) and not self.bound[key]:
            self.paths.pop(key, None)
            self.keys.pop(tier_id(key), None)

    def _is_current(self, key: AdapterKey) -> bool:
        rec = self.records.get(key[0])
        return rec is not None and rec.version == key[1]

    def flush_drops_locked(self) -> None:
        """Drop old versions whose last sequence finished (queued by ``unbind``) and the
        victims prefetch evicted."""
        self.send_queued_drops()
        drops, self._pending_drops = self._pending_drops, []
        for key in drops:
            if self.bound[key] or self._is_current(key):
                continue
            tid = tier_id(key)
            self.tiers.unpin(tid)
            if self.tiers.in_host(tid):
                self.tiers.remove(tid)
                self._drop_on_ranks(key)
            self._forget_if_dead(key)

    def retire_locked(self, key: AdapterKey) -> None:
        """``key`` is no longer current: drop it now, or once its last sequence finishes."""
        tid = tier_id(key)
        if self.bound[key]:
            # Held until then: its source may already hold other weights.
            if self.tiers.in_host(tid):
                self.tiers.pin(tid)
        else:
            self.tiers.unpin(tid)
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
        tid = tier_id(key)
        if self.tiers.slot_of(tid) is None:
            slots = self.tiers.device_slots()
            if all(s is not None and self.tiers.is_pinned(s) for s in slots):
                raise CapacityError(
                    f"adapter {name!r}: every device slot ({self.config.max_loras}) is held by "
                    f"pin_adapter; unpin one to serve other adapters", name=name)
            if not any(s is None or not self.tiers.held(s) for s in slots):
                return None  # every slot serves running sequences: wait for one to finish
            if self._can_ride(key):
                self._ride_load(key)  # read on every rank already: no round trip
            elif not self.tiers.in_host(tid) or key in self.prefetch.admitted:
                try:
                    self._reload_locked(key)
                except CapacityError:
                    return None  # the host cache is full of held versions: wait
        slot = self._place_locked(key)
        self.tiers.retain(tid)
        if bound is None:
            self.bound[key] += 1
        return key, slot

    def release(self, key: AdapterKey) -> None:
        self.tiers.release(tier_id(key))

    def unbind(self, key: AdapterKey) -> None:
        self.bound[key] -= 1
        if self.bound[key] <= 0:
            del self.bound[key]
            if not self._is_current(key):
                # Commands need the exec lock, which the caller may not hold: defer.
                self._pending_drops.append(key)

    def _reload_locked(self, key: AdapterKey) -> None:
        """Bring a version (back) from its source into the host tier, recording the outcome."""
        rec = self.records.get(key[0])
        current = rec is not None and rec.version == key[1]
        start = time.perf_counter()
        try:
            results = self.load_locked(key, self.paths[key])
        except AdapterError as err:
            self.reload_failures_by_cause[err.code] += 1
            if current and rec is not None:
                rec.error = f"reload failed: {err}"
            raise
        if current and rec is not None:
            rec.record_load(results, (time.perf_counter() - start) * 1e3)

    def ensure_device_locked(self, key: AdapterKey) -> int:
        """Make ``key`` device-resident now (pin_adapter); CapacityError if impossible."""
        if not self.tiers.in_host(tier_id(key)) or key in self.prefetch.admitted:
            self._reload_locked(key)
        return self._place_locked(key)

    def pin_locked(self, key: AdapterKey) -> None:
        self.ensure_device_locked(key)
        self.tiers.pin(tier_id(key))

    def restore_locked(self) -> None:
        """After a rank-group restart (fresh, empty ranks): reload what was host-resident, in
        LRU order, re-place what was on the device, and re-apply pins."""
        old = self.tiers
        # Half-staged update versions are gone with the old ranks: their updates fail.
        # Prefetched versions are not reloaded (their requests load them when admitted).
        host = [self.keys[t] for t in old.host_names()
                if self.keys[t] not in self.staging and self.keys[t] not in self.prefetch.admitted]
        self.staging.clear()
        self.prefetch.reset()
        device = {self.keys[t] for t in old.device_slots() if t is not None}
        pinned = {self.keys[t] for t in old.host_names() if old.is_pinned(t)}
        self.tiers = AdapterTiers(self.config.max_loras, self.config.max_cpu_loras)
        self.tiers.device_stats, self.tiers.host_stats = old.device_stats, old.host_stats
        for key in host:
            try:
                self._reload_locked(key)
            except AdapterError:
                continue  # its source went bad: recorded on the adapter, retried on next use
            if key in device:
                self._place_locked(key)
            if key in pinned:
                self.tiers.pin(tier_id(key))

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
