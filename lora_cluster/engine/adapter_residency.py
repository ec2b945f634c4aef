"""Tier decisions of ``AdapterControl`` mirrored on the ranks: host loads, placements, drops.

A mixin: ``AdapterControl`` (``engine/adapter_control.py``) holds the state and documents the
locking. Each decision the tiers make is sent to every rank (``adapter_commands``) and undone
in the tiers if a rank refuses it, so the controller's view equals each rank's; while a step
is planned (``riding``) placements and drops ride on that step instead
(``engine/step_ops.py``), and so does the load of a prefetched version the output rank
reported read (``prefetch.ready``): no round trip, and — with asynchronous steps — no wait
for the step in flight.

Prefetch (``engine/prefetch.py``) may admit a version to the host tier ahead of its first
request, under ``lock`` alone: it is then in ``prefetch.admitted`` (the ranks are reading it
beside the stream) until a ``LoadAdapter`` confirms it, and the victims that made room for it
wait in ``prefetch.queued_drops`` until the next command or step under ``exec_lock``, which
carries their drops first, so a rank's host cache follows the tiers before a load needs room.
Old versions no sequence uses any more wait in ``_pending_drops`` for the same reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from lora_cluster.adapters import AdapterTiers
from lora_cluster.config import ClusterConfig
from lora_cluster.engine.adapter_commands import AdapterCommands, first_error
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
from lora_cluster.engine.registry import AdapterRecord
from lora_cluster.engine.step_ops import StepOp, StepOps
from lora_cluster.errors import LoRAClusterError

logger = logging.getLogger("lora_cluster.engine")


def tier_id(key: AdapterKey) -> str:
    """The tiers' name for one adapter version."""
    return f"{key[0]}@v{key[1]}"


class AdapterResidency:
    """Loads, placements and drops of adapter versions on every rank (mixed into
    ``AdapterControl``; methods named ``*_locked`` expect both locks)."""

    config: ClusterConfig
    records: dict[str, AdapterRecord]
    tiers: AdapterTiers
    keys: dict[str, AdapterKey]
    paths: dict[AdapterKey, str]
    bound: Counter[AdapterKey]
    reload_failures_by_cause: Counter[str]
    prefetch: PrefetchBook
    step_ops: StepOps
    commands: AdapterCommands
    _pending_drops: list[AdapterKey]

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
