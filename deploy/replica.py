"""``ReplicaService``: one Serve replica's lora_cluster replica, kept in step with the directory.

A plain, thread-safe class (the ``LoRAServer`` deployment is its shell): a ``ControllerCore``
plus the app-wide adapter registry. Invariants:

- ``_held`` mirrors what this replica's core has registered: name -> (source, version,
  directory generation when learned). Only this class loads or evicts on the core.
- A request for an adapter the directory knows but this replica does not hold loads it
  first (transparently); one the directory does not know gets ``UnknownAdapterError``.
- A background thread long-polls the directory: adapters removed there are evicted here,
  new versions are swapped in place, and each applied generation is acknowledged, so an
  unload returns only after every live replica dropped the adapter.
- Per-name work (lookup + load, or evict) runs under one of a fixed set of striped locks,
  so a request never races an unload of the same adapter and other adapters never wait.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from deploy.directory_client import DirectoryClient
from deploy.directory_state import DirectoryView
from deploy.replica_stats import LoadWatcher, ServingCounters, replica_report
from lora_cluster.api_types import AdapterInfo, GenerationResult
from lora_cluster.config import SamplingParams
from lora_cluster.engine.controller_core import ControllerCore
from lora_cluster.engine.request_handle import RequestHandle
from lora_cluster.errors import ClusterError, LoRAClusterError, RequestError, UnknownAdapterError

logger = logging.getLogger("lora_cluster.deploy")
Prompt = str | Sequence[int]
Held = tuple[str, int, int]  # (source, version, generation)
_STRIPES = 64


@dataclass(frozen=True)
class ServedBatch:
    """What the ingress gets back for a completion: results and where they were made."""

    results: tuple[GenerationResult, ...]
    replica_id: str
    arrival: str  # residency of the adapter here when the request arrived (see _arrive)


class ReplicaService:
    """ControllerCore + directory sync + serving counters (see module docstring)."""

    def __init__(self, core: ControllerCore, directory: DirectoryClient, *, replica_id: str,
                 report_period_s: float = 1.0, unload_ack_timeout_s: float = 10.0) -> None:
        self.core = core
        self.directory = directory
        self.replica_id = replica_id
        self.report_period_s = report_period_s
        self.unload_ack_timeout_s = unload_ack_timeout_s
        self._state = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._view = DirectoryView(epoch="", generation=-1, adapters={})
        self._held: dict[str, Held] = {}
        self._residency: dict[str, str] = {}
        self.counters = ServingCounters()
        self.loads = LoadWatcher()
        self._stop = threading.Event()
        self._sync_error: BaseException | None = None
        self._thread = threading.Thread(target=self._sync_loop, name="lora-directory-sync",
                                        daemon=True)

    def start(self) -> None:
        """Learn the registry, report once (so unloads wait for us), then keep in sync."""
        view = self.directory.wait_for_change("", -1, 0.0)
        self._apply(view)
        self._report()
        self._thread.start()

    def _lock_for(self, name: str) -> threading.Lock:
        return self._stripes[hash(name) % _STRIPES]

    # ================================================================ adapters (app-wide)
    def load_adapter(self, name: str, source: str) -> AdapterInfo:
        """Validate by loading here, then register app-wide (a bad adapter records nothing)."""
        source = str(source)
        with self._lock_for(name):
            entry, _ = self.directory.lookup(name)
            if entry is not None and entry.source != source:
                raise RequestError(
                    f"adapter {name!r} is already registered from {entry.source!r}; unload it "
                    f"first or update it", field="lora_name", name=name)
            held = self._held.get(name)
            if held is not None and held[0] != source:
                self._evict_local(name)
            info = self.core.load_adapter(name, source)
            try:
                entry, generation = self.directory.register(name, source, info)
            except LoRAClusterError:
                if held is None:
                    self._evict_local(name)
                raise
            with self._state:
                self._held[name] = (source, entry.version, generation)
                self._residency[name] = info.residency
        return info

    def update_adapter(self, name: str, source: str) -> AdapterInfo:
        """New weights for a registered adapter; other replicas switch when they sync."""
        source = str(source)
        with self._lock_for(name):
            entry, _ = self.directory.lookup(name)
            if entry is None:
                raise UnknownAdapterError(f"adapter {name!r} is not registered", name=name)
            if name in self._held:
                info = self.core.update_adapter(name, source)
            else:
                info = self.core.load_adapter(name, source)
            entry, generation = self.directory.update(name, source, info)
            with self._state:
                self._held[name] = (source, entry.version, generation)
        self._refresh()
        return info

    def evict_adapter(self, name: str) -> list[str]:
        """Unregister app-wide; returns once every live replica dropped it (else who did not)."""
        generation = self.directory.remove(name)
        with self._lock_for(name):
            self._evict_local(name)
        unacked = self.directory.wait_acked(generation, self.unload_ack_timeout_s)
        if unacked:
            logger.warning("unload of %r: replicas %s did not confirm within %.0fs", name,
                           unacked, self.unload_ack_timeout_s)
        return unacked

    def pin_adapter(self, name: str) -> None:
        """Keep ``name`` in a device slot of this replica."""
        self.ensure(name)
        self.core.pin_adapter(name)

    def unpin_adapter(self, name: str) -> None:
        self.ensure(name)
        self.core.unpin_adapter(name)

    def list_adapters(self) -> list[AdapterInfo]:
        """Every registered adapter; residency is the warmest tier on any live replica."""
        snapshot = self.directory.snapshot()
        local = {i.name: i for i in self.core.list_adapters()}
        warmest: dict[str, str] = {}
        order = {"device": 3, "host": 2, "loading": 1}
        for report in snapshot.replicas:
            for name, tier in report.stats.get("residency", {}).items():
                if order.get(tier, 0) > order.get(warmest.get(name, ""), 0):
                    warmest[name] = tier
        out = []
        for entry in snapshot.adapters:
            info = local.get(entry.name) or entry.info
            if info is None:
                continue
            tier = warmest.get(entry.name, info.residency if entry.name in local else "registered")
            out.append(_with_residency(info, tier))
        return out

    def ensure(self, name: str) -> str:
        """Make a registered adapter usable here; how it was found ("device", "host",
        "disk": registered here; "fetched": loaded from the directory just now)."""
        if self._usable(name):
            return self._residency.get(name, "disk")
        with self._lock_for(name):
            if self._usable(name):
                return self._residency.get(name, "disk")
            entry, generation = self.directory.lookup(name)
            if entry is None:
                raise UnknownAdapterError(
                    f"adapter {name!r} is not registered (GET /v1/models lists the served "
                    f"models; POST /v1/load_lora_adapter registers one)", name=name)
            held = self._held.get(name)
            if held is not None and held[:2] != (entry.source, entry.version):
                info = self.core.update_adapter(name, entry.source)
            elif held is None:
                info = self.core.load_adapter(name, entry.source)
            else:
                info = None
            with self._state:
                self._held[name] = (entry.source, entry.version, generation)
                if info is not None:
                    self._residency[name] = info.residency
        return "fetched"

    def _usable(self, name: str) -> bool:
        with self._state:
            held = self._held.get(name)
            if held is None:
                return False
            want = self._view.adapters.get(name)
            # A view older than what we learned on load does not know the adapter yet.
            return want == held[:2] or (want is None and held[2] > self._view.generation)

    def _evict_local(self, name: str) -> None:
        """Drop ``name`` from this replica's core (caller holds its stripe lock)."""
        with self._state:
            held = self._held.pop(name, None)
            self._residency.pop(name, None)
        if held is not None:
            with contextlib.suppress(UnknownAdapterError):
                self.core.evict_adapter(name)

    # ================================================================ requests
    def _arrive(self, adapters: Sequence[str | None], prompts: int) -> str:
        kinds = {name: self.ensure(name) for name in dict.fromkeys(a for a in adapters if a)}
        first = next((a for a in adapters if a), None)
        kind = "base" if first is None else kinds[first]
        self.counters.arrived(first, kind, prompts)
        return kind

    def generate(self, prompts: Sequence[Prompt], adapters: Sequence[str | None],
                 sampling: SamplingParams | None = None) -> ServedBatch:
        """Run prompts (one adapter name or None each) to completion on this replica."""
        handles, arrival = self.submit_many(prompts, adapters, sampling)
        try:
            results = collect(handles)
        finally:
            self.finished()
        return ServedBatch(results, self.replica_id, arrival)

    def submit_many(self, prompts: Sequence[Prompt], adapters: Sequence[str | None],
                    sampling: SamplingParams | None = None) -> tuple[list[RequestHandle], str]:
        """Queue prompts (all or none), one adapter or None each; call ``finished()`` after."""
        arrival = self._arrive(adapters, len(prompts))
        handles: list[RequestHandle] = []
        try:
            for prompt, adapter in zip(prompts, adapters, strict=True):
                handles.append(self.core.submit(prompt, adapter, sampling))
        except BaseException:
            for handle in handles:
                handle.cancel()
            self.counters.left()
            raise
        return handles, arrival

    def finished(self) -> None:
        self.counters.left()

    def score(self, prompts: Sequence[Prompt], adapters: Sequence[str | None]) -> list[Any]:
        self._arrive(adapters, len(prompts))
        try:
            return self.core.score(list(prompts), list(adapters))
        finally:
            self.counters.left()

    # ================================================================ sync with the directory
    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            try:
                view = self.directory.wait_for_change(self._view.epoch, self._view.generation,
                                                      self.report_period_s)
                if self._stop.is_set():
                    return
                self._apply(view)
                self._report()
                self._sync_error = None
            except Exception as exc:  # keep syncing; health reports it
                self._sync_error = exc
                logger.warning("directory sync failed: %s", exc)
                self._stop.wait(self.report_period_s)

    def _apply(self, view: DirectoryView) -> None:
        if self._view.epoch and view.epoch != self._view.epoch:
            self._reannounce()
        with self._state:
            if view.epoch == self._view.epoch and view.generation < self._view.generation:
                return
            self._view = view
            stale = [(n, h) for n, h in self._held.items()
                     if view.adapters.get(n) != h[:2] and view.generation >= h[2]]
        for name, _ in stale:
            with self._lock_for(name):
                held = self._held.get(name)
                if held is None or view.generation < held[2]:
                    continue
                want = view.adapters.get(name)
                if want is None:
                    self._evict_local(name)
                elif want != held[:2]:
                    self._swap(name, want, view.generation)

    def _swap(self, name: str, want: tuple[str, int], generation: int) -> None:
        """Another replica updated ``name``: switch in place (evict if the new one fails)."""
        try:
            self.core.update_adapter(name, want[0])
            with self._state:
                self._held[name] = (want[0], want[1], generation)
        except LoRAClusterError as err:
            logger.warning("adapter %r: in-place update to %s failed here (%s); evicting",
                           name, want[0], err)
            self._evict_local(name)

    def _reannounce(self) -> None:
        """The directory restarted empty: register what we hold again (conflicts evict)."""
        for name, (source, _, _) in list(self._held.items()):
            with self._lock_for(name):
                try:
                    entry, generation = self.directory.register(name, source, None)
                except LoRAClusterError:
                    self._evict_local(name)
                    continue
                with self._state:
                    self._held[name] = (source, entry.version, generation)

    def _refresh(self) -> dict[str, Any]:
        """Re-read residency and stats from the core (also feeds the load histogram)."""
        infos = self.core.list_adapters()
        self.loads.observe(infos)
        stats = self.core.stats()
        residency: dict[str, str] = {i.name: str(i.residency) for i in infos}
        with self._state:
            self._residency = residency
            generation = self._view.generation
        return replica_report(self.replica_id, stats, self.core.config, residency,
                              self.loads, self.counters, generation)

    def _report(self) -> None:
        report = self._refresh()
        self.directory.report(self.replica_id, report, report["generation"])

    # ================================================================ reporting, lifecycle
    def routing_stats(self) -> dict[str, Any]:
        """What the request router reads: adapters by tier here, and load (no locks held long)."""
        with self._state:
            residency = dict(self._residency)
        ongoing = self.counters.as_dict()["ongoing"]
        return {"device": sorted(n for n, t in residency.items() if t == "device"),
                "host": sorted(n for n, t in residency.items() if t == "host"),
                "disk": sorted(n for n, t in residency.items() if t not in ("device", "host")),
                "ongoing": ongoing}

    def stats(self) -> dict[str, Any]:
        """The core's stats plus this replica's serving counters."""
        out = dict(self.core.stats())
        out.update(self.counters.as_dict())
        out["replica_id"] = self.replica_id
        out["load_histogram"] = self.loads.histogram.as_dict()
        return out

    def check_health(self) -> dict[str, Any]:
        """Raise when this replica cannot serve (Serve then replaces it with its ranks)."""
        try:
            self.core.check_health()
        except LoRAClusterError as err:
            raise ClusterError(f"replica {self.replica_id}: {err}") from err
        if not self._thread.is_alive() and not self._stop.is_set():
            raise ClusterError(f"replica {self.replica_id}: directory sync thread stopped")
        return {"ok": True, "replica_id": self.replica_id,
                "sync_error": None if self._sync_error is None else str(self._sync_error),
                "since": time.time()}

    def shutdown(self) -> None:
        self._stop.set()
        self.core.shutdown()


def _with_residency(info: AdapterInfo, residency: str) -> AdapterInfo:
    import dataclasses

    return dataclasses.replace(info, residency=residency)  # type: ignore[arg-type]


def collect(handles: Sequence[RequestHandle]) -> tuple[GenerationResult, ...]:
    """Every handle's result in order; on the first failure the rest are cancelled."""
    try:
        return tuple(h.result() for h in handles)
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
