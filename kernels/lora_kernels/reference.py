"""Float32 torch reference of the Punica-style LoRA ops; the CPU path of the engine.

Every op takes weight-entry indices per row (-1 = no adapter) and stacked adapter buffers.
Adapter scaling is folded into ``lora_b`` when an adapter is placed in a slot, so the ops
carry no scale. Ranks smaller than the buffer's R are zero-padded, which adds nothing.

Each call serves its rows by one of two paths (``reference_plan``): a loop of one GEMM per
distinct entry, or a row gather with one batched matmul whose cost does not grow with the
number of distinct entries (``reference_gather``). ``path="auto"`` picks the cheaper from a
measured cost model; tests force either. Both compute the same float32 sums.

Shape legend: M rows, W weight entries, n slices, R rank, K input width, N output width,
E local experts, H hidden, I expert intermediate, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora_kernels import reference_gather as gather
from lora_kernels.reference_plan import (
    EMBEDDING_GROUP_US,
    EXPERT_GROUP_US,
    LINEAR_GROUP_US,
    PATHS,
    Path,
    RowPlan,
    plan_rows,
)

__all__ = ["PATHS", "MoELoRA", "Path", "fused_moe", "lora_embedding", "lora_expand",
           "lora_linear", "lora_shrink"]


def _linear_floats(lora_a: torch.Tensor, n_out: int) -> int:
    """Floats the gather path touches per row of a linear (A rows, B rows, bmm output)."""
    n, _, r, k = lora_a.shape
    return n * r * k + n_out * (r + n)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor, *,
                path: Path = "auto") -> torch.Tensor:
    """Shrink every slice at once.

    Semantics:
        for s in range(n): for m in range(M):
            y[s, m, :] = x[m] @ lora_a[s, indices[m]].T   if indices[m] >= 0 else 0
    Args: x [M, K]; lora_a [n, W, R, K]; indices [M]. Returns y [n, M, R] float32.
    """
    n, _, r, k = lora_a.shape
    y = torch.zeros(n, x.shape[0], r, dtype=torch.float32, device=x.device)
    plan = plan_rows(indices, n * r * k, path)
    if plan.path == "gather":
        gather.shrink(y, x, lora_a, plan)
        return y
    for w, rows in plan.groups:
        xs = x.index_select(0, rows).float()
        y[:, rows] = torch.einsum("mk,srk->smr", xs, lora_a[:, w].float())
    return y


def _expand_loop(out: torch.Tensor, y: torch.Tensor, lora_b: torch.Tensor, plan: RowPlan,
                 slice_offsets: Sequence[int]) -> None:
    n = y.shape[0]
    for w, rows in plan.groups:
        b = lora_b[w].float()
        ys = y.index_select(1, rows).float()
        delta = torch.cat(
            [ys[s] @ b[slice_offsets[s]:slice_offsets[s + 1]].T for s in range(n)], dim=1)
        out.index_add_(0, rows, delta.to(out.dtype))


def lora_expand(
    out: torch.Tensor,
    y: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    slice_offsets: Sequence[int],
    *,
    path: Path = "auto",
) -> None:
    """Expand each slice into its column range of ``out``, in place.

    Semantics:
        for s in range(n): lo, hi = slice_offsets[s], slice_offsets[s + 1]
            for m with indices[m] >= 0:
                out[m, lo:hi] += y[s, m] @ lora_b[indices[m], lo:hi].T
    Args: out [M, N]; y [n, M, R]; lora_b [W, N, R]; slice_offsets: n + 1 ints, last == N.
    """
    n, r = y.shape[0], y.shape[2]
    assert len(slice_offsets) == n + 1 and slice_offsets[-1] == out.shape[1]
    plan = plan_rows(indices, out.shape[1] * (r + n), path)
    if plan.path == "gather":
        gather.expand(out, y, lora_b, plan, slice_offsets)
    else:
        _expand_loop(out, y, lora_b, plan, slice_offsets)


def _linear(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
            plan: RowPlan, slice_offsets: Sequence[int]) -> None:
    assert len(slice_offsets) == lora_a.shape[0] + 1 and slice_offsets[-1] == out.shape[1]
    if plan.path == "gather":
        gather.linear(out, x, lora_a, lora_b, plan, slice_offsets)
        return
    y = torch.zeros(lora_a.shape[0], x.shape[0], lora_a.shape[2], dtype=torch.float32,
                    device=x.device)
    for w, rows in plan.groups:
        y[:, rows] = torch.einsum("mk,srk->smr", x.index_select(0, rows).float(),
                                  lora_a[:, w].float())
    _expand_loop(out, y, lora_b, plan, slice_offsets)


def lora_linear(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    slice_offsets: Sequence[int],
    *,
    path: Path = "auto",
) -> None:
    """``out += expand(shrink(x))``: the whole LoRA delta of one (possibly multi-slice) linear."""
    plan = plan_rows(indices, _linear_floats(lora_a, out.shape[1]), path)
    _linear(out, x, lora_a, lora_b, plan, slice_offsets)


def lora_embedding(
    out: torch.Tensor,
    token_ids: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    *,
    path: Path = "auto",
) -> None:
    """LoRA on an embedding table, in place.

    Semantics:
        for m with indices[m] >= 0:
            out[m] += lora_a[indices[m], token_ids[m]] @ lora_b[indices[m]].T
    Args: out [M, H]; token_ids [M]; lora_a [W, V, R] (rows gathered by token id);
        lora_b [W, H, R]; indices [M]. Token ids outside [0, V) contribute nothing (the
        vocab-parallel caller passes ids local to its shard, -1 for others').
    """
    vocab = lora_a.shape[1]
    inside = (token_ids >= 0) & (token_ids < vocab)
    plan = plan_rows(indices, lora_b.shape[1] * lora_b.shape[2], path,
                     group_us=EMBEDDING_GROUP_US, valid=inside)
    if plan.path == "gather":
        gather.embedding(out, token_ids, lora_a, lora_b, plan)
        return
    for w, rows in plan.groups:
        ids = token_ids.index_select(0, rows).long()
        delta = lora_a[w].float().index_select(0, ids) @ lora_b[w].float().T
        out.index_add_(0, rows, delta.to(out.dtype))


def _experts(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, plan: RowPlan) -> None:
    """``out[m] = x[m] @ weight[entry].T`` for every row (out [M, F] float32; weight [E, F, G])."""
    if plan.path == "gather":
        gather.experts(out, x, weight, plan)
        return
    for e, rows in plan.groups:
        out[rows] = x.index_select(0, rows).float() @ weight[e].float().T


def fused_moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_map: torch.Tensor,
    lora: MoELoRA | None = None,
    row_slots: torch.Tensor | None = None,
    *,
    path: Path = "auto",
) -> torch.Tensor:
    """SwiGLU mixture of the *local* experts, with each row's expert LoRA deltas.

    Semantics:
        out = zeros(T, H)
        for t, k: e = expert_map[topk_ids[t, k]]; skip if e < 0 (expert lives on another rank)
            w = row_slots[t] * E + e if lora and row_slots[t] >= 0 else -1
            gate_up = x[t] @ w13[e].T (+ lora_linear(a13, b13, w, slices [0, I, 2I]))
            h = silu(gate_up[:I]) * gate_up[I:]
            down = h @ w2[e].T (+ lora_linear(a2, b2, w, slices [0, H]))
            out[t] += topk_weights[t, k] * down
    Args: x [T, H]; topk_weights [T, K] float; topk_ids [T, K] global expert ids;
        w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I]; expert_map [E_global] → local
        expert id or -1; lora: stacked expert LoRA with W = S·E entries; row_slots [T] adapter
        slot per token (-1 = none, or slot lacking expert LoRA). Returns [T, H] in x.dtype;
        the caller all-reduces partial sums across EP ranks. ``path`` applies to both the
        per-expert GEMMs (entries = experts) and the expert LoRA (entries = slot·E + expert).
    """
    t_count, k = topk_ids.shape
    num_local, hidden = w13.shape[0], x.shape[1]
    inter = w2.shape[2]
    local = expert_map.long()[topk_ids.reshape(-1).long()]  # [T*K]
    token_of_row = torch.arange(t_count, device=x.device).repeat_interleave(k)
    keep = torch.nonzero(local >= 0, as_tuple=True)[0]
    out = torch.zeros(t_count, hidden, dtype=torch.float32, device=x.device)
    if keep.numel() == 0:
        return out.to(x.dtype)
    rows_tok = token_of_row[keep]
    rows_exp = local[keep]
    xs = x.index_select(0, rows_tok)
    by_expert = plan_rows(rows_exp, 2 * inter * hidden, path, group_us=EXPERT_GROUP_US)
    gate_up = torch.empty(keep.numel(), 2 * inter, dtype=torch.float32, device=x.device)
    _experts(gate_up, xs, w13, by_expert)
    by_entry = None
    if lora is not None and row_slots is not None:
        slot = row_slots.long().index_select(0, rows_tok)
        lora_rows = torch.where(slot >= 0, slot * num_local + rows_exp, torch.full_like(slot, -1))
        # One plan serves both expert LoRA linears (same rows, same entries): both sides of
        # the cost model are the two linears' sums.
        floats = _linear_floats(lora.a13, 2 * inter) + _linear_floats(lora.a2, hidden)
        by_entry = plan_rows(lora_rows, floats, path, group_us=2 * LINEAR_GROUP_US)
        _linear(gate_up, xs, lora.a13, lora.b13, by_entry, (0, inter, 2 * inter))
    h = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    down = torch.empty(keep.numel(), hidden, dtype=torch.float32, device=x.device)
    _experts(down, h, w2, by_expert)
    if by_entry is not None and lora is not None:
        _linear(down, h, lora.a2, lora.b2, by_entry, (0, hidden))
    weights = topk_weights.reshape(-1).index_select(0, keep).float()
    out.index_add_(0, rows_tok, down * weights[:, None])
    return out.to(x.dtype)


class MoELoRA:
    """Stacked expert LoRA buffers of one MoE layer (entry w = slot · E + local expert).

    a13 [2, S·E, R, H] (gate, up), b13 [S·E, 2I, R], a2 [1, S·E, R, I], b2 [S·E, H, R].
    """

    __slots__ = ("a2", "a13", "b2", "b13")

    def __init__(self, a13: torch.Tensor, b13: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor):
        self.a13, self.b13, self.a2, self.b2 = a13, b13, a2, b2
