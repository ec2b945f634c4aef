"""Launch configurations of the Triton LoRA kernels, chosen from static shapes only.

Everything here is decided from Python ints (rows, widths, rank, slice count, entries), so
the choice is the same at capture and at replay and never reads the device. The rules and
their thresholds come from the H100 sweeps recorded in docs/KERNELS.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

# Programmatic dependent launch (PDL, Hopper+) of the split path's expand, set from the H100
# measurement (`benchmarks/kernel_candidates.py` → results/kernels_candidates_h100.json,
# docs/KERNELS.md v5): the split path uses it up to SPLIT_PDL_MAX_ROWS rows on multi-slice
# layers and SPLIT_PDL_MAX_ROWS_1SLICE rows on single-slice ones. Measured 0.84-0.98x the
# plain split's time at T <= 256 and on dense T = 1024 with one adapter (1.00x with 32),
# but 1.02-1.21x on GQA qkv at T >= 1024, hence the two limits.
SPLIT_PDL_MAX_ROWS = 512
SPLIT_PDL_MAX_ROWS_1SLICE = 1024


@dataclass(frozen=True)
class FusedConfig:
    """One launch: shrink into registers, then expand; programs = row tiles × column ranges."""

    bm: int
    bk: int
    bn: int
    col_splits: int
    warps: int = 4
    stages: int = 3


@dataclass(frozen=True)
class SplitConfig:
    """Two launches: split-K shrink into float32 partials, then expand summing them."""

    bm: int
    bk: int
    split_k: int
    bn: int
    col_splits: int
    shrink_warps: int = 4
    expand_warps: int = 4
    stages: int = 3
    pdl: bool = False
    # Shorter dependent-load chains (docs/KERNELS.md v7): tile starts from the counts in
    # registers (when the meta's segments are in entry order), and an expand that loads
    # row ids, B and output tiles ahead (before the PDL wait; the next block's during the
    # current one). Same arithmetic, same bits.
    cum_starts: bool = False
    prefetch: bool = False


@dataclass(frozen=True)
class RowConfig:
    """Two launches over rows themselves (``triton_rows``), for a handful of rows: split-K
    shrink with one program per (row, K chunk), then an expand per (row, BN block). No sort
    lookup: a row reads its entry and x at once. ``pdl`` as in ``SplitConfig``."""

    bk: int
    split_k: int
    bn: int
    shrink_warps: int = 4
    expand_warps: int = 4
    pdl: bool = False


@dataclass(frozen=True)
class ArriveConfig:
    """One launch, split-K: the last K program to finish a (row tile, column group) expands it.

    Programs = row tiles × col_splits column groups × K chunks. Each writes its float32
    partial shrink, then increments the group's arrival counter; the program that arrives
    last sums the partials in K order and expands the group's columns, then resets the
    counter to 0 (no memset between launches or graph replays). A column group shrinks
    only the rank rows of the slices its columns touch; col_splits = 1 is the plain
    "last arriver expands the whole tile" kernel. A candidate, not chosen by
    ``choose_linear`` (unmeasured; docs/KERNELS.md).
    """

    bm: int
    bk: int
    split_k: int
    bn: int
    col_splits: int
    warps: int = 4
    stages: int = 3


LinearConfig = FusedConfig | SplitConfig | RowConfig | ArriveConfig

NUM_SMS_DEFAULT = 132


def cdiv(a: int, b: int) -> int:
    """Ceil of a / b for positive ints."""
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    """a rounded up to a multiple of b."""
    return cdiv(a, b) * b


def next_pow2(v: int) -> int:
    """Smallest power of two >= v (>= 1)."""
    return 1 << max(0, (int(v) - 1).bit_length())


def rank_pad(rank: int) -> int:
    """Rank rows per slice inside a kernel: a power of two, at least 16 (the dot minimum)."""
    return max(16, next_pow2(rank))


def tile_bound(rows: int, entries: int, bm: int) -> int:
    """Most row tiles any assignment of ``rows`` rows to ``entries`` entries can need."""
    return max(1, -(-rows // bm) + min(entries, rows))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 operands keep full precision; 16-bit ones use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def k_chunks(k: int, split_k: int, bk: int) -> tuple[int, int]:
    """(K elements per program, K programs): chunks are BK multiples, so there may be fewer
    programs than ``split_k``."""
    per = round_up(cdiv(k, split_k), bk)
    return per, cdiv(k, per)


def grid_cols(n_cols: int, bn: int, col_splits: int) -> tuple[int, int]:
    """(columns per program, column programs) for ``col_splits`` BN-aligned ranges."""
    per = round_up(cdiv(n_cols, col_splits), bn)
    return per, -(-n_cols // per)


def inner_offsets(slice_offsets: Sequence[int], n_cols: int) -> tuple[int, int, int]:
    """The three inner slice boundaries a kernel takes; missing ones are N."""
    inner = [int(o) for o in slice_offsets[1:-1]]
    inner += [n_cols] * (3 - len(inner))
    return inner[0], inner[1], inner[2]


def aligned(slice_offsets: Sequence[int], bn: int) -> bool:
    """Whether no BN-wide column block straddles two slices."""
    return all(int(o) % bn == 0 for o in slice_offsets[1:-1])


SMEM_BUDGET = 200 * 1024


def fused_smem(bm: int, bk: int, bn: int, j: int, r_pad: int, stages: int, itemsize: int = 2) -> int:
    """Rough shared memory of the fused kernel: pipelined x and A tiles plus one B tile."""
    return stages * (bm + j) * bk * itemsize + r_pad * bn * itemsize


def _cols_split(n: int, cols_per_prog: int) -> int:
    return max(1, cdiv(n, cols_per_prog))


def _choose_rows(rows: int, r_pad: int, slices: int) -> RowConfig | None:
    """The per-row pair where it measured fastest (v8, rank 16 on the H100): dense up to 64
    rows (1/1: 3.34 µs vs 4.72 split; 64/32: 6.39 vs 7.69; v13: still ahead of splits with
    256-column expands, 5.90 vs 6.74), multi-slice up to 16 rows (1/1: 4.09 vs 5.17; 16/32:
    6.01 vs 6.62; at 64/32 it loses, 11.97 vs 10.59)."""
    if r_pad != 16:
        return None  # rank 64: not measured, the split path stays
    if slices == 1:
        if rows <= 16:
            # 256-column expand blocks (v14: 16/32 3.71 -> 3.66 µs, 16/1 3.55 -> 3.49; 1 row
            # unchanged at 3.34).
            return RowConfig(bk=512, split_k=8, bn=256, pdl=True)
        if rows <= 64:
            # 256-column expand blocks (v13: 64/32 6.53 -> 5.90 µs, 64/1 6.05 -> 5.40).
            return RowConfig(bk=256, split_k=16, bn=256, pdl=True)
        return None
    if rows == 1:
        return RowConfig(bk=256, split_k=16, bn=128, pdl=True)
    if rows <= 16:
        # 256-column expand blocks of 8 warps (v14, GQA qkv: 16/32 6.16 -> 5.39 µs, 16/1
        # 5.71 -> 5.01).
        return RowConfig(bk=256, split_k=8, bn=256, expand_warps=8, pdl=True)
    return None


def _choose_split(rows: int, n: int, j: int, slices: int, r_pad: int,
                  itemsize: int = 2) -> SplitConfig | None:
    # Split configs take the short dependent-load chains (v7: same bits, 0.80-0.97x the
    # time at rank 16 on the H100, docs/KERNELS.md).
    short = dict(cum_starts=True, prefetch=True)
    if rows <= 16:
        return SplitConfig(bm=16, bk=256 if j <= 64 else 64, split_k=8 if j <= 64 else 16,
                           bn=128, col_splits=_cols_split(n, 128), **short)
    if rows <= 128:
        # Rank 16: 2-warp shrink programs (v9: GQA 64/32 10.64 -> 9.90-10.00 µs, 32/32
        # 8.97 -> 8.50), single-slice with 2-warp expands too (dense 128/32 8.26 -> 7.12).
        sw, ew = (2, 2 if slices == 1 else 4) if r_pad == 16 else (4, 4)
        split_k = 8 if j <= 64 else 4
        if r_pad == 16 and slices > 1:
            # Multi-slice expands (v11, GQA qkv N = 6144): one 128-column block a program of
            # 2 warps up to 32 rows (32/32 8.57 -> 7.89 µs); above, one 512-column block a
            # program of 4 warps (v15: 64/32 10.25 -> 9.32, 128/32 11.01 -> 9.79) — for
            # float32 layers two 256-column blocks (v11: 9.64-9.95 / 10.32), as the 512-wide
            # expand with its prefetched tiles needs 260 KB of shared memory there: the
            # column ranges follow N.
            if rows <= 32:
                return SplitConfig(bm=16, bk=128, split_k=split_k, bn=128,
                                   col_splits=_cols_split(n, 128), shrink_warps=sw,
                                   expand_warps=2, **short)
            return SplitConfig(bm=16, bk=128, split_k=split_k, bn=512 if itemsize <= 2 else 256,
                               col_splits=_cols_split(n, 512), shrink_warps=sw,
                               expand_warps=4, **short)
        if r_pad == 16:
            # Single-slice (v12): one 256-column block a program of 4 warps (dense 128/32
            # 7.18 -> 6.80 µs).
            return SplitConfig(bm=16, bk=128, split_k=split_k, bn=256,
                               col_splits=_cols_split(n, 256), shrink_warps=sw,
                               expand_warps=4, **short)
        return SplitConfig(bm=16, bk=128, split_k=split_k, bn=128, col_splits=32,
                           shrink_warps=sw, expand_warps=ew, **short)
    if rows <= 512:
        if r_pad == 16:
            # v12: one 256-column block a program (GQA 256/1 10.35 -> 8.69 µs, 256/32 13.28
            # -> 11.42, 512/32 16.17 -> 14.47; dense 256/32 8.47 -> 7.86, 512/32 10.98 -> 10.63).
            return SplitConfig(bm=16, bk=64, split_k=8 if j <= 64 else 4, bn=256,
                               col_splits=_cols_split(n, 256), **short)
        return SplitConfig(bm=16, bk=64, split_k=8 if j <= 64 else 4, bn=128, col_splits=16,
                           **short)
    if slices > 1 and r_pad == 64 and itemsize <= 2:
        # Rank-64 multi-slice layers (v16, GQA qkv on the H100): a split with 64-row tiles
        # and 8-warp expands over four 128-column blocks a program, instead of the fused
        # path's 256-wide rank tile (1024/1 59.9 -> 29.5 µs, 1024/32 69.4 -> 58.4, 4096/1
        # 143.2 -> 83.2, 4096/32 158.8 -> 116.2). 16-bit layers only: unmeasured in float32,
        # where the 256-wide A tiles need twice the shared memory.
        return SplitConfig(bm=64, bk=64, split_k=4 if rows <= 2048 else 2, bn=128,
                           col_splits=_cols_split(n, 512), expand_warps=8, **short)
    if j <= 64 and (rows <= 2048 or slices > 1):
        # Few live tiles (one adapter: rows / 64) leave SMs idle in the shrink: split K too.
        # The expand streams the output: 32 column ranges of 4-warp programs (v7, rank 16;
        # rank 64 measured 1.23x slower with them at dense 1024/32 and keeps the v6 tiles).
        split_k = 4 if rows <= 2048 else 2
        if r_pad > 16:
            return SplitConfig(bm=64, bk=128, split_k=split_k, bn=128, col_splits=8,
                               expand_warps=8)
        return SplitConfig(bm=64, bk=128, split_k=split_k, bn=128, col_splits=32,
                           expand_warps=4, **short)
    return None


@lru_cache(maxsize=4096)
def choose_linear(rows: int, n: int, k: int, rank: int, slices: int, entries: int,
                  num_sms: int = NUM_SMS_DEFAULT, itemsize: int = 2) -> LinearConfig:
    """Pick the per-row, split or fused path and its tiles for one LoRA linear shape.

    From the H100 sweeps (docs/KERNELS.md): at a handful of rows (rank 16) the per-row
    pair wins, its only dependent load before the weights being the row's entry; up to
    ~2k rows the split path wins, because a
    fused program must read a whole A[w] (n·R·K elements) by itself while split-K spreads
    that read over many programs and the expand then streams the output with small y
    tiles; at 4k rows the fused path, which never writes y, wins for single-slice layers
    and for rank-64 multi-slice ones. The split path launches its expand with PDL up to
    the row limits at the top of this module. ``entries`` and ``num_sms`` are kept for
    tuning on other cards. ``itemsize``: bytes per element of x and the weights (tiles that
    need more shared memory than an H100 has at 4 bytes are kept to 16-bit layers).
    """
    r_pad = rank_pad(rank)
    j = next_pow2(slices) * r_pad
    pdl_limit = SPLIT_PDL_MAX_ROWS_1SLICE if slices == 1 else SPLIT_PDL_MAX_ROWS
    row_config = _choose_rows(rows, r_pad, slices)
    if row_config is not None:
        return replace(row_config, pdl=rows <= pdl_limit)
    split = _choose_split(rows, n, j, slices, r_pad, itemsize)
    if split is not None and rows <= pdl_limit:
        split = replace(split, pdl=True)
    if split is not None:
        # Large ranks: shrink the K tile until the pipelined x and A tiles fit.
        bk = split.bk
        while (split.bm + j) * bk * 2 * split.stages > SMEM_BUDGET and bk > 32:
            bk //= 2
        return replace(split, bk=bk)
    if slices == 1 and r_pad <= 16:
        bm, bk, cs, warps, stages = 32, 128, 4, 4, 3
    elif j <= 64 or rows <= 2048:
        bm, bk, cs, warps, stages = 64, 64, 4, 4, 4
    else:
        bm, bk, cs, warps, stages = 128, 64, 2, 8, 3
    while fused_smem(bm, bk, 128, j, r_pad, stages) > SMEM_BUDGET and stages > 2:
        stages -= 1
    while fused_smem(bm, bk, 128, j, r_pad, stages) > SMEM_BUDGET and bk > 32:
        bk //= 2
    return FusedConfig(bm=bm, bk=bk, bn=128, col_splits=cs, warps=warps, stages=stages)
