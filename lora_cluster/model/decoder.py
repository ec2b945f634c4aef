"""The decoder of one rank: embeddings, layers, final norm, lm_head, and its LoRA slots.

Shape legend: T rows (new tokens), N logit rows, H hidden, V vocab, S slots, G LoRA groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lora_cluster.errors import ConfigError
from lora_cluster.model.batch import ForwardBatch
from lora_cluster.model.checkpoint import CheckpointReader
from lora_cluster.model.kv_cache import KVCache
from lora_cluster.model.layers.attention import Attention
from lora_cluster.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from lora_cluster.model.layers.lora_buffers import LoRACapacity
from lora_cluster.model.layers.mlp import DenseMLP
from lora_cluster.model.layers.moe import SparseMoE
from lora_cluster.model.layers.norm import RMSNorm
from lora_cluster.model.lora_slots import LoRASlotTable, SlotWeights
from lora_cluster.model.lora_targets import build_slot_table, lora_groups
from lora_cluster.model.parallel import Comm, LocalComm, ParallelInfo
from lora_cluster.model.rope import RotaryEmbedding
from lora_cluster.model.sharding import vocab_shard
from lora_cluster.model.spec import ModelSpec
from lora_cluster.model.step_context import (
    GROUP_INDEX,
    LORA_GROUPS,
    StepContext,
    build_step_context,
)


class DecoderLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then + mlp(norm(h)) (dense MLP or sparse MoE)."""

    def __init__(self, spec: ModelSpec, parallel: ParallelInfo, index: int, *, comm: Comm,
                 cap: LoRACapacity | None, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h, eps = spec.hidden_size, spec.rms_norm_eps
        self.index = index
        self.input_layernorm = RMSNorm(h, eps, dtype, device)
        self.self_attn = Attention(spec, parallel, index, comm=comm, cap=cap, dtype=dtype,
                                   device=device)
        self.post_attention_layernorm = RMSNorm(h, eps, dtype, device)
        self.moe: SparseMoE | None = None
        self.mlp: DenseMLP | None = None
        if spec.is_sparse(index):
            self.moe = SparseMoE(spec, parallel, comm=comm, cap=cap, dtype=dtype, device=device)
        else:
            self.mlp = DenseMLP(h, spec.intermediate_size, parallel, comm=comm,
                                bias=spec.mlp_bias, groups=("mlp.gate_up", "mlp.down"),
                                what="intermediate_size", cap=cap, dtype=dtype, device=device)

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.input_layernorm.load(reader, f"{prefix}.input_layernorm.weight")
        self.post_attention_layernorm.load(reader, f"{prefix}.post_attention_layernorm.weight")
        self.self_attn.load(reader, f"{prefix}.self_attn")
        if self.moe is not None:
            self.moe.load(reader, prefix)
        elif self.mlp is not None:
            self.mlp.load(reader, f"{prefix}.mlp")

    def forward(self, h: torch.Tensor, ctx: StepContext, kv_cache: KVCache) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), ctx, kv_cache)
        x = self.post_attention_layernorm(h)
        if self.moe is not None:
            return h + self.moe(x, ctx)
        assert self.mlp is not None
        return h + self.mlp(x, ctx)


@dataclass(frozen=True)
class LoadReport:
    """What loading materialized on this rank."""

    model_dir: str
    bytes_read: int
    tensors_read: int
    seconds: float


