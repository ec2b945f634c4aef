"""Single-launch split-K LoRA linear (``config.ArriveConfig``) against float64 einsums.

Runs in Triton's interpreter without a GPU (float32/float16; the interpreter does bf16 dots
wrong), compiled with one. Each call must leave the arrival counters at zero, so the same
counters serve the next call: every test makes several calls in a row on one buffer, with
new row → adapter assignments (-1 rows, entries without rows, all rows -1 included).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from lora_kernels import config as cfg  # noqa: E402
from lora_kernels import testing  # noqa: E402
from lora_kernels.meta import build_lora_meta  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
# 1 slice; 2 slices unaligned to BN = 16 (masked-B expand); 3 aligned slices.
SLICES = {1: (0, 40), 2: (0, 24, 56), 3: (0, 32, 48, 56)}
_KERNEL_MODULES = ("triton_common", "triton_linear", "triton_arrive", "arrive", "linear")


@pytest.fixture(autouse=True)
def _interpreted() -> Iterator[None]:
    """Reload the kernel modules if something imported them before TRITON_INTERPRET."""
    if not ON_GPU:
        from lora_kernels import triton_arrive
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(triton_arrive.split_arrive_kernel, InterpretedFunction):
            for name in _KERNEL_MODULES:
                module = sys.modules.get(f"lora_kernels.{name}")
                if module is not None:
                    importlib.reload(module)
    yield


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want.cpu()).norm() / want.cpu().norm().clamp_min(1e-30))


def _rand(gen: torch.Generator, *shape: int, scale: float = 1.0,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def _check_calls(offs: tuple[int, ...], config: cfg.ArriveConfig, dtype: torch.dtype,
                 layouts: list[tuple[str, float, int | None]], rank: int = 12, k: int = 72,
                 entries: int = 6, rows: int = 37, seed: int = 0) -> None:
    """One call per (popularity, -1 fraction, entries used) on fixed weights and one
    counters buffer; each delta must match the oracle, -1 rows stay bit-identical, and
    the counters are zero after every call."""
    from lora_kernels import arrive, linear

    gen = torch.Generator().manual_seed(seed)
    n = len(offs) - 1
    a = _rand(gen, n, entries, rank, k, scale=0.15, dtype=dtype)
    b = _rand(gen, entries, offs[-1], rank, scale=0.3, dtype=dtype)
    tiles, groups, _ = arrive.arrive_grid(rows, offs[-1], k, entries, config)
    counters = torch.zeros(tiles * groups + 5, dtype=torch.int32, device=DEVICE)
    for popularity, none_frac, used in layouts:
        idx = testing.entry_indices(rows, entries, popularity, gen, none_frac=none_frac,
                                    used=used).to(DEVICE)
        x = _rand(gen, rows, k, dtype=dtype)
        out0 = _rand(gen, rows, offs[-1], dtype=dtype)
        out = out0.clone()
        meta = build_lora_meta(idx, entries)
        workspace = torch.full((40000,), float("nan"), device=DEVICE)
        linear.lora_linear(out, x, a, b, meta, offs, config=config, workspace=workspace,
                           counters=counters)
        where = f"{popularity} none={none_frac} used={used}"
        assert int(counters.abs().sum()) == 0, where
        assert torch.equal(out[idx < 0], out0[idx < 0]), where
        if bool((idx >= 0).any()):
            delta = testing.oracle_linear(x.cpu(), a.cpu(), b.cpu(), idx.cpu(), offs)
            assert _rel(out.double() - out0.double(), delta) < TOL[dtype], where
        else:
            assert torch.equal(out, out0), where


LAYOUTS = [("zipf", 0.2, None), ("distinct", 0.0, None), ("skewed", 0.3, 2),
           ("identical", 0.5, 1), ("uniform", 1.0, None), ("uniform", 0.1, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n_slices", [1, 2, 3])
def test_arrive_repeated_calls_match_oracle(n_slices: int, dtype: torch.dtype) -> None:
    """Two column groups, K = 72 in chunks of 32 (three K programs, the last ragged),
    rank 12 inside a 16-wide rank tile, six layouts back to back on one counters buffer."""
    config = cfg.ArriveConfig(bm=16, bk=32, split_k=3, bn=16, col_splits=2)
    _check_calls(SLICES[n_slices], config, dtype, LAYOUTS, seed=n_slices)


@pytest.mark.parametrize(("n_slices", "col_splits", "split_k"), [(3, 1, 2), (2, 4, 1), (3, 4, 3)])
def test_arrive_group_and_split_shapes(n_slices: int, col_splits: int, split_k: int) -> None:
    """One group expanding the whole tile (the plain last-arriver kernel), a single K
    program (it is its own last arriver), and groups that each cover one slice or part
    of one."""
    config = cfg.ArriveConfig(bm=16, bk=32, split_k=split_k, bn=16, col_splits=col_splits)
    _check_calls(SLICES[n_slices], config, torch.float32, LAYOUTS[:3], rank=16,
                 seed=10 * n_slices + col_splits)


def test_arrive_shared_counters_stay_zero_across_shapes() -> None:
    """Default counters (shared per device) across calls whose grids differ in size, and
    agreement with the plain split path of the same tiles."""
    from lora_kernels import arrive, linear

    gen = torch.Generator().manual_seed(3)
    offs = SLICES[3]
    config = cfg.ArriveConfig(bm=16, bk=32, split_k=2, bn=16, col_splits=3)
    split = cfg.SplitConfig(bm=16, bk=32, split_k=2, bn=16, col_splits=3)
    a = _rand(gen, 3, 5, 16, 64, scale=0.15)
    b = _rand(gen, 5, offs[-1], 16, scale=0.3)
    for rows in (1, 19, 40, 3):
        idx = testing.entry_indices(rows, 5, "uniform", gen, none_frac=0.2).to(DEVICE)
        x, out0 = _rand(gen, rows, 64), _rand(gen, rows, offs[-1])
        meta = build_lora_meta(idx, 5)
        got, want = out0.clone(), out0.clone()
        linear.lora_linear(got, x, a, b, meta, offs, config=config)
        linear.lora_linear(want, x, a, b, meta, offs, config=split)
        assert _rel(got.double() - out0.double(), want.double() - out0.double()) < 1e-6
        tiles, groups, _ = arrive.arrive_grid(rows, offs[-1], 64, 5, config)
        assert int(arrive.shared_counters(torch.device(DEVICE), tiles * groups).abs().sum()) == 0


def test_arrive_rejects_bad_counters_and_workspace() -> None:
    from lora_kernels import linear

    gen = torch.Generator().manual_seed(4)
    offs = SLICES[1]
    x, a, b, out = _rand(gen, 5, 64), _rand(gen, 1, 2, 16, 64), _rand(gen, 2, 40, 16), \
        _rand(gen, 5, 40)
    meta = build_lora_meta(torch.zeros(5, dtype=torch.int32, device=DEVICE), 2)
    config = cfg.ArriveConfig(bm=16, bk=32, split_k=2, bn=16, col_splits=2)
    with pytest.raises(ValueError, match="counters must be contiguous int32"):
        linear.lora_linear(out, x, a, b, meta, offs, config=config,
                           counters=torch.zeros(8, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="counters must be contiguous int32"):
        linear.lora_linear(out, x, a, b, meta, offs, config=config,
                           counters=torch.zeros(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="workspace must be float32"):
        linear.lora_linear(out, x, a, b, meta, offs, config=config,
                           workspace=torch.zeros(10, device=DEVICE))


# ---- compiled on a GPU: real sizes, graph replays (run by benchmarks/kernel_candidates.py) ----
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
REAL = {"dense": (0, 4096), "qkv_gqa": (0, 4096, 5120, 6144)}
GPU_TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}
REAL_CONFIGS = {
    "small": cfg.ArriveConfig(bm=16, bk=256, split_k=8, bn=64, col_splits=16),
    "small_g1": cfg.ArriveConfig(bm=16, bk=256, split_k=8, bn=64, col_splits=1),
    "mid": cfg.ArriveConfig(bm=16, bk=128, split_k=8, bn=128, col_splits=8),
    # Rank 64 stacks up to 256 rank rows: a 64-wide K tile keeps the pipeline in shared memory.
    "mid_r64": cfg.ArriveConfig(bm=16, bk=64, split_k=8, bn=128, col_splits=8),
    "large": cfg.ArriveConfig(bm=64, bk=128, split_k=4, bn=128, col_splits=16, warps=8),
}


def _real_case(gen: torch.Generator, tokens: int, rank: int, offs: tuple[int, ...],
               dtype: torch.dtype, popularity: str = "uniform") -> tuple:
    k, n = 4096, len(offs) - 1
    idx = testing.entry_indices(tokens, 32, popularity, gen, none_frac=0.2, used=8)
    x = torch.randn(tokens, k, generator=gen).to(DEVICE, dtype)
    a = (torch.randn(n, 32, rank, k, generator=gen) / 64).to(DEVICE, dtype)
    b = (torch.randn(32, offs[-1], rank, generator=gen) / 4).to(DEVICE, dtype)
    out0 = torch.randn(tokens, offs[-1], generator=gen).to(DEVICE, dtype)
    return idx.to(DEVICE), x, a, b, out0


@pytest.mark.parametrize(("name", "tokens", "rank", "shape", "dtype"), [
    *[(nm, t, 16, s, torch.bfloat16) for nm, t in (("small", 1), ("small_g1", 1), ("mid", 64),
                                                    ("large", 1024)) for s in REAL],
    *[("mid", 64, 16, s, d) for s in REAL for d in (torch.float16, torch.float32)],
    *[("mid_r64", 64, 64, s, torch.bfloat16) for s in REAL],
])
@pytest.mark.gpu
@needs_gpu
def test_arrive_real_sizes(name: str, tokens: int, rank: int, shape: str,
                           dtype: torch.dtype) -> None:
    from lora_kernels import arrive, linear

    gen = torch.Generator().manual_seed(tokens + rank)
    offs = REAL[shape]
    idx, x, a, b, out0 = _real_case(gen, tokens, rank, offs, dtype)
    config = REAL_CONFIGS[name]
    meta = build_lora_meta(idx, 32)
    out = out0.clone()
    linear.lora_linear(out, x, a, b, meta, offs, config=config)
    ref = out0.float().clone()
    from lora_kernels import reference

    reference.lora_linear(ref, x.float(), a.float(), b.float(), idx, offs)
    assert _rel(out.float() - out0.float(), ref - out0.float()) < GPU_TOL[dtype]
    assert torch.equal(out[idx < 0], out0[idx < 0])
    again = out0.clone()
    linear.lora_linear(again, x, a, b, meta, offs, config=config)
    assert torch.equal(again, out)  # the same sum whichever K program arrives last
    tiles, groups, _ = arrive.arrive_grid(tokens, offs[-1], 4096, 32, config)
    assert int(arrive.shared_counters(x.device, tiles * groups).abs().sum()) == 0


@pytest.mark.parametrize("tokens", [1, 64, 700])
@pytest.mark.parametrize("shape", list(REAL))
@pytest.mark.gpu
@needs_gpu
def test_arrive_chain_graph_replays(tokens: int, shape: str) -> None:
    """Three single-launch layers in one graph, each reading the previous one's output as
    x, replayed ten times per burst with new assignments (all -1 rows last): counters must
    be back at zero after every replay without any memset node, each replay equals the
    eager chain bit for bit, and each layer matches the float32 reference."""
    from lora_kernels import arrive, linear, reference

    gen = torch.Generator().manual_seed(300 + tokens)
    offs = REAL[shape]
    idx, x, a, b, out0 = _real_case(gen, tokens, 16, offs, torch.bfloat16)
    static_idx = idx.clone()
    configs = [REAL_CONFIGS["small"], REAL_CONFIGS["mid"], REAL_CONFIGS["large"]]
    outs = [out0.clone() for _ in configs]

    def chain(dst: list[torch.Tensor]) -> None:
        meta = build_lora_meta(static_idx, 32)
        for out in dst:
            out.copy_(out0)
        src = x
        for out, config in zip(dst, configs, strict=True):
            linear.lora_linear(out, src, a, b, meta, offs, config=config)
            src = out[:, :4096]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(outs)  # compile, and allocate the shared counters outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(outs)
    counters = arrive.shared_counters(x.device, 1)._base
    assert counters is not None
    layouts = ["uniform", "identical", "skewed", "distinct", "zipf"] * 2
    for i, popularity in enumerate(layouts):
        new = testing.entry_indices(tokens, 32, popularity, gen, none_frac=0.05 * (i % 5),
                                    used=1 + 3 * i)
        if i == len(layouts) - 1:
            new[:] = -1
        static_idx.copy_(new.to(DEVICE))
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        assert int(counters.abs().sum()) == 0, popularity
        eager = [out0.clone() for _ in configs]
        chain(eager)
        src = x
        for layer, (out, e) in enumerate(zip(outs, eager, strict=True)):
            where = f"{popularity} layer {layer}"
            assert torch.equal(out, e), where
            assert torch.equal(out[static_idx < 0], out0[static_idx < 0]), where
            if bool((static_idx >= 0).any()):
                ref = out0.float().clone()
                reference.lora_linear(ref, src.float(), a.float(), b.float(), static_idx, offs)
                assert _rel(out.float() - out0.float(), ref - out0.float()) < 1e-2, where
            src = out[:, :4096]
