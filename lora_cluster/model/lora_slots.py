"""Writing adapters into the model's LoRA slots: validate everything, then clear and write.

The model owns a table ``(layer, kind) → target`` built once from its layers; an adapter's
modules are checked against it (shape, rank ≤ R) before a single byte is written, so a bad
adapter leaves the slot as it was. ``AdapterWeights`` (lora_cluster.adapters) satisfies the
``SlotWeights`` protocol; the model package only depends on its shape.

Two ways in. An adapter already *slot-ready* (model dtype, scaling 1.0 — the host cache's
entries, see ``slot_host``) is validated and planned once per entry (``slot_transfer``): later
writes of that entry, into any slot, are a few bulk copies with no per-module Python (the
slot views each plan names are built once per slot and cached; buffers never move). Anything
else (a file's dtype, an unfolded scale) goes through the per-module writers, casting on the
way. Both zero whatever the adapter leaves uncovered (targets it lacks, rank padding).

Shape legend: r a module's rank, R max rank, E local experts, V local vocab, H hidden.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lora_cluster.errors import AdapterRankError, AdapterShapeError, UnsupportedAdapterError
from lora_cluster.model.slot_host import GATE, UP
from lora_cluster.model.slot_transfer import (
    DstKey,
    PlannedWrite,
    PlanTemplate,
    Segment,
    SlotTransfer,
    plan_template,
    replay,
)
from lora_cluster.model.step_context import KIND_GROUP

ModuleKey = tuple[int | None, str]
Writer = Callable[[int, torch.Tensor, torch.Tensor, float], None]
Views = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (slot, r) → (a, b) views


class SlotTensors(Protocol):
    a: torch.Tensor
    b: torch.Tensor
    scaling: float


class SlotWeights(Protocol):
    """What a slot write reads: ``lora_cluster.adapters.weights.AdapterWeights`` fits."""

    name: str
    modules: Mapping[ModuleKey, SlotTensors]


@dataclass(frozen=True)
class LoRATarget:
    """One LoRA-capable module on this rank: expected local shapes (``-1`` = the rank) + writer.

    linear: a (r, in_local), b (out_local, r); experts: a (E, r, in_local), b (E, out_local, r);
    embed_tokens: a (r, V_local), b (H, r) (its a view is a transposed [V_local, r] slice).
    """

    group: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    write: Writer
    views: Views  # where a rank-r pair of ``slot`` lives, shaped like the adapter's a and b


Checked = tuple[ModuleKey, LoRATarget, SlotTensors]  # a validated module and its target


def _fits(shape: tuple[int, ...], expected: tuple[int, ...], rank: int) -> bool:
    return len(shape) == len(expected) and all(
        s == (rank if e == -1 else e) for s, e in zip(shape, expected))


class LoRASlotTable:
    """All LoRA targets of one rank's model, and the slot write/clear logic over them."""

    def __init__(self, targets: dict[ModuleKey, LoRATarget], skipped: frozenset[str],
                 clearers: Sequence[Callable[[int], None]], max_rank: int) -> None:
        self.targets = targets
        self.skipped = skipped  # kinds another EP rank holds (ignored here, not an error)
        self._clearers = clearers
        self.max_rank = max_rank
        self._transfer: SlotTransfer | None = None
        self._plans: dict[int, PlannedWrite] = {}  # id(weights) → plan, dropped with weights
        self._views: dict[int, dict[DstKey, torch.Tensor]] = {}  # slot → resolved plan views
        # Planning memos (slot buffers never move, so slot 0's views stand for every slot):
        # a plan key's view in slot 0 (None: a gate/up pair that is not one block), and the
        # zero lists of each set of (module, rank) an entry covers — entries of one shape
        # plan with no per-target view building.
        self._probe_views: dict[DstKey, torch.Tensor | None] = {}
        self._zero_lists: dict[frozenset[tuple[ModuleKey, int]],
                               tuple[list[DstKey], list[DstKey]]] = {}
        self._dtype: torch.dtype | None = None
        # Plans by entry structure (``_structure``): a host cache of one recipe's adapters
        # plans once, then each new entry replays the plan on its own pages.
        self._templates: dict[tuple[Any, ...], PlanTemplate | None] = {}
        # Per slot, the layout of what it holds: ALL_ZERO after a clear; after a planned
        # write, its (dst keys, zero lists) — the slot then holds exactly clear + that write
        # (every target is either written whole or zeroed first), so its bytes lie only in
        # those dst regions; absent (unknown) after any other write. A planned write with
        # the same dst keys and zero lists as the slot's layout overwrites all of that and
        # skips its zeroing: entries of one recipe replacing each other in a slot (every
        # attention-only adapter over a model with expert targets) write their own bytes
        # and nothing else (cpu-tiny: 227 KB of zeroing a placement, memory traffic that
        # also slowed the next forward).
        self._layout: dict[int, object] = {}

    @property
    def transfer(self) -> SlotTransfer:
        """Runs planned writes (staged through device memory on CUDA); replaceable in tests."""
        if self._transfer is None:
            self._transfer = SlotTransfer(self._probe().device)
        return self._transfer

    @transfer.setter
    def transfer(self, transfer: SlotTransfer) -> None:
        self._transfer = transfer

    def _probe(self) -> torch.Tensor:
        return next(iter(self.targets.values())).views(0, 1)[0]

    def validate(self, weights: SlotWeights) -> list[tuple[LoRATarget, SlotTensors]]:
        """Every module checked against its target; raises before anything is written."""
        return [(target, tensors) for _, target, tensors in self._check(weights)]

    def _check(self, weights: SlotWeights) -> list[Checked]:
        plan = []
        for key, tensors in weights.modules.items():
            target = self.targets.get(key)
            if target is None:
                if key[1] in self.skipped:
                    continue
                raise UnsupportedAdapterError(
                    f"adapter {weights.name!r}: module (layer={key[0]}, kind={key[1]!r}) is not "
                    "a LoRA target of this model", adapter=weights.name, module=str(key))
            a, b = tensors.a, tensors.b
            rank = int(a.shape[-2]) if a.dim() >= 2 else -1
            if rank > self.max_rank:
                raise AdapterRankError(
                    f"adapter {weights.name!r}: rank {rank} of (layer={key[0]}, kind={key[1]!r})"
                    f" exceeds max_lora_rank={self.max_rank}", adapter=weights.name,
                    module=str(key), rank=rank, max_lora_rank=self.max_rank)
            if rank < 1 or not (_fits(tuple(a.shape), target.a_shape, rank)
                                and _fits(tuple(b.shape), target.b_shape, rank)):
                raise AdapterShapeError(
                    f"adapter {weights.name!r}: (layer={key[0]}, kind={key[1]!r}) has A "
                    f"{list(a.shape)} and B {list(b.shape)}; this rank expects A "
                    f"{_show(target.a_shape)} and B {_show(target.b_shape)} (r ≤ {self.max_rank})",
                    adapter=weights.name, module=str(key))
            plan.append((key, target, tensors))
        return plan

    def clear(self, slot: int) -> None:
        self._layout.pop(slot, None)
        for clear in self._clearers:
            clear(slot)
        self._layout[slot] = _ALL_ZERO

    def prepare(self, weights: SlotWeights) -> bool:
        """Validate ``weights`` (typed errors as ``write``) and, if slot-ready, plan its writes
        now — for a host-cache entry as it is created, so its first activation costs no more
        than the others. Returns whether it was planned."""
        return self._planned(weights)[0] is not None

    def template_of(self, weights: SlotWeights) -> PlanTemplate | None:
        """The plan of an entry ``prepare`` planned, as a template for entries laid out
        exactly like it (``prepare_as``); None when it was not planned (or not slot-ready)."""
        planned = self._plans.get(id(weights))
        if planned is None or planned.fingerprint != self._fingerprint(weights):
            return None
        return plan_template(planned, self._storages(weights)[1])

    def prepare_as(self, weights: SlotWeights, template: PlanTemplate) -> None:
        """``prepare`` for an entry the caller guarantees is laid out exactly like the one
        ``template`` came from (``template_of``): the same modules with the same dtype,
        scaling 1.0, shapes, strides and offsets in storages of the same sizes — e.g. every
        page one read recipe builds (``engine/packed_reads.py``). That entry passed validation,
        and validation is a function of exactly that layout, so only the plan is replayed on
        this entry's storages. A storage count unlike the template's plans in full."""
        fingerprint = self._fingerprint(weights)
        planned = self._plans.get(id(weights))
        if planned is not None and planned.fingerprint == fingerprint:
            return
        bases = self._storages(weights)[0]
        if len(bases) != template.storages:
            self.prepare(weights)
            return
        self._remember(weights, replay(template, fingerprint, bases))

    def write(self, slot: int, weights: SlotWeights) -> frozenset[str]:
        """Validate, write every module into ``slot`` and zero the rest of it; returns the
        groups the adapter has. A slot-ready entry is validated and planned on its first
        write only (the plan is kept while the entry lives and its modules stay the same)."""
        planned, checked = self._planned(weights)
        if planned is None:  # not slot-ready: cast and fold on the way, module by module
            self.clear(slot)
            self._layout.pop(slot, None)
            for _, target, t in checked:
                target.write(slot, t.a, t.b, float(t.scaling))
            return frozenset(target.group for _, target, _ in checked)
        layout = (planned.dst_keys, planned.zero_dense, planned.zero_strided)
        known = self._layout.pop(slot, None)
        if known is _ALL_ZERO or _same_layout(known, layout):
            zero_dense: list[torch.Tensor] = []
            zero_strided: list[torch.Tensor] = []
        else:
            zero_dense = self._dsts(slot, planned.zero_dense)
            zero_strided = self._dsts(slot, planned.zero_strided)
        self.transfer.run(planned, self._dsts(slot, planned.dst_keys), zero_dense, zero_strided)
        self._layout[slot] = layout
        return planned.groups

    # ---- planned writes ------------------------------------------------------------------
    def _planned(self, weights: SlotWeights) -> tuple[PlannedWrite | None, list[Checked]]:
        """The kept plan of ``weights`` or a new one; (None, its validated modules) when it is
        not slot-ready. Raises the typed validation errors."""
        fingerprint = self._fingerprint(weights)
        planned = self._plans.get(id(weights))
        if planned is not None and planned.fingerprint == fingerprint:
            return planned, []
        checked = self._check(weights)
        if not self._slot_ready(checked):
            return None, checked
        structure, bases, storages = _structure(checked)
        template = self._templates.get(structure)
        if template is not None:
            planned = replay(template, fingerprint, bases)
        else:
            planned = self._plan(checked, fingerprint)
            if len(self._templates) >= _TEMPLATES_KEPT:
                self._templates.clear()
            self._templates[structure] = plan_template(planned, storages)
        self._remember(weights, planned)
        return planned, checked

    def _storages(self, weights: SlotWeights) -> tuple[list[torch.Tensor], dict[int, int]]:
        """One tensor of each storage the modules' A and B lie in, numbered in order of
        first use as ``_structure`` numbers those of ``_check``'s modules, and data_ptr →
        number."""
        storages: dict[int, int] = {}
        bases: list[torch.Tensor] = []
        targets = self.targets
        for key, t in weights.modules.items():
            if key not in targets:
                continue
            for x in (t.a, t.b):
                ptr = x.untyped_storage().data_ptr()
                if ptr not in storages:
                    storages[ptr] = len(bases)
                    bases.append(x)
        return bases, storages

    def _fingerprint(self, weights: SlotWeights) -> tuple[Any, ...]:
        modules = weights.modules
        return (tuple(modules), tuple(map(id, modules.values())), self.max_rank)

    def _slot_ready(self, checked: list[Checked]) -> bool:
        if self._dtype is None:
            self._dtype = self._probe().dtype
        dtype = self._dtype
        return all(t.a.dtype == dtype and t.b.dtype == dtype and float(t.scaling) == 1.0
                   for _, _, t in checked)

    def _remember(self, weights: SlotWeights, planned: PlannedWrite) -> None:
        key = id(weights)
        try:
            if key not in self._plans:
                weakref.finalize(weights, self._plans.pop, key, None)
        except TypeError:  # no weak references: plan again next time
            return
        self._plans[key] = planned

    def _plan(self, checked: list[Checked],
              fingerprint: tuple[Any, ...]) -> PlannedWrite:
        """Segments of a validated slot-ready entry, and the views it leaves to zero."""
        present = {key: t for key, _, t in checked}
        pairs: dict[int | None, torch.Tensor] = {}  # layer → host gate|up B block
        for (layer, kind), t in present.items():
            up = present.get((layer, UP)) if kind == GATE else None
            if up is not None and up.b.shape == t.b.shape:
                src = _halves(t.b, up.b)
                if src is not None and self._slot0(("pair", layer, _rank(t))) is not None:
                    pairs[layer] = src
        segments = []
        for (layer, kind), t in present.items():
            segments.append(self._segment(("v", (layer, kind), 0, _rank(t)), t.a))
            if kind in (GATE, UP) and layer in pairs:
                if kind == GATE:
                    segments.append(Segment(("pair", layer, _rank(t)), pairs[layer], True))
                continue
            segments.append(self._segment(("v", (layer, kind), 1, _rank(t)), t.b))
        covered = frozenset((key, _rank(t)) for key, t in present.items())
        zeros = self._zero_lists.get(covered)
        if zeros is None:
            zeros = self._zero_lists[covered] = self._zeros(present)
        groups = frozenset(target.group for _, target, _ in checked)
        return self.transfer.plan(fingerprint, groups, segments, list(zeros[0]), list(zeros[1]))

    def _zeros(self, present: Mapping[ModuleKey, SlotTensors]
               ) -> tuple[list[DstKey], list[DstKey]]:
        """(dense, strided) plan keys of what an entry covering ``present`` leaves to zero:
        the targets it lacks and the rank padding of those it has below ``max_rank``."""
        rank_max = self.max_rank
        uncovered = {key for key in self.targets
                     if key not in present or _rank(present[key]) < rank_max}
        zero_dense: list[DstKey] = []
        zero_strided: list[DstKey] = []
        for layer, kind in uncovered:
            for which in (0, 1):
                if which == 1 and kind in (GATE, UP) and {(layer, GATE), (layer, UP)} <= uncovered \
                        and self._slot0(("pair", layer, rank_max)) is not None:
                    if kind == GATE:
                        zero_dense.append(("pair", layer, rank_max))
                    continue
                full = self.targets[(layer, kind)].views(0, rank_max)[which]
                dkey = ("v", (layer, kind), which, rank_max, _storage_order(full))
                dense = self._slot0(dkey)
                (zero_dense if dense is not None and dense.is_contiguous()
                 else zero_strided).append(dkey)
        return zero_dense, zero_strided

    def _slot0(self, dkey: DstKey) -> torch.Tensor | None:
        """``_resolve(0, dkey)``, memoized (planning asks the same keys for every entry)."""
        try:
            return self._probe_views[dkey]
        except KeyError:
            view = self._probe_views[dkey] = self._resolve(0, dkey)
            return view

    def _segment(self, where: DstKey, src: torch.Tensor) -> Segment:
        perm = _storage_order(src)
        dkey = (*where, perm)
        dst = self._slot0(dkey)
        src = src.permute(perm)
        dense = bool(src.is_contiguous() and dst is not None and dst.is_contiguous())
        if dense and dst is not None and src.stride() != dst.stride():
            # Contiguous both, differing only on size-1 dims: the multi-tensor copy wants the
            # strides equal, and on those dims they mean nothing.
            src = src.as_strided(src.shape, dst.stride())
        return Segment(dkey, src, dense)

    def _resolve(self, slot: int, dkey: DstKey) -> torch.Tensor | None:
        """The view a plan key names in ``slot`` (None: a gate/up pair that is not one block)."""
        if dkey[0] == "pair":
            _, layer, r = dkey
            return _halves(self.targets[(layer, GATE)].views(slot, r)[1],
                           self.targets[(layer, UP)].views(slot, r)[1])
        _, key, which, r, perm = dkey
        return self.targets[key].views(slot, r)[which].permute(perm)

    def _dsts(self, slot: int, keys: list[DstKey]) -> list[torch.Tensor]:
        cache = self._views.setdefault(slot, {})
        try:
            return [cache[k] for k in keys]
        except KeyError:
            for k in keys:
                if k not in cache:
                    view = self._resolve(slot, k)
                    assert view is not None, k  # plans name only pairs that resolved
                    cache[k] = view
            return [cache[k] for k in keys]


