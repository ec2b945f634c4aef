"""Single-launch LoRA linear for small row counts: split-K shrink, grid barrier, expand.

Shape legend: M rows, W weight entries, n slices (≤ 4), R rank, K input width, N output
width (all slices together); J = NS_PAD·R_PAD stacked rank rows (j = s·R_PAD + r).

The two-launch split path pays a kernel boundary between shrink and expand (~2.5–3 µs
each in a CUDA graph at T ≤ 64), and the fused path makes one program read all of A[w].
Here a persistent grid (≤ one program per SM, all co-resident) first computes the split-K
partials, meets at a grid-wide barrier, then expands. Each program loads the metadata, B
tile and output tile of its first expand block *before* the barrier, so only the partial
sums remain on the critical path after it. The grid is a static bound; the live tile
count is read on the device, and each phase walks its items with stride = grid size, so
any grid ≥ 1 computes the same result (the interpreter runs it with one program).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lora_kernels.triton_common import block_slice, find_tile, grid_barrier, live_tile_count
from lora_kernels.triton_linear import _shrink_acc


@triton.jit
def _expand_prep(item, valid, col_blocks, b_ptr, out_ptr, sorted_rows, seg_counts, seg_starts,
                 num_entries, M, N, o1, o2, o3, j_slice, j_r, j_need, sbw, sbn, sbr, som, son,
                 W_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Rows, B tile [J, BN] and out tile [BM, BN] of one expand block (masked off if not valid)."""
    tile = item // col_blocks
    n0 = (item - tile * col_blocks) * BN
    w, pos0, rows_left, _ = find_tile(tile, seg_counts, seg_starts, num_entries, M, W_PAD, BM,
                                      False)
    offs_m = tl.arange(0, BM)
    # Masks from comparisons only (an invalid item gets empty row and column ranges).
    m_mask = offs_m < tl.where(valid, rows_left, 0)
    rows = tl.load(sorted_rows + pos0 + offs_m, mask=m_mask, other=0)
    offs_n = n0 + tl.arange(0, BN)
    n_mask = offs_n < tl.where(valid, N, 0)
    n_slice = (offs_n >= o1).to(tl.int32) + (offs_n >= o2).to(tl.int32) + (
        offs_n >= o3).to(tl.int32)
    # Rank row j meets only the columns of its own slice.
    b_mask = (j_slice[:, None] == n_slice[None, :]) & j_need[:, None] & n_mask[None, :]
    bt = tl.load(b_ptr + w.to(tl.int64) * sbw + j_r[:, None] * sbr
                 + offs_n.to(tl.int64)[None, :] * sbn, mask=b_mask, other=0.0)
    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * som + offs_n[None, :] * son
    o_mask = m_mask[:, None] & n_mask[None, :]
    o = tl.load(o_ptrs, mask=o_mask, other=0.0)
    return rows, m_mask, block_slice(n0, o1, o2, o3), bt, o, o_ptrs, o_mask


@triton.jit
def _expand_finish(y_ptr, rows, m_mask, s_blk, bt, o, o_ptrs, o_mask, k_progs, j_slice, j_r,
                   j_need, syk, sys, sym, BM: tl.constexpr, J: tl.constexpr,
                   ALIGNED: tl.constexpr, DOT_PREC: tl.constexpr):
    """Sum the K partials of the block's rows and add their expand to the loaded out tile."""
    y_mask = m_mask[:, None] & j_need[None, :]
    if ALIGNED:  # the block lies in one slice: skip the other slices' partials
        y_mask = y_mask & (j_slice == s_blk)[None, :]
    y_ptrs = y_ptr + j_slice[None, :] * sys + rows.to(tl.int64)[:, None] * sym + j_r[None, :]
    acc = tl.zeros((BM, J), dtype=tl.float32)
    for ks in range(0, k_progs):
        # .cg: the partials were written by other SMs in this launch; read them from L2.
        acc += tl.load(y_ptrs + ks * syk, mask=y_mask, other=0.0, cache_modifier=".cg")
    d = tl.dot(acc.to(bt.dtype), bt, input_precision=DOT_PREC)
    tl.store(o_ptrs, (o.to(tl.float32) + d).to(o_ptrs.dtype.element_ty), mask=o_mask)


