"""The EP/TP load spec: which part of *any* adapter one rank reads.

Built only from the model spec (expert count, layer kinds) and the rank's TP × EP coordinates
with the expert placement — never from the adapter's targets — so it exists unchanged for
adapters without expert targets, with only expert targets, and for 2D and fused-3D expert
formats. Slicing ranges come from ``model.sharding.lora_target_shard``, the same function the
LoRA layers size their buffers with, so a rank's adapter slices always line up with its shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lora_cluster.model.parallel import ParallelInfo, local_experts
from lora_cluster.model.sharding import TargetShard, holds_shared_expert, lora_target_shard
from lora_cluster.model.spec import MODEL_KINDS, SHARED_EXPERT_KINDS, ModelSpec


@dataclass(frozen=True, eq=False)
class LoadSpec:
    """One rank's share of every LoRA target kind of the model.

    local_experts: global expert ids this rank owns, in local order (E_local of them)
    local_of:      [E] local index of each global expert, -1 when another EP rank owns it
    shards:        kind → this rank's A-column / B-row ranges (per expert for expert kinds)
    """

    parallel: ParallelInfo
    num_experts: int
    local_experts: tuple[int, ...]
    local_of: np.ndarray
    shards: dict[str, TargetShard]
    holds_shared_expert: bool

    @property
    def num_local_experts(self) -> int:
        return len(self.local_experts)

    def holds(self, kind: str) -> bool:
        """Whether this rank holds any part of ``kind`` (shared experts live on EP rank 0)."""
        if kind in SHARED_EXPERT_KINDS:
            return self.holds_shared_expert and kind in self.shards
        return kind in self.shards

    def expert_runs(self) -> list[tuple[int, int]]:
        """The local experts as runs [start, stop) of consecutive global ids, in local order."""
        runs: list[tuple[int, int]] = []
        for e in self.local_experts:
            if runs and runs[-1][1] == e:
                runs[-1] = (runs[-1][0], e + 1)
            else:
                runs.append((e, e + 1))
        return runs


def _representative_layers(spec: ModelSpec) -> dict[str, int]:
    """kind → the first layer that has it (a kind's shape is the same on every such layer)."""
    first: dict[str, int] = {}
    for layer in range(spec.num_layers):
        for kind in spec.layer_target_shapes(layer):
            first.setdefault(kind, layer)
    return first


def build_load_spec(spec: ModelSpec, parallel: ParallelInfo) -> LoadSpec:
    """The load spec of rank ``parallel`` for model ``spec`` (raises ConfigError on bad layouts)."""
    experts = local_experts(spec.num_experts, parallel)
    local_of = np.full(spec.num_experts, -1, np.int64)
    local_of[list(experts)] = np.arange(len(experts))
    shards = {kind: lora_target_shard(spec, parallel, layer, kind)
              for kind, layer in _representative_layers(spec).items()}
    shards.update({kind: lora_target_shard(spec, parallel, None, kind) for kind in MODEL_KINDS})
    return LoadSpec(parallel, spec.num_experts, experts, local_of, shards,
                    holds_shared_expert(parallel))
