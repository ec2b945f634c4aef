"""Triton LoRA kernels on a real GPU: real sizes in bf16/fp16/fp32, and CUDA-graph safety.

Graph safety: each op is captured once (metadata built inside the graph from static input
tensors), then new row → adapter assignments (-1 rows included) are copied into those
inputs and the replay must equal an eager call bit for bit. The split path's programmatic
dependent launch (PDL, Hopper+) and the short-chain split (starts from counts, a
prefetching expand) are tested at real sizes and in chained graph replays
(``-k "pdl or short"``).
"""

from __future__ import annotations

from dataclasses import replace

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
PDL_SPLIT = cfg.SplitConfig(bm=16, bk=128, split_k=8, bn=64, col_splits=16, pdl=True)
# The tiles chosen for ~1k rows (one adapter: few row tiles, split-K 4), with PDL.
PDL_SPLIT_1K = cfg.SplitConfig(bm=64, bk=128, split_k=4, bn=128, col_splits=8, expand_warps=8,
                               pdl=True)
# The same with the short dependent-load chains (starts from counts, prefetching expand).
SHORT_SPLIT = replace(PDL_SPLIT, cum_starts=True, prefetch=True)
SHORT_SPLIT_1K = replace(PDL_SPLIT_1K, cum_starts=True, prefetch=True)
ROWS = cfg.RowConfig(bk=256, split_k=16, bn=128, pdl=True)
ROWS_WIDE = cfg.RowConfig(bk=256, split_k=16, bn=256, pdl=True)  # dense 17-64 rows (v13)
ROWS_WIDE8 = cfg.RowConfig(bk=256, split_k=8, bn=256, expand_warps=8, pdl=True)  # v14
# Multi-slice expands of two 256-column blocks a program (v11) and of one 512-column block
# (v15: chosen at 33-128 rows).
WIDE_SPLIT = cfg.SplitConfig(bm=16, bk=128, split_k=8, bn=256, col_splits=12, shrink_warps=2,
                             expand_warps=4, pdl=True, cum_starts=True, prefetch=True)
