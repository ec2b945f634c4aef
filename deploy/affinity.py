"""Adapter-affine replica ranking: the routing policy as pure functions (no Ray).

Policy, for a request naming adapter ``a``:
1. Replicas holding ``a`` and not saturated (ongoing requests < ``spill_threshold``), by tier:
   device slot first, then host cache, then registered-but-on-disk.
2. If every holder is saturated, the holders *and* the unsaturated non-holders form one
   rank, so the least-loaded of them wins: a hot adapter spreads to more replicas instead
   of piling onto the one that has it (the hot-spot of plain multiplexing).
3. No holder anywhere (cold adapter) or a base-model request: the least-loaded replica.
A last rank of every replica keeps a request from starving when the preferred ones are
full (Serve's router then picks the least loaded replica that accepts it).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

TIERS = ("device", "host", "disk")
_decisions: Counter[str] = Counter()
_decisions_lock = threading.Lock()


@dataclass(frozen=True)
class ReplicaLoad:
    """What the router knows of one replica: its load and which adapters it holds where."""

    replica_id: Hashable
    load: int
    device: frozenset[str] = frozenset()
    host: frozenset[str] = frozenset()
    disk: frozenset[str] = frozenset()

    def tier_of(self, adapter: str) -> str | None:
        for tier in TIERS:
            if adapter in getattr(self, tier):
                return tier
        return None


def rank_replicas(adapter: str | None, replicas: Sequence[ReplicaLoad],
                  spill_threshold: int) -> list[list[Hashable]]:
    """Ranked candidate lists (most preferred first) of replica ids for one request."""
    if not replicas:
        return []
    by_load = sorted(replicas, key=lambda r: r.load)
    everyone = [r.replica_id for r in by_load]
    if not adapter:
        return [everyone]
    holders = [r for tier in TIERS for r in by_load if r.tier_of(adapter) == tier]
    if not holders:
        return [everyone]
    ranks: list[list[Hashable]] = []
    for tier in TIERS:
        fresh = [r.replica_id for r in holders
                 if r.tier_of(adapter) == tier and r.load < spill_threshold]
        if fresh:
            ranks.append(fresh)
    if not ranks:
        held = {r.replica_id for r in holders}
        idle_others = [r.replica_id for r in by_load
                       if r.replica_id not in held and r.load < spill_threshold]
        ranks.append([r.replica_id for r in holders] + idle_others)
    ranks.append(everyone)
    return ranks


def classify(adapter: str | None, chosen: ReplicaLoad | None,
             replicas: Sequence[ReplicaLoad]) -> str:
    """Name the routing outcome: base, device_hit, host_hit, disk_hit, spill or cold."""
    if not adapter:
        return "base"
    tier = chosen.tier_of(adapter) if chosen is not None else None
    if tier is not None:
        return f"{tier}_hit"
    if any(r.tier_of(adapter) for r in replicas):
        return "spill"
    return "cold"


def record_decision(decision: str) -> None:
    """Count one routing outcome in this process's tally."""
    with _decisions_lock:
        _decisions[decision] += 1


def routing_decisions() -> dict[str, int]:
    """This process's routing outcomes so far (device_hit, host_hit, spill, cold, base...)."""
    with _decisions_lock:
        return dict(_decisions)
