"""Planned slot writes: a validated host entry becomes a few bulk copies on the current stream.

An entry is planned once (``plan_write``): each of its tensors becomes a *segment* — a host
view and the place in a slot it goes to, named by a ``DstKey`` that the slot table resolves
per slot and caches (slot buffers never move). Segments are grouped by the host buffer they
live in into *spans* (one contiguous byte range each — a page of ``slot_host``) and spans into
*rounds* that fit the device staging buffer. Writing the entry into a slot (``SlotTransfer.run``)
is then, with no per-module Python:

1. zero what the entry leaves uncovered (targets it lacks, rank padding): ``_foreach_zero_``;
2. per round: one host→device copy per span into the staging buffer (big DMAs reach the
   pinned bandwidth; hundreds of small ones do not), then one multi-tensor device copy from
   staging into the slot views (``_foreach_copy_``; views that are not dense — rank padding —
   go through a second list that PyTorch copies tensor by tensor).

Without staging (CPU, where host memory *is* device memory) step 2 copies the host views
straight into the slots. Everything is queued on the caller's stream; the staging buffer is
reused round after round in stream order, and a write from another stream first waits for
the last one that used it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

DstKey = tuple[Any, ...]  # resolved to a tensor view by LoRASlotTable (per slot, cached)

STAGING_BYTES = 128 << 20  # device staging buffer (grown for a single larger segment)
_SPAN_GAP = 64 << 10  # host bytes between two segments copied along rather than split
_ALIGN = 256


@dataclass(frozen=True)
class Segment:
    """One copy: ``src`` (host, any layout) → the slot view named ``dst``; ``dense`` when both
    are contiguous in the same shape (eligible for the multi-tensor copy kernel)."""

    dst: DstKey
    src: torch.Tensor
    dense: bool


@dataclass(frozen=True)
class Round:
    """Spans (host bytes, staging byte offset) copied together, then segments [lo, hi):
    [lo, mid) dense, [mid, hi) strided."""

    spans: tuple[tuple[torch.Tensor, int], ...]
    lo: int
    mid: int
    hi: int


@dataclass(eq=False)  # compared and hashed by identity (a weak key of SlotTransfer)
class PlannedWrite:
    """An entry's write plan; slot-independent, so one serves every slot."""

    fingerprint: tuple[Any, ...]
    groups: frozenset[str]
    dst_keys: list[DstKey]  # segment order (by round, dense first)
    srcs: list[torch.Tensor]
    src_offsets: list[int]  # staging byte offset of each segment's first element
    zero_dense: list[DstKey]
    zero_strided: list[DstKey]
    rounds: list[Round]
    staging_bytes: int


