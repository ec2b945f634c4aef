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

    indices:      [M] int32  weight entry of each row; -1 = no adapter (row gets no delta)
    sorted_rows:  [M] int32  row ids ordered by entry, the -1 rows last
    seg_counts:   [W] int32  rows per entry
    seg_starts:   [W] int32  offset of each entry's first row inside ``sorted_rows``
    num_weights:  W (python int, fixed by the buffer shape, never read back from the device)
    """

    indices: torch.Tensor
    sorted_rows: torch.Tensor
    seg_counts: torch.Tensor
    seg_starts: torch.Tensor
    num_weights: int

    @property
    def num_rows(self) -> int:
        return int(self.indices.shape[0])


def build_lora_meta(indices: torch.Tensor, num_weights: int) -> LoRAMeta:
    """Sort rows by weight entry with device ops only (capturable in a CUDA graph)."""
    idx = indices.to(torch.int32)
    # -1 rows sort last: key W for them.
    key = torch.where(idx < 0, torch.full_like(idx, num_weights), idx)
    sorted_rows = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.zeros(num_weights + 1, dtype=torch.int32, device=idx.device)
    counts.scatter_add_(0, key.long(), torch.ones_like(key))
    seg_counts = counts[:num_weights].contiguous()
    seg_starts = (torch.cumsum(seg_counts, 0, dtype=torch.int32) - seg_counts).contiguous()
    return LoRAMeta(idx, sorted_rows, seg_counts, seg_starts, num_weights)
