"""How the controller drives its ranks: the ``RankGroup`` protocol and an in-process group.

The Ray layer implements ``RankGroup`` over rank actors and the command stream; tests and
single-process tools use ``LocalRankGroup``, which runs a ``RankRuntime`` in this process.
Every command goes to every rank in the order the controller issues it.

Asynchronous steps: a group that also implements ``submit``/``collect`` (``AsyncRankGroup``)
lets the controller keep one step in flight while it plans the next. Commands still run in
the order they were issued, whether sent by ``submit``, ``execute`` or ``execute_all``; a
result is collected once, in any order relative to later adapter commands.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

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


class AsyncRankGroup(RankGroup, Protocol):
    """A ``RankGroup`` that can hold steps in flight."""

    def submit(self, command: Step) -> Any:
        """Send a step to every rank and return at once; a ticket for ``collect``."""
        ...

    def collect(self, ticket: Any) -> StepResult:
        """The output rank's result of a submitted step (raises as ``execute`` does)."""
        ...


def supports_async(group: object) -> bool:
    """Whether ``group``'s class implements ``submit`` and ``collect`` (a wrapper that only
    forwards unknown attributes does not count: it would see none of the steps)."""
    return all(callable(getattr(type(group), name, None)) for name in ("submit", "collect"))


def async_by_default(group: object) -> bool:
    """What ``async_steps="auto"`` picks: on where the group supports it and says it gains
    (class attribute ``ASYNC_AUTO``, default True: ranks in other processes)."""
    return supports_async(group) and bool(getattr(type(group), "ASYNC_AUTO", True))


class LocalRankGroup:
    """One in-process ``RankRuntime`` (tp_size = ep_size = 1).

    ``submit`` runs steps on one worker thread; every other call first waits for the steps
    in flight, so order holds. Not on under "auto": the worker and the controller share one
    GIL, and on cpu-tiny at 128 sequences the overlap measured 0.90× (docs/PERFORMANCE.md).
    """

    ASYNC_AUTO = False

    def __init__(self, config: ClusterConfig) -> None:
        if config.world_size != 1:
            raise ConfigError(
                f"tp_size × ep_size: LocalRankGroup runs one rank in-process, got "
                f"{config.tp_size} × {config.ep_size} (use the Ray cluster for more)",
                field="tp_size")
        self.config = config
        self.parallel = ParallelInfo(expert_placement=config.expert_placement)
        self.runtime: RankRuntime | None = RankRuntime(config, self.parallel, LocalComm())
        self._worker: ThreadPoolExecutor | None = None
        self._last: Future[StepResult] | None = None
        self._submit_lock = threading.Lock()

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

    def submit(self, command: Step) -> Future[StepResult]:
        with self._submit_lock:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="local-rank")
            self._last = self._worker.submit(self._run_step, command)
            return self._last

    def collect(self, ticket: Future[StepResult]) -> StepResult:
        return ticket.result()

    def _drain(self) -> None:
        """Wait for the steps in flight (their errors stay with their tickets)."""
        last = self._last
        if last is not None:
            last.exception()
            self._last = None

    def execute(self, command: Step) -> StepResult:
        self._drain()
        return self._run_step(command)

    def _run_step(self, command: Step) -> StepResult:
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
        self._drain()
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
        self._drain()
        self.close()
        self.runtime = RankRuntime(self.config, self.parallel, LocalComm())
        return self.describe()

    def stats(self) -> list[dict[str, object]]:
        """Each rank's own report."""
        return [self._rank().stats()]

    def close(self) -> None:
        self._drain()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self.runtime is not None:
            runtime, self.runtime = self.runtime, None
            if not runtime._closed:
                runtime.execute(Shutdown(seq=runtime._last_seq + 1))
