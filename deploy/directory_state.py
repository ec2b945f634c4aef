"""What every replica of the app agrees on: registered adapters, plus each replica's last report.

Plain bookkeeping (no Ray, no asyncio): the ``AdapterDirectory`` deployment wraps it. A
``generation`` counter grows on every registry change so replicas can long-poll for changes
and acknowledge them; ``epoch`` changes when the directory restarts (state lost), telling
replicas to announce what they hold again.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lora_cluster.api_types import AdapterInfo
from lora_cluster.errors import RequestError, UnknownAdapterError


@dataclass(frozen=True)
class AdapterEntry:
    """One registered adapter: where it comes from and its app-wide version."""

    name: str
    source: str
    version: int
    info: AdapterInfo | None = None  # as validated by the replica that first loaded it


@dataclass(frozen=True)
class DirectoryView:
    """The registry as a replica needs it: name -> (source, version)."""

    epoch: str
    generation: int
    adapters: dict[str, tuple[str, int]]


@dataclass(frozen=True)
class ReplicaReport:
    """A replica's last heartbeat: its stats and the registry generation it has applied."""

    replica_id: str
    stats: dict[str, Any]
    acked_generation: int
    seen_at: float


@dataclass(frozen=True)
class DirectorySnapshot:
    """Everything the ingress shows: adapters, live replicas' reports, router decisions."""

    epoch: str
    generation: int
    adapters: tuple[AdapterEntry, ...]
    replicas: tuple[ReplicaReport, ...]
    router_decisions: dict[str, int] = field(default_factory=dict)


class DirectoryState:
    """The registry and the replica reports (single-threaded: its owner serializes calls)."""

    def __init__(self, *, stale_after_s: float = 5.0, forget_after_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.epoch = uuid.uuid4().hex
        self.generation = 0
        self.stale_after_s = stale_after_s
        self.forget_after_s = forget_after_s
        self._clock = clock
        self.adapters: dict[str, AdapterEntry] = {}
        self.replicas: dict[str, ReplicaReport] = {}
        self.router_decisions: dict[str, dict[str, int]] = {}

    # ---------------------------------------------------------------- registry
    def lookup(self, name: str) -> AdapterEntry | None:
        return self.adapters.get(name)

    def register(self, name: str, source: str, info: AdapterInfo | None = None) -> AdapterEntry:
        """Record ``name`` (idempotent for the same source; another source is refused)."""
        entry = self.adapters.get(name)
        if entry is not None:
            if entry.source != source:
                raise RequestError(
                    f"adapter {name!r} is already registered from {entry.source!r}; unload it "
                    f"first or update it", field="lora_name", name=name)
            if entry.info is None and info is not None:
                entry = AdapterEntry(name, source, entry.version, info)
                self.adapters[name] = entry
            return entry
        entry = AdapterEntry(name=name, source=source, version=1, info=info)
        self.adapters[name] = entry
        self.generation += 1
        return entry

    def update(self, name: str, source: str, info: AdapterInfo | None = None) -> AdapterEntry:
        """New weights for a registered adapter: same name, next version."""
        old = self.adapters.get(name)
        if old is None:
            raise UnknownAdapterError(f"adapter {name!r} is not registered", name=name)
        entry = AdapterEntry(name=name, source=source, version=old.version + 1, info=info)
        self.adapters[name] = entry
        self.generation += 1
        return entry

    def remove(self, name: str) -> int:
        """Unregister ``name``; the generation replicas must acknowledge."""
        if self.adapters.pop(name, None) is None:
            raise UnknownAdapterError(f"adapter {name!r} is not registered", name=name)
        self.generation += 1
        return self.generation

    def view(self) -> DirectoryView:
        return DirectoryView(self.epoch, self.generation,
                             {n: (e.source, e.version) for n, e in self.adapters.items()})

    # ---------------------------------------------------------------- replicas
    def report(self, replica_id: str, stats: dict[str, Any], acked_generation: int) -> None:
        self.replicas[replica_id] = ReplicaReport(replica_id, stats, acked_generation,
                                                  self._clock())
        self._forget_gone()

    def report_router(self, router_id: str, decisions: dict[str, int]) -> None:
        self.router_decisions[router_id] = dict(decisions)

    def live(self) -> list[ReplicaReport]:
        """Replicas that reported within ``stale_after_s``."""
        now = self._clock()
        return [r for r in self.replicas.values() if now - r.seen_at <= self.stale_after_s]

    def unacked(self, generation: int) -> list[str]:
        """Live replicas that have not applied ``generation`` yet."""
        return sorted(r.replica_id for r in self.live() if r.acked_generation < generation)

    def _forget_gone(self) -> None:
        now = self._clock()
        for rid in [r for r, rep in self.replicas.items() if now - rep.seen_at > self.forget_after_s]:
            del self.replicas[rid]

    def snapshot(self) -> DirectorySnapshot:
        totals: dict[str, int] = {}
        for decisions in self.router_decisions.values():
            for kind, n in decisions.items():
                totals[kind] = totals.get(kind, 0) + n
        return DirectorySnapshot(
            epoch=self.epoch, generation=self.generation,
            adapters=tuple(sorted(self.adapters.values(), key=lambda e: e.name)),
            replicas=tuple(sorted(self.live(), key=lambda r: r.replica_id)),
            router_decisions=totals)
