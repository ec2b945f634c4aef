"""In-place adapter updates on the controller: stage a new version layer group by layer group
on every rank while steps keep running, then switch at a step boundary.

Protocol (one update; ``exec`` = the core's rank-command lock, ``lock`` = its state lock):

1. ``begin`` (exec + lock): a new version number; the version takes a host-tier entry now,
   held by a tier pin until the switch (LRU victims are dropped on the ranks first), so the
   staging memory is accounted like any adapter's.
2. One ``UpdateAdapter(layers=group, final=False)`` per layer group (exec only): each rank
   reads ONLY those layers' tensors into its staging. Between two groups the updater gives
   the step loop one step, so a long read never stalls serving for the whole file.
3. ``UpdateAdapter(final=True)`` (exec), then the switch (exec + lock, same critical section):
   the registry's version pointer flips. Sequences admitted before keep the old version,
   which stays resident (tier-pinned) until the last one finishes; later ones bind the new
   one — a sequence never sees both.

A failure anywhere (a rank's typed error, a dead rank, the adapter evicted meanwhile, the
rank group rebuilt mid-update) drops the new version's staging on every rank, frees its tier
entry and re-raises the typed error: the old version never stopped serving.

Groups are cut from the header's bytes per layer (``AdapterMeta.layer_bytes``), about
``chunk_bytes`` each, in ascending layer order; an adapter that fits in one group (or whose
sizes are unknown) is staged by a single final command.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from lora_cluster.api_types import AdapterInfo
from lora_cluster.engine.adapter_control import AdapterControl, tier_id
from lora_cluster.engine.messages import AdapterKey, DropAdapter, LoadResult, UpdateAdapter
from lora_cluster.engine.registry import AdapterMeta
from lora_cluster.errors import ClusterError, LoRAClusterError, UnknownAdapterError

logger = logging.getLogger("lora_cluster.engine")

DEFAULT_CHUNK_BYTES = 16 << 20  # per update command: bounds how long one group holds the ranks

Locks = Callable[[], AbstractContextManager[Any]]


def plan_layer_groups(layer_bytes: Mapping[int, int], chunk_bytes: int) -> list[tuple[int, ...]]:
    """Decoder layers, ascending, cut into groups of at least ``chunk_bytes`` (the last may
    be smaller); [] when the whole adapter fits one group (one final command does it)."""
    layers = sorted(x for x in layer_bytes if x is not None)
    if sum(layer_bytes.values()) <= chunk_bytes:
        return []
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    size = 0
    for layer in layers:
        current.append(layer)
        size += layer_bytes[layer]
        if size >= chunk_bytes:
            groups.append(tuple(current))
            current, size = [], 0
    if current:
        groups.append(tuple(current))
    return groups


@dataclass
class UpdateRecord:
    """What stats() tells about an adapter's last update."""

    version: int
    groups: int
    wall_ms: float
    steps_between: int
    outcome: str  # "ok" or the error code


