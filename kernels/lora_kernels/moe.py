"""Launcher of the fused MoE with expert LoRA on Triton (see ``fused_moe``).

Shape legend: T tokens, K top-k, M = T·K rows, E local experts, S slots, H hidden,
I expert intermediate, R rank.
"""

from __future__ import annotations

import torch

from lora_kernels import config as cfg
from lora_kernels.linear import _launch_shrink
from lora_kernels.moe_meta import build_moe_routing
from lora_kernels.reference import MoELoRA
from lora_kernels.triton_moe import moe_combine_kernel, moe_down_kernel, moe_gate_up_kernel


def _check(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
           w13: torch.Tensor, w2: torch.Tensor, lora: MoELoRA | None,
           row_slots: torch.Tensor | None) -> None:
    t_count, hidden = x.shape
    e_local, two_i, _ = w13.shape
    if w13.shape[2] != hidden or w2.shape != (e_local, hidden, two_i // 2):
        raise ValueError(f"w13 must be [E, 2I, H={hidden}] and w2 [E, H, I], got "
                         f"{tuple(w13.shape)} and {tuple(w2.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != t_count:
        raise ValueError(f"topk_ids / topk_weights must both be [T={t_count}, K], got "
                         f"{tuple(topk_ids.shape)} / {tuple(topk_weights.shape)}")
    if lora is not None:
        if row_slots is None or row_slots.shape != (t_count,):
            raise ValueError("lora needs row_slots [T]")
        entries = lora.b13.shape[0]
        if entries % e_local or lora.a13.shape[:2] != (2, entries) or lora.a2.shape[:2] != (
                1, entries) or lora.b2.shape[:2] != (entries, hidden):
            raise ValueError("MoELoRA buffers must be a13 [2, S·E, R, H], b13 [S·E, 2I, R], "
                             "a2 [1, S·E, R, I], b2 [S·E, H, R]")


def _tiles(rows_per_expert: float) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, warps, stages) of the grouped GEMMs."""
    if rows_per_expert <= 16:
        return 16, 64, 128, 4, 4
    if rows_per_expert <= 64:
        return 32, 64, 64, 4, 4
    return 64, 128, 64, 8, 3


def fused_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              w13: torch.Tensor, w2: torch.Tensor, expert_map: torch.Tensor,
              lora: MoELoRA | None = None, row_slots: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU mixture of the local experts with each row's expert LoRA, on Triton.

    Semantics (those of ``reference.fused_moe``):
        out = zeros(T, H)
        for t, k: e = expert_map[topk_ids[t, k]]; skip if e < 0
            w = row_slots[t] * E + e if lora and row_slots[t] >= 0 else -1
            gate_up = x[t] @ w13[e].T (+ LoRA of a13/b13 at w, slices [0, I, 2I])
            h = silu(gate_up[:I]) * gate_up[I:]
            out[t] += topk_weights[t, k] * (h @ w2[e].T (+ LoRA of a2/b2 at w))
    Args: x [T, H]; topk_weights [T, K]; topk_ids [T, K] global ids; w13 [E, 2I, H];
        w2 [E, H, I]; expert_map [E_global] int (local id or -1); lora: ``MoELoRA`` with
        S·E entries; row_slots [T] (-1 = none); out: optional [T, H] to write (every
        element is written). Launches: routing sort, 2 LoRA shrinks, gate/up GEMM (+SiLU),
        down GEMM (+top-k weight), combine; no memset, no atomics.
    """
    _check(x, topk_weights, topk_ids, w13, w2, lora, row_slots)
    t_count, hidden = x.shape
    top_k = topk_ids.shape[1]
    e_local, two_i, _ = w13.shape
    inter = two_i // 2
    m = t_count * top_k
    result = out if out is not None else torch.empty_like(x)
    if t_count == 0:
        return result
    slots = lora.b13.shape[0] // e_local if lora is not None else 0
    routing = build_moe_routing(topk_ids, expert_map, e_local,
                                row_slots if lora is not None else None, slots)
    experts = routing.experts
    bm, bn, bk, warps, stages = _tiles(m / max(1, e_local))
    prec = cfg.dot_precision(x.dtype)
    has_lora = lora is not None and routing.lora is not None
    rank = lora.b13.shape[2] if lora is not None else 16
    dev = x.device
    h = torch.empty(m, inter, dtype=x.dtype, device=dev)
    y13 = torch.empty(2, m, rank, dtype=torch.float32, device=dev) if has_lora else h
    y2 = torch.empty(1, m, rank, dtype=torch.float32, device=dev) if has_lora else h
    row_entry = routing.lora.indices if routing.lora is not None else routing.local_expert
    b13 = lora.b13 if lora is not None else w13
    b2 = lora.b2 if lora is not None else w2
    if has_lora and lora is not None and routing.lora is not None:
        _launch_shrink(x, lora.a13, routing.lora, y13.unsqueeze(0), 16 if bm <= 16 else 32,
                       64, 1, 4, 3, zero_unassigned=False, row_div=top_k, y_by_pos=True)
    tiles = cfg.tile_bound(m, e_local, bm)
    moe_gate_up_kernel[(tiles, -(-inter // bn))](
        x, w13, h, y13, b13, row_entry,
        experts.sorted_rows, experts.seg_counts, experts.seg_starts, e_local, m, top_k,
        hidden, inter, rank,
        *x.stride(), *w13.stride(), *h.stride(), y13.stride(0), y13.stride(1),
        *b13.stride(),
        E_PAD=cfg.next_pow2(e_local), R_PAD=cfg.rank_pad(rank), BM=bm, BN=bn, BK=bk,
        HAS_LORA=has_lora, EVEN_K=hidden % bk == 0, DOT_PREC=prec,
        num_warps=warps, num_stages=stages,
    )
    if has_lora and lora is not None and routing.lora is not None:
        _launch_shrink(h, lora.a2, routing.lora, y2.unsqueeze(0), 16 if bm <= 16 else 32,
                       64, 1, 4, 3, zero_unassigned=False, x_by_pos=True, y_by_pos=True)
    down = torch.empty(m, hidden, dtype=x.dtype, device=dev)
    flat_w = topk_weights.reshape(-1)
    moe_down_kernel[(tiles, -(-hidden // bn))](
        h, w2, down, y2, b2, row_entry, flat_w,
        experts.sorted_rows, experts.seg_counts, experts.seg_starts, e_local, m,
        hidden, inter, rank,
        *h.stride(), *w2.stride(), *down.stride(), y2.stride(1), *b2.stride(),
        E_PAD=cfg.next_pow2(e_local), R_PAD=cfg.rank_pad(rank), BM=bm, BN=bn, BK=bk,
        HAS_LORA=has_lora, EVEN_K=inter % bk == 0, DOT_PREC=prec,
        num_warps=warps, num_stages=stages,
    )
    bh = min(1024, cfg.next_pow2(hidden))
    moe_combine_kernel[(t_count, -(-hidden // bh))](
        down, routing.local_expert, result, hidden, top_k, *down.stride(), *result.stride(),
        K_PAD=cfg.next_pow2(top_k), BH=bh, num_warps=4,
    )
    return result
