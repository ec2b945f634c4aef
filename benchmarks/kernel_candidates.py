"""LoRA linear launch-path candidates on the GPU, in one run: checks, then graph-replay timings.

  PYTHONPATH=$PWD:$PWD/kernels python3 benchmarks/kernel_candidates.py
      [--set arrive|v5|v7|v8|v9|v10|v11|v12|v13|v14|v15|v16] [--out PATH] [--no-tests] [--list]

Sets: ``arrive`` (default; → results/kernels_candidates_v3_h100.json) puts the
single-launch split-K kernel (``config.ArriveConfig``: the last K program of each row
tile × column group expands it, per-tile arrival counters that reset themselves) beside
the plain split and today's split + PDL choice, dense and GQA qkv, T = 1, 8, 64, 1024, 1
and 32 adapters, rank 16, over several column-group counts G; ``v5`` is the PDL /
split-tile set of docs/KERNELS.md v5 (→ results/kernels_candidates_v2_h100.json); ``v7``
the short dependent-load chains (tile starts from the counts, an expand prefetching row ids,
B and output tiles before the PDL wait) on today's tiles and a few column / K splits
(→ results/kernels_candidates_v4_h100.json); ``v8`` the per-row kernels (``config.RowConfig``)
at few rows and split variants at 64 rows beside the v6 choice and today's heuristic, plus
rank-64 checks of today's heuristic, with the whole GPU kernel suite
(→ results/kernels_candidates_v5_h100.json); ``v9`` split tiles around today's at 32-128 rows
(the GQA 64/32 miss; → results/kernels_candidates_v6_h100.json); ``v10`` tiles for steps with
one or eight distinct adapters (→ results/kernels_candidates_v7_h100.json); ``v11`` the
expand's column tiles at 32-128 rows (→ results/kernels_candidates_v8_h100.json); ``v12`` the
same at 64-512 rows and 1 / 8 / 32 adapters (→ results/kernels_candidates_v9_h100.json);
``v13`` splits with those expands against the per-row pair at dense 17-64 rows
(→ results/kernels_candidates_v10_h100.json); ``v14`` wider expand blocks at ≤ 16 and ~1k rows
(→ results/kernels_candidates_v11_h100.json); ``v15`` the shrink's K tiling under v11's
expands at 32-128 rows (→ results/kernels_candidates_v12_h100.json); ``v16`` split tiles for
rank 64 above 512 rows (→ results/kernels_candidates_v13_h100.json).
1. GPU tests run in a subprocess (when pytest is installed) while the candidates compile
   in parallel processes: ``tests/test_kernels_arrive.py`` for ``arrive``, the PDL tests
   of tests/test_kernels_gpu.py (``-k pdl``) for ``v5``.
2. Each candidate is checked against the float32 reference on its case (from the case's
   pristine output, restored before every check and every timing), then timed with
   do_bench_cudagraph. Candidates: the plain split / fused choice measured in
   docs/KERNELS.md ("legacy": ``config.choose_linear`` with PDL off), today's heuristic
   (``config.choose_linear``), the legacy split tiles with PDL, and the set's own. A PDL
   candidate whose tiles equal the legacy split's must give the same bits
   (``bit_equal_legacy``); an arrive candidate must leave its arrival counters at zero
   after the timing replays (``counters_zero``), and whether its bits equal the legacy
   split's is recorded (``bit_equal_split``, information only: a different kernel).
The table says which path wins where. About 1-2 min (v5) / 2-3 min (arrive) on an H100.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "kernels"), str(Path(__file__).resolve().parent)]

from lora_kernels import config as cfg  # noqa: E402
from lora_kernels import reference  # noqa: E402

from kernels import SHAPES, SLOTS, Case, _bench, copy_bandwidth, warm_compile  # noqa: E402

Key = tuple[str, int, int, int]
# (shape, rank, tokens, adapters): the goal misses first, then the regression set.
MISSING: list[Key] = [("dense", 16, 1, 1), ("dense", 16, 64, 32), ("qkv_gqa", 16, 64, 32),
                      ("dense", 16, 1024, 1), ("qkv_gqa", 16, 1024, 1), ("qkv_gqa", 16, 1024, 8)]
REGRESSION: list[Key] = (
    [("qkv_gqa", 16, 1, 1), ("dense", 16, 16, 32), ("qkv_gqa", 16, 16, 32),
     ("dense", 16, 1024, 8)]
    + [(s, 16, t, 32) for t in (256, 512, 1024, 4096) for s in ("dense", "qkv_gqa")])
# Best recorded peer, graph replay, rank 16 (docs/KERNELS.md); goal: ours <= peer / 2.
PEER_US = {("dense", 1, 1): 8.42, ("dense", 16, 32): 12.01, ("dense", 64, 32): 16.36,
           ("dense", 256, 32): 22.43, ("dense", 1024, 1): 15.48, ("dense", 1024, 32): 40.49,
           ("dense", 4096, 32): 122.49, ("qkv_gqa", 1, 1): 12.97, ("qkv_gqa", 16, 32): 15.81,
           ("qkv_gqa", 64, 32): 19.81, ("qkv_gqa", 256, 32): 27.85,
           ("qkv_gqa", 1024, 1): 44.99, ("qkv_gqa", 1024, 32): 76.16,
           ("qkv_gqa", 4096, 32): 280.71,
           # one- and eight-adapter rows (the same anchors; v10 below)
           ("dense", 16, 1): 6.98, ("dense", 16, 8): 9.29, ("dense", 64, 1): 7.34,
           ("dense", 64, 8): 9.62, ("dense", 256, 1): 11.13, ("dense", 256, 8): 13.80,
           ("dense", 1024, 8): 21.68, ("dense", 4096, 1): 54.13, ("dense", 4096, 8): 68.75,
           ("qkv_gqa", 16, 1): 11.55, ("qkv_gqa", 16, 8): 14.94, ("qkv_gqa", 64, 1): 12.82,
           ("qkv_gqa", 64, 8): 17.81, ("qkv_gqa", 256, 1): 19.35, ("qkv_gqa", 256, 8): 31.31,
           ("qkv_gqa", 1024, 8): 77.39}
S = cfg.SplitConfig
A = cfg.ArriveConfig
ARRIVE_CASES: list[Key] = [(s, 16, t, a) for s in ("dense", "qkv_gqa")
                           for t in (1, 8, 64, 1024) for a in (1, 32)]
RESULTS = ROOT / "benchmarks" / "results"
SETS = {"arrive": (ARRIVE_CASES, [], RESULTS / "kernels_candidates_v3_h100.json"),
        "v5": (MISSING, REGRESSION, RESULTS / "kernels_candidates_v2_h100.json"),
        "v7": (MISSING, REGRESSION, RESULTS / "kernels_candidates_v4_h100.json"),
        "v8": ([*MISSING, ("dense", 16, 16, 1), ("qkv_gqa", 16, 16, 1), ("dense", 16, 8, 32),
                ("qkv_gqa", 16, 8, 32)],
               [*REGRESSION, ("dense", 64, 1, 1), ("dense", 64, 64, 32), ("qkv_gqa", 64, 64, 32),
                ("qkv_gqa", 64, 1024, 32), ("dense", 64, 1024, 32)],
               RESULTS / "kernels_candidates_v5_h100.json")}
GQA64: list[Key] = [("qkv_gqa", 16, 64, 32), ("qkv_gqa", 16, 128, 32), ("qkv_gqa", 16, 32, 32)]
SETS["v9"] = (GQA64, [("dense", 16, 128, 32), ("dense", 16, 64, 32)],
              RESULTS / "kernels_candidates_v6_h100.json")
# v10: tiles for steps whose rows hold few distinct adapters (one or eight of 32 slots).
FEW: list[Key] = [("dense", 16, t, a) for t in (16, 64, 256, 1024) for a in (1, 8)] + [
    ("dense", 16, 4096, 8)] + [("qkv_gqa", 16, t, a) for t in (16, 64, 256, 1024)
                               for a in (1, 8)]
SETS["v10"] = (FEW, [], RESULTS / "kernels_candidates_v7_h100.json")
# v11: the expand's column tiling around today's at 32-128 rows (GQA 64/32, at the line).
SETS["v11"] = (GQA64, [("dense", 16, 64, 32)], RESULTS / "kernels_candidates_v8_h100.json")
# v12: the same lever at 64-512 rows and one / eight / 32 adapters.
COLS: list[Key] = ([(s, 16, 256, a) for s in ("dense", "qkv_gqa") for a in (1, 8, 32)]
                   + [("dense", 16, 64, 1), ("dense", 16, 64, 8), ("qkv_gqa", 16, 64, 1)])
SETS["v12"] = (COLS, [("dense", 16, 128, 32), ("dense", 16, 512, 32), ("qkv_gqa", 16, 512, 32)],
               RESULTS / "kernels_candidates_v9_h100.json")
# v13: dense 17-64 rows, where the per-row pair is chosen: against splits with v12's expands.
SETS["v13"] = ([("dense", 16, t, a) for t in (32, 64) for a in (1, 8, 32)], [],
               RESULTS / "kernels_candidates_v10_h100.json")
# v15: the shrink's K tiling under v11's expands at 32-128 rows (GQA 64/32's margin).
SETS["v15"] = ([*GQA64, ("qkv_gqa", 16, 64, 1), ("qkv_gqa", 16, 64, 8)], [],
               RESULTS / "kernels_candidates_v12_h100.json")
# v14: the expand's column blocks at <= 16 rows (per-row pair) and at ~1k rows.
SETS["v14"] = ([(s, 16, t, a) for s in ("dense", "qkv_gqa") for t in (1, 16, 1024)
                for a in (1, 8, 32)], [], RESULTS / "kernels_candidates_v11_h100.json")
# v16: rank 64 above 512 rows (GQA took the fused path there, 20-44 % of the bytes floor).
SETS["v16"] = ([(s, 64, t, a) for s in ("dense", "qkv_gqa") for t in (1024, 4096)
                for a in (1, 8, 32)], [], RESULTS / "kernels_candidates_v13_h100.json")
GPU_TESTS = {"arrive": ["tests/test_kernels_arrive.py"],
             "v5": ["tests/test_kernels_gpu.py", "-k", "pdl"],
             "v7": ["tests/test_kernels_gpu.py", "-k", "pdl or short"],
             "v8": ["tests/test_kernels_gpu.py"],
             "v9": ["tests/test_kernels_gpu.py", "-k", "short or rows"],
             "v10": ["tests/test_kernels_gpu.py", "-k", "short or rows"],
             "v11": ["tests/test_kernels_gpu.py", "-k", "short"],
             "v12": ["tests/test_kernels_gpu.py", "-k", "short or wide"],
             "v13": ["tests/test_kernels_gpu.py", "-k", "short or wide or rows"],
             "v14": ["tests/test_kernels_gpu.py", "-k", "short or wide or rows"],
             "v15": ["tests/test_kernels_gpu.py", "-k", "wide"]}


def _choice(key: Key) -> cfg.LinearConfig:
    shape, rank, tokens, _ = key
    offs = SHAPES[shape]
    return cfg.choose_linear(tokens, offs[-1], 4096, rank, len(offs) - 1, 32)


def _legacy_split(rows: int, n: int, j: int, slices: int) -> cfg.SplitConfig | None:
    """The split tiles of docs/KERNELS.md's final results (before v7), PDL off."""
    if rows <= 16:
        return S(16, 256 if j <= 64 else 64, 8 if j <= 64 else 16, 64, cfg.cdiv(n, 64))
    if rows <= 128:
        return S(16, 128, 8 if j <= 64 else 4, 128, 32)
    if rows <= 512:
        return S(16, 64, 8 if j <= 64 else 4, 128, 16)
    if j <= 64 and (rows <= 2048 or slices > 1):
        return S(64, 128, 4 if rows <= 2048 else 2, 128, 8, expand_warps=8)
    return None


