"""How a replica talks to the adapter directory: a small blocking interface, two implementations.

``HandleDirectory`` goes through the ``AdapterDirectory`` deployment's Serve handle (called
from worker threads, never from an event loop); ``LocalDirectory`` wraps a
``DirectoryState`` in-process, for tests and single-process tools.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from deploy.directory_state import AdapterEntry, DirectorySnapshot, DirectoryState, DirectoryView
from deploy.http_errors import as_typed
from lora_cluster.api_types import AdapterInfo

Lookup = tuple[AdapterEntry | None, int]  # (entry, directory generation when read)
Registered = tuple[AdapterEntry, int]


class DirectoryClient(Protocol):
    """Blocking calls a replica makes (see ``DirectoryState`` for semantics)."""

    def lookup(self, name: str) -> Lookup: ...

    def register(self, name: str, source: str, info: AdapterInfo | None) -> Registered: ...

    def update(self, name: str, source: str, info: AdapterInfo | None) -> Registered: ...

    def remove(self, name: str) -> int: ...

    def wait_for_change(self, epoch: str, generation: int, timeout_s: float) -> DirectoryView: ...

    def report(self, replica_id: str, stats: dict[str, Any], acked_generation: int) -> None: ...

    def wait_acked(self, generation: int, timeout_s: float) -> list[str]: ...

    def snapshot(self) -> DirectorySnapshot: ...


class HandleDirectory:
    """``DirectoryClient`` over the directory deployment's handle."""

    def __init__(self, handle: Any, timeout_s: float = 60.0) -> None:
        self._handle = handle
        self._timeout_s = timeout_s

    def _call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        try:
            return getattr(self._handle, method).remote(*args).result(
                timeout_s=timeout_s or self._timeout_s)
        except Exception as exc:
            raise as_typed(exc) from None

    def lookup(self, name: str) -> Lookup:
        return self._call("lookup", name)

    def register(self, name: str, source: str, info: AdapterInfo | None) -> Registered:
        return self._call("register", name, source, info)

    def update(self, name: str, source: str, info: AdapterInfo | None) -> Registered:
        return self._call("update", name, source, info)

    def remove(self, name: str) -> int:
        return self._call("remove", name)

    def wait_for_change(self, epoch: str, generation: int, timeout_s: float) -> DirectoryView:
        return self._call("wait_for_change", epoch, generation, timeout_s,
                          timeout_s=timeout_s + self._timeout_s)

    def report(self, replica_id: str, stats: dict[str, Any], acked_generation: int) -> None:
        self._call("report", replica_id, stats, acked_generation)

    def wait_acked(self, generation: int, timeout_s: float) -> list[str]:
        return self._call("wait_acked", generation, timeout_s, timeout_s=timeout_s + self._timeout_s)

    def snapshot(self) -> DirectorySnapshot:
        return self._call("snapshot")


class LocalDirectory:
    """``DirectoryClient`` over an in-process ``DirectoryState`` (thread-safe)."""

    def __init__(self, state: DirectoryState | None = None) -> None:
        self.state = state or DirectoryState()
        self._cv = threading.Condition()

    def lookup(self, name: str) -> Lookup:
        with self._cv:
            return self.state.lookup(name), self.state.generation

    def register(self, name: str, source: str, info: AdapterInfo | None) -> Registered:
        with self._cv:
            entry = self.state.register(name, source, info)
            self._cv.notify_all()
            return entry, self.state.generation

    def update(self, name: str, source: str, info: AdapterInfo | None) -> Registered:
        with self._cv:
            entry = self.state.update(name, source, info)
            self._cv.notify_all()
            return entry, self.state.generation

    def remove(self, name: str) -> int:
        with self._cv:
            generation = self.state.remove(name)
            self._cv.notify_all()
            return generation

    def wait_for_change(self, epoch: str, generation: int, timeout_s: float) -> DirectoryView:
        with self._cv:
            self._cv.wait_for(lambda: self.state.epoch != epoch
                              or self.state.generation != generation, timeout_s)
            return self.state.view()

    def report(self, replica_id: str, stats: dict[str, Any], acked_generation: int) -> None:
        with self._cv:
            self.state.report(replica_id, stats, acked_generation)
            self._cv.notify_all()

    def wait_acked(self, generation: int, timeout_s: float) -> list[str]:
        with self._cv:
            self._cv.wait_for(lambda: not self.state.unacked(generation), timeout_s)
            return self.state.unacked(generation)

    def snapshot(self) -> DirectorySnapshot:
        with self._cv:
            return self.state.snapshot()
