"""Launcher of the single-launch split-K LoRA linear (``config.ArriveConfig``) and its counters.

Shape legend: M rows, W weight entries, n slices (≤ 4), R rank, K input width, N output
width, G column groups, KP K programs.

The kernel keeps one int32 arrival counter per (row tile, column group) that is zero
between launches: every launch leaves it at zero itself. Launches that may run at the
same time (other streams) must not share counters: pass each its own ``counters``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora_kernels import config as cfg
from lora_kernels.meta import LoRAMeta
from lora_kernels.triton_arrive import split_arrive_kernel

# Shared counters per device, grown on demand. A grown-out buffer is kept alive: a CUDA
# graph captured with it still launches on its memory.
_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}
_MIN_COUNTERS = 4096


def arrive_grid(m: int, n_cols: int, k: int, w_count: int,
                config: cfg.ArriveConfig) -> tuple[int, int, int]:
    """(row tiles, column groups, K programs) of one launch; counters = tiles · groups."""
    _, k_progs = cfg.k_chunks(k, config.split_k, config.bk)
    _, groups = cfg.grid_cols(n_cols, config.bn, config.col_splits)
    return cfg.tile_bound(m, w_count, config.bm), groups, k_progs


def shared_counters(device: torch.device, numel: int) -> torch.Tensor:
    """At least ``numel`` zeroed int32 arrival counters shared by launches on ``device``.

    Allocating during CUDA-graph capture records a memset that runs on every replay (the
    buffer is then not shared); call once before capturing to avoid that node.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    held = _COUNTERS.get(device)
    if held and held[-1].numel() >= numel:
        return held[-1][:numel]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(numel, dtype=torch.int32, device=device)
    buf = torch.zeros(max(numel, _MIN_COUNTERS), dtype=torch.int32, device=device)
    _COUNTERS.setdefault(device, []).append(buf)
    return buf[:numel]


def _workspace(workspace: torch.Tensor | None, shape: tuple[int, ...],
               device: torch.device) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    if workspace is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if workspace.dtype != torch.float32 or workspace.numel() < numel:
        raise ValueError(f"workspace must be float32 with >= {numel} elements, got "
                         f"{workspace.dtype} with {workspace.numel()}")
    return workspace.reshape(-1)[:numel].view(shape)


def launch_arrive(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, meta: LoRAMeta, slice_offsets: Sequence[int],
                  config: cfg.ArriveConfig, workspace: torch.Tensor | None = None,
                  counters: torch.Tensor | None = None) -> None:
    """``linear.lora_linear`` in one launch (inputs already checked there; M > 0).

    Args: out [M, N]; x [M, K]; lora_a [n, W, R, K]; lora_b [W, N, R]; workspace: float32
        with >= G·KP·n·M·R elements (allocated when absent); counters: int32, zero, with
        >= tiles·G elements (``arrive_grid``; default: ``shared_counters``), left zero.
    """
    n, w_count, rank, k = lora_a.shape
    m, n_cols = out.shape
    tiles, groups, k_progs = arrive_grid(m, n_cols, k, w_count, config)
    if counters is None:
        counters = shared_counters(x.device, tiles * groups)
    elif (counters.dtype != torch.int32 or counters.numel() < tiles * groups
          or counters.device != x.device or not counters.is_contiguous()):
        raise ValueError(f"counters must be contiguous int32 on {x.device} with >= "
                         f"{tiles * groups} elements, got {counters.dtype} on "
                         f"{counters.device} with {counters.numel()}")
    y = _workspace(workspace, (groups, k_progs, n, m, rank), x.device)
    k_per, _ = cfg.k_chunks(k, config.split_k, config.bk)
    cols_per, _ = cfg.grid_cols(n_cols, config.bn, config.col_splits)
    o1, o2, o3 = cfg.inner_offsets(slice_offsets, n_cols)
    split_arrive_kernel[(tiles, groups, k_progs)](
        x, lora_a, lora_b, out, y, counters,
        meta.sorted_rows, meta.seg_counts, meta.seg_starts, w_count, m,
        k, n_cols, o1, o2, o3, rank, n, k_per, cols_per,
        x.stride(0), x.stride(1), *lora_a.stride(), *lora_b.stride(), *out.stride(),
        *y.stride()[:4],
        NS_PAD=cfg.next_pow2(n), R_PAD=cfg.rank_pad(rank), W_PAD=cfg.next_pow2(w_count),
        BM=config.bm, BK=config.bk, BN=config.bn, EVEN_K=k % k_per == 0,
        ALIGNED=cfg.aligned(slice_offsets, config.bn), DOT_PREC=cfg.dot_precision(x.dtype),
        num_warps=config.warps, num_stages=config.stages,
    )
