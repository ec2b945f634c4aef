"""The rank actor: a Ray shell around ``RankRuntime`` that reads the command stream.

``run()`` is the long-running loop the controller watches with ``ray.wait``: it returns only
on SHUTDOWN, and an exception in it (or the process dying) is how the controller learns that
the rank is gone. Score logits stay on this rank until the caller takes them by reference.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from typing import Any, cast

import ray
import torch

from lora_cluster.cluster.dist_comm import FORCED_ENV
from lora_cluster.config import ClusterConfig
from lora_cluster.engine.gc_pauses import SERVE_THRESHOLDS, GCPauses, serve_gc
from lora_cluster.engine.messages import RankReply, Shutdown, Step, StepResult
from lora_cluster.errors import ClusterError, LoRAClusterError
from lora_cluster.model.parallel import LocalComm, ParallelInfo


class RankActorImpl:
    """One rank of a replica (one GPU, or a CPU share)."""

    def __init__(self, config: ClusterConfig, rank: int) -> None:
        for key, value in config.extra_env:
            os.environ[key] = value
        self.config = config
        self.parallel = ParallelInfo.from_rank(rank, config.tp_size, config.ep_size,
                                               config.expert_placement)
        if config.device == "cpu":
            # LORA_CLUSTER_CPU_THREADS (e.g. through extra_env) overrides the even split.
            share = (int(os.environ.get("LORA_CLUSTER_CPU_THREADS") or 0)
                     or max(1, (os.cpu_count() or 1) // config.world_size))
            torch.set_num_threads(share)
        self.runtime: Any = None
        self.reader: Any = None
        self.comm: Any = None
        self._payloads: dict[tuple[int, int], Any] = {}
        self._lock = threading.Lock()
        self.gc_pauses = GCPauses()

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port (used by rank 0 as the rendezvous)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int, command_address: str,
              reply_address: str) -> dict[str, Any]:
        """Form the process group, load the model shard, connect to the stream."""
        from lora_cluster.cluster.dist_comm import TorchDistComm
        from lora_cluster.cluster.stream import CommandReader
        from lora_cluster.engine.rank_runtime import RankRuntime

        if self.parallel.world_size > 1:
            backend = "nccl" if self.config.device == "cuda" else "gloo"
            self.comm = TorchDistComm(self.parallel, master_addr, master_port, backend,
                                      timeout_s=self.config.step_timeout_s)
        else:
            self.comm = LocalComm()
        self.runtime = RankRuntime(self.config, self.parallel, self.comm)
        # What is alive now (imports, the model, its buffers) lives as long as the process:
        # frozen out of the cyclic GC, a full collection no longer walks it (~300k objects on
        # cpu-tiny, ~0.1 s a pass — a stall of the step every rank waits for); and the serving
        # loop collects less often (engine/gc_pauses.py; LORA_CLUSTER_RANK_GC_THRESHOLDS="a,b,c"
        # through ``extra_env`` overrides the thresholds). Every pause is timed (``stats()``).
        thresholds = os.environ.get("LORA_CLUSTER_RANK_GC_THRESHOLDS")
        serve_gc(tuple(int(v) for v in thresholds.split(",")) if thresholds  # type: ignore[arg-type]
                 else SERVE_THRESHOLDS)
        self.gc_pauses.install()
        self.reader = CommandReader(command_address, reply_address, self.parallel.rank)
        return {"rank": self.parallel.rank, "num_kv_blocks": self.runtime.num_kv_blocks,
                "device": str(self.runtime.device), "context_limit": self.runtime.context_limit,
                "model_load_ms": self.runtime.model_load_ms}

    def run(self) -> int:
        """Execute the stream until SHUTDOWN; returns the number of commands run."""
        handled = 0
        while True:
            env = self.reader.next()
            command = env.command
            handled += 1
            if isinstance(command, Step):
                # A step error leaves collectives and KV state undefined: report and stop,
                # so the controller rebuilds the group.
                try:
                    result = self.runtime.execute(command)
                except BaseException as exc:
                    self.reader.reply(env.seq, False, _portable(exc, self.parallel.rank))
                    raise
                if self.parallel.is_output_rank:
                    self.reader.reply(env.seq, True, self._keep_payloads(result))
                continue
            try:
                result = self.runtime.execute(command)
                reply = RankReply(rank=self.parallel.rank, result=result)
            except BaseException as exc:
                reply = RankReply(rank=self.parallel.rank, error=_portable(exc, self.parallel.rank))
            self.reader.reply(env.seq, True, reply)
            if isinstance(command, Shutdown):
                self.reader.close()
                if self.comm is not None and hasattr(self.comm, "close"):
                    self.comm.close()
                return handled

    def _keep_payloads(self, result: StepResult) -> StepResult:
        """Replace logits tensors by keys; the controller turns keys into object refs."""
        if not result.logits:
            return result
        keys = []
        with self._lock:
            for seq_id, tensor in result.logits:
                key = (result.seq, seq_id)
                self._payloads[key] = tensor
                keys.append((seq_id, key))
        return dataclasses.replace(result, logits=tuple(keys))

    def take_payload(self, key: tuple[int, int]) -> torch.Tensor:
        """Hand over (and forget) one held logits tensor."""
        with self._lock:
            return self._payloads.pop(key)

    def stats(self) -> dict[str, Any]:
        if self.runtime is None:
            return {"rank": self.parallel.rank}
        loop = self.reader.clock() if self.reader is not None else {}
        return {**self.runtime.stats(), "gc": self.gc_pauses.stats(), "loop": loop}

    def pid(self) -> int:
        return os.getpid()


# max_restarts=0: a collective group cannot survive a restarted member; the controller rebuilds.
# The forced NCCL variables (NVLink multicast off) are in the process from its start, before
# torch or NCCL reads any of them.
RankActor: Any = cast(Any, ray.remote)(
    max_restarts=0, max_concurrency=4,
    runtime_env={"env_vars": dict(FORCED_ENV)})(RankActorImpl)


def _portable(exc: BaseException, rank: int) -> LoRAClusterError:
    """Typed errors pass as they are; anything else becomes a ClusterError naming the rank."""
    if isinstance(exc, LoRAClusterError):
        return exc
    return ClusterError(f"rank {rank}: {type(exc).__name__}: {exc}", rank=rank)
