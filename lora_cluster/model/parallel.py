"""Where a rank sits in the TP × EP mesh, which experts it owns, and the collectives it calls.

Pure functions and a small ``Comm`` protocol: layers call ``comm.*`` at fixed points, so the
same layer code runs single-process (``LocalComm``) and across rank actors
(a torch.distributed implementation in the cluster layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from lora_cluster.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class ParallelInfo:
    """Coordinates of one rank. Global rank = ep_rank * tp_size + tp_rank."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    expert_placement: str = "contiguous"

    @property
    def rank(self) -> int:
        return self.ep_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.ep_size

    @property
    def is_output_rank(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_rank(rank: int, tp_size: int, ep_size: int, expert_placement: str) -> ParallelInfo:
        return ParallelInfo(tp_rank=rank % tp_size, tp_size=tp_size, ep_rank=rank // tp_size,
                            ep_size=ep_size, expert_placement=expert_placement)


def shard_range(full: int, parts: int, index: int, what: str) -> tuple[int, int]:
    """[start, stop) of shard ``index`` when ``full`` is split evenly into ``parts``."""
    if full % parts:
        raise ConfigError(f"{what}: size {full} is not divisible by {parts} shards", field=what)
    size = full // parts
    return index * size, (index + 1) * size


def local_experts(num_experts: int, info: ParallelInfo) -> tuple[int, ...]:
    """Global ids of the experts this rank's EP group owns, in local order."""
    if num_experts == 0:
        return ()
    if num_experts % info.ep_size:
        raise ConfigError(
            f"ep_size: {info.ep_size} does not divide the model's {num_experts} experts",
            field="ep_size",
        )
    per = num_experts // info.ep_size
    if info.expert_placement == "round_robin":
        return tuple(range(info.ep_rank, num_experts, info.ep_size))
    return tuple(range(info.ep_rank * per, (info.ep_rank + 1) * per))


def expert_map(num_experts: int, info: ParallelInfo) -> list[int]:
    """global expert id → local index on this rank, or -1 when another EP rank owns it."""
    mapping = [-1] * num_experts
    for local, global_id in enumerate(local_experts(num_experts, info)):
        mapping[global_id] = local
    return mapping


class Comm(Protocol):
    """Collectives a rank's layers call. All ops are in place or return a new tensor."""

    def all_reduce_tp(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group (row-parallel outputs, vocab-parallel embedding)."""
        ...

    def all_reduce_world(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over every rank of the replica (MoE partial sums: experts over EP, shards over TP)."""
        ...

    def all_gather_tp(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate TP shards along ``dim`` (vocab-parallel lm_head logits)."""
        ...


class LocalComm:
    """The single-process Comm: every collective is the identity."""

    def all_reduce_tp(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_reduce_world(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather_tp(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x
