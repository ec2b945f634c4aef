"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

All of a decode step's inputs travel in one packed int64 buffer (one host→device copy); the
captured region itself unpacks them into the ``ForwardBatch`` fields, and the model builds
its LoRA metadata from ``token_slots`` inside the same region — so a graph never freezes a
host-side decision about which rows have adapters. Rows past the live batch are padding:
slot -1 (no LoRA), KV slot -1 (nothing written), context length 1 over block 0 (a finite,
ignored read).

Packed layout for bucket b (P = max blocks per sequence), all int64:
    [0:b) input ids · [b:2b) positions · [2b:3b) LoRA slots · [3b:4b) context lengths ·
    [4b:5b) KV slot mapping · [5b:5b+b·P) block tables, row-major
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lora_cluster.engine.messages import SeqStep
from lora_cluster.model.batch import ForwardBatch


class PackedInputs:
    """A device int64 buffer that captured graphs read, filled with one host→device copy per
    step from a pinned staging buffer."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.packed = torch.zeros(size, dtype=torch.int64, device=device)
        self._staging = torch.zeros(size, dtype=torch.int64, pin_memory=device.type == "cuda")
        # Set once the last copy has left the staging buffer: a rank that does not sample
        # never waits on the device otherwise and could overwrite it early.
        self._copied: torch.cuda.Event | None = None

    def staging(self) -> torch.Tensor:
        """The host staging buffer, once the previous copy has left it (write, then ``send``)."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._staging

    def send(self, size: int) -> None:
        """Copy the staging buffer's first ``size`` values to ``packed`` (asynchronously)."""
        self.packed[:size].copy_(self._staging[:size], non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def upload(self, host: torch.Tensor) -> None:
        """Copy ``host`` (int64, ≤ size) into the front of ``packed`` (asynchronously)."""
        size = host.numel()
        self.staging()[:size].copy_(host)
        self.send(size)


def pack_decode(seqs: Sequence[SeqStep], tables: Sequence[list[int]], block_size: int,
                bucket: int, width: int, out: torch.Tensor) -> int:
    """Write bucket ``bucket``'s packed decode inputs (layout above) into the front of ``out``
    (host int64) and return their length; rows past ``len(seqs)`` are padding.

    Host cost scales with the live blocks, not with ``width``: the table grid is cleared with
    one fill and only its first ``longest table`` columns come from Python lists.
    """
    n, pad = len(seqs), bucket - len(seqs)
    if pad < 0:
        raise ValueError(f"{n} decodes do not fit bucket {bucket}")
    bs = block_size
    head = ([s.token_ids[0] for s in seqs] + [0] * pad
            + [s.start_pos for s in seqs] + [0] * pad
            + [s.slot for s in seqs] + [-1] * pad
            + [s.context_len for s in seqs] + [1] * pad
            + [t[s.start_pos // bs] * bs + s.start_pos % bs for s, t in zip(seqs, tables)]
            + [-1] * pad)
    out[:5 * bucket] = torch.tensor(head, dtype=torch.int64)
    size = 5 * bucket + bucket * width
    grid = out[5 * bucket:size].view(bucket, width)
    grid.zero_()
    longest = max((len(t) for t in tables), default=0)
    if longest > width:
        raise ValueError(f"a block table of {longest} blocks exceeds the width {width}")
    if longest:
        flat: list[int] = []
        for t in tables:
            flat.extend(t)
            flat.extend([0] * (longest - len(t)))
        grid[:n, :longest] = torch.tensor(flat, dtype=torch.int64).view(n, longest)
    return size


def graph_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 16, and ``max_num_seqs`` itself."""
    sizes = {b for b in (1, 2, 4, 8) if b <= max_num_seqs}
    sizes.update(range(16, max_num_seqs + 1, 16))
    sizes.add(max_num_seqs)
    return tuple(sorted(sizes))


class DecodeGraphs:
    """Captured decode forwards and the static buffers they read (the runner's decode
    executor on CUDA: whole decode steps, and the decode rows of split mixed steps)."""

    def __init__(self, model: Any, kv_cache: Any, *, device: torch.device, max_num_seqs: int,
                 max_blocks_per_seq: int, max_context_len: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.buckets = graph_buckets(max_num_seqs)
        self.max_num_seqs = self.buckets[-1]
        self.width = max_blocks_per_seq
        # Attention is sized by a bucket value, never by a length read back from the device.
        self.max_context_len = max_context_len
        size = self.max_num_seqs * (5 + self.width)
        self._inputs = PackedInputs(size, device)
        self._packed = self._inputs.packed
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0

    def _unpack(self, b: int) -> ForwardBatch:
        """The batch as views/casts of the packed buffer (runs inside the captured region)."""
        p = self._packed
        return ForwardBatch(
            input_ids=p[0:b],
            positions=p[b:2 * b],
            token_slots=p[2 * b:3 * b].to(torch.int32),
            query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=self.device),
            context_lens=p[3 * b:4 * b].to(torch.int32),
            block_tables=p[5 * b:5 * b + b * self.width].view(b, self.width).to(torch.int32),
            kv_slot_mapping=p[4 * b:5 * b],
            logits_rows=torch.arange(b, dtype=torch.int64, device=self.device),
            is_decode=True,
            max_context_len=self.max_context_len,
        )

    def _fill_padding(self, b: int) -> None:
        p = self._packed
        p[: 5 * b + b * self.width].zero_()
        p[2 * b:3 * b].fill_(-1)  # no LoRA
        p[3 * b:4 * b].fill_(1)  # context of one token in block 0
        p[4 * b:5 * b].fill_(-1)  # KV not written

    def capture(self, pool: Any = None) -> Any:
        """Capture every bucket, largest first, sharing one memory pool (``pool`` when given);
        returns the pool (the prefill graphs capture into it too)."""
        torch.cuda.synchronize(self.device)
        for b in reversed(self.buckets):
            self._fill_padding(b)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: lazy inits and allocator growth
                for _ in range(2):
                    self.model.forward(self._unpack(b), self.kv_cache)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model.forward(self._unpack(b), self.kv_cache)
            pool = graph.pool()
            self._graphs[b] = (graph, out)
        torch.cuda.synchronize(self.device)
        return pool

    def run(self, seqs: Sequence[SeqStep], tables: Sequence[list[int]],
            block_size: int) -> torch.Tensor:
        """Replay the smallest bucket holding ``len(seqs)`` decodes; logits [B, V] (a view of
        the graph's output: consume before the next replay)."""
        n = len(seqs)
        b = next(size for size in self.buckets if size >= n)
        size = pack_decode(seqs, tables, block_size, b, self.width, self._inputs.staging())
        self._inputs.send(size)
        graph, out = self._graphs[b]
        graph.replay()
        self.replays += 1
        return out[:n]
