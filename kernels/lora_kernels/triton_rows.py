"""Per-row LoRA linear kernels for a handful of rows: no sort lookup, no tensor-core tiles.

Each program serves one row: it reads the row's weight entry straight from the unsorted
``indices`` and, in parallel, the row's x chunk, so the only dependent load before the
weights is that one index (the sorted path chains counts → row ids → x). Products are
summed in float32 on the CUDA cores (a one-row dot gains nothing from tensor cores). A row
reads its adapter's weights by itself, so this pays only while rows are few: the launcher's
caller (``config.choose_linear``) picks it for tiny steps.

Shape legend as in ``triton_linear``: M rows, n slices (≤ 4), R rank, K input width,
N output width; rank rows j = s·R_PAD + r.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lora_kernels.triton_common import block_slice


@triton.jit
def shrink_rows_kernel(
    x_ptr, a_ptr, y_ptr, indices, K, R, NS, k_per_prog,
    sxm, sxk, sas, saw, sar, sak, syk, sys, sym,
    NS_PAD: tl.constexpr, R_PAD: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program: row m × a K chunk; writes its partial y[ks, s, m, r] (float32).

    Rows with entry -1 write nothing (the expand skips them). PDL: let the expand launch
    now; it waits for this grid itself before reading y.
    """
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    m = tl.program_id(0)
    ks = tl.program_id(1)
    w = tl.load(indices + m)
    J: tl.constexpr = NS_PAD * R_PAD
    offs_j = tl.arange(0, J)
    j_slice = offs_j // R_PAD
    j_r = offs_j % R_PAD
    need = (j_slice < NS) & (j_r < tl.where(w >= 0, R, 0))
    a_rows = a_ptr + j_slice.to(tl.int64) * sas + w.to(tl.int64) * saw + j_r * sar
    x_row = x_ptr + m.to(tl.int64) * sxm
    k_lo = ks * k_per_prog
    k_hi = tl.minimum(k_lo + k_per_prog, K)
    acc = tl.zeros((J,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        offs_k = k0 + tl.arange(0, BK)
        if EVEN_K:
            xk = tl.load(x_row + offs_k * sxk)
            at = tl.load(a_rows[:, None] + offs_k[None, :] * sak, mask=need[:, None], other=0.0)
        else:
            k_mask = offs_k < k_hi
            xk = tl.load(x_row + offs_k * sxk, mask=k_mask, other=0.0)
            at = tl.load(a_rows[:, None] + offs_k[None, :] * sak,
                         mask=need[:, None] & k_mask[None, :], other=0.0)
        acc += tl.sum(at.to(tl.float32) * xk.to(tl.float32)[None, :], axis=1)
    if w >= 0:
        y_ptrs = y_ptr + ks * syk + j_slice * sys + m.to(tl.int64) * sym + j_r
        tl.store(y_ptrs, acc, mask=(j_slice < NS) & (j_r < R))


@triton.jit
def expand_rows_kernel(
    y_ptr, b_ptr, out_ptr, indices, N, o1, o2, o3, R, NS, SPLIT_K,
    syk, sys, sym, sbw, sbn, sbr, som, son,
    NS_PAD: tl.constexpr, R_PAD: tl.constexpr, BN: tl.constexpr, ALIGNED: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program: row m × one BN column block; sums the shrink's K partials.

    The row's entry, its B block and output block are loaded before the PDL wait (the
    shrink writes only y), so after it the path is partials → multiply-add → store.
    ALIGNED (no block straddles slices): the block's slice alone; otherwise each column
    takes the rank vector of its own slice.
    """
    m = tl.program_id(0)
    n0 = tl.program_id(1) * BN
    w = tl.load(indices + m)
    offs_n = n0 + tl.arange(0, BN)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    n_mask = offs_n < tl.where(w >= 0, N, 0)
    bt = tl.load(b_ptr + w.to(tl.int64) * sbw + offs_n.to(tl.int64)[:, None] * sbn
                 + offs_r[None, :] * sbr, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
    o_ptrs = out_ptr + m.to(tl.int64) * som + offs_n * son
    o = tl.load(o_ptrs, mask=n_mask, other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    if w >= 0:
        y_row = y_ptr + m.to(tl.int64) * sym
        if ALIGNED:
            s = block_slice(n0, o1, o2, o3)
            yv = tl.zeros((R_PAD,), dtype=tl.float32)
            for ks in range(0, SPLIT_K):
                yv += tl.load(y_row + ks * syk + s * sys + offs_r, mask=r_mask, other=0.0)
            yb = yv[None, :]
        else:
            offs_s = tl.arange(0, NS_PAD)
            y_mask = (offs_s < NS)[:, None] & r_mask[None, :]
            ys = tl.zeros((NS_PAD, R_PAD), dtype=tl.float32)
            for ks in range(0, SPLIT_K):
                ys += tl.load(y_row + ks * syk + offs_s[:, None] * sys + offs_r[None, :],
                              mask=y_mask, other=0.0)
            n_slice = ((offs_n >= o1).to(tl.int32) + (offs_n >= o2).to(tl.int32)
                       + (offs_n >= o3).to(tl.int32))
            yb = tl.zeros((BN, R_PAD), dtype=tl.float32)
            for s in tl.static_range(NS_PAD):
                y_s = tl.sum(tl.where((offs_s == s)[:, None], ys, 0.0), axis=0)
                yb += tl.where((n_slice == s)[:, None], y_s[None, :], 0.0)
        # The rank vector goes through the weights' dtype, as in the tiled expand's dot.
        yq = yb.to(b_ptr.dtype.element_ty).to(tl.float32)
        d = tl.sum(bt.to(tl.float32) * yq, axis=1)
        tl.store(o_ptrs, (o.to(tl.float32) + d).to(out_ptr.dtype.element_ty), mask=n_mask)
