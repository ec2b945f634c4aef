"""LoRA slots inside the layers: adapter in a slot == merged weights == PEFT; mixed-slot batches.

Adapters come from the fixtures' intent (``build_adapter(...).modules``), sliced per rank the
way the adapter loader must (``model_support.shard_adapter``).
"""

from __future__ import annotations

import pytest
import torch
from model_support import merge_into_checkpoint, rel_err, run_prompts, shard_adapter
from oracle import oracle_logits

from lora_cluster.errors import (
    AdapterRankError,
    AdapterShapeError,
    ConfigError,
    UnsupportedAdapterError,
)
from lora_cluster.model.layers.lora_buffers import EmbeddingLoRA, ExpertLoRA, LinearLoRA
from lora_cluster.model.loader import load_model
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.testing import build_adapter, save_adapter

PROMPTS = [[5, 17, 33, 9, 100, 250, 7, 8, 61], [44, 20, 91], [7, 7, 150, 3, 81, 19],
           [300, 12, 1, 99]]
RAGGED = {"o_proj": 4, "down_proj": 2, "embed_tokens": 3}


def _trace(model, prompts, slots, **kw):
    cache = model.make_kv_cache(num_blocks=128, block_size=4)
    return run_prompts(lambda b: model(b, cache), prompts, slots, **kw)


@pytest.mark.parametrize("family", ["qwen3_moe_dense_layers", "mixtral", "qwen2_moe", "llama"])
def test_slot_equals_merged_weights(fixture_cache, tmp_path, family) -> None:
    """Every target kind (attention, dense MLP, experts, shared expert, embed, lm_head) with
    ragged ranks: the adapter in a slot gives the logits of W + scaling·B·A merged on disk."""
    model_dir = fixture_cache.model(family)
    fixture = build_adapter(model_dir, targets=["all"], r=6, rank_pattern=RAGGED, seed=3)
    model = load_model(model_dir, max_loras=3, max_lora_rank=8)
    weights = shard_adapter(fixture.modules, model.spec, ParallelInfo())
    assert len({t.rank for t in weights.modules.values()}) > 1  # ragged ranks really present
    model.set_lora_slot(1, weights)
    merged = load_model(merge_into_checkpoint(model_dir, fixture.modules, tmp_path / "merged"))

    ours = _trace(model, PROMPTS[:2], [1, 1], new_tokens=4, chunk_first=5)
    ref = _trace(merged, PROMPTS[:2], [-1, -1], new_tokens=4, chunk_first=5)
    base = _trace(model, PROMPTS[:2], [-1, -1], new_tokens=4, chunk_first=5)
    for s in range(2):
        assert ours.generated[s] == ref.generated[s]
        assert rel_err(ours.full_logits(s), ref.full_logits(s)) <= 1e-4
        # the adapter matters: base logits are far from adapted ones
        assert rel_err(base.full_logits(s), ref.full_logits(s)) > 1e-2


def test_mixed_slots_match_each_alone_and_peft(fixture_cache, tmp_path) -> None:
    """One batch mixing two adapters (2D and fused-3D experts, rsLoRA) and the base model."""
    model_dir = fixture_cache.model("qwen3_moe")
    a = build_adapter(model_dir, targets=["attention", "experts", "lm_head"], r=8, seed=1,
                      rank_pattern={"q_proj": 4})
    b = build_adapter(model_dir, targets=["q_proj", "v_proj", "experts.down", "embed_tokens"],
                      r=4, seed=2, use_rslora=True, expert_format="3d")
    model = load_model(model_dir, max_loras=4, max_lora_rank=8)
    model.set_lora_slot(0, shard_adapter(a.modules, model.spec, ParallelInfo(), name="a"))
    model.set_lora_slot(2, shard_adapter(b.modules, model.spec, ParallelInfo(), name="b"))
    assert model.slot_contents()[:3] == [("a", 0), None, ("b", 0)]
    slots = [0, 2, -1, 0]
    mixed = _trace(model, PROMPTS, slots, new_tokens=4, chunk_first=4)

    dirs = {0: save_adapter(tmp_path / "a", a), 2: save_adapter(tmp_path / "b", b), -1: None}
    for s, prompt in enumerate(PROMPTS):
        alone = _trace(model, [prompt], [slots[s]], new_tokens=4)
        assert alone.generated[0] == mixed.generated[s]
        assert rel_err(mixed.full_logits(s), alone.full_logits(0)) <= 1e-5
        ref = oracle_logits(model_dir, dirs[slots[s]], prompt + mixed.generated[s][:-1])
        assert rel_err(mixed.full_logits(s), ref) <= 1e-4, s
        assert mixed.generated[s] == ref[len(prompt) - 1:].argmax(-1).tolist()


def test_groups_an_adapter_lacks_get_no_rows(fixture_cache) -> None:
    model_dir = fixture_cache.model("qwen3_moe")
    model = load_model(model_dir, max_loras=2, max_lora_rank=8)
    attn_only = build_adapter(model_dir, targets=["q_proj", "v_proj"], r=4)
    model.set_lora_slot(1, shard_adapter(attn_only.modules, model.spec, ParallelInfo()))
    assert model.slot_has_group(1, "attn.qkv")
    for group in ("attn.o", "experts", "embed", "lm_head"):
        assert not model.slot_has_group(1, group)
    from model_support import PagedSequences

    from lora_cluster.model.step_context import build_lora_state

    batch = PagedSequences(4, 8).step([(0, [1, 2, 3], 1), (1, [4, 5], -1), (2, [6], 0)])
    metas, expert_slots = build_lora_state(batch, model.slot_groups, model.lora_groups)
    assert metas["attn.qkv"].indices.tolist() == [1, 1, 1, -1, -1, -1]
    assert metas["attn.o"].indices.tolist() == [-1] * 6
    assert expert_slots is not None and expert_slots.tolist() == [-1] * 6
    assert metas["lm_head"].indices.tolist() == [-1, -1, -1]  # one logits row per sequence


