"""Paged KV cache and attention paths: sizing, sink writes, decode == general, padding, window."""

from __future__ import annotations

import pytest
import torch
from model_support import PagedSequences, make_checkpoint, rel_err, run_prompts

from lora_cluster.errors import CapacityError, ConfigError
from lora_cluster.model.kv_cache import (
    KVCache,
    kv_block_bytes,
    kv_budget_bytes,
    num_blocks_for_budget,
)
from lora_cluster.model.loader import load_model
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.spec import load_model_spec


def test_budget_sizing(fixture_cache) -> None:
    spec = load_model_spec(fixture_cache.model("qwen3_moe"))  # 2 layers, 4 KV heads of 16
    per_block = kv_block_bytes(spec, ParallelInfo(), block_size=16, dtype=torch.bfloat16)
    assert per_block == 2 * 2 * 4 * 16 * 2 * 16
    tp2 = kv_block_bytes(spec, ParallelInfo(tp_rank=1, tp_size=2), block_size=16,
                         dtype=torch.bfloat16)
    assert tp2 == per_block // 2
    blocks = num_blocks_for_budget(spec, ParallelInfo(), block_size=16, dtype=torch.bfloat16,
                                   budget_bytes=10 * per_block + 5)
    assert blocks == 9  # one block pays for the padding-row sink
    cache = KVCache.for_model(spec, ParallelInfo(), num_blocks=blocks, block_size=16,
                              dtype=torch.bfloat16, device="cpu")
    assert cache.nbytes == (blocks + 1) * per_block <= 10 * per_block + 5
    with pytest.raises(CapacityError, match="holds no block"):
        num_blocks_for_budget(spec, ParallelInfo(), block_size=16, dtype=torch.float32,
                              budget_bytes=per_block)
    assert kv_budget_bytes("cpu", budget_bytes=1234) == 1234
    assert 0 < kv_budget_bytes("cpu", fraction=0.01) < kv_budget_bytes("cpu", fraction=0.5)
    with pytest.raises(ConfigError, match="kv_cache_fraction"):
        kv_budget_bytes("cpu", fraction=1.5)


def test_writes_land_at_their_slots_and_padding_goes_to_the_sink() -> None:
    cache = KVCache(num_layers=1, num_blocks=3, block_size=2, num_kv_heads=1, head_dim=2,
                    dtype=torch.float32, device="cpu")
    k = torch.arange(8, dtype=torch.float32).view(4, 1, 2) + 1
    cache.write(0, k, -k, torch.tensor([5, -1, 0, -1]))
    keys, values = cache.layer(0)
    flat = keys.view(-1, 1, 2)
    assert torch.equal(flat[5], k[0]) and torch.equal(flat[0], k[2])
    assert torch.equal(values.view(-1, 1, 2)[5], -k[0])
    untouched = [i for i in range(6) if i not in (0, 5)]
    assert not flat[untouched].any()  # usable blocks hold only what was written


def test_decode_path_equals_general_path_with_padding(fixture_cache) -> None:
    model = load_model(fixture_cache.model("qwen2_moe"), max_loras=1, max_lora_rank=4)
    prompts = [[5, 17, 33, 9, 100], [44, 20], [7, 7, 150, 3, 81, 19, 4, 4, 2]]
    outs = {}
    for decode in (True, False):
        cache = model.make_kv_cache(num_blocks=40, block_size=4)
        paged = PagedSequences(4, 40)
        model(paged.step([(s, p, -1) for s, p in enumerate(prompts)]), cache)
        batch = paged.step([(s, [s + 1], -1) for s in range(3)], decode=decode, max_blocks=6)
        outs[decode] = model(batch, cache)
    assert rel_err(outs[True], outs[False]) <= 1e-6

    # A CUDA-graph bucket pads the decode batch with dummy sequences (context 1, block 0,
    # nothing written): real rows are unchanged and nothing turns NaN.
    cache = model.make_kv_cache(num_blocks=40, block_size=4)
    paged = PagedSequences(4, 40)
    model(paged.step([(s, p, -1) for s, p in enumerate(prompts)]), cache)
    real = paged.step([(s, [s + 1], -1) for s in range(3)], decode=True, max_blocks=6)
    pad = 2
    padded = type(real)(
        input_ids=torch.cat([real.input_ids, torch.zeros(pad, dtype=torch.long)]),
        positions=torch.cat([real.positions, torch.zeros(pad, dtype=torch.long)]),
        token_slots=torch.cat([real.token_slots, torch.full((pad,), -1, dtype=torch.int32)]),
        query_start_loc=torch.arange(3 + pad + 1, dtype=torch.int32),
        context_lens=torch.cat([real.context_lens, torch.tensor([1, 0], dtype=torch.int32)]),
        block_tables=torch.cat([real.block_tables, torch.zeros(pad, 6, dtype=torch.int32)]),
        kv_slot_mapping=torch.cat([real.kv_slot_mapping, torch.full((pad,), -1)]),
        logits_rows=torch.arange(3 + pad),
        is_decode=True, max_context_len=real.max_context_len)
    out = model(padded, cache)
    assert torch.isfinite(out).all()
    assert rel_err(out[:3], outs[True]) <= 1e-6


def test_general_step_tolerates_padding_rows(fixture_cache) -> None:
    model = load_model(fixture_cache.model("llama"))
    prompt = [5, 17, 33, 9, 100, 12]
    cache = model.make_kv_cache(num_blocks=16, block_size=4)
    plain = model(PagedSequences(4, 16).step([(0, prompt, -1)], all_logits=True), cache)
    cache = model.make_kv_cache(num_blocks=16, block_size=4)
    padded = model(PagedSequences(4, 16).step([(0, prompt, -1)], all_logits=True, pad_rows=3),
                   cache)
    assert rel_err(padded, plain) <= 1e-6  # GEMM blocking may differ with more rows


@pytest.mark.parametrize("window", [3, 6])
def test_sliding_window_matches_transformers(tmp_path, window) -> None:
    """Mistral with a window shorter than the sequence (keys older than it are masked)."""
    hf = make_checkpoint(tmp_path / "mistral", "mistral", sliding_window=window)
    hf.config._attn_implementation = "eager"
    model = load_model(tmp_path / "mistral")
    assert model.spec.sliding_window == window
    prompt = [(5 * i + 1) % 90 for i in range(14)]
    cache = model.make_kv_cache(num_blocks=32, block_size=4)
    trace = run_prompts(lambda b: model(b, cache), [prompt], [-1], new_tokens=4, chunk_first=5)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + trace.generated[0][:-1]])).logits[0]
    assert rel_err(trace.full_logits(0), ref) <= 1e-4
    assert trace.generated[0] == ref[len(prompt) - 1:].argmax(-1).tolist()
