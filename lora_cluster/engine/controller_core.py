"""``ControllerCore``: one replica's brain without Ray — adapters, scheduling, the step loop.

Threading model. Callers (the Ray controller actor's threads, tests) may call every public
method concurrently. One background thread runs steps while work exists. Two locks:
``_exec`` serializes everything sent to the ranks — steps and adapter commands — so an
adapter never changes in the middle of a step; ``_lock`` guards registry, residency,
scheduler and handles. Order is always ``_exec`` → ``_lock``; threads that only read or
queue (submit, cancel, list_adapters, stats) take ``_lock`` alone and never wait for a
forward step (they can wait for a transparent adapter reload, which the scheduler performs
between steps under ``_lock``).
Results are delivered through ``RequestHandle`` objects; nothing waits while holding a lock.
Prefetch (``engine/prefetch.py``): after each ``schedule()`` the step loop admits the next
waiting requests' adapters to the host tier ahead of use (bookkeeping only) and the step
carries read-ahead hints; the ranks read them on reader threads between commands, so disk
reads happen beside steps, never under ``_exec``.

Rank failure: a step that raises ClusterError makes the core restart the rank group, reload
the adapters that were resident, and re-run in-flight requests from their tokens so far
(recompute). A second failure in a row fails the requests of that step with the error.

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
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from lora_cluster.api_types import GenerationResult
from lora_cluster.config import ClusterConfig, SamplingParams
from lora_cluster.engine.adapter_control import AdapterControl, tier_id
from lora_cluster.engine.adapter_update import LayerwiseUpdater
from lora_cluster.engine.async_steps import AsyncStepper, Planned
from lora_cluster.engine.block_manager import BlockManager
from lora_cluster.engine.controller_adapters import AdapterAdmin
from lora_cluster.engine.messages import (
    AdapterCommand,
    LoadAdapter,
    PlaceAdapter,
    RankReply,
    Step,
    StepResult,
)
from lora_cluster.engine.prefetch import Prefetcher
from lora_cluster.engine.prompts import Prompt, eos_ids, per_prompt, prompt_ids
from lora_cluster.engine.rank_group import RankGroup, async_by_default, supports_async
from lora_cluster.engine.rank_runtime import context_limit_for
from lora_cluster.engine.read_ahead import read_ahead_depth
from lora_cluster.engine.request_handle import RequestHandle, wait_all
from lora_cluster.engine.scheduler import ScheduledStep, Scheduler, SchedulerConfig, SeqEvent
from lora_cluster.engine.sequence import Sequence as Seq
from lora_cluster.engine.step_ops import failed_op, op_cause
from lora_cluster.engine.tokenizer import Tokenizer
from lora_cluster.errors import (
    ClusterError,
    ConfigError,
    LoRAClusterError,
    RequestError,
)
from lora_cluster.model.spec import ModelSpec

logger = logging.getLogger("lora_cluster.engine")
_IDLE_WAIT_S = 0.05  # re-check interval when work exists but nothing can run yet
_RATE_WINDOW_S = 10.0  # tokens/s in stats() is measured over this trailing window
_YIELD_WAIT_S = 0.25  # between update groups: how long to wait for the step loop's next step


class ControllerCore(AdapterAdmin, AsyncStepper):
    """Registry, tiers, scheduler and step loop of one replica, driving a ``RankGroup``."""

    def __init__(self, config: ClusterConfig, spec: ModelSpec, rank_group: RankGroup,
                 tokenizer: Tokenizer | None = None, *, prefetch_depth: int | None = None) -> None:
        self.config = config
        self.spec = spec
        self.group = rank_group
        self.tokenizer = tokenizer
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._exec = threading.Lock()
        self._cmd_seq = itertools.count()
        self._ids = itertools.count()
        self._seeds = random.Random(config.seed)
        self.adapters = AdapterControl(config, spec, self._send_all)
        self._exec_wanted = 0  # adapter commands waiting for ``_exec``: the step loop lets them in
        self.updates = LayerwiseUpdater(self.adapters, exec_lock=self._fair_exec,
                                        state_lock=lambda: self._lock,
                                        yield_to_steps=self._yield_to_steps)
        if config.async_steps is True and not supports_async(rank_group):
            raise ConfigError(f"async_steps: True needs a rank group that can keep a step in "
                              f"flight (submit/collect); {type(rank_group).__name__} cannot",
                              field="async_steps")
        self.async_steps = (async_by_default(rank_group) if config.async_steps == "auto"
                            else bool(config.async_steps))
        self.group_info = rank_group.describe()
        self.context_limit = min(context_limit_for(config, spec),
                                 self.group_info.num_kv_blocks * self.group_info.block_size)
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=self.group_info.num_kv_blocks, block_size=self.group_info.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            context_limit=self.context_limit, eos_token_ids=eos_ids(spec, tokenizer),
            watermark_blocks=self.group_info.num_kv_blocks // 100,
            prefill_batching=config.prefill_batching(), async_steps=self.async_steps),
            self.adapters)
        # None: as deep as the ranks' read-ahead buffers (0 turns prefetch off).
        self.prefetcher = Prefetcher(self.adapters, read_ahead_depth(
            config.max_loras, config.max_cpu_loras) if prefetch_depth is None else prefetch_depth)
        self._handles: dict[int, tuple[Seq, RequestHandle]] = {}
        self._counters: collections.Counter[str] = collections.Counter()
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._started = time.monotonic()
        self._failures_in_a_row = 0
        self._closed = False
        self._broken: LoRAClusterError | None = None
        self._thread = threading.Thread(target=self._loop, name="lora-cluster-steps", daemon=True)
        self._thread.start()

    # ================================================================ requests
    def submit(self, prompt: Prompt, adapter: str | None = None,
               sampling: SamplingParams | None = None, *, score: bool = False) -> RequestHandle:
        """Queue one request; the handle yields its tokens and final result."""
        ids = prompt_ids(prompt, self.tokenizer, self.spec.vocab_size)
        sampling = sampling or SamplingParams()
        if score:
            sampling = SamplingParams(max_tokens=1)
        with self._cv:
            self._check_open()
            if adapter is not None:
                self.adapters.record(adapter).requests += 1
            self._counters["requests_base" if adapter is None else "requests_adapter"] += 1
            seed = sampling.seed if sampling.seed is not None else self._seeds.getrandbits(63)
            seq = Seq(seq_id=next(self._ids), prompt_ids=tuple(ids), sampling=sampling,
                      adapter_name=adapter, seed=seed, score=score)
            self.scheduler.add(seq)
            handle = RequestHandle(seq.seq_id, self.cancel)
            self._handles[seq.seq_id] = (seq, handle)
            self._cv.notify_all()
        return handle

    def cancel(self, request_id: int) -> None:
        """Abort a request (no-op once finished)."""
        with self._lock:
            entry = self._handles.get(request_id)
            if entry is not None:
                self.scheduler.abort(entry[0])
                self._publish(self.scheduler.take_events())

    def generate(self, prompts: Sequence[Prompt],
                 adapters: str | Sequence[str | None] | None = None,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 timeout: float | None = None) -> list[GenerationResult]:
        """Run every prompt (text or token ids) with its adapter; results in prompt order."""
        names = per_prompt(adapters, len(prompts), "adapters")
        params = per_prompt(sampling, len(prompts), "sampling")
        handles = self._submit_all(lambda i: self.submit(prompts[i], names[i], params[i]),
                                   len(prompts))
        return wait_all(handles, lambda h: h.result(timeout))

    def score(self, prompts: Sequence[Prompt],
              adapters: str | Sequence[str | None] | None = None,
              timeout: float | None = None) -> list[Any]:
        """Float32 [len, V] logits of every prompt position (opaque payloads from the output rank)."""
        names = per_prompt(adapters, len(prompts), "adapters")
        handles = self._submit_all(lambda i: self.submit(prompts[i], names[i], score=True),
                                   len(prompts))
        return wait_all(handles, lambda h: h.logits(timeout))

    def _submit_all(self, submit_one: Callable[[int], RequestHandle], n: int) -> list[RequestHandle]:
        handles: list[RequestHandle] = []
        try:
            for i in range(n):
                handles.append(submit_one(i))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return handles

    # ================================================================ step loop
    def _send_all(self, build: Callable[[int], AdapterCommand]) -> tuple[RankReply, ...]:
        """Send an adapter command to every rank (caller holds ``_exec``)."""
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
            self._counters["step_total_us"] += int((time.perf_counter() - since) * 1e6)
            if any(len(s.token_ids) > 1 for s in step.plan.seqs):
                self._counters["steps_with_prefill"] += 1

    def _recover(self, planned: Planned, err: ClusterError,
                 abandoned: Sequence[Planned] = ()) -> None:
        """Rebuild the rank group after a failed step (caller holds ``_exec``); ``abandoned``:
        steps sent after it, lost with the ranks."""
        with self._lock:
            self._failures_in_a_row += 1
            self._counters["rank_group_restarts"] += 1
            self._counters["steps_abandoned"] += len(abandoned)
            self.scheduler.preempt_all()
            failed = failed_op(err, planned.command.adapter_ops)
            if isinstance(failed, PlaceAdapter | LoadAdapter):
                self._fail_placement(planned.step, failed, op_cause(err))
            if self._failures_in_a_row > 1:
                for lost in (planned, *abandoned):
                    for seq, _ in lost.step.entries:
                        self.scheduler.abort(seq, error=err)
                self._publish(self.scheduler.take_events())
        try:
            info = self.group.restart()
            with self._lock:
                self._resize_blocks(info.num_kv_blocks)
                self.adapters.restore_locked()
        except LoRAClusterError as fatal:
            with self._lock:
                self._broken = ClusterError(f"rank group could not be rebuilt: {fatal}")
                self._fail_all(self._broken)

    def _fail_placement(self, step: ScheduledStep, op: PlaceAdapter | LoadAdapter,
                        cause: LoRAClusterError) -> None:
        """A ridden placement (or load) failed on a rank: the step's requests that needed it
        fail with the rank's typed cause; the rebuilt group does not re-place it (the next
        request for it places it again). Caller holds ``_lock``, after ``preempt_all``."""
        self._counters["step_op_failures"] += 1
        if isinstance(op, LoadAdapter):
            self.adapters.ridden_load_failed(op.key, cause)
        logger.warning("step failed on its placement of %s@v%d: %s", op.name, op.version, cause)
        for seq, _ in step.entries:
            if seq.adapter == op.key:
                self.scheduler.abort(seq, error=cause)
        self._publish(self.scheduler.take_events())
        with contextlib.suppress(RequestError):  # still held (a pin): restore re-places it
            self.adapters.tiers.evict_device(tier_id(op.key))

    def _resize_blocks(self, num_blocks: int) -> None:
        if num_blocks < self.scheduler.cfg.num_blocks:
            raise ClusterError(f"rebuilt rank group has {num_blocks} KV blocks, fewer than the "
                               f"{self.scheduler.cfg.num_blocks} planned for")
        self.scheduler.blocks = BlockManager(self.scheduler.cfg.num_blocks,
                                             self.scheduler.cfg.block_size)

    def _account(self, step: ScheduledStep, sampled: int) -> None:
        now = time.monotonic()
        self._counters["steps"] += 1
        self._counters["generated_tokens"] += sampled
        self._counters["computed_tokens"] += step.plan.num_tokens
        self._window.append((now, sampled))
        while self._window and now - self._window[0][0] > _RATE_WINDOW_S:
            self._window.popleft()

    def _publish(self, events: list[SeqEvent]) -> None:
        """Hand new tokens and finished requests to their handles (caller holds ``_lock``)."""
        for event in events:
            entry = self._handles.get(event.seq.seq_id)
            if entry is None:
                continue
            seq, handle = entry
            if event.new_token is not None:
                handle._push(event.new_token)
            if event.finished:
                del self._handles[seq.seq_id]
                if seq.error is not None:
                    handle._finish(None, error=seq.error)
                else:
                    handle._finish(self._result(seq), logits=seq.logits)
                    self._counters["finished"] += 1

    def _result(self, seq: Seq) -> GenerationResult:
        text = self.tokenizer.decode(seq.output_ids) if self.tokenizer is not None else None
        return GenerationResult(
            prompt_token_ids=seq.prompt_ids, token_ids=tuple(seq.output_ids), text=text,
            finish_reason=seq.finish_reason or "abort",  # type: ignore[arg-type]
            adapter=seq.adapter_name,
            adapter_version=None if seq.adapter is None else seq.adapter[1],
            metrics=seq.metrics())

    def _fail_all(self, err: LoRAClusterError) -> None:
        for seq, _ in list(self._handles.values()):
            self.scheduler.abort(seq, error=err)
        self._publish(self.scheduler.take_events())

    def _check_open(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise ClusterError("the cluster is shut down")

    # ================================================================ reporting, lifecycle
    def check_health(self) -> None:
        """Raise the error that stops this replica from serving (broken rank group, shut down)."""
        self._check_open()
        if not self._thread.is_alive():
            raise ClusterError("the step loop is not running")

    def stats(self) -> dict[str, Any]:
        """Slots, cache, load times, tokens/s, queue depth, per-adapter request counts."""
        with self._lock:
            now = time.monotonic()
            while self._window and now - self._window[0][0] > _RATE_WINDOW_S:
                self._window.popleft()
            # Tokens sampled over the last window (idle time included), per second.
            span = now - self._window[0][0] if self._window else 0.0
            recent = sum(n for _, n in self._window)
            out: dict[str, Any] = dict(self.adapters.stats())
            out["updates"] = self.updates.stats()
            out["prefetch"] = self.prefetcher.stats()
            out.update(self.scheduler.stats())
            out.update({
                "queue_depth": len(self.scheduler.waiting),
                "tokens_per_s": recent / max(span, 1e-3) if recent else 0.0,
                "uptime_s": now - self._started,
                "context_limit": self.context_limit,
                "world_size": self.group_info.world_size,
                "device": self.group_info.device,
                "async_steps": self.async_steps,
                **{k: int(v) for k, v in self._counters.items()},
            })
            return out

    def shutdown(self) -> None:
        """Fail what is pending, stop the step loop and shut the ranks down (idempotent)."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._fail_all(ClusterError("the cluster is shutting down"))
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        with self._exec:
            self.group.close()
