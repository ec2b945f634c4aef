"""Helpers for the model tests: tiny HF checkpoints, paged batches, a threaded TP/EP Comm.

Not a test module; tests/test_model_*.py import it.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_cluster.adapters.weights import AdapterWeights, LoRATensors
from lora_cluster.model.batch import ForwardBatch
from lora_cluster.model.parallel import ParallelInfo, local_experts
from lora_cluster.model.sharding import holds_shared_expert, lora_target_shard
from lora_cluster.model.spec import ModelSpec

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
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world


class ThreadComm:
    """A ``Comm`` for rank models run in lock-step on threads of one process (tests only)."""

    def __init__(self, hub: _Hub, info: ParallelInfo) -> None:
        self.hub, self.info = hub, info

    @staticmethod
    def group(tp_size: int, ep_size: int, placement: str = "contiguous") -> list[ThreadComm]:
        hub = _Hub(tp_size * ep_size)
        return [ThreadComm(hub, ParallelInfo.from_rank(r, tp_size, ep_size, placement))
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


# ---- adapters: fixture intent → per-rank AdapterWeights, and merged checkpoints ------------

_ATTN = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)$")
_DENSE = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)$")
_SHARED = re.compile(r"^model\.layers\.(\d+)\.mlp\.shared_expert\.(gate_proj|up_proj|down_proj)$")
_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
    r"(gate_proj|up_proj|down_proj|w1|w3|w2)$")
_MIXTRAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def module_key(path: str) -> tuple[int | None, str, int | None]:
    """HF module path → (layer, canonical kind, expert id or None)."""
    if path in ("model.embed_tokens", "lm_head"):
        return None, path.rsplit(".", 1)[-1], None
    for pattern, prefix in ((_ATTN, ""), (_DENSE, ""), (_SHARED, "shared_expert.")):
        m = pattern.match(path)
        if m:
            return int(m.group(1)), prefix + m.group(2), None
    m = _EXPERT.match(path)
    if m:
        leaf = _MIXTRAL.get(m.group(3), m.group(3))
        return int(m.group(1)), f"experts.{leaf}", int(m.group(2))
    raise ValueError(f"unknown module path {path!r}")


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    pad = rank - a.shape[0]
    return (torch.cat([a, a.new_zeros(pad, a.shape[1])]),
            torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)) if pad else (a, b)


def shard_adapter(modules: dict, spec: ModelSpec, parallel: ParallelInfo, *,
                  name: str = "adapter", version: int = 0) -> AdapterWeights:
    """What the adapter loader must hand this rank: its slices of every module, unscaled.

    ``modules``: HF path → object with ``a [r, in]``, ``b [out, r]``, ``scaling`` (the
    fixtures' ``ModuleLoRA``). Experts of one kind are stacked (ranks zero-padded; differing
    per-expert scalings folded into B).
    """
    experts: dict[tuple[int, str], dict[int, object]] = {}
    out: dict = {}
    for path, m in modules.items():
        layer, kind, expert = module_key(path)
        if expert is not None:
            assert layer is not None
            experts.setdefault((layer, kind), {})[expert] = m
            continue
        if kind.startswith("shared_expert.") and not holds_shared_expert(parallel):
            continue
        sh = lora_target_shard(spec, parallel, layer, kind)
        (i0, i1), (o0, o1) = sh.in_range, sh.out_range
        out[(layer, kind)] = LoRATensors(m.a[:, i0:i1].clone(), m.b[o0:o1].clone(), m.scaling)
    local = local_experts(spec.num_experts, parallel)
    for (layer, kind), per in experts.items():
        sh = lora_target_shard(spec, parallel, layer, kind)
        (i0, i1), (o0, o1) = sh.in_range, sh.out_range
        chosen = [per[e] for e in local if e in per]
        if not chosen:
            continue
        assert len(chosen) == len(local), "fixtures target every expert of a kind"
        rank = max(m.a.shape[0] for m in chosen)
        same = len({m.scaling for m in chosen}) == 1
        pairs = [_pad_rank(m.a, m.b if same else m.b * m.scaling, rank) for m in chosen]
        a = torch.stack([p[0][:, i0:i1] for p in pairs])
        b = torch.stack([p[1][o0:o1] for p in pairs])
        out[(layer, kind)] = LoRATensors(a, b, chosen[0].scaling if same else 1.0)
    rank = max(t.rank for t in out.values())
    return AdapterWeights(name, version, rank, out)


def merge_into_checkpoint(model_dir: Path, modules: dict, out_dir: Path) -> Path:
    """A copy of ``model_dir`` whose weights include each module's ``scaling · B @ A``.

    Embeddings take ``scaling · (B @ A).T``; tied lm_head is not supported here.
    """
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_dir / "config.json", out_dir / "config.json")
    index = model_dir / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.exists() else ["model.safetensors"])
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(model_dir / f)))
    for path, m in modules.items():
        delta = m.scaling * (m.b.double() @ m.a.double())
        key = f"{path}.weight"
        tensors[key] = (tensors[key].double() + (delta.T if path == "model.embed_tokens"
                                                  else delta)).to(tensors[key].dtype)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


# ---- running sequences through a model -----------------------------------------------------

@dataclass
class Trace:
    """Per-sequence logits rows (prompt rows first, then one per decode step) and tokens."""

    logits: list[list[torch.Tensor]]
    generated: list[list[int]]

    def full_logits(self, seq: int) -> torch.Tensor:
        return torch.stack(self.logits[seq])


def run_prompts(forward, prompts: Sequence[Sequence[int]], slots: Sequence[int], *,
                new_tokens: int, chunk_first: int | None = None, block_size: int = 4,
                num_blocks: int = 128) -> Trace:
    """Prefill every prompt (all rows' logits), then greedy-decode ``new_tokens`` each.

    ``forward(batch) -> logits`` runs one step on the caller's model(s) and cache(s).
    Step 1 prefills all prompts together, except that prompt 0 only sends its first
    ``chunk_first`` tokens; step 2 is a *mixed* general step (prompt 0's remaining chunk plus
    one decode token of every other sequence); then fixed-shape decode steps follow.
    """
    paged = PagedSequences(block_size, num_blocks)
    n = len(prompts)
    trace = Trace([[] for _ in range(n)], [[] for _ in range(n)])
    first = [list(p) for p in prompts]
    rest: list[int] = []
    if chunk_first is not None:
        first[0], rest = list(prompts[0][:chunk_first]), list(prompts[0][chunk_first:])
    batch = paged.step([(s, first[s], slots[s]) for s in range(n)], all_logits=True)
    out, row = forward(batch), 0
    for s in range(n):
        for _ in first[s]:
            trace.logits[s].append(out[row])
            row += 1
    pending = {s: int(trace.logits[s][-1].argmax()) for s in range(n) if s or not rest}
    if rest:
        items = [(0, rest, slots[0])] + [(s, [pending[s]], slots[s]) for s in range(1, n)]
        for s in range(1, n):
            trace.generated[s].append(pending[s])
        out = forward(paged.step(items, all_logits=True))
        trace.logits[0] += list(out[:len(rest)])
        for s in range(1, n):
            trace.logits[s].append(out[len(rest) + s - 1])
            pending[s] = int(out[len(rest) + s - 1].argmax())
        pending[0] = int(trace.logits[0][-1].argmax())
    while any(len(g) < new_tokens for g in trace.generated):
        live = [s for s in range(n) if len(trace.generated[s]) < new_tokens]
        for s in live:
            trace.generated[s].append(pending[s])
        if all(len(trace.generated[s]) == new_tokens for s in live):
            break
        live = [s for s in live if len(trace.generated[s]) < new_tokens]
        out = forward(paged.step([(s, [pending[s]], slots[s]) for s in live], decode=True,
                                 max_blocks=num_blocks // max(n, 1)))
        for i, s in enumerate(live):
            trace.logits[s].append(out[i])
            pending[s] = int(out[i].argmax())
    return trace


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a.double() - b.double()).norm() / b.double().norm())
