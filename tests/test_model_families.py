"""Every family's base model equals transformers: prefill, chunked prefill, mixed and decode steps.

Float32 on CPU: logits within 1e-4 relative in norm per sequence, greedy tokens identical.
"""

from __future__ import annotations

import pytest
import torch
from model_support import rel_err, run_prompts
from oracle import oracle_logits

from lora_cluster.model.loader import load_model

FAMILIES = ["qwen3_moe", "qwen3_moe_dense_layers", "mixtral", "qwen2_moe", "llama", "llama3",
            "qwen3"]
PROMPTS = [[5, 17, 33, 9, 100, 250, 7, 8, 61, 12, 300], [44, 20, 91], [7, 7, 150, 3, 81, 19]]


def check_against_oracle(model_dir, trace, prompts, adapters=None) -> None:
    for s, prompt in enumerate(prompts):
        ids = list(prompt) + trace.generated[s][:-1]
        ref = oracle_logits(model_dir, adapters[s] if adapters else None, ids)
        ours = trace.full_logits(s)
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) <= 1e-4, (s, rel_err(ours, ref))
        # greedy: every token we generated is the oracle's argmax at that position
        assert trace.generated[s] == ref[len(prompt) - 1:].argmax(-1).tolist(), s


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers(fixture_cache, family) -> None:
    model_dir = fixture_cache.model(family)
    model = load_model(model_dir, dtype="float32")
    cache = model.make_kv_cache(num_blocks=128, block_size=4)
    trace = run_prompts(lambda b: model(b, cache), PROMPTS, [-1, -1, -1], new_tokens=5,
                        chunk_first=4)
    check_against_oracle(model_dir, trace, PROMPTS)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_v4_config_and_sharded_checkpoint(fixture_cache, family) -> None:
    model_dir = fixture_cache.model(family, sharded=3, config_style="v4")
    model = load_model(model_dir)
    cache = model.make_kv_cache(num_blocks=128, block_size=8)
    trace = run_prompts(lambda b: model(b, cache), PROMPTS[:2], [-1, -1], new_tokens=3,
                        block_size=8)
    check_against_oracle(model_dir, trace, PROMPTS[:2])


def test_block_size_and_batching_do_not_change_results(fixture_cache) -> None:
    model_dir = fixture_cache.model("qwen3_moe")
    model = load_model(model_dir)
    cache = model.make_kv_cache(num_blocks=128, block_size=2)
    together = run_prompts(lambda b: model(b, cache), PROMPTS, [-1] * 3, new_tokens=4,
                           block_size=2)
    for s, prompt in enumerate(PROMPTS):
        alone_cache = model.make_kv_cache(num_blocks=64, block_size=16)
        alone = run_prompts(lambda b, c=alone_cache: model(b, c), [prompt], [-1],
                            new_tokens=4, block_size=16, num_blocks=64)
        assert alone.generated[0] == together.generated[s]
        assert rel_err(together.full_logits(s), alone.full_logits(0)) <= 1e-5


def test_tied_embeddings_match_transformers(fixture_cache) -> None:
    model_dir = fixture_cache.model("qwen3", tie_word_embeddings=True)
    model = load_model(model_dir)
    assert model.lm_head.tied and model.lm_head.weight is model.embed_tokens.weight
    cache = model.make_kv_cache(num_blocks=64, block_size=4)
    trace = run_prompts(lambda b: model(b, cache), PROMPTS[:1], [-1], new_tokens=3)
    check_against_oracle(model_dir, trace, PROMPTS[:1])


def test_logits_are_float32_over_full_vocab(fixture_cache) -> None:
    model_dir = fixture_cache.model("mixtral")
    model = load_model(model_dir, dtype=torch.float32)
    cache = model.make_kv_cache(num_blocks=16, block_size=4)
    trace = run_prompts(lambda b: model(b, cache), PROMPTS[1:2], [-1], new_tokens=1)
    row = trace.logits[0][0]
    assert row.dtype == torch.float32 and row.shape == (model.spec.vocab_size,)
