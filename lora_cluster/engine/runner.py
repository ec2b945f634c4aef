"""Step runner: the one place host lists become tensors.

A ``StepPlan`` becomes a ``ForwardBatch`` on the rank's device, the model runs, and on the
output rank the sampler picks tokens and scoring logits are collected. Every rank runs the
forward (the collectives need all of them); only the output rank samples.

The runner mirrors each live sequence's KV block table from the plans' deltas, and on the
output rank holds the logits of scoring prefills that span several steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from lora_cluster.engine.cuda_graphs import DecodeGraphs
from lora_cluster.engine.messages import SeqStep, StepPlan, StepResult
from lora_cluster.engine.sampler import SamplingBatch, sample
from lora_cluster.model.batch import ForwardBatch


class ForwardModel(Protocol):
    """What the runner needs from the decoder."""

    def forward(self, batch: ForwardBatch, kv_cache: Any) -> torch.Tensor:
        """Logits [N, V] float32 of ``batch.logits_rows``."""
        ...


class StepRunner:
    """Turns plans into forwards on one rank."""

    def __init__(self, model: ForwardModel, kv_cache: Any, *, device: torch.device,
                 block_size: int, context_limit: int, max_num_seqs: int,
                 is_output_rank: bool, use_cuda_graphs: bool) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = block_size
        self.max_blocks_per_seq = -(-context_limit // block_size)
        self.is_output_rank = is_output_rank
        self._tables: dict[int, list[int]] = {}
        self._held_logits: dict[int, list[torch.Tensor]] = {}
        self.graphs: DecodeGraphs | None = None
        if use_cuda_graphs and device.type == "cuda":
            self.graphs = DecodeGraphs(model, kv_cache, device=device, max_num_seqs=max_num_seqs,
                                       max_blocks_per_seq=self.max_blocks_per_seq,
                                       max_context_len=context_limit)

    def capture(self) -> None:
        """Record the decode graphs (all ranks at once: the forward may hold collectives)."""
        if self.graphs is not None:
            self.graphs.capture()

    @property
    def num_live_seqs(self) -> int:
        return len(self._tables)

    def reset(self) -> None:
        """Forget every sequence (the controller restarted its schedule)."""
        self._tables.clear()
        self._held_logits.clear()

    # ---------------------------------------------------------------- one step
    @torch.inference_mode()
    def run(self, plan: StepPlan, seq: int) -> StepResult | None:
        """Execute a plan; the output rank returns tokens and emitted logits, others None."""
        start = time.perf_counter()
        for seq_id in plan.released:
            self._tables.pop(seq_id, None)
            self._held_logits.pop(seq_id, None)
        for s in plan.seqs:
            old = self._tables.get(s.seq_id, [])
            table = old[:s.blocks_from] + list(s.new_blocks)
            if s.blocks_from > len(old) or len(table) * self.block_size < s.context_len:
                raise RuntimeError(f"sequence {s.seq_id}: block table out of step with the "
                                   f"controller ({len(old)} held, update from {s.blocks_from})")
            self._tables[s.seq_id] = table
        if not plan.seqs:
            return StepResult(seq=seq) if self.is_output_rank else None
        if self.graphs is not None and plan.is_decode and len(plan.seqs) <= self.graphs.max_num_seqs:
            logits = self.graphs.run(plan.seqs, [self._tables[s.seq_id] for s in plan.seqs],
                                     self.block_size)
            offsets = list(range(len(plan.seqs) + 1))
        else:
            batch, offsets = self._eager_batch(plan.seqs)
            logits = self.model.forward(batch, self.kv_cache)
        if not self.is_output_rank:
            return None
        return self._postprocess(plan.seqs, logits, offsets, seq, start)

    def _eager_batch(self, seqs: Sequence[SeqStep]) -> tuple[ForwardBatch, list[int]]:
        """The batch tensors, and for each sequence where its logits start in the output."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        kv_map: list[int] = []
        qsl = [0]
        ctx: list[int] = []
        rows: list[int] = []
        offsets = [0]
        tables = [self._tables[s.seq_id] for s in seqs]
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
            if s.logits != "none":
                rows.extend(range(first, first + n))
            elif s.sample is not None:
                rows.append(first + n - 1)
            offsets.append(len(rows))
            flat_tables.extend(table)
            flat_tables.extend([0] * (width - len(table)))

        def t(values: list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

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
        return batch, offsets

    def _postprocess(self, seqs: Sequence[SeqStep], logits: torch.Tensor, offsets: list[int],
                     seq: int, start: float) -> StepResult:
        sampled = [(i, s) for i, s in enumerate(seqs) if s.sample is not None]
        tokens: tuple[tuple[int, int], ...] = ()
        if sampled:
            last_rows = torch.tensor([offsets[i + 1] - 1 for i, _ in sampled], device=logits.device)
            batch = SamplingBatch.from_specs([s.sample for _, s in sampled], logits.device)  # type: ignore[misc]
            picked = sample(logits.index_select(0, last_rows).float(), batch).tolist()
            tokens = tuple((s.seq_id, int(tok)) for (_, s), tok in zip(sampled, picked))
        emitted: list[tuple[int, Any]] = []
        for i, s in enumerate(seqs):
            if s.logits == "none":
                continue
            part = logits[offsets[i]:offsets[i + 1]].to("cpu", torch.float32, copy=True)
            held = self._held_logits.setdefault(s.seq_id, [])
            held.append(part)
            if s.logits == "emit":
                del self._held_logits[s.seq_id]
                emitted.append((s.seq_id, held[0] if len(held) == 1 else torch.cat(held)))
        return StepResult(seq=seq, tokens=tokens, logits=tuple(emitted),
                          forward_ms=(time.perf_counter() - start) * 1e3)