@triton.jit
def persistent_lora_kernel(
    x_ptr, a_ptr, b_ptr, out_ptr, y_ptr, bar_ptr,
    sorted_rows, seg_counts, seg_starts, num_entries, M,
    K, N, o1, o2, o3, R, NS, k_per_prog, k_progs,
    sxm, sxk, sas, saw, sar, sak, sbw, sbn, sbr, som, son, syk, sys, sym,
    NS_PAD: tl.constexpr, R_PAD: tl.constexpr, W_PAD: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, EVEN_K: tl.constexpr,
    ALIGNED: tl.constexpr, DOT_PREC: tl.constexpr, MAX_SPINS: tl.constexpr,
):
    """Phase 1: items (live tile, K chunk) → y[ks, s, row, r]; barrier; phase 2: items
    (live tile, BN column block) → out += Σ_ks y · Bᵀ. Items are dealt round-robin."""
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    tiles = live_tile_count(seg_counts, num_entries, W_PAD, BM)
    J: tl.constexpr = NS_PAD * R_PAD
    offs_j = tl.arange(0, J)
    j_slice = offs_j // R_PAD
    j_r = offs_j % R_PAD
    j_need = (j_slice < NS) & (j_r < R)
    offs_m = tl.arange(0, BM)
    a_base = a_ptr + j_slice.to(tl.int64) * sas + j_r * sar
    for item in range(pid, tiles * k_progs, progs):
        tile = item // k_progs
        ks = item - tile * k_progs
        w, pos0, rows_left, _ = find_tile(tile, seg_counts, seg_starts, num_entries, M, W_PAD,
                                          BM, False)
        m_mask = offs_m < rows_left
        rows = tl.load(sorted_rows + pos0 + offs_m, mask=m_mask, other=0)
        k_lo = ks * k_per_prog
        acc = _shrink_acc(x_ptr + rows.to(tl.int64) * sxm, m_mask,
                          a_base + w.to(tl.int64) * saw, j_need, k_lo,
                          tl.minimum(k_lo + k_per_prog, K), sxk, sak, BM, J, BK, EVEN_K,
                          DOT_PREC)
        y_ptrs = (y_ptr + ks * syk + j_slice[None, :] * sys + rows.to(tl.int64)[:, None] * sym
                  + j_r[None, :])
        tl.store(y_ptrs, acc, mask=m_mask[:, None] & j_need[None, :])

    col_blocks = tl.cdiv(N, BN)
    items = tiles * col_blocks
    # The first expand block's inputs do not depend on phase 1: load them before waiting.
    rows, m_mask, s_blk, bt, o, o_ptrs, o_mask = _expand_prep(
        pid, pid < items, col_blocks, b_ptr, out_ptr, sorted_rows, seg_counts, seg_starts,
        num_entries, M, N, o1, o2, o3, j_slice, j_r, j_need, sbw, sbn, sbr, som, son,
        W_PAD, BM, BN)
    grid_barrier(bar_ptr, progs, MAX_SPINS)
    if pid < items:
        _expand_finish(y_ptr, rows, m_mask, s_blk, bt, o, o_ptrs, o_mask, k_progs, j_slice, j_r,
                       j_need, syk, sys, sym, BM, J, ALIGNED, DOT_PREC)
    for item in range(pid + progs, items, progs):
        rows, m_mask, s_blk, bt, o, o_ptrs, o_mask = _expand_prep(
            item, item < items, col_blocks, b_ptr, out_ptr, sorted_rows, seg_counts,
            seg_starts, num_entries, M, N, o1, o2, o3, j_slice, j_r, j_need,
            sbw, sbn, sbr, som, son, W_PAD, BM, BN)
        _expand_finish(y_ptr, rows, m_mask, s_blk, bt, o, o_ptrs, o_mask, k_progs, j_slice, j_r,
                       j_need, syk, sys, sym, BM, J, ALIGNED, DOT_PREC)
