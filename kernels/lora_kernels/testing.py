"""Workloads and float64 oracles for kernel tests and benchmarks (no Triton import).

Adapter popularity mixes follow Punica's test matrix (identical, distinct, uniform, zipf,
skewed); expert routing skews do the same for MoE. The oracles recompute each op's
semantics with dense float64 einsums, independent of ``reference``'s grouping code.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

POPULARITIES = ("identical", "distinct", "uniform", "zipf", "skewed")
ROUTINGS = ("uniform", "skewed", "one_expert", "remote_heavy")


def entry_indices(rows: int, entries: int, popularity: str, gen: torch.Generator,
                  none_frac: float = 0.0, used: int | None = None) -> torch.Tensor:
    """[rows] int32 weight entries under a popularity mix; ``none_frac`` of rows get -1.

    ``used`` limits the draw to that many entries picked at random out of ``entries``.
    """
    pool = torch.randperm(entries, generator=gen)[: used or entries]
    n = pool.numel()
    if popularity == "identical":
        pick = torch.zeros(rows, dtype=torch.long)
    elif popularity == "distinct":
        pick = torch.randperm(max(rows, n), generator=gen)[:rows] % n
    elif popularity == "uniform":
        pick = torch.randint(0, n, (rows,), generator=gen)
    elif popularity == "zipf":
        p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.2
        pick = torch.multinomial(p, rows, replacement=True, generator=gen)
    elif popularity == "skewed":
        # One hot adapter takes most rows; a long tail takes the rest.
        pick = torch.randint(0, n, (rows,), generator=gen)
        pick[torch.rand(rows, generator=gen) < 0.8] = 0
    else:
        raise ValueError(f"unknown popularity {popularity!r}")
    idx = pool[pick]
    if none_frac > 0:
        idx[torch.rand(rows, generator=gen) < none_frac] = -1
    return idx.to(torch.int32)


def routing(tokens: int, top_k: int, num_global: int, skew: str,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids [T, K] int64 distinct per token, topk_weights [T, K] float32) for a skew."""
    if skew == "uniform":
        logits = torch.rand(tokens, num_global, generator=gen)
    elif skew == "skewed":
        logits = torch.rand(tokens, num_global, generator=gen) / (
            torch.arange(1, num_global + 1, dtype=torch.float32) ** 1.5)
    elif skew == "one_expert":
        logits = torch.rand(tokens, num_global, generator=gen)
        logits[:, 0] += 10.0
        logits[:, 1:top_k] += 5.0
    elif skew == "remote_heavy":
        # Most picks land on odd experts; the EP maps in tests make those remote.
        logits = torch.rand(tokens, num_global, generator=gen)
        logits[:, 1::2] += 1.0
    else:
        raise ValueError(f"unknown routing skew {skew!r}")
    ids = torch.topk(logits, top_k, dim=1).indices
    weights = torch.softmax(torch.rand(tokens, top_k, generator=gen), dim=1)
    return ids, weights


def oracle_linear(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  indices: torch.Tensor, slice_offsets: Sequence[int]) -> torch.Tensor:
    """float64 [M, N] LoRA delta of a multi-slice linear (rows with -1 get 0)."""
    valid = (indices >= 0).double()[:, None]
    w = indices.long().clamp(min=0)
    a = lora_a.double()[:, w]  # [n, M, R, K]
    b = lora_b.double()[w]  # [M, N, R]
    y = torch.einsum("mk,smrk->smr", x.double(), a)
    parts = [torch.einsum("mr,mnr->mn", y[s], b[:, lo:hi])
             for s, (lo, hi) in enumerate(itertools.pairwise(slice_offsets))]
    return torch.cat(parts, dim=1) * valid


def oracle_shrink(x: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """float64 [n, M, R]."""
    valid = (indices >= 0).double()[None, :, None]
    a = lora_a.double()[:, indices.long().clamp(min=0)]
    return torch.einsum("mk,smrk->smr", x.double(), a) * valid


def oracle_embedding(token_ids: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                     indices: torch.Tensor) -> torch.Tensor:
    """float64 [M, H] embedding LoRA delta; rows with -1 or a token outside [0, V) get 0."""
    vocab = lora_a.shape[1]
    ok = (indices >= 0) & (token_ids >= 0) & (token_ids < vocab)
    w = indices.long().clamp(min=0)
    tok = token_ids.long().clamp(0, vocab - 1)
    y = lora_a.double()[w, tok]  # [M, R]
    return torch.einsum("mr,mhr->mh", y, lora_b.double()[w]) * ok.double()[:, None]


def oracle_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
               w13: torch.Tensor, w2: torch.Tensor, expert_map: torch.Tensor,
               lora: tuple[torch.Tensor, ...] | None, row_slots: torch.Tensor | None
               ) -> torch.Tensor:
    """float64 [T, H] fused MoE with expert LoRA, by dense einsums over every (t, k)."""
    t_count, top_k = topk_ids.shape
    num_local, two_i, _ = w13.shape
    inter = two_i // 2
    local = expert_map.long()[topk_ids.long()]  # [T, K]
    keep = (local >= 0).double()
    e = local.clamp(min=0)
    xd = x.double()
    gate_up = torch.einsum("th,tkih->tki", xd, w13.double()[e])
    if lora is not None and row_slots is not None:
        a13, b13, a2, b2 = (t.double() for t in lora)
        slot = row_slots.long()[:, None].expand(t_count, top_k)
        has = ((slot >= 0) & (local >= 0)).double()
        w = (slot.clamp(min=0) * num_local + e)
        y = torch.einsum("th,tksrh->tksr", xd, a13.permute(1, 0, 2, 3)[w])
        lora_gu = torch.cat([torch.einsum("tkr,tkir->tki", y[:, :, 0], b13[w][:, :, :inter]),
                             torch.einsum("tkr,tkir->tki", y[:, :, 1], b13[w][:, :, inter:])], 2)
        gate_up = gate_up + lora_gu * has[..., None]
    h = torch.nn.functional.silu(gate_up[..., :inter]) * gate_up[..., inter:]
    down = torch.einsum("tki,tkhi->tkh", h, w2.double()[e])
    if lora is not None and row_slots is not None:
        y2 = torch.einsum("tki,tkri->tkr", h, a2[0][w])
        down = down + torch.einsum("tkr,tkhr->tkh", y2, b2[w]) * has[..., None]
    return torch.einsum("tkh,tk->th", down, topk_weights.double() * keep)