def _extent(t: torch.Tensor) -> int:
    """Elements from a view's first to its last (its footprint in its storage)."""
    return 1 + sum((int(n) - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass
class _Span:
    storage: torch.Tensor  # uint8 over the whole host buffer
    lo: int
    hi: int
    members: list[int]


def _spans(segments: list[Segment], cap: int) -> list[_Span]:
    """Segments grouped by host buffer (storage) and dtype, in byte order; a span breaks on a
    big gap or where it would outgrow ``cap``. Spans keep the order of their first segment."""
    by_storage: dict[tuple[Any, ...], list[tuple[int, int, int]]] = {}
    for i, seg in enumerate(segments):
        t = seg.src
        start = int(t.storage_offset()) * t.element_size()
        key = (t.device, t.untyped_storage().data_ptr(), t.dtype)
        by_storage.setdefault(key, []).append((start, start + _extent(t) * t.element_size(), i))
    spans: list[_Span] = []
    for items in by_storage.values():
        first = segments[items[0][2]].src
        storage = torch.empty(0, dtype=torch.uint8, device=first.device)
        storage.set_(first.untyped_storage())
        items.sort()
        cur: _Span | None = None
        for lo, hi, i in items:
            if cur is not None and lo - cur.hi <= _SPAN_GAP and max(hi, cur.hi) - cur.lo <= cap:
                cur.hi = max(cur.hi, hi)
                cur.members.append(i)
            else:
                cur = _Span(storage, lo, hi, [i])
                spans.append(cur)
    spans.sort(key=lambda sp: min(sp.members))
    return spans


def plan_write(fingerprint: tuple[Any, ...], groups: frozenset[str], segments: list[Segment],
               zero_dense: list[DstKey], zero_strided: list[DstKey],
               staging_bytes: int = STAGING_BYTES) -> PlannedWrite:
    """Spans and rounds of ``segments`` (see module docstring); ``staging_bytes`` caps a round
    (a single larger segment gets a round of its own size)."""
    cap = max([staging_bytes] + [_extent(s.src) * s.src.element_size() for s in segments])
    rounds: list[Round] = []
    order: list[int] = []  # segments by round, dense first
    offsets: dict[int, int] = {}  # segment → staging byte offset
    pending: list[tuple[_Span, int]] = []  # spans of the open round, staging byte offset
    used = need = 0

    def close() -> None:
        members = [i for sp, _ in pending for i in sp.members]
        dense = [i for i in members if segments[i].dense]
        lo = len(order)
        order.extend(dense + [i for i in members if not segments[i].dense])
        rounds.append(Round(tuple((sp.storage[sp.lo:sp.hi], at) for sp, at in pending),
                            lo, lo + len(dense), len(order)))

    for sp in _spans(segments, cap):
        if pending and used + (sp.hi - sp.lo) > cap:
            close()
            pending, used = [], 0
        for i in sp.members:
            t = segments[i].src
            offsets[i] = used + int(t.storage_offset()) * t.element_size() - sp.lo
        pending.append((sp, used))
        used = _align(used + sp.hi - sp.lo)
        need = max(need, used)
    if pending:
        close()
    return PlannedWrite(fingerprint, groups, [segments[i].dst for i in order],
                        [segments[i].src for i in order], [offsets[i] for i in order],
                        zero_dense, zero_strided, rounds, need)


@dataclass(frozen=True)
class PlanTemplate:
    """A plan with its host tensors as geometry on the entry's storages (by index), so an
    entry of the same structure — same modules, shapes, strides and offsets in storages laid
    out alike (the host cache packs every adapter of one recipe identically) — gets the same
    plan without building it again (``PlannedWrite.replayed``)."""

    plan: PlannedWrite  # fields shared by every replay (srcs/rounds are rebuilt)
    srcs: tuple[tuple[int, tuple[int, ...], tuple[int, ...], int], ...]  # storage, size, stride, offset
    spans: tuple[tuple[tuple[int, int, int, int], ...], ...]  # per round: (storage, lo, hi, at)

    @property
    def storages(self) -> int:
        """How many storages (``bases`` in ``replay``) the entry's tensors lie in."""
        used = [i for i, *_ in self.srcs] + [i for rnd in self.spans for i, *_ in rnd]
        return max(used) + 1 if used else 0


def plan_template(plan: PlannedWrite, storages: dict[int, int]) -> PlanTemplate | None:
    """``plan`` as a template; ``storages`` maps a storage's data_ptr to its index in the
    entry. None when a host tensor lies outside those storages."""
    try:
        srcs = tuple((storages[t.untyped_storage().data_ptr()], tuple(t.shape), t.stride(),
                      int(t.storage_offset())) for t in plan.srcs)
        spans = tuple(tuple((storages[host.untyped_storage().data_ptr()],
                             int(host.storage_offset()), int(host.storage_offset()) + host.numel(),
                             at) for host, at in rnd.spans) for rnd in plan.rounds)
    except KeyError:
        return None
    return PlanTemplate(plan, srcs, spans)


def replay(template: PlanTemplate, fingerprint: tuple[Any, ...],
           bases: list[torch.Tensor]) -> PlannedWrite:
    """The plan ``template`` stands for, on an entry whose storages hold ``bases`` (one tensor
    of each, by index, in the template's dtype)."""
    srcs = [bases[i].as_strided(size, stride, offset) for i, size, stride, offset in template.srcs]
    raw: dict[int, torch.Tensor] = {}
    rounds = []
    for rnd, spans in zip(template.plan.rounds, template.spans):
        views = []
        for i, lo, hi, at in spans:
            storage = raw.get(i)
            if storage is None:
                storage = raw[i] = torch.empty(0, dtype=torch.uint8, device=bases[i].device)
                storage.set_(bases[i].untyped_storage())
            views.append((storage[lo:hi], at))
        rounds.append(Round(tuple(views), rnd.lo, rnd.mid, rnd.hi))
    p = template.plan
    return PlannedWrite(fingerprint, p.groups, p.dst_keys, srcs, p.src_offsets, p.zero_dense,
                        p.zero_strided, rounds, p.staging_bytes)


class SlotTransfer:
    """Runs planned writes on ``device``: through a reused staging buffer when ``staged``
    (default: on CUDA), else straight from the host views."""

    def __init__(self, device: torch.device, *, staged: bool | None = None,
                 staging_bytes: int = STAGING_BYTES) -> None:
        self.device = device
        self.staged = device.type == "cuda" if staged is None else staged
        self.staging_bytes = staging_bytes
        self._staging: torch.Tensor | None = None  # uint8 [bytes] on the device
        # Per plan: its segments' source views on the staging buffer and its spans' targets
        # there (dropped with the plan, or all at once when the buffer is replaced).
        self._views: weakref.WeakKeyDictionary[
            PlannedWrite, tuple[list[torch.Tensor], list[list[torch.Tensor]]]] = \
            weakref.WeakKeyDictionary()
        self._home: Any = None  # stream the staging buffer was allocated on (CUDA)
        self._last: tuple[Any, Any] | None = None  # (stream, event) of its last use (CUDA)

    def plan(self, fingerprint: tuple[Any, ...], groups: frozenset[str],
             segments: list[Segment], zero_dense: list[DstKey],
             zero_strided: list[DstKey]) -> PlannedWrite:
        return plan_write(fingerprint, groups, segments, zero_dense, zero_strided,
                          self.staging_bytes)

    def run(self, plan: PlannedWrite, dsts: list[torch.Tensor], zero_dense: list[torch.Tensor],
            zero_strided: list[torch.Tensor]) -> None:
        """Queue ``plan`` into the slot views ``dsts`` (``plan.dst_keys`` resolved), after
        zeroing the given views; everything on the current stream."""
        if zero_dense:
            torch._foreach_zero_(zero_dense)
        if zero_strided:
            torch._foreach_zero_(zero_strided)
        if not self.staged or not plan.rounds:
            self._copy(plan, dsts, plan.srcs)
            return
        srcs, span_dsts = self._staged_views(plan)
        for rnd, targets in zip(plan.rounds, span_dsts):
            for (host, _), target in zip(rnd.spans, targets):
                target.copy_(host, non_blocking=True)
            self._copy_round(rnd, dsts, srcs)
        self._record()

    @staticmethod
    def _copy(plan: PlannedWrite, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
        for rnd in plan.rounds:
            SlotTransfer._copy_round(rnd, dsts, srcs)

    @staticmethod
    def _copy_round(rnd: Round, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
        # Dense pairs share sizes and strides: one multi-tensor kernel; the rest (strided slot
        # views under rank padding) would make the whole list fall back, so they go apart.
        if rnd.mid > rnd.lo:
            torch._foreach_copy_(dsts[rnd.lo:rnd.mid], srcs[rnd.lo:rnd.mid], non_blocking=True)
        if rnd.hi > rnd.mid:
            torch._foreach_copy_(dsts[rnd.mid:rnd.hi], srcs[rnd.mid:rnd.hi], non_blocking=True)

    # ---- staging buffer ------------------------------------------------------------------
    def _staged_views(self, plan: PlannedWrite
                      ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        staging = self._acquire(plan.staging_bytes)
        cached = self._views.get(plan)
        if cached is not None:
            return cached
        typed: dict[torch.dtype, torch.Tensor] = {}
        srcs = []
        for src, off in zip(plan.srcs, plan.src_offsets):
            flat = typed.get(src.dtype)
            if flat is None:
                flat = typed[src.dtype] = staging.view(src.dtype)
            srcs.append(flat.as_strided(src.shape, src.stride(), off // src.element_size()))
        spans = [[staging[at:at + host.numel()] for host, at in rnd.spans]
                 for rnd in plan.rounds]
        self._views[plan] = (srcs, spans)
        return srcs, spans

    def _acquire(self, nbytes: int) -> torch.Tensor:
        cuda = self.device.type == "cuda"
        stream: Any = torch.cuda.current_stream(self.device) if cuda else None
        if self._last is not None and self._last[0] != stream:
            stream.wait_event(self._last[1])  # the previous user (another stream) is done
        if self._staging is None or self._staging.numel() < nbytes:
            if self._last is not None:
                self._last[1].synchronize()  # rare (a larger entry): let the old one go idle
            self._views.clear()  # the old buffer's views: it can go
            self._staging = None
            self._staging = torch.empty(_align(nbytes), dtype=torch.uint8, device=self.device)
            self._home = stream
        elif cuda and stream != self._home:
            self._staging.record_stream(stream)  # freeing it waits for this stream too
        return self._staging

    def _record(self) -> None:
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            event = torch.cuda.Event()
            event.record(stream)
            self._last = (stream, event)

    @property
    def staging_nbytes(self) -> int:
        """Bytes of the device staging buffer (0 before the first staged write)."""
        return 0 if self._staging is None else self._staging.numel()
