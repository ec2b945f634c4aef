"""How the controller drives its ranks: the ``RankGroup`` protocol and an in-process group.

The Ray layer implements ``RankGroup`` over rank actors and the command stream; tests and
single-process tools use ``LocalRankGroup``, which runs a ``RankRuntime`` in this process.
Every command goes to every rank in the order the controller issues it.
"""

from __future__ import annotations

from typing import Protocol

from lora_cluster.config import ClusterConfig
from lora_cluster.engine.messages import (
    AdapterCommand,
    GroupInfo,
    LoadResult,
    PlaceResult,
    RankReply,
    Shutdown,
    Step,
    StepResult,
)
from lora_cluster.engine.rank_runtime import RankRuntime
from lora_cluster.errors import ClusterError, ConfigError, LoRAClusterError
from lora_cluster.model.parallel import LocalComm, ParallelInfo


class RankGroup(Protocol):
    """Every rank of one replica, driven in lock-step."""

    def describe(self) -> GroupInfo:
        """Sizes the controller plans with (KV blocks valid on every rank, slots, device)."""
        ...

    def execute(self, command: Step) -> StepResult:
        """Run a step on every rank; the output rank's result.

        Raises ClusterError when a rank died or missed its deadline (the ranks' state is then
        unknown: the controller calls ``restart``).
        """
        ...

    def execute_all(self, command: AdapterCommand) -> tuple[RankReply, ...]:
        """Run an adapter command on every rank; one reply per rank, in rank order.

        A rank that raised a typed error answers with it (the rank itself is fine and
        unchanged); a dead rank raises ClusterError.
        """
        ...

    def restart(self) -> GroupInfo:
        """Replace every rank with a fresh one: empty host caches, slots and KV caches."""
        ...

    def close(self) -> None:
        """Shut every rank down (idempotent)."""
        ...


class LocalRankGroup:
    """One in-process ``RankRuntime`` (tp_size = ep_size = 1)."""

    def __init__(self, config: ClusterConfig) -> None:
        if config.world_size != 1:
            raise ConfigError(
                f"tp_size × ep_size: LocalRankGroup runs one rank in-process, got "
                f"{config.tp_size} × {config.ep_size} (use the Ray cluster for more)",
                field="tp_size")
        self.config = config
        self.parallel = ParallelInfo(expert_placement=config.expert_placement)
        self.runtime: RankRuntime | None = RankRuntime(config, self.parallel, LocalComm())
        self._seq = 0

    def _rank(self) -> RankRuntime:
        if self.runtime is None:
            raise ClusterError("rank group is closed")
        return self.runtime

    def describe(self) -> GroupInfo:
        rank = self._rank()
        return GroupInfo(world_size=1, num_kv_blocks=rank.num_kv_blocks,
                         block_size=self.config.block_size, device=str(rank.device),
                         dtype=self.config.dtype, max_loras=self.config.max_loras,
                         extra={"context_limit": rank.context_limit,
                                "model_load_ms": rank.model_load_ms})

    def execute(self, command: Step) -> StepResult:
        try:
            result = self._rank().execute(command)
        except LoRAClusterError:
            raise
        except Exception as exc:
            raise ClusterError(f"rank 0 failed in step {command.seq}: "
                               f"{type(exc).__name__}: {exc}", rank=0) from exc
        assert isinstance(result, StepResult)
        return result

    def execute_all(self, command: AdapterCommand) -> tuple[RankReply, ...]:
        try:
            result = self._rank().execute(command)
        except LoRAClusterError as err:
            return (RankReply(rank=0, error=err),)
        except Exception as exc:
            wrapped = ClusterError(f"rank 0 failed on {type(command).__name__}: "
                                   f"{type(exc).__name__}: {exc}", rank=0)
            return (RankReply(rank=0, error=wrapped),)
        assert result is None or isinstance(result, LoadResult | PlaceResult)
        return (RankReply(rank=0, result=result),)

    def restart(self) -> GroupInfo:
        self.close()
        self.runtime = RankRuntime(self.config, self.parallel, LocalComm())
        return self.describe()

    def stats(self) -> list[dict[str, object]]:
        """Each rank's own report."""
        return [self._rank().stats()]

    def close(self) -> None:
        if self.runtime is not None:
            runtime, self.runtime = self.runtime, None
            if not runtime._closed:
                runtime.execute(Shutdown(seq=runtime._last_seq + 1))
