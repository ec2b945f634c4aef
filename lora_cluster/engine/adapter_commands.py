"""How ``AdapterControl`` sends adapter commands to every rank, and reads their replies.

Every standalone command first sends what must reach the ranks before it: prefetch's queued
victims (``PrefetchBook.queued_drops``) and, while a step is planned, the drops recorded to
ride on it (``StepOps.take_drops``) — a load may need the host-cache room they free. While a
step is planned, prefetch's victims ride on the step too instead of being sent.
Caller holds the exec lock for every send (see ``adapter_control``'s locking notes).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from lora_cluster.engine.messages import AdapterCommand, DropAdapter, RankReply
from lora_cluster.engine.prefetch_book import PrefetchBook
from lora_cluster.engine.step_ops import StepOps
from lora_cluster.errors import ClusterError, LoRAClusterError

SendAll = Callable[[Callable[[int], AdapterCommand]], tuple[RankReply, ...]]
logger = logging.getLogger("lora_cluster.engine")


def first_error(replies: tuple[RankReply, ...]) -> LoRAClusterError | None:
    """The first rank's refusal among ``replies`` as a typed error (None if all succeeded)."""
    for reply in replies:
        if reply.error is not None:
            err = reply.error
            if isinstance(err, LoRAClusterError):
                return err
            return ClusterError(f"rank {reply.rank}: {type(err).__name__}: {err}", rank=reply.rank)
    return None


class AdapterCommands:
    """The ordered sends of one replica's adapter commands (state lives in its owner)."""

    def __init__(self, send_all: SendAll, prefetch: PrefetchBook, step_ops: StepOps) -> None:
        self._send_all = send_all
        self.prefetch = prefetch
        self.step_ops = step_ops

    def send(self, build: Callable[[int], AdapterCommand]) -> tuple[RankReply, ...]:
        """Send one command to every rank, the drops that must precede it first."""
        self.send_queued_drops()
        for op in self.step_ops.take_drops():
            self.send_quietly(op, "a drop planned with a step")
        return self._send_all(build)

    def run(self, build: Callable[[int], AdapterCommand]) -> list[Any]:
        """``send``, raising the first rank's refusal; else every rank's result."""
        replies = self.send(build)
        err = first_error(replies)
        if err is not None:
            raise err
        return [r.result for r in replies]

    def send_queued_drops(self) -> None:
        """Drop prefetch's victims on the ranks, or record the drops on the step being
        planned. A failure (a dead rank) is left to the next step, which rebuilds the group
        from the tiers."""
        drops, self.prefetch.queued_drops = list(self.prefetch.queued_drops), {}
        for key in drops:
            if self.step_ops.open:
                self.step_ops.drop(key)
            else:
                self.send_quietly(DropAdapter(seq=-1, name=key[0], version=key[1]),
                                  "a prefetch victim")

    def send_quietly(self, cmd: AdapterCommand, what: str) -> None:
        """Send a drop-like command (renumbered into the stream), logging a failure."""
        try:
            err = first_error(self._send_all(lambda seq: dataclasses.replace(cmd, seq=seq)))
        except LoRAClusterError as exc:
            err = exc
        if err is not None:
            logger.warning("%s (%s) on the ranks: %s", type(cmd).__name__, what, err)
