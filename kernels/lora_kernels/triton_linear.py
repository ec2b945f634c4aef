"""Triton kernels of the multi-slice LoRA linear: fused shrink+expand, and split shrink/expand.

Shape legend: M rows, W weight entries, n slices (≤ 4), R rank, K input width, N output
width (all slices together). Rank rows j = s·R_PAD + r index the slices' ranks side by side,
so one dot shrinks every slice from a single read of x.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lora_kernels.triton_common import add_block, block_slice, expand_tile, find_tile, slice_bounds


@triton.jit
def _rank_rows(w, col_lo, col_hi, N, o1, o2, o3, R, NS, a_ptr, sas, saw, sar,
               NS_PAD: tl.constexpr, R_PAD: tl.constexpr):
    """A row pointers [J] of entry w and which rank rows a column range needs."""
    offs_j = tl.arange(0, NS_PAD * R_PAD)
    j_slice = offs_j // R_PAD
    j_r = offs_j % R_PAD
    lo, hi = slice_bounds(j_slice, N, o1, o2, o3)
    need = (j_slice < NS) & (j_r < R) & (lo < col_hi) & (hi > col_lo)
    ptrs = a_ptr + j_slice.to(tl.int64) * sas + w.to(tl.int64) * saw + j_r * sar
    return ptrs, need


@triton.jit
def _shrink_acc(x_rows, m_mask, a_rows, need, k_lo, k_hi, sxk, sak,
                BM: tl.constexpr, J: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """float32 [BM, J] = x[rows, k_lo:k_hi] @ A[j, k_lo:k_hi]ᵀ."""
    acc = tl.zeros((BM, J), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        offs_k = k0 + tl.arange(0, BK)
        if EVEN_K:
            xt = tl.load(x_rows[:, None] + offs_k[None, :] * sxk, mask=m_mask[:, None], other=0.0)
            at = tl.load(a_rows[:, None] + offs_k[None, :] * sak, mask=need[:, None], other=0.0)
        else:
            k_mask = offs_k < k_hi
            xt = tl.load(x_rows[:, None] + offs_k[None, :] * sxk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_rows[:, None] + offs_k[None, :] * sak,
                         mask=need[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(at), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def fused_lora_kernel(
    x_ptr, a_ptr, b_ptr, out_ptr,
    sorted_rows, seg_counts, seg_starts, num_entries, M,
    K, N, o1, o2, o3, R, NS, cols_per_prog,
    sxm, sxk, sas, saw, sar, sak, sbw, sbn, sbr, som, son,
    NS_PAD: tl.constexpr, R_PAD: tl.constexpr, W_PAD: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, EVEN_K: tl.constexpr,
    ALIGNED: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program: a row tile of one entry × a column range; y stays in registers."""
    w, pos0, rows_left, live = find_tile(
        tl.program_id(0), seg_counts, seg_starts, num_entries, M, W_PAD, BM, False)
    if live:
        col_lo = tl.program_id(1) * cols_per_prog
        col_hi = tl.minimum(col_lo + cols_per_prog, N)
        offs_m = tl.arange(0, BM)
        m_mask = offs_m < rows_left
        rows = tl.load(sorted_rows + pos0 + offs_m, mask=m_mask, other=0)
        a_rows, need = _rank_rows(w, col_lo, col_hi, N, o1, o2, o3, R, NS, a_ptr, sas, saw, sar,
                                  NS_PAD, R_PAD)
        x_rows = x_ptr + rows.to(tl.int64) * sxm
        acc = _shrink_acc(x_rows, m_mask, a_rows, need, 0, K, sxk, sak,
                          BM, NS_PAD * R_PAD, BK, EVEN_K, DOT_PREC)
        expand_tile(acc, w, rows, m_mask, col_lo, col_hi, b_ptr, out_ptr, N, o1, o2, o3, R,
                    sbw, sbn, sbr, som, son, NS_PAD, R_PAD, BN, DOT_PREC, ALIGNED)


