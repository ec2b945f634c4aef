"""``ThreadRankGroup``: a real multi-rank ``RankGroup`` in one process (tests only).

Each rank is a ``RankRuntime`` over ``ThreadComm``; a step runs every rank on its own thread
(the collectives meet at a barrier), adapter commands run on every rank in order. It lets
``ControllerCore`` drive TP × EP ranks without Ray. ``fail`` injects a typed error from one
rank for the commands a predicate picks (the other ranks execute them normally); for an op
riding on a step (``Step.adapter_ops``) it fails the step as that rank would, before any rank
runs it (a real rank would leave the others waiting in the step's collectives until restart).
``submit``/``collect`` keep steps in flight on a driver thread (asynchronous steps); every
other call waits for them first, so commands keep their order.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from model_support import ThreadComm

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
from lora_cluster.engine.step_ops import op_failure
from lora_cluster.errors import ClusterError, LoRAClusterError


class ThreadRankGroup:
    """``config.tp_size × config.ep_size`` in-process ranks driven in lock-step."""

    ASYNC_AUTO = False  # in process, like LocalRankGroup: asynchronous only when asked

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.pool = ThreadPoolExecutor(config.world_size, thread_name_prefix="rank")
        self.fail: tuple[int, Callable[[AdapterCommand], bool], LoRAClusterError] | None = None
        self.commands: list[object] = []
        self.driver = ThreadPoolExecutor(1, thread_name_prefix="rank-driver")
        self._last: Future[StepResult] | None = None
        self._start()

    def _start(self) -> None:
        comms = ThreadComm.group(self.config.tp_size, self.config.ep_size,
                                 self.config.expert_placement)
        self.ranks = [RankRuntime(self.config, c.info, c) for c in comms]

    def describe(self) -> GroupInfo:
        return GroupInfo(world_size=len(self.ranks),
                         num_kv_blocks=min(r.num_kv_blocks for r in self.ranks),
                         block_size=self.config.block_size, device="cpu",
                         dtype=self.config.dtype, max_loras=self.config.max_loras)

    def submit(self, command: Step) -> Future[StepResult]:
        self._last = self.driver.submit(self._step, command)
        return self._last

    def collect(self, ticket: Future[StepResult]) -> StepResult:
        return ticket.result()

    def _drain(self) -> None:
        if self._last is not None:
            self._last.exception()
            self._last = None

    def execute(self, command: Step) -> StepResult:
        self._drain()
        return self._step(command)

    def _step(self, command: Step) -> StepResult:
        self.commands.append(command)
        if self.fail is not None:
            rank, pick, err = self.fail
            for index, op in enumerate(command.adapter_ops):
                if pick(op):
                    raise op_failure(rank, command.seq, index, op, err)
        futures = [self.pool.submit(r.execute, command) for r in self.ranks]
        try:
            results = [f.result(timeout=120) for f in futures]
        except LoRAClusterError:
            raise
        except Exception as exc:
            raise ClusterError(f"step {command.seq} failed: {type(exc).__name__}: {exc}") from exc
        out = results[0]
        assert isinstance(out, StepResult)
        return out

    def execute_all(self, command: AdapterCommand) -> tuple[RankReply, ...]:
        self._drain()
        self.commands.append(command)
        replies = []
        for rank, runtime in enumerate(self.ranks):
            if self.fail is not None and self.fail[0] == rank and self.fail[1](command):
                runtime._last_seq = command.seq  # the rank saw the command and refused it
                replies.append(RankReply(rank=rank, error=self.fail[2]))
                continue
            try:
                result = runtime.execute(command)
            except LoRAClusterError as err:
                replies.append(RankReply(rank=rank, error=err))
                continue
            assert result is None or isinstance(result, LoadResult | PlaceResult)
            replies.append(RankReply(rank=rank, result=result))
        return tuple(replies)

    def restart(self) -> GroupInfo:
        self._drain()
        self._close_ranks()
        self._start()
        return self.describe()

    def _close_ranks(self) -> None:
        for r in self.ranks:
            if not r._closed:
                r.execute(Shutdown(seq=r._last_seq + 1))

    def close(self) -> None:
        self._drain()
        self._close_ranks()
        self.pool.shutdown(wait=False)
        self.driver.shutdown(wait=False)
