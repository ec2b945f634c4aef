"""The adapter half of ``ControllerCore``'s public API: load, register, update, evict, pin.

A mixin: ``ControllerCore`` provides the state it uses (``adapters``, ``updates``, the
``_exec`` / ``_lock`` / ``_cv`` locks, ``_check_open``); the threading model is the core's
(see ``engine/controller_core.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence

from lora_cluster.api_types import AdapterInfo
from lora_cluster.engine.adapter_control import AdapterControl, tier_id
from lora_cluster.engine.adapter_update import LayerwiseUpdater
from lora_cluster.errors import LoRAClusterError, RequestError


class AdapterAdmin:
    """Adapter commands of the controller (mixed into ``ControllerCore``)."""

    adapters: AdapterControl
    updates: LayerwiseUpdater
    _exec: threading.Lock
    _lock: threading.RLock
    _cv: threading.Condition

    _check_open: Callable[[], None]

    def load_adapter(self, name: str, source: str) -> AdapterInfo:
        """Register ``name`` from ``source`` and read it into every rank's host cache.

        Idempotent for the same source; a bad adapter raises its typed error, leaves the
        registry unchanged, and is remembered for ``failed_load_ttl_s``.
        """
        source = str(source)
        self.adapters.check_failed(name, source)
        with self._cv:
            self._check_open()
            self._cv.wait_for(lambda: name not in self.adapters.loading)
            rec = self.adapters.records.get(name)
            if rec is not None:
                if rec.source == source:
                    return self.adapters.info(name)
                raise RequestError(
                    f"adapter {name!r} is already registered from {rec.source!r}; use "
                    f"update_adapter to replace its weights or evict_adapter first", field="name")
            self.adapters.loading[name] = None
        try:
            path, meta = self.adapters.inspect(name, source)
            with self._exec, self._lock:
                return self.adapters.register_locked(name, source, path, meta)
        except LoRAClusterError as err:
            self.adapters.remember_failure(name, source, err)
            raise
        finally:
            with self._cv:
                self.adapters.loading.pop(name, None)
                self._cv.notify_all()

    def register_adapters(self, sources: Mapping[str, str] | Sequence[tuple[str, str]]
                          ) -> list[AdapterInfo]:
        """Validate adapters (config + header) and register them on disk only: each loads on
        its first request. All or nothing: a bad one raises its typed error, none registers."""
        checked = self.adapters.inspect_many(sources)
        names = {c[0] for c in checked}
        with self._cv:
            self._check_open()
            self._cv.wait_for(lambda: names.isdisjoint(self.adapters.loading))
            return self.adapters.register_on_disk(checked)

    def update_adapter(self, name: str, source: str) -> AdapterInfo:
        """Stage new weights for ``name`` layer group by layer group on every rank while steps
        keep running, then switch to the new version at a step boundary.

        Requests admitted before the switch finish on the old version (kept resident until
        they do); later ones use the new one — never a mix. A failed update (refused source,
        a bad read mid-way, a rank failure) raises its typed error and leaves the old version
        serving, with the new version's staging freed (see ``engine/adapter_update.py``).
        """
        source = str(source)
        with self._lock:
            self.adapters.record(name)
        try:
            path, meta = self.adapters.inspect(name, source)
        except LoRAClusterError as err:
            with self._lock:
                self.adapters.update_failures_by_cause[err.code] += 1
            raise
        with self._cv:
            self._check_open()
            # One load or update of a name at a time.
            self._cv.wait_for(lambda: name not in self.adapters.loading)
            self.adapters.loading[name] = None
        try:
            return self.updates.run(name, source, path, meta)
        finally:
            with self._cv:
                self.adapters.loading.pop(name, None)
                self._cv.notify_all()

    def evict_adapter(self, name: str) -> None:
        """Unregister ``name``; requests already running on it finish first."""
        with self._exec, self._lock:
            self.adapters.unregister_locked(name)

    def pin_adapter(self, name: str) -> None:
        """Keep ``name`` in a device slot until ``unpin_adapter`` (loads it there now)."""
        with self._exec, self._lock:
            rec = self.adapters.record(name)
            self.adapters.pin_locked(rec.key)
            rec.pinned = True

    def unpin_adapter(self, name: str) -> None:
        """Let LRU evict ``name`` again."""
        with self._lock:
            rec = self.adapters.record(name)
            self.adapters.tiers.unpin(tier_id(rec.key))
            rec.pinned = False

    def list_adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return self.adapters.infos()