@triton.jit
def shrink_kernel(
    x_ptr, a_ptr, y_ptr,
    sorted_rows, seg_counts, seg_starts, num_entries, M,
    K, R, NS, k_per_prog, row_div,
    sxm, sxk, sas, saw, sar, sak, syk, sys, sym,
    NS_PAD: tl.constexpr, R_PAD: tl.constexpr, W_PAD: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, ZERO_UNASSIGNED: tl.constexpr,
    X_BY_POS: tl.constexpr, Y_BY_POS: tl.constexpr, DOT_PREC: tl.constexpr,
    PDL: tl.constexpr, CUM_STARTS: tl.constexpr = False,
):
    """One program: a row tile × a K chunk; writes its partial y[ks, s, row, r] (float32).

    The partials are summed by the expand (no atomics, no memset). With ZERO_UNASSIGNED
    the -1 rows get zeros, so y holds the full ``lora_shrink`` semantics. x's row of sorted
    row r is ``r // row_div`` (tokens of token×top-k rows), or the sorted position itself
    with X_BY_POS; y is indexed by row, or by sorted position with Y_BY_POS (the MoE path
    keeps its intermediates in sorted order). PDL: let the expand launch now (it waits
    for this grid's completion itself before reading y).
    """
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    w, pos0, rows_left, live = find_tile(
        tl.program_id(0), seg_counts, seg_starts, num_entries, M, W_PAD, BM, ZERO_UNASSIGNED,
        CUM_STARTS)
    if live:
        ks = tl.program_id(1)
        k_lo = ks * k_per_prog
        k_hi = tl.minimum(k_lo + k_per_prog, K)
        offs_m = tl.arange(0, BM)
        m_mask = offs_m < rows_left
        pos = pos0 + offs_m
        rows = tl.load(sorted_rows + pos, mask=m_mask, other=0)
        J: tl.constexpr = NS_PAD * R_PAD
        offs_j = tl.arange(0, J)
        j_slice = offs_j // R_PAD
        j_r = offs_j % R_PAD
        if w < num_entries:
            need = (j_slice < NS) & (j_r < R)
            a_rows = a_ptr + j_slice.to(tl.int64) * sas + w.to(tl.int64) * saw + j_r * sar
            if X_BY_POS:
                x_rows = x_ptr + pos.to(tl.int64) * sxm
            else:
                x_rows = x_ptr + (rows // row_div).to(tl.int64) * sxm
            acc = _shrink_acc(x_rows, m_mask, a_rows, need, k_lo, k_hi, sxk, sak,
                              BM, J, BK, EVEN_K, DOT_PREC)
        else:
            acc = tl.zeros((BM, J), dtype=tl.float32)
        if Y_BY_POS:
            y_rows = pos.to(tl.int64)
        else:
            y_rows = rows.to(tl.int64)
        y_ptrs = y_ptr + ks * syk + j_slice[None, :] * sys + y_rows[:, None] * sym + j_r[None, :]
        y_mask = m_mask[:, None] & (j_slice[None, :] < NS) & (j_r[None, :] < R)
        tl.store(y_ptrs, acc, mask=y_mask)


@triton.jit
def expand_kernel(
    y_ptr, b_ptr, out_ptr,
    sorted_rows, seg_counts, seg_starts, num_entries, M,
    N, o1, o2, o3, R, NS, SPLIT_K, cols_per_prog,
    syk, sys, sym, sbw, sbn, sbr, som, son,
    NS_PAD: tl.constexpr, R_PAD: tl.constexpr, W_PAD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, ALIGNED: tl.constexpr, DOT_PREC: tl.constexpr,
    PDL: tl.constexpr, CUM_STARTS: tl.constexpr = False, PREFETCH: tl.constexpr = False,
):
    """One program: a row tile × a column range; sums the shrink's K partials first.

    ALIGNED: each column block reads only its own slice's partials (R_PAD wide). PDL: this
    grid was launched programmatically while the shrink still runs; the metadata (done
    before the shrink started) is read first, then it waits for the shrink's partials.
    PREFETCH (ALIGNED only): the row ids, the first block's B tile and output tile are
    loaded before that wait (nothing before the expand writes them: the shrink writes only
    the partials), and each block loads the next block's B and output while it finishes,
    so after the wait a block's critical path is partials → dot → store.
    """
    w, pos0, rows_left, live = find_tile(
        tl.program_id(0), seg_counts, seg_starts, num_entries, M, W_PAD, BM, False, CUM_STARTS)
    if PREFETCH and ALIGNED:
        col_lo = tl.program_id(1) * cols_per_prog
        col_hi = tl.minimum(col_lo + cols_per_prog, N)
        offs_m = tl.arange(0, BM)
        m_mask = offs_m < tl.where(live, rows_left, 0)
        rows = tl.load(sorted_rows + pos0 + offs_m, mask=m_mask, other=0)
        offs_r = tl.arange(0, R_PAD)
        r_mask = offs_r < R
        b_rows = b_ptr + w.to(tl.int64) * sbw + offs_r[:, None] * sbr
        o_rows = out_ptr + rows.to(tl.int64)[:, None] * som
        offs_n = col_lo + tl.arange(0, BN)
        n_mask = offs_n < tl.where(live, col_hi, col_lo)
        bt = tl.load(b_rows + offs_n.to(tl.int64)[None, :] * sbn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        o = tl.load(o_rows + offs_n[None, :] * son, mask=m_mask[:, None] & n_mask[None, :],
                    other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()
        if live:
            y_rows = y_ptr + rows.to(tl.int64)[:, None] * sym + offs_r[None, :]
            y_mask = m_mask[:, None] & r_mask[None, :]
            for n0 in range(col_lo, col_hi, BN):
                s = block_slice(n0, o1, o2, o3)
                acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
                for ks in range(0, SPLIT_K):
                    acc += tl.load(y_rows + ks * syk + s * sys, mask=y_mask, other=0.0)
                d = tl.dot(acc.to(b_ptr.dtype.element_ty), bt, input_precision=DOT_PREC)
                offs_n = n0 + tl.arange(0, BN)
                o_mask = m_mask[:, None] & (offs_n < col_hi)[None, :]
                tl.store(o_rows + offs_n[None, :] * son,
                         (o.to(tl.float32) + d).to(out_ptr.dtype.element_ty), mask=o_mask)
                nxt = offs_n + BN
                nx_mask = nxt < col_hi
                bt = tl.load(b_rows + nxt.to(tl.int64)[None, :] * sbn,
                             mask=r_mask[:, None] & nx_mask[None, :], other=0.0)
                o = tl.load(o_rows + nxt[None, :] * son, mask=m_mask[:, None] & nx_mask[None, :],
                            other=0.0)
    else:
        if PDL:
            tl.extra.cuda.gdc_wait()
        if live:
            _expand_body(y_ptr, b_ptr, out_ptr, sorted_rows, w, pos0, rows_left, N, o1, o2, o3,
                         R, NS, SPLIT_K, cols_per_prog, syk, sys, sym, sbw, sbn, sbr, som, son,
                         NS_PAD, R_PAD, BM, BN, ALIGNED, DOT_PREC)


@triton.jit
def _expand_body(
    y_ptr, b_ptr, out_ptr, sorted_rows, w, pos0, rows_left,
    N, o1, o2, o3, R, NS, SPLIT_K, cols_per_prog,
    syk, sys, sym, sbw, sbn, sbr, som, son,
    NS_PAD: tl.constexpr, R_PAD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, ALIGNED: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """The expand of one live program without prefetching (loads follow the wait)."""
    col_lo = tl.program_id(1) * cols_per_prog
    col_hi = tl.minimum(col_lo + cols_per_prog, N)
    offs_m = tl.arange(0, BM)
    m_mask = offs_m < rows_left
    rows = tl.load(sorted_rows + pos0 + offs_m, mask=m_mask, other=0)
    if ALIGNED:
        offs_r = tl.arange(0, R_PAD)
        y_rows = y_ptr + rows.to(tl.int64)[:, None] * sym + offs_r[None, :]
        y_mask = m_mask[:, None] & (offs_r[None, :] < R)
        for n0 in range(col_lo, col_hi, BN):
            offs_n = n0 + tl.arange(0, BN)
            s = block_slice(n0, o1, o2, o3)
            acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
            for ks in range(0, SPLIT_K):
                acc += tl.load(y_rows + ks * syk + s * sys, mask=y_mask, other=0.0)
            add_block(acc.to(b_ptr.dtype.element_ty), w, rows, m_mask, offs_n,
                      offs_n < col_hi, b_ptr, out_ptr, R, sbw, sbn, sbr, som, son,
                      R_PAD, DOT_PREC)
    else:
        J: tl.constexpr = NS_PAD * R_PAD
        offs_j = tl.arange(0, J)
        j_slice = offs_j // R_PAD
        j_r = offs_j % R_PAD
        y_ptrs = (y_ptr + j_slice[None, :] * sys + rows.to(tl.int64)[:, None] * sym
                  + j_r[None, :])
        y_mask = m_mask[:, None] & (j_slice[None, :] < NS) & (j_r[None, :] < R)
        acc = tl.zeros((BM, J), dtype=tl.float32)
        for ks in range(0, SPLIT_K):
            acc += tl.load(y_ptrs + ks * syk, mask=y_mask, other=0.0)
        expand_tile(acc, w, rows, m_mask, col_lo, col_hi, b_ptr, out_ptr, N, o1, o2, o3,
                    R, sbw, sbn, sbr, som, son, NS_PAD, R_PAD, BN, DOT_PREC, False)
