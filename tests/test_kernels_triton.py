"""Triton LoRA kernels against the reference and float64 einsums on small shapes.

Without a GPU the kernels run in Triton's interpreter: TRITON_INTERPRET must be set before
the kernel modules are decorated, so it is set here before anything imports them (ops
imports them lazily) and ``_interpreted`` reloads them if something did earlier. With a GPU
the same tests run the compiled kernels. Outputs are poisoned (NaN) where the op must
write every element; add-in-place ops must leave untouched rows bit-identical.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from lora_kernels import config as cfg  # noqa: E402
from lora_kernels import ops, reference, testing  # noqa: E402
from lora_kernels.meta import build_lora_meta  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
SLICES = {1: (0, 40), 2: (0, 24, 56), 3: (0, 32, 48, 56)}
VARIANTS: dict[str, tuple[int, cfg.LinearConfig | None]] = {
    "fused": (8, cfg.FusedConfig(bm=16, bk=32, bn=16, col_splits=2)),
    "split": (16, cfg.SplitConfig(bm=16, bk=32, split_k=4, bn=16, col_splits=2)),
    # PDL runs as the plain split without a Hopper GPU (the interpreter) and with it on one;
    # K = 72 in chunks of 32 gives three partials, the last one ragged.
    "split_pdl": (16, cfg.SplitConfig(bm=16, bk=32, split_k=3, bn=16, col_splits=1, pdl=True)),
    # Short chains: starts from the counts, expand prefetching (two blocks a program, so
    # the next-block loads run; unaligned 2-slice offsets take the plain expand).
    "split_short": (16, cfg.SplitConfig(bm=16, bk=32, split_k=3, bn=16, col_splits=2, pdl=True,
                                        cum_starts=True, prefetch=True)),
    # Per-row kernels (no sort lookup): ragged last K chunk, PDL flag (plain off Hopper).
    "rows": (16, cfg.RowConfig(bk=32, split_k=3, bn=16, pdl=True)),
    "auto": (16, None),
}
_KERNEL_MODULES = ("triton_common", "triton_linear", "triton_rows", "triton_arrive",
                   "triton_moe", "triton_meta", "arrive", "linear", "embedding", "moe")


def _interpreted() -> None:
    if ON_GPU:
        return
    from lora_kernels import triton_linear
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton_linear.fused_lora_kernel, InterpretedFunction):
        for name in _KERNEL_MODULES:
            module = sys.modules.get(f"lora_kernels.{name}")
            if module is not None:
                importlib.reload(module)


@pytest.fixture(autouse=True)
def _triton_backend() -> Iterator[None]:
    _interpreted()
    with ops.use_backend("triton"):
        yield


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want.cpu()).norm() / want.cpu().norm().clamp_min(1e-30))


def _rand(gen: torch.Generator, *shape: int, scale: float = 1.0,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


# The default suite runs every forced path in both dtypes and the heuristic path in float16;
# the rest of the product is marked slow.
LINEAR_PARAMS = [
    pytest.param(v, d, marks=[pytest.mark.slow] if (v, d) == ("auto", torch.float32) else [],
                 id=f"{v}-{str(d).split('.')[-1]}")
    for v in VARIANTS for d in DTYPES
]
MOE_PARAMS = [
    pytest.param(p, d, marks=[pytest.mark.slow] if (d, p) in (
        (torch.float16, "identical"), (torch.float16, "uniform")) else [],
        id=f"{p}-{str(d).split('.')[-1]}")
    for p in ("identical", "uniform", "skewed") for d in DTYPES
]


@pytest.mark.parametrize(("variant", "dtype"), LINEAR_PARAMS)
@pytest.mark.parametrize("n_slices", [1, 2, 3])
@pytest.mark.parametrize("popularity", testing.POPULARITIES)
def test_lora_linear(popularity: str, n_slices: int, variant: str, dtype: torch.dtype) -> None:
    from lora_kernels import linear

    gen = torch.Generator().manual_seed(7 * n_slices + len(popularity))
    rank, config = VARIANTS[variant]
    offs = SLICES[n_slices]
    m, k, w = 37, 72, 6
    idx = testing.entry_indices(m, w, popularity, gen, none_frac=0.2).to(DEVICE)
    x = _rand(gen, m, k, dtype=dtype)
    a = _rand(gen, n_slices, w, rank, k, scale=0.15, dtype=dtype)
    b = _rand(gen, w, offs[-1], rank, scale=0.3, dtype=dtype)
    out0 = _rand(gen, m, offs[-1], dtype=dtype)
    out = out0.clone()
    meta = build_lora_meta(idx, w)
    workspace = torch.full((16384,), float("nan"), device=DEVICE)
    linear.lora_linear(out, x, a, b, meta, offs, config=config, workspace=workspace)
    delta = testing.oracle_linear(x.cpu(), a.cpu(), b.cpu(), idx.cpu(), offs)
    assert _rel(out.double() - out0.double(), delta) < TOL[dtype]
    assert torch.equal(out[idx < 0], out0[idx < 0])
    ref = out0.float().clone()
    reference.lora_linear(ref, x.float(), a.float(), b.float(), idx, offs)
    assert _rel(out.double() - out0.double(), ref.double() - out0.double()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("popularity", ["distinct", "zipf"])
def test_ops_add_lora_and_shrink_expand(popularity: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    offs = SLICES[3]
    m, k, r, w = 21, 64, 16, 5
    idx = testing.entry_indices(m, w, popularity, gen, none_frac=0.3).to(DEVICE)
    x = _rand(gen, m, k, dtype=dtype)
    a = _rand(gen, 3, w, r, k, scale=0.15, dtype=dtype)
    b = _rand(gen, w, offs[-1], r, scale=0.3, dtype=dtype)
    meta = build_lora_meta(idx, w)
    delta = testing.oracle_linear(x.cpu(), a.cpu(), b.cpu(), idx.cpu(), offs)
    out0 = _rand(gen, m, offs[-1], dtype=dtype)
    out = out0.clone()
    ops.add_lora(out, x, a, b, meta, offs)
    assert _rel(out.double() - out0.double(), delta) < TOL[dtype]
    assert torch.equal(out[idx < 0], out0[idx < 0])
    y = ops.lora_shrink(x, a, meta)  # fresh output: every element, -1 rows included
    assert y.dtype == torch.float32 and bool(torch.isfinite(y).all())
    assert _rel(y, testing.oracle_shrink(x.cpu(), a.cpu(), idx.cpu())) < TOL[dtype]
    from lora_kernels import linear

    poisoned = torch.full_like(y, float("nan"))
    linear.lora_shrink(x, a, meta, out=poisoned)
    assert bool(torch.isfinite(poisoned).all())
    out = out0.clone()
    ops.lora_expand(out, y, b, meta, offs)
    assert _rel(out.double() - out0.double(), delta) < TOL[dtype]
    assert torch.equal(out[idx < 0], out0[idx < 0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("popularity", ["identical", "uniform", "skewed"])
def test_lora_embedding(popularity: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(9)
    m, v, h, r, w = 45, 50, 40, 8, 4
    idx = testing.entry_indices(m, w, popularity, gen, none_frac=0.2).to(DEVICE)
    tok = torch.randint(-4, v + 4, (m,), generator=gen).to(DEVICE)
    a, b = _rand(gen, w, v, r, dtype=dtype), _rand(gen, w, h, r, scale=0.3, dtype=dtype)
    out0 = _rand(gen, m, h, dtype=dtype)
    out = out0.clone()
    ops.add_lora_embedding(out, tok, a, b, build_lora_meta(idx, w))
    delta = testing.oracle_embedding(tok.cpu(), a.cpu(), b.cpu(), idx.cpu())
    assert _rel(out.double() - out0.double(), delta) < TOL[dtype]
    untouched = (idx < 0) | (tok < 0) | (tok >= v)
    assert torch.equal(out[untouched], out0[untouched])


def _moe_case(gen: torch.Generator, dtype: torch.dtype, skew: str, popularity: str,
              t: int = 19, rank: int = 8) -> tuple:
    h, inter, e_global, k, s = 32, 24, 8, 3, 3
    expert_map = torch.tensor([0, -1, 1, -1, 2, 3, -1, -1], device=DEVICE)
    e = 4
    ids, wts = testing.routing(t, k, e_global, skew, gen)
    x = _rand(gen, t, h, dtype=dtype)
    w13 = _rand(gen, e, 2 * inter, h, scale=0.2, dtype=dtype)
    w2 = _rand(gen, e, h, inter, scale=0.2, dtype=dtype)
    lora = tuple(_rand(gen, *shape, scale=0.2, dtype=dtype) for shape in
                 ((2, s * e, rank, h), (s * e, 2 * inter, rank), (1, s * e, rank, inter),
                  (s * e, h, rank)))
    slots = testing.entry_indices(t, s, popularity, gen, none_frac=0.25).to(DEVICE)
    return x, wts.to(DEVICE), ids.to(DEVICE), w13, w2, expert_map, lora, slots


@pytest.mark.parametrize(("popularity", "dtype"), MOE_PARAMS)
@pytest.mark.parametrize("skew", testing.ROUTINGS)
def test_fused_moe(skew: str, popularity: str, dtype: torch.dtype) -> None:
    from lora_kernels import moe

    gen = torch.Generator().manual_seed(len(skew) + 3 * len(popularity))
    x, wts, ids, w13, w2, emap, lora, slots = _moe_case(gen, dtype, skew, popularity)
    out = torch.full_like(x, float("nan"))
    got = moe.fused_moe(x, wts, ids, w13, w2, emap, reference.MoELoRA(*lora), slots, out=out)
    assert got is out and bool(torch.isfinite(out).all())
    cpu = [t.cpu() for t in (x, wts, ids, w13, w2, emap)]
    want = testing.oracle_moe(*cpu, tuple(t.cpu() for t in lora), slots.cpu())
    assert _rel(out, want) < TOL[dtype]
    lf = reference.MoELoRA(*(t.float() for t in lora))
    ref = reference.fused_moe(x.float(), wts, ids, w13.float(), w2.float(), emap, lf, slots)
    assert _rel(out, ref.double()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_moe_without_lora(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x, wts, ids, w13, w2, emap, _, _ = _moe_case(gen, dtype, "uniform", "uniform", t=23)
    got = ops.fused_moe(x, wts, ids, w13, w2, emap)
    cpu = [t.cpu() for t in (x, wts, ids, w13, w2, emap)]
    assert _rel(got, testing.oracle_moe(*cpu, None, None)) < TOL[dtype]
    # Tokens whose experts are all remote get exact zeros.
    remote = (emap[ids] < 0).all(dim=1)
    assert bool((got[remote] == 0).all())


def test_moe_all_rows_without_adapter() -> None:
    gen = torch.Generator().manual_seed(4)
    x, wts, ids, w13, w2, emap, lora, slots = _moe_case(gen, torch.float32, "uniform", "uniform")
    got = ops.fused_moe(x, wts, ids, w13, w2, emap, reference.MoELoRA(*lora),
                        torch.full_like(slots, -1))
    base = ops.fused_moe(x, wts, ids, w13, w2, emap)
    assert torch.allclose(got, base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("rows", "entries"), [(1, 32), (37, 6), (300, 32), (700, 63), (9, 1)])
def test_one_launch_meta_matches_torch(rows: int, entries: int) -> None:
    from lora_kernels.meta import build_lora_meta_torch
    from lora_kernels.triton_meta import build_lora_meta_triton

    gen = torch.Generator().manual_seed(rows)
    idx = testing.entry_indices(rows, entries, "zipf", gen, none_frac=0.3).to(DEVICE)
    want = build_lora_meta_torch(idx, entries)
    got = build_lora_meta_triton(idx, entries)
    for field in ("sorted_rows", "seg_counts", "seg_starts", "active_entries", "num_active"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_pdl_rank64_unaligned_slices(dtype: torch.dtype) -> None:
    """Rank 64 (J = 256 stacked rank rows) over slices no column block aligns with, so the
    expand takes its masked-B branch; PDL and plain split give the same bits."""
    from lora_kernels import linear

    gen = torch.Generator().manual_seed(11)
    offs = SLICES[2]
    m, k, w, rank = 20, 64, 3, 64
    idx = testing.entry_indices(m, w, "skewed", gen, none_frac=0.25).to(DEVICE)
    x = _rand(gen, m, k, dtype=dtype)
    a = _rand(gen, 2, w, rank, k, scale=0.1, dtype=dtype)
    b = _rand(gen, w, offs[-1], rank, scale=0.2, dtype=dtype)
    out0 = _rand(gen, m, offs[-1], dtype=dtype)
    meta = build_lora_meta(idx, w)
    config = cfg.SplitConfig(bm=16, bk=32, split_k=2, bn=32, col_splits=2, pdl=True)
    delta = testing.oracle_linear(x.cpu(), a.cpu(), b.cpu(), idx.cpu(), offs)
    out, plain = out0.clone(), out0.clone()
    linear.lora_linear(out, x, a, b, meta, offs, config=config)
    linear.lora_linear(plain, x, a, b, meta, offs, config=replace(config, pdl=False))
    assert _rel(out.double() - out0.double(), delta) < TOL[dtype]
    assert torch.equal(out[idx < 0], out0[idx < 0])
    assert torch.equal(out, plain)


@pytest.mark.parametrize("n_slices", [1, 3])
@pytest.mark.parametrize("popularity", ["identical", "distinct", "skewed"])
def test_split_short_chains_same_bits(popularity: str, n_slices: int) -> None:
    """Starts taken from the counts and the prefetching expand (1 and 3 column blocks a
    program, ragged last block) give exactly the plain split's bits; -1 rows untouched."""
    from lora_kernels import linear

    gen = torch.Generator().manual_seed(13 + n_slices)
    offs = SLICES[n_slices]
    m, k, w, rank = 41, 72, 5, 16
    idx = testing.entry_indices(m, w, popularity, gen, none_frac=0.25).to(DEVICE)
    x = _rand(gen, m, k, dtype=torch.float16)
    a = _rand(gen, n_slices, w, rank, k, scale=0.15, dtype=torch.float16)
    b = _rand(gen, w, offs[-1], rank, scale=0.3, dtype=torch.float16)
    out0 = _rand(gen, m, offs[-1], dtype=torch.float16)
    meta = build_lora_meta(idx, w)
    assert meta.cum_starts
    for col_splits in (1, 3):
        plain = cfg.SplitConfig(bm=16, bk=32, split_k=3, bn=16, col_splits=col_splits)
        want, got = out0.clone(), out0.clone()
        linear.lora_linear(want, x, a, b, meta, offs, config=plain)
        linear.lora_linear(got, x, a, b, meta, offs,
                           config=replace(plain, cum_starts=True, prefetch=True))
        assert torch.equal(got, want), col_splits
        assert torch.equal(got[idx < 0], out0[idx < 0])


