"""One request's host-side state as the scheduler tracks it (no torch)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from lora_cluster.config import SamplingParams
from lora_cluster.engine.messages import PREV_TOKEN, AdapterKey, SampleSpec
from lora_cluster.errors import LoRAClusterError


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A generation or scoring request.

    ``num_computed`` counts tokens whose K/V are in the cache; the tokens still to feed are
    ``all_token_ids[num_computed:]``, so a prefill, a prefill chunk, a decode and a recompute
    after preemption are the same operation. A scoring request is one prefill that keeps the
    logits of every position and samples nothing.

    ``pending`` counts tokens sampled by steps sent to the ranks whose results are not back
    yet (asynchronous steps): they count in ``num_tokens`` (their positions can be fed, as
    ``PREV_TOKEN``) but are not in ``output_ids``. At most one per sequence is ever fed.
    """

    seq_id: int
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    adapter_name: str | None = None
    adapter: AdapterKey | None = None  # the version bound at first admission
    seed: int = 0
    score: bool = False
    stop_ids: frozenset[int] = frozenset()
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    pending: int = 0
    blocks_sent: int = 0  # block-table entries the ranks already hold for this sequence
    slot: int = -1
    holds_pin: bool = False
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    error: LoRAClusterError | None = None
    logits: Any = None  # scoring payload from the output rank, opaque here
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def num_known(self) -> int:
        """Prompt and output tokens the controller holds (``num_tokens`` less ``pending``)."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def token_slice(self, start: int, stop: int) -> tuple[int, ...]:
        """Tokens [start, stop) of prompt + outputs (``PREV_TOKEN`` for a pending one)."""
        prompt_len = len(self.prompt_ids)
        if stop <= prompt_len:
            return self.prompt_ids[start:stop]
        head = self.prompt_ids[start:] if start < prompt_len else ()
        tail = self.output_ids[max(0, start - prompt_len):stop - prompt_len]
        unknown = stop - max(start, self.num_known)
        return tuple(head) + tuple(tail) + (PREV_TOKEN,) * max(0, unknown)

    def sample_spec(self) -> SampleSpec:
        """Sampling of the next output token (its index keys the random stream)."""
        sp = self.sampling
        return SampleSpec(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                          seed=self.seed, index=len(self.output_ids) + self.pending)

    @property
    def surely_done(self) -> bool:
        """Its pending tokens will end it whatever they are (max_tokens reached)."""
        return len(self.output_ids) + self.pending >= self.sampling.max_tokens

    def metrics(self) -> dict[str, float]:
        """Latency figures in seconds for the GenerationResult."""
        out: dict[str, float] = {"num_preemptions": float(self.num_preemptions)}
        if self.first_scheduled_time is not None:
            out["queue_s"] = self.first_scheduled_time - self.arrival_time
        if self.first_token_time is not None:
            out["ttft_s"] = self.first_token_time - self.arrival_time
        if self.finish_time is not None:
            out["latency_s"] = self.finish_time - self.arrival_time
            if self.first_token_time is not None and len(self.output_ids) > 1:
                out["tpot_s"] = ((self.finish_time - self.first_token_time)
                                 / (len(self.output_ids) - 1))
        return out
