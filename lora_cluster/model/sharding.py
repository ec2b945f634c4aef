"""Which slice of every weight and LoRA target one rank holds: pure functions of spec × mesh.

The layers size and load themselves from these, and the adapter loader slices LoRA tensors
with the same functions, so a rank's adapter slices always line up with its base shards.

LoRA sharding (each rank's partial result sums to the TP=1 result):
    column-parallel base (q/k/v, gate/up, expert gate/up, lm_head): A full, B rows = out shard
    row-parallel base (o, down, expert down):                       A cols = in shard, B full
    vocab-parallel embedding:                                       A cols = vocab shard, B full
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_cluster.errors import ConfigError
from lora_cluster.model.parallel import ParallelInfo, shard_range
from lora_cluster.model.spec import ModelSpec

Range = tuple[int, int]

COLUMN_KINDS = frozenset({
    "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
    "experts.gate_proj", "experts.up_proj", "shared_expert.gate_proj", "shared_expert.up_proj",
    "lm_head",
})
ROW_KINDS = frozenset({"o_proj", "down_proj", "experts.down_proj", "shared_expert.down_proj"})


@dataclass(frozen=True)
class AttentionShard:
    """Heads of one TP rank: [start, stop) of query heads and of key/value heads.

    When ``tp_size`` exceeds the KV head count, each KV head is replicated over
    ``tp_size // num_kv_heads`` consecutive ranks (GQA groups stay rank-local).
    """

    q_heads: Range
    kv_heads: Range

    @property
    def num_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


@dataclass(frozen=True)
class TargetShard:
    """This rank's part of one LoRA target: A's input columns and B's output rows."""

    in_range: Range
    out_range: Range

    @property
    def in_local(self) -> int:
        return self.in_range[1] - self.in_range[0]

    @property
    def out_local(self) -> int:
        return self.out_range[1] - self.out_range[0]


def attention_shard(spec: ModelSpec, info: ParallelInfo) -> AttentionShard:
    """Query and KV heads of ``info.tp_rank``."""
    tp, rank = info.tp_size, info.tp_rank
    q = shard_range(spec.num_heads, tp, rank, "num_attention_heads")
    kv_heads = spec.num_kv_heads
    if kv_heads % tp == 0:
        kv = shard_range(kv_heads, tp, rank, "num_key_value_heads")
    elif tp % kv_heads == 0:
        head = rank // (tp // kv_heads)
        kv = (head, head + 1)
    else:
        raise ConfigError(
            f"tp_size: {tp} must divide, or be a multiple of, the model's {kv_heads} KV heads",
            field="tp_size",
        )
    return AttentionShard(q, kv)


def vocab_shard(spec: ModelSpec, info: ParallelInfo) -> Range:
    """Rows of the embedding table and of lm_head held by this TP rank."""
    return shard_range(spec.vocab_size, info.tp_size, info.tp_rank, "vocab_size")


def intermediate_shard(size: int, info: ParallelInfo, what: str) -> Range:
    """This TP rank's columns of an MLP's intermediate dimension."""
    return shard_range(size, info.tp_size, info.tp_rank, what)


def holds_shared_expert(info: ParallelInfo) -> bool:
    """The shared expert lives on EP rank 0 only (its output must enter the sum once)."""
    return info.ep_rank == 0


def _out_range(spec: ModelSpec, info: ParallelInfo, layer: int | None, kind: str) -> Range:
    d = spec.head_dim
    if kind == "lm_head":
        return vocab_shard(spec, info)
    if kind == "q_proj":
        lo, hi = attention_shard(spec, info).q_heads
        return lo * d, hi * d
    if kind in ("k_proj", "v_proj"):
        lo, hi = attention_shard(spec, info).kv_heads
        return lo * d, hi * d
    assert layer is not None
    _, full_out = spec.layer_target_shapes(layer)[kind]
    return intermediate_shard(full_out, info, kind)


def _in_range(spec: ModelSpec, info: ParallelInfo, layer: int, kind: str) -> Range:
    if kind == "o_proj":
        lo, hi = attention_shard(spec, info).q_heads
        return lo * spec.head_dim, hi * spec.head_dim
    full_in, _ = spec.layer_target_shapes(layer)[kind]
    return intermediate_shard(full_in, info, kind)


def lora_target_shard(spec: ModelSpec, info: ParallelInfo, layer: int | None,
                      kind: str) -> TargetShard:
    """The (in, out) ranges of target ``(layer, kind)`` this rank holds (experts: per expert)."""
    if layer is None:
        full_in, full_out = spec.model_target_shapes()[kind]
    else:
        full_in, full_out = spec.layer_target_shapes(layer)[kind]
    if kind == "embed_tokens":
        return TargetShard(vocab_shard(spec, info), (0, full_out))
    if kind in COLUMN_KINDS:
        return TargetShard((0, full_in), _out_range(spec, info, layer, kind))
    if kind in ROW_KINDS:
        assert layer is not None
        return TargetShard(_in_range(spec, info, layer, kind), (0, full_out))
    raise ConfigError(f"unknown LoRA target kind {kind!r}", field="kind")
