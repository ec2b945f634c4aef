"""``RankGroup`` over Ray rank actors: one command stream, one ``run()`` ref watched per rank.

A dead rank is noticed two ways: its ``run()`` ref finishes (the process died or the loop
raised), or a reply misses its deadline. Either raises ClusterError; the controller then calls
``restart()``, which replaces every rank (new actors, new rendezvous port, new stream).

Asynchronous steps: ``submit`` publishes a step and returns its stream position; ``collect``
waits for its reply. Replies to other commands that arrive meanwhile (a step's reply while
an adapter command issued after it is collected, or the reverse) are kept until asked for.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import ray

from lora_cluster.cluster.rank_actor import RankActor
from lora_cluster.cluster.stream import CommandPublisher, Reply
from lora_cluster.config import ClusterConfig
from lora_cluster.engine.messages import (
    AdapterCommand,
    GroupInfo,
    RankReply,
    Shutdown,
    Step,
    StepResult,
)
from lora_cluster.errors import ClusterError, LoRAClusterError

POLL_S = 0.2
_TEARDOWN_WAIT_S = 30.0  # how long a rebuild waits for killed ranks to exit


class RayRankGroup:
    """The ranks of one replica inside its placement group."""

    def __init__(self, config: ClusterConfig, placement_group: Any, *,
                 setup_timeout_s: float = 600.0) -> None:
        self.config = config
        self._pg = placement_group
        self._setup_timeout_s = setup_timeout_s
        self._actors: list[Any] = []
        self._runs: list[Any] = []
        self._pub: CommandPublisher | None = None
        self._info: GroupInfo | None = None
        self._early: dict[int, list[Reply]] = {}  # replies that came before they were asked for
        self._in_flight: set[int] = set()  # submitted steps not collected yet
        self.generation = 0
        self._start()

    # ---- formation ---------------------------------------------------------------------
    def _start(self) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from lora_cluster.cluster.placement import rank_resources

        cfg = self.config
        cpus, gpus = rank_resources(cfg)
        self._actors = [
            RankActor.options(
                num_cpus=cpus, num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=rank + 1),
            ).remote(cfg, rank)
            for rank in range(cfg.world_size)
        ]
        try:
            master_addr, master_port = ray.get(self._actors[0].address.remote(),
                                               timeout=self._setup_timeout_s)
            self._pub = CommandPublisher(host=ray.util.get_node_ip_address())
            setups = [a.setup.remote(master_addr, master_port, self._pub.command_address,
                                     self._pub.reply_address) for a in self._actors]
            infos = ray.get(setups, timeout=self._setup_timeout_s)
            self._runs = [a.run.remote() for a in self._actors]
            self._pub.handshake(cfg.world_size, timeout_s=60.0)
        except Exception as exc:
            self._teardown()
            raise _as_cluster_error(exc, "forming the rank group") from None
        self.generation += 1
        self._info = GroupInfo(
            world_size=cfg.world_size,
            num_kv_blocks=min(i["num_kv_blocks"] for i in infos),
            block_size=cfg.block_size, device=infos[0]["device"], dtype=cfg.dtype,
            max_loras=cfg.max_loras,
            extra={"context_limit": min(i["context_limit"] for i in infos),
                   "model_load_ms": max(i["model_load_ms"] for i in infos)},
        )

    def describe(self) -> GroupInfo:
        if self._info is None:
            raise ClusterError("rank group is closed")
        return self._info

    # ---- commands ------------------------------------------------------------------------
    def execute(self, command: Step) -> StepResult:
        return self.collect(self.submit(command))

    def submit(self, command: Step) -> int:
        seq = self._publish(command)
        self._in_flight.add(seq)
        return seq

    def collect(self, ticket: int) -> StepResult:
        seq = ticket
        try:
            reply = self._collect(seq, 1, self.config.step_timeout_s)[0]
        finally:
            self._in_flight.discard(seq)
        if not reply.ok:
            err = reply.value
            raise err if isinstance(err, LoRAClusterError) else ClusterError(str(err))
        result: StepResult = reply.value
        if result.logits:
            output = self._actors[0]
            refs = tuple((seq_id, output.take_payload.remote(key)) for seq_id, key in result.logits)
            result = dataclasses.replace(result, logits=refs)
        return result

    def execute_all(self, command: AdapterCommand) -> tuple[RankReply, ...]:
        seq = self._publish(command)
        replies = self._collect(seq, self.config.world_size, max(self.config.step_timeout_s, 300.0))
        out: dict[int, RankReply] = {r.rank: r.value for r in replies}
        return tuple(out[rank] for rank in range(self.config.world_size))

    def _publish(self, command: Any) -> int:
        if self._pub is None:
            raise ClusterError("rank group is closed")
        return self._pub.publish(command)

    def _collect(self, seq: int, count: int, timeout_s: float) -> list[Reply]:
        """Replies to ``seq`` from ``count`` ranks, watching for dead ranks meanwhile."""
        assert self._pub is not None
        got: list[Reply] = []
        for early in self._early.pop(seq, ()):
            if not early.ok:
                return [early]
            got.append(early)
        deadline = time.monotonic() + timeout_s
        while len(got) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClusterError(f"rank group: command {seq} missed its {timeout_s:.0f}s deadline "
                                   f"({len(got)}/{count} replies)", seq=seq)
            reply = self._pub.recv_reply(min(remaining, POLL_S))
            if reply is None:
                self._check_alive()
                continue
            if reply.seq == seq:
                if not reply.ok:
                    return [reply]
                got.append(reply)
            elif reply.seq > seq or reply.seq in self._in_flight:
                # A later command's, or a step in flight's: someone will ask. (Anything else
                # is a straggler of a command already answered, e.g. after a rank's error.)
                self._early.setdefault(reply.seq, []).append(reply)
        return got

    def _check_alive(self) -> None:
        done, _ = ray.wait(self._runs, num_returns=len(self._runs), timeout=0)
        if done:
            ranks = [self._runs.index(ref) for ref in done]
            raise ClusterError(f"rank group: rank(s) {ranks} stopped", ranks=ranks)

    # ---- recovery and shutdown -----------------------------------------------------------
    def restart(self) -> GroupInfo:
        self._teardown()
        self._start()
        return self.describe()

    def stats(self) -> list[dict[str, Any]]:
        return ray.get([a.stats.remote() for a in self._actors], timeout=30)

    def rank_pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self._actors], timeout=30)

    def kill_rank(self, rank: int) -> None:
        """Kill one rank's process (fault injection for tests and drills)."""
        ray.kill(self._actors[rank], no_restart=True)

    def close(self) -> None:
        if self._pub is not None and self._runs:
            try:
                seq = self._pub.publish(Shutdown(seq=2**62))
                self._collect(seq, self.config.world_size, 30.0)
            except ClusterError:
                pass
        self._teardown()
        self._info = None

    def _teardown(self) -> None:
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        # Wait until the old processes are gone: their device memory is freed only then, and
        # a rebuilt group sized from free memory (kv_cache_fraction) would otherwise see
        # less of it and plan fewer KV blocks than the scheduler holds.
        if self._runs:
            ray.wait(self._runs, num_returns=len(self._runs), timeout=_TEARDOWN_WAIT_S)
        self._actors, self._runs = [], []
        self._early.clear()
        self._in_flight.clear()
        if self._pub is not None:
            self._pub.close()
            self._pub = None


def _as_cluster_error(exc: BaseException, what: str) -> LoRAClusterError:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, LoRAClusterError):
        return cause
    if isinstance(exc, LoRAClusterError):
        return exc
    return ClusterError(f"{what}: {type(exc).__name__}: {cause or exc}")