def legacy_choice(key: Key) -> cfg.LinearConfig:
    """The choice measured in docs/KERNELS.md's final results (plain split, PDL off)."""
    shape, rank, tokens, _ = key
    offs = SHAPES[shape]
    slices = len(offs) - 1
    r_pad = cfg.rank_pad(rank)
    j = cfg.next_pow2(slices) * r_pad
    split = _legacy_split(tokens, offs[-1], j, slices)
    if split is None:
        return _choice(key)  # the fused path: unchanged since
    bk = split.bk
    while (split.bm + j) * bk * 2 * split.stages > cfg.SMEM_BUDGET and bk > 32:
        bk //= 2
    return replace(split, bk=bk)


def v6_choice(key: Key) -> cfg.LinearConfig:
    """The choice before v7: the legacy split with PDL up to the row limits."""
    legacy = legacy_choice(key)
    if not isinstance(legacy, cfg.SplitConfig):
        return legacy
    limit = cfg.SPLIT_PDL_MAX_ROWS_1SLICE if SHAPES[key[0]][1:] == (4096,) \
        else cfg.SPLIT_PDL_MAX_ROWS
    return replace(legacy, pdl=key[2] <= limit)


R = cfg.RowConfig


def rows_candidates(key: Key) -> list[tuple[str, cfg.LinearConfig | None]]:
    """v8: the per-row kernels at few rows, and split variants at 64 rows (GQA 64/32
    misses), beside the v6 choice and today's heuristic (v7 tiles + short chains)."""
    _, rank, tokens, _ = key
    out: list[tuple[str, cfg.LinearConfig | None]] = [("v6_choice", v6_choice(key))]
    if rank != 16:
        return out
    if tokens <= 16:
        out += [("rows_sk8", R(256, 8, 128, pdl=True)),
                ("rows_sk16", R(256, 16, 128, pdl=True)),
                ("rows_sk16_bn64", R(256, 16, 64, pdl=True)),
                ("rows_sk16_bn256", R(256, 16, 256, pdl=True)),
                ("rows_sk8_bk512", R(512, 8, 128, pdl=True)),
                ("rows_sk32", R(128, 32, 128, pdl=True)),
                ("rows_sk16_w2", R(256, 16, 128, 2, 2, pdl=True)),
                ("rows_sk16_nopdl", R(256, 16, 128))]
    elif tokens <= 128:
        today = _choice(key)
        assert isinstance(today, cfg.SplitConfig)
        out += [("sk16", replace(today, split_k=16)),
                ("bk64", replace(today, bk=64)),
                ("sw8", replace(today, shrink_warps=8)),
                ("ew8", replace(today, expand_warps=8)),
                ("ew2", replace(today, expand_warps=2)),
                ("st4", replace(today, stages=4)),
                ("rows_sk16", R(256, 16, 128, pdl=True))]
    return out


