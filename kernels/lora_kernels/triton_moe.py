"""Triton kernels of the fused MoE with expert LoRA: grouped GEMMs over expert-sorted rows.

Shape legend: T tokens, K top-k, M = T·K rows, E local experts, H hidden, I expert
intermediate (INTER in kernels), R rank. Intermediates live in sorted order (position p),
so each expert's rows are contiguous; LoRA deltas join the GEMMs' accumulators in the epilogue, one small
dot per distinct LoRA entry present in the tile (rows of one entry are contiguous).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lora_kernels.triton_common import find_tile

_NO_ENTRY = tl.constexpr(1 << 30)


@triton.jit
def _lora_epilogue(acc, y_ptr, sym, b_ptr, col0, offs_n, n_mask, ent, pos, R, sbw, sbn, sbr,
                   R_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc[m] += y[pos[m]] @ B[ent[m], col0 + offs_n]ᵀ for rows with ent >= 0."""
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    y = tl.load(y_ptr + pos.to(tl.int64)[:, None] * sym + offs_r[None, :],
                mask=(ent >= 0)[:, None] & r_mask[None, :], other=0.0)
    b_cols = (col0 + offs_n).to(tl.int64)[None, :] * sbn + offs_r[:, None] * sbr
    b_mask = r_mask[:, None] & n_mask[None, :]
    u = tl.min(tl.where(ent >= 0, ent, _NO_ENTRY), 0)
    while u < _NO_ENTRY:
        bt = tl.load(b_ptr + u.to(tl.int64) * sbw + b_cols, mask=b_mask, other=0.0)
        ys = tl.where((ent == u)[:, None], y, 0.0).to(b_ptr.dtype.element_ty)
        acc = tl.dot(ys, bt, acc, input_precision=DOT_PREC)
        u = tl.min(tl.where(ent > u, ent, _NO_ENTRY), 0)
    return acc


