"""Prefill batching: when waiting prompts may join a step (host-side, no torch).

``PrefillBatching`` (off by default): while a step would be a pure decode of enough
sequences, new prompts may wait a bounded number of steps / milliseconds so that several of
them share one prefill forward (on GPU a decode step replays a CUDA graph; an eager prefill
forward costs about the same whether it holds one prompt or ten).
"""

from __future__ import annotations

import itertools
import time
from collections import deque

from lora_cluster.config import PrefillBatching
from lora_cluster.engine.sequence import Sequence


class PrefillHold:
    """The scheduler's admission gate under a ``PrefillBatching`` policy; counts holds.

    The policy is passed on each call (read from the scheduler's current config).
    """

    def __init__(self) -> None:
        # When the current hold began (None: not holding), steps held since.
        self._since: float | None = None
        self._held = 0
        self.num_held_steps = 0  # steps that left admissible prompts waiting

    def reset(self) -> None:
        """A prompt was admitted: the hold, if any, is over."""
        self._since, self._held = None, 0

    def admits(self, policy: PrefillBatching, entries: list[tuple[Sequence, int]],
               budget: int, waiting: deque[Sequence], seats: int) -> bool:
        """Whether ``waiting`` prompts may join a step of ``entries`` with ``budget`` tokens
        and ``seats`` sequences left; a refusal counts as one held step."""
        if not waiting or seats <= 0:
            self._since = None  # a hold starts when a prompt could come in, not before
        if policy.hold_steps == 0 or not waiting or seats <= 0 or budget <= 0:
            return True  # nothing held back: either no policy or nothing could come in
        decodes = sum(1 for _, n in entries if n == 1)
        if decodes < len(entries) or decodes < policy.min_prompts:
            return True  # a prefill runs anyway, or too few decodes to be worth protecting
        ready = min(seats, len(waiting))
        if ready >= policy.min_prompts:
            return True
        if sum(s.num_uncomputed for s in itertools.islice(waiting, ready)) >= budget:
            return True  # they fill the step's token budget: waiting longer adds nothing
        now = time.monotonic()
        if self._since is None:
            self._since, self._held = now, 0
        if self._held >= policy.hold_steps or (
                policy.hold_ms is not None and (now - self._since) * 1e3 >= policy.hold_ms):
            return True
        self._held += 1
        self.num_held_steps += 1
        return False
