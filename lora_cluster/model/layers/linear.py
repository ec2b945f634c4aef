"""Tensor-parallel linears with LoRA slots and their own checkpoint loaders.

Shape legend: T tokens, O this rank's output width, K this rank's input width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lora_kernels.meta import LoRAMeta
from torch import nn

from lora_cluster.model.checkpoint import CheckpointReader
from lora_cluster.model.layers.lora_buffers import LinearLoRA, LoRACapacity
from lora_cluster.model.parallel import Comm

Range = tuple[int, int]


class ColumnParallelLinear(nn.Module):
    """Output-sharded linear made of merged slices (q/k/v of unequal widths, gate/up, or one).

    Slice ``i`` is rows ``row_ranges[i]`` of a full ``[out_full[i], in]`` checkpoint weight.
    weight [O, in] with O = Σ local slice widths; forward x [T, in] → y [T, O] (no collective:
    the output stays sharded). LoRA: A full, B sharded by output like the weight.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_full: Sequence[int], row_ranges: Sequence[Range],
                 *, bias: bool, cap: LoRACapacity | None, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        assert len(out_full) == len(row_ranges)
        self.in_features = in_features
        self.out_full = tuple(out_full)
        self.row_ranges = tuple(row_ranges)
        self.out_sizes = tuple(hi - lo for lo, hi in row_ranges)
        total = sum(self.out_sizes)
        self.register_buffer("weight", torch.empty(total, in_features, dtype=dtype, device=device))
        self.register_buffer(
            "bias", torch.zeros(total, dtype=dtype, device=device) if bias else None)
        self.lora = LinearLoRA(in_features, self.out_sizes, cap, dtype, device) if cap else None

    def load(self, reader: CheckpointReader, prefixes: Sequence[str]) -> None:
        """Read this rank's rows of ``{prefix}.weight`` (and ``.bias``) for each slice."""
        offset = 0
        for prefix, full, (lo, hi) in zip(prefixes, self.out_full, self.row_ranges, strict=True):
            rows = slice(offset, offset + hi - lo)
            self.weight[rows].copy_(
                reader.read(f"{prefix}.weight", (full, self.in_features), (slice(lo, hi),)))
            if self.bias is not None:
                self.bias[rows].copy_(reader.read(f"{prefix}.bias", (full,), (slice(lo, hi),)))
            offset += hi - lo

    def forward(self, x: torch.Tensor, meta: LoRAMeta | None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora is not None and meta is not None:
            self.lora.add_to(y, x, meta)
        return y


class RowParallelLinear(nn.Module):
    """Input-sharded linear: each rank holds columns ``in_range`` of a full ``[out, in]`` weight.

    forward x [T, K] → partial [T, out]; the LoRA delta (A sharded by input, B full) joins the
    partial *before* ``comm.all_reduce_tp`` (exact: B is linear); the bias is added on TP rank 0
    only so the sum counts it once. ``reduce=False`` leaves the reduction to the caller.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_full: int, in_range: Range, out_features: int, *, bias: bool,
                 comm: Comm, tp_rank: int, cap: LoRACapacity | None, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.in_full = in_full
        self.in_range = in_range
        self.out_features = out_features
        self.comm = comm
        self.owns_bias = tp_rank == 0
        in_local = in_range[1] - in_range[0]
        self.register_buffer("weight", torch.empty(out_features, in_local, dtype=dtype,
                                                   device=device))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.lora = LinearLoRA(in_local, (out_features,), cap, dtype, device) if cap else None

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        """Read this rank's columns of ``{prefix}.weight`` (and the full ``.bias``)."""
        lo, hi = self.in_range
        self.weight.copy_(reader.read(f"{prefix}.weight", (self.out_features, self.in_full),
                                      (slice(None), slice(lo, hi))))
        if self.bias is not None:
            self.bias.copy_(reader.read(f"{prefix}.bias", (self.out_features,)))

    def forward(self, x: torch.Tensor, meta: LoRAMeta | None, *,
                reduce: bool = True) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if self.owns_bias else None)
        if self.lora is not None and meta is not None:
            self.lora.add_to(y, x, meta)
        return self.comm.all_reduce_tp(y) if reduce else y