@pytest.mark.parametrize("variant", ["fused", "split", "split_pdl", "split_short", "rows"])
def test_linear_all_rows_unassigned_adds_nothing(variant: str) -> None:
    from lora_kernels import linear

    gen = torch.Generator().manual_seed(5)
    offs = SLICES[1]
    x, a = _rand(gen, 9, 72), _rand(gen, 1, 4, 16, 72)
    b, out0 = _rand(gen, 4, 40, 16), _rand(gen, 9, 40)
    meta = build_lora_meta(torch.full((9,), -1, dtype=torch.int32, device=DEVICE), 4)
    out = out0.clone()
    linear.lora_linear(out, x, a, b, meta, offs, config=VARIANTS[variant][1])
    assert torch.equal(out, out0)


def test_choose_linear_paths() -> None:
    """Rank 16: the per-row pair for dense layers up to 64 rows and multi-slice ones up to
    16 (v8, H100), the split path above; rank 64 never takes the per-row pair, and above
    512 rows keeps the v6 split tiles without short chains on dense layers (measured faster
    there) and takes 64-row split tiles on multi-slice ones (v16)."""
    cfg.choose_linear.cache_clear()

    def pick(rows: int, n: int, slices: int, rank: int = 16) -> cfg.LinearConfig:
        return cfg.choose_linear(rows, n, 4096, rank, slices, 32)

    assert pick(1, 4096, 1) == cfg.RowConfig(bk=512, split_k=8, bn=256, pdl=True)
    assert pick(64, 4096, 1) == cfg.RowConfig(bk=256, split_k=16, bn=256, pdl=True)
    # Above: splits with one 256-column expand block a program (v12).
    dense128 = pick(128, 4096, 1)
    assert isinstance(dense128, cfg.SplitConfig) and (dense128.bn, dense128.col_splits) == (256, 16)
    gqa256 = pick(256, 6144, 3)
    assert isinstance(gqa256, cfg.SplitConfig) and (gqa256.bn, gqa256.col_splits) == (256, 24)
    assert isinstance(pick(65, 4096, 1), cfg.SplitConfig)
    assert pick(1, 6144, 3) == cfg.RowConfig(bk=256, split_k=16, bn=128, pdl=True)
    assert pick(16, 6144, 3) == cfg.RowConfig(bk=256, split_k=8, bn=256, expand_warps=8,
                                              pdl=True)
    gqa64 = pick(64, 6144, 3)
    assert isinstance(gqa64, cfg.SplitConfig)
    assert (gqa64.shrink_warps, gqa64.expand_warps) == (2, 4)
    # Multi-slice expands at 17-128 rows (v11, v15): one 128-column block a program of 2
    # warps up to 32 rows, one 512-column block a program above; the ranges follow N.
    short = dict(pdl=True, cum_starts=True, prefetch=True)
    assert pick(32, 6144, 3) == cfg.SplitConfig(bm=16, bk=128, split_k=8, bn=128, col_splits=48,
                                                shrink_warps=2, expand_warps=2, **short)
    assert gqa64 == cfg.SplitConfig(bm=16, bk=128, split_k=8, bn=512, col_splits=12,
                                    shrink_warps=2, expand_warps=4, **short)
    assert pick(128, 22016, 2) == replace(gqa64, col_splits=43)
    # float32 layers keep two 256-column blocks (a 512-wide expand overflows shared memory).
    assert cfg.choose_linear(64, 6144, 4096, 16, 3, 32, itemsize=4) == replace(gqa64, bn=256)
    assert all(isinstance(pick(r, n, s, rank=64), cfg.SplitConfig)
               for r in (1, 16, 64) for n, s in ((4096, 1), (6144, 3)))
    r64 = pick(1024, 4096, 1, rank=64)
    assert isinstance(r64, cfg.SplitConfig)
    assert (r64.col_splits, r64.expand_warps, r64.cum_starts, r64.prefetch) == (8, 8, False, False)
    # Rank-64 multi-slice above 512 rows: the v16 split (16-bit layers), fused in float32.
    gqa_r64 = cfg.SplitConfig(bm=64, bk=64, split_k=4, bn=128, col_splits=12, expand_warps=8,
                              cum_starts=True, prefetch=True)
    assert pick(1024, 6144, 3, rank=64) == gqa_r64
    assert pick(4096, 6144, 3, rank=64) == replace(gqa_r64, split_k=2)
    assert isinstance(cfg.choose_linear(1024, 6144, 4096, 64, 3, 32, itemsize=4),
                      cfg.FusedConfig)
    r16 = pick(1024, 4096, 1)
    assert isinstance(r16, cfg.SplitConfig)
    assert (r16.col_splits, r16.expand_warps, r16.cum_starts, r16.prefetch) == (32, 4, True, True)


