"""Writing adapters into device slots without stalling the steps that do not need them.

On CUDA every slot write (activate, clear) runs on one side stream, copying from the pinned
host cache, so it overlaps the decode steps launched meanwhile. Ordering rules, all on the
device (the host never waits):

* A write first waits for the compute stream's work launched so far: the steps already in
  flight may still read the slot's previous contents (their rows were planned on it).
* Each write records an event per slot; the first step whose plan uses that slot makes the
  compute stream wait for it (``wait_for``). Steps that do not use the slot never wait, and
  once one step has waited, every later step is ordered after it on the same stream.
* Slot buffers are written in place (``copy_`` into fixed buffers), never reallocated, so
  captured CUDA graphs stay valid.

What a write costs the host: the host cache holds each adapter slot-ready and packed into a
few pinned pages (``slot_ready``); the model's slot table validates and plans an entry on its
first write and keeps the plan, so every later write of it — into any slot — is a handful of
page-sized DMAs into a staging buffer plus one multi-tensor device copy into the slot
(``model.slot_transfer``), with no per-module Python.

On CPU writes are plain synchronous copies. Shape legend: S slots.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from lora_cluster.adapters.weights import LoRATensors, ModuleKey
from lora_cluster.model.slot_host import PAGE_BYTES, pack_slot_ready

_TIMINGS_KEPT = 64  # recent activations whose device time stats() reports


def slot_ready(modules: dict[ModuleKey, LoRATensors], dtype: torch.dtype, *,
               pin: bool, page_bytes: int = PAGE_BYTES) -> dict[ModuleKey, LoRATensors]:
    """Host copies a slot write only has to copy: cast to the model's ``dtype`` with the
    scaling folded into ``b`` in float32 (the slot writer's own arithmetic, done once at load
    instead of at every activation), scaling 1.0, packed into a few large pages (page-locked
    when ``pin``, on GPU hosts) laid out the way the slots hold them (``model.slot_host``)."""
    packed = pack_slot_ready({key: (t.a, t.b, float(t.scaling)) for key, t in modules.items()},
                             dtype, pin=pin, page_bytes=page_bytes)
    return {key: LoRATensors(a, b, 1.0) for key, (a, b) in packed.items()}


class SlotModel(Protocol):
    """What the activator needs from the decoder (``DecoderModel`` fits)."""

    def set_lora_slot(self, slot: int, weights: Any) -> None: ...

    def clear_lora_slot(self, slot: int) -> None: ...


class SlotActivator:
    """Slot writes for one rank: side stream + per-slot events on CUDA, synchronous on CPU."""

    def __init__(self, model: SlotModel, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ready: dict[int, Any] = {}  # slot → torch.cuda.Event of its last write
        self._timings: collections.deque[tuple[int, Any, Any]] = collections.deque(
            maxlen=_TIMINGS_KEPT)  # (bytes, start event, end event)
        self.activations = 0
        self.bytes_activated = 0
        self.step_waits = 0
        self.host_ms = 0.0  # time the rank's thread spent issuing writes
        table = getattr(model, "slot_table", None)
        if table is not None:
            _ = table.transfer  # made now: ``prepare`` may first run on a reader thread

    @property
    def asynchronous(self) -> bool:
        return self.stream is not None

    def prepare(self, weights: Any, like: Any = None) -> None:
        """Validate and plan a new host-cache entry now (typed errors as ``activate``), so
        none of its activations pays for it; a no-op for models without a slot table. Safe
        on another thread than the writes (the rank's reader thread plans beside the read).
        ``like``: a ``template_of`` an entry laid out exactly as this one (a read recipe's
        pages) — only the plan is replayed (``LoRASlotTable.prepare_as``)."""
        table = getattr(self.model, "slot_table", None)
        if table is None:
            return
        if like is not None:
            table.prepare_as(weights, like)
        else:
            table.prepare(weights)

    def template_of(self, weights: Any) -> Any:
        """The slot plan of a prepared entry as a template for ``prepare(..., like=)``; None
        for models without a slot table or entries that are not slot-ready."""
        table = getattr(self.model, "slot_table", None)
        return None if table is None else table.template_of(weights)

    def activate(self, slot: int, weights: Any) -> None:
        """Write ``weights`` into ``slot`` (validated first: a bad adapter leaves it intact)."""
        nbytes = int(getattr(weights, "nbytes", 0))
        self._run(slot, lambda: self.model.set_lora_slot(slot, weights), nbytes)
        self.activations += 1
        self.bytes_activated += nbytes

    def clear(self, slot: int) -> None:
        """Zero ``slot``, ordered after its pending writes and the steps already in flight."""
        self._run(slot, lambda: self.model.clear_lora_slot(slot), 0)

    def _run(self, slot: int, write: Any, nbytes: int) -> None:
        t0 = time.perf_counter()
        if self.stream is None:
            write()
            self.host_ms += (time.perf_counter() - t0) * 1e3
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            try:
                write()
            finally:
                # Recorded even when validation refused the write (then nothing was queued).
                end.record(self.stream)
                self._ready[slot] = end
        if nbytes:
            self._timings.append((nbytes, start, end))
        self.host_ms += (time.perf_counter() - t0) * 1e3

    def wait_for(self, slots: Iterable[int]) -> None:
        """Order the compute stream after the pending writes of these slots only."""
        if not self._ready:
            return
        compute = torch.cuda.current_stream(self.device)
        for slot in set(slots):
            event = self._ready.pop(slot, None)
            if event is not None:
                compute.wait_event(event)
                self.step_waits += 1

    def pending(self) -> list[int]:
        """Slots with a write no step has waited for yet (it may have finished already)."""
        return sorted(self._ready)

    def synchronize(self) -> None:
        """Block the host until every queued write is done (shutdown, tests, benchmarks)."""
        if self.stream is not None:
            self.stream.synchronize()
        self._ready.clear()

    def last_event(self) -> Any:
        """The end event of the newest write (CUDA), None on CPU or before any write."""
        return self._timings[-1][2] if self._timings else None

    def finished_timings(self) -> list[tuple[int, float]]:
        """(bytes, device ms) of the recent activations that have finished (CUDA)."""
        # A copy first: ``stats`` may run beside the rank's command thread.
        return [(n, s.elapsed_time(e)) for n, s, e in list(self._timings) if e.query()]

    def stats(self) -> dict[str, Any]:
        """Counts, and the device time/throughput of recent finished activations (CUDA)."""
        out: dict[str, Any] = {"asynchronous": self.asynchronous, "activations": self.activations,
                               "bytes_activated": self.bytes_activated,
                               "step_waits": self.step_waits, "issue_ms": self.host_ms,
                               "pending_slots": self.pending()}
        table = getattr(self.model, "slot_table", None)
        if table is not None:
            out["staging_bytes"] = table.transfer.staging_nbytes  # device buffer of the copies
        done = self.finished_timings()
        if done:
            total_bytes, total_ms = sum(n for n, _ in done), sum(ms for _, ms in done)
            out["recent_device_ms"] = total_ms
            out["recent_gb_per_s"] = total_bytes / max(total_ms, 1e-6) / 1e6
        return out
