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
    CUM_STARTS: tl.constexpr = False,
):
    """Entry, first sorted position, rows left and liveness of row tile ``pid``.

    Entries are numbered 0..W-1; with WITH_UNASSIGNED the -1 rows (sorted last) form a
    virtual entry W, so kernels that must write every row can zero them. CUM_STARTS (the
    meta's ``cum_starts``: segments in entry order) takes the start from the counts already
    in registers, one dependent global load fewer before the row ids can be read.
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
    if CUM_STARTS:
        start = tl.sum(tl.where(offs < w, cnt, 0), 0)
    else:
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
def block_slice(n0, o1, o2, o3):
    """Slice of the column block starting at n0 (blocks never straddle slices when aligned)."""
    return (n0 >= o1).to(tl.int32) + (n0 >= o2).to(tl.int32) + (n0 >= o3).to(tl.int32)


@triton.jit
def add_block(ys, w, rows, m_mask, offs_n, n_mask, b_ptr, out_ptr, R, sbw, sbn, sbr, som, son,
              R_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
    """``out[rows, offs_n] += ys @ B[w, offs_n, :R]ᵀ`` for one slice's rank block ys [BM, R_PAD]."""
    offs_r = tl.arange(0, R_PAD)
    b_ptrs = (b_ptr + w.to(tl.int64) * sbw + offs_r[:, None] * sbr
              + offs_n.to(tl.int64)[None, :] * sbn)
    bt = tl.load(b_ptrs, mask=(offs_r < R)[:, None] & n_mask[None, :], other=0.0)
    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * som + offs_n[None, :] * son
    o_mask = m_mask[:, None] & n_mask[None, :]
    o = tl.load(o_ptrs, mask=o_mask, other=0.0)
    d = tl.dot(ys, bt, input_precision=DOT_PREC)
    tl.store(o_ptrs, (o.to(tl.float32) + d).to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def expand_tile(
    y, w, rows, m_mask, col_lo, col_hi,
    b_ptr, out_ptr, N, o1, o2, o3, R,
    sbw, sbn, sbr, som, son,
    NS_PAD: tl.constexpr, R_PAD: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """``out[rows, col_lo:col_hi] += y @ B[w, cols, r]ᵀ`` with y's rank rows tied to slices.

    y: [BM, NS_PAD * R_PAD] float32; rank row j belongs to slice j // R_PAD. ALIGNED (every
    slice offset a multiple of BN): each column block takes its slice's R_PAD rank rows
    out of y and meets B[w, block, :R] alone. Otherwise rank rows only meet the columns of
    their own slice through a masked [J, BN] B tile, so unequal slices still share a tile.
    """
    op_ty = b_ptr.dtype.element_ty
    if ALIGNED:
        if NS_PAD == 1:
            y1 = y.to(op_ty)
        else:
            y3 = tl.reshape(y, (y.shape[0], NS_PAD, R_PAD))
            slices = tl.arange(0, NS_PAD)
        for n0 in range(col_lo, col_hi, BN):
            offs_n = n0 + tl.arange(0, BN)
            n_mask = offs_n < col_hi
            if NS_PAD == 1:
                ys = y1
            else:
                s = block_slice(n0, o1, o2, o3)
                ys = tl.sum(tl.where((slices == s)[None, :, None], y3, 0.0), axis=1).to(op_ty)
            add_block(ys, w, rows, m_mask, offs_n, n_mask, b_ptr, out_ptr, R,
                      sbw, sbn, sbr, som, son, R_PAD, DOT_PREC)
    else:
        J: tl.constexpr = NS_PAD * R_PAD
        yc = y.to(op_ty)
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
            b_mask = ((j_slice[:, None] == n_slice[None, :]) & (j_r[:, None] < R)
                      & n_mask[None, :])
            bt = tl.load(b_row[:, None] + offs_n[None, :].to(tl.int64) * sbn, mask=b_mask,
                         other=0.0)
            o_ptrs = out_rows[:, None] + offs_n[None, :] * son
            o_mask = m_mask[:, None] & n_mask[None, :]
            o = tl.load(o_ptrs, mask=o_mask, other=0.0)
            d = tl.dot(yc, bt, input_precision=DOT_PREC)
            tl.store(o_ptrs, (o.to(tl.float32) + d).to(out_ptr.dtype.element_ty), mask=o_mask)
