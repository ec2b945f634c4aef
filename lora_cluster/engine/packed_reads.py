"""Adapter reads straight into a slot-ready page, for adapters of a structure read before.

A fleet of adapters trained with one recipe share their config and safetensors header byte
for byte (``adapters/plan_cache.py``); only the tensor data differ. For such a structure the
slot-ready host copy (``slot_activation.slot_ready``: model dtype, scaling folded into B,
packed into one page) is a fixed rearrangement of the file's data section: page element i
is data element ``src[i]`` times ``mult[i]`` (the module's scaling on B, 1 elsewhere). So
after the first adapter of a structure has been read the general way, later ones are:

    key   = digest(config bytes, header bytes)    # both re-read: the recipe's key
    data  = the file's data section (same open file; its size checked against the header's)
    page  = data[src] (· mult, in float32 when the model is not) → model dtype
    views = the first adapter's (offset, shape, stride) of every A and B, on the new page

instead of one tensor view per A/B, a pack per module and a fold per B (cpu-tiny: ~0.5 ms a
read → ~0.1 ms). A hit opens the two files at the adapter directory's top (PEFT's default
layout) and reads the weights file once; any other layout, a missing or malformed file, or a
data section shorter than the header says goes the way of a miss (``PlanCache.inspect_keyed``
and the general checks), so every error is the general path's typed one. The recipe also
keeps the slot table's plan template of its first page (``slot_plan``): every page a recipe
builds has that page's geometry, so the rank plans it from the template without validating
the same shapes again (``LoRASlotTable.prepare_as``). ``src`` and ``mult`` are learnt by
replaying the first adapter's page views over index tensors, and a recipe is kept only if
applying it to that same file gives the general path's page bit for bit; a structure it
cannot describe (TP slices, expert layouts, several pages, mixed dtypes, a recipe over the
memory bound) keeps the general path.
Thread-safe (a rank's reader thread and command thread share it); at most ``capacity``
recipes and ``max_bytes`` of them, least recently used first out.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_cluster.adapters.config import CONFIG_FILE
from lora_cluster.adapters.header import DTYPES, MAX_HEADER_BYTES
from lora_cluster.adapters.layout import SAFETENSORS_FILE
from lora_cluster.adapters.loader import LoadedAdapter, LoadStats, whole_tensor_sources
from lora_cluster.adapters.plan import AdapterPlan
from lora_cluster.adapters.plan_cache import PlanCache
from lora_cluster.adapters.reader import read_file_head
from lora_cluster.adapters.weights import AdapterWeights, LoRATensors, ModuleKey
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.spec import ModelSpec

DEFAULT_CAPACITY = 64  # structures with a recipe
# A recipe holds an index per page element (int32 below 2**31 data elements) and, when some
# scaling is not 1, a float32 factor per element: all recipes together stay under this many
# bytes (least recently used first out); a structure whose recipe alone exceeds it keeps the
# general path. (A 48-layer attention adapter of rank 16 at H = 2048: ~12 M elements, 48 MB
# of index, plus 48 MB of factors when its scaling is not folded to 1.)
DEFAULT_MAX_BYTES = 256 << 20

View = tuple[int, tuple[int, ...], tuple[int, ...]]  # storage offset, shape, stride


@dataclass(frozen=True)
class _Recipe:
    """How one structure's data section becomes its slot-ready page (module docstring)."""

    src: torch.Tensor  # [page] int32/int64: data element (file dtype) of each page element
    mult: torch.Tensor | None  # [page] float32: B's scaling, 1 elsewhere; None: all 1
    file_dtype: torch.dtype
    views: tuple[tuple[ModuleKey, View, View], ...]  # per module, in load order: A, B
    rank: int
    data_start: int  # where the data section begins in the file (8 + header length)
    data_end: int  # its bytes the tensors use (the header's largest end offset)
    slot_plan: Any = None  # the slot table's plan template of these pages (opaque here)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.mult is None else self.mult.numel() * self.mult.element_size()
        return self.src.numel() * self.src.element_size() + extra


@dataclass(frozen=True)
class PackedRead:
    """A recipe hit: the slot-ready weights, where the time went (ms by phase), and the
    recipe's ``slot_plan`` (what ``learn`` was given; None if nothing)."""

    weights: AdapterWeights
    breakdown: dict[str, float]
    slot_plan: Any = None


@dataclass(frozen=True)
class ReadMiss:
    """No recipe (yet) for this file: its plan (to read it the general way without inspecting
    it again) and its content key (to learn a recipe from that read; None: not keyed)."""

    plan: AdapterPlan
    key: bytes | None
    stats: LoadStats


