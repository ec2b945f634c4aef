"""Grouped-query self-attention of one decoder layer, TP-sharded by heads, over the KV cache.

q/k/v are one column-parallel linear (3 slices of unequal width under GQA); Qwen3's per-head
q/k RMSNorm runs before RoPE; o_proj is row-parallel (all_reduce_tp).
Shape legend: T rows, H hidden, h local query heads, g local KV heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_cluster.model.checkpoint import CheckpointReader
from lora_cluster.model.kv_cache import KVCache
from lora_cluster.model.layers.linear import ColumnParallelLinear, RowParallelLinear
from lora_cluster.model.layers.lora_buffers import LoRACapacity
from lora_cluster.model.layers.norm import RMSNorm
from lora_cluster.model.paged_attention import paged_attention
from lora_cluster.model.parallel import Comm, ParallelInfo
from lora_cluster.model.rope import apply_rotary
from lora_cluster.model.sharding import attention_shard
from lora_cluster.model.spec import ModelSpec
from lora_cluster.model.step_context import StepContext


class Attention(nn.Module):
    """x [T, H] → [T, H]; writes this step's K/V into the cache, then attends."""

    def __init__(self, spec: ModelSpec, parallel: ParallelInfo, index: int, *, comm: Comm,
                 cap: LoRACapacity | None, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shard = attention_shard(spec, parallel)
        d, hidden = spec.head_dim, spec.hidden_size
        self.index = index
        self.head_dim = d
        self.num_heads, self.num_kv_heads = shard.num_q_heads, shard.num_kv_heads
        self.scale = d ** -0.5
        self.window = spec.sliding_window
        q_rows = (shard.q_heads[0] * d, shard.q_heads[1] * d)
        kv_rows = (shard.kv_heads[0] * d, shard.kv_heads[1] * d)
        self.qkv = ColumnParallelLinear(
            hidden, (spec.q_size, spec.kv_size, spec.kv_size), (q_rows, kv_rows, kv_rows),
            bias=spec.qkv_bias, cap=cap, dtype=dtype, device=device)
        self.o_proj = RowParallelLinear(
            spec.q_size, q_rows, hidden, bias=spec.o_bias, comm=comm, tp_rank=parallel.tp_rank,
            cap=cap, dtype=dtype, device=device)
        self.q_norm = RMSNorm(d, spec.rms_norm_eps, dtype, device) if spec.qk_norm else None
        self.k_norm = RMSNorm(d, spec.rms_norm_eps, dtype, device) if spec.qk_norm else None

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        """Read ``{prefix}.{q,k,v,o}_proj`` (and q/k norms) slices of this rank."""
        self.qkv.load(reader, [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"])
        self.o_proj.load(reader, f"{prefix}.o_proj")
        if self.q_norm is not None and self.k_norm is not None:
            self.q_norm.load(reader, f"{prefix}.q_norm.weight")
            self.k_norm.load(reader, f"{prefix}.k_norm.weight")

    def forward(self, x: torch.Tensor, ctx: StepContext, kv_cache: KVCache) -> torch.Tensor:
        rows = x.shape[0]
        q_w, kv_w = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x, ctx.meta("attn.qkv")).split((q_w, kv_w, kv_w), dim=-1)
        q = q.reshape(rows, self.num_heads, self.head_dim)
        k = k.reshape(rows, self.num_kv_heads, self.head_dim)
        v = v.reshape(rows, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        kv_cache.write(self.index, k, v, ctx.batch.kv_slot_mapping)
        k_cache, v_cache = kv_cache.layer(self.index)
        out = paged_attention(q, k_cache, v_cache, ctx.batch, ctx.attention, self.scale,
                              self.window)
        return self.o_proj(out.reshape(rows, q_w), ctx.meta("attn.o"))
