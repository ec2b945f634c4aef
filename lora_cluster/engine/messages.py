"""The command stream every rank executes in the same order, and what ranks send back.

The controller numbers each command (``seq``, strictly increasing); a rank refuses a command
that does not follow the last one it ran, so a step can never run against a different adapter
state than the controller planned. Per-step messages are small: a decode sends only its new
token, its position and the KV blocks appended since the last step — never histories.
A step also carries read-ahead hints (``ReadAheadHint``): adapter versions the rank starts
reading into a side buffer on a reader thread; they change no state the controller mirrors
(only a later, ordered ``LoadAdapter`` takes from that buffer), so they cost the step nothing.
A step also carries the slot placements and host drops decided while planning it
(``Step.adapter_ops``, see ``engine/step_ops.py``): the ranks apply them in order before the
forward, so admitting a request whose adapter is off the device costs no extra round trip.
Asynchronous steps (``ClusterConfig.async_steps``): the controller may send step k+1 before
step k's result is back. A sequence that samples in step k and continues in k+1 is fed
``PREV_TOKEN`` in k+1 (its index listed in ``StepPlan.placeholders``); every rank substitutes
the token it learnt for that sequence in step k (``StepPlan.share_tokens``: the output rank's
sampled tokens reach every rank).
No torch here: messages cross process boundaries as plain picklable dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# An adapter as the ranks know it: (name, version). Versions are unique per name for the
# lifetime of a controller, so an old version can stay resident beside a newer one.
AdapterKey = tuple[str, int]

# What a sequence wants from the logits of this step's rows:
#   "none": nothing (or only the sampled token) · "keep": hold every row's logits on the
#   output rank (a scoring prefill continues next step) · "emit": hold them and send the
#   whole prompt's logits back now.
LogitsMode = Literal["none", "keep", "emit"]

# A decode token not known to the controller yet: "the token this rank learnt for this
# sequence in the previous step" (asynchronous steps; see the module docstring).
PREV_TOKEN = -1


@dataclass(frozen=True, kw_only=True)
class SampleSpec:
    """How to pick the token after a sequence's last row: greedy when temperature == 0.

    ``index`` is the position of the generated token among the request's outputs, so the
    random stream is a function of (seed, index) only, never of the batch around it.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    index: int = 0


@dataclass(frozen=True, kw_only=True)
class SeqStep:
    """One sequence's share of a step.

    token_ids:   the new tokens fed this step (a prefill chunk, or the one decode token)
    start_pos:   absolute position of ``token_ids[0]`` (== tokens already in the KV cache)
    blocks_from: index in the sequence's block table where ``new_blocks`` go; the rank keeps
                 ``table[:blocks_from] + new_blocks`` (0 with the full table on first sight)
    slot:        LoRA device slot, -1 = base model
    sample:      pick a token after the last row (None for an intermediate prefill chunk)
    logits:      see ``LogitsMode``
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start_pos: int
    blocks_from: int = 0
    new_blocks: tuple[int, ...] = ()
    slot: int = -1
    sample: SampleSpec | None = None
    logits: LogitsMode = "none"

    @property
    def context_len(self) -> int:
        """Tokens in the KV cache once this step's tokens are written."""
        return self.start_pos + len(self.token_ids)

    def with_tokens(self, token_ids: tuple[int, ...]) -> SeqStep:
        """A copy feeding ``token_ids`` instead (``dataclasses.replace`` without its
        per-field checks: a rank calls this for every placeholder of every step)."""
        new = object.__new__(SeqStep)
        new.__dict__.update(self.__dict__)
        new.__dict__["token_ids"] = token_ids
        return new


@dataclass(frozen=True, kw_only=True)
class StepPlan:
    """Everything a rank needs for one forward step.

    ``released`` sequences (finished, aborted or preempted) have their rank-side state (block
    table, held logits) dropped *before* this step's sequences are read, so a preempted
    sequence may reappear in the same plan with a fresh table.
    ``placeholders``: indices into ``seqs`` whose ``token_ids`` are ``(PREV_TOKEN,)``.
    ``share_tokens``: every rank (not only the output rank) learns the tokens sampled in this
    step, for the next step's placeholders.
    """

    seqs: tuple[SeqStep, ...]
    released: tuple[int, ...] = ()
    placeholders: tuple[int, ...] = ()
    share_tokens: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def is_decode(self) -> bool:
        """Every sequence feeds exactly one token (the CUDA-graph path)."""
        return bool(self.seqs) and all(len(s.token_ids) == 1 for s in self.seqs)


@dataclass(frozen=True, kw_only=True)
class Command:
    """Base of every command: its place in the stream."""

    seq: int


@dataclass(frozen=True, kw_only=True)
class LoadAdapter(Command):
    """Read this rank's slices of an adapter version into the host cache."""

    name: str
    version: int
    path: str

    @property
    def key(self) -> AdapterKey:
        return (self.name, self.version)


@dataclass(frozen=True, kw_only=True)
class ReadAheadHint:
    """Start reading this adapter version into the rank's read-ahead buffer (rides on a
    ``Step``; see the module docstring)."""

    name: str
    version: int
    path: str

    @property
    def key(self) -> AdapterKey:
        return (self.name, self.version)


