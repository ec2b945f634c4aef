"""What runs a step's rows: the executor protocols, the batch builder, the eager decode.

``build_batch`` turns a set of ``SeqStep`` rows and their KV block tables into one
``ForwardBatch`` on the rank's device (the runner's only host-list-to-tensor conversion).
A *decode executor* runs single-token rows of many sequences in one forward (CUDA graphs on
GPU, ``EagerDecode`` elsewhere); a *prefill executor* runs a multi-row part padded to a token
bucket (``prefill_graphs``). The ``StepRunner`` (``runner``) chooses between them per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from lora_cluster.engine.messages import SeqStep
from lora_cluster.model.batch import ForwardBatch


class ForwardModel(Protocol):
    """What the runner needs from the decoder."""

    def forward(self, batch: ForwardBatch, kv_cache: Any) -> torch.Tensor:
        """Logits [N, V] float32 of ``batch.logits_rows``."""
        ...


class DecodeExecutor(Protocol):
    """Runs single-token rows of up to ``max_num_seqs`` sequences in one forward."""

    max_num_seqs: int
    replays: int

    def run(self, seqs: Sequence[SeqStep], tables: Sequence[list[int]],
            block_size: int) -> torch.Tensor:
        """Logits [len(seqs), V], row i for ``seqs[i]``; valid until the next ``run``."""
        ...


class PrefillExecutor(Protocol):
    """Runs the multi-row part of a step padded to a token bucket (``prefill_graphs``)."""

    runs: int
    padding_rows: int

    def bucket_for(self, seqs: Sequence[SeqStep]) -> int | None:
        """The bucket ``seqs`` run in, or None when they must run eagerly (plan-only)."""
        ...

    def run(self, seqs: Sequence[SeqStep], tables: Sequence[list[int]],
            block_size: int) -> torch.Tensor:
        """Logits [len(seqs), V], row i of ``seqs[i]``'s last row; valid until the next run."""
        ...


def build_batch(seqs: Sequence[SeqStep], tables: Sequence[list[int]], *, block_size: int,
                device: torch.device, every_row: bool = False
                ) -> tuple[ForwardBatch, list[tuple[int, int]]]:
    """The batch tensors of ``seqs``, and each sequence's [first, end) rows in the output.

    Logits rows: every row of a scoring sequence, the last row of a sampling one, none
    otherwise — or every row of every sequence with ``every_row`` (the decode executors'
    contract: one logits row per sequence).
    """
    bs = block_size
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    kv_map: list[int] = []
    qsl = [0]
    ctx: list[int] = []
    rows: list[int] = []
    spans: list[tuple[int, int]] = []
    width = max(len(t) for t in tables)
    flat_tables: list[int] = []
    for s, table in zip(seqs, tables):
        n = len(s.token_ids)
        first = qsl[-1]
        input_ids.extend(s.token_ids)
        pos = range(s.start_pos, s.start_pos + n)
        positions.extend(pos)
        slots.extend([s.slot] * n)
        kv_map.extend(table[p // bs] * bs + p % bs for p in pos)
        qsl.append(first + n)
        ctx.append(s.context_len)
        begin = len(rows)
        if every_row or s.logits != "none":
            rows.extend(range(first, first + n))
        elif s.sample is not None:
            rows.append(first + n - 1)
        spans.append((begin, len(rows)))
        flat_tables.extend(table)
        flat_tables.extend([0] * (width - len(table)))

    def t(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    batch = ForwardBatch(
        input_ids=t(input_ids, torch.int64),
        positions=t(positions, torch.int64),
        token_slots=t(slots, torch.int32),
        query_start_loc=t(qsl, torch.int32),
        context_lens=t(ctx, torch.int32),
        block_tables=t(flat_tables, torch.int32).view(len(seqs), width),
        kv_slot_mapping=t(kv_map, torch.int64),
        logits_rows=t(rows, torch.int64),
        is_decode=all(len(s.token_ids) == 1 for s in seqs),
        max_context_len=max(ctx),
    )
    return batch, spans


class EagerDecode:
    """The decode executor without CUDA graphs: one eager ``is_decode`` forward.

    What ``DecodeGraphs`` does on GPU, on any device: it makes the step split testable on CPU.
    """

    def __init__(self, model: ForwardModel, kv_cache: Any, *, device: torch.device,
                 max_num_seqs: int) -> None:
        self.model, self.kv_cache, self.device = model, kv_cache, device
        self.max_num_seqs = max_num_seqs
        self.replays = 0

    def run(self, seqs: Sequence[SeqStep], tables: Sequence[list[int]],
            block_size: int) -> torch.Tensor:
        """Logits [len(seqs), V] of one decode forward."""
        batch, _ = build_batch(seqs, tables, block_size=block_size, device=self.device,
                               every_row=True)
        self.replays += 1
        return self.model.forward(batch, self.kv_cache)
