"""Float32 torch reference of the Punica-style LoRA ops; the CPU path of the engine.

Every op takes weight-entry indices per row (-1 = no adapter) and stacked adapter buffers.
Adapter scaling is folded into ``lora_b`` when an adapter is placed in a slot, so the ops
carry no scale. Ranks smaller than the buffer's R are zero-padded, which adds nothing.

Shape legend: M rows, W weight entries, n slices, R rank, K input width, N output width,
E local experts, H hidden, I expert intermediate, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(entry, rows) for every entry present; rows with -1 are skipped."""
    valid = indices >= 0
    if not bool(valid.any()):
        return []
    entries = torch.unique(indices[valid])
    return [(int(w), torch.nonzero(indices == w, as_tuple=True)[0]) for w in entries.tolist()]


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Shrink every slice at once.

    Semantics:
        for s in range(n): for m in range(M):
            y[s, m, :] = x[m] @ lora_a[s, indices[m]].T   if indices[m] >= 0 else 0
    Args: x [M, K]; lora_a [n, W, R, K]; indices [M]. Returns y [n, M, R] float32.
    """
    n, _, r, _ = lora_a.shape
    y = torch.zeros(n, x.shape[0], r, dtype=torch.float32, device=x.device)
    for w, rows in _groups(indices):
        xs = x.index_select(0, rows).float()
        y[:, rows] = torch.einsum("mk,srk->smr", xs, lora_a[:, w].float())
    return y


def lora_expand(
    out: torch.Tensor,
    y: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    slice_offsets: Sequence[int],
) -> None:
    """Expand each slice into its column range of ``out``, in place.

    Semantics:
        for s in range(n): lo, hi = slice_offsets[s], slice_offsets[s + 1]
            for m with indices[m] >= 0:
                out[m, lo:hi] += y[s, m] @ lora_b[indices[m], lo:hi].T
    Args: out [M, N]; y [n, M, R]; lora_b [W, N, R]; slice_offsets: n + 1 ints, last == N.
    """
    n = y.shape[0]
    assert len(slice_offsets) == n + 1 and slice_offsets[-1] == out.shape[1]
    for w, rows in _groups(indices):
        b = lora_b[w].float()
        delta = torch.cat(
            [y[s, rows] @ b[slice_offsets[s]:slice_offsets[s + 1]].T for s in range(n)], dim=1
        )
        out.index_add_(0, rows, delta.to(out.dtype))


def lora_linear(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    slice_offsets: Sequence[int],
) -> None:
    """``out += expand(shrink(x))``: the whole LoRA delta of one (possibly multi-slice) linear."""
    lora_expand(out, lora_shrink(x, lora_a, indices), lora_b, indices, slice_offsets)


def lora_embedding(
    out: torch.Tensor,
    token_ids: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
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
    for w, rows in _groups(indices):
        ids = token_ids.index_select(0, rows)
        inside = (ids >= 0) & (ids < vocab)
        if not bool(inside.any()):
            continue
        rows, ids = rows[inside], ids[inside]
        delta = lora_a[w].float().index_select(0, ids) @ lora_b[w].float().T
        out.index_add_(0, rows, delta.to(out.dtype))


def fused_moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_map: torch.Tensor,
    lora: MoELoRA | None = None,
    row_slots: torch.Tensor | None = None,
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
        the caller all-reduces partial sums across EP ranks.
    """
    t_count, k = topk_ids.shape
    num_local = w13.shape[0]
    inter = w2.shape[2]
    local = expert_map.long()[topk_ids.reshape(-1).long()]  # [T*K]
    token_of_row = torch.arange(t_count, device=x.device).repeat_interleave(k)
    keep = torch.nonzero(local >= 0, as_tuple=True)[0]
    out = torch.zeros(t_count, x.shape[1], dtype=torch.float32, device=x.device)
    if keep.numel() == 0:
        return out.to(x.dtype)
    rows_tok = token_of_row[keep]
    rows_exp = local[keep]
    xs = x.index_select(0, rows_tok)
    gate_up = torch.empty(keep.numel(), 2 * inter, dtype=torch.float32, device=x.device)
    for e, sel in _groups(rows_exp):
        gate_up[sel] = xs.index_select(0, sel).float() @ w13[e].float().T
    lora_rows = None
    if lora is not None and row_slots is not None:
        slot = row_slots.long().index_select(0, rows_tok)
        lora_rows = torch.where(slot >= 0, slot * num_local + rows_exp, torch.full_like(slot, -1))
        lora_linear(gate_up, xs, lora.a13, lora.b13, lora_rows, (0, inter, 2 * inter))
    h = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    down = torch.empty(keep.numel(), x.shape[1], dtype=torch.float32, device=x.device)
    for e, sel in _groups(rows_exp):
        down[sel] = h.index_select(0, sel) @ w2[e].float().T
    if lora_rows is not None and lora is not None:
        lora_linear(down, h, lora.a2, lora.b2, lora_rows, (0, x.shape[1]))
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
