"""How an adapter version reaches a device slot: the scheduler's ``SlotProvider``, pins,
reloads from its source, and the rebuild of the tiers after a rank-group restart.

A mixin: ``AdapterControl`` (``engine/adapter_control.py``) holds the state and documents the
locking. A sequence binds the current version of its adapter at first admission and keeps it
until it finishes; an old version that bound sequences still use is held (a tier pin) until
the last finishes, then dropped (``AdapterResidency.flush_drops_locked``).
"""

from __future__ import annotations

import time

from lora_cluster.adapters import AdapterTiers
from lora_cluster.engine.adapter_residency import AdapterResidency, tier_id
from lora_cluster.engine.messages import AdapterKey
from lora_cluster.errors import AdapterError, CapacityError, UnknownAdapterError


class SlotBinding(AdapterResidency):
    """Slot acquisition, pins and restore of one replica's adapters (mixed into
    ``AdapterControl``)."""

    staging: set[AdapterKey]

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
