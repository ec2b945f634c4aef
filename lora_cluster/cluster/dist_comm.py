"""``Comm`` over torch.distributed: gloo on CPU, NCCL on GPU, a fresh rendezvous per formation.

Groups: the world (every rank of the replica) and one TP group per EP rank (ranks sharing
``ep_rank``). Every rank creates every group in the same order, as torch.distributed requires.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from lora_cluster.model.parallel import ParallelInfo


class TorchDistComm:
    """Collectives for one rank; ``close()`` destroys the process group."""

    def __init__(self, parallel: ParallelInfo, master_addr: str, master_port: int,
                 backend: str, timeout_s: float) -> None:
        if backend == "nccl":
            # NVLink multicast must stay off on shared hosts.
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
            os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        self.parallel = parallel
        self.backend = backend
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=parallel.rank,
            world_size=parallel.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self._tp_group = None
        for ep in range(parallel.ep_size):
            ranks = [ep * parallel.tp_size + t for t in range(parallel.tp_size)]
            group = dist.new_group(ranks) if parallel.tp_size > 1 else None
            if ep == parallel.ep_rank:
                self._tp_group = group

    def all_reduce_tp(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size > 1:
            dist.all_reduce(x, group=self._tp_group)
        return x

    def all_reduce_world(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_tp(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.parallel.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self._tp_group)
        return torch.cat(parts, dim=dim)

    def barrier(self) -> None:
        if self.parallel.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
