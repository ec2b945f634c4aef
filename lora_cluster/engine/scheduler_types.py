"""What the scheduler works with and hands back (host-side, no torch).

Its limits (``SchedulerConfig``), the device-slot tier it asks for slots (``SlotProvider``),
a planned step with the host view needed to apply its result (``ScheduledStep``), and the
events callers wait on (``SeqEvent``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from lora_cluster.config import PrefillBatching
from lora_cluster.engine.messages import AdapterKey, StepPlan
from lora_cluster.engine.sequence import Sequence


class SlotProvider(Protocol):
    """The device-slot tier as the scheduler sees it.

    A sequence is *bound* to one adapter version from its first admission until it finishes
    (a preempted sequence resumes on the same version, never a mix); while running it also
    *pins* that version's slot.
    """

    def acquire(self, name: str, bound: AdapterKey | None) -> tuple[AdapterKey, int] | None:
        """(version, slot) for a sequence of adapter ``name``, pinned for it; None while no
        slot can be freed. ``bound`` is None on first admission (bind the current version).

        May make the version resident first, and raises the typed error if that fails.
        """
        ...

    def release(self, key: AdapterKey) -> None:
        """Drop one running sequence's pin on ``key``."""
        ...

    def unbind(self, key: AdapterKey) -> None:
        """A sequence bound to ``key`` finished."""
        ...


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits the scheduler works within."""

    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    context_limit: int  # max prompt + output tokens of one sequence; fits the cache alone
    eos_token_ids: tuple[int, ...] = ()
    watermark_blocks: int = 0  # kept free at admission while others run (avoids instant preemption)
    prefill_batching: PrefillBatching = field(default_factory=PrefillBatching)  # default: admit at once
    async_steps: bool = False  # plans ask the ranks to share sampled tokens (PREV_TOKEN feeds)

    def __post_init__(self) -> None:
        if self.context_limit > self.num_blocks * self.block_size:
            raise ValueError("context_limit must fit the KV cache alone")


@dataclass(frozen=True)
class ScheduledStep:
    """A plan plus the host-side view needed to apply its result."""

    plan: StepPlan
    entries: tuple[tuple[Sequence, int], ...]  # (sequence, tokens fed this step)


@dataclass(frozen=True)
class SeqEvent:
    """Something a caller waits on: a new token, and/or the end of the sequence."""

    seq: Sequence
    new_token: int | None
    finished: bool