def test_choose_linear_pdl_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split path gets PDL up to SPLIT_PDL_MAX_ROWS rows on multi-slice layers and
    SPLIT_PDL_MAX_ROWS_1SLICE rows on single-slice ones (the H100 measurement in
    docs/KERNELS.md v5); the tiles are those of the plain split, and the fused path never
    carries the flag. With both limits at 0 the measured plain-split choices come back."""
    dense, gqa = (4096, 1), (6144, 3)
    cfg.choose_linear.cache_clear()
    try:
        def pick(rows: int, shape: tuple[int, int], rank: int = 16) -> cfg.LinearConfig:
            return cfg.choose_linear(rows, shape[0], 4096, rank, shape[1], 32)

        pdl = {(rows, name): getattr(pick(rows, shape), "pdl", None)
               for rows in (1, 16, 64, 256, 512, 513, 1024, 1025, 2048, 4096)
               for name, shape in (("dense", dense), ("gqa", gqa))}
        assert pdl == {
            (1, "dense"): True, (16, "dense"): True, (64, "dense"): True,
            (256, "dense"): True, (512, "dense"): True, (513, "dense"): True,
            (1024, "dense"): True, (1025, "dense"): False, (2048, "dense"): False,
            (4096, "dense"): None,  # fused
            (1, "gqa"): True, (16, "gqa"): True, (64, "gqa"): True, (256, "gqa"): True,
            (512, "gqa"): True, (513, "gqa"): False, (1024, "gqa"): False,
            (1025, "gqa"): False, (2048, "gqa"): False, (4096, "gqa"): False,
        }
        # Rank 64 keeps the flag with the K tile shrunk to fit shared memory.
        r64 = pick(64, gqa, rank=64)
        assert isinstance(r64, cfg.SplitConfig) and r64.pdl and r64.bk == 64
        with_pdl, rows_pdl = pick(128, dense), pick(64, dense)
        monkeypatch.setattr(cfg, "SPLIT_PDL_MAX_ROWS", 0)
        monkeypatch.setattr(cfg, "SPLIT_PDL_MAX_ROWS_1SLICE", 0)
        cfg.choose_linear.cache_clear()
        plain = pick(128, dense)
        assert plain == cfg.SplitConfig(bm=16, bk=128, split_k=8, bn=256, col_splits=16,
                                        shrink_warps=2, expand_warps=4, cum_starts=True,
                                        prefetch=True)
        assert with_pdl == replace(plain, pdl=True)
        assert rows_pdl == replace(pick(64, dense), pdl=True)
        assert not any(getattr(pick(rows, shape), "pdl", False)
                       for rows in (1, 64, 1024) for shape in (dense, gqa))
    finally:
        cfg.choose_linear.cache_clear()
