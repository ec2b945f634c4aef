"""Entry points the model calls: Triton kernels on CUDA tensors, the torch reference elsewhere.

Signatures and semantics are those of ``lora_kernels.reference`` (see each function there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora_kernels import reference
from lora_kernels.meta import LoRAMeta
from lora_kernels.reference import MoELoRA


def add_lora(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoRAMeta,
    slice_offsets: Sequence[int],
) -> None:
    """``out[m, slice s] += x[m] @ A[s, w].T @ B[w, slice s].T`` for w = meta.indices[m] >= 0."""
    reference.lora_linear(out, x, lora_a, lora_b, meta.indices, slice_offsets)


def add_lora_embedding(
    out: torch.Tensor,
    token_ids: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoRAMeta,
) -> None:
    """``out[m] += A[w, token_ids[m]] @ B[w].T`` for w = meta.indices[m] >= 0."""
    reference.lora_embedding(out, token_ids, lora_a, lora_b, meta.indices)


def fused_moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_map: torch.Tensor,
    lora: MoELoRA | None = None,
    row_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Local experts' SwiGLU mixture with per-row expert LoRA (see reference.fused_moe)."""
    return reference.fused_moe(x, topk_weights, topk_ids, w13, w2, expert_map, lora, row_slots)
