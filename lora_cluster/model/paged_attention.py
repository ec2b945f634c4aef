"""Attention over the paged KV cache: a fixed-shape decode path and a general path.

CUDA tensors go to the Triton kernels of ``lora_kernels.paged_attention`` (read up to each
sequence's own length; prefill spans in one launch); other devices use the torch path here
(gather + SDPA), which is the reference the kernels are tested against.
``use_attention_backend("triton")`` forces the kernels (on CPU under TRITON_INTERPRET=1).

Keys of sequence ``b`` are its cache positions ``0 .. context_lens[b] - 1``; its new rows are
the last ``n_b`` of them (the step wrote them to the cache first). Query row ``i`` of the new
rows sits at position ``context_lens[b] - n_b + i`` and sees keys ``j <= that position``
(and ``j > position - window`` with a sliding window).

Shape legend: B sequences, T rows, h query heads (local), g KV heads (local), D head dim,
C gathered context length, P max blocks per sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_cluster.errors import ConfigError
from lora_cluster.model.batch import ForwardBatch

ATTENTION_BACKENDS = ("auto", "torch", "triton")
_backend = "auto"


def set_attention_backend(name: str) -> None:
    """"auto" (Triton for CUDA tensors, torch otherwise), "torch" or "triton" (always)."""
    global _backend
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}",
                          field="attention_backend")
    _backend = name


@contextmanager
def use_attention_backend(name: str) -> Iterator[None]:
    """Run a block under another attention backend, restoring the previous one after."""
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def _use_triton(t: torch.Tensor) -> bool:
    return _backend == "triton" or (_backend == "auto" and t.is_cuda)


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
    general: ``spans`` (multi-row sequences) are attended together — ``span_table`` [n, 4]
    int64 on the device holds (seq, row_start, rows, context) per span for the one-launch
    kernel, ``max_span_rows`` bounds its grid; the single-row sequences (``single_rows`` /
    ``single_seqs``) go through the batched decode kernel together; rows from
    ``covered_rows`` on belong to no sequence (padding) and come out zero.
    static (from ``ForwardBatch.span_table``): every sequence is a span (single rows too),
    ``spans`` is empty (no host copy of the table) and ``covered_rows`` 0 — every row is
    zeroed before the kernel writes the spans' rows — so the plan holds no device value.
    """

    decode: bool
    spans: tuple[PrefillSpan, ...] = ()
    single_rows: torch.Tensor | None = None
    single_seqs: torch.Tensor | None = None
    single_max_context: int = 0
    span_table: torch.Tensor | None = None
    max_span_rows: int = 0
    covered_rows: int = 0


def plan_attention(batch: ForwardBatch) -> AttentionPlan:
    """The decode plan for ``batch.is_decode`` (no host sync), the static plan of a batch
    with a ``span_table`` (no host sync: the prefill graphs), else a general plan (one sync,
    one host→device copy)."""
    if batch.is_decode:
        return AttentionPlan(decode=True)
    if batch.span_table is not None:
        return AttentionPlan(decode=False, span_table=batch.span_table,
                             max_span_rows=batch.max_span_rows, covered_rows=0)
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
    table = [v for sp in spans for v in (sp.seq, sp.row_start, sp.row_end - sp.row_start,
                                         sp.context)]
    packed = torch.tensor(rows + seqs + table, dtype=torch.long).to(batch.input_ids.device)
    n = len(rows)
    return AttentionPlan(
        decode=False, spans=tuple(spans),
        single_rows=packed[:n] if rows else None,
        single_seqs=packed[n:2 * n] if rows else None,
        single_max_context=max_ctx,
        span_table=packed[2 * n:].view(len(spans), 4) if spans else None,
        max_span_rows=max((sp.row_end - sp.row_start for sp in spans), default=0),
        covered_rows=starts[-1] if starts else 0,
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

    ``max_context_len`` is a host bound on ``context_lens [B]`` (fixed per CUDA-graph bucket):
    shapes never depend on device values. The Triton kernel reads each sequence's blocks
    (``block_tables [B, P]``) only up to its own length; the torch path gathers up to the
    bound and masks keys at or past ``context_lens``.
    """
    if _use_triton(q):
        from lora_kernels import paged_attention as kernels

        return kernels.paged_decode(q, k_cache, v_cache, block_tables, context_lens,
                                    max_context_len, scale, window)
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
    if _use_triton(q):
        from lora_kernels import paged_attention as kernels

        span = torch.tensor([[0, 0, q.shape[0], context]], dtype=torch.long).to(q.device)
        return kernels.paged_prefill(q, k_cache, v_cache, block_table[None], span, q.shape[0],
                                     scale, window)
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
    if _use_triton(q):
        return _triton_general(q, k_cache, v_cache, batch, plan, scale, window,
                               torch.empty_like(q))
    out = torch.zeros_like(q)  # rows of no sequence (padding) stay zero
    if plan.single_rows is not None and plan.single_seqs is not None:
        seqs = plan.single_seqs
        out[plan.single_rows] = decode_attention(
            q.index_select(0, plan.single_rows), k_cache, v_cache,
            batch.block_tables.index_select(0, seqs), batch.context_lens.index_select(0, seqs),
            plan.single_max_context, scale, window)
    for span in plan.spans or _table_spans(plan.span_table):
        out[span.row_start:span.row_end] = span_attention(
            q[span.row_start:span.row_end], k_cache, v_cache, batch.block_tables[span.seq],
            span.context, scale, window)
    return out


def _table_spans(table: torch.Tensor | None) -> list[PrefillSpan]:
    """The non-empty spans of a static plan's table (a host read: the torch reference path
    only; the Triton path reads the table on the device)."""
    if table is None:
        return []
    return [PrefillSpan(b, r, r + n, c) for b, r, n, c in table.tolist() if n > 0]


def _triton_general(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: ForwardBatch, plan: AttentionPlan, scale: float, window: int | None,
                    out: torch.Tensor) -> torch.Tensor:
    """A general step in two launches (singles through decode, spans through prefill) into
    ``out`` [T, h, D], every row written (padding rows zero)."""
    from lora_kernels import paged_attention as kernels

    if plan.covered_rows < out.shape[0]:
        out[plan.covered_rows:].zero_()
    if plan.single_rows is not None and plan.single_seqs is not None:
        kernels.paged_decode(q, k_cache, v_cache, batch.block_tables, batch.context_lens,
                             plan.single_max_context, scale, window, out=out,
                             rows=plan.single_rows, seqs=plan.single_seqs)
    if plan.span_table is not None:
        kernels.paged_prefill(q, k_cache, v_cache, batch.block_tables, plan.span_table,
                              plan.max_span_rows, scale, window, out=out)
    return out