_TEMPLATES_KEPT = 64  # distinct entry structures whose plans are kept
_ALL_ZERO = object()  # ``LoRASlotTable._layout``: the slot was cleared


def _same_layout(known: object, layout: tuple[list[DstKey], ...]) -> bool:
    """Whether a slot's recorded layout is ``layout`` (plans replayed from one template share
    their lists: identity first)."""
    if not isinstance(known, tuple):
        return False
    return all(k is v or k == v for k, v in zip(known, layout, strict=True))


def _structure(checked: list[Checked]
               ) -> tuple[tuple[Any, ...], list[torch.Tensor], dict[int, int]]:
    """What a slot-ready entry's plan is a function of (besides the table): each module's key
    and its a/b geometry — size, stride, offset — in the entry's storages, numbered in order
    of first use; plus one tensor of each storage (``bases``) and data_ptr → number. Planning
    reads storages only through these (which tensors share one, and where in it they lie)."""
    storages: dict[int, int] = {}
    bases: list[torch.Tensor] = []
    parts: list[Any] = []
    for key, _, t in checked:
        parts.append(key)
        for x in (t.a, t.b):
            ptr = x.untyped_storage().data_ptr()
            index = storages.get(ptr)
            if index is None:
                index = storages[ptr] = len(bases)
                bases.append(x)
            parts.append((index, x.shape, x.stride(), x.storage_offset()))
    dtype = bases[0].dtype if bases else None
    device = bases[0].device if bases else None
    return (dtype, device, *parts), bases, storages


