"""The load plan of one adapter: every served target kind with its tensors, rank and scaling.

Built from the config, the file's tensor table (header only) and the names verdict: A/B
factors paired per module template, shapes checked per (template, factor) against the model
from the set of distinct shapes in the header, ranks and scalings resolved from
``rank_pattern`` / ``alpha_pattern`` per template. Fused 3D expert wrappers are identified
by shape (A's in-dim H → gate_up, I → down) and split into the canonical expert kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from lora_cluster.adapters.config import AdapterConfig
from lora_cluster.adapters.header import TensorTable
from lora_cluster.adapters.names import fill_template
from lora_cluster.adapters.patterns import PatternTable
from lora_cluster.adapters.targets import FUSED
from lora_cluster.adapters.validation import NameVerdict
from lora_cluster.errors import (
    AdapterFormatError,
    AdapterRankError,
    AdapterShapeError,
    UnsupportedAdapterError,
)
from lora_cluster.model.spec import ModelSpec

Shape = tuple[int, ...]


@dataclass(frozen=True)
class RankScale:
    """Rank and scaling of a target's modules: one pair, or one per module index tuple."""

    rank: int  # the largest when ``per_index`` is set
    scaling: float
    per_index: Mapping[tuple[int, ...], tuple[int, float]] | None = None

    def at(self, index: tuple[int, ...]) -> tuple[int, float]:
        if self.per_index is None:
            return self.rank, self.scaling
        return self.per_index[index]


@dataclass(frozen=True)
class TargetPlan:
    """One canonical target kind: which templates hold its factors, on which layers.

    layout: "linear" (a [R, in], b [out, R] per layer), "embedding" (a [R, V], b [H, R]),
    "experts_2d" (one linear pair per expert), "experts_3d" (PEFT's fused wrapper:
    A [E·R, in] expert-major, B [out', E·R] rank-major; this kind is rows ``b_rows`` of B).
    """

    kind: str
    layout: str
    a_group: int
    b_group: int
    layers: tuple[int, ...]
    ranks: RankScale
    module: str  # PEFT module-key template (what rank/alpha patterns match)
    b_rows: tuple[int, int] | None = None


@dataclass(frozen=True, eq=False)
class AdapterPlan:
    """Everything needed to read any rank's share of the adapter, and its summary."""

    config: AdapterConfig
    table: TensorTable
    verdict: NameVerdict
    targets: tuple[TargetPlan, ...]
    rank: int
    warning: str | None

    def kinds(self) -> tuple[str, ...]:
        return tuple(sorted({t.kind for t in self.targets}))

    def modules(self) -> tuple[str, ...]:
        """Distinct PEFT module templates the adapter targets (``*`` for indices)."""
        return tuple(sorted({t.module for t in self.targets}))


def _shape_sets(table: TensorTable, verdict: NameVerdict, groups: list[int]) -> dict[int, set[Shape]]:
    """Distinct shapes per template, from the header's shape arrays: one vectorized
    all-equal test per template; only templates with several shapes are enumerated."""
    out: dict[int, set[Shape]] = {}
    for g in groups:
        pos = verdict.groups.positions(g)
        dims, ndim = table.dims[pos], table.ndim[pos]
        if bool((dims == dims[0]).all()) and bool((ndim == ndim[0]).all()):
            out[g] = {table.shape_of(int(pos[0]))}
        else:
            out[g] = {table.shape_of(i) for i in pos.tolist()}
    return out