class LayerwiseUpdater:
    """Runs the protocol above against one ``AdapterControl`` (see module docstring)."""

    def __init__(self, adapters: AdapterControl, *, exec_lock: Locks, state_lock: Locks,
                 yield_to_steps: Callable[[], int]) -> None:
        self.adapters = adapters
        self._exec = exec_lock  # fair: a waiting updater goes before the next step
        self._state = state_lock
        self._yield = yield_to_steps
        self.chunk_bytes = DEFAULT_CHUNK_BYTES
        self.last: dict[str, UpdateRecord] = {}
        self.in_progress: dict[str, AdapterKey] = {}

    def run(self, name: str, source: str, path: str, meta: AdapterMeta) -> AdapterInfo:
        """Stage ``path`` as ``name``'s next version and switch to it (module docstring)."""
        groups = plan_layer_groups(dict(meta.layer_bytes), self.chunk_bytes)
        start = time.perf_counter()
        steps = 0
        with self._state():
            self.adapters.record(name)  # still registered (UnknownAdapterError otherwise)
            key = (name, self.adapters.next_version(name))
        try:
            with self._exec(), self._state():
                self._begin(key, path)
            for layers in groups:
                with self._exec():
                    self._check_staging(key)
                    self._send(key, path, layers=layers, final=False)
                steps += self._yield()
            with self._exec():
                self._check_staging(key)
                results = self._send(key, path, layers=None, final=True)
                with self._state():
                    info = self._switch(key, source, path, meta, results,
                                        (time.perf_counter() - start) * 1e3)
        except BaseException as exc:  # typed or not, nothing of the new version may stay
            self._abort(key)
            code = exc.code if isinstance(exc, LoRAClusterError) else type(exc).__name__
            with self._state():
                self.adapters.update_failures_by_cause[code] += 1
            self._record(name, key, groups, start, steps, code)
            raise
        self._record(name, key, groups, start, steps, "ok")
        return info

    # ---------------------------------------------------------------- steps of the protocol
    def _begin(self, key: AdapterKey, path: str) -> None:
        ac = self.adapters
        tid = tier_id(key)
        victims = ac.tiers.admit_host(tid)  # CapacityError: every host entry is held
        ac.tiers.pin(tid)  # no LRU eviction of a version that is half staged
        ac.keys[tid] = key
        ac.paths[key] = path
        ac.staging.add(key)
        self.in_progress[key[0]] = key
        for victim in victims:
            ac._drop_on_ranks(ac.keys[victim])
            ac._forget_if_dead(ac.keys[victim])

    def _check_staging(self, key: AdapterKey) -> None:
        if key not in self.adapters.staging:
            # restore_locked() forgot it: the ranks were rebuilt and lost the staged layers.
            raise ClusterError(f"adapter {key[0]!r}: the rank group was rebuilt during the "
                               f"update to version {key[1]}; nothing changed, retry it",
                               name=key[0])

    def _send(self, key: AdapterKey, path: str, *, layers: tuple[int, ...] | None,
              final: bool) -> list[LoadResult]:
        name, version = key
        return [r for r in self.adapters._run(lambda seq: UpdateAdapter(
            seq=seq, name=name, version=version, path=path, layers=layers, final=final))
            if isinstance(r, LoadResult)]

    def _switch(self, key: AdapterKey, source: str, path: str, meta: AdapterMeta,
                results: list[LoadResult], wall_ms: float) -> AdapterInfo:
        """Flip the version pointer (caller holds exec + lock: a step boundary)."""
        ac = self.adapters
        rec = ac.records.get(key[0])
        if rec is None:
            raise UnknownAdapterError(f"adapter {key[0]!r} was evicted during its update",
                                      name=key[0])
        old_key = rec.key
        tid = tier_id(key)
        ac.staging.discard(key)
        ac.tiers.unpin(tid)
        rec.version, rec.source, rec.path, rec.meta = key[1], source, path, meta
        rec.record_load(results, wall_ms)
        rec.updates += 1
        ac.retire_locked(old_key)
        if rec.pinned:
            try:
                ac.pin_locked(key)
            except LoRAClusterError as err:  # the switch stands; the user pin is lost
                rec.pinned = False
                rec.error = (f"re-pinning version {key[1]} after the update failed: {err}; "
                             f"pin_adapter again")
                logger.warning("adapter %r: %s", key[0], rec.error)
        return rec.info(ac.residency_of(rec))

    def _abort(self, key: AdapterKey) -> None:
        """Free the new version everywhere; the old one never stopped serving."""
        ac = self.adapters
        with self._exec(), self._state():
            tid = tier_id(key)
            ac.staging.discard(key)
            if ac.tiers.in_host(tid):
                ac.tiers.unpin(tid)
                ac.tiers.remove(tid)
            try:
                ac._run(lambda seq: DropAdapter(seq=seq, name=key[0], version=key[1]))
            except LoRAClusterError as err:  # a dead rank: the next step rebuilds the group
                logger.warning("adapter %r: dropping the failed update's staging: %s", key[0], err)
            ac._forget_if_dead(key)

    def _record(self, name: str, key: AdapterKey, groups: list[tuple[int, ...]], start: float,
                steps: int, outcome: str) -> None:
        self.in_progress.pop(name, None)
        self.last[name] = UpdateRecord(version=key[1], groups=len(groups) + 1,
                                       wall_ms=(time.perf_counter() - start) * 1e3,
                                       steps_between=steps, outcome=outcome)

    def stats(self) -> dict[str, Any]:
        return {"in_progress": {n: k[1] for n, k in self.in_progress.items()},
                "last": {n: dataclasses.asdict(r) for n, r in self.last.items()},
                "chunk_bytes": self.chunk_bytes}
