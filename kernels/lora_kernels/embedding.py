"""Triton LoRA embedding: gather each row's A row by token id, then expand (one launch).

Shape legend: M rows, W weight entries, V vocab (this shard's), R rank, H hidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels import config as cfg
from lora_kernels.meta import LoRAMeta
from lora_kernels.triton_common import expand_tile, find_tile


@triton.jit
def embedding_kernel(
    ids_ptr, a_ptr, b_ptr, out_ptr,
    sorted_rows, seg_counts, seg_starts, num_entries, M,
    V, H, R, cols_per_prog,
    saw, sav, sar, sbw, sbn, sbr, som, son,
    R_PAD: tl.constexpr, W_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One program: a row tile of one entry × a column range of H."""
    w, pos0, rows_left, live = find_tile(
        tl.program_id(0), seg_counts, seg_starts, num_entries, M, W_PAD, BM, False)
    if live:
        col_lo = tl.program_id(1) * cols_per_prog
        col_hi = tl.minimum(col_lo + cols_per_prog, H)
        offs_m = tl.arange(0, BM)
        m_mask = offs_m < rows_left
        rows = tl.load(sorted_rows + pos0 + offs_m, mask=m_mask, other=0)
        tok = tl.load(ids_ptr + rows, mask=m_mask, other=-1)
        inside = m_mask & (tok >= 0) & (tok < V)
        offs_r = tl.arange(0, R_PAD)
        y_ptrs = (a_ptr + w.to(tl.int64) * saw + tok.to(tl.int64)[:, None] * sav
                  + offs_r[None, :] * sar)
        y = tl.load(y_ptrs, mask=inside[:, None] & (offs_r[None, :] < R), other=0.0)
        # Rows whose token lies outside this shard add nothing: drop them from the store too.
        expand_tile(y.to(tl.float32), w, rows, inside, col_lo, col_hi, b_ptr,
                    out_ptr, H, H, H, H, R, sbw, sbn, sbr, som, son, 1, R_PAD, BN, DOT_PREC,
                    True)


def lora_embedding(out: torch.Tensor, token_ids: torch.Tensor, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, meta: LoRAMeta) -> None:
    """LoRA on an embedding table, in place.

    Semantics:
        for m with w = meta.indices[m] >= 0 and 0 <= token_ids[m] < V:
            out[m] += lora_a[w, token_ids[m]] @ lora_b[w].T
    Args: out [M, H]; token_ids [M] (ids local to this vocab shard, others ignored);
        lora_a [W, V, R]; lora_b [W, H, R].
    """
    m, hidden = out.shape
    w_count, vocab, rank = lora_a.shape
    if lora_b.shape != (w_count, hidden, rank) or token_ids.shape != (m,):
        raise ValueError(f"expected lora_b [{w_count}, {hidden}, {rank}] and token_ids [{m}], "
                         f"got {tuple(lora_b.shape)} and {tuple(token_ids.shape)}")
    if w_count != meta.num_weights or m != meta.num_rows:
        raise ValueError(f"meta covers {meta.num_rows} rows × {meta.num_weights} entries, "
                         f"the op {m} × {w_count}")
    if m == 0:
        return
    bm = 16 if m <= 64 else 64
    bn = 64 if m <= 64 else 128
    tiles = cfg.tile_bound(m, w_count, bm)
    splits = max(1, min(-(-hidden // bn), -(-2 * cfg.NUM_SMS_DEFAULT // tiles)))
    per = cfg.round_up(cfg.cdiv(hidden, splits), bn)
    embedding_kernel[(tiles, -(-hidden // per))](
        token_ids, lora_a, lora_b, out,
        meta.sorted_rows, meta.seg_counts, meta.seg_starts, w_count, m,
        vocab, hidden, rank, per,
        *lora_a.stride(), *lora_b.stride(), *out.stride(),
        R_PAD=cfg.rank_pad(rank), W_PAD=cfg.next_pow2(w_count), BM=bm, BN=bn,
        DOT_PREC=cfg.dot_precision(out.dtype), num_warps=4,
    )
