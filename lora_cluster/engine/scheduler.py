"""Continuous batching over KV blocks and LoRA slots (host-side, no torch).

Each step: running sequences first (decodes, then unfinished prefill chunks), preempting the
newest running sequence by recompute when blocks run out; then waiting sequences are admitted
first-come-first-served while the token budget, ``max_num_seqs`` and the free blocks allow and
their adapter holds (or can be given) a device slot. Adapters, base-only requests, prefill
chunks and decodes all mix in one step.

Fairness and liveness rules:
- Memory is strictly FCFS: when the oldest waiting request does not fit, nothing behind it
  is admitted (a large prompt is never starved by small ones).
- A request whose adapter cannot get a slot (every slot pinned by running requests) waits;
  behind it only base-only requests are admitted, so the running adapters drain and a slot
  frees. Never an error, never a deadlock.
- A single sequence always fits the cache alone (``context_limit`` <= cache capacity), so
  preemption always ends with progress.

Prefill batching (``PrefillBatching``, off by default; ``prefill_hold``) may hold new prompts
back for a bounded time while a step would be a pure decode, so several share one prefill.

Asynchronous steps (``SchedulerConfig.async_steps``): ``schedule`` may run before the previous
step's ``apply``. A sequence that samples in a step has a *pending* token until its result is
applied; the next plan feeds it as ``PREV_TOKEN`` (the ranks know it), unless the pending
token surely ends the sequence (max_tokens, context limit). A token that arrives for a
sequence that finished meanwhile (an EOS in the step before) is discarded; one that arrives
for a sequence preempted meanwhile is kept (its step ran on intact blocks), and the sequence
is not re-admitted while a token is pending.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from lora_cluster.engine.block_manager import BlockManager, blocks_for
from lora_cluster.engine.messages import AdapterKey, SeqStep, StepPlan
from lora_cluster.engine.prefill_hold import PrefillHold
from lora_cluster.engine.scheduler_types import (
    ScheduledStep,
    SchedulerConfig,
    SeqEvent,
    SlotProvider,
)
from lora_cluster.engine.sequence import SeqStatus, Sequence
from lora_cluster.errors import LoRAClusterError, RequestError


class Scheduler:
    """Decides each step's batch; owns the block manager and the sequences' lifecycle."""

    def __init__(self, cfg: SchedulerConfig, slots: SlotProvider) -> None:
        self.cfg = cfg
        self.slots = slots
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._released: list[int] = []
        self._finished_events: list[SeqEvent] = []
        self.num_preemptions = 0
        self.hold = PrefillHold()
        self.num_admissions = 0  # steps that admitted at least one prompt
        self.num_admitted = 0  # prompts admitted (recomputes after preemption included)

    # ---------------------------------------------------------------- admission control
    def check(self, prompt_len: int, *, score: bool) -> None:
        """Raise RequestError for a prompt that can never run."""
        limit = self.cfg.context_limit
        if prompt_len < 1:
            raise RequestError("prompt: must hold at least one token", field="prompt")
        # A generation needs room for one output token after the prompt.
        room = limit if score else limit - 1
        if prompt_len > room:
            raise RequestError(
                f"prompt: {prompt_len} tokens exceed the context limit of {limit} tokens "
                f"({'scoring' if score else 'generation needs one more for the output'}; the "
                f"limit is min(max_model_len, KV cache capacity of "
                f"{self.cfg.num_blocks * self.cfg.block_size} tokens))",
                field="prompt", prompt_len=prompt_len, context_limit=limit,
            )

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (``check`` it first)."""
        self.check(len(seq.prompt_ids), score=seq.score)
        if not seq.sampling.ignore_eos:
            seq.stop_ids = frozenset(self.cfg.eos_token_ids) | frozenset(seq.sampling.stop_token_ids)
        else:
            seq.stop_ids = frozenset(seq.sampling.stop_token_ids)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_held_steps(self) -> int:
        """Steps that left admissible prompts waiting (prefill batching)."""
        return self.hold.num_held_steps

    # ---------------------------------------------------------------- one step
    def schedule(self) -> ScheduledStep | None:
        """The next step's plan, or None when nothing can run now."""
        budget = self.cfg.max_num_batched_tokens
        entries: list[tuple[Sequence, int]] = []
        preempted = False
        # Decodes before prefill continuations: a long prompt must not stall running streams.
        order = sorted(self.running, key=lambda s: s.num_uncomputed > 1)
        for seq in order:
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted as a victim earlier in this loop
            if seq.pending and (seq.pending > 1 or seq.surely_done
                                or seq.num_tokens >= self.cfg.context_limit):
                continue  # fed its token in flight already, or that token ends it
            n = min(seq.num_uncomputed, budget)
            if n == 0:
                continue
            fits, evicted = self._make_room(seq, seq.num_computed + n, entries)
            preempted = preempted or evicted
            if not fits:
                continue
            self.blocks.grow(seq.seq_id, seq.num_computed + n)
            entries.append((seq, n))
            budget -= n
        seats = self.cfg.max_num_seqs - len(self.running)
        if not preempted and self.hold.admits(self.cfg.prefill_batching, entries, budget,
                                              self.waiting, seats):
            before = len(entries)
            budget = self._admit(entries, budget)
            if len(entries) > before:
                self.hold.reset()
                self.num_admissions += 1
                self.num_admitted += len(entries) - before
        if not entries:
            # Releases ride on the next real step; the ranks' leftover state is tiny meanwhile.
            return None
        released, self._released = tuple(self._released), []
        now = time.monotonic()
        steps = []
        placeholders = []
        for i, (seq, n) in enumerate(entries):
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            if seq.pending:
                assert seq.pending == 1 and n == 1, "only the one pending token is fed unknown"
                placeholders.append(i)
            step = self._seq_step(seq, n)
            steps.append(step)
            seq.num_computed += n
            if step.sample is not None:
                seq.pending += 1
        plan = StepPlan(seqs=tuple(steps), released=released, placeholders=tuple(placeholders),
                        share_tokens=self.cfg.async_steps)
        return ScheduledStep(plan, tuple(entries))

    def _make_room(self, seq: Sequence, total: int,
                   scheduled: list[tuple[Sequence, int]]) -> tuple[bool, bool]:
        """Free blocks for ``seq`` by preempting the newest running sequences not already in
        this step (their blocks are spoken for); ``seq`` itself goes when nothing else can.

        Returns (seq still runs, something was preempted).
        """
        if self.blocks.can_grow(seq.seq_id, total):
            return True, False  # the common case: no set of this step's sequences to build
        evicted = False
        taken = {id(s) for s, _ in scheduled}
        while not self.blocks.can_grow(seq.seq_id, total):
            victim = next((s for s in reversed(self.running)
                           if s is not seq and id(s) not in taken), seq)
            self._preempt(victim)
            evicted = True
            if victim is seq:
                return False, True
        return True, evicted

    def _admit(self, entries: list[tuple[Sequence, int]], budget: int) -> int:
        slot_blocked = False
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting.popleft()
            if seq.pending:
                # Preempted while a step holding its token was in flight: it resumes once the
                # token is back (next step); FCFS keeps the queue behind it.
                self.waiting.appendleft(seq)
                break
            n = min(seq.num_uncomputed, budget)
            need = self.blocks.extra_blocks(seq.seq_id, n)
            reserve = self.cfg.watermark_blocks if self.running else 0
            if need + reserve > self.blocks.num_free:
                self.waiting.appendleft(seq)
                break  # FCFS on memory
            if seq.adapter_name is not None:
                if slot_blocked:
                    skipped.append(seq)
                    continue
                got = self._acquire(seq)
                if seq.is_finished:
                    continue  # its adapter failed to load; the error is on the sequence
                if got is None:
                    slot_blocked = True
                    skipped.append(seq)
                    continue
                seq.adapter, seq.slot = got
                seq.holds_pin = True
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self.blocks.grow(seq.seq_id, n)
            entries.append((seq, n))
            budget -= n
        # Skipped requests keep their place at the head of the queue.
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _acquire(self, seq: Sequence) -> tuple[AdapterKey, int] | None:
        assert seq.adapter_name is not None
        try:
            return self.slots.acquire(seq.adapter_name, seq.adapter)
        except LoRAClusterError as err:
            # The adapter could not be made resident (e.g. its source vanished): this request
            # fails with the cause; others carry on.
            self._finish(seq, "abort", error=err)
            return None

    def _seq_step(self, seq: Sequence, n: int) -> SeqStep:
        table = self.blocks.table(seq.seq_id)
        blocks_from, seq.blocks_sent = seq.blocks_sent, len(table)
        completes = seq.num_computed + n == seq.num_tokens
        if seq.score:
            return SeqStep(seq_id=seq.seq_id, token_ids=seq.token_slice(seq.num_computed, seq.num_computed + n),
                           start_pos=seq.num_computed, blocks_from=blocks_from,
                           new_blocks=tuple(table[blocks_from:]), slot=seq.slot,
                           logits="emit" if completes else "keep")
        return SeqStep(seq_id=seq.seq_id, token_ids=seq.token_slice(seq.num_computed, seq.num_computed + n),
                       start_pos=seq.num_computed, blocks_from=blocks_from,
                       new_blocks=tuple(table[blocks_from:]), slot=seq.slot,
                       sample=seq.sample_spec() if completes else None)

    # ---------------------------------------------------------------- results
    def apply(self, step: ScheduledStep, tokens: Iterable[tuple[int, int]],
              logits: Iterable[tuple[int, Any]] = ()) -> list[SeqEvent]:
        """Fold the output rank's result into the sequences; returns the events to publish.

        A sequence preempted since the step was planned still takes its token or logits (the
        step ran on its blocks before they were freed); a finished one takes nothing.
        """
        by_id_token = dict(tokens)
        by_id_logits = dict(logits)
        events, self._finished_events = self._finished_events, []
        now = time.monotonic()
        for seq, _ in step.entries:
            if seq.status is SeqStatus.FINISHED:
                continue  # aborted while the step ran, or ended by the step before (async)
            if seq.score:
                if seq.seq_id in by_id_logits:
                    seq.logits = by_id_logits[seq.seq_id]
                    events.append(self._finish(seq, "stop"))
                continue
            token = by_id_token.get(seq.seq_id)
            if token is None:
                continue  # an intermediate prefill chunk
            seq.pending -= 1
            seq.output_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._stop_reason(seq, token)
            if reason is None:
                events.append(SeqEvent(seq, token, False))
            else:
                self._finish(seq, reason)
                events.append(SeqEvent(seq, token, True))
        return events

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.stop_ids:
            return "stop"
        if (len(seq.output_ids) >= seq.sampling.max_tokens
                or seq.num_known >= self.cfg.context_limit):
            return "length"
        return None

    def take_events(self) -> list[SeqEvent]:
        """Finishes that happened outside ``apply`` (failed adapter loads, aborts)."""
        events, self._finished_events = self._finished_events, []
        return events

    # ---------------------------------------------------------------- lifecycle
    def abort(self, seq: Sequence, error: LoRAClusterError | None = None) -> None:
        """End a sequence now (its caller went away, or it cannot run)."""
        if not seq.is_finished:
            self._finish(seq, "abort", error=error)

    def preempt_all(self) -> None:
        """Send every running sequence back to the queue for recompute (after a rank-group
        rebuild: the ranks lost their KV caches)."""
        for seq in reversed(list(self.running)):
            self._preempt(seq)
        for seq in self.waiting:
            seq.pending = 0  # the steps that were to sample them are lost with the ranks
        self._released.clear()  # fresh ranks hold no state to release

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._drop_resources(seq)
        seq.num_computed = 0
        seq.logits = None
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: str,
                error: LoRAClusterError | None = None) -> SeqEvent:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._drop_resources(seq)
        if seq.adapter is not None:
            self.slots.unbind(seq.adapter)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
        seq.finish_time = time.monotonic()
        event = SeqEvent(seq, None, True)
        if reason == "abort":
            self._finished_events.append(event)
        return event

    def _drop_resources(self, seq: Sequence) -> None:
        if self.blocks.free(seq.seq_id) or seq.blocks_sent:
            self._released.append(seq.seq_id)
        seq.blocks_sent = 0
        if seq.holds_pin and seq.adapter is not None:
            self.slots.release(seq.adapter)
        seq.holds_pin = False
        seq.slot = -1

    def stats(self) -> dict[str, int]:
        return {
            "num_waiting": len(self.waiting),
            "num_running": len(self.running),
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_free": self.blocks.num_free,
            "num_preemptions": self.num_preemptions,
            "prefill_held_steps": self.num_held_steps,
            "prefill_admissions": self.num_admissions,
            "prefill_admitted": self.num_admitted,
        }


__all__ = ["ScheduledStep", "Scheduler", "SchedulerConfig", "SeqEvent", "SlotProvider", "blocks_for"]
