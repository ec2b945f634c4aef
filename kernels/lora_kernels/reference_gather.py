"""Row-gather paths of the torch reference: each row's own weights, one batched matmul.

Cost follows rows × floats gathered per row, whatever the number of distinct entries; rows
are taken in chunks (``reference_plan.row_chunks``) so prefill-sized batches stay bounded in
memory. Every function serves the rows of a ``RowPlan`` whose path is "gather"; rows without
an entry are never read or written. Semantics are those of ``reference``'s public ops.

Shape legend: M rows, c rows of one chunk, n slices, W entries, R rank, K input width,
N output width, H hidden, V vocab, E experts, F expert output width, G expert input width.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch

from lora_kernels.reference_plan import RowPlan, row_chunks

Rows = torch.Tensor | slice | None  # row ids, a range of rows, or every row


def _chunk(plan: RowPlan, lo: int, hi: int) -> tuple[Rows, torch.Tensor]:
    """(rows, entries) of chunk [lo, hi) of the plan's rows; a whole plan is not sliced."""
    if lo == 0 and hi == plan.entries.numel():
        return plan.rows, plan.entries
    rows = slice(lo, hi) if plan.rows is None else plan.rows[lo:hi]
    return rows, plan.entries[lo:hi]


def _take(t: torch.Tensor, rows: Rows, dim: int = 0) -> torch.Tensor:
    if rows is None:
        return t
    if isinstance(rows, slice):
        return t.narrow(dim, rows.start, rows.stop - rows.start)
    return t.index_select(dim, rows)


def _put(out: torch.Tensor, rows: Rows, value: torch.Tensor, dim: int = 0) -> None:
    if rows is None:
        out.copy_(value)
    elif isinstance(rows, slice):
        out.narrow(dim, rows.start, rows.stop - rows.start).copy_(value)
    else:
        out.index_copy_(dim, rows, value)


def _add(out: torch.Tensor, rows: Rows, delta: torch.Tensor) -> None:
    delta = delta.to(out.dtype)
    if rows is None:
        out.add_(delta)
    elif isinstance(rows, slice):
        out[rows].add_(delta)
    else:
        out.index_add_(0, rows, delta)


@functools.lru_cache(maxsize=64)
def column_picks(slice_offsets: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    """[N] int64 ``j * n + slice(j)``: where column j's value sits in a flat [N, n] product.

    None for a single slice. Cached: the offsets of a layer never change.
    """
    n = len(slice_offsets) - 1
    if n == 1:
        return None
    widths = torch.tensor([hi - lo for lo, hi in itertools.pairwise(slice_offsets)])
    cols = torch.repeat_interleave(torch.arange(n), widths)
    return (torch.arange(slice_offsets[-1]) * n + cols).to(device)


def _expand_rows(y: torch.Tensor, lora_b: torch.Tensor, entries: torch.Tensor,
                 picks: torch.Tensor | None) -> torch.Tensor:
    """[c, N] float32 deltas from y [c, n, R] float32 and each row's B [c, N, R]."""
    b = lora_b.index_select(0, entries).float()
    # One bmm for all slices (n× the tiny flops, far fewer ops), then keep column j's slice.
    full = torch.bmm(b, y.transpose(1, 2))  # [c, N, n]
    if picks is None:
        return full.squeeze(2)
    return full.view(full.shape[0], -1).index_select(1, picks)


def _shrink_rows(x: torch.Tensor, lora_a: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """y [c, n, R] float32 from x [c, K] and each row's A [c, n, R, K]."""
    n, _, r, k = lora_a.shape
    a = lora_a.transpose(0, 1).index_select(0, entries).float().reshape(-1, n * r, k)
    return torch.bmm(a, x.float().unsqueeze(2)).view(-1, n, r)


def linear(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
           plan: RowPlan, slice_offsets: Sequence[int]) -> None:
    """``out += expand(shrink(x))`` over the plan's rows (out [M, N]; x [M, K])."""
    n, _, r, k = lora_a.shape
    picks = column_picks(tuple(slice_offsets), out.device)
    for lo, hi in row_chunks(plan.entries.numel(), n * r * k + out.shape[1] * (r + n)):
        rows, entries = _chunk(plan, lo, hi)
        y = _shrink_rows(_take(x, rows), lora_a, entries)
        _add(out, rows, _expand_rows(y, lora_b, entries, picks))


def shrink(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, plan: RowPlan) -> None:
    """Fill y [n, M, R] (zeros elsewhere) with x @ A[entry].T over the plan's rows."""
    n, _, r, k = lora_a.shape
    for lo, hi in row_chunks(plan.entries.numel(), n * r * k):
        rows, entries = _chunk(plan, lo, hi)
        _put(y, rows, _shrink_rows(_take(x, rows), lora_a, entries).transpose(0, 1), dim=1)


def expand(out: torch.Tensor, y: torch.Tensor, lora_b: torch.Tensor, plan: RowPlan,
           slice_offsets: Sequence[int]) -> None:
    """``out[m, slice s] += y[s, m] @ B[entry, slice s].T`` over the plan's rows."""
    n, r = y.shape[0], y.shape[2]
    picks = column_picks(tuple(slice_offsets), out.device)
    for lo, hi in row_chunks(plan.entries.numel(), out.shape[1] * (r + n)):
        rows, entries = _chunk(plan, lo, hi)
        yc = _take(y, rows, dim=1).float().transpose(0, 1)  # [c, n, R]
        _add(out, rows, _expand_rows(yc, lora_b, entries, picks))


def embedding(out: torch.Tensor, token_ids: torch.Tensor, lora_a: torch.Tensor,
              lora_b: torch.Tensor, plan: RowPlan) -> None:
    """``out[m] += A[entry, token] @ B[entry].T`` over the plan's rows (ids already in range)."""
    h, r = lora_b.shape[1], lora_b.shape[2]
    for lo, hi in row_chunks(plan.entries.numel(), h * r + r):
        rows, entries = _chunk(plan, lo, hi)
        a = lora_a[entries, _take(token_ids, rows).long()].float()  # [c, R]
        b = lora_b.index_select(0, entries).float()  # [c, H, R]
        _add(out, rows, torch.bmm(b, a.unsqueeze(2)).squeeze(2))


def experts(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, plan: RowPlan) -> None:
    """``out[m] = x[m] @ weight[entry].T`` (float32) over the plan's rows.

    Args: out [M, F] float32; x [M, G]; weight [E, F, G]; the plan's entries are experts.
    """
    f, g = weight.shape[1], weight.shape[2]
    for lo, hi in row_chunks(plan.entries.numel(), f * g):
        rows, entries = _chunk(plan, lo, hi)
        w = weight.index_select(0, entries).float()  # [c, F, G]
        _put(out, rows, torch.bmm(w, _take(x, rows).float().unsqueeze(2)).squeeze(2))
