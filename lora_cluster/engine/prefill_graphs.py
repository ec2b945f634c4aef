"""Prefill forwards replayed from CUDA graphs, one graph per token bucket.

An eager prefill forward on GPU is host-bound (hundreds of kernel launches for a few ms of
GPU work); a replay costs one host→device copy and one graph launch. A prefill part of a step
(the multi-row sequences of a split step, or a whole step that does not split) fits a graph
when it needs only each sequence's last-row logits, has at most ``max_seqs`` sequences and
at most the largest bucket's rows; it then runs padded to the smallest bucket holding it.

Every sequence is one span of the attention plan (single rows too), its (seq, row_start,
rows, context) in a span table the captured region reads on the device, so the plan holds
no device value (``paged_attention.plan_attention``'s static plan). Padding: rows past the
live ones have slot -1 (no LoRA), KV slot -1 (nothing written), position 0 and belong to no
sequence (their attention output is zero and nothing reads their logits); sequences past the
live ones are spans of 0 rows whose logits row is row 0 (ignored).

Packed layout of bucket (T rows, S sequences, P max blocks per sequence), all int64:
    [0:T) input ids · [T:2T) positions · [2T:3T) LoRA slots · [3T:4T) KV slot mapping ·
    [4T:4T+S) logits rows · [4T+S:4T+5S) span table, row-major · [4T+5S:4T+5S+S·P) block
    tables, row-major (rows of padding sequences are never read: left stale, not copied)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_cluster.engine.cuda_graphs import PackedInputs
from lora_cluster.engine.messages import SeqStep
from lora_cluster.model.batch import ForwardBatch

# Token buckets (capped by the step budget) and sequences per graph (capped by max_num_seqs).
PREFILL_BUCKETS = (128, 256, 512, 1024, 2048)
PREFILL_GRAPH_SEQS = 32


def prefill_buckets(max_tokens: int) -> tuple[int, ...]:
    """Row counts with a graph: the standard buckets up to ``max_tokens``, and ``max_tokens``
    itself when it is below the largest (a step of the whole budget still fits)."""
    sizes = {b for b in PREFILL_BUCKETS if b <= max_tokens}
    if 1 <= max_tokens < PREFILL_BUCKETS[-1]:
        sizes.add(max_tokens)
    return tuple(sorted(sizes))


@dataclass(frozen=True)
class PrefillLayout:
    """Offsets of one bucket's fields in the packed buffer (T rows, S sequences, P width)."""

    rows: int
    seqs: int
    width: int

    @property
    def tables_at(self) -> int:
        return 4 * self.rows + 5 * self.seqs

    @property
    def size(self) -> int:
        return self.tables_at + self.seqs * self.width


