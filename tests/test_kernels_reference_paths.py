"""The torch reference's two row paths (per-entry loop, row gather) against each other and the
float64 oracles, over popularity mixes, -1 rows, unequal slices, chunked gathers and MoE."""

from __future__ import annotations

import itertools

import pytest
import torch
from lora_kernels import reference, reference_plan, testing
from lora_kernels.reference_plan import Path, plan_rows

FORCED: tuple[Path, ...] = ("loop", "gather")
ALL: tuple[Path, ...] = (*FORCED, "auto")
# Unequal slice widths (q/k/v-like and gate/up-like).
SLICES = {1: (0, 40), 2: (0, 24, 56), 3: (0, 32, 48, 56)}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def _linear_case(n_slices: int, popularity: str, none_frac: float, m: int = 37, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    offs = SLICES[n_slices]
    k, r, w = 48, 8, 12
    idx = testing.entry_indices(m, w, popularity, gen, none_frac=none_frac)
    x = torch.randn(m, k, generator=gen)
    a = torch.randn(n_slices, w, r, k, generator=gen) * 0.3
    b = torch.randn(w, offs[-1], r, generator=gen) * 0.3
    # Adapters of smaller rank sit zero-padded in the R-wide buffers.
    a[:, ::3, 5:] = 0
    b[::3, :, 5:] = 0
    return idx, x, a, b, offs, torch.randn(m, offs[-1], generator=gen)


@pytest.mark.parametrize("popularity", testing.POPULARITIES)
@pytest.mark.parametrize("n_slices", [1, 2, 3])
@pytest.mark.parametrize("none_frac", [0.0, 0.3])
def test_linear_paths_agree(popularity: str, n_slices: int, none_frac: float) -> None:
    idx, x, a, b, offs, out0 = _linear_case(n_slices, popularity, none_frac, seed=n_slices)
    want = out0.double() + testing.oracle_linear(x, a, b, idx, offs)
    results = {}
    for path in ALL:
        out = out0.clone()
        reference.lora_linear(out, x, a, b, idx, offs, path=path)
        assert _rel(out, want) < 1e-5, path
        assert torch.equal(out[idx < 0], out0[idx < 0]), path  # -1 rows untouched
        results[path] = out
    assert torch.allclose(results["loop"], results["gather"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("popularity", testing.POPULARITIES)
def test_shrink_expand_paths_agree(popularity: str) -> None:
    idx, x, a, b, offs, out0 = _linear_case(3, popularity, 0.25, seed=7)
    want_y = testing.oracle_shrink(x, a, idx)
    # y carries values on -1 rows too: expand must still leave those rows alone.
    y_in = torch.randn(3, idx.numel(), a.shape[2], generator=torch.Generator().manual_seed(1))
    b_rows = b.double()[idx.long().clamp(min=0)]
    want_out = out0.double() + torch.cat(
        [torch.einsum("mr,mnr->mn", y_in[s].double(), b_rows[:, lo:hi])
         for s, (lo, hi) in enumerate(itertools.pairwise(offs))], 1) * (idx >= 0).double()[:, None]
    for path in FORCED:
        y = reference.lora_shrink(x, a, idx, path=path)
        assert y.dtype == torch.float32 and _rel(y, want_y) < 1e-5, path
        assert torch.all(y[:, idx < 0] == 0), path
        out = out0.clone()
        reference.lora_expand(out, y_in, b, idx, offs, path=path)
        assert _rel(out, want_out) < 1e-5, path
        assert torch.equal(out[idx < 0], out0[idx < 0]), path


@pytest.mark.parametrize("path", FORCED)
def test_gather_chunks_and_no_entry_rows(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny chunk budget splits the gather into many row chunks (with and without -1 rows).
    monkeypatch.setattr(reference_plan, "GATHER_CHUNK_FLOATS", 4000)
    for none_frac in (0.0, 0.4):
        idx, x, a, b, offs, out0 = _linear_case(2, "uniform", none_frac, m=61, seed=3)
        assert len(reference_plan.row_chunks(idx.numel(), 2 * 8 * 48 + 56 * 10)) > 5
        out = out0.clone()
        reference.lora_linear(out, x, a, b, idx, offs, path=path)
        assert _rel(out, out0.double() + testing.oracle_linear(x, a, b, idx, offs)) < 1e-5
        y = reference.lora_shrink(x, a, idx, path=path)
        assert _rel(y, testing.oracle_shrink(x, a, idx)) < 1e-5
    # Every row without an entry: nothing is written, on either path.
    none = torch.full((idx.numel(),), -1, dtype=torch.int32)
    out = out0.clone()
    reference.lora_linear(out, x, a, b, none, offs, path=path)
    assert torch.equal(out, out0)


def test_low_precision_buffers_accumulate_in_float32() -> None:
    idx, x, a, b, offs, out0 = _linear_case(3, "zipf", 0.2, seed=5)
    outs = []
    for path in FORCED:
        out = out0.to(torch.bfloat16)
        reference.lora_linear(out, x.bfloat16(), a.bfloat16(), b.bfloat16(), idx, offs,
                              path=path)
        outs.append(out.float())
    assert torch.allclose(outs[0], outs[1], rtol=1e-2, atol=1e-2)
    want = out0.bfloat16().double() + testing.oracle_linear(
        x.bfloat16(), a.bfloat16(), b.bfloat16(), idx, offs)
    assert _rel(outs[0], want) < 1e-2


@pytest.mark.parametrize("popularity", testing.POPULARITIES)
def test_embedding_paths_agree(popularity: str) -> None:
    gen = torch.Generator().manual_seed(9)
    m, v, h, r, w = 43, 40, 24, 8, 10
    idx = testing.entry_indices(m, w, popularity, gen, none_frac=0.2)
    # Ids outside this vocab shard (-1 and ≥ V) contribute nothing.
    tok = torch.randint(-3, v + 3, (m,), generator=gen)
    a, b = torch.randn(w, v, r, generator=gen), torch.randn(w, h, r, generator=gen)
    out0 = torch.randn(m, h, generator=gen)
    want = out0.double() + testing.oracle_embedding(tok, a, b, idx)
    untouched = (idx < 0) | (tok < 0) | (tok >= v)
    assert bool(untouched.any()) and not bool(untouched.all())
    for path in ALL:
        out = out0.clone()
        reference.lora_embedding(out, tok, a, b, idx, path=path)
        assert _rel(out, want) < 1e-5, path
        assert torch.equal(out[untouched], out0[untouched]), path


@pytest.mark.parametrize("skew", testing.ROUTINGS)
@pytest.mark.parametrize("popularity", ["identical", "distinct", "zipf"])
def test_moe_paths_agree(skew: str, popularity: str) -> None:
    gen = torch.Generator().manual_seed(13)
    t, h, inter, e_global, k, s, r = 23, 32, 24, 8, 3, 6, 8
    # Half the experts live on other ranks (-1 in the map).
    expert_map = torch.tensor([0, -1, 1, -1, 2, 3, -1, -1])
    e = 4
    ids, wts = testing.routing(t, k, e_global, skew, gen)
    x = torch.randn(t, h, generator=gen)
    w13 = torch.randn(e, 2 * inter, h, generator=gen) * 0.2
    w2 = torch.randn(e, h, inter, generator=gen) * 0.2
    lora = tuple(torch.randn(*shape, generator=gen) * 0.2 for shape in
                 ((2, s * e, r, h), (s * e, 2 * inter, r), (1, s * e, r, inter), (s * e, h, r)))
    slots = testing.entry_indices(t, s, popularity, gen, none_frac=0.2)
    want = testing.oracle_moe(x, wts, ids, w13, w2, expert_map, lora, slots)
    got = {}
    for path in ALL:
        got[path] = reference.fused_moe(x, wts, ids, w13, w2, expert_map,
                                        reference.MoELoRA(*lora), slots, path=path)
        assert _rel(got[path], want) < 1e-5, path
        base = reference.fused_moe(x, wts, ids, w13, w2, expert_map, path=path)
        assert _rel(base, testing.oracle_moe(x, wts, ids, w13, w2, expert_map, None, None)) < 1e-5
    assert torch.allclose(got["loop"], got["gather"], rtol=1e-5, atol=1e-6)


def test_auto_path_choice() -> None:
    qkv_floats = 3 * 8 * 96 + 256 * 11
    distinct = torch.arange(32, dtype=torch.int32)
    # Decode: 32 rows on 32 adapters gather; on one adapter they loop (one GEMM).
    assert plan_rows(distinct, qkv_floats).path == "gather"
    assert plan_rows(torch.zeros(32, dtype=torch.int32), qkv_floats).path == "loop"
    # Prefill: thousands of rows over a few adapters loop (gathering would copy MBs per entry).
    prefill = torch.arange(2048, dtype=torch.int32) % 4
    plan = plan_rows(prefill, qkv_floats)
    assert plan.path == "loop" and [w for w, _ in plan.groups] == [0, 1, 2, 3]
    assert all(torch.all(prefill[rows] == w) for w, rows in plan.groups)
    # Rows without an entry are left out of both plans.
    mixed = torch.tensor([3, -1, 3, 5, -1], dtype=torch.int32)
    for path in FORCED:
        plan = plan_rows(mixed, qkv_floats, path)
        assert plan.rows is not None and sorted(plan.rows.tolist()) == [0, 2, 3]
        assert torch.equal(mixed.long()[plan.rows], plan.entries)
    assert plan_rows(torch.full((4,), -1), qkv_floats).empty
    with pytest.raises(ValueError, match="path must be one of"):
        plan_rows(distinct, qkv_floats, "fast")
