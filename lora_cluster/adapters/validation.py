"""Names → verdict: is every tensor of an adapter a LoRA factor of a module this model serves?

Set-based over module *templates* (``names.scan_names``): classification runs once per
template, layer indices are checked with one ``bincount`` over all names and expert indices
with one ``max``, and the one summary warning (ignored modules: counts per kind, at most
three examples) is built from templates — nothing loops over modules in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lora_cluster.adapters.names import NameGroups, fill_template, scan_names
from lora_cluster.adapters.targets import FUSED, TemplateInfo, classify_template
from lora_cluster.errors import UnsupportedAdapterError
from lora_cluster.model.spec import ModelSpec

MAX_EXAMPLES = 3
_DENSE_KINDS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class IndexTable:
    """Per template, how many names carry each value of one index axis ([G, n_values])."""

    counts: np.ndarray

    def values(self, group: int) -> np.ndarray:
        return np.flatnonzero(self.counts[group])


@dataclass(frozen=True, eq=False)
class NameVerdict:
    """The accepted adapter names, grouped: which templates are targets, what is ignored."""

    groups: NameGroups
    infos: tuple[TemplateInfo, ...]
    layers: IndexTable          # axis 0 of layer-indexed templates
    ignored: dict[str, int]     # module template → tensor count (not run by the text model)
    embedding_copies: tuple[int, ...]  # templates of PEFT's saved base embed/lm_head weights
    warning: str | None         # the one summary of ignored modules (None: nothing ignored)

    def target_groups(self) -> list[int]:
        return [g for g, info in enumerate(self.infos) if info.status == "target"]

    def example(self, group: int, index_row: np.ndarray | None = None) -> str:
        """A concrete tensor name of ``group`` (its first name, or the given index values)."""
        return _example(self.groups, group, index_row)


def _index_table(groups: NameGroups, axis: int, num_groups: int) -> IndexTable:
    if groups.indices.shape[1] <= axis or not len(groups):
        return IndexTable(np.zeros((num_groups, 0), np.int64))
    col = groups.indices[:, axis]
    width = int(col.max()) + 2  # value -1 (no such index) lands in column 0
    flat = np.bincount(groups.group_of * np.int32(width) + (col + np.int32(1)),
                       minlength=num_groups * width)
    return IndexTable(flat.reshape(num_groups, width)[:, 1:])


def _example(groups: NameGroups, group: int, index_row: np.ndarray | None = None) -> str:
    """A concrete tensor name of ``group`` (its first name, or the given index values)."""
    template = groups.templates[group]
    if index_row is None:
        index_row = groups.indices[groups.first_position(group)]
    return fill_template(template, [int(v) for v in index_row[: template.count("*")]])


def _examples(groups: NameGroups, items: Sequence[int]) -> str:
    return ", ".join(_example(groups, g) for g in list(items)[:MAX_EXAMPLES])


def _refuse_unsupported(where: str, groups: NameGroups, infos: Sequence[TemplateInfo],
                        counts: np.ndarray) -> None:
    bad = [g for g, info in enumerate(infos) if info.status == "unsupported"]
    if not bad:
        return
    by_reason: dict[str, list[int]] = {}
    for g in bad:
        by_reason.setdefault(infos[g].reason, []).append(g)
    parts = [f"{reason}: {int(sum(counts[g] for g in gs))} tensors, e.g. {_examples(groups, gs)}"
             for reason, gs in by_reason.items()]
    raise UnsupportedAdapterError(f"{where}: unsupported tensors — " + "; ".join(parts),
                                  file=where, examples=_examples(groups, bad))


def _check_ranges(where: str, spec: ModelSpec, verdict: NameVerdict) -> None:
    """Layer / expert indices exist, and each kind sits on layers that have that module."""
    sparse = np.array([spec.is_sparse(i) for i in range(spec.num_layers)], bool)
    for g in verdict.target_groups():
        info = verdict.infos[g]
        if info.kind in ("embed_tokens", "lm_head"):
            continue
        layers = verdict.layers.values(g)
        if layers.size and layers[-1] >= spec.num_layers:
            raise UnsupportedAdapterError(
                f"{where}: {info.module} for layer {int(layers[-1])}, but the model has "
                f"{spec.num_layers} layers (e.g. {verdict.example(g, _row(verdict, g, 0, layers[-1]))})",
                file=where, module=info.module)
        wants_sparse = info.kind.startswith(("experts.", "shared_expert.")) or info.kind == FUSED
        if wants_sparse and not spec.is_moe:
            raise UnsupportedAdapterError(
                f"{where}: {info.module} targets MoE experts, but the model is dense "
                f"(e.g. {verdict.example(g)})", file=where, module=info.module)
        if info.kind.startswith("shared_expert.") and not spec.shared_expert_intermediate_size:
            raise UnsupportedAdapterError(
                f"{where}: {info.module} targets a shared expert, which this {spec.family} model "
                f"does not have (e.g. {verdict.example(g)})", file=where, module=info.module)
        wants_dense = info.kind in _DENSE_KINDS
        if not (wants_sparse or wants_dense) or not layers.size:
            continue
        wrong = layers[sparse[layers] != wants_sparse]
        if wrong.size:
            has = "an MoE block" if sparse[wrong[0]] else "a dense MLP"
            raise UnsupportedAdapterError(
                f"{where}: {info.module} on layer {int(wrong[0])}, which has {has} "
                f"(e.g. {verdict.example(g, _row(verdict, g, 0, wrong[0]))})",
                file=where, module=info.module)
    _check_experts(where, spec, verdict)


def _check_experts(where: str, spec: ModelSpec, verdict: NameVerdict) -> None:
    """Expert indices (axis 1, used only by per-expert templates) stay below num_experts."""
    idx = verdict.groups.indices
    if idx.shape[1] < 2 or int(idx[:, 1].max()) < spec.num_experts:
        return  # one max over all names settles the common case
    for g in verdict.target_groups():
        info = verdict.infos[g]
        if not info.indexed_by_expert:
            continue
        rows = idx[verdict.groups.positions(g)]
        bad = rows[rows[:, 1] >= spec.num_experts]
        if bad.size:
            raise UnsupportedAdapterError(
                f"{where}: {info.module} for expert {int(bad[0, 1])}, but the model has "
                f"{spec.num_experts} experts (e.g. {verdict.example(g, bad[0])})",
                file=where, module=info.module)


def _row(verdict: NameVerdict, group: int, axis: int, value: int) -> np.ndarray:
    """Index values of the first name of ``group`` whose ``axis`` index is ``value``."""
    idx = verdict.groups.indices
    hit = np.flatnonzero((verdict.groups.group_of == group) & (idx[:, axis] == value))
    return idx[int(hit[0])]


def _warning(where: str, groups: NameGroups, infos: Sequence[TemplateInfo],
             counts: np.ndarray) -> tuple[dict[str, int], str | None]:
    """Ignored tensors per module template, and the one warning that summarizes them."""
    ignored_groups = [g for g, info in enumerate(infos) if info.status == "ignored"]
    ignored: dict[str, int] = {}
    for g in ignored_groups:
        ignored[infos[g].module] = ignored.get(infos[g].module, 0) + int(counts[g])
    if not ignored:
        return ignored, None
    kinds = ", ".join(f"{module} ({n})" for module, n in ignored.items())
    return ignored, (f"{where}: ignoring {sum(ignored.values())} tensors of modules the served "
                     f"text model does not run — {kinds}; e.g. {_examples(groups, ignored_groups)}")


def check_names(names: list[str], spec: ModelSpec, *, where: str = "adapter") -> NameVerdict:
    """Group the names, refuse anything unsupported, and build the one summary warning.

    PEFT's saved copies of the base embed_tokens/lm_head weights (``save_embedding_layers``)
    are neither targets nor ignored modules: the plan checks their shape and skips them.
    """
    groups = scan_names(names)
    infos = tuple(map(classify_template, groups.templates))
    counts = groups.counts()
    _refuse_unsupported(where, groups, infos, counts)
    ignored, warning = _warning(where, groups, infos, counts)
    copies = tuple(g for g, info in enumerate(infos) if info.status == "embedding_copy")
    g = len(groups.templates)
    verdict = NameVerdict(groups, infos, _index_table(groups, 0, g), ignored, copies, warning)
    _check_ranges(where, spec, verdict)
    return verdict
