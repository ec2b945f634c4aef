"""The table of a rank's LoRA targets, built once from its layers, and the groups it has.

Expected local shapes come from ``sharding.lora_target_shard`` — the same function the adapter
loader slices with — and each target's writer points at the buffer slice inside its layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lora_cluster.model.layers.lora_buffers import EmbeddingLoRA, ExpertLoRA, LinearLoRA
from lora_cluster.model.lora_slots import (
    LoRASlotTable,
    LoRATarget,
    ModuleKey,
    Views,
    Writer,
    embedding_target,
    expert_target,
    linear_target,
)
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.sharding import holds_shared_expert, lora_target_shard
from lora_cluster.model.spec import SHARED_EXPERT_KINDS, ModelSpec

if TYPE_CHECKING:
    from lora_cluster.model.decoder import DecoderModel


def lora_groups(spec: ModelSpec, parallel: ParallelInfo) -> tuple[str, ...]:
    """LoRA index groups this rank's model has (only those get per-step metadata)."""
    sparse = [spec.is_sparse(i) for i in range(spec.num_layers)]
    groups = ["attn.qkv", "attn.o"]
    if not all(sparse):
        groups += ["mlp.gate_up", "mlp.down"]
    if any(sparse):
        groups.append("experts")
        if spec.shared_expert_intermediate_size and holds_shared_expert(parallel):
            groups += ["shared.gate_up", "shared.down"]
    return (*groups, "embed", "lm_head")


def _slice_writer(lora: LinearLoRA | None, index: int) -> tuple[Writer, Views]:
    assert lora is not None

    def write(slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        lora.write(slot, index, a, b, scaling)

    def views(slot: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        return lora.views(slot, index, r)
    return write, views


def _part_writer(lora: ExpertLoRA | None, part: str) -> tuple[Writer, Views]:
    assert lora is not None

    def write(slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        lora.write(slot, part, a, b, scaling)

    def views(slot: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        return lora.views(slot, part, r)
    return write, views


def _linears(spec: ModelSpec, info: ParallelInfo, layer: int,
             items: list[tuple[str, LinearLoRA | None, int]]) -> dict[ModuleKey, LoRATarget]:
    out: dict[ModuleKey, LoRATarget] = {}
    for kind, lora, index in items:
        shard = lora_target_shard(spec, info, layer, kind)
        out[(layer, kind)] = linear_target(kind, shard.in_local, shard.out_local,
                                           *_slice_writer(lora, index))
    return out


def build_slot_table(model: DecoderModel) -> LoRASlotTable:
    """Every LoRA target of ``model`` keyed (layer, kind), with shapes and writers."""
    spec, info = model.spec, model.parallel
    targets: dict[ModuleKey, LoRATarget] = {}
    for layer in model.decoder_layers():
        i, attn = layer.index, layer.self_attn
        qkv = attn.qkv.lora
        targets.update(_linears(spec, info, i, [
            ("q_proj", qkv, 0), ("k_proj", qkv, 1), ("v_proj", qkv, 2),
            ("o_proj", attn.o_proj.lora, 0)]))
        if layer.mlp is not None:
            mlp = layer.mlp
            targets.update(_linears(spec, info, i, [
                ("gate_proj", mlp.gate_up.lora, 0), ("up_proj", mlp.gate_up.lora, 1),
                ("down_proj", mlp.down.lora, 0)]))
        if layer.moe is not None:
            moe = layer.moe
            for part in ("gate_proj", "up_proj", "down_proj"):
                kind = f"experts.{part}"
                shard = lora_target_shard(spec, info, i, kind)
                targets[(i, kind)] = expert_target(kind, len(moe.experts), shard.in_local,
                                                   shard.out_local, *_part_writer(moe.lora, part))
            if moe.shared is not None:
                sh = moe.shared
                targets.update(_linears(spec, info, i, [
                    ("shared_expert.gate_proj", sh.gate_up.lora, 0),
                    ("shared_expert.up_proj", sh.gate_up.lora, 1),
                    ("shared_expert.down_proj", sh.down.lora, 0)]))
    embed = lora_target_shard(spec, info, None, "embed_tokens")
    emb_lora = model.embed_tokens.lora
    assert emb_lora is not None
    targets[(None, "embed_tokens")] = embedding_target(embed.in_local, embed.out_local,
                                                       emb_lora.write, emb_lora.views)
    lm = lora_target_shard(spec, info, None, "lm_head")
    targets[(None, "lm_head")] = linear_target("lm_head", lm.in_local, lm.out_local,
                                               *_slice_writer(model.lm_head.lora, 0))
    skipped = frozenset(SHARED_EXPERT_KINDS) if (
        spec.shared_expert_intermediate_size and not holds_shared_expert(info)) else frozenset()
    clearers = [m.clear for m in model.modules()
                if isinstance(m, LinearLoRA | EmbeddingLoRA | ExpertLoRA)]
    return LoRASlotTable(targets, skipped, clearers, model.max_lora_rank)
