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

# Every rank process gets these whatever its environment says (rank actors through their Ray
# runtime_env, see rank_actor.py): NVLink multicast stays off on shared hosts.
FORCED_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
# ...and these unless the environment already says otherwise: on a collective that outlives the
# process group's timeout (a peer died mid-step) NCCL's watchdog logs it and skips tearing down
# communicators (3; a teardown can itself hang on a dead peer), with no flight-recorder dump.
# The rank is NOT expected to end by itself: on 2 x H100 (torch 2.11, NCCL 2.28) a survivor
# stayed blocked on the GPU under modes 1 and 3 and with TORCH_NCCL_BLOCKING_WAIT=1
# (benchmarks/results/multigpu_tests_h100x2.log), and collectives replayed from CUDA graphs have
# no Work to watch at all. The controller's step deadline and dead-peer check end such a group
# from outside (ray.kill of every rank actor, then a rebuild).
DEFAULT_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}


def apply_nccl_env() -> None:
    """Set this process's NCCL environment (before any communicator exists)."""
    os.environ.update(FORCED_ENV)
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)


class TorchDistComm:
    """Collectives for one rank; ``close()`` destroys the process group.

    ``timeout_s`` bounds the rendezvous and every collective (NCCL: see ``DEFAULT_ENV``).
    """

    def __init__(self, parallel: ParallelInfo, master_addr: str, master_port: int,
                 backend: str, timeout_s: float) -> None:
        if backend == "nccl":
            apply_nccl_env()
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
