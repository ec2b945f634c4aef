"""Helpers for the model tests: tiny HF checkpoints, paged batches, a threaded TP/EP Comm.

Not a test module; tests/test_model_*.py import it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_cluster.model.batch import ForwardBatch
from lora_cluster.model.parallel import ParallelInfo

FAMILY_EXTRAS: dict[str, dict] = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=True,
                      head_dim=8),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, intermediate_size=48,
                      norm_topk_prob=False),
    "llama": dict(intermediate_size=48),
    "qwen3": dict(intermediate_size=48, head_dim=8),
    "qwen2": dict(intermediate_size=48),
    "mistral": dict(intermediate_size=48, sliding_window=None),
}


def tiny_config(family: str, **overrides):
    """A tiny transformers config of ``family`` (float32)."""
    from transformers import AutoConfig

    kw = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
    kw.update(FAMILY_EXTRAS[family])
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def make_checkpoint(path: Path, family: str, *, seed: int = 0, scale: float = 0.08,
                    max_shard_size: str | None = None, **overrides):
    """Save a random tiny HF model of ``family`` to ``path``; returns the (eval) HF model.

    Weights are drawn wider than HF's init so routing and logits are far from ties.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides),
                                             dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p) * (3.0 if "bias" in name else 1.0))
    model.eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    return model


@dataclass
class PagedSequences:
    """Host-side block allocation for tests: sequence → blocks, tokens cached so far."""

    block_size: int
    num_blocks: int
    blocks: dict[int, list[int]] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)
    _free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Hand out blocks in a scrambled order so tables are not trivially contiguous.
        self._free = list(reversed(range(self.num_blocks)))[::2] + list(
            reversed(range(self.num_blocks)))[1::2]

    def _grow(self, seq: int, new_len: int) -> None:
        table = self.blocks.setdefault(seq, [])
        while len(table) * self.block_size < new_len:
            table.append(self._free.pop())

    def step(self, items: Sequence[tuple[int, Sequence[int], int]], *, all_logits: bool = False,
             decode: bool = False, max_blocks: int | None = None,
             pad_rows: int = 0) -> ForwardBatch:
        """A ForwardBatch appending ``tokens`` to each ``(seq, tokens, slot)``."""
        ids, pos, slots, starts, ctx, mapping, logit_rows = [], [], [], [0], [], [], []
        for seq, tokens, slot in items:
            start = self.lengths.get(seq, 0)
            end = start + len(tokens)
            self._grow(seq, end)
            table = self.blocks[seq]
            for p in range(start, end):
                mapping.append(table[p // self.block_size] * self.block_size + p % self.block_size)
            rows = list(range(len(ids), len(ids) + len(tokens)))
            logit_rows += rows if all_logits else rows[-1:]
            ids += list(tokens)
            pos += list(range(start, end))
            slots += [slot] * len(tokens)
            starts.append(len(ids))
            ctx.append(end)
            self.lengths[seq] = end
        for _ in range(pad_rows):  # padding rows: no sequence, nothing written
            ids.append(0)
            pos.append(0)
            slots.append(-1)
            mapping.append(-1)
        width = max_blocks or max(len(self.blocks[s]) for s, _, _ in items)
        tables = [self.blocks[s] + [0] * (width - len(self.blocks[s])) for s, _, _ in items]
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(pos, dtype=torch.long),
            token_slots=torch.tensor(slots, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            context_lens=torch.tensor(ctx, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            kv_slot_mapping=torch.tensor(mapping, dtype=torch.long),
            logits_rows=torch.tensor(logit_rows, dtype=torch.long),
            is_decode=decode,
            max_context_len=width * self.block_size if decode else max(ctx),
        )


class _Hub:
    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world


class ThreadComm:
    """A ``Comm`` for rank models run in lock-step on threads of one process (tests only)."""

    def __init__(self, hub: _Hub, info: ParallelInfo) -> None:
        self.hub, self.info = hub, info

    @staticmethod
    def group(tp_size: int, ep_size: int) -> list[ThreadComm]:
        hub = _Hub(tp_size * ep_size)
        return [ThreadComm(hub, ParallelInfo.from_rank(r, tp_size, ep_size, "contiguous"))
                for r in range(tp_size * ep_size)]

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        hub = self.hub
        hub.slots[self.info.rank] = x.clone()
        hub.barrier.wait()
        parts = [t for t in hub.slots if t is not None]
        hub.barrier.wait()  # everyone has read before anyone writes the next collective
        return parts

    def _tp_ranks(self) -> list[int]:
        base = self.info.ep_rank * self.info.tp_size
        return list(range(base, base + self.info.tp_size))

    def all_reduce_tp(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(x)
        total = torch.stack([parts[r] for r in self._tp_ranks()]).sum(0)
        return x.copy_(total)

    def all_reduce_world(self, x: torch.Tensor) -> torch.Tensor:
        return x.copy_(torch.stack(self._exchange(x)).sum(0))

    def all_gather_tp(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        parts = self._exchange(x)
        return torch.cat([parts[r] for r in self._tp_ranks()], dim=dim)


def run_ranks(fns: Sequence) -> list:
    """Run one callable per rank on its own thread; returns their results (re-raises)."""
    results: list = [None] * len(fns)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # surface the first failure to the test
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results