@dataclass(frozen=True, kw_only=True)
class UpdateAdapter(Command):
    """Stage some layers of a new adapter version (in-place update, layer by layer).

    ``layers`` names the decoder layers whose tensors this command stages (None: all of them,
    plus the model-wide targets); ``final`` closes staging, after which the version is a
    complete host-cache entry under ``(name, version)`` that ``PlaceAdapter`` can activate.
    The old version stays untouched until the controller drops it.
    """

    name: str
    version: int
    path: str
    layers: tuple[int, ...] | None = None
    final: bool = True

    @property
    def key(self) -> AdapterKey:
        return (self.name, self.version)


@dataclass(frozen=True, kw_only=True)
class PlaceAdapter(Command):
    """Activate a host-cached adapter version into a device slot (replacing whatever was there)."""

    name: str
    version: int
    slot: int

    @property
    def key(self) -> AdapterKey:
        return (self.name, self.version)


@dataclass(frozen=True, kw_only=True)
class EvictSlot(Command):
    """Clear a device slot; the host copy, if any, stays."""

    slot: int


@dataclass(frozen=True, kw_only=True)
class DropAdapter(Command):
    """Forget an adapter version: its host copy, any staging, and any slot still holding it."""

    name: str
    version: int

    @property
    def key(self) -> AdapterKey:
        return (self.name, self.version)


@dataclass(frozen=True, kw_only=True)
class Step(Command):
    """Apply ``adapter_ops`` in order (placements and drops decided while planning this step,
    their own ``seq`` unused), start the background reads of ``read_ahead``, then run one
    forward step."""

    plan: StepPlan
    read_ahead: tuple[ReadAheadHint, ...] = ()
    # LoadAdapter rides only for a read-ahead the output rank reported done (step_ops.py).
    adapter_ops: tuple[PlaceAdapter | DropAdapter | LoadAdapter, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Shutdown(Command):
    """Release the model and caches; the rank executes nothing afterwards."""


AdapterCommand = LoadAdapter | UpdateAdapter | PlaceAdapter | EvictSlot | DropAdapter
AnyCommand = AdapterCommand | Step | Shutdown


# How a rank's load met its read-ahead buffer: "none" read on the command path (no hint,
# or the hint's read had not started) · "hit" already read · "waited" joined the read in
# flight · "retried" the read-ahead failed, so the load read again (and reports what it found).
ReadAheadOutcome = Literal["none", "hit", "waited", "retried"]


@dataclass(frozen=True, kw_only=True)
class LoadResult:
    """A rank's report on one adapter load: bytes it holds and where the time went."""

    name: str
    version: int
    nbytes: int
    breakdown_ms: tuple[tuple[str, float], ...] = ()
    read_ahead: ReadAheadOutcome = "none"

    @property
    def total_ms(self) -> float:
        return sum(ms for _, ms in self.breakdown_ms)


@dataclass(frozen=True, kw_only=True)
class PlaceResult:
    """A rank's report on one slot activation."""

    slot: int
    ms: float


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """What the output rank sends back after a step.

    tokens: (seq_id, token id) for every sequence that sampled this step
    logits: (seq_id, payload) for every scoring sequence that emitted; the payload is opaque
            to the controller (a float32 [len, V] tensor in-process, an object reference once
            the Ray shell has put it in the object store)
    adapter_results: what the step's ridden adapter ops returned, in order
    """

    seq: int
    tokens: tuple[tuple[int, int], ...] = ()
    logits: tuple[tuple[int, Any], ...] = ()
    forward_ms: float = 0.0
    # Of forward_ms, the host time until every forward of the step was issued (inputs built,
    # graphs replayed or eager kernels launched); the rest is sampling and the wait for the
    # device. ops_ms: the step's ridden adapter ops and the wait for their slots, before it.
    launch_ms: float = 0.0
    ops_ms: float = 0.0
    # Read-ahead reads a CPU rank ran inline after the forward (before this result left).
    reads_ms: float = 0.0
    # One entry per ``Step.adapter_ops`` (the output rank's PlaceResult or LoadResult, None
    # for a drop).
    adapter_results: tuple[PlaceResult | LoadResult | None, ...] = ()
    # Adapter versions whose read-ahead finished (read, validated, planned) on the output
    # rank since its last step result: their loads may ride on a step (prefetch_book.py).
    read_ahead_ready: tuple[AdapterKey, ...] = ()


@dataclass(frozen=True, kw_only=True)
class RankReply:
    """One rank's answer to a non-step command: a result, or the typed error it raised."""

    rank: int
    result: LoadResult | PlaceResult | None = None
    error: BaseException | None = None


@dataclass(frozen=True, kw_only=True)
class GroupInfo:
    """What the controller must know about a rank group before it schedules anything."""

    world_size: int
    num_kv_blocks: int  # the smallest count over the ranks: block ids below it are valid everywhere
    block_size: int
    device: str
    dtype: str
    max_loras: int
    extra: dict[str, Any] = field(default_factory=dict)
