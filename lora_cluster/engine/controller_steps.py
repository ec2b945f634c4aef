"""The step loop of ``ControllerCore``: plan a step, send it, apply its result, count.

A mixin: ``ControllerCore`` provides the state it uses (scheduler, adapters, prefetcher, the
rank group, the ``_exec`` / ``_lock`` / ``_cv`` locks, counters); the threading model is the
core's (see ``engine/controller_core.py``). One background thread runs ``_loop`` while work
exists; adapter commands get ``_exec`` between steps through ``_fair_exec``.

Prefetch (``engine/prefetch.py``): after each ``schedule()`` the step loop admits the next
waiting requests' adapters to the host tier ahead of use (bookkeeping only) and the step
carries read-ahead hints; the ranks read them on reader threads between commands, so disk
reads happen beside steps, never under ``_exec``.

Asynchronous steps (``ClusterConfig.async_steps``, ``engine/async_steps.py``): while one step
runs on the ranks the loop plans and sends the next, then applies the first's result. It
holds ``_exec`` for the whole run of steps and drains (no step in flight) before letting an
adapter command in; adapter commands issued while planning (a reload) follow the step in
flight in the stream, as they would follow it in time without overlap.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from lora_cluster.engine.adapter_control import AdapterControl
from lora_cluster.engine.async_steps import AsyncStepper, Planned
from lora_cluster.engine.messages import (
    AdapterCommand,
    LoadAdapter,
    PlaceAdapter,
    RankReply,
    Step,
    StepResult,
)
from lora_cluster.engine.prefetch import Prefetcher
from lora_cluster.engine.rank_group import RankGroup
from lora_cluster.engine.scheduler import ScheduledStep, Scheduler, SeqEvent
from lora_cluster.errors import ClusterError, LoRAClusterError

logger = logging.getLogger("lora_cluster.engine")
_IDLE_WAIT_S = 0.05  # re-check interval when work exists but nothing can run yet
RATE_WINDOW_S = 10.0  # tokens/s in stats() is measured over this trailing window
_YIELD_WAIT_S = 0.25  # between update groups: how long to wait for the step loop's next step


class StepLoop(AsyncStepper):
    """Plan / send / apply of the controller's steps (mixed into ``ControllerCore``)."""

    group: RankGroup
    adapters: AdapterControl
    scheduler: Scheduler
    prefetcher: Prefetcher
    async_steps: bool
    _lock: threading.RLock
    _cv: threading.Condition
    _exec: threading.Lock
    _exec_wanted: int
    _cmd_seq: itertools.count[int]
    _counters: collections.Counter[str]
    _window: collections.deque[tuple[float, int]]
    _closed: bool
    _failures_in_a_row: int
    _broken: LoRAClusterError | None

    if TYPE_CHECKING:  # provided by ControllerCore and its other mixins
        def _recover(self, planned: Planned, err: ClusterError,
                     abandoned: Sequence[Planned] = ()) -> None: ...

        def _publish(self, events: list[SeqEvent]) -> None: ...

        def _fail_all(self, err: LoRAClusterError) -> None: ...

    def _send_all(self, build: Callable[[int], AdapterCommand]) -> tuple[RankReply, ...]:
        """Send an adapter command to every rank (caller holds ``_exec``)."""
        self._counters["standalone_commands"] += 1
        return self.group.execute_all(build(next(self._cmd_seq)))

    @contextlib.contextmanager
    def _fair_exec(self) -> Iterator[None]:
        """``_exec`` for an adapter command, taken before the step loop's next step (a plain
        lock would let the loop re-take it step after step and starve the command)."""
        with self._cv:
            self._exec_wanted += 1
        try:
            self._exec.acquire()
        finally:
            with self._cv:
                self._exec_wanted -= 1
                self._cv.notify_all()
        try:
            yield
        finally:
            self._exec.release()

    def _yield_to_steps(self) -> int:
        """Between two update groups: let the step loop run one step if it has work.
        Returns how many steps ran meanwhile."""
        with self._cv:
            if self._closed or not self.scheduler.has_work():
                return 0
            seen = self._counters["steps"]
            self._cv.wait_for(lambda: self._counters["steps"] != seen or self._closed
                              or not self.scheduler.has_work(), timeout=_YIELD_WAIT_S)
            return self._counters["steps"] - seen

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._closed or self.scheduler.has_work())
                    if self._closed:
                        return
                    # An adapter command is waiting for the ranks: it goes first.
                    self._cv.wait_for(lambda: self._closed or not self._exec_wanted,
                                      timeout=_YIELD_WAIT_S)
                if not self._step():
                    with self._cv:
                        self._cv.wait(_IDLE_WAIT_S)
        except BaseException as exc:
            # A bug must not leave callers waiting forever: fail everything, refuse new work.
            logger.exception("step loop crashed")
            with self._lock:
                self._broken = ClusterError(f"step loop crashed: {type(exc).__name__}: {exc}")
                self._fail_all(self._broken)

    def _step(self) -> bool:
        """Run one step (or, asynchronously, a run of them); False when nothing was scheduled."""
        if self.async_steps:
            return self._run_async()
        with self._exec:
            planned = self._plan()
            if planned is None:
                return False
            t1 = time.perf_counter()
            try:
                result = self.group.execute(planned.command)
            except ClusterError as err:
                self._recover(planned, err)
                return True
            t2 = time.perf_counter()
            self._apply(planned, result, execute_s=t2 - t1, since=planned.t0)
        return True

    def _plan(self) -> Planned | None:
        """Schedule the next step under ``_lock`` (caller holds ``_exec``); None if nothing runs."""
        t0 = time.perf_counter()
        # Slot placements and host drops decided while planning ride on the step (one
        # round trip instead of one per adapter: engine/step_ops.py).
        with self._lock, self.adapters.riding() as riding:
            self.adapters.flush_drops_locked()
            step = self.scheduler.schedule()
            self._publish(self.scheduler.take_events())
            if step is None:
                return None
            # The queue moved on: the ranks read its next adapters beside this step.
            hints = self.prefetcher.plan_locked(self.scheduler.waiting)
            self.adapters.send_queued_drops()  # the ranks' caches follow the tiers
            ops = riding.take()
        command = Step(seq=next(self._cmd_seq), plan=step.plan, read_ahead=hints,
                       adapter_ops=ops)
        return Planned(step, command, t0, time.perf_counter())

    def _apply(self, planned: Planned, result: StepResult, *, execute_s: float,
               since: float) -> None:
        """Fold a step's result into the schedule and publish it (caller holds ``_exec``)."""
        step, ops = planned.step, planned.command.adapter_ops
        with self._lock:
            self._failures_in_a_row = 0
            if ops:
                self.adapters.ops_applied(ops, result.adapter_results)
                places = sum(isinstance(op, PlaceAdapter) for op in ops)
                loads = sum(isinstance(op, LoadAdapter) for op in ops)
                self._counters["placements_on_step"] += places
                self._counters["loads_on_step"] += loads
                self._counters["drops_on_step"] += len(ops) - places - loads
            if result.read_ahead_ready:  # their loads may ride on the next steps
                self.adapters.prefetch.mark_ready(result.read_ahead_ready)
            events = self.scheduler.apply(step, result.tokens, result.logits)
            # Async steps: a token sampled for a sequence that ended the step before is
            # dropped (never emitted) and not counted as generated.
            emitted = sum(1 for e in events if e.new_token is not None)
            self._counters["tokens_discarded"] += len(result.tokens) - emitted
            self._account(step, emitted)
            self._publish(events)
            self._cv.notify_all()  # an update waiting between its groups may go on
            # Where a step's time goes (µs totals; a benchmark divides deltas by steps):
            # planning under the lock, the wait for the ranks' result (the whole round trip;
            # with async steps only what planning the next step did not hide), the output
            # rank's own step time, and the whole step from ``since`` (its planning; async:
            # the previous result) to now.
            self._counters["step_plan_us"] += int((planned.t1 - planned.t0) * 1e6)
            self._counters["step_execute_us"] += int(execute_s * 1e6)
            self._counters["step_rank_us"] += int(result.forward_ms * 1e3)
            self._counters["step_rank_launch_us"] += int(result.launch_ms * 1e3)
            self._counters["step_rank_ops_us"] += int(result.ops_ms * 1e3)
            self._counters["step_rank_reads_us"] += int(result.reads_ms * 1e3)
            self._counters["step_total_us"] += int((time.perf_counter() - since) * 1e6)
            if any(len(s.token_ids) > 1 for s in step.plan.seqs):
                self._counters["steps_with_prefill"] += 1

    def _account(self, step: ScheduledStep, sampled: int) -> None:
        now = time.monotonic()
        self._counters["steps"] += 1
        self._counters["generated_tokens"] += sampled
        self._counters["computed_tokens"] += step.plan.num_tokens
        self._window.append((now, sampled))
        while self._window and now - self._window[0][0] > RATE_WINDOW_S:
            self._window.popleft()
