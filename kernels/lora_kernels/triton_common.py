"""Device helpers shared by the Triton LoRA kernels: tile lookup and the expand epilogue.

A launch covers row tiles of BM rows, each inside one weight entry's segment of the sorted
rows. Tile t of the step is found on the device from the per-entry row counts, so the grid
is a static bound and the same graph serves any row → entry assignment.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def find_tile(
    pid, seg_counts, seg_starts, num_entries, num_rows,
    W_PAD: tl.constexpr, BM: tl.constexpr, WITH_UNASSIGNED: tl.constexpr,
):
    """Entry, first sorted position, rows left and liveness of row tile ``pid``.

    Entries are numbered 0..W-1; with WITH_UNASSIGNED the -1 rows (sorted last) form a
    virtual entry W, so kernels that must write every row can zero them.
    """
    offs = tl.arange(0, W_PAD)
    cnt = tl.load(seg_counts + offs, mask=offs < num_entries, other=0)
    if WITH_UNASSIGNED:
        assigned = tl.sum(cnt, 0)
        cnt = tl.where(offs == num_entries, num_rows - assigned, cnt)
    tiles = (cnt + BM - 1) // BM
    cum = tl.cumsum(tiles, 0)
    live = pid < tl.sum(tiles, 0)
    w = tl.sum((cum <= pid).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(offs == w, cum - tiles, 0), 0)
    count = tl.sum(tl.where(offs == w, cnt, 0), 0)
    in_table = live & (w < num_entries)
    start = tl.load(seg_starts + w, mask=in_table, other=0)
    if WITH_UNASSIGNED:
        start = tl.where(in_table, start, num_rows - count)
    row0 = (pid - first_tile) * BM
    return w, start + row0, count - row0, live


@triton.jit
def slice_bounds(s, N, o1, o2, o3):
    """Column range [lo, hi) of slice s given the inner slice offsets (unused ones == N)."""
    lo = tl.where(s == 0, 0, tl.where(s == 1, o1, tl.where(s == 2, o2, o3)))
    hi = tl.where(s == 0, o1, tl.where(s == 1, o2, tl.where(s == 2, o3, N)))
    return lo, hi


@triton.jit
def expand_tile(
    y, w, rows, m_mask, col_lo, col_hi,
    b_ptr, out_ptr, N, o1, o2, o3, R,
    sbw, sbn, sbr, som, son,
    NS_PAD: tl.constexpr, R_PAD: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """``out[rows, col_lo:col_hi] += y @ B[w, cols, r]ᵀ`` with y's rank rows tied to slices.

    y: [BM, NS_PAD * R_PAD] in the operand dtype; rank row j belongs to slice j // R_PAD,
    and only meets the columns of its own slice (masked B), so unequal slices share a tile.
    """
    J: tl.constexpr = NS_PAD * R_PAD
    offs_j = tl.arange(0, J)
    j_slice = offs_j // R_PAD
    j_r = offs_j % R_PAD
    b_row = b_ptr + w.to(tl.int64) * sbw + j_r * sbr
    out_rows = out_ptr + rows.to(tl.int64) * som
    for n0 in range(col_lo, col_hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_mask = offs_n < col_hi
        n_slice = (offs_n >= o1).to(tl.int32) + (offs_n >= o2).to(tl.int32) + (
            offs_n >= o3).to(tl.int32)
        b_mask = (j_slice[:, None] == n_slice[None, :]) & (j_r[:, None] < R) & n_mask[None, :]
        bt = tl.load(b_row[:, None] + offs_n[None, :].to(tl.int64) * sbn, mask=b_mask, other=0.0)
        o_ptrs = out_rows[:, None] + offs_n[None, :] * son
        o_mask = m_mask[:, None] & n_mask[None, :]
        o = tl.load(o_ptrs, mask=o_mask, other=0.0)
        d = tl.dot(y, bt, input_precision=DOT_PREC)
        tl.store(o_ptrs, (o.to(tl.float32) + d).to(out_ptr.dtype.element_ty), mask=o_mask)
