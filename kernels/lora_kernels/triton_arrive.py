"""Single-launch split-K LoRA linear: the last K program of each tile expands it.

Shape legend: M rows, W weight entries, n slices (≤ 4), R rank, K input width, N output
width, G column groups, KP K programs. Rank rows j = s·R_PAD + r stack the slices' ranks.

Per (row tile, column group) there is one int32 arrival counter. Every K program writes its
float32 partial shrink to its own workspace slot, then increments the counter with
acquire-release semantics at GPU scope. The program that sees KP - 1 knows every partial of
its group is visible: it sums them in K order (never its registers first, so the sum is the
same whichever program came last), expands, and stores 0 back into the counter, leaving it
ready for the next launch or graph replay without a memset.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lora_kernels.triton_common import expand_tile, find_tile
from lora_kernels.triton_linear import _rank_rows, _shrink_acc


@triton.jit
def split_arrive_kernel(
    x_ptr, a_ptr, b_ptr, out_ptr, y_ptr, counters,
    sorted_rows, seg_counts, seg_starts, num_entries, M,
    K, N, o1, o2, o3, R, NS, k_per_prog, cols_per_prog,
    sxm, sxk, sas, saw, sar, sak, sbw, sbn, sbr, som, son, syg, syk, sys, sym,
    NS_PAD: tl.constexpr, R_PAD: tl.constexpr, W_PAD: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, EVEN_K: tl.constexpr,
    ALIGNED: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program: (row tile, column group g, K chunk ks) on a grid [tiles, G, KP].

    y: float32 partials [G, KP, n, M, R] indexed by sorted position; a group writes and
    reads only the rank rows of the slices its columns touch. counters: int32 [tiles · G],
    zero before the launch and zero after it.
    """
    tile = tl.program_id(0)
    w, pos0, rows_left, live = find_tile(
        tile, seg_counts, seg_starts, num_entries, M, W_PAD, BM, False)
    if live:
        g = tl.program_id(1)
        ks = tl.program_id(2)
        k_progs = tl.num_programs(2)
        col_lo = g * cols_per_prog
        col_hi = tl.minimum(col_lo + cols_per_prog, N)
        offs_m = tl.arange(0, BM)
        m_mask = offs_m < rows_left
        pos = pos0 + offs_m
        rows = tl.load(sorted_rows + pos, mask=m_mask, other=0)
        a_rows, need = _rank_rows(w, col_lo, col_hi, N, o1, o2, o3, R, NS, a_ptr, sas, saw, sar,
                                  NS_PAD, R_PAD)
        k_lo = ks * k_per_prog
        k_hi = tl.minimum(k_lo + k_per_prog, K)
        J: tl.constexpr = NS_PAD * R_PAD
        acc = _shrink_acc(x_ptr + rows.to(tl.int64) * sxm, m_mask, a_rows, need, k_lo, k_hi,
                          sxk, sak, BM, J, BK, EVEN_K, DOT_PREC)
        offs_j = tl.arange(0, J)
        y_tile = (y_ptr + g.to(tl.int64) * syg + (offs_j // R_PAD)[None, :] * sys
                  + pos.to(tl.int64)[:, None] * sym + (offs_j % R_PAD)[None, :])
        y_mask = m_mask[:, None] & need[None, :]
        tl.store(y_tile + ks * syk, acc, mask=y_mask)
        # Every thread's partial is written before the one thread holding the atomic
        # releases it (CTA barrier, then a GPU-scope release: cumulative).
        tl.debug_barrier()
        counter = counters + tile * tl.num_programs(1) + g
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == k_progs - 1:
            # Acquired: the other programs' partials are visible. Read them from L2 (.cg):
            # this SM's L1 must not serve a line it cached before the acquire.
            total = tl.zeros((BM, J), dtype=tl.float32)
            for kk in range(0, k_progs):
                total += tl.load(y_tile + kk * syk, mask=y_mask, other=0.0, cache_modifier=".cg")
            expand_tile(total, w, rows, m_mask, col_lo, col_hi, b_ptr, out_ptr, N, o1, o2, o3,
                        R, sbw, sbn, sbr, som, son, NS_PAD, R_PAD, BN, DOT_PREC, ALIGNED)
            # All KP programs have arrived and none touches the counter again in this launch.
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