class PackedReads:
    """Recipes by structure for one rank's reads (see the module docstring)."""

    def __init__(self, plans: PlanCache, spec: ModelSpec, parallel: ParallelInfo, *,
                 dtype: torch.dtype, pin: bool, capacity: int = DEFAULT_CAPACITY,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.plans, self.spec, self.parallel = plans, spec, parallel
        self.dtype, self.pin, self.capacity, self.max_bytes = dtype, pin, capacity, max_bytes
        self._recipes: OrderedDict[bytes, _Recipe | None] = OrderedDict()  # None: no recipe
        self._lock = threading.Lock()
        self.hits = 0
        self.learnt = 0
        self.refused = 0

    def read(self, path: str, name: str, version: int) -> PackedRead | ReadMiss:
        """Slot-ready weights through a recipe, or a ``ReadMiss`` to read in full."""
        stats = LoadStats()
        hit = self._read_direct(path, stats)
        if hit is None:  # not the plain layout, a broken file, or no recipe: the general checks
            plan, key = self.plans.inspect_keyed(path, subfolder=name, stats=stats)
            with self._lock:
                recipe = self._recipes.get(key) if key is not None else None
                if recipe is not None:
                    self._recipes.move_to_end(key)  # type: ignore[arg-type]
            if recipe is None:
                return ReadMiss(plan, key, stats)
            t0 = time.perf_counter()
            hit = recipe, _data_section(plan, recipe.file_dtype)
            stats.read_ms += (time.perf_counter() - t0) * 1e3
        recipe, data = hit
        with self._lock:
            self.hits += 1
        t1 = time.perf_counter()
        weights = AdapterWeights(name, version, recipe.rank, self._assemble(recipe, data))
        t2 = time.perf_counter()
        breakdown = dict(stats.breakdown())
        breakdown["pin" if self.pin else "convert"] = (t2 - t1) * 1e3
        return PackedRead(weights, breakdown, recipe.slot_plan)

    def _read_direct(self, path: str, stats: LoadStats
                     ) -> tuple[_Recipe, torch.Tensor] | None:
        """A recipe hit read with one open of each file at the top of ``path``: (recipe, data
        section) — or None for the general path to take over (and raise its typed errors)."""
        t0 = time.perf_counter()
        root = Path(path)
        try:
            with open(root / CONFIG_FILE, "rb") as f:
                config_bytes = f.read()
            with open(root / SAFETENSORS_FILE, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) < 8:
                    return None
                (length,) = struct.unpack("<Q", head)
                if length > MAX_HEADER_BYTES or length > size - 8:
                    return None
                raw = f.read(length)
                if len(raw) != length:
                    return None
                key = self.plans.content_key(config_bytes, raw)
                with self._lock:
                    recipe = self._recipes.get(key)
                    if recipe is not None:
                        self._recipes.move_to_end(key)
                if recipe is None or recipe.data_start != 8 + length \
                        or size - recipe.data_start < recipe.data_end:
                    return None
                buf = np.empty(recipe.data_end, dtype=np.uint8)
                got = f.readinto(buf.data) or 0
                while 0 < got < recipe.data_end:
                    more = f.readinto(buf.data[got:])
                    if not more:
                        return None
                    got += more
        except OSError:
            return None
        if recipe.data_end and got != recipe.data_end:
            return None
        stats.read_ms += (time.perf_counter() - t0) * 1e3
        return recipe, torch.from_numpy(buf).view(recipe.file_dtype)

    def learn(self, miss: ReadMiss, loaded: LoadedAdapter, packed: AdapterWeights,
              slot_plan: Any = None) -> None:
        """Derive the recipe of ``miss``'s structure from its general read (``loaded``, and
        ``packed``: its slot-ready weights); kept only if it reproduces ``packed`` exactly.
        ``slot_plan`` rides with it to every hit (``PackedRead.slot_plan``)."""
        if miss.key is None:
            return
        with self._lock:
            if miss.key in self._recipes:
                return
        recipe = self._derive(miss.plan, loaded, packed, slot_plan)
        if recipe is not None:
            data = _data_section(miss.plan, recipe.file_dtype)
            if not _same(self._assemble(recipe, data), packed.modules):
                recipe = None
        if recipe is not None and recipe.nbytes > self.max_bytes:
            recipe = None
        with self._lock:
            self._recipes[miss.key] = recipe
            if recipe is None:
                self.refused += 1
            else:
                self.learnt += 1
            while len(self._recipes) > self.capacity or self._bytes() > self.max_bytes:
                self._recipes.popitem(last=False)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"recipes": sum(r is not None for r in self._recipes.values()),
                    "bytes": self._bytes(), "hits": self.hits, "learnt": self.learnt,
                    "refused": self.refused}

    def _bytes(self) -> int:
        return sum(r.nbytes for r in self._recipes.values() if r is not None)

    # ---------------------------------------------------------------- internals
    def _derive(self, plan: AdapterPlan, loaded: LoadedAdapter,
                packed: AdapterWeights, slot_plan: Any) -> _Recipe | None:
        table = plan.table
        file_dtype = DTYPES[table.uniform_dtype][0] if table.uniform_dtype else None
        sources = whole_tensor_sources(plan, self.spec, self.parallel)
        modules = packed.modules
        if (file_dtype is None or sources is None or not modules
                or list(sources) != list(modules) or list(loaded.weights.modules) != list(modules)):
            return None
        size = torch.empty((), dtype=file_dtype).element_size()
        tensors = [t for m in modules.values() for t in (m.a, m.b)]
        storage = tensors[0].untyped_storage()
        if any(t.untyped_storage().data_ptr() != storage.data_ptr() or t.dtype != self.dtype
               for t in tensors):
            return None  # several pages
        numel = storage.nbytes() // tensors[0].element_size()
        if numel * 4 > self.max_bytes or np.any(table.begin % size):
            return None
        src = torch.zeros(numel, dtype=torch.int64)
        mult = torch.ones(numel, dtype=torch.float32)
        views: list[tuple[ModuleKey, View, View]] = []
        for key, (pa, pb) in sources.items():
            out, original = modules[key], loaded.weights.modules[key]
            pair: list[View] = []
            for pos, view, file_t in ((pa, out.a, original.a), (pb, out.b, original.b)):
                first = int(table.begin[pos]) // size
                index = torch.arange(first, first + file_t.numel()).view(file_t.shape)
                geometry: View = (int(view.storage_offset()), tuple(view.shape),
                                  tuple(view.stride()))
                src.as_strided(geometry[1], geometry[2], geometry[0]).copy_(index)
                pair.append(geometry)
            b_view = pair[1]
            mult.as_strided(b_view[1], b_view[2], b_view[0]).fill_(float(original.scaling))
            views.append((key, pair[0], pair[1]))
        all_one = bool((mult == 1.0).all())
        if int(table.end.max()) // size < 2**31:
            src = src.to(torch.int32)  # index_select takes either: half the memory
        return _Recipe(src, None if all_one else mult, file_dtype, tuple(views),
                       loaded.weights.rank, table.data_start,
                       int(table.end.max()) if table.end.size else 0, slot_plan)

    def _assemble(self, recipe: _Recipe, data: torch.Tensor) -> dict[ModuleKey, LoRATensors]:
        page = data.index_select(0, recipe.src)
        if recipe.mult is not None:
            page = page.float() if page.dtype != torch.float32 else page
            page.mul_(recipe.mult)
        if page.dtype != self.dtype:
            page = page.to(self.dtype)
        if self.pin:
            pinned = torch.empty(page.shape, dtype=page.dtype, pin_memory=True)
            page = pinned.copy_(page)
        return {key: LoRATensors(page.as_strided(a[1], a[2], a[0]),
                                 page.as_strided(b[1], b[2], b[0]), 1.0)
                for key, a, b in recipe.views}


def _data_section(plan: AdapterPlan, dtype: torch.dtype) -> torch.Tensor:
    """The file's tensor data as one 1-D tensor of ``dtype`` (one read)."""
    table = plan.table
    end = int(table.end.max()) if table.end.size else 0
    raw = read_file_head(table.path, table.data_start + end)[table.data_start:]
    if raw.ctypes.data % 8:  # an unaligned start: ``view(dtype)`` needs an aligned one
        raw = raw.copy()
    return torch.from_numpy(raw).view(dtype)


def _same(ours: dict[ModuleKey, LoRATensors], theirs: dict[ModuleKey, LoRATensors]) -> bool:
    """Bit-for-bit equal A and B of every module, in the same order."""
    if list(ours) != list(theirs):
        return False
    for key, t in ours.items():
        for x, y in ((t.a, theirs[key].a), (t.b, theirs[key].b)):
            if x.shape != y.shape or x.dtype != y.dtype or x.stride() != y.stride():
                return False
            if not torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)):
                return False
    return True


__all__ = ["PackedRead", "PackedReads", "ReadMiss"]
