"""Residency decisions for adapters: device slots over a host cache, LRU at both tiers, pins.

Pure bookkeeping (no torch): the controller decides with it, and ranks mirror its decisions.

    tiers = AdapterTiers(max_loras=8, max_cpu_loras=64)
    dropped = tiers.admit_host("sql")       # after loading into host memory; names dropped
    slot, evicted = tiers.acquire("sql")    # a device slot (``evicted``: whose slot it took)
    tiers.retain("sql") ... tiers.release("sql")   # in-flight requests (reference counted)
    tiers.pin("sql") / tiers.unpin("sql")          # user pins
    tiers.remove("sql")                     # unregistered: gone from both tiers

Invariants: every device-resident adapter is host-resident (device ⊆ host); an adapter that
is retained by in-flight requests or pinned is never evicted from either tier; ``acquire``
and ``admit_host`` raise ``errors.CapacityError`` (with the counts) when every candidate is
pinned. Eviction order is least recently used first; at the host tier, adapters that are not
on the device go before device-resident ones.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from lora_cluster.errors import CapacityError, ConfigError, RequestError


class Placement(NamedTuple):
    """Result of ``acquire``: the slot, and the adapter evicted from it (None if none)."""

    slot: int
    evicted: str | None


@dataclass
class TierStats:
    """Counters of one tier."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions}


class AdapterTiers:
    """Device slots (``max_loras``) over a host cache (``max_cpu_loras``); see module docstring."""

    def __init__(self, max_loras: int, max_cpu_loras: int) -> None:
        if max_loras < 1 or max_cpu_loras < max_loras:
            raise ConfigError(f"need 1 <= max_loras <= max_cpu_loras, got max_loras={max_loras}, "
                              f"max_cpu_loras={max_cpu_loras}", field="max_cpu_loras")
        self.max_loras, self.max_cpu_loras = max_loras, max_cpu_loras
        self._host: OrderedDict[str, None] = OrderedDict()   # LRU first
        self._device: OrderedDict[str, int] = OrderedDict()  # name → slot, LRU first
        self._free_slots = list(range(max_loras))
        self._refs: Counter[str] = Counter()
        self._pinned: set[str] = set()
        self.device_stats, self.host_stats = TierStats(), TierStats()

    # ---- queries --------------------------------------------------------------------
    def slot_of(self, name: str) -> int | None:
        return self._device.get(name)

    def in_host(self, name: str) -> bool:
        return name in self._host

    def is_pinned(self, name: str) -> bool:
        return name in self._pinned

    def in_flight(self, name: str) -> int:
        """Number of in-flight requests holding ``name``."""
        return self._refs[name]

    def held(self, name: str) -> bool:
        """Pinned by a user or retained by in-flight requests: not evictable."""
        return name in self._pinned or self._refs[name] > 0

    def device_slots(self) -> list[str | None]:
        """slot → adapter name (None = free)."""
        slots: list[str | None] = [None] * self.max_loras
        for name, slot in self._device.items():
            slots[slot] = name
        return slots

    def host_names(self) -> list[str]:
        """Host-resident adapters, least recently used first."""
        return list(self._host)

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            "device": {**self.device_stats.as_dict(), "resident": len(self._device),
                       "capacity": self.max_loras},
            "host": {**self.host_stats.as_dict(), "resident": len(self._host),
                     "capacity": self.max_cpu_loras},
        }

    # ---- host tier ------------------------------------------------------------------
    def admit_host(self, name: str) -> list[str]:
        """Make ``name`` host-resident (most recent); returns the adapters dropped from the host
        tier (and so from their device slots) to make room."""
        if name in self._host:
            self.host_stats.hits += 1
            self._host.move_to_end(name)
            return []
        self.host_stats.misses += 1
        dropped: list[str] = []
        while len(self._host) >= self.max_cpu_loras:
            victim = self._host_victim(name)
            self._drop(victim)
            self.host_stats.evictions += 1
            dropped.append(victim)
        self._host[name] = None
        return dropped

    def _host_victim(self, incoming: str) -> str:
        free = [n for n in self._host if not self.held(n)]
        if not free:
            raise self._full("host cache", self.max_cpu_loras, list(self._host), incoming)
        return next((n for n in free if n not in self._device), free[0])

    # ---- device tier ----------------------------------------------------------------
    def acquire(self, name: str) -> Placement:
        """A device slot for host-resident ``name``: its current slot (hit), a free one, or the
        least recently used unheld adapter's (that one is returned as ``evicted``)."""
        if name not in self._host:
            raise KeyError(f"adapter {name!r} is not host-resident; admit_host() it first")
        self._host.move_to_end(name)
        slot = self._device.get(name)
        if slot is not None:
            self.device_stats.hits += 1
            self._device.move_to_end(name)
            return Placement(slot, None)
        self.device_stats.misses += 1
        evicted = None
        if self._free_slots:
            slot = min(self._free_slots)
            self._free_slots.remove(slot)
        else:
            evicted = next((n for n in self._device if not self.held(n)), None)
            if evicted is None:
                raise self._full("device slots", self.max_loras, list(self._device), name)
            slot = self._device.pop(evicted)
            self.device_stats.evictions += 1
        self._device[name] = slot
        return Placement(slot, evicted)

    def evict_device(self, name: str) -> int | None:
        """Free ``name``'s slot (it stays host-resident); returns the slot, if it had one."""
        if self.held(name):
            raise RequestError(f"adapter {name!r} is pinned or in use; it cannot leave its slot",
                               adapter=name)
        slot = self._device.pop(name, None)
        if slot is not None:
            self._free_slots.append(slot)
            self.device_stats.evictions += 1
        return slot

    # ---- pins -----------------------------------------------------------------------
    def retain(self, name: str) -> None:
        """An in-flight request uses ``name`` (must be device-resident)."""
        if name not in self._device:
            raise KeyError(f"adapter {name!r} has no device slot; acquire() it first")
        self._refs[name] += 1

    def release(self, name: str) -> None:
        """An in-flight request using ``name`` finished."""
        if self._refs[name] <= 0:
            raise KeyError(f"adapter {name!r} is not retained by any request")
        self._refs[name] -= 1
        if not self._refs[name]:
            del self._refs[name]

    def pin(self, name: str) -> None:
        """Keep ``name`` resident until ``unpin`` (must be host-resident)."""
        if name not in self._host:
            raise KeyError(f"adapter {name!r} is not host-resident; load it before pinning")
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        self._pinned.discard(name)

    # ---- removal --------------------------------------------------------------------
    def remove(self, name: str) -> int | None:
        """Unregister ``name`` from both tiers (drops a user pin); returns its freed slot.
        Refused while in-flight requests use it."""
        if self._refs[name] > 0:
            raise RequestError(f"adapter {name!r} is in use by {self._refs[name]} in-flight "
                               "requests", adapter=name)
        self._pinned.discard(name)
        slot = self._device.get(name)
        self._drop(name)
        return slot

    def _drop(self, name: str) -> None:
        slot = self._device.pop(name, None)
        if slot is not None:
            self._free_slots.append(slot)
        self._host.pop(name, None)

    def _full(self, tier: str, capacity: int, names: list[str], incoming: str) -> CapacityError:
        pinned = sum(1 for n in names if n in self._pinned)
        busy = sum(1 for n in names if n not in self._pinned and self._refs[n] > 0)
        return CapacityError(
            f"cannot place adapter {incoming!r}: all {capacity} {tier} hold adapters that cannot "
            f"be evicted ({pinned} pinned by users, {busy} in use by in-flight requests)",
            tier=tier, capacity=capacity, pinned=pinned, in_flight=busy)
