"""Launch configurations of the Triton LoRA kernels, chosen from static shapes only.

Everything here is decided from Python ints (rows, widths, rank, slice count, entries), so
the choice is the same at capture and at replay and never reads the device. The rules and
their thresholds come from the H100 sweeps recorded in docs/KERNELS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


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


LinearConfig = FusedConfig | SplitConfig

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


def _row_tile(rows: int) -> int:
    if rows <= 64:
        return 16
    if rows <= 512:
        return 32
    return 64


def _col_splits(n: int, bn: int, tiles: int, target: int) -> int:
    return max(1, min(-(-n // bn), -(-target // max(1, tiles))))


@lru_cache(maxsize=4096)
def choose_linear(rows: int, n: int, k: int, rank: int, slices: int, entries: int,
                  num_sms: int = NUM_SMS_DEFAULT) -> LinearConfig:
    """Pick the fused or the split path and its tiles for one LoRA linear shape."""
    j = next_pow2(slices) * rank_pad(rank)
    bm = _row_tile(rows)
    # Live tiles for a spread assignment: rows split over at most ``entries`` entries.
    live = max(1, min(-(-rows // bm) + min(entries, rows) // 2, tile_bound(rows, entries, bm)))
    if rows <= 16 and j * k >= 64 * 4096:
        # Each fused program must read a whole A[w] (j·k elements); past a point the
        # split path, whose programs read a K chunk each, wins at tiny row counts.
        split_k = max(1, min(32, k // 256))
        return SplitConfig(bm=16, bk=128, split_k=split_k, bn=64,
                           col_splits=_col_splits(n, 64, live, 2 * num_sms))
    bn = 64 if rows <= 64 else 128
    bk = 128 if rows <= 64 else 64
    warps = 4 if j * bm <= 64 * 64 else 8
    return FusedConfig(bm=bm, bk=bk, bn=bn, col_splits=_col_splits(n, bn, live, 2 * num_sms),
                       warps=warps, stages=3)