def test_clear_and_overwrite_leave_no_trace(fixture_cache) -> None:
    model_dir = fixture_cache.model("qwen3_moe_dense_layers")
    model = load_model(model_dir, max_loras=2, max_lora_rank=8)
    full = build_adapter(model_dir, targets=["all"], r=8, seed=5)
    small = build_adapter(model_dir, targets=["attention"], r=2, seed=6)
    base = _trace(model, PROMPTS[:1], [-1], new_tokens=3)

    model.set_lora_slot(0, shard_adapter(small.modules, model.spec, ParallelInfo()))
    only_small = _trace(model, PROMPTS[:1], [0], new_tokens=3)
    model.set_lora_slot(0, shard_adapter(full.modules, model.spec, ParallelInfo()))
    model.set_lora_slot(0, shard_adapter(small.modules, model.spec, ParallelInfo()))
    again = _trace(model, PROMPTS[:1], [0], new_tokens=3)
    assert torch.equal(again.full_logits(0), only_small.full_logits(0))

    model.clear_lora_slot(0)
    cleared = _trace(model, PROMPTS[:1], [0], new_tokens=3)
    assert torch.equal(cleared.full_logits(0), base.full_logits(0))
    for m in model.modules():
        if isinstance(m, LinearLoRA):
            assert not m.lora_a[:, 0].any() and not m.lora_b[0].any()
        elif isinstance(m, EmbeddingLoRA):
            assert not m.lora_a[0].any() and not m.lora_b[0].any()
        elif isinstance(m, ExpertLoRA):
            rows = slice(0, m.num_local)
            assert not m.a13[:, rows].any() and not m.b13[rows].any()
            assert not m.a2[:, rows].any() and not m.b2[rows].any()
    assert model.slot_contents() == [None, None]


def test_bad_adapters_raise_and_leave_the_slot_intact(fixture_cache) -> None:
    model_dir = fixture_cache.model("qwen3_moe")
    model = load_model(model_dir, max_loras=2, max_lora_rank=4)
    good = shard_adapter(build_adapter(model_dir, targets=["attention"], r=4).modules,
                         model.spec, ParallelInfo(), name="good")
    model.set_lora_slot(0, good)
    before = {k: v.clone() for k, v in model.named_buffers() if "lora" in k}

    fixture = build_adapter(model_dir, targets=["attention", "experts"], r=4, seed=9)
    weights = shard_adapter(fixture.modules, model.spec, ParallelInfo(), name="bad")
    t = weights.modules[(1, "o_proj")]
    weights.modules[(1, "o_proj")] = type(t)(t.a[:, :-1], t.b, t.scaling)
    with pytest.raises(AdapterShapeError, match=r"layer=1, kind='o_proj'"):
        model.set_lora_slot(0, weights)
    e = weights.modules[(0, "experts.up_proj")]
    weights.modules[(1, "o_proj")] = t
    weights.modules[(0, "experts.up_proj")] = type(e)(e.a[:3], e.b[:3], e.scaling)
    with pytest.raises(AdapterShapeError, match=r"experts.up_proj"):
        model.set_lora_slot(0, weights)

    big = shard_adapter(build_adapter(model_dir, targets=["q_proj"], r=6).modules,
                        model.spec, ParallelInfo(), name="big")
    with pytest.raises(AdapterRankError, match="exceeds max_lora_rank=4"):
        model.set_lora_slot(0, big)
    weights.modules[(0, "experts.up_proj")] = e
    weights.modules[(7, "q_proj")] = t
    with pytest.raises(UnsupportedAdapterError, match="layer=7"):
        model.set_lora_slot(0, weights)
    after = {k: v for k, v in model.named_buffers() if "lora" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.slot_contents()[0] == ("good", 0)

    with pytest.raises(ConfigError, match="slot 2"):
        model.set_lora_slot(2, good)
    with pytest.raises(ConfigError, match="max_loras=0"):
        load_model(model_dir).set_lora_slot(0, good)


def test_low_precision_slots_fold_scaling_before_the_cast(fixture_cache) -> None:
    model_dir = fixture_cache.model("llama")
    model = load_model(model_dir, dtype="bfloat16", max_loras=1, max_lora_rank=8)
    fixture = build_adapter(model_dir, targets=["q_proj"], r=4, alpha=3)
    weights = shard_adapter(fixture.modules, model.spec, ParallelInfo())
    model.set_lora_slot(0, weights)
    lora = model.decoder_layers()[0].self_attn.qkv.lora
    assert lora is not None and lora.lora_b.dtype == torch.bfloat16
    t = weights.modules[(0, "q_proj")]
    expected = (t.b.float() * t.scaling).to(torch.bfloat16)
    q = model.spec.q_size
    assert torch.equal(lora.lora_b[0, :q, :4], expected)
    assert not lora.lora_b[0, :q, 4:].any() and not lora.lora_b[0, q:].any()
    assert torch.equal(lora.lora_a[0, 0, :4], t.a.to(torch.bfloat16))
