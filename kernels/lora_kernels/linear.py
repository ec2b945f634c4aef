"""Launchers of the Triton LoRA linear kernels (CUDA tensors, or CPU under TRITON_INTERPRET=1).

Shape legend: M rows, W weight entries, n slices (≤ 4), R rank, K input width, N output
width. No launcher reads the device: grids are static bounds from shapes, so every call is
capturable in a CUDA graph and replays correctly for any row → entry assignment.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from lora_kernels import config as cfg
from lora_kernels.arrive import launch_arrive
from lora_kernels.meta import LoRAMeta
from lora_kernels.triton_linear import expand_kernel, fused_lora_kernel, shrink_kernel
from lora_kernels.triton_rows import expand_rows_kernel, shrink_rows_kernel

MAX_SLICES = 4


def _check_linear(out: torch.Tensor | None, x: torch.Tensor | None, lora_a: torch.Tensor | None,
                  lora_b: torch.Tensor | None, meta: LoRAMeta,
                  slice_offsets: Sequence[int] | None) -> None:
    if lora_a is not None:
        if lora_a.dim() != 4:
            raise ValueError(f"lora_a must be [n, W, R, K], got shape {tuple(lora_a.shape)}")
        if lora_a.shape[0] > MAX_SLICES:
            raise ValueError(f"lora_a has {lora_a.shape[0]} slices; at most {MAX_SLICES}")
        if lora_a.shape[1] != meta.num_weights:
            raise ValueError(f"lora_a has {lora_a.shape[1]} entries, meta {meta.num_weights}")
        if x is not None and x.shape != (meta.num_rows, lora_a.shape[3]):
            raise ValueError(f"x must be [{meta.num_rows}, {lora_a.shape[3]}], got "
                             f"{tuple(x.shape)}")
    if lora_b is not None:
        if lora_b.dim() != 3 or lora_b.shape[0] != meta.num_weights:
            raise ValueError(f"lora_b must be [W={meta.num_weights}, N, R], got "
                             f"{tuple(lora_b.shape)}")
        if out is not None and out.shape != (meta.num_rows, lora_b.shape[1]):
            raise ValueError(f"out must be [{meta.num_rows}, {lora_b.shape[1]}], got "
                             f"{tuple(out.shape)}")
    if slice_offsets is not None and lora_b is not None:
        offs = list(slice_offsets)
        if offs[0] != 0 or offs[-1] != lora_b.shape[1] or any(
                b < a for a, b in itertools.pairwise(offs)):
            raise ValueError(f"slice_offsets {offs} must rise from 0 to N={lora_b.shape[1]}")


def lora_linear(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                meta: LoRAMeta, slice_offsets: Sequence[int],
                config: cfg.LinearConfig | None = None,
                workspace: torch.Tensor | None = None,
                counters: torch.Tensor | None = None) -> None:
    """``out[m, slice s] += x[m] @ A[s, w].T @ B[w, slice s].T`` for w = indices[m] >= 0.

    Semantics:
        for m with w = meta.indices[m] >= 0, for s in range(n):
            lo, hi = slice_offsets[s], slice_offsets[s + 1]
            out[m, lo:hi] += (x[m] @ lora_a[s, w].T) @ lora_b[w, lo:hi].T
    Args: out [M, N] (updated in place); x [M, K]; lora_a [n, W, R, K]; lora_b [W, N, R];
        slice_offsets: n + 1 ints from 0 to N; config: a ``FusedConfig`` or ``SplitConfig``
        (default: ``config.choose_linear``); workspace: float32 with at least split_k·n·M·R
        elements for the split path (allocated when absent). A split config with
        ``pdl=True`` launches its expand programmatically on Hopper-or-newer GPUs and runs
        as the plain split elsewhere (same arithmetic, same result). A ``RowConfig`` runs
        the per-row pair (``triton_rows``, float32 sums on CUDA cores; for a few rows),
        with the split path's workspace. An ``ArriveConfig``
        runs the single-launch split-K kernel (``arrive.launch_arrive``): workspace then
        needs G·KP·n·M·R elements, and ``counters`` (int32, zero; default: shared per
        device) are its arrival counters, left zero.
    """
    _check_linear(out, x, lora_a, lora_b, meta, slice_offsets)
    n, w_count, rank, k = lora_a.shape
    m, n_cols = out.shape
    if m == 0:
        return
    if config is None:
        config = cfg.choose_linear(m, n_cols, k, rank, n, w_count,
                                   itemsize=max(x.element_size(), lora_a.element_size()))
    if isinstance(config, cfg.ArriveConfig):
        launch_arrive(out, x, lora_a, lora_b, meta, slice_offsets, config, workspace, counters)
        return
    if isinstance(config, cfg.RowConfig):
        _, k_progs = cfg.k_chunks(k, config.split_k, config.bk)
        y = _split_workspace(workspace, k_progs, n, m, rank, x.device)
        _launch_rows(out, x, lora_a, lora_b, meta, slice_offsets, y, config)
        return
    if isinstance(config, cfg.SplitConfig):
        # The partial count is the number of K programs, which may be below split_k.
        _, k_progs = cfg.k_chunks(k, config.split_k, config.bk)
        y = _split_workspace(workspace, k_progs, n, m, rank, x.device)
        pdl = config.pdl and _pdl_capable(x.device)
        cum = config.cum_starts and meta.cum_starts
        _launch_shrink(x, lora_a, meta, y, config.bm, config.bk, config.split_k,
                       config.shrink_warps, config.stages, zero_unassigned=False, pdl=pdl,
                       cum_starts=cum)
        _launch_expand(out, y, lora_b, meta, slice_offsets, config.bm, config.bn,
                       config.col_splits, config.expand_warps, pdl=pdl, cum_starts=cum,
                       prefetch=config.prefetch)
        return
    o1, o2, o3 = cfg.inner_offsets(slice_offsets, n_cols)
    per, col_progs = cfg.grid_cols(n_cols, config.bn, config.col_splits)
    grid = (cfg.tile_bound(m, w_count, config.bm), col_progs)
    fused_lora_kernel[grid](
        x, lora_a, lora_b, out,
        meta.sorted_rows, meta.seg_counts, meta.seg_starts, w_count, m,
        k, n_cols, o1, o2, o3, rank, n, per,
        x.stride(0), x.stride(1), *lora_a.stride(), *lora_b.stride(), *out.stride(),
        NS_PAD=cfg.next_pow2(n), R_PAD=cfg.rank_pad(rank), W_PAD=cfg.next_pow2(w_count),
        BM=config.bm, BK=config.bk, BN=config.bn, EVEN_K=k % config.bk == 0,
        ALIGNED=cfg.aligned(slice_offsets, config.bn), DOT_PREC=cfg.dot_precision(x.dtype),
        num_warps=config.warps, num_stages=config.stages,
    )


def _launch_rows(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, meta: LoRAMeta, slice_offsets: Sequence[int],
                 y: torch.Tensor, config: cfg.RowConfig) -> None:
    """The per-row pair (``triton_rows``): grids M × K chunks, then M × column blocks."""
    n, _, rank, k = lora_a.shape
    m, n_cols = out.shape
    per, k_progs = cfg.k_chunks(k, config.split_k, config.bk)
    pdl = config.pdl and _pdl_capable(x.device)
    ns_pad, r_pad = cfg.next_pow2(n), cfg.rank_pad(rank)
    shrink_rows_kernel[(m, k_progs)](
        x, lora_a, y, meta.indices, k, rank, n, per,
        x.stride(0), x.stride(1), *lora_a.stride(), y.stride(0), y.stride(1), y.stride(2),
        NS_PAD=ns_pad, R_PAD=r_pad, BK=config.bk, EVEN_K=k % per == 0, PDL=pdl,
        num_warps=config.shrink_warps,
    )
    o1, o2, o3 = cfg.inner_offsets(slice_offsets, n_cols)
    expand_rows_kernel[(m, cfg.cdiv(n_cols, config.bn))](
        y, lora_b, out, meta.indices, n_cols, o1, o2, o3, rank, n, k_progs,
        y.stride(0), y.stride(1), y.stride(2), *lora_b.stride(), *out.stride(),
        NS_PAD=ns_pad, R_PAD=r_pad, BN=config.bn, ALIGNED=cfg.aligned(slice_offsets, config.bn),
        PDL=pdl, num_warps=config.expand_warps, **({"launch_pdl": True} if pdl else {}),
    )


def _pdl_capable(device: torch.device) -> bool:
    """Programmatic dependent launch needs a Hopper-or-newer GPU (never the interpreter)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _split_workspace(workspace: torch.Tensor | None, split_k: int, n: int, m: int, rank: int,
                     device: torch.device) -> torch.Tensor:
    numel = split_k * n * m * rank
    if workspace is None:
        return torch.empty(split_k, n, m, rank, dtype=torch.float32, device=device)
    if workspace.dtype != torch.float32 or workspace.numel() < numel:
        raise ValueError(f"workspace must be float32 with >= {numel} elements, got "
                         f"{workspace.dtype} with {workspace.numel()}")
    return workspace.reshape(-1)[:numel].view(split_k, n, m, rank)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Shrink every slice at once from one read of x.

    Semantics:
        for s in range(n): for m in range(M):
            y[s, m, :] = x[m] @ lora_a[s, indices[m]].T   if indices[m] >= 0 else 0
    Args: x [M, K]; lora_a [n, W, R, K]; out: optional float32 [n, M, R] to fill.
        Returns y [n, M, R] float32 (every element written).
    """
    _check_linear(None, x, lora_a, None, meta, None)
    n, _, rank, _ = lora_a.shape
    m = x.shape[0]
    y = out if out is not None else torch.empty(n, m, rank, dtype=torch.float32, device=x.device)
    if y.shape != (n, m, rank) or y.dtype != torch.float32 or y.stride(2) != 1:
        raise ValueError(f"out must be float32 [{n}, {m}, {rank}] with unit rank stride")
    if m:
        bm = 16 if m <= 64 else 64
        _launch_shrink(x, lora_a, meta, y.unsqueeze(0), bm, 64, 1, 4, 3, zero_unassigned=True)
    return y


def lora_expand(out: torch.Tensor, y: torch.Tensor, lora_b: torch.Tensor, meta: LoRAMeta,
                slice_offsets: Sequence[int]) -> None:
    """Expand each slice into its column range of ``out``, in place.

    Semantics:
        for s in range(n): lo, hi = slice_offsets[s], slice_offsets[s + 1]
            for m with indices[m] >= 0:
                out[m, lo:hi] += y[s, m] @ lora_b[indices[m], lo:hi].T
    Args: out [M, N]; y [n, M, R] float32 (or [splits, n, M, R] partial sums);
        lora_b [W, N, R]; slice_offsets: n + 1 ints from 0 to N.
    """
    _check_linear(out, None, None, lora_b, meta, slice_offsets)
    y4 = y if y.dim() == 4 else y.unsqueeze(0)
    if y4.shape[1:] != (len(slice_offsets) - 1, out.shape[0], lora_b.shape[2]):
        raise ValueError(f"y must be [n, M, R] matching out and lora_b, got {tuple(y.shape)}")
    if out.shape[0]:
        bm = 16 if out.shape[0] <= 64 else 64
        _launch_expand(out, y4, lora_b, meta, slice_offsets, bm, 64, 8, 4)


def _launch_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta, y: torch.Tensor,
                   bm: int, bk: int, split_k: int, warps: int, stages: int,
                   zero_unassigned: bool, row_div: int = 1, x_by_pos: bool = False,
                   y_by_pos: bool = False, pdl: bool = False, cum_starts: bool = False) -> None:
    n, w_count, rank, k = lora_a.shape
    m = y.shape[2]
    per, k_progs = cfg.k_chunks(k, split_k, bk)
    assert k_progs == y.shape[0], "one float32 partial per K program"
    entries = w_count + 1 if zero_unassigned else w_count
    grid = (cfg.tile_bound(m, entries, bm), k_progs)
    shrink_kernel[grid](
        x, lora_a, y,
        meta.sorted_rows, meta.seg_counts, meta.seg_starts, w_count, m,
        k, rank, n, per, row_div,
        x.stride(0), x.stride(1), *lora_a.stride(), y.stride(0), y.stride(1), y.stride(2),
        NS_PAD=cfg.next_pow2(n), R_PAD=cfg.rank_pad(rank), W_PAD=cfg.next_pow2(entries),
        BM=bm, BK=bk, EVEN_K=k % per == 0, ZERO_UNASSIGNED=zero_unassigned,
        X_BY_POS=x_by_pos, Y_BY_POS=y_by_pos, DOT_PREC=cfg.dot_precision(x.dtype), PDL=pdl,
        CUM_STARTS=cum_starts and meta.cum_starts, num_warps=warps, num_stages=stages,
    )


def _launch_expand(out: torch.Tensor, y: torch.Tensor, lora_b: torch.Tensor, meta: LoRAMeta,
                   slice_offsets: Sequence[int], bm: int, bn: int, col_splits: int,
                   warps: int, pdl: bool = False, cum_starts: bool = False,
                   prefetch: bool = False) -> None:
    split_k, n, m, rank = y.shape
    n_cols = out.shape[1]
    o1, o2, o3 = cfg.inner_offsets(slice_offsets, n_cols)
    per, col_progs = cfg.grid_cols(n_cols, bn, col_splits)
    grid = (cfg.tile_bound(m, lora_b.shape[0], bm), col_progs)
    expand_kernel[grid](
        y, lora_b, out,
        meta.sorted_rows, meta.seg_counts, meta.seg_starts, lora_b.shape[0], m,
        n_cols, o1, o2, o3, rank, n, split_k, per,
        y.stride(0), y.stride(1), y.stride(2), *lora_b.stride(), *out.stride(),
        NS_PAD=cfg.next_pow2(n), R_PAD=cfg.rank_pad(rank), W_PAD=cfg.next_pow2(lora_b.shape[0]),
        BM=bm, BN=bn, ALIGNED=cfg.aligned(slice_offsets, bn),
        DOT_PREC=cfg.dot_precision(out.dtype), PDL=pdl,
        CUM_STARTS=cum_starts and meta.cum_starts, PREFETCH=prefetch, num_warps=warps,
        **({"launch_pdl": True} if pdl else {}),
    )
