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

This module holds the state, the request API, delivery to handles and reporting; the rest
comes from mixins that share that state: the step loop with prefetch and its time breakdown
(``engine/controller_steps.py``, asynchronous steps in ``engine/async_steps.py``), recovery
from a rank failure (``engine/controller_recovery.py``) and the adapter commands
(``engine/controller_adapters.py``).
"""

from __future__ import annotations

import collections
import itertools
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from lora_cluster.api_types import GenerationResult
from lora_cluster.config import ClusterConfig, SamplingParams
from lora_cluster.engine.adapter_control import AdapterControl
from lora_cluster.engine.adapter_update import LayerwiseUpdater
from lora_cluster.engine.controller_adapters import AdapterAdmin
from lora_cluster.engine.controller_recovery import RankRecovery
from lora_cluster.engine.controller_steps import RATE_WINDOW_S, StepLoop
from lora_cluster.engine.prefetch import Prefetcher
from lora_cluster.engine.prompts import Prompt, eos_ids, per_prompt, prompt_ids
from lora_cluster.engine.rank_group import RankGroup, async_by_default, supports_async
from lora_cluster.engine.rank_runtime import context_limit_for
from lora_cluster.engine.read_ahead import read_ahead_depth
from lora_cluster.engine.request_handle import RequestHandle, wait_all
from lora_cluster.engine.scheduler import Scheduler, SchedulerConfig, SeqEvent
from lora_cluster.engine.sequence import Sequence as Seq
from lora_cluster.engine.tokenizer import Tokenizer
from lora_cluster.errors import ClusterError, ConfigError, LoRAClusterError
from lora_cluster.model.spec import ModelSpec


class ControllerCore(AdapterAdmin, RankRecovery, StepLoop):
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

    # ================================================================ delivery
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
            while self._window and now - self._window[0][0] > RATE_WINDOW_S:
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
