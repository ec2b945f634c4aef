"""How the torch reference walks one call's rows: per weight entry (loop) or per row (gather).

The loop runs one GEMM per distinct entry: cheap when few entries hold many rows each, but
every entry costs a fixed handful of small ops, so a decode batch over 32 adapters pays 32×.
The gather path copies each row's own weights (``A[entry]``, ``B[entry]``) and runs one
batched matmul: its cost follows the number of rows and the floats gathered per row, never
the number of entries. ``plan_rows`` picks the cheaper by a cost model measured on CPU (one
torch thread, see ``_US_PER_GROUP`` / ``_US_PER_KFLOAT``) and reads the entry counts back
to the host once (a sync; the reference serves CPU, where that is free, and tests on CUDA).

Shape legend: M rows, M' rows with an entry (not -1), D distinct entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Path = Literal["auto", "loop", "gather"]
PATHS: tuple[str, ...] = ("auto", "loop", "gather")

# Measured on a 2-core Xeon VM, one torch thread, float32, tiny Qwen3-MoE shapes (q/k/v,
# o, embedding, experts; M 8 … 2048, D 1 … 64): a loop group costs fixed op overhead per
# entry (~50 µs for a LoRA linear's shrink + expand, ~20 µs for an embedding's gather +
# GEMM + index_add, ~30 µs for one expert GEMM); the gather path ~0.6 µs per thousand floats
# it touches per row and ~10 µs more fixed overhead than the loop.
LINEAR_GROUP_US = 50.0
EMBEDDING_GROUP_US = 20.0
EXPERT_GROUP_US = 30.0
_US_PER_KFLOAT = 0.6
_US_GATHER_EXTRA = 10.0
# Largest gather working set per chunk of rows (floats): bounds memory for prefill-sized M.
GATHER_CHUNK_FLOATS = 1 << 21


@dataclass(frozen=True)
class RowPlan:
    """The rows of one call and the path that serves them.

    path:    "loop" or "gather" ("gather" with no rows when no row has an entry)
    rows:    [M'] int64 row ids that have an entry, or None when every row has one
    entries: [M'] int64 entry of each of those rows (in ``rows`` order)
    groups:  (entry, [rows] int64) per distinct entry, for the loop path only
    """

    path: str
    rows: torch.Tensor | None
    entries: torch.Tensor
    groups: tuple[tuple[int, torch.Tensor], ...] = ()

    @property
    def empty(self) -> bool:
        return self.entries.numel() == 0


def _check(path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def use_gather(rows: int, entries: int, row_floats: int, group_us: float) -> bool:
    """Whether gathering ``row_floats`` floats per row beats ``group_us`` per distinct entry."""
    gather_us = _US_GATHER_EXTRA + rows * row_floats * _US_PER_KFLOAT / 1000.0
    return gather_us < entries * group_us


def plan_rows(indices: torch.Tensor, row_floats: int, path: str = "auto", *,
              group_us: float = LINEAR_GROUP_US, valid: torch.Tensor | None = None) -> RowPlan:
    """Plan a call over ``indices`` [M] (-1 = no entry); ``valid`` [M] bool masks more rows out.

    ``row_floats``: floats the gather path touches per row; ``group_us``: the loop's fixed
    cost per distinct entry (the two sides of the cost model).
    """
    _check(path)
    idx = indices.reshape(-1).long()
    if valid is not None:
        idx = torch.where(valid, idx, torch.full_like(idx, -1))
    uniq, counts = torch.unique(idx, sorted=True, return_counts=True)
    entries_host: list[int] = uniq.tolist()
    sizes: list[int] = counts.tolist()
    none_rows = sizes[0] if entries_host and entries_host[0] < 0 else 0
    distinct = len(entries_host) - (1 if none_rows else 0)
    live = idx.numel() - none_rows
    if live == 0:
        return RowPlan("gather", None, idx[:0])
    if path == "auto":
        path = "gather" if use_gather(live, distinct, row_floats, group_us) else "loop"
    if path == "gather":
        if none_rows == 0:
            return RowPlan("gather", None, idx)
        live_rows = torch.nonzero(idx >= 0, as_tuple=True)[0]
        return RowPlan("gather", live_rows, idx.index_select(0, live_rows))
    # Loop: one stable sort groups the rows of each entry (no pass per entry).
    order = torch.argsort(idx, stable=True)
    parts = torch.split(order, sizes)
    groups = tuple((w, part) for w, part in zip(entries_host, parts, strict=True) if w >= 0)
    rows = None if none_rows == 0 else order[none_rows:]
    return RowPlan("loop", rows, idx if rows is None else idx.index_select(0, rows), groups)


def row_chunks(count: int, row_floats: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges whose gathered weights stay under ``GATHER_CHUNK_FLOATS``."""
    step = max(1, GATHER_CHUNK_FLOATS // max(1, row_floats))
    return [(lo, min(count, lo + step)) for lo in range(0, count, step)]
