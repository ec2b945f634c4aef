"""Device slots over a host cache: LRU at both tiers, in-flight and user pins, capacity errors."""

from __future__ import annotations

import pytest

from lora_cluster import errors
from lora_cluster.adapters import AdapterTiers, Placement


def _place(tiers: AdapterTiers, name: str) -> tuple[list[str], Placement]:
    return tiers.admit_host(name), tiers.acquire(name)


def test_slots_fill_then_evict_least_recently_used() -> None:
    tiers = AdapterTiers(max_loras=2, max_cpu_loras=4)
    assert _place(tiers, "a") == ([], (0, None))
    assert _place(tiers, "b") == ([], (1, None))
    assert tiers.acquire("a") == (0, None)           # hit: a becomes most recent
    assert _place(tiers, "c") == ([], (1, "b"))      # b was least recently used
    assert tiers.device_slots() == ["a", "c"] and tiers.slot_of("b") is None
    assert tiers.in_host("b")                        # evicted from the device, still cached
    assert tiers.stats()["device"] == {"hits": 1, "misses": 3, "evictions": 1, "resident": 2,
                                       "capacity": 2}


def test_host_tier_lru_prefers_adapters_not_on_device() -> None:
    tiers = AdapterTiers(max_loras=1, max_cpu_loras=3)
    for name in ("a", "b", "c"):
        _place(tiers, name)                          # device ends holding c
    tiers.admit_host("a")                            # touch a on the host tier
    dropped, placed = _place(tiers, "d")             # host full: b is the LRU host-only entry
    assert dropped == ["b"] and placed == (0, "c")
    assert tiers.host_names() == ["c", "a", "d"]
    assert tiers.stats()["host"]["evictions"] == 1 and tiers.stats()["host"]["hits"] == 1


def test_loading_past_max_cpu_loras_evicts_lru_unpinned() -> None:
    tiers = AdapterTiers(max_loras=2, max_cpu_loras=3)
    for name in ("a", "b", "c"):
        _place(tiers, name)
    tiers.pin("a")
    dropped = tiers.admit_host("d")                  # a is pinned: b (LRU unpinned) goes
    assert dropped == ["b"] and tiers.in_host("a") and not tiers.in_host("b")


def test_in_flight_adapters_are_never_evicted() -> None:
    tiers = AdapterTiers(max_loras=2, max_cpu_loras=2)
    _place(tiers, "a")
    _place(tiers, "b")
    tiers.retain("a")
    tiers.retain("a")
    tiers.retain("b")
    with pytest.raises(errors.CapacityError) as info:
        tiers.admit_host("c")
    assert "2 host cache" in str(info.value) and "2 in use by in-flight requests" in str(info.value)
    tiers.release("b")
    assert tiers.admit_host("c") == ["b"]            # b was released: evictable again
    tiers.release("a")
    assert tiers.in_flight("a") == 1 and tiers.held("a")
    with pytest.raises(errors.RequestError, match="in use by 1 in-flight"):
        tiers.remove("a")
    tiers.release("a")
    assert tiers.remove("a") == 0 and not tiers.in_host("a")
    with pytest.raises(KeyError):
        tiers.release("a")


def test_all_slots_pinned_raises_capacity_error_with_counts() -> None:
    tiers = AdapterTiers(max_loras=3, max_cpu_loras=8)
    for name in ("a", "b", "c"):
        _place(tiers, name)
    tiers.pin("a")
    tiers.pin("b")
    tiers.retain("c")
    tiers.admit_host("d")
    with pytest.raises(errors.CapacityError) as info:
        tiers.acquire("d")
    msg = str(info.value)
    assert "all 3 device slots" in msg and "2 pinned by users" in msg and "1 in use" in msg
    assert info.value.details["capacity"] == 3
    tiers.unpin("b")
    assert tiers.acquire("d") == (1, "b")


def test_misuse_is_reported() -> None:
    tiers = AdapterTiers(max_loras=1, max_cpu_loras=1)
    with pytest.raises(KeyError, match="admit_host"):
        tiers.acquire("x")
    tiers.admit_host("x")
    with pytest.raises(KeyError, match="acquire"):
        tiers.retain("x")  # host-resident but not on the device
    with pytest.raises(errors.ConfigError):
        AdapterTiers(max_loras=2, max_cpu_loras=1)
    tiers.acquire("x")
    tiers.pin("x")
    with pytest.raises(errors.RequestError):
        tiers.evict_device("x")
    tiers.unpin("x")
    assert tiers.evict_device("x") == 0 and tiers.device_slots() == [None]
    assert tiers.remove("x") is None and tiers.host_names() == []
