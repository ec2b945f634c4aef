"""RoPE schedules equal transformers' for the same ``config.json``; end to end with yarn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_support import rel_err, run_prompts
from oracle import oracle_logits

from lora_cluster.model.loader import load_model
from lora_cluster.model.rope import RotaryEmbedding, apply_rotary, inverse_frequencies
from lora_cluster.model.spec import load_model_spec

BASE = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 64,
        "max_position_embeddings": 4096}

CASES = [
    {},
    {"rope_theta": 123.0},
    {"rope_scaling": {"rope_type": "linear", "factor": 3.0}},
    {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 5e5},
    {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
                         "rope_theta": 5e5}},
    {"rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
                      "high_freq_factor": 8.0}},  # original length defaults to max positions
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 8.0}, "original_max_position_embeddings": 300},
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16, "beta_slow": 2,
                      "mscale": 0.7, "mscale_all_dim": 0.5, "truncate": False}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.3}},
    {"model_type": "qwen3", "head_dim": 16, "rope_parameters": {"rope_type": "yarn",
                                                                "factor": 4.0,
                                                                "rope_theta": 1e6}},
]


def _hf_rope(model_dir: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    rotary = AutoModelForCausalLM.from_config(config).model.rotary_emb
    return rotary


@pytest.mark.parametrize("case", CASES, ids=lambda c: json.dumps(c)[:60])
def test_schedule_matches_transformers(tmp_path, case) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **case}))
    spec = load_model_spec(tmp_path)
    hf = _hf_rope(tmp_path)
    inv_freq, scaling = inverse_frequencies(spec.rope, spec.head_dim)
    torch.testing.assert_close(inv_freq, hf.inv_freq.float(), rtol=1e-6, atol=0)
    assert scaling == pytest.approx(hf.attention_scaling, rel=1e-12)

    positions = torch.tensor([0, 1, 7, 300, 4095])
    ours = RotaryEmbedding(spec.rope, spec.head_dim, torch.device("cpu"))
    cos, sin = ours.cos_sin(positions, torch.float32)
    x = torch.zeros(1, 1, spec.head_dim)
    ref_cos, ref_sin = hf(x, positions[None])
    torch.testing.assert_close(cos, ref_cos[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin[0], rtol=1e-6, atol=1e-6)


def test_apply_rotary_is_rotate_half() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(5, 3, 8), torch.randn(5, 2, 8)
    ang = torch.randn(5, 4)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                        cos[None], sin[None])
    torch.testing.assert_close(apply_rotary(q, cos, sin), ref_q[0].transpose(0, 1))
    torch.testing.assert_close(apply_rotary(k, cos, sin), ref_k[0].transpose(0, 1))


@pytest.mark.parametrize("family", ["qwen3_moe", "llama"])
def test_yarn_model_matches_transformers(fixture_cache, family) -> None:
    model_dir = fixture_cache.model(family, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    model = load_model(model_dir)
    assert model.spec.rope.rope_type == "yarn" and model.rotary.attention_scaling > 1
    prompt = [(7 * i + 3) % 300 for i in range(40)]  # past the original context of 16
    cache = model.make_kv_cache(num_blocks=32, block_size=4)
    trace = run_prompts(lambda b: model(b, cache), [prompt], [-1], new_tokens=3)
    ref = oracle_logits(model_dir, None, prompt + trace.generated[0][:-1])
    assert rel_err(trace.full_logits(0), ref) <= 1e-4
    assert trace.generated[0] == ref[len(prompt) - 1:].argmax(-1).tolist()
