"""SwiGLU MLP, TP-sharded: gate/up one column-parallel linear (2 slices), down row-parallel.

Used for dense families' MLPs, Qwen3-MoE's ``mlp_only_layers`` and Qwen2-MoE's shared expert.
Shape legend: T rows, H hidden, I local intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_cluster.model.checkpoint import CheckpointReader
from lora_cluster.model.layers.linear import ColumnParallelLinear, RowParallelLinear
from lora_cluster.model.layers.lora_buffers import LoRACapacity
from lora_cluster.model.parallel import Comm, ParallelInfo
from lora_cluster.model.sharding import intermediate_shard
from lora_cluster.model.step_context import StepContext


class DenseMLP(nn.Module):
    """x [T, H] → down(silu(gate(x)) · up(x)) [T, H]; ``groups`` name its LoRA index groups."""

    def __init__(self, hidden: int, intermediate: int, parallel: ParallelInfo, *, comm: Comm,
                 bias: bool, groups: tuple[str, str], what: str, cap: LoRACapacity | None,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        cols = intermediate_shard(intermediate, parallel, what)
        self.inter_local = cols[1] - cols[0]
        self.groups = groups
        self.gate_up = ColumnParallelLinear(hidden, (intermediate, intermediate), (cols, cols),
                                            bias=bias, cap=cap, dtype=dtype, device=device)
        self.down = RowParallelLinear(intermediate, cols, hidden, bias=bias, comm=comm,
                                      tp_rank=parallel.tp_rank, cap=cap, dtype=dtype,
                                      device=device)

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        """Read ``{prefix}.{gate,up,down}_proj`` slices of this rank."""
        self.gate_up.load(reader, [f"{prefix}.gate_proj", f"{prefix}.up_proj"])
        self.down.load(reader, f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor, ctx: StepContext, *, reduce: bool = True) -> torch.Tensor:
        gate, up = self.gate_up(x, ctx.meta(self.groups[0])).split(self.inter_local, dim=-1)
        return self.down(F.silu(gate) * up, ctx.meta(self.groups[1]), reduce=reduce)
