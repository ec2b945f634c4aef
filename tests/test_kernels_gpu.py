"""Triton LoRA kernels on a real GPU: real sizes in bf16/fp16/fp32, and CUDA-graph safety.

Graph safety: each op is captured once (metadata built inside the graph from static input
tensors), then new row → adapter assignments (-1 rows included) are copied into those
inputs and the replay must equal an eager call bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from lora_kernels import config as cfg
from lora_kernels import ops, reference, testing
from lora_kernels.meta import build_lora_meta

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}
SHAPES = {"dense": (0, 4096), "qkv_gqa": (0, 4096, 5120, 6144)}
FORCED = {
    "auto": None,
    "fused": cfg.FusedConfig(bm=16, bk=128, bn=64, col_splits=8),
    "split": cfg.SplitConfig(bm=16, bk=128, split_k=8, bn=64, col_splits=16),
    "split_pdl": cfg.SplitConfig(bm=16, bk=128, split_k=8, bn=64, col_splits=16, pdl=True),
    "persistent": cfg.PersistentConfig(bm=16, bk=128, split_k=8, bn=64),
    "persistent64": cfg.PersistentConfig(bm=16, bk=256, split_k=16, bn=128, programs=64),
}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def _linear_case(gen: torch.Generator, tokens: int, rank: int, offs: tuple[int, ...],
                 dtype: torch.dtype, popularity: str, slots: int = 32, used: int = 8) -> tuple:
    k, n = 4096, len(offs) - 1
    idx = testing.entry_indices(tokens, slots, popularity, gen, none_frac=0.2, used=used)
    x = torch.randn(tokens, k, generator=gen).to(DEV, dtype)
    a = (torch.randn(n, slots, rank, k, generator=gen) / 64).to(DEV, dtype)
    b = (torch.randn(slots, offs[-1], rank, generator=gen) / 4).to(DEV, dtype)
    out0 = torch.randn(tokens, offs[-1], generator=gen).to(DEV, dtype)
    return idx.to(DEV), x, a, b, out0


LINEAR_CASES = (
    [("auto", t, r, s, torch.bfloat16) for t in (1, 64, 1024) for r in (16, 64) for s in SHAPES]
    + [("auto", t, 16, s, d) for t in (1, 64, 1024) for s in SHAPES
       for d in (torch.float16, torch.float32)]
    + [(p, 64, r, s, torch.bfloat16) for p in ("fused", "split") for r in (16, 64) for s in SHAPES]
    + [(p, t, r, s, torch.bfloat16) for p in ("persistent", "persistent64", "split_pdl")
       for t in (1, 64, 300) for r in (16, 64) for s in SHAPES]
    + [("persistent", 64, 16, s, d) for s in SHAPES for d in (torch.float16, torch.float32)]
)


@pytest.mark.parametrize(("path", "tokens", "rank", "shape", "dtype"), LINEAR_CASES)
def test_linear_real_sizes(path: str, tokens: int, rank: int, shape: str,
                           dtype: torch.dtype) -> None:
    from lora_kernels import linear

    gen = torch.Generator().manual_seed(tokens + rank)
    offs = SHAPES[shape]
    idx, x, a, b, out0 = _linear_case(gen, tokens, rank, offs, dtype, "uniform")
    out = out0.clone()
    linear.lora_linear(out, x, a, b, build_lora_meta(idx, 32), offs, config=FORCED[path])
    ref = out0.float().clone()
    reference.lora_linear(ref, x.float(), a.float(), b.float(), idx, offs)
    assert _rel(out.float() - out0.float(), ref - out0.float()) < TOL[dtype]
    assert torch.equal(out[idx < 0], out0[idx < 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_embedding_real_size(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    m, v, h, r, w = 300, 32000, 4096, 16, 8
    idx = testing.entry_indices(m, w, "zipf", gen, none_frac=0.2).to(DEV)
    tok = torch.randint(-100, v + 100, (m,), generator=gen).to(DEV)
    a = torch.randn(w, v, r, generator=gen).to(DEV, dtype)
    b = (torch.randn(w, h, r, generator=gen) / 4).to(DEV, dtype)
    out0 = torch.randn(m, h, generator=gen).to(DEV, dtype)
    out = out0.clone()
    ops.add_lora_embedding(out, tok, a, b, build_lora_meta(idx, w))
    ref = out0.float().clone()
    reference.lora_embedding(ref, tok, a.float(), b.float(), idx)
    assert _rel(out.float() - out0.float(), ref - out0.float()) < TOL[dtype]


def _moe_case(gen: torch.Generator, tokens: int, dtype: torch.dtype, skew: str) -> tuple:
    h, inter, e_global, k, s, r = 2048, 768, 128, 8, 4, 16
    expert_map = torch.full((e_global,), -1, dtype=torch.int32)
    expert_map[0::2] = torch.arange(e_global // 2, dtype=torch.int32)  # EP=2, this rank even
    e = e_global // 2
    ids, wts = testing.routing(tokens, k, e_global, skew, gen)
    x = torch.randn(tokens, h, generator=gen).to(DEV, dtype)
    w13 = (torch.randn(e, 2 * inter, h, generator=gen) / 45).to(DEV, dtype)
    w2 = (torch.randn(e, h, inter, generator=gen) / 28).to(DEV, dtype)
    lora = reference.MoELoRA(*(
        (torch.randn(*shape, generator=gen) * scale).to(DEV, dtype) for shape, scale in
        (((2, s * e, r, h), 1 / 45), ((s * e, 2 * inter, r), 0.25), ((1, s * e, r, inter), 1 / 28),
         ((s * e, h, r), 0.25))))
    slots = testing.entry_indices(tokens, s, "uniform", gen, none_frac=0.25).to(DEV)
    return x, wts.to(DEV), ids.to(DEV), w13, w2, expert_map.to(DEV), lora, slots


MOE_CASES = [(8, "uniform", torch.bfloat16), (300, "skewed", torch.bfloat16),
             (300, "uniform", torch.bfloat16), (8, "skewed", torch.float16),
             (8, "uniform", torch.float32)]


@pytest.mark.parametrize(("tokens", "skew", "dtype"), MOE_CASES)
def test_fused_moe_real_size(tokens: int, skew: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(tokens)
    x, wts, ids, w13, w2, emap, lora, slots = _moe_case(gen, tokens, dtype, skew)
    got = ops.fused_moe(x, wts, ids, w13, w2, emap, lora, slots)
    lf = reference.MoELoRA(lora.a13.float(), lora.b13.float(), lora.a2.float(), lora.b2.float())
    ref = reference.fused_moe(x.float(), wts, ids, w13.float(), w2.float(), emap, lf, slots)
    assert _rel(got.float(), ref) < TOL[dtype]


def _capture(fn) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("tokens", [1, 48, 700])
def test_add_lora_graph_replay_matches_eager(tokens: int, shape: str) -> None:
    gen = torch.Generator().manual_seed(tokens)
    offs = SHAPES[shape]
    idx, x, a, b, out0 = _linear_case(gen, tokens, 16, offs, torch.bfloat16, "uniform")
    static_idx, static_out = idx.clone(), out0.clone()

    def step() -> None:
        ops.add_lora(static_out, x, a, b, build_lora_meta(static_idx, 32), offs)

    graph = _capture(step)
    layouts = ["uniform", "identical", "skewed", "distinct"]
    for i, popularity in enumerate(layouts):
        new = testing.entry_indices(tokens, 32, popularity, gen, none_frac=0.1 * i, used=8 + i)
        if i == len(layouts) - 1:
            new[:] = -1  # every row base-only: the captured launch must add nothing
        static_idx.copy_(new.to(DEV))
        static_out.copy_(out0)
        graph.replay()
        eager = out0.clone()
        ops.add_lora(eager, x, a, b, build_lora_meta(static_idx, 32), offs)
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager), popularity
        assert torch.equal(static_out[static_idx < 0], out0[static_idx < 0])
        ref = out0.float().clone()
        reference.lora_linear(ref, x.float(), a.float(), b.float(), static_idx, offs)
        if bool((static_idx >= 0).any()):
            assert _rel(static_out.float() - out0.float(), ref - out0.float()) < 1e-2


@pytest.mark.parametrize("tokens", [4, 256])
def test_fused_moe_graph_replay_matches_eager(tokens: int) -> None:
    gen = torch.Generator().manual_seed(tokens)
    x, wts, ids, w13, w2, emap, lora, slots = _moe_case(gen, tokens, torch.bfloat16, "uniform")
    s_ids, s_wts, s_slots = ids.clone(), wts.clone(), slots.clone()
    result: list[torch.Tensor] = []

    def step() -> None:
        result[:] = [ops.fused_moe(x, s_wts, s_ids, w13, w2, emap, lora, s_slots)]

    graph = _capture(step)
    for i, skew in enumerate(["skewed", "one_expert", "remote_heavy", "uniform"]):
        new_ids, new_wts = testing.routing(tokens, 8, 128, skew, gen)
        new_slots = testing.entry_indices(tokens, 4, "zipf", gen, none_frac=0.3)
        if i == 3:
            new_slots[:] = -1
        s_ids.copy_(new_ids.to(DEV))
        s_wts.copy_(new_wts.to(DEV))
        s_slots.copy_(new_slots.to(DEV))
        graph.replay()
        eager = ops.fused_moe(x, s_wts, s_ids, w13, w2, emap, lora, s_slots)
        torch.cuda.synchronize()
        assert torch.equal(result[0], eager), skew


@pytest.mark.parametrize("rows", [1, 64, 1000, 2048, 4096])
def test_meta_builds_agree(rows: int) -> None:
    from lora_kernels.meta import build_lora_meta_torch

    gen = torch.Generator().manual_seed(rows)
    idx = testing.entry_indices(rows, 32, "uniform", gen, none_frac=0.2).to(DEV)
    got, want = build_lora_meta(idx, 32), build_lora_meta_torch(idx, 32)
    for field in ("sorted_rows", "seg_counts", "seg_starts", "active_entries", "num_active"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("tokens", [1, 64])
def test_persistent_graph_replays_back_to_back(tokens: int, shape: str) -> None:
    """One graph holds several persistent launches of different grid sizes on one barrier
    slot (like layers of a step); it is replayed many times in a row, with new row →
    adapter assignments between bursts. Every replay must equal the eager result bit for
    bit: a barrier that did not reset would hang, time out (flag) or race."""
    from lora_kernels import linear, persistent

    gen = torch.Generator().manual_seed(100 + tokens)
    offs = SHAPES[shape]
    idx, x, a, b, out0 = _linear_case(gen, tokens, 16, offs, torch.bfloat16, "uniform")
    static_idx = idx.clone()
    outs = [out0.clone() for _ in range(3)]
    configs = [cfg.choose_linear(tokens, offs[-1], 4096, 16, len(offs) - 1, 32),
               cfg.PersistentConfig(bm=16, bk=128, split_k=8, bn=64, programs=48),
               cfg.PersistentConfig(bm=16, bk=128, split_k=8, bn=64, programs=7)]
    persistent.prepare_barriers(DEV)

    def step() -> None:
        meta = build_lora_meta(static_idx, 32)
        for out, config in zip(outs, configs, strict=True):
            out.copy_(out0)
            linear.lora_linear(out, x, a, b, meta, offs, config=config)

    graph = _capture(step)
    layouts = ["uniform", "identical", "skewed", "distinct", "zipf"] * 4
    for i, popularity in enumerate(layouts):
        new = testing.entry_indices(tokens, 32, popularity, gen, none_frac=0.05 * (i % 5),
                                    used=1 + i % 32)
        static_idx.copy_(new.to(DEV))
        for _ in range(10):
            graph.replay()
        meta = build_lora_meta(static_idx, 32)
        eager = [out0.clone() for _ in configs]
        for e, config in zip(eager, configs, strict=True):
            linear.lora_linear(e, x, a, b, meta, offs, config=config)
        torch.cuda.synchronize()
        ref = out0.float().clone()
        reference.lora_linear(ref, x.float(), a.float(), b.float(), static_idx, offs)
        for out, e in zip(outs, eager, strict=True):
            assert torch.equal(out, e), popularity
            assert torch.equal(out[static_idx < 0], out0[static_idx < 0]), popularity
            if bool((static_idx >= 0).any()):
                assert _rel(out.float() - out0.float(), ref - out0.float()) < 1e-2, popularity
        assert torch.equal(outs[1], outs[2]), popularity  # same split-K sums, other grids
    assert not persistent.barrier_timed_out(DEV)


def test_persistent_capture_before_barrier_slab_falls_back_to_split() -> None:
    """A persistent call first seen inside a capture (no zeroed slab yet) runs the split path."""
    from lora_kernels import linear, persistent

    gen = torch.Generator().manual_seed(3)
    offs = SHAPES["dense"]
    idx, x, a, b, out0 = _linear_case(gen, 16, 16, offs, torch.bfloat16, "uniform")
    out = out0.clone()
    meta = build_lora_meta(idx, 32)
    config = cfg.PersistentConfig(bm=16, bk=128, split_k=8, bn=64)
    saved = dict(persistent._slabs)
    persistent._slabs.clear()
    try:
        graph = torch.cuda.CUDAGraph()
        linear.lora_linear(out.clone(), x, a, b, meta, offs, config=config.as_split())  # warm
        with torch.cuda.graph(graph):
            linear.lora_linear(out, x, a, b, meta, offs, config=config)
        assert not persistent._slabs
        out.copy_(out0)
        graph.replay()
        eager = out0.clone()
        linear.lora_linear(eager, x, a, b, meta, offs, config=config.as_split())
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    finally:
        persistent._slabs.update(saved)