class DecoderModel(nn.Module):
    """One rank's shard of a decoder LLM with ``max_loras`` LoRA slots of rank ≤ ``max_lora_rank``.

    ``forward(batch, kv_cache)`` returns float32 logits [N, V] (full vocab on every rank) for
    ``batch.logits_rows``. ``max_loras=0`` builds a model without LoRA buffers.
    """

    slot_groups: torch.Tensor | None

    def __init__(self, spec: ModelSpec, *, parallel: ParallelInfo | None = None,
                 comm: Comm | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", max_loras: int = 0,
                 max_lora_rank: int = 0) -> None:
        super().__init__()
        if max_loras < 0 or (max_loras > 0 and max_lora_rank < 1):
            raise ConfigError(f"max_loras={max_loras}, max_lora_rank={max_lora_rank}: LoRA slots "
                              "need max_loras >= 0 and max_lora_rank >= 1", field="max_lora_rank")
        self.spec = spec
        self.parallel = parallel or ParallelInfo()
        self.comm: Comm = comm or LocalComm()
        self.dtype, self.device = dtype, torch.device(device)
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        cap = LoRACapacity(max_loras, max_lora_rank) if max_loras else None
        comm_, dev = self.comm, self.device
        vocab = vocab_shard(spec, self.parallel)
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, vocab,
                                                   comm=comm_, cap=cap, dtype=dtype, device=dev)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, self.parallel, i, comm=comm_, cap=cap, dtype=dtype, device=dev)
            for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, dev)
        self.lm_head = ParallelLMHead(
            spec.vocab_size, spec.hidden_size, vocab, comm=comm_, cap=cap, dtype=dtype,
            device=dev, tied=self.embed_tokens if spec.tie_word_embeddings else None)
        self.rotary = RotaryEmbedding(spec.rope, spec.head_dim, self.device)
        self.lora_groups: tuple[str, ...] = lora_groups(spec, self.parallel) if cap else ()
        self.register_buffer("slot_groups", torch.zeros(
            len(LORA_GROUPS), max_loras, dtype=torch.bool, device=self.device) if cap else None)
        self.slot_table: LoRASlotTable | None = build_slot_table(self) if cap else None
        self._slot_contents: list[tuple[str, int] | None] = [None] * max_loras
        self.load_report: LoadReport | None = None

    def decoder_layers(self) -> list[DecoderLayer]:
        """The layers, typed (``nn.ModuleList`` iterates as plain modules)."""
        return [layer for layer in self.layers if isinstance(layer, DecoderLayer)]

    # -- weights ---------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, reader: CheckpointReader) -> None:
        """Read this rank's slices of every base weight (HF names) through ``reader``."""
        self.embed_tokens.load(reader, "model.embed_tokens.weight")
        for layer in self.decoder_layers():
            layer.load(reader, f"model.layers.{layer.index}")
        self.norm.load(reader, "model.norm.weight")
        self.lm_head.load(reader, "lm_head.weight")

    # -- LoRA slots -------------------------------------------------------------------------
    def _check_slot(self, slot: int) -> LoRASlotTable:
        if self.slot_table is None:
            raise ConfigError("this model was built without LoRA slots (max_loras=0)",
                              field="max_loras")
        if not 0 <= slot < self.max_loras:
            raise ConfigError(f"slot {slot} is out of range [0, {self.max_loras})", field="slot")
        return self.slot_table

    @torch.no_grad()
    def set_lora_slot(self, slot: int, weights: SlotWeights) -> None:
        """Write an adapter (this rank's slices) into ``slot``; a bad adapter leaves it intact.

        Raises AdapterShapeError / AdapterRankError / UnsupportedAdapterError naming the
        (layer, kind) at fault before anything is written.
        """
        table = self._check_slot(slot)
        groups = table.write(slot, weights)
        mask = torch.tensor([g in groups for g in LORA_GROUPS], dtype=torch.bool)
        assert self.slot_groups is not None
        self.slot_groups[:, slot].copy_(mask, non_blocking=True)  # no host sync on a side stream
        self._slot_contents[slot] = (weights.name, int(getattr(weights, "version", 0)))

    @torch.no_grad()
    def clear_lora_slot(self, slot: int) -> None:
        """Zero ``slot`` everywhere; rows mapped to it then get no delta."""
        self._check_slot(slot).clear(slot)
        assert self.slot_groups is not None
        self.slot_groups[:, slot] = False
        self._slot_contents[slot] = None

    def slot_contents(self) -> list[tuple[str, int] | None]:
        """(adapter name, version) held by each slot, None for empty ones."""
        return list(self._slot_contents)

    def slot_has_group(self, slot: int, group: str) -> bool:
        """Whether ``slot``'s adapter has LoRA in ``group`` (host read; for tests and stats)."""
        return bool(self.slot_groups is not None and self.slot_groups[GROUP_INDEX[group], slot])

    # -- forward ----------------------------------------------------------------------------
    def make_kv_cache(self, *, num_blocks: int, block_size: int) -> KVCache:
        """A KV cache shaped for this rank, in the model's dtype and device."""
        return KVCache.for_model(self.spec, self.parallel, num_blocks=num_blocks,
                                 block_size=block_size, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        """Run one step; returns float32 logits [N, V] for ``batch.logits_rows``."""
        cos, sin = self.rotary.cos_sin(batch.positions, self.dtype)
        ctx = build_step_context(batch, cos, sin, self.slot_groups, self.lora_groups)
        h = self.embed_tokens(batch.input_ids, ctx.meta("embed"))
        for layer in self.decoder_layers():
            h = layer(h, ctx, kv_cache)
        h = self.norm(h.index_select(0, batch.logits_rows))
        return self.lm_head(h, ctx.meta("lm_head")).float()
