"""Load one rank's share of a PEFT adapter: validate from the header, then read only this
rank's TP slices and local experts, and convert them to the canonical ``AdapterWeights``.

    inspect_adapter(dir, spec, max_lora_rank=...)              -> AdapterPlan   (no tensor data)
    load_adapter(dir, spec, parallel, name=..., version=..., max_lora_rank=...) -> LoadedAdapter
    load_adapter_weights(...)                                  -> AdapterWeights

Each load logs the plan's one summary warning (modules the text model does not run, with
counts per kind and a few examples) on the ``lora_cluster.adapters`` logger, once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lora_cluster.adapters.config import read_adapter_config
from lora_cluster.adapters.fused_experts import fused_b_to_experts, read_fused_a, read_fused_b
from lora_cluster.adapters.header import TensorTable, read_bin_table, read_safetensors_table
from lora_cluster.adapters.layout import locate_adapter_files
from lora_cluster.adapters.load_spec import LoadSpec, build_load_spec
from lora_cluster.adapters.plan import AdapterPlan, TargetPlan, plan_adapter
from lora_cluster.adapters.reader import TensorReader
from lora_cluster.adapters.validation import check_names
from lora_cluster.adapters.weights import AdapterWeights, LoRATensors, ModuleKey
from lora_cluster.errors import ConfigError
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.spec import ModelSpec

if TYPE_CHECKING:
    from lora_cluster.adapters.plan_cache import PlanCache

logger = logging.getLogger("lora_cluster.adapters")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadStats:
    """Bytes and milliseconds of one load (read: header + tensor bytes; validate: config,
    names and plan; convert: layout changes, casts, padding)."""

    bytes_read: int = 0
    tensors_read: int = 0
    file_bytes: int = 0
    read_ms: float = 0.0
    validate_ms: float = 0.0
    convert_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.read_ms + self.validate_ms + self.convert_ms

    def breakdown(self) -> tuple[tuple[str, float], ...]:
        return (("read", self.read_ms), ("validate", self.validate_ms),
                ("convert", self.convert_ms))

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            ms = (time.perf_counter() - t0) * 1e3
            setattr(self, f"{phase}_ms", getattr(self, f"{phase}_ms") + ms)


@dataclass(frozen=True, eq=False)
class LoadedAdapter:
    """A rank's adapter weights with the plan they came from and the load's numbers."""

    weights: AdapterWeights
    plan: AdapterPlan
    stats: LoadStats = field(default_factory=LoadStats)


def _read_table(weights: Path) -> TensorTable:
    if weights.suffix == ".bin":
        return read_bin_table(weights)
    return read_safetensors_table(weights)


def inspect_adapter(adapter_dir: str | Path, spec: ModelSpec, *, max_lora_rank: int,
                    subfolder: str | None = None, stats: LoadStats | None = None,
                    warn: bool = True) -> AdapterPlan:
    """Validate an adapter against the model from its config and header only."""
    stats = stats if stats is not None else LoadStats()
    with stats.timing("validate"):
        files = locate_adapter_files(adapter_dir, subfolder)
        config = read_adapter_config(files.config)
    with stats.timing("read"):
        table = _read_table(files.weights)
    stats.file_bytes = table.nbytes
    with stats.timing("validate"):
        verdict = check_names(table.names, spec, where=str(files.directory))
        plan = plan_adapter(config, table, verdict, spec, max_lora_rank=max_lora_rank)
    if warn and plan.warning:
        logger.warning(plan.warning)
    return plan


class _RankReader:
    """Reads every target of a plan that this rank holds (see module docstring)."""

    def __init__(self, plan: AdapterPlan, load: LoadSpec, reader: TensorReader,
                 stats: LoadStats, dtype: torch.dtype | None,
                 layers: frozenset[int | None] | None) -> None:
        self.plan, self.load, self.reader, self.stats, self.dtype = plan, load, reader, stats, dtype
        self.layers = layers  # None: every layer; else only these (None = model-wide kinds)
        self.groups = plan.verdict.groups
        self._fused_a: dict[tuple[int, int], torch.Tensor] = {}
        # Position maps per template group: a layer-by-layer reader asks for them per layer.
        self._memo: dict[tuple[str, int], object] = {}

    def forget_cached(self) -> None:
        """Drop fused-A tensors kept for the sibling kind (after a layer group is read)."""
        self._fused_a.clear()

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        if self.dtype is None or t.dtype == self.dtype:
            return t
        with self.stats.timing("convert"):
            return t.to(self.dtype)

    def _wanted(self, layers: tuple[int | None, ...]) -> list[int | None]:
        return [x for x in layers if self.layers is None or x in self.layers]

    def _by_layer(self, group: int) -> dict[int | None, int]:
        memo = self._memo.get(("by_layer", group))
        if memo is None:
            memo = self._memo[("by_layer", group)] = self._by_layer_uncached(group)
        return memo  # type: ignore[return-value]

    def _by_layer_uncached(self, group: int) -> dict[int | None, int]:
        pos = self.groups.positions(group)
        if "*" not in self.groups.templates[group]:
            return {None: int(pos[0])}
        return dict(zip(self.groups.indices[pos, 0].tolist(), pos.tolist()))

    def read(self, t: TargetPlan) -> dict[ModuleKey, LoRATensors]:
        if not self.load.holds(t.kind):
            return {}
        if t.layout == "experts_2d":
            return self._experts_2d(t)
        if t.layout == "experts_3d":
            return self._experts_3d(t)
        shard = self.load.shards[t.kind]
        pa, pb = self._by_layer(t.a_group), self._by_layer(t.b_group)
        out: dict[ModuleKey, LoRATensors] = {}
        for layer in self._wanted(t.layers or (None,)):
            _, scaling = t.ranks.at(() if layer is None else (layer,))
            a = self.reader.read(pa[layer], cols=shard.in_range)
            b = self.reader.read(pb[layer], rows=shard.out_range)
            out[(layer, t.kind)] = LoRATensors(self._cast(a), self._cast(b), scaling)
        return out

    def _local_positions(self, group: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """layer → (positions, local expert ids) of this rank's experts, in local order."""
        memo = self._memo.get(("local", group))
        if memo is None:
            memo = self._memo[("local", group)] = self._local_positions_uncached(group)
        return memo  # type: ignore[return-value]

    def _local_positions_uncached(self, group: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        pos = self.groups.positions(group)
        idx = self.groups.indices[pos]
        local = self.load.local_of[idx[:, 1]]
        keep = local >= 0
        pos, layer, local = pos[keep], idx[keep, 0], local[keep]
        order = np.lexsort((local, layer))
        pos, layer, local = pos[order], layer[order], local[order]
        cuts = np.flatnonzero(np.diff(layer)) + 1
        return {int(ls[0]): (p, lo) for p, ls, lo in zip(np.split(pos, cuts), np.split(layer, cuts),
                                                          np.split(local, cuts)) if ls.size}

    def _experts_2d(self, t: TargetPlan) -> dict[ModuleKey, LoRATensors]:
        shard, n_local = self.load.shards[t.kind], self.load.num_local_experts
        pa, pb = self._local_positions(t.a_group), self._local_positions(t.b_group)
        out: dict[ModuleKey, LoRATensors] = {}
        for layer, (pos_a, local) in pa.items():
            if self.layers is not None and layer not in self.layers:
                continue
            pos_b = pb[layer][0]
            if t.ranks.per_index is None:
                a = self.reader.read_stack(pos_a, cols=shard.in_range)   # [n, R, in_local]
                b = self.reader.read_stack(pos_b, rows=shard.out_range)  # [n, out_local, R]
                scaling = t.ranks.scaling
            else:
                a, b = self._mixed_rank_experts(t, layer, pos_a, pos_b, local)
                scaling = 1.0
            if local.size != n_local:  # some local experts have no LoRA: zero entries
                with self.stats.timing("convert"):
                    a, b = _scatter(a, local, n_local), _scatter(b, local, n_local)
            out[(layer, t.kind)] = LoRATensors(self._cast(a), self._cast(b), scaling)
        return out

    def _mixed_rank_experts(self, t: TargetPlan, layer: int, pos_a: np.ndarray,
                            pos_b: np.ndarray, local: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts of one layer with different ranks/scalings (index-dependent patterns):
        zero-pad to the layer's largest rank and fold each expert's scaling into its b."""
        shard = self.load.shards[t.kind]
        experts = [self.load.local_experts[i] for i in local.tolist()]
        a_parts = [self.reader.read(int(p), cols=shard.in_range) for p in pos_a.tolist()]
        b_parts = [self.reader.read(int(p), rows=shard.out_range) for p in pos_b.tolist()]
        with self.stats.timing("convert"):
            top = max(a.shape[0] for a in a_parts)
            scale = [t.ranks.at((layer, e))[1] for e in experts]
            a = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, top - x.shape[0]))
                             for x in a_parts])
            b = torch.stack([torch.nn.functional.pad(y * s, (0, top - y.shape[1]))
                             for y, s in zip(b_parts, scale)])
        return a, b

    def _experts_3d(self, t: TargetPlan) -> dict[ModuleKey, LoRATensors]:
        shard = self.load.shards[t.kind]
        experts = np.asarray(self.load.local_experts, np.int64)
        if not experts.size:
            return {}
        pa, pb = self._by_layer(t.a_group), self._by_layer(t.b_group)
        lo, hi = shard.out_range
        base = t.b_rows[0] if t.b_rows is not None else 0
        out: dict[ModuleKey, LoRATensors] = {}
        for layer in t.layers:
            if self.layers is not None and layer not in self.layers:
                continue
            rank, scaling = t.ranks.at((layer,))
            key = (t.a_group, layer)
            a = self._fused_a.get(key)
            if a is None:  # gate and up share A: read it once
                a = self._fused_a[key] = self._cast(read_fused_a(
                    self.reader, pa[layer], experts, rank, shard.in_range))
            raw = read_fused_b(self.reader, pb[layer], experts, rank, self.load.num_experts,
                               (base + lo, base + hi))
            with self.stats.timing("convert"):
                b = fused_b_to_experts(raw, rank)
            out[(layer, t.kind)] = LoRATensors(a, self._cast(b), scaling)
        return out


# The per-rank reader under a public name, for staging an update layer by layer
# (``adapters.layer_stream``) with one header parse for all of its layer groups.
RankReader = _RankReader


def _scatter(t: torch.Tensor, local: np.ndarray, n_local: int) -> torch.Tensor:
    full = t.new_zeros((n_local, *t.shape[1:]))
    full[torch.from_numpy(local)] = t
    return full


# build_load_spec per (spec object, parallel): a pure function of both, ~0.1 ms of Python a
# load, and a rank asks for the same one every time. The spec is held so its id stays its own.
_LOAD_SPECS: dict[tuple[int, ParallelInfo], tuple[ModelSpec, LoadSpec]] = {}
_LOAD_SPECS_KEPT = 16


def _load_spec(spec: ModelSpec, parallel: ParallelInfo) -> LoadSpec:
    key = (id(spec), parallel)
    try:
        hit = _LOAD_SPECS.get(key)
    except TypeError:  # an unhashable placement: build it every time
        return build_load_spec(spec, parallel)
    if hit is not None and hit[0] is spec:
        return hit[1]
    load = build_load_spec(spec, parallel)
    load.local_of.setflags(write=False)  # shared by every load from now on
    if len(_LOAD_SPECS) >= _LOAD_SPECS_KEPT:
        _LOAD_SPECS.clear()
    _LOAD_SPECS[key] = (spec, load)
    return load


def whole_tensor_sources(plan: AdapterPlan, spec: ModelSpec, parallel: ParallelInfo
                         ) -> dict[ModuleKey, tuple[int, int]] | None:
    """Header positions of (A, B) for every module ``load_adapter`` gives this rank, when each
    is one whole tensor of a safetensors file (no TP slice, no expert layout, no fused
    tensors); None otherwise. Keys in ``load_adapter``'s order."""
    if plan.table.tensors is not None:
        return None
    load = _load_spec(spec, parallel)
    groups = plan.verdict.groups
    shapes = plan.table.shapes
    out: dict[ModuleKey, tuple[int, int]] = {}
    for t in plan.targets:
        if not load.holds(t.kind):
            continue
        if t.layout not in ("linear", "embedding"):
            return None
        shard = load.shards[t.kind]
        by_layer: list[dict[int | None, int]] = []
        for group in (t.a_group, t.b_group):
            pos = groups.positions(group)
            if "*" not in groups.templates[group]:
                by_layer.append({None: int(pos[0])})
            else:
                by_layer.append(dict(zip(groups.indices[pos, 0].tolist(), pos.tolist())))
        pa, pb = by_layer
        for layer in t.layers or (None,):
            a, b = pa[layer], pb[layer]
            if not (_whole_range(shard.in_range, int(shapes[a][1]))
                    and _whole_range(shard.out_range, int(shapes[b][0]))):
                return None
            out[(layer, t.kind)] = (a, b)
    return out


def _whole_range(sel: object, full: int) -> bool:
    return sel is None or (isinstance(sel, tuple) and sel[0] == 0 and sel[1] == full)


def _torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype: must be one of {sorted(_DTYPES)}, got {dtype!r}", field="dtype")
    return _DTYPES[dtype]


def load_adapter(adapter_dir: str | Path, spec: ModelSpec, parallel: ParallelInfo, *,
                 name: str, version: int = 1, max_lora_rank: int,
                 dtype: torch.dtype | str | None = None, subfolder: str | None = None,
                 layers: Iterable[int | None] | None = None,
                 plans: PlanCache | None = None,
                 plan: AdapterPlan | None = None) -> LoadedAdapter:
    """Validate the adapter and read this rank's share of it (see module docstring).

    ``layers``: read only these decoder layers (``None`` in it: embed_tokens / lm_head), e.g.
    to stage an in-place update layer by layer; validation always covers the whole adapter.
    ``plans``: reuse the plan of an adapter with byte-identical config and header validated
    before (``plan_cache``; built for the same ``spec`` and ``max_lora_rank``). ``plan``: this
    file's plan, inspected by the caller a moment ago (nothing is re-validated).
    """
    stats = LoadStats()
    cast = _torch_dtype(dtype)
    load = _load_spec(spec, parallel)
    if plan is not None:
        stats.file_bytes = plan.table.nbytes
    elif plans is not None:
        plan = plans.inspect(adapter_dir, subfolder=subfolder or name, stats=stats)
    else:
        plan = inspect_adapter(adapter_dir, spec, max_lora_rank=max_lora_rank,
                               subfolder=subfolder or name, stats=stats)
    modules: dict[ModuleKey, LoRATensors] = {}
    with TensorReader(plan.table) as reader:
        t0, c0 = time.perf_counter(), stats.convert_ms
        wanted = None if layers is None else frozenset(layers)
        rank_reader = _RankReader(plan, load, reader, stats, cast, wanted)
        for target in plan.targets:
            modules.update(rank_reader.read(target))
        # Reading time is the wall time of the loop minus what ``convert`` accounted inside it.
        stats.read_ms += (time.perf_counter() - t0) * 1e3 - (stats.convert_ms - c0)
        stats.bytes_read, stats.tensors_read = reader.bytes_read, reader.tensors_read
    weights = AdapterWeights(name, version, plan.rank, modules)
    return LoadedAdapter(weights, plan, stats)


def load_adapter_weights(adapter_dir: str | Path, spec: ModelSpec, parallel: ParallelInfo, *,
                         name: str, version: int = 1, max_lora_rank: int,
                         dtype: torch.dtype | str | None = None) -> AdapterWeights:
    """This rank's canonical adapter tensors (the rank runtime's entry point)."""
    return load_adapter(adapter_dir, spec, parallel, name=name, version=version,
                        max_lora_rank=max_lora_rank, dtype=dtype).weights