class _Planner:
    def __init__(self, config: AdapterConfig, table: TensorTable, verdict: NameVerdict,
                 spec: ModelSpec, max_lora_rank: int) -> None:
        self.config, self.table, self.verdict, self.spec = config, table, verdict, spec
        self.max_rank = max_lora_rank
        self.where = str(Path(config.path).parent)
        self.ranks = PatternTable(config.rank_pattern, config.r, field="rank_pattern",
                                  path=config.path)
        self.alphas = PatternTable(config.alpha_pattern, config.lora_alpha, field="alpha_pattern",
                                   path=config.path)

    # ---- pairing ------------------------------------------------------------------
    def pairs(self) -> dict[str, tuple[int, int]]:
        found: dict[str, dict[str, int]] = {}
        for g in self.verdict.target_groups():
            info = self.verdict.infos[g]
            found.setdefault(info.module, {})[info.factor] = g
        out = {}
        for module, fac in found.items():
            if set(fac) != {"A", "B"}:
                have = next(iter(fac))
                missing = "B" if have == "A" else "A"
                raise AdapterFormatError(
                    f"{self.table.path}: {module} has lora_{have} but no lora_{missing} "
                    f"(e.g. {self.verdict.example(fac[have])})", file=self.table.path, key=module)
            a, b = fac["A"], fac["B"]
            unpaired = self._unpaired(a, b)
            if unpaired is not None:
                name, lacks = unpaired
                raise AdapterFormatError(
                    f"{self.table.path}: {name} has no matching lora_{lacks} (lora_A and lora_B "
                    f"of {module} must exist for the same layers/experts)",
                    file=self.table.path, key=name)
            out[module] = (a, b)
        return out

    def _unpaired(self, a: int, b: int) -> tuple[str, str] | None:
        """(a tensor of A or B whose module lacks the other factor, that factor), or None.

        Index tuples are compared as sorted int64 codes (numpy), not as Python sets."""
        groups = self.verdict.groups
        k = groups.templates[a].count("*")
        rows = {g: groups.indices[groups.positions(g)][:, :k] for g in (a, b)}
        base = int(max(int(r.max(initial=0)) for r in rows.values())) + 1
        weights = base ** np.arange(k, dtype=np.int64)
        codes = {g: np.sort(r @ weights) for g, r in rows.items()}
        if np.array_equal(codes[a], codes[b]):
            return None
        g, other = (a, b) if np.setdiff1d(codes[a], codes[b]).size else (b, a)
        code = int(np.setdiff1d(codes[g], codes[other])[0])
        values = [(code // base**j) % base for j in range(k)]
        return fill_template(groups.templates[g], values), "B" if g == a else "A"

    # ---- ranks ----------------------------------------------------------------------
    def rank_scale(self, module: str, a_group: int) -> RankScale:
        def keys() -> list[str]:
            idx = self.verdict.groups.indices[self.verdict.groups.positions(a_group)]
            k = module.count("*")
            return [fill_template(module, row[:k]) for row in idx.tolist()]

        r = self.ranks.for_template(module, keys)
        alpha = self.alphas.for_template(module, keys)
        if not isinstance(r, list) and not isinstance(alpha, list):
            return RankScale(int(r), self.config.scaling(int(r), float(alpha)))
        # Index-dependent patterns (the rare path): one (rank, scaling) per module.
        idx = self.verdict.groups.indices[self.verdict.groups.positions(a_group)]
        k = module.count("*")
        rs = r if isinstance(r, list) else [r] * len(idx)
        alphas = alpha if isinstance(alpha, list) else [alpha] * len(idx)
        per = {tuple(row[:k]): (int(ri), self.config.scaling(int(ri), float(ai)))
               for row, ri, ai in zip(idx.tolist(), rs, alphas)}
        top = max(per.values())
        return RankScale(top[0], top[1], per)

    def check_rank(self, module: str, ranks: RankScale, example: str) -> None:
        if ranks.rank > self.max_rank:
            raise AdapterRankError(
                f"{self.where}: rank {ranks.rank} of {module} (e.g. {example}) exceeds "
                f"max_lora_rank={self.max_rank}", file=self.config.path, module=module,
                rank=ranks.rank, max_lora_rank=self.max_rank)

    # ---- shapes ---------------------------------------------------------------------
    def check_shapes(self, g: int, got: set[Shape], want: Callable[[int], Shape],
                     ranks: RankScale, what: str) -> None:
        """All tensors of template ``g`` have ``want(rank)`` (per module when ranks vary)."""
        if ranks.per_index is None:
            expected = want(ranks.rank)
            if got != {expected}:
                self._raise_first_mismatch(g, expected, what)
            return
        idx = self.verdict.groups.indices
        k = self.verdict.groups.templates[g].count("*")
        for pos in self.verdict.groups.positions(g).tolist():
            expected = want(ranks.at(tuple(idx[pos][:k].tolist()))[0])
            if self.table.shape_of(pos) != expected:
                self._raise_shape(pos, expected, what)

    def _raise_first_mismatch(self, g: int, expected: Shape, what: str) -> NoReturn:
        for pos in self.verdict.groups.positions(g).tolist():
            if self.table.shape_of(pos) != expected:
                self._raise_shape(pos, expected, what)
        raise AssertionError(f"template {g}: a shape mismatch was found but not located")

    def _raise_shape(self, pos: int, expected: Shape, what: str) -> NoReturn:
        name = self.table.names[pos]
        raise AdapterShapeError(
            f"{self.table.path}: tensor {name!r} has shape {list(self.table.shapes[pos])}; "
            f"{what} needs {list(expected)}", file=self.table.path, key=name,
            expected=list(expected), got=list(self.table.shapes[pos]))


def _a_shape(experts: int, in_f: int) -> Callable[[int], Shape]:
    """lora_A's shape for rank r: [r, in], or [E·r, in] for a fused expert wrapper."""
    return lambda r: (experts * r, in_f)


def _b_shape(experts: int, out_f: int) -> Callable[[int], Shape]:
    """lora_B's shape for rank r: [out, r], or [out, E·r] for a fused expert wrapper."""
    return lambda r: (out_f, experts * r)


def _linear_shapes(spec: ModelSpec, kind: str, layer: int | None) -> tuple[int, int]:
    if layer is None:
        return spec.model_target_shapes()[kind]
    return spec.layer_target_shapes(layer)[kind]


def plan_adapter(config: AdapterConfig, table: TensorTable, verdict: NameVerdict,
                 spec: ModelSpec, *, max_lora_rank: int) -> AdapterPlan:
    """Pair, shape-check and rank every target template; raise a typed error on any fault."""
    p = _Planner(config, table, verdict, spec, max_lora_rank)
    pairs = p.pairs()
    groups = [g for ab in pairs.values() for g in ab]
    shapes = _shape_sets(table, verdict, [*groups, *verdict.embedding_copies])
    _check_embedding_copies(p, shapes)
    targets: list[TargetPlan] = []
    for module, (a, b) in pairs.items():
        info = verdict.infos[a]
        layers = tuple(int(v) for v in verdict.layers.values(a))
        if info.kind == FUSED:
            targets.extend(_fused_targets(p, module, a, b, layers, shapes))
            continue
        ranks = p.rank_scale(module, a)
        p.check_rank(module, ranks, verdict.example(a))
        in_f, out_f = _linear_shapes(spec, info.kind, layers[0] if layers else None)
        what = f"the model's {info.kind}"
        p.check_shapes(a, shapes[a], _a_shape(1, in_f), ranks, f"{what} lora_A")
        p.check_shapes(b, shapes[b], _b_shape(1, out_f), ranks, f"{what} lora_B")
        layout = ("embedding" if info.kind == "embed_tokens" else
                  "experts_2d" if info.indexed_by_expert else "linear")
        targets.append(TargetPlan(info.kind, layout, a, b, layers, ranks, module))
    _refuse_duplicates(table.path, targets)
    rank = max((t.ranks.rank for t in targets), default=0)
    return AdapterPlan(config, table, verdict, tuple(targets), rank, verdict.warning)


def _fused_targets(p: _Planner, module: str, a: int, b: int, layers: tuple[int, ...],
                   shapes: dict[int, set[Shape]]) -> list[TargetPlan]:
    spec, e = p.spec, p.spec.num_experts
    h, i = spec.hidden_size, spec.moe_intermediate_size
    parts: tuple[tuple[str, tuple[int, int] | None], ...]
    a_in = {s[-1] for s in shapes[a]}
    b_out = {s[0] for s in shapes[b]}
    if a_in == {h} and b_out == {2 * i}:
        which, parts = "gate_up_proj", (("experts.gate_proj", (0, i)), ("experts.up_proj", (i, 2 * i)))
    elif a_in == {i} and b_out == {h}:
        which, parts = "down_proj", (("experts.down_proj", None),)
    else:
        pos = p.verdict.groups.first_position(a)
        p._raise_shape(pos, (e * p.config.r, h), f"a fused expert wrapper (gate_up_proj: A "
                       f"[E·R, {h}] with B [{2 * i}, E·R]; down_proj: A [E·R, {i}] with B [{h}, E·R])")
    key = module.replace(".base_layer", "").replace("block_sparse_moe", "mlp") + "." + which
    ranks = p.rank_scale(key, a)
    p.check_rank(key, ranks, p.verdict.example(a))
    in_f, out_f = (h, 2 * i) if which == "gate_up_proj" else (i, h)
    what = f"the model's fused experts.{which} (E={e})"
    p.check_shapes(a, shapes[a], _a_shape(e, in_f), ranks, f"{what} lora_A")
    p.check_shapes(b, shapes[b], _b_shape(e, out_f), ranks, f"{what} lora_B")
    return [TargetPlan(kind, "experts_3d", a, b, layers, ranks, key, rows) for kind, rows in parts]


def _check_embedding_copies(p: _Planner, shapes: dict[int, set[Shape]]) -> None:
    """PEFT's saved base embed/lm_head weights are skipped — unless the vocabulary was resized
    for training, which the served base model cannot follow."""
    base = (p.spec.vocab_size, p.spec.hidden_size)
    for g in p.verdict.embedding_copies:
        if shapes[g] != {base}:
            raise UnsupportedAdapterError(
                f"{p.where}: {p.verdict.infos[g].module} was saved with shape "
                f"{sorted(shapes[g])[0]}, the base model's is {base}: the adapter was trained "
                "with a resized vocabulary, which is not supported",
                file=p.table.path, key=p.verdict.example(g))


def _refuse_duplicates(path: str, targets: list[TargetPlan]) -> None:
    seen: dict[tuple[int | None, str], str] = {}
    for t in targets:
        for layer in t.layers or (None,):
            other = seen.setdefault((layer, t.kind), t.module)
            if other != t.module:
                raise AdapterFormatError(
                    f"{path}: {t.kind} of layer {layer} is given twice ({other} and {t.module}, "
                    "e.g. both per-expert and fused expert tensors)", file=path, key=t.kind)
