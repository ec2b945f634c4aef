"""Where each adapter version lives: device slots and the host cache, with LRU and pins.

Pure bookkeeping (no torch, no I/O): the controller asks it for a victim or a free slot,
sends the matching commands to every rank, and records the outcome here — so this view is
exactly what every rank holds. Invariant: a version in a device slot is also in the host
cache (activation reads the host copy; dropping the host copy also clears its slot).

Never evicted: a version pinned by running sequences (``pins``), pinned by the user
(``user_pinned``), or ``protected`` (an old version that unfinished sequences still use
after an update or an unload — its source may already hold other weights).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from lora_cluster.engine.messages import AdapterKey


@dataclass
class TierCounters:
    """Hits, misses and evictions of one tier."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions}


@dataclass
class Residency:
    """Device slots + host cache of one replica (every rank holds the same set)."""

    max_loras: int
    max_cpu_loras: int
    slots: list[AdapterKey | None] = field(init=False)
    device_lru: OrderedDict[AdapterKey, int] = field(default_factory=OrderedDict)
    host_lru: OrderedDict[AdapterKey, None] = field(default_factory=OrderedDict)
    pins: Counter[AdapterKey] = field(default_factory=Counter)
    user_pinned: set[AdapterKey] = field(default_factory=set)
    protected: set[AdapterKey] = field(default_factory=set)
    device_counters: TierCounters = field(default_factory=TierCounters)
    host_counters: TierCounters = field(default_factory=TierCounters)

    def __post_init__(self) -> None:
        self.slots = [None] * self.max_loras

    # ---------------------------------------------------------------- queries
    def slot_of(self, key: AdapterKey) -> int | None:
        return self.device_lru.get(key)

    def on_host(self, key: AdapterKey) -> bool:
        return key in self.host_lru

    def _device_evictable(self, key: AdapterKey) -> bool:
        return self.pins[key] == 0 and key not in self.user_pinned

    def _host_evictable(self, key: AdapterKey) -> bool:
        return self._device_evictable(key) and key not in self.protected

    def free_slot(self) -> int | None:
        """An empty slot, else the least recently used evictable one; None if all are held."""
        for slot, held in enumerate(self.slots):
            if held is None:
                return slot
        for key, slot in self.device_lru.items():
            if self._device_evictable(key):
                return slot
        return None

    def host_victim(self) -> AdapterKey | None:
        """What must leave the host cache before one more version fits: None if there is room
        (or nothing may leave — check ``host_full`` to tell these apart). Versions not on the
        device go first; then LRU device ones (they leave both tiers)."""
        if len(self.host_lru) < self.max_cpu_loras:
            return None
        for key in self.host_lru:
            if key not in self.device_lru and self._host_evictable(key):
                return key
        for key in self.device_lru:
            if self._host_evictable(key):
                return key
        return None

    def host_full(self) -> bool:
        return len(self.host_lru) >= self.max_cpu_loras

    def slots_all_user_pinned_except(self, key: AdapterKey) -> bool:
        """Every slot is held by a user pin of another version: ``key`` could never get one."""
        return all(held is not None and held != key and held in self.user_pinned
                   for held in self.slots)

    # ---------------------------------------------------------------- updates
    def touch(self, key: AdapterKey) -> None:
        if key in self.device_lru:
            self.device_lru.move_to_end(key)
        if key in self.host_lru:
            self.host_lru.move_to_end(key)

    def added_to_host(self, key: AdapterKey) -> None:
        self.host_lru[key] = None
        self.host_lru.move_to_end(key)

    def placed(self, key: AdapterKey, slot: int) -> None:
        """``key`` now occupies ``slot`` (whatever was there left the device)."""
        previous = self.slots[slot]
        if previous is not None and previous != key:
            del self.device_lru[previous]
            self.device_counters.evictions += 1
        old_slot = self.device_lru.get(key)
        if old_slot is not None and old_slot != slot:
            self.slots[old_slot] = None
        self.slots[slot] = key
        self.device_lru[key] = slot
        self.touch(key)

    def left_device(self, key: AdapterKey) -> None:
        slot = self.device_lru.pop(key, None)
        if slot is not None:
            self.slots[slot] = None

    def dropped(self, key: AdapterKey, *, evicted: bool = True) -> None:
        """``key`` left the host cache (and therefore the device)."""
        if key in self.device_lru:
            self.left_device(key)
            if evicted:
                self.device_counters.evictions += 1
        if self.host_lru.pop(key, "absent") != "absent" and evicted:
            self.host_counters.evictions += 1
        self.user_pinned.discard(key)
        self.protected.discard(key)

    def pin(self, key: AdapterKey) -> None:
        self.pins[key] += 1

    def unpin(self, key: AdapterKey) -> None:
        if self.pins[key] <= 0:
            raise AssertionError(f"unbalanced unpin of {key}")
        self.pins[key] -= 1
        if not self.pins[key]:
            del self.pins[key]

    def stats(self) -> dict[str, object]:
        return {
            "device_slots": [None if k is None else f"{k[0]}@v{k[1]}" for k in self.slots],
            "host_cache": [f"{k[0]}@v{k[1]}" for k in self.host_lru],
            "max_loras": self.max_loras,
            "max_cpu_loras": self.max_cpu_loras,
            "device": self.device_counters.as_dict(),
            "host": self.host_counters.as_dict(),
            "pins": {f"{k[0]}@v{k[1]}": n for k, n in self.pins.items()},
        }
