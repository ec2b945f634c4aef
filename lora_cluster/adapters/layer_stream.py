"""An adapter version opened once and read layer group by layer group, in file order.

An in-place update stages the new version in several commands, each naming a group of layers.
Opening parses the header and validates the whole adapter ONCE (for a 41k-module adapter the
header alone is most of a load's fixed cost), then every ``read(layers)`` reads only those
layers' tensors — this rank's TP slices and local experts — through the loader's rank reader.

Inside a group, modules are read in the order their first tensor appears in the file, so a
cold file is read front to back and the order in which parts *arrive* is the file's: a file
whose tensor order interleaves layers delivers several layers partly at once (what
``staging.LayerArrivals`` tracks). One part = one (layer, kind) module's LoRA pair on this
rank, possibly empty (e.g. no local expert has LoRA there).

    with LayerStream(path, spec, parallel, name="sql", version=2, max_lora_rank=64) as s:
        expected = s.expected()                 # layer → parts, for LayerArrivals
        for layer, modules in s.read([0, 1, 2]):
            ...
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from lora_cluster.adapters.load_spec import build_load_spec
from lora_cluster.adapters.loader import LoadStats, RankReader, inspect_adapter
from lora_cluster.adapters.plan import AdapterPlan, TargetPlan
from lora_cluster.adapters.reader import TensorReader
from lora_cluster.adapters.staging import Layer
from lora_cluster.adapters.weights import LoRATensors, ModuleKey
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.spec import ModelSpec

Part = tuple[int, int, TargetPlan]  # (first byte offset in the file, target index, target)


def _first_offsets(plan: AdapterPlan, group: int) -> dict[Layer, int]:
    """layer → smallest file offset among the tensors of template ``group`` on that layer."""
    groups, table = plan.verdict.groups, plan.table
    pos = groups.positions(group)
    begin = np.asarray(table.begin)[pos]
    if "*" not in groups.templates[group] or not pos.size:
        return {None: int(begin.min())} if pos.size else {}
    layer = groups.indices[pos, 0].astype(np.int64)
    order = np.lexsort((begin, layer))
    layer, begin = layer[order], begin[order]
    first = np.flatnonzero(np.r_[True, layer[1:] != layer[:-1]])
    return dict(zip(layer[first].tolist(), begin[first].tolist()))


def layer_bytes(plan: AdapterPlan) -> dict[Layer, int]:
    """Bytes of every served tensor per layer (whole file, all ranks' shares): for sizing
    update chunks on the controller from the header alone."""
    groups, table = plan.verdict.groups, plan.table
    sizes = np.asarray(table.end) - np.asarray(table.begin)
    out: dict[Layer, int] = {}
    seen: set[int] = set()
    for t in plan.targets:
        for g in (t.a_group, t.b_group):
            if g in seen:  # fused gate/up share their groups
                continue
            seen.add(g)
            pos = groups.positions(g)
            if "*" not in groups.templates[g]:
                out[None] = out.get(None, 0) + int(sizes[pos].sum())
                continue
            layer = groups.indices[pos, 0].astype(np.int64)
            per = np.bincount(layer, weights=sizes[pos].astype(np.float64))
            for i in np.flatnonzero(per).tolist():
                out[i] = out.get(i, 0) + int(per[i])
    return out


class LayerStream:
    """One adapter version, validated once, read layer group by layer group (module docstring)."""

    def __init__(self, adapter_dir: str | Path, spec: ModelSpec, parallel: ParallelInfo, *,
                 name: str, version: int, max_lora_rank: int,
                 dtype: torch.dtype | None = None, subfolder: str | None = None) -> None:
        self.name, self.version = name, version
        self.stats = LoadStats()
        load = build_load_spec(spec, parallel)
        self.plan = inspect_adapter(adapter_dir, spec, max_lora_rank=max_lora_rank,
                                    subfolder=subfolder or name, stats=self.stats)
        self._reader: TensorReader | None = TensorReader(self.plan.table)
        self._ranks = RankReader(self.plan, load, self._reader, self.stats, dtype, frozenset())
        self._parts: dict[Layer, list[Part]] = {}
        for index, t in enumerate(self.plan.targets):
            if not load.holds(t.kind):
                continue
            fa, fb = _first_offsets(self.plan, t.a_group), _first_offsets(self.plan, t.b_group)
            for layer in (t.layers or (None,)):
                offset = min(fa.get(layer, 1 << 62), fb.get(layer, 1 << 62))
                self._parts.setdefault(layer, []).append((offset, index, t))

    def __enter__(self) -> LayerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def rank(self) -> int:
        return int(self.plan.rank)

    def layers(self) -> list[Layer]:
        """Every layer this rank reads something of, ascending, model-wide (None) last."""
        return sorted(self._parts, key=lambda x: (x is None, x or 0))

    def expected(self) -> dict[Layer, int]:
        """layer → how many parts ``read`` delivers for it."""
        return {layer: len(parts) for layer, parts in self._parts.items()}

    def read(self, layers: Iterable[Layer]) -> Iterator[tuple[Layer, dict[ModuleKey, LoRATensors]]]:
        """Each part of these layers, in file order: (layer, its modules on this rank)."""
        if self._reader is None:
            raise ValueError(f"adapter {self.name!r} v{self.version}: the stream is closed")
        wanted = [x for x in dict.fromkeys(layers) if x in self._parts]
        order = sorted(((offset, index, layer, t) for layer in wanted
                        for offset, index, t in self._parts[layer]), key=lambda p: p[:2])
        try:
            for _, _, layer, t in order:
                self._ranks.layers = frozenset((layer,))
                yield layer, self._timed_read(t)
        finally:
            self._ranks.forget_cached()

    def _timed_read(self, t: TargetPlan) -> dict[ModuleKey, LoRATensors]:
        t0, c0 = time.perf_counter(), self.stats.convert_ms
        try:
            return self._ranks.read(t)
        finally:
            # As in load_adapter: reading is the wall time minus what ``convert`` took inside.
            self.stats.read_ms += (time.perf_counter() - t0) * 1e3 - (self.stats.convert_ms - c0)
            assert self._reader is not None
            self.stats.bytes_read = self._reader.bytes_read
            self.stats.tensors_read = self._reader.tensors_read

    def close(self) -> None:
        """Unmap the file (idempotent)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            self._ranks.forget_cached()
            reader.close()