def _rank(t: SlotTensors) -> int:
    return int(t.a.shape[-2])


def _storage_order(t: torch.Tensor) -> tuple[int, ...]:
    """Dims by decreasing stride: the permutation that makes a permuted-dense view contiguous
    (embed_tokens A is kept as a transposed [V, r] block on the host and in the slots)."""
    strides = t.stride()
    return tuple(sorted(range(t.dim()), key=lambda d: -strides[d]))


def _halves(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """``x`` and ``y`` [E, I, r] as the two halves of dim 1 of one contiguous [E, 2I, r] block
    (how b13 and the host pack hold gate and up B), or None if they are not."""
    if (x.dim() != 3 or x.shape != y.shape or x.stride() != y.stride() or x.device != y.device
            or x.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()
            or y.storage_offset() != x.storage_offset() + x.shape[1] * x.stride(1)):
        return None
    block = x.as_strided((x.shape[0], 2 * x.shape[1], x.shape[2]), x.stride())
    return block if block.is_contiguous() else None


def _show(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("r" if d == -1 else str(d) for d in shape) + "]"


def linear_target(kind: str, in_local: int, out_local: int, write: Writer,
                  views: Views) -> LoRATarget:
    return LoRATarget(KIND_GROUP[kind], (-1, in_local), (out_local, -1), write, views)


def expert_target(kind: str, experts: int, in_local: int, out_local: int, write: Writer,
                  views: Views) -> LoRATarget:
    return LoRATarget(KIND_GROUP[kind], (experts, -1, in_local), (experts, out_local, -1),
                      write, views)


def embedding_target(vocab_local: int, hidden: int, write: Writer, views: Views) -> LoRATarget:
    return LoRATarget(KIND_GROUP["embed_tokens"], (-1, vocab_local), (hidden, -1), write, views)