WIDE512_SPLIT = replace(WIDE_SPLIT, bn=512)
FORCED: dict[str, cfg.LinearConfig | None] = {
    "auto": None,
    "fused": cfg.FusedConfig(bm=16, bk=128, bn=64, col_splits=8),
    "split": cfg.SplitConfig(bm=16, bk=128, split_k=8, bn=64, col_splits=16),
    "split_pdl": PDL_SPLIT,
    "split_pdl_1k": PDL_SPLIT_1K,
    "split_short": SHORT_SPLIT,
    "split_short_1k": SHORT_SPLIT_1K,
    "rows": ROWS,
    "split_wide": WIDE_SPLIT,
    "rows_wide": ROWS_WIDE,
    "rows_wide8": ROWS_WIDE8,
    "split_wide512": WIDE512_SPLIT,
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
    + [("split_pdl", t, r, s, torch.bfloat16) for t in (1, 64, 300) for r in (16, 64)
       for s in SHAPES]
    + [("split_pdl_1k", 1024, 16, s, torch.bfloat16) for s in SHAPES]
    + [("split_pdl", 64, 16, s, d) for s in SHAPES for d in (torch.float16, torch.float32)]
    + [("split_short", t, r, s, torch.bfloat16) for t in (1, 64, 300) for r in (16, 64)
       for s in SHAPES]
    + [("split_short_1k", 1024, 16, s, torch.bfloat16) for s in SHAPES]
    + [("rows", t, r, s, torch.bfloat16) for t in (1, 8, 16) for r in (16, 64) for s in SHAPES]
    + [("rows", 8, 16, s, d) for s in SHAPES for d in (torch.float16, torch.float32)]
    + [("split_wide", t, 16, s, torch.bfloat16) for t in (33, 64, 128) for s in SHAPES]
    + [("split_wide", 64, 16, "qkv_gqa", d) for d in (torch.float16, torch.float32)]
    + [("rows_wide", t, 16, s, torch.bfloat16) for t in (17, 64) for s in SHAPES]
    + [("rows_wide", 64, 16, "dense", d) for d in (torch.float16, torch.float32)]
    + [("rows_wide8", t, 16, s, torch.bfloat16) for t in (2, 16) for s in SHAPES]
    + [("rows_wide8", 16, 16, "qkv_gqa", d) for d in (torch.float16, torch.float32)]
    + [("split_wide512", t, 16, s, torch.bfloat16) for t in (33, 64, 128) for s in SHAPES]
    + [("split_wide512", 64, 16, "qkv_gqa", d) for d in (torch.float16, torch.float32)]
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


def _plain(config: cfg.SplitConfig | cfg.RowConfig) -> cfg.SplitConfig | cfg.RowConfig:
    """The same tiles launched plainly (no PDL, no short chains): the same bits."""
    if isinstance(config, cfg.RowConfig):
        return replace(config, pdl=False)
    return replace(config, pdl=False, cum_starts=False, prefetch=False)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("tokens", [1, 64, 700])
def test_split_pdl_chain_graph_replays(tokens: int, shape: str) -> None:
    """Three PDL split launches back to back in one graph, each reading the previous one's
    output as its x (like consecutive layers), replayed many times in a row with new
    row → adapter assignments between bursts. A programmatically launched expand must
    still finish before the next layer's shrink reads its output: every replay equals the
    eager chain bit for bit, the PDL chain equals the plain-split chain bit for bit (the
    flag changes only launch order), and each layer matches the float32 reference on the
    input it actually read."""
    from lora_kernels import linear

    gen = torch.Generator().manual_seed(200 + tokens)
    offs = SHAPES[shape]
    idx, x, a, b, out0 = _linear_case(gen, tokens, 16, offs, torch.bfloat16, "uniform")
    static_idx = idx.clone()
    n, n_cols = len(offs) - 1, offs[-1]
    chosen = cfg.choose_linear(tokens, n_cols, 4096, 16, n, 32)
    assert isinstance(chosen, cfg.SplitConfig | cfg.RowConfig)
    configs = [replace(chosen, pdl=True), PDL_SPLIT, PDL_SPLIT_1K, SHORT_SPLIT, SHORT_SPLIT_1K,
               ROWS, WIDE_SPLIT, ROWS_WIDE, WIDE512_SPLIT]
    outs = [out0.clone() for _ in configs]

    def chain(dst: list[torch.Tensor], cfgs: list[cfg.SplitConfig | cfg.RowConfig]) -> None:
        meta = build_lora_meta(static_idx, 32)
        for out in dst:
            out.copy_(out0)
        src = x
        for out, config in zip(dst, cfgs, strict=True):
            linear.lora_linear(out, src, a, b, meta, offs, config=config)
            src = out[:, :4096]

    graph = _capture(lambda: chain(outs, configs))
    layouts = ["uniform", "identical", "skewed", "distinct", "zipf"] * 3
    for i, popularity in enumerate(layouts):
        new = testing.entry_indices(tokens, 32, popularity, gen, none_frac=0.05 * (i % 5),
                                    used=1 + i % 32)
        if i == len(layouts) - 1:
            new[:] = -1  # every row base-only: nothing may be added anywhere in the chain
        static_idx.copy_(new.to(DEV))
        for _ in range(10):
            graph.replay()
        eager = [out0.clone() for _ in configs]
        chain(eager, configs)
        plain = [out0.clone() for _ in configs]
        chain(plain, [_plain(c) for c in configs])
        torch.cuda.synchronize()
        src = x
        for layer, (out, e, p) in enumerate(zip(outs, eager, plain, strict=True)):
            where = f"{popularity} layer {layer}"
            assert torch.equal(out, e), where
            assert torch.equal(out, p), where
            assert torch.equal(out[static_idx < 0], out0[static_idx < 0]), where
            if bool((static_idx >= 0).any()):
                ref = out0.float().clone()
                reference.lora_linear(ref, src.float(), a.float(), b.float(), static_idx, offs)
                assert _rel(out.float() - out0.float(), ref - out0.float()) < 1e-2, where
            src = out[:, :4096]