def arrive_candidates(key: Key) -> list[tuple[str, cfg.LinearConfig | None]]:
    """Single-launch configs on the legacy split's row / K tiles, over column groups G.

    GQA (N = 6144) takes 3/4 of dense's G, so groups end on slice boundaries (G = 6: one
    slice per group, each group shrinks only its slice's rank rows).
    """
    shape, _, tokens, _ = key
    scale = (lambda g: max(1, g * 3 // 4)) if shape == "qkv_gqa" else (lambda g: g)
    if tokens <= 16:
        out = [(f"arrive_g{scale(g)}", A(16, 256, 8, 64, scale(g))) for g in (1, 8, 16, 32, 64)]
        return [*out, (f"arrive_sk16_g{scale(16)}", A(16, 256, 16, 64, scale(16)))]
    if tokens <= 128:
        out = [(f"arrive_g{scale(g)}", A(16, 128, 8, 128, scale(g))) for g in (4, 8, 16, 32)]
        return [*out, (f"arrive_bn64_g{scale(64)}", A(16, 128, 8, 64, scale(64)))]
    out = [(f"arrive_g{scale(g)}", A(64, 128, 4, 128, scale(g), warps=8)) for g in (2, 4, 8, 16)]
    return [*out, (f"arrive_w4_g{scale(8)}", A(64, 128, 4, 128, scale(8))),
            (f"arrive_bm32_g{scale(8)}", A(32, 128, 4, 128, scale(8)))]


def short_candidates(key: Key) -> list[tuple[str, cfg.LinearConfig | None]]:
    """v7: today's split tiles with the short chains (starts from counts: ``cum``; the
    prefetching expand: ``pf``; both: ``short``), then both over other column ranges per
    program (one BN block a program, or more) and K splits."""
    shape, _, tokens, _ = key
    today = _choice(key)
    if not isinstance(today, cfg.SplitConfig):
        return []
    both = replace(today, cum_starts=True, prefetch=True)
    out: list[tuple[str, cfg.LinearConfig | None]] = [
        ("cum", replace(today, cum_starts=True)), ("pf", replace(today, prefetch=True)),
        ("short", both)]
    n_cols = SHAPES[shape][-1]
    one_block = n_cols // both.bn
    if tokens <= 16:
        out += [("short_sk16", replace(both, split_k=16)),
                ("short_bn128", replace(both, bn=128, col_splits=n_cols // 128))]
    elif tokens <= 128:
        if both.col_splits != one_block:
            out.append((f"short_c{one_block}", replace(both, col_splits=one_block)))
        out.append(("short_c16", replace(both, col_splits=16)))
    elif tokens >= 1024:
        if not both.pdl:
            out.append(("short_pdl", replace(both, pdl=True)))
        for cs in (16, 32, one_block):
            out.append((f"short_c{cs}", replace(both, col_splits=cs)))
        out += [("short_c16_pdl", replace(both, col_splits=16, pdl=True)),
                ("short_sk8_c16", replace(both, split_k=8, col_splits=16)),
                ("short_c32_ew4", replace(both, col_splits=32, expand_warps=4))]
    return out


def tile_candidates(key: Key) -> list[tuple[str, cfg.LinearConfig | None]]:
    """v9: split tiles around today's at 32-128 rows (the GQA 64/32 miss): K tile and
    split, expand warps, pipeline stages and column ranges, alone and combined."""
    today = _choice(key)
    if not isinstance(today, cfg.SplitConfig):
        return [("split_c32", S(16, 128, 8, 128, 32, pdl=True, cum_starts=True, prefetch=True))]
    out: list[tuple[str, cfg.LinearConfig | None]] = []
    for bk, sk in ((64, 8), (128, 4), (64, 4), (64, 16), (256, 4)):
        out.append((f"bk{bk}_sk{sk}", replace(today, bk=bk, split_k=sk)))
    out += [("bk64_ew2", replace(today, bk=64, expand_warps=2)),
            ("bk64_ew2_st4", replace(today, bk=64, expand_warps=2, stages=4)),
            ("bk64_sk4_ew2", replace(today, bk=64, split_k=4, expand_warps=2)),
            ("c12", replace(today, col_splits=12)),
            ("c12_ew2", replace(today, col_splits=12, expand_warps=2)),
            ("bk64_c12_ew2", replace(today, bk=64, col_splits=12, expand_warps=2)),
            ("sw2", replace(today, shrink_warps=2)),
            ("bk64_sw2_ew2", replace(today, bk=64, shrink_warps=2, expand_warps=2)),
            # second round around the best of the first (2-warp shrink programs)
            ("sw1", replace(today, shrink_warps=1)),
            ("sw2_ew2", replace(today, shrink_warps=2, expand_warps=2)),
            ("sw2_st4", replace(today, shrink_warps=2, stages=4)),
            ("sw2_st2", replace(today, shrink_warps=2, stages=2)),
            ("sw2_bk256_sk4", replace(today, bk=256, split_k=4, shrink_warps=2)),
            ("sw2_bk256_sk8", replace(today, bk=256, split_k=8, shrink_warps=2)),
            ("sw1_bk256_sk8", replace(today, bk=256, split_k=8, shrink_warps=1)),
            ("sw2_sk16", replace(today, split_k=16, shrink_warps=2))]
    return out


F = cfg.FusedConfig


def few_candidates(key: Key) -> list[tuple[str, cfg.LinearConfig | None]]:
    """v10: tiles for few distinct adapters — many rows per adapter, so taller row tiles
    (16 … 128 rows) and more K programs per tile, the per-row pair at ≤ 64 rows, and the
    fused path, beside today's choice (tuned for 32 adapters)."""
    shape, _, tokens, _ = key
    slices = len(SHAPES[shape]) - 1
    limit = cfg.SPLIT_PDL_MAX_ROWS_1SLICE if slices == 1 else cfg.SPLIT_PDL_MAX_ROWS
    short = dict(cum_starts=True, prefetch=True, pdl=tokens <= limit)
    out: list[tuple[str, cfg.LinearConfig | None]] = []
    if tokens <= 64:
        out += [("rows_sk16", R(256, 16, 128, pdl=True)), ("rows_sk8", R(512, 8, 128, pdl=True)),
                ("rows_sk32", R(128, 32, 128, pdl=True)),
                ("rows_sk16_bn64", R(256, 16, 64, pdl=True)),
                ("rows_sk16_w2", R(256, 16, 128, 2, 2, pdl=True))]
        for bm in (16, 32, 64):
            if bm > tokens:
                continue
            out += [(f"bm{bm}_sk8", S(bm, 128, 8, 128, 32, 2, 2, **short)),
                    (f"bm{bm}_sk16", S(bm, 128, 16, 128, 32, 2, 2, **short)),
                    (f"bm{bm}_sk16_bk256", S(bm, 256, 16, 128, 32, 4, 4, **short)),
                    (f"bm{bm}_sk32_bk64", S(bm, 64, 32, 128, 32, 2, 2, **short)),
                    (f"bm{bm}_sk16_c64", S(bm, 128, 16, 64, 64, 2, 2, **short))]
        return out
    for bm in (32, 64, 128):
        ew = 8 if bm == 128 else 4
        out += [(f"bm{bm}_sk4", S(bm, 128, 4, 128, 32, 4, ew, **short)),
                (f"bm{bm}_sk8", S(bm, 128, 8, 128, 32, 4, ew, **short)),
                (f"bm{bm}_sk16_bk64", S(bm, 64, 16, 128, 32, 4, ew, **short)),
                (f"bm{bm}_sk8_c16", S(bm, 128, 8, 128, 16, 4, ew, **short))]
    out += [("fused_64", F(64, 64, 128, 4, 4, 4)), ("fused_32", F(32, 128, 128, 4, 4, 3)),
            ("fused_128", F(128, 64, 128, 2, 8, 3))]
    if tokens >= 1024:
        out += [("bm128_sk2", S(128, 128, 2, 128, 32, 8, 8, **short)),
                ("bm64_sk2", S(64, 128, 2, 128, 32, 4, 4, **short))]
    return out


def column_candidates(key: Key) -> list[tuple[str, cfg.LinearConfig | None]]:
    """v11: today's split at 32-128 rows with other expand column tiles — BN 64 / 128 / 256
    over 12 … 96 column ranges, 2 / 4 / 8 expand warps — and the same with the shrink's K
    tile at 64 (the v9 rounds moved only the shrink)."""
    today = _choice(key)
    if not isinstance(today, cfg.SplitConfig):
        return []
    out: list[tuple[str, cfg.LinearConfig | None]] = []
    for bn, splits in ((64, (24, 48, 96)), (128, (16, 24, 48)), (256, (12, 24))):
        for cs in splits:
            for ew in (2, 4) if bn < 256 else (4, 8):
                out.append((f"bn{bn}_c{cs}_ew{ew}", replace(today, bn=bn, col_splits=cs,
                                                            expand_warps=ew)))
    out += [("bn64_c48_ew2_bk64", replace(today, bn=64, col_splits=48, expand_warps=2, bk=64)),
            ("bn64_c96_ew2_st2", replace(today, bn=64, col_splits=96, expand_warps=2, stages=2))]
    return out


def expand_tile_candidates(key: Key) -> list[tuple[str, cfg.LinearConfig | None]]:
    """v12: today's split (or, where today takes the per-row pair, the 16-row split with
    2-warp shrinks) with the expand's column tiles varied — BN 64 / 128 / 256 with 1, 2 or 4
    blocks a program (ranges = N / columns a program) and 2 / 4 / 8 warps — and, at 256 rows
    and more, 2-warp shrinks."""
    shape, _, tokens, _ = key
    n = SHAPES[shape][-1]
    slices = len(SHAPES[shape]) - 1
    today = _choice(key)
    limit = cfg.SPLIT_PDL_MAX_ROWS_1SLICE if slices == 1 else cfg.SPLIT_PDL_MAX_ROWS
    base = today if isinstance(today, cfg.SplitConfig) else S(
        16, 128, 8, 128, 32, 2, 2, pdl=tokens <= limit, cum_starts=True, prefetch=True)
    out: list[tuple[str, cfg.LinearConfig | None]] = []
    if base is not today:
        out.append(("split_base", base))
    for bn, blocks, warps in ((64, 2, (2,)), (64, 4, (2, 4)), (128, 1, (2, 4)),
                              (128, 2, (2, 4)), (128, 4, (4,)), (256, 1, (4,)),
                              (256, 2, (4, 8))):
        cs = cfg.cdiv(n, bn * blocks)
        for ew in warps:
            out.append((f"bn{bn}x{blocks}_ew{ew}", replace(base, bn=bn, col_splits=cs,
                                                           expand_warps=ew)))
    if tokens >= 256:
        out += [("sw2", replace(base, shrink_warps=2)),
                ("sw2_bn256x2", replace(base, shrink_warps=2, bn=256, col_splits=cfg.cdiv(n, 512)))]
    return out


def dense_split_candidates(key: Key) -> list[tuple[str, cfg.LinearConfig | None]]:
    """v13: at dense 17-64 rows (today: the per-row pair) the 16-row split with v12's
    256-column expand blocks, over shrink warps and K tiles."""
    n = SHAPES[key[0]][-1]
    cs256, cs128 = cfg.cdiv(n, 256), cfg.cdiv(n, 128)
    short = dict(pdl=True, cum_starts=True, prefetch=True)
    return [("s_bn256_sw2", S(16, 128, 8, 256, cs256, 2, 4, **short)),
            ("s_bn256_sw4", S(16, 128, 8, 256, cs256, 4, 4, **short)),
            ("s_bn256_bk256", S(16, 256, 16, 256, cs256, 2, 4, **short)),
            ("s_bn256_bk64", S(16, 64, 16, 256, cs256, 2, 4, **short)),
            ("s_bn256_ew2", S(16, 128, 8, 256, cs256, 2, 2, **short)),
            ("s_bn128_ew2", S(16, 128, 8, 128, cs128, 2, 2, **short)),
            ("s_bn128_ew4", S(16, 128, 8, 128, cs128, 2, 4, **short)),
            ("rows_bn256", R(256, 16, 256, pdl=True))]


def edge_expand_candidates(key: Key) -> list[tuple[str, cfg.LinearConfig | None]]:
    """v14: v12's wider expand blocks at the two ends — the per-row pair at ≤ 16 rows (BN
    256 / 512 expand blocks, 2 / 4 / 8 warps) and the ~1k-row split (BN 256 with 1 / 2 / 4
    blocks a program, 4 / 8 warps)."""
    n = SHAPES[key[0]][-1]
    today = _choice(key)
    out: list[tuple[str, cfg.LinearConfig | None]] = []
    if isinstance(today, cfg.RowConfig):
        for bn in (256, 512):
            for ew in (2, 4, 8):
                out.append((f"rows_bn{bn}_ew{ew}", replace(today, bn=bn, expand_warps=ew)))
        out.append(("rows_bn256_sk16", replace(today, bn=256, bk=256, split_k=16)))
        out.append(("rows_bn256_bk512", replace(today, bn=256, bk=512, split_k=8)))
    elif isinstance(today, cfg.SplitConfig):
        for blocks in (1, 2, 4):
            for ew in (4, 8):
                out.append((f"bn256x{blocks}_ew{ew}", replace(
                    today, bn=256, col_splits=cfg.cdiv(n, 256 * blocks), expand_warps=ew)))
        out.append(("bn128x1_ew4", replace(today, col_splits=cfg.cdiv(n, 128), expand_warps=4)))
    return out


def shrink_k_candidates(key: Key) -> list[tuple[str, cfg.LinearConfig | None]]:
    """v15: today's split at 32-128 rows (v11's expands) over the shrink's K tile, K split,
    warps and pipeline stages; second round: wider expand blocks (BN 512, or 3-4 BN-256
    blocks a program)."""
    today = _choice(key)
    if not isinstance(today, cfg.SplitConfig):
        return []
    out: list[tuple[str, cfg.LinearConfig | None]] = []
    for bk, sk in ((64, 8), (64, 16), (128, 4), (128, 16), (256, 4), (256, 8), (64, 32)):
        out.append((f"bk{bk}_sk{sk}", replace(today, bk=bk, split_k=sk)))
    for bn, cs, ew in ((512, 12, 4), (512, 12, 8), (512, 6, 8), (256, 8, 4), (256, 6, 4),
                       (256, 6, 8)):
        out.append((f"bn{bn}_c{cs}_ew{ew}", replace(today, bn=bn, col_splits=cs,
                                                    expand_warps=ew)))
    out += [("sw1", replace(today, shrink_warps=1)), ("sw4", replace(today, shrink_warps=4)),
            ("st2", replace(today, stages=2)), ("st4", replace(today, stages=4)),
            ("sk16_sw1", replace(today, split_k=16, shrink_warps=1)),
            ("bk64_sk16_sw1", replace(today, bk=64, split_k=16, shrink_warps=1))]
    return out


def rank64_split_candidates(key: Key) -> list[tuple[str, cfg.LinearConfig | None]]:
    """v16: split tiles for rank 64 above 512 rows — the row tile, the shrink's K split, the
    expand's column blocks and warps (BK 64 keeps the 256-wide multi-slice A tile in shared
    memory)."""
    tokens, n = key[2], SHAPES[key[0]][-1]
    short = dict(cum_starts=True, prefetch=True)
    sk = 4 if tokens <= 2048 else 2
    out: list[tuple[str, cfg.LinearConfig | None]] = []
    for bm in (16, 32, 64):
        for bn, blocks, ew in ((128, 1, 4), (128, 2, 4), (256, 1, 4), (256, 1, 8), (128, 4, 8)):
            out.append((f"bm{bm}_bn{bn}x{blocks}_ew{ew}",
                        S(bm=bm, bk=64, split_k=sk, bn=bn, col_splits=cfg.cdiv(n, bn * blocks),
                          expand_warps=ew, **short)))
    out.append(("bm64_sk8_bn128x2", S(bm=64, bk=64, split_k=2 * sk, bn=128,
                                      col_splits=cfg.cdiv(n, 256), **short)))
    out.append(("bm64_cs8_ew8_long", S(bm=64, bk=64, split_k=sk, bn=128, col_splits=8,
                                       expand_warps=8)))
    return out


def candidates(key: Key, which: str = "v5") -> list[tuple[str, cfg.LinearConfig | None]]:
    """(name, config) pairs for one case; None = today's heuristic."""
    tokens = key[2]
    legacy = legacy_choice(key)
    out: list[tuple[str, cfg.LinearConfig | None]] = [("legacy", legacy), ("heuristic", None)]
    if isinstance(legacy, cfg.SplitConfig) and which not in ("v8", "v9", "v10", "v11", "v12", "v13", "v14", "v15", "v16") and (
            which == "v5" or replace(legacy, pdl=True) != _choice(key)):
        out.append(("split_pdl", replace(legacy, pdl=True)))
    if which == "arrive":
        return out + arrive_candidates(key)
    if which in ("v8", "v9", "v10", "v11", "v12", "v13", "v14", "v15", "v16"):
        seen = {legacy, _choice(key)}
        extra = {"v8": rows_candidates, "v9": tile_candidates, "v10": few_candidates,
                 "v11": column_candidates, "v12": expand_tile_candidates,
                 "v13": dense_split_candidates, "v14": edge_expand_candidates,
                 "v15": shrink_k_candidates, "v16": rank64_split_candidates}[which](key)
        for name, config in extra:
            if config is not None and config not in seen:
                seen.add(config)
                out.append((name, config))
        return out
    if which == "v7":
        seen = {c if c is not None else _choice(key) for _, c in out}
        for name, config in short_candidates(key):
            if config is not None and config not in seen:
                seen.add(config)
                out.append((name, config))
        return out
    if tokens >= 1024:
        out += [("split_sk8", S(64, 128, 8, 128, 8, 4, 8)),
                ("split_bm32", S(32, 128, 4, 128, 8, 4, 4)),
                ("split_sk8_pdl", S(64, 128, 8, 128, 8, 4, 8, pdl=True)),
                # Smaller expand programs: do waiting PDL expands crowd out the shrink?
                ("split_pdl_ew4", S(64, 128, 4, 128, 8, 4, 4, pdl=True))]
    return out


def _check(c: Case, config: cfg.LinearConfig | None, ref: torch.Tensor,
           pristine: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Relative error of one call's delta against the float32 reference delta, and the
    output. Starts from the pristine output: timing runs accumulate into ``c.out``, and a
    delta taken against large accumulated bf16 values would be lost to rounding."""
    from lora_kernels import linear

    out = pristine.clone()
    linear.lora_linear(out, c.x, c.a, c.b, c.meta, c.offs, config=config)
    delta = out.float() - pristine.float()
    return float((delta - ref).norm() / ref.norm().clamp_min(1e-30)), out


def _counters_zero(c: Case, config: cfg.ArriveConfig) -> bool:
    """Whether the shared arrival counters are all zero after the case's launches."""
    from lora_kernels import arrive

    torch.cuda.synchronize()
    tiles, groups, _ = arrive.arrive_grid(c.x.shape[0], c.offs[-1], c.x.shape[1], SLOTS, config)
    return int(arrive.shared_counters(c.x.device, tiles * groups).abs().sum()) == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=sorted(SETS), default="arrive", dest="which")
    ap.add_argument("--out", type=Path, help="JSON path (default: the set's)")
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--list", action="store_true", help="print the plan (no GPU needed)")
    args = ap.parse_args()
    missing, regression, default_out = SETS[args.which]
    cases = missing + regression
    out_path: Path = args.out or default_out
    plan = {key: candidates(key, args.which) for key in cases}
    if args.list:
        for key in cases:
            for name, config in plan[key]:
                print(key, name, config if config is not None else _choice(key))
        return
    t_start = time.time()
    tests: subprocess.Popen[str] | None = None
    import importlib.util

    if not args.no_tests and importlib.util.find_spec("pytest") is not None:
        select = GPU_TESTS[args.which]
        tests = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *select],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    jobs = [(key, c) for key in cases for _, c in plan[key]]
    t0 = time.time()
    warm_compile(jobs, args.procs)
    print(f"warm compile of {len(jobs)} jobs: {time.time() - t0:.0f} s", flush=True)
    tests_result: dict[str, Any] = dict(rc=None, tail="pytest not run")
    if tests is not None:
        try:
            text, _ = tests.communicate(timeout=300)
            tests_result = dict(rc=tests.returncode, tail=text[-3000:])
        except subprocess.TimeoutExpired:
            tests.kill()
            tests_result = dict(rc=-1, tail="GPU tests timed out after 300 s")
        print(f"GPU tests rc={tests_result['rc']}: {tests_result['tail'][-400:]}", flush=True)
    bw = copy_bandwidth()
    rows = []
    for key in cases:
        c = Case(*key)
        pristine = c.out.clone()
        ref = torch.zeros(c.out.shape, device="cuda")
        reference.lora_linear(ref, c.x.float(), c.a.float(), c.b.float(), c.idx, c.offs)
        floor = c.floor_bytes / (bw * 1e3)
        peer = PEER_US.get((key[0], key[2], key[3])) if key[1] == 16 else None
        base_us = None
        legacy_out: torch.Tensor | None = None
        legacy = plan[key][0][1]
        for name, config in plan[key]:
            chosen = config if config is not None else _choice(key)
            row: dict[str, Any] = dict(shape=key[0], rank=key[1], tokens=key[2],
                                       adapters=key[3], role="missing" if key in missing
                                       else "regression", name=name, config=repr(chosen))
            try:
                c.out.copy_(pristine)
                row["rel_err"], got = _check(c, config, ref, pristine)
                if name == "legacy":
                    legacy_out = got
                elif (legacy_out is not None and isinstance(chosen, cfg.SplitConfig)
                      and isinstance(legacy, cfg.SplitConfig)
                      and replace(chosen, pdl=False, cum_starts=False, prefetch=False,
                                  col_splits=legacy.col_splits) == legacy):
                    row["bit_equal_legacy"] = bool(torch.equal(got, legacy_out))
                elif legacy_out is not None and isinstance(chosen, cfg.ArriveConfig):
                    row["bit_equal_split"] = bool(torch.equal(got, legacy_out))
                c.out.copy_(pristine)
                row["graph_us"] = _bench(c.ours(config), graph=True, rep=20)
                if isinstance(chosen, cfg.ArriveConfig):
                    row["counters_zero"] = _counters_zero(c, chosen)
            except Exception as exc:  # a config the compiler rejects is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                rows.append(row)
                continue
            row["ok"] = (row["rel_err"] < 2e-2 and row.get("bit_equal_legacy", True)
                         and row.get("counters_zero", True))
            base_us = row["graph_us"] if name == "legacy" else base_us
            row["vs_legacy"] = row["graph_us"] / base_us if base_us else None
            row["pct_floor"] = 100 * floor / row["graph_us"]
            row["peer_us"] = peer
            row["goal_met"] = (row["graph_us"] <= peer / 2) if peer else None
            rows.append(row)
        del c
    results = dict(device=torch.cuda.get_device_name(), copy_GBps=bw, torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d"), gpu_tests=tests_result,
                   thresholds=dict(SPLIT_PDL_MAX_ROWS=cfg.SPLIT_PDL_MAX_ROWS,
                                   SPLIT_PDL_MAX_ROWS_1SLICE=cfg.SPLIT_PDL_MAX_ROWS_1SLICE),
                   rows=rows, seconds=round(time.time() - t_start, 1))
    import triton

    results["triton"] = triton.__version__
    results["set"] = args.which
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict[str, Any]) -> None:
    """One line per candidate, the best of each case marked with '*'; after err, '=' / '!'
    say whether a PDL candidate's bits equal the legacy split's with the same tiles, and
    '~' / '.' the same for an arrive candidate (information only)."""
    print(f"card: {results['device']}  copy {results['copy_GBps']:.0f} GB/s  "
          f"total {results['seconds']} s")
    print(f"{'shape':8} {'T':>5} {'ad':>3} {'R':>3} {'candidate':14} {'us':>7} {'/legacy':>8} "
          f"{'floor%':>7} {'peer/2':>7} {'goal':>5} {'err':>8}  config")
    keys = dict.fromkeys((r["shape"], r["tokens"], r["adapters"], r["rank"])
                         for r in results["rows"])
    for key in keys:
        group = [r for r in results["rows"]
                 if (r["shape"], r["tokens"], r["adapters"], r["rank"]) == key]
        timed = [r for r in group if "graph_us" in r and r.get("ok")]
        best = min(timed, key=lambda r: r["graph_us"]) if timed else None
        for r in group:
            if "graph_us" not in r:
                print(f"{key[0]:8} {key[1]:>5} {key[2]:>3} {key[3]:>3} {r['name']:14} error: "
                      f"{r['error']}")
                continue
            peer = f"{r['peer_us'] / 2:7.2f}" if r["peer_us"] else "      -"
            goal = "-" if r["goal_met"] is None else ("yes" if r["goal_met"] else "no")
            mark = "*" if r is best else " "
            bits = {True: "=", False: "!"}.get(r.get("bit_equal_legacy"),
                                               {True: "~", False: "."}.get(
                                                   r.get("bit_equal_split"), " "))
            print(f"{key[0]:8} {key[1]:>5} {key[2]:>3} {key[3]:>3} {r['name']:13}{mark} "
                  f"{r['graph_us']:7.2f} {r['vs_legacy'] or 0:8.2f} {r['pct_floor']:7.1f} "
                  f"{peer} {goal:>5} {r['rel_err']:8.1e}{bits} {r['config']}")


if __name__ == "__main__":
    main()
