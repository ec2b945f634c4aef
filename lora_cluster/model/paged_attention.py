"""Attention over the paged KV cache: a fixed-shape decode path and a general path.

Keys of sequence ``b`` are its cache positions ``0 .. context_lens[b] - 1``; its new rows are
the last ``n_b`` of them (the step wrote them to the cache first). Query row ``i`` of the new
rows sits at position ``context_lens[b] - n_b + i`` and sees keys ``j <= that position``
(and ``j > position - window`` with a sliding window).

Shape legend: B sequences, T rows, h query heads (local), g KV heads (local), D head dim,
C gathered context length, P max blocks per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_cluster.model.batch import ForwardBatch


@dataclass(frozen=True)
class PrefillSpan:
    """One multi-row sequence of a general step: rows [row_start, row_end), ``context`` keys."""

    seq: int
    row_start: int
    row_end: int
    context: int


@dataclass(frozen=True)
class AttentionPlan:
    """How one step's rows are attended; built once per forward, shared by every layer.

    decode: every sequence has one row (rows = sequences), no host reads — the capturable path.
    general: ``spans`` are attended one sequence at a time; the single-row sequences
    (``single_rows`` / ``single_seqs``) go through the batched decode kernel together.
    """

    decode: bool
    spans: tuple[PrefillSpan, ...] = ()
    single_rows: torch.Tensor | None = None
    single_seqs: torch.Tensor | None = None
    single_max_context: int = 0


def plan_attention(batch: ForwardBatch) -> AttentionPlan:
    """The decode plan for ``batch.is_decode`` (no host sync), else a general plan (one sync)."""
    if batch.is_decode:
        return AttentionPlan(decode=True)
    starts = batch.query_start_loc.tolist()
    contexts = batch.context_lens.tolist()
    spans, rows, seqs, max_ctx = [], [], [], 0
    for b, ctx in enumerate(contexts):
        lo, hi = starts[b], starts[b + 1]
        if hi - lo == 1:
            rows.append(lo)
            seqs.append(b)
            max_ctx = max(max_ctx, ctx)
        elif hi > lo:
            spans.append(PrefillSpan(b, lo, hi, ctx))
    device = batch.input_ids.device
    return AttentionPlan(
        decode=False, spans=tuple(spans),
        single_rows=torch.tensor(rows, dtype=torch.long, device=device) if rows else None,
        single_seqs=torch.tensor(seqs, dtype=torch.long, device=device) if seqs else None,
        single_max_context=max_ctx,
    )


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
            scale: float) -> torch.Tensor:
    """q [B, M, h, D], k/v [B, C, g, D], allowed [B, M, C] → [B, M, h, D] (GQA: h = g · group)."""
    # A row with no visible key (a padding sequence) would give NaN; let it see key 0 instead.
    allowed = allowed.clone()
    allowed[..., 0] |= ~allowed.any(dim=-1)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=allowed.unsqueeze(1), scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _window_ok(keys: torch.Tensor, query_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    return keys <= query_pos if window is None else (keys <= query_pos) & (
        keys > query_pos - window)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                     max_context_len: int, scale: float, window: int | None) -> torch.Tensor:
    """One query per sequence: q [B, h, D] → [B, h, D].

    Gathers K/V through ``block_tables [B, P]`` up to ``max_context_len`` (a host bound, fixed
    per CUDA-graph bucket) and masks keys at or past ``context_lens [B]``: shapes never depend
    on device values.
    """
    block_size = k_cache.shape[1]
    num_blocks = min(-(-max(max_context_len, 1) // block_size), block_tables.shape[1])
    blocks = block_tables[:, :num_blocks].long()
    batch = q.shape[0]
    k = k_cache[blocks].reshape(batch, num_blocks * block_size, *k_cache.shape[2:])
    v = v_cache[blocks].reshape(batch, num_blocks * block_size, *v_cache.shape[2:])
    keys = torch.arange(k.shape[1], device=q.device)[None, :]
    ctx = context_lens.long()[:, None]
    allowed = _window_ok(keys, ctx - 1, window) & (keys < ctx)
    return _attend(q.unsqueeze(1), k, v, allowed.unsqueeze(1), scale).squeeze(1)


def span_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_table: torch.Tensor, context: int, scale: float,
                   window: int | None) -> torch.Tensor:
    """The new rows of one sequence: q [n, h, D] over its ``context`` cached keys → [n, h, D]."""
    block_size = k_cache.shape[1]
    num_blocks = -(-context // block_size)
    blocks = block_table[:num_blocks].long()
    k = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:context]
    v = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:context]
    n = q.shape[0]
    query_pos = torch.arange(context - n, context, device=q.device)[:, None]
    keys = torch.arange(context, device=q.device)[None, :]
    allowed = _window_ok(keys, query_pos, window)
    return _attend(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), allowed.unsqueeze(0),
                   scale).squeeze(0)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: ForwardBatch, plan: AttentionPlan, scale: float,
                    window: int | None) -> torch.Tensor:
    """q [T, h, D] of the step's rows → attention output [T, h, D] (K/V already cached)."""
    if plan.decode:
        return decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens,
                                batch.max_context_len, scale, window)
    out = torch.zeros_like(q)  # rows of no sequence (padding) stay zero
    if plan.single_rows is not None and plan.single_seqs is not None:
        seqs = plan.single_seqs
        out[plan.single_rows] = decode_attention(
            q.index_select(0, plan.single_rows), k_cache, v_cache,
            batch.block_tables.index_select(0, seqs), batch.context_lens.index_select(0, seqs),
            plan.single_max_context, scale, window)
    for span in plan.spans:
        out[span.row_start:span.row_end] = span_attention(
            q[span.row_start:span.row_end], k_cache, v_cache, batch.block_tables[span.seq],
            span.context, scale, window)
    return out