@triton.jit
def moe_gate_up_kernel(
    x_ptr, w13_ptr, h_ptr, y13_ptr, b13_ptr, row_entry,
    sorted_rows, e_counts, e_starts, E, M, top_k, H, INTER, R,
    sxm, sxk, swe, swn, swk, shm, shn, sys, sym, sbw, sbn, sbr,
    E_PAD: tl.constexpr, R_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, HAS_LORA: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """h[p, n] = silu(gate) · up for an expert's row tile × BN columns of I, LoRA included."""
    e, pos0, rows_left, live = find_tile(
        tl.program_id(0), e_counts, e_starts, E, M, E_PAD, BM, False)
    if live:
        offs_m = tl.arange(0, BM)
        m_mask = offs_m < rows_left
        pos = pos0 + offs_m
        rows = tl.load(sorted_rows + pos, mask=m_mask, other=0)
        x_rows = x_ptr + (rows // top_k).to(tl.int64)[:, None] * sxm
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_mask = offs_n < INTER
        w_base = w13_ptr + e.to(tl.int64) * swe
        wg_cols = w_base + offs_n.to(tl.int64)[None, :] * swn
        wu_cols = w_base + (INTER + offs_n).to(tl.int64)[None, :] * swn
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, H, BK):
            offs_k = k0 + tl.arange(0, BK)
            if EVEN_K:
                k_mask = offs_k < k0 + BK
            else:
                k_mask = offs_k < H
            xt = tl.load(x_rows + offs_k[None, :] * sxk, mask=m_mask[:, None] & k_mask[None, :],
                         other=0.0)
            w_mask = k_mask[:, None] & n_mask[None, :]
            wg = tl.load(wg_cols + offs_k[:, None] * swk, mask=w_mask, other=0.0)
            wu = tl.load(wu_cols + offs_k[:, None] * swk, mask=w_mask, other=0.0)
            acc_g = tl.dot(xt, wg, acc_g, input_precision=DOT_PREC)
            acc_u = tl.dot(xt, wu, acc_u, input_precision=DOT_PREC)
        if HAS_LORA:
            ent = tl.load(row_entry + rows, mask=m_mask, other=-1)
            acc_g = _lora_epilogue(acc_g, y13_ptr, sym, b13_ptr, 0, offs_n, n_mask, ent, pos,
                                   R, sbw, sbn, sbr, R_PAD, DOT_PREC)
            acc_u = _lora_epilogue(acc_u, y13_ptr + sys, sym, b13_ptr, INTER, offs_n, n_mask, ent,
                                   pos, R, sbw, sbn, sbr, R_PAD, DOT_PREC)
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(h_ptr + pos.to(tl.int64)[:, None] * shm + offs_n[None, :] * shn,
                 h.to(h_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def moe_down_kernel(
    h_ptr, w2_ptr, d_ptr, y2_ptr, b2_ptr, row_entry, topk_w,
    sorted_rows, e_counts, e_starts, E, M, H, INTER, R,
    shm, shk, swe, swn, swk, sdm, sdn, sym, sbw, sbn, sbr,
    E_PAD: tl.constexpr, R_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, HAS_LORA: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """d[row, n] = topk_weight[row] · (h[p] @ w2[e, n]ᵀ + LoRA) for BN columns of H."""
    e, pos0, rows_left, live = find_tile(
        tl.program_id(0), e_counts, e_starts, E, M, E_PAD, BM, False)
    if live:
        offs_m = tl.arange(0, BM)
        m_mask = offs_m < rows_left
        pos = pos0 + offs_m
        rows = tl.load(sorted_rows + pos, mask=m_mask, other=0)
        h_rows = h_ptr + pos.to(tl.int64)[:, None] * shm
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_mask = offs_n < H
        w_cols = w2_ptr + e.to(tl.int64) * swe + offs_n.to(tl.int64)[None, :] * swn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, INTER, BK):
            offs_k = k0 + tl.arange(0, BK)
            if EVEN_K:
                k_mask = offs_k < k0 + BK
            else:
                k_mask = offs_k < INTER
            ht = tl.load(h_rows + offs_k[None, :] * shk, mask=m_mask[:, None] & k_mask[None, :],
                         other=0.0)
            wt = tl.load(w_cols + offs_k[:, None] * swk, mask=k_mask[:, None] & n_mask[None, :],
                         other=0.0)
            acc = tl.dot(ht, wt, acc, input_precision=DOT_PREC)
        if HAS_LORA:
            ent = tl.load(row_entry + rows, mask=m_mask, other=-1)
            acc = _lora_epilogue(acc, y2_ptr, sym, b2_ptr, 0, offs_n, n_mask, ent, pos,
                                 R, sbw, sbn, sbr, R_PAD, DOT_PREC)
        wt_row = tl.load(topk_w + rows, mask=m_mask, other=0.0).to(tl.float32)
        acc = acc * wt_row[:, None]
        tl.store(d_ptr + rows.to(tl.int64)[:, None] * sdm + offs_n[None, :] * sdn,
                 acc.to(d_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def moe_combine_kernel(d_ptr, local_expert, out_ptr, H, top_k, sdm, sdn, som, son,
                       K_PAD: tl.constexpr, BH: tl.constexpr):
    """out[t, cols] = Σ_k d[t·K + k, cols] over the token's rows routed to local experts."""
    t = tl.program_id(0)
    offs_k = tl.arange(0, K_PAD)
    rows = t.to(tl.int64) * top_k + offs_k
    valid = offs_k < top_k
    valid = valid & (tl.load(local_expert + rows, mask=valid, other=-1) >= 0)
    offs_h = tl.program_id(1) * BH + tl.arange(0, BH)
    h_mask = offs_h < H
    d = tl.load(d_ptr + rows[:, None] * sdm + offs_h[None, :] * sdn,
                mask=valid[:, None] & h_mask[None, :], other=0.0)
    total = tl.sum(d.to(tl.float32), 0)
    tl.store(out_ptr + t.to(tl.int64) * som + offs_h * son, total.to(out_ptr.dtype.element_ty),
             mask=h_mask)