def pack_prefill(seqs: Sequence[SeqStep], tables: Sequence[list[int]], block_size: int,
                 layout: PrefillLayout) -> torch.Tensor:
    """The host int64 prefix of the packed buffer for ``seqs`` padded to ``layout``: every
    field of the bucket, and the block tables of the live sequences only."""
    bs, t_rows, n = block_size, layout.rows, len(seqs)
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    kv: list[int] = []
    last: list[int] = []
    spans: list[int] = []
    flat: list[int] = []
    for i, (s, table) in enumerate(zip(seqs, tables)):
        first, rows = len(ids), len(s.token_ids)
        ids.extend(s.token_ids)
        positions = range(s.start_pos, s.start_pos + rows)
        pos.extend(positions)
        slots.extend([s.slot] * rows)
        kv.extend(table[p // bs] * bs + p % bs for p in positions)
        last.append(first + rows - 1)
        spans.extend((i, first, rows, s.context_len))
        flat.extend(table)
        flat.extend([0] * (layout.width - len(table)))
    live, pad_seqs = len(ids), layout.seqs - n
    if live > t_rows or pad_seqs < 0:
        raise ValueError(f"{live} rows of {n} sequences do not fit bucket "
                         f"({t_rows} rows, {layout.seqs} sequences)")
    pad = t_rows - live
    for i in range(n, layout.seqs):
        spans.extend((i, live, 0, 1))
    values = (ids + [0] * pad + pos + [0] * pad + slots + [-1] * pad + kv + [-1] * pad
              + last + [0] * pad_seqs + spans + flat)
    return torch.tensor(values, dtype=torch.int64)


def unpack_prefill(packed: torch.Tensor, layout: PrefillLayout,
                   max_context_len: int) -> ForwardBatch:
    """The batch as views / casts of ``packed`` (device ops only: runs in the captured region)."""
    t, s = layout.rows, layout.seqs
    spans = packed[4 * t + s:4 * t + 5 * s].view(s, 4)
    qsl = torch.zeros(s + 1, dtype=torch.int32, device=packed.device)
    qsl[1:] = torch.cumsum(spans[:, 2], 0).to(torch.int32)
    return ForwardBatch(
        input_ids=packed[0:t],
        positions=packed[t:2 * t],
        token_slots=packed[2 * t:3 * t].to(torch.int32),
        query_start_loc=qsl,
        context_lens=spans[:, 3].to(torch.int32),
        block_tables=packed[layout.tables_at:layout.size].view(s, layout.width).to(torch.int32),
        kv_slot_mapping=packed[3 * t:4 * t],
        logits_rows=packed[4 * t:4 * t + s],
        is_decode=False,
        max_context_len=max_context_len,
        span_table=spans,
        max_span_rows=t,
    )


class _PrefillExecutor:
    """Bucket choice and packing shared by the graph executor and its eager stand-in."""

    def __init__(self, model: Any, kv_cache: Any, *, device: torch.device,
                 buckets: Sequence[int], max_seqs: int, max_blocks_per_seq: int,
                 max_context_len: int) -> None:
        if not buckets or max_seqs < 1:
            raise ValueError(f"prefill graphs need buckets and max_seqs >= 1, got "
                             f"{tuple(buckets)}, {max_seqs}")
        self.model, self.kv_cache, self.device = model, kv_cache, device
        self.buckets = tuple(sorted(set(buckets)))
        self.max_seqs = max_seqs
        self.width = max_blocks_per_seq
        self.max_context_len = max_context_len
        self.runs = 0
        self.padding_rows = 0

    def layout(self, bucket: int) -> PrefillLayout:
        return PrefillLayout(bucket, self.max_seqs, self.width)

    def bucket_for(self, seqs: Sequence[SeqStep]) -> int | None:
        """The smallest bucket holding ``seqs``, or None (too many rows or sequences, or a
        scoring sequence that needs every row's logits). A function of the plan alone."""
        if not seqs or len(seqs) > self.max_seqs or any(s.logits != "none" for s in seqs):
            return None
        rows = sum(len(s.token_ids) for s in seqs)
        return next((b for b in self.buckets if b >= rows), None)

    def _pack(self, seqs: Sequence[SeqStep], tables: Sequence[list[int]],
              block_size: int) -> tuple[int, torch.Tensor]:
        bucket = self.bucket_for(seqs)
        if bucket is None:
            raise ValueError(f"{len(seqs)} sequences of "
                             f"{sum(len(s.token_ids) for s in seqs)} rows fit no prefill bucket")
        self.runs += 1
        self.padding_rows += bucket - sum(len(s.token_ids) for s in seqs)
        return bucket, pack_prefill(seqs, tables, block_size, self.layout(bucket))


class EagerPrefill(_PrefillExecutor):
    """The padded, packed prefill batch run as one eager forward on any device: what
    ``PrefillGraphs`` replays, testable on CPU (the stand-in ``EagerDecode`` is for decode)."""

    def run(self, seqs: Sequence[SeqStep], tables: Sequence[list[int]],
            block_size: int) -> torch.Tensor:
        """Logits [len(seqs), V], row i of ``seqs[i]``'s last row."""
        bucket, host = self._pack(seqs, tables, block_size)
        layout = self.layout(bucket)
        packed = torch.zeros(layout.size, dtype=torch.int64)
        packed[:host.numel()] = host
        batch = unpack_prefill(packed.to(self.device), layout, self.max_context_len)
        return self.model.forward(batch, self.kv_cache)[:len(seqs)]


class PrefillGraphs(_PrefillExecutor):
    """Captured prefill forwards, one per bucket, and the static buffers they read."""

    def __init__(self, model: Any, kv_cache: Any, *, device: torch.device,
                 buckets: Sequence[int], max_seqs: int, max_blocks_per_seq: int,
                 max_context_len: int) -> None:
        super().__init__(model, kv_cache, device=device, buckets=buckets, max_seqs=max_seqs,
                         max_blocks_per_seq=max_blocks_per_seq, max_context_len=max_context_len)
        size = self.layout(self.buckets[-1]).size
        self._inputs = PackedInputs(size, device)
        self._packed = self._inputs.packed
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_ms = 0.0
        self.capture_bytes = 0

    def _fill_padding(self, bucket: int) -> None:
        layout = self.layout(bucket)
        host = pack_prefill([], [], 1, layout)
        self._packed[:layout.size].zero_()
        self._packed[:host.numel()].copy_(host.to(self.device))

    def capture(self, pool: Any = None) -> Any:
        """Capture every bucket, largest first, in ``pool`` (the decode graphs' pool when
        given); returns the pool. Records capture time and the memory it reserved."""
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        for b in reversed(self.buckets):
            self._fill_padding(b)
            layout = self.layout(b)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: kernel compiles, lazy inits, allocator
                for _ in range(2):
                    self.model.forward(unpack_prefill(self._packed, layout,
                                                      self.max_context_len), self.kv_cache)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model.forward(unpack_prefill(self._packed, layout,
                                                        self.max_context_len), self.kv_cache)
            pool = graph.pool()
            self._graphs[b] = (graph, out)
        torch.cuda.synchronize(self.device)
        self.capture_ms = (time.perf_counter() - start) * 1e3
        self.capture_bytes = torch.cuda.memory_reserved(self.device) - reserved
        return pool

    def run(self, seqs: Sequence[SeqStep], tables: Sequence[list[int]],
            block_size: int) -> torch.Tensor:
        """Replay the smallest bucket holding ``seqs``; logits [len(seqs), V] (a view of the
        graph's output: consume before this bucket's next replay)."""
        bucket, host = self._pack(seqs, tables, block_size)
        self._inputs.upload(host)
        graph, out = self._graphs[bucket]
        graph.replay()
        return out[:len(seqs)]
