"""The output side of a step: sampling, scoring logits held across steps, shared tokens.

After the forwards of a step, the output rank picks each sampling sequence's token from its
last logits row (one sampler call over every logits part) and collects the rows of scoring
sequences, holding those of prefills that span several steps until the last chunk emits them.

Asynchronous steps: a plan with ``share_tokens`` makes the output rank's sampled tokens known
to every rank (a sum over the world: the others add zeros — exact for integers, and correct
whatever the backend, unlike every rank sampling its own copy of the logits and trusting them
to be bit-identical); each rank keeps the last token of every live sequence and substitutes
it for the ``PREV_TOKEN`` fed by the next plan's ``placeholders``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lora_cluster.engine.messages import PREV_TOKEN, SeqStep, StepPlan, StepResult
from lora_cluster.engine.sampler import SamplingBatch, sample

# Where a sequence's logits rows are: (part, first row, end row) in the step's logits parts.
Span = tuple[int, int, int]


class StepOutputs:
    """One rank's per-sequence output state: held scoring logits and last sampled tokens.

    ``share`` is the sum over every rank (``Comm.all_reduce_world``; None: one rank).
    """

    def __init__(self, *, device: torch.device,
                 share: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.device = device
        self.share = share
        self._held_logits: dict[int, list[torch.Tensor]] = {}
        self._last_tokens: dict[int, int] = {}

    def forget(self, seq_id: int) -> None:
        """Drop a released sequence's state."""
        self._held_logits.pop(seq_id, None)
        self._last_tokens.pop(seq_id, None)

    def reset(self) -> None:
        """Forget every sequence."""
        self._held_logits.clear()
        self._last_tokens.clear()

    def fill_placeholders(self, plan: StepPlan) -> list[SeqStep]:
        """``plan.seqs`` with each placeholder's last token replaced by the one this rank
        learnt for the sequence in the previous step."""
        seqs = list(plan.seqs)
        for i in plan.placeholders:
            s = seqs[i]
            token = self._last_tokens.get(s.seq_id)
            if token is None or s.token_ids[-1] != PREV_TOKEN:
                raise RuntimeError(f"sequence {s.seq_id}: fed the previous step's token, but "
                                   f"this rank learnt none for it")
            seqs[i] = s.with_tokens((*s.token_ids[:-1], token))
        return seqs

    def learn_tokens(self, seqs: Sequence[SeqStep], sampled: torch.Tensor | None) -> list[int]:
        """Every rank: this step's sampled tokens in plan order (``sampled`` on the output
        rank, zeros elsewhere, summed over the world), kept for the next placeholders."""
        index = [i for i, s in enumerate(seqs) if s.sample is not None]
        if not index:
            return []
        if self.share is not None:
            if sampled is None:
                sampled = torch.zeros(len(index), dtype=torch.int64, device=self.device)
            sampled = self.share(sampled.to(torch.int64))
        assert sampled is not None
        values = sampled.tolist()
        for i, token in zip(index, values):
            self._last_tokens[seqs[i].seq_id] = int(token)
        return values

    def postprocess(self, seqs: Sequence[SeqStep], parts: list[torch.Tensor],
                    spans: list[Span], seq: int, start: float,
                    share_tokens: bool = False, launched: float | None = None) -> StepResult:
        """The output rank's result of a step: sampled tokens and emitted scoring logits.

        ``parts`` are the step's logits tensors ([rows, V] each), ``spans[i]`` where
        ``seqs[i]``'s rows are in them; ``start`` the step's ``perf_counter`` start,
        ``launched`` when its forwards were issued.
        """
        sampled = [i for i, s in enumerate(seqs) if s.sample is not None]
        tokens: tuple[tuple[int, int], ...] = ()
        if sampled:
            # One sampler call over every part's last rows, then back to plan order.
            picked_rows: list[torch.Tensor] = []
            order: list[int] = []
            for p, part_logits in enumerate(parts):
                mine = [i for i in sampled if spans[i][0] == p]
                if mine:
                    rows = torch.tensor([spans[i][2] - 1 for i in mine], device=part_logits.device)
                    picked_rows.append(part_logits.index_select(0, rows))
                    order.extend(mine)
            logits = picked_rows[0] if len(picked_rows) == 1 else torch.cat(picked_rows)
            batch = SamplingBatch.from_specs([seqs[i].sample for i in order],  # type: ignore[misc]
                                             logits.device)
            picked = sample(logits.float(), batch)
            if share_tokens:
                # Back to plan order on the device, then one sum over the world.
                perm = torch.tensor(order).argsort().to(picked.device)
                in_plan = picked.index_select(0, perm)
                values = self.learn_tokens(seqs, in_plan)
                tokens = tuple((seqs[i].seq_id, int(v)) for i, v in zip(sampled, values))
            else:
                by_index = dict(zip(order, picked.tolist()))
                tokens = tuple((seqs[i].seq_id, int(by_index[i])) for i in sampled)
        emitted: list[tuple[int, Any]] = []
        for i, s in enumerate(seqs):
            if s.logits == "none":
                continue
            p, begin, end = spans[i]
            part = parts[p][begin:end].to("cpu", torch.float32, copy=True)
            held = self._held_logits.setdefault(s.seq_id, [])
            held.append(part)
            if s.logits == "emit":
                del self._held_logits[s.seq_id]
                emitted.append((s.seq_id, held[0] if len(held) == 1 else torch.cat(held)))
        return StepResult(seq=seq, tokens=tokens, logits=tuple(emitted),
                          forward_ms=(time.perf_counter() - start) * 1e3,
                          launch_ms=((launched or start) - start) * 1e3)
