"""Step runner: turns a ``StepPlan`` into forwards on one rank.

The runner mirrors each live sequence's KV block table from the plans' deltas and dispatches
the plan's rows to executors (``step_executors``); every rank runs the forwards (the
collectives need all of them), and on the output rank ``StepOutputs`` (``step_outputs``)
samples tokens and collects scoring logits.

Decode rows go through a *decode executor* (CUDA graphs on GPU): a pure decode step entirely,
and a mixed step split in two — its single-token rows through the executor, its multi-row
sequences (prefills, prefill chunks, scoring) through a second, eager forward on the same KV
cache. The two sets are disjoint sequences, so their KV writes never meet. The split is
decided from the plan alone, so every rank runs the same sequence of forwards.

The multi-row part (the eager rows of a split step, or a whole step that does not split) goes
through a *prefill executor* (CUDA graphs per token bucket on GPU) when it fits one: only
last-row logits needed, few enough sequences and rows — again a function of the plan alone.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lora_cluster.engine.cuda_graphs import DecodeGraphs
from lora_cluster.engine.messages import SeqStep, StepPlan, StepResult
from lora_cluster.engine.prefill_graphs import (
    PREFILL_BUCKETS,
    PREFILL_GRAPH_SEQS,
    EagerPrefill,
    PrefillGraphs,
    prefill_buckets,
)
from lora_cluster.engine.step_executors import (
    DecodeExecutor,
    EagerDecode,
    ForwardModel,
    PrefillExecutor,
    build_batch,
)
from lora_cluster.engine.step_outputs import Span, StepOutputs

# Fewer decode rows than this in a mixed step: one eager forward for all (a graph replay
# beside the eager forward would cost more than the few rows it takes out of it).
SPLIT_MIN_DECODES = 8


class StepRunner:
    """Turns plans into forwards on one rank.

    ``decode`` is the decode executor (CUDA graphs when ``use_cuda_graphs`` on a CUDA device,
    else none: every step one eager forward); ``split_mixed`` sends a mixed step's decode rows
    through it when it has at least ``split_min_decodes`` of them. ``prefill`` is the prefill
    executor (CUDA graphs per token bucket up to ``max_num_batched_tokens`` when
    ``use_cuda_graphs`` and ``prefill_graphs`` on CUDA, else none: multi-row parts eager).
    """

    def __init__(self, model: ForwardModel, kv_cache: Any, *, device: torch.device,
                 block_size: int, context_limit: int, max_num_seqs: int,
                 is_output_rank: bool, use_cuda_graphs: bool, split_mixed: bool = True,
                 split_min_decodes: int = SPLIT_MIN_DECODES,
                 max_num_batched_tokens: int = PREFILL_BUCKETS[-1],
                 prefill_graphs: bool = True,
                 share: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = block_size
        self.max_blocks_per_seq = -(-context_limit // block_size)
        self.max_num_seqs = max_num_seqs
        self.is_output_rank = is_output_rank
        self.split_mixed = split_mixed
        self.split_min_decodes = max(1, split_min_decodes)
        self._tables: dict[int, list[int]] = {}
        # Held scoring logits and, for asynchronous steps, each live sequence's last sampled
        # token shared over every rank through ``share``.
        self.outputs = StepOutputs(device=device, share=share)
        self.counters: collections.Counter[str] = collections.Counter()
        self.context_limit = context_limit
        self.prefill_buckets = prefill_buckets(max_num_batched_tokens)
        self.prefill_seqs = min(PREFILL_GRAPH_SEQS, max_num_seqs)
        self.graphs: DecodeGraphs | None = None
        self.decode: DecodeExecutor | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.prefill: PrefillExecutor | None = None
        if use_cuda_graphs and device.type == "cuda":
            self.graphs = DecodeGraphs(model, kv_cache, device=device, max_num_seqs=max_num_seqs,
                                       max_blocks_per_seq=self.max_blocks_per_seq,
                                       max_context_len=context_limit)
            self.decode = self.graphs
            if prefill_graphs:
                self.prefill_graphs = PrefillGraphs(
                    model, kv_cache, device=device, buckets=self.prefill_buckets,
                    max_seqs=self.prefill_seqs, max_blocks_per_seq=self.max_blocks_per_seq,
                    max_context_len=context_limit)
                self.prefill = self.prefill_graphs

    def capture(self) -> None:
        """Record the decode graphs, then the prefill graphs in the same memory pool (all
        ranks at once: the forward may hold collectives)."""
        pool = self.graphs.capture() if self.graphs is not None else None
        if self.prefill_graphs is not None:
            self.prefill_graphs.capture(pool)

    def use_eager_prefill(self, buckets: Sequence[int] | None = None,
                          max_seqs: int | None = None) -> EagerPrefill:
        """Route multi-row parts that fit a bucket through padded eager forwards (the CPU
        stand-in for ``PrefillGraphs``). Every rank of a group must make this call."""
        executor = EagerPrefill(self.model, self.kv_cache, device=self.device,
                                buckets=buckets or self.prefill_buckets,
                                max_seqs=max_seqs or self.prefill_seqs,
                                max_blocks_per_seq=self.max_blocks_per_seq,
                                max_context_len=self.context_limit)
        self.prefill = executor
        return executor

    def set_prefill_graphs(self, on: bool) -> None:
        """Use the captured prefill graphs (on) or run every multi-row part eagerly (off).
        Every rank of a group must make the same call."""
        self.prefill = self.prefill_graphs if on else None

    def use_eager_decode(self) -> EagerDecode:
        """Route decode rows through eager decode forwards (splits mixed steps without graphs:
        the CPU stand-in for ``DecodeGraphs``). Every rank of a group must make this call."""
        executor = EagerDecode(self.model, self.kv_cache, device=self.device,
                               max_num_seqs=self.max_num_seqs)
        self.decode = executor
        return executor

    @property
    def num_live_seqs(self) -> int:
        return len(self._tables)

    def reset(self) -> None:
        """Forget every sequence (the controller restarted its schedule)."""
        self._tables.clear()
        self.outputs.reset()

    def stats(self) -> dict[str, int]:
        """Step counters: decode-executor steps, split steps and their decode rows, eager
        forwards and those that held prefill rows, prefill-executor forwards, their live and
        padding rows; prefill graph capture time (ms) and memory reserved (bytes)."""
        keys = ("decode_steps", "split_steps", "split_decode_rows", "eager_forwards",
                "prefill_forwards", "prefill_graph_forwards", "prefill_graph_rows")
        out = {k: int(self.counters[k]) for k in keys}
        out["prefill_graph_padding_rows"] = self.prefill.padding_rows if self.prefill else 0
        graphs = self.prefill_graphs
        out["prefill_graph_capture_ms"] = int(graphs.capture_ms) if graphs else 0
        out["prefill_graph_bytes"] = int(graphs.capture_bytes) if graphs else 0
        return out

    # ---------------------------------------------------------------- one step
    def split_of(self, plan: StepPlan) -> tuple[list[int], list[int]] | None:
        """(decode rows, eager rows) as plan indices when the step splits, else None.

        A function of the plan and of settings every rank shares (never of rank-local state):
        the ranks must run the same forwards in the same order.
        """
        if self.decode is None or not self.split_mixed:
            return None
        single = [i for i, s in enumerate(plan.seqs) if len(s.token_ids) == 1]
        if len(single) < self.split_min_decodes or len(single) > self.decode.max_num_seqs:
            return None
        multi = [i for i, s in enumerate(plan.seqs) if len(s.token_ids) > 1]
        return single, multi

    @torch.inference_mode()
    def run(self, plan: StepPlan, seq: int) -> StepResult | None:
        """Execute a plan; the output rank returns tokens and emitted logits, others None."""
        start = time.perf_counter()
        for seq_id in plan.released:
            self._tables.pop(seq_id, None)
            self.outputs.forget(seq_id)
        tables, block_size = self._tables, self.block_size
        for s in plan.seqs:
            old = tables.get(s.seq_id)
            held = len(old) if old is not None else 0
            if s.blocks_from == held and not s.new_blocks:  # the common decode step
                table = old
            else:
                table = (old[:s.blocks_from] if old else []) + list(s.new_blocks)
            if (s.blocks_from > held or table is None
                    or len(table) * block_size < s.start_pos + len(s.token_ids)):
                raise RuntimeError(f"sequence {s.seq_id}: block table out of step with the "
                                   f"controller ({held} held, update from {s.blocks_from})")
            tables[s.seq_id] = table
        if not plan.seqs:
            return StepResult(seq=seq) if self.is_output_rank else None
        seqs = self.outputs.fill_placeholders(plan) if plan.placeholders else plan.seqs
        parts: list[torch.Tensor] = []
        spans: list[Span] = [(0, 0, 0)] * len(seqs)
        if (self.decode is not None and plan.is_decode
                and len(seqs) <= self.decode.max_num_seqs):
            parts.append(self._run_decode(seqs, range(len(seqs)), spans, part=0))
            self.counters["decode_steps"] += 1
        elif (split := self.split_of(plan)) is not None:
            single, multi = split
            # Decode first: its logits (a graph's output view) stay valid through the eager
            # forward, which never replays a graph; they are consumed below, before any replay.
            parts.append(self._run_decode(seqs, single, spans, part=0))
            parts.append(self._run_multi(seqs, multi, spans, part=1))
            self.counters["split_steps"] += 1
            self.counters["split_decode_rows"] += len(single)
        else:
            parts.append(self._run_multi(seqs, range(len(seqs)), spans, part=0))
        if not self.is_output_rank:
            if plan.share_tokens:
                self.outputs.learn_tokens(seqs, None)
            return None
        return self.outputs.postprocess(seqs, parts, spans, seq, start, plan.share_tokens,
                                        launched=time.perf_counter())

    def _run_decode(self, seqs: Sequence[SeqStep], index: Sequence[int], spans: list[Span],
                    part: int) -> torch.Tensor:
        assert self.decode is not None
        chosen = [seqs[i] for i in index]
        logits = self.decode.run(chosen, [self._tables[s.seq_id] for s in chosen],
                                 self.block_size)
        for row, i in enumerate(index):
            spans[i] = (part, row, row + 1)
        return logits

    def _run_multi(self, seqs: Sequence[SeqStep], index: Sequence[int], spans: list[Span],
                   part: int) -> torch.Tensor:
        """The prefill executor when ``seqs[index]`` fit a bucket, else one eager forward."""
        chosen = [seqs[i] for i in index]
        if self.prefill is None or self.prefill.bucket_for(chosen) is None:
            return self._run_eager(seqs, index, spans, part)
        logits = self.prefill.run(chosen, [self._tables[s.seq_id] for s in chosen],
                                  self.block_size)
        self.counters["prefill_graph_forwards"] += 1
        self.counters["prefill_graph_rows"] += sum(len(s.token_ids) for s in chosen)
        for row, i in enumerate(index):
            # One logits row per sequence: the last one, read only if the sequence samples.
            spans[i] = (part, row, row + 1) if seqs[i].sample is not None else (part, row, row)
        return logits

    def _run_eager(self, seqs: Sequence[SeqStep], index: Sequence[int], spans: list[Span],
                   part: int) -> torch.Tensor:
        chosen = [seqs[i] for i in index]
        batch, local = build_batch(chosen, [self._tables[s.seq_id] for s in chosen],
                                   block_size=self.block_size, device=self.device)
        self.counters["eager_forwards"] += 1
        if not batch.is_decode:
            self.counters["prefill_forwards"] += 1
        for (begin, end), i in zip(local, index):
            spans[i] = (part, begin, end)
        return self.model.forward(batch, self.kv_cache)



__all__ = ["SPLIT_MIN_DECODES", "DecodeExecutor", "EagerDecode", "ForwardModel",
           "PrefillExecutor", "Span", "StepRunner", "build_batch"]
