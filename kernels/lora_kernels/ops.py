"""Entry points the model calls: Triton kernels on CUDA tensors, the torch reference elsewhere.

Signatures and semantics are those of ``lora_kernels.reference`` (see each function there
and the ``Semantics:`` blocks of ``linear``, ``embedding`` and ``moe``). The backend is
"auto" (Triton for CUDA tensors, the reference otherwise); tests force "triton" to run the
kernels on CPU under ``TRITON_INTERPRET=1``. Triton modules are imported on first use, so
importing this module never imports Triton and the interpreter switch can still be set.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from lora_kernels import reference
from lora_kernels.meta import LoRAMeta, build_lora_meta
from lora_kernels.reference import MoELoRA

BACKENDS = ("auto", "reference", "triton")
_backend = "auto"

__all__ = [
    "BACKENDS", "LoRAMeta", "MoELoRA", "add_lora", "add_lora_embedding", "build_lora_meta",
    "fused_moe", "get_backend", "lora_expand", "lora_shrink", "set_backend", "use_backend",
]


def set_backend(name: str) -> None:
    """Choose "auto" (Triton on CUDA tensors), "reference" (torch) or "triton" (always)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The backend ``set_backend`` chose."""
    return _backend


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block under another backend, restoring the previous one after."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _triton(t: torch.Tensor) -> bool:
    return _backend == "triton" or (_backend == "auto" and t.is_cuda)


def add_lora(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoRAMeta,
    slice_offsets: Sequence[int],
    workspace: torch.Tensor | None = None,
) -> None:
    """``out[m, slice s] += x[m] @ A[s, w].T @ B[w, slice s].T`` for w = meta.indices[m] >= 0.

    Args: out [M, N]; x [M, K]; lora_a [n, W, R, K]; lora_b [W, N, R]; slice_offsets n + 1
    ints from 0 to N; workspace: optional float32 scratch for the two-launch path
    (see ``linear.lora_linear``).
    """
    if _triton(x):
        from lora_kernels import linear

        linear.lora_linear(out, x, lora_a, lora_b, meta, slice_offsets, workspace=workspace)
        return
    reference.lora_linear(out, x, lora_a, lora_b, meta.indices, slice_offsets)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta) -> torch.Tensor:
    """y [n, M, R] float32 with ``y[s, m] = x[m] @ A[s, w].T`` (0 where w = -1)."""
    if _triton(x):
        from lora_kernels import linear

        return linear.lora_shrink(x, lora_a, meta)
    return reference.lora_shrink(x, lora_a, meta.indices)


def lora_expand(out: torch.Tensor, y: torch.Tensor, lora_b: torch.Tensor, meta: LoRAMeta,
                slice_offsets: Sequence[int]) -> None:
    """``out[m, slice s] += y[s, m] @ B[w, slice s].T`` for w = meta.indices[m] >= 0."""
    if _triton(out):
        from lora_kernels import linear

        linear.lora_expand(out, y, lora_b, meta, slice_offsets)
        return
    reference.lora_expand(out, y, lora_b, meta.indices, slice_offsets)


def add_lora_embedding(
    out: torch.Tensor,
    token_ids: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoRAMeta,
) -> None:
    """``out[m] += A[w, token_ids[m]] @ B[w].T`` for w = meta.indices[m] >= 0."""
    if _triton(out):
        from lora_kernels import embedding

        embedding.lora_embedding(out, token_ids, lora_a, lora_b, meta)
        return
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
    if _triton(x):
        from lora_kernels import moe

        return moe.fused_moe(x, topk_weights, topk_ids, w13, w2, expert_map, lora, row_slots)
    return reference.fused_moe(x, topk_weights, topk_ids, w13, w2, expert_map, lora, row_slots)
