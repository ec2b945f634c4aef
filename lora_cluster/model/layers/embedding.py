"""Vocab-parallel token embedding and lm_head, with their LoRA slots.

Each TP rank holds vocabulary rows ``vocab_range``. Shape legend: T tokens, N logit rows,
H hidden, V full vocab, V_local this rank's rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lora_kernels.meta import LoRAMeta
from torch import nn

from lora_cluster.model.checkpoint import CheckpointReader
from lora_cluster.model.layers.lora_buffers import EmbeddingLoRA, LinearLoRA, LoRACapacity
from lora_cluster.model.parallel import Comm

Range = tuple[int, int]


class VocabParallelEmbedding(nn.Module):
    """ids [T] → [T, H]: local rows (zeros for ids of other shards) + LoRA, then all_reduce_tp.

    LoRA: A sharded by vocab like the table (a row per token), B full; the delta joins the
    partial before the reduction, so exactly the owning rank contributes it.
    """

    weight: torch.Tensor

    def __init__(self, vocab: int, hidden: int, vocab_range: Range, *, comm: Comm,
                 cap: LoRACapacity | None, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.vocab, self.hidden, self.vocab_range = vocab, hidden, vocab_range
        self.comm = comm
        self.sharded = vocab_range != (0, vocab)
        local = vocab_range[1] - vocab_range[0]
        self.register_buffer("weight", torch.empty(local, hidden, dtype=dtype, device=device))
        self.lora = EmbeddingLoRA(local, hidden, cap, dtype, device) if cap else None

    def load(self, reader: CheckpointReader, key: str) -> None:
        lo, hi = self.vocab_range
        self.weight.copy_(reader.read(key, (self.vocab, self.hidden), (slice(lo, hi),)))

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids relative to this shard; -1 where another rank owns the token."""
        if not self.sharded:
            return ids
        lo, hi = self.vocab_range
        inside = (ids >= lo) & (ids < hi)
        return torch.where(inside, ids - lo, torch.full_like(ids, -1))

    def forward(self, ids: torch.Tensor, meta: LoRAMeta | None) -> torch.Tensor:
        local = self.local_ids(ids)
        out = F.embedding(local.clamp(min=0), self.weight)
        if self.sharded:
            out = out * (local >= 0).unsqueeze(-1).to(out.dtype)
        if self.lora is not None and meta is not None:
            self.lora.add_to(out, local, meta)
        return self.comm.all_reduce_tp(out)


class ParallelLMHead(nn.Module):
    """x [N, H] → logits [N, V]: local vocab columns + LoRA (A full, B by vocab), all_gather_tp.

    With tied embeddings the weight *is* the embedding's local table (same vocab rows).
    """

    own_weight: torch.Tensor | None

    def __init__(self, vocab: int, hidden: int, vocab_range: Range, *, comm: Comm,
                 cap: LoRACapacity | None, dtype: torch.dtype, device: torch.device,
                 tied: VocabParallelEmbedding | None = None) -> None:
        super().__init__()
        self.vocab, self.hidden, self.vocab_range = vocab, hidden, vocab_range
        self.comm = comm
        local = vocab_range[1] - vocab_range[0]
        # A tuple, not an attribute, so the embedding is not registered twice as a submodule
        # (and a later .to() cannot split the shared table into two copies).
        self._tied_to = (tied,) if tied is not None else ()
        self.register_buffer("own_weight", None if tied is not None else torch.empty(
            local, hidden, dtype=dtype, device=device))
        self.lora = LinearLoRA(hidden, (local,), cap, dtype, device) if cap else None

    @property
    def tied(self) -> bool:
        return bool(self._tied_to)

    @property
    def weight(self) -> torch.Tensor:
        """[V_local, H]: the embedding table when tied, else lm_head's own rows."""
        weight = self._tied_to[0].weight if self._tied_to else self.own_weight
        assert weight is not None
        return weight

    def load(self, reader: CheckpointReader, key: str) -> None:
        if self.tied:
            return
        lo, hi = self.vocab_range
        assert self.own_weight is not None
        self.own_weight.copy_(reader.read(key, (self.vocab, self.hidden), (slice(lo, hi),)))

    def forward(self, x: torch.Tensor, meta: LoRAMeta | None) -> torch.Tensor:
        logits = F.linear(x, self.weight)
        if self.lora is not None and meta is not None:
            self.lora.add_to(logits, x, meta)
        return self.comm.all_gather_tp(logits, dim=-1)
