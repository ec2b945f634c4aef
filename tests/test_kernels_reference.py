"""The torch reference LoRA ops and the step metadata against dense float64 einsums (CPU)."""

from __future__ import annotations

import pytest
import torch
from lora_kernels import config as cfg
from lora_kernels import reference, testing
from lora_kernels.meta import build_lora_meta
from lora_kernels.moe_meta import build_moe_routing

SLICES = {1: (0, 40), 2: (0, 24, 56), 3: (0, 32, 48, 56)}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("popularity", testing.POPULARITIES)
@pytest.mark.parametrize("n_slices", [1, 2, 3])
def test_reference_linear_matches_einsum(popularity: str, n_slices: int) -> None:
    gen = torch.Generator().manual_seed(n_slices)
    offs = SLICES[n_slices]
    m, k, r, w = 29, 48, 8, 6
    idx = testing.entry_indices(m, w, popularity, gen, none_frac=0.25)
    x = torch.randn(m, k, generator=gen)
    a = torch.randn(n_slices, w, r, k, generator=gen) * 0.3
    b = torch.randn(w, offs[-1], r, generator=gen) * 0.3
    out0 = torch.randn(m, offs[-1], generator=gen)
    out = out0.clone()
    reference.lora_linear(out, x, a, b, idx, offs)
    assert _rel(out, out0.double() + testing.oracle_linear(x, a, b, idx, offs)) < 1e-5
    assert torch.equal(out[idx < 0], out0[idx < 0])
    y = reference.lora_shrink(x, a, idx)
    assert _rel(y, testing.oracle_shrink(x, a, idx)) < 1e-5


def test_reference_embedding_matches_einsum() -> None:
    gen = torch.Generator().manual_seed(3)
    m, v, h, r, w = 31, 40, 24, 8, 5
    idx = testing.entry_indices(m, w, "uniform", gen, none_frac=0.2)
    tok = torch.randint(-3, v + 3, (m,), generator=gen)
    a, b = torch.randn(w, v, r, generator=gen), torch.randn(w, h, r, generator=gen)
    out0 = torch.randn(m, h, generator=gen)
    out = out0.clone()
    reference.lora_embedding(out, tok, a, b, idx)
    assert _rel(out, out0.double() + testing.oracle_embedding(tok, a, b, idx)) < 1e-5


@pytest.mark.parametrize("skew", testing.ROUTINGS)
def test_reference_moe_matches_einsum(skew: str) -> None:
    gen = torch.Generator().manual_seed(11)
    t, h, inter, e_global, k, s, r = 13, 32, 24, 8, 3, 3, 8
    expert_map = torch.tensor([0, -1, 1, -1, 2, 3, -1, -1])
    e = 4
    ids, wts = testing.routing(t, k, e_global, skew, gen)
    x = torch.randn(t, h, generator=gen)
    w13 = torch.randn(e, 2 * inter, h, generator=gen) * 0.2
    w2 = torch.randn(e, h, inter, generator=gen) * 0.2
    lora = tuple(torch.randn(*shape, generator=gen) * 0.2 for shape in
                 ((2, s * e, r, h), (s * e, 2 * inter, r), (1, s * e, r, inter), (s * e, h, r)))
    slots = torch.randint(-1, s, (t,), generator=gen)
    got = reference.fused_moe(x, wts, ids, w13, w2, expert_map, reference.MoELoRA(*lora), slots)
    want = testing.oracle_moe(x, wts, ids, w13, w2, expert_map, lora, slots)
    assert _rel(got, want) < 1e-5
    base = reference.fused_moe(x, wts, ids, w13, w2, expert_map)
    assert _rel(base, testing.oracle_moe(x, wts, ids, w13, w2, expert_map, None, None)) < 1e-5


@pytest.mark.parametrize("popularity", testing.POPULARITIES)
def test_meta_segments(popularity: str) -> None:
    gen = torch.Generator().manual_seed(5)
    m, w = 53, 9
    idx = testing.entry_indices(m, w, popularity, gen, none_frac=0.3)
    meta = build_lora_meta(idx, w)
    assert meta.active_entries is not None and meta.num_active is not None
    counts = torch.bincount(idx[idx >= 0].long(), minlength=w)
    assert torch.equal(meta.seg_counts.long(), counts)
    order = idx[meta.sorted_rows.long()]
    for entry in range(w):
        lo, n = int(meta.seg_starts[entry]), int(meta.seg_counts[entry])
        assert torch.all(order[lo:lo + n] == entry)
    assert torch.all(order[int(counts.sum()):] == -1)
    live = torch.nonzero(counts).flatten().to(torch.int32)
    assert int(meta.num_active) == live.numel()
    assert torch.equal(meta.active_entries[: live.numel()], live)
    assert torch.all(meta.active_entries[live.numel():] == -1)
    for bm in (16, 32):
        tiles = int((-(-meta.seg_counts // bm)).sum())
        assert tiles <= cfg.tile_bound(m, w, bm)


def test_moe_routing_segments() -> None:
    gen = torch.Generator().manual_seed(2)
    t, k, s, e = 17, 3, 4, 4
    expert_map = torch.tensor([0, -1, 1, -1, 2, 3, -1, -1])
    ids, _ = testing.routing(t, k, 8, "uniform", gen)
    slots = torch.randint(-1, s, (t,), generator=gen)
    rt = build_moe_routing(ids, expert_map, e, slots, s)
    assert rt.lora is not None
    local = expert_map[ids.reshape(-1)]
    slot = slots.repeat_interleave(k)
    rows = rt.experts.sorted_rows.long()
    for ex in range(e):
        lo, n = int(rt.experts.seg_starts[ex]), int(rt.experts.seg_counts[ex])
        assert n == int((local == ex).sum()) and torch.all(local[rows[lo:lo + n]] == ex)
    for entry in range(s * e):
        lo, n = int(rt.lora.seg_starts[entry]), int(rt.lora.seg_counts[entry])
        got = rows[lo:lo + n]
        assert torch.all(slot[got] * e + local[got] == entry)
        assert n == int(((slot * e + local == entry) & (slot >= 0) & (local >= 0)).sum())
