"""Asynchronous steps: the step loop keeps one step in flight while it plans the next.

The base of ``ControllerCore``'s step loop (``engine/controller_steps.py`` provides
``_plan`` / ``_apply``, ``engine/controller_recovery.py`` ``_recover``). One run of steps,
holding ``_exec`` throughout::

    plan k+1 → submit k+1 → collect k → apply k → plan k+2 → submit k+2 → collect k+1 → ...

so the controller's planning, the stream's send and the applying of step k's result overlap
the ranks' forward of step k+1 (the ranks run commands in stream order, so k+1 waits in their
queue only while k runs). A sequence that samples in k and continues in k+1 is fed
``PREV_TOKEN``, which every rank replaces by the token it learnt in k (``engine/runner.py``);
the scheduler (``engine/scheduler.py``) keeps such tokens *pending* until k is applied, does
not feed a pending token that surely ends its sequence, and discards the token sampled in
k+1 for a sequence that k ended (an EOS). The run ends, with nothing in flight, when nothing
more can be planned, an adapter command waits for ``_exec`` or the core closes.

Failure: if collecting step k raises ClusterError, the steps sent after it are lost with the
ranks: ``_recover`` rebuilds the group and recomputes every sequence, as without overlap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_cluster.engine.messages import Step, StepResult
from lora_cluster.errors import ClusterError

if TYPE_CHECKING:
    from lora_cluster.engine.scheduler import ScheduledStep


@dataclass(frozen=True)
class Planned:
    """A scheduled step, the command that carries it, and when its planning began and ended."""

    step: ScheduledStep
    command: Step
    t0: float
    t1: float


@dataclass(frozen=True)
class _Flight:
    """A step sent to the ranks whose result is not collected yet."""

    planned: Planned
    ticket: Any
    submit_s: float


class AsyncStepper:
    """The asynchronous step loop (mixed into ``ControllerCore``)."""

    group: Any  # an AsyncRankGroup
    _exec: threading.Lock
    _exec_wanted: int
    _closed: bool
    _counters: Any

    # Declared for the type checker only: a runtime stub here would shadow the real method
    # of a mixin that comes after this class in ``ControllerCore``'s MRO.
    if TYPE_CHECKING:  # provided by ControllerCore's StepLoop and RankRecovery
        def _plan(self) -> Planned | None: ...

        def _apply(self, planned: Planned, result: StepResult, *, execute_s: float,
                   since: float) -> None: ...

        def _recover(self, planned: Planned, err: ClusterError,
                     abandoned: Sequence[Planned] = ()) -> None: ...

    def _run_async(self) -> bool:
        """Run steps back to back, one in flight; False when none could be scheduled."""
        ran = False
        with self._exec:
            flight: _Flight | None = None
            landed = time.perf_counter()  # when the last result was applied
            while True:
                planned = None if self._must_drain() else self._plan()
                if planned is None:
                    if flight is None:
                        return ran
                    # Nothing to overlap: land the step in flight, then plan again (its
                    # result may make room or end the run). The ranks idle meanwhile.
                    self._counters["async_drains"] += 1
                    self._land(flight, None, since=max(landed, flight.planned.t0))
                    flight, landed = None, time.perf_counter()
                    continue
                if flight is None:
                    landed = planned.t0
                t1 = time.perf_counter()
                try:
                    ticket = self.group.submit(planned.command)
                except ClusterError as err:
                    if flight is not None:
                        self._recover(flight.planned, err, (planned,))
                    else:
                        self._recover(planned, err)
                    return True
                ran = True
                sent = _Flight(planned, ticket, time.perf_counter() - t1)
                if flight is not None:
                    if not self._land(flight, sent, since=landed):
                        flight = None  # recovered: the step just sent was lost with the ranks
                        continue
                    landed = time.perf_counter()
                flight = sent

    def _land(self, flight: _Flight, behind: _Flight | None, *, since: float) -> bool:
        """Collect and apply ``flight``; on a rank failure recover (``behind``, sent after
        it, is lost too) and return False."""
        t0 = time.perf_counter()
        try:
            result = self.group.collect(flight.ticket)
        except ClusterError as err:
            self._recover(flight.planned, err, () if behind is None else (behind.planned,))
            return False
        wait_s = time.perf_counter() - t0
        self._apply(flight.planned, result, execute_s=flight.submit_s + wait_s, since=since)
        return True

    def _must_drain(self) -> bool:
        """An adapter command waits for the ranks, or the core is closing: send no more."""
        return bool(self._exec_wanted) or self._closed
