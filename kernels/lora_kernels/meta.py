"""Per-step LoRA batch metadata, built once on the device with fixed shapes and no host sync.

Shape legend: M rows (tokens, or token×top-k pairs for experts), W weight entries (adapter
slots, or slots × local experts), n slices, R rank, K input width, N output width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRAMeta:
    """Row → weight-entry map of one step, plus the sorted view Triton kernels launch over.

    indices:        [M] int32  weight entry of each row; -1 = no adapter (row gets no delta)
    sorted_rows:    [M] int32  row ids ordered by entry, the -1 rows last
    seg_counts:     [W] int32  rows per entry
    seg_starts:     [W] int32  offset of each entry's first row inside ``sorted_rows``
    active_entries: [W] int32  entries that have rows, ascending, then -1 padding
    num_active:     [1] int32  how many entries have rows (a device scalar: never read back)
    num_weights:    W (python int, fixed by the buffer shape, never read back from the device)
    cum_starts:     whether ``seg_starts`` is the exclusive cumsum of ``seg_counts`` (segments
                    laid out in entry order): kernels may then derive a tile's start from
                    the counts they already hold instead of a dependent load

    Kernels launch a grid bounded by ``cdiv(M, BM) + min(W, M)`` row tiles (a static bound,
    so a captured CUDA graph stays valid for any assignment) and find their entry from
    ``seg_counts`` on the device; programs past the live tiles return at once.
    """

    indices: torch.Tensor
    sorted_rows: torch.Tensor
    seg_counts: torch.Tensor
    seg_starts: torch.Tensor
    num_weights: int
    active_entries: torch.Tensor | None = None
    num_active: torch.Tensor | None = None
    cum_starts: bool = False

    @property
    def num_rows(self) -> int:
        return int(self.indices.shape[0])


def build_lora_meta(indices: torch.Tensor, num_weights: int) -> LoRAMeta:
    """Sort rows by weight entry with device ops only (capturable in a CUDA graph).

    On CUDA, step-sized batches take the one-launch Triton build (``triton_meta``), which
    gives the same values; larger ones and CPU tensors take the torch ops below.
    """
    if indices.is_cuda:
        from lora_kernels import triton_meta

        if triton_meta.supported(indices.shape[0], num_weights):
            return triton_meta.build_lora_meta_triton(indices, num_weights)
    return build_lora_meta_torch(indices, num_weights)


def build_lora_meta_torch(indices: torch.Tensor, num_weights: int) -> LoRAMeta:
    """``build_lora_meta`` from torch ops (a stable argsort, a histogram and scans)."""
    idx = indices.to(torch.int32)
    # -1 rows sort last: key W for them.
    key = torch.where(idx < 0, torch.full_like(idx, num_weights), idx)
    sorted_rows = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.zeros(num_weights + 1, dtype=torch.int32, device=idx.device)
    counts.scatter_add_(0, key.long(), torch.ones_like(key))
    seg_counts = counts[:num_weights].contiguous()
    seg_starts = (torch.cumsum(seg_counts, 0, dtype=torch.int32) - seg_counts).contiguous()
    live = seg_counts > 0
    entry_ids = torch.arange(num_weights, dtype=torch.int32, device=idx.device)
    # Live entries keep their order and move first; dead ones become -1 at the end.
    order = torch.argsort((~live).to(torch.int8), stable=True)
    active_entries = torch.where(live, entry_ids, torch.full_like(entry_ids, -1))[order]
    num_active = live.sum(dtype=torch.int32).reshape(1)
    return LoRAMeta(
        idx, sorted_rows, seg_counts, seg_starts, num_weights,
        active_entries.to(torch.int32).contiguous(), num_active, cum_starts=True,
    )
