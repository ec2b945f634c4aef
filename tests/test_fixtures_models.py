"""Tiny checkpoints are real: transformers loads them with exactly the weights written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from oracle import oracle_greedy, oracle_logits, oracle_model
from safetensors import safe_open

from lora_cluster.testing import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    PRESETS,
    UNK_ID,
    build_tokenizer,
    get_spec,
    model_state_dict,
    write_tiny_model,
)
from lora_cluster.testing.cache import FixtureCache

LAYOUTS = [(name, sharded, style) for name in PRESETS
           for sharded, style in ((False, "v5"), (True, "v4"))]
LAYOUTS += [("qwen3_moe", True, "v5"), ("mixtral", False, "v4")]


def _expected_in_memory(preset: str) -> dict[str, torch.Tensor]:
    """What transformers 5.24 holds after its load-time conversion: experts fused 3D."""
    spec = get_spec(preset)
    sd = {k.replace(".block_sparse_moe.", ".mlp."): v
          for k, v in model_state_dict(spec).items()}
    out = {k: v for k, v in sd.items() if ".experts." not in k}
    gate, up, down = spec.expert_proj_names
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}.mlp.experts"
        if spec.is_sparse(layer):
            es = range(spec.num_experts)
            out[f"{p}.gate_up_proj"] = torch.stack(
                [torch.cat([sd[f"{p}.{e}.{gate}.weight"], sd[f"{p}.{e}.{up}.weight"]]) for e in es])
            out[f"{p}.down_proj"] = torch.stack([sd[f"{p}.{e}.{down}.weight"] for e in es])
    return out


@pytest.mark.parametrize(("preset", "sharded", "style"), LAYOUTS)
def test_checkpoint_loads_with_written_weights(fixture_cache: FixtureCache, preset: str,
                                               sharded: bool, style: str) -> None:
    model_dir = fixture_cache.model(preset, sharded=sharded, config_style=style)
    model = oracle_model(model_dir)
    loaded = model.state_dict()
    expected = _expected_in_memory(preset)
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    spec = get_spec(preset)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.vocab_size) == (
        spec.hidden_size, spec.num_layers, spec.head_dim, spec.vocab_size)
    assert cfg.rope_parameters["rope_theta"] == spec.rope_theta
    if spec.rope_scaling:
        assert cfg.rope_parameters["rope_type"] == spec.rope_scaling["rope_type"]
        assert cfg.rope_parameters["factor"] == spec.rope_scaling["factor"]
    if spec.is_moe:
        assert cfg.num_experts_per_tok == spec.num_experts_per_tok


def test_sharded_index_is_complete_and_spreads_experts(fixture_cache: FixtureCache) -> None:
    model_dir = fixture_cache.model("qwen3_moe", sharded=True)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert not (model_dir / "model.safetensors").exists()
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    seen, nbytes, nparams = {}, 0, 0
    for fname in files:
        with safe_open(str(model_dir / fname), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = f.get_tensor(key)
                seen[key] = fname
                nbytes += t.numel() * t.element_size()
                nparams += t.numel()
    assert seen == index["weight_map"]
    assert index["metadata"] == {"total_size": nbytes, "total_parameters": nparams}
    # a layer's experts straddle shards, so selective readers must follow the index
    layer_files = {f for k, f in seen.items() if k.startswith("model.layers.0.mlp.experts.")}
    assert len(layer_files) >= 2


def test_config_styles_differ_as_transformers_writes_them(fixture_cache: FixtureCache) -> None:
    v5 = json.loads((fixture_cache.model("qwen3_moe") / "config.json").read_text())
    v4 = json.loads((fixture_cache.model("qwen3_moe", sharded=True, config_style="v4")
                     / "config.json").read_text())
    assert v5["rope_parameters"] == {"rope_theta": 1_000_000.0, "rope_type": "default"}
    assert v5["num_local_experts"] == 8 and "num_experts" not in v5 and v5["dtype"] == "float32"
    assert v4["rope_theta"] == 1_000_000.0 and v4["rope_scaling"] is None
    assert v4["num_experts"] == 8 and v4["torch_dtype"] == "float32"
    llama3 = json.loads((fixture_cache.model("llama3") / "config.json").read_text())
    assert llama3["rope_parameters"]["rope_type"] == "llama3"
    assert llama3["rope_parameters"]["original_max_position_embeddings"] == 32
    gen = json.loads((fixture_cache.model("qwen3_moe") / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (BOS_ID, EOS_ID, PAD_ID)


def test_bfloat16_checkpoint(tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "m", "mixtral", dtype="bfloat16", tokenizer=False)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        t = f.get_tensor("model.layers.0.block_sparse_moe.experts.3.w2.weight")
    ref = model_state_dict(get_spec("mixtral"))["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    assert t.dtype == torch.bfloat16 and torch.equal(t, ref.to(torch.bfloat16))
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (model_dir / "tokenizer.json").exists()


def test_writer_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a", "qwen2_moe", seed=3)
    b = write_tiny_model(tmp_path / "b", "qwen2_moe", seed=3)
    c = write_tiny_model(tmp_path / "c", "qwen2_moe", seed=4)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    # families never share weights, even where tensor names coincide
    emb = "model.embed_tokens.weight"
    assert not torch.equal(model_state_dict(get_spec("qwen3"))[emb],
                           model_state_dict(get_spec("qwen3_moe"))[emb])


@pytest.mark.parametrize("preset", ["qwen3_moe_dense_layers", "qwen2_moe", "mixtral"])
def test_spec_module_shapes_match_transformers(fixture_cache: FixtureCache, preset: str) -> None:
    spec = get_spec(preset)
    model = oracle_model(fixture_cache.model(preset))
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for path, (in_f, out_f) in spec.module_shapes().items():
        if ".experts." in path:
            layer = path.split(".")[2]
            fused = params[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
            i = spec.expert_intermediate_size
            assert fused.shape == (spec.num_experts, 2 * i, spec.hidden_size)
            continue
        weight = modules[path].weight
        assert tuple(weight.shape) == ((in_f, out_f) if path == "model.embed_tokens" else (out_f, in_f))


def test_tokenizer_round_trips_in_both_libraries(qwen3_moe_dir: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    fast = Tokenizer.from_file(str(qwen3_moe_dir / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(qwen3_moe_dir)
    vocab = json.loads((qwen3_moe_dir / "config.json").read_text())["vocab_size"]
    assert fast.get_vocab_size() == len(auto) == vocab
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id, auto.unk_token_id) == (
        PAD_ID, BOS_ID, EOS_ID, UNK_ID)
    for text in ["Hello world!", "SELECT * FROM t;", "  spaces\tand\nnewlines ",
                 "café 東京 🙂 — unseen: zqxjk", ""]:
        ids = fast.encode(text).ids
        assert ids == auto(text, add_special_tokens=True)["input_ids"]
        assert fast.decode(ids) == text == auto.decode(ids)
        assert all(0 <= i < vocab for i in ids)
    assert all(fast.id_to_token(i) is not None for i in range(vocab))
    assert build_tokenizer(vocab).to_str() == fast.to_str()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_greedy_decoding_is_decisive(fixture_cache: FixtureCache, preset: str) -> None:
    """Top-1 logits stand clear of the runner-up along greedy paths (no float32 near-ties)."""
    model_dir = fixture_cache.model(preset)
    for prompt in ([BOS_ID, 40, 41, 42], [7, 300, 12, 99, 250, 18]):
        new = oracle_greedy(model_dir, None, prompt, 12)
        logits = oracle_logits(model_dir, None, prompt + new)[len(prompt) - 1:-1]
        top2 = logits.topk(2, dim=-1)
        assert top2.indices[:, 0].tolist() == new
        gap = (top2.values[:, 0] - top2.values[:, 1]) / logits.std()
        assert gap.min() > 1e-4, (preset, prompt, gap.min())


def test_tied_embeddings_checkpoint(fixture_cache: FixtureCache) -> None:
    model_dir = fixture_cache.model("qwen3", tie_word_embeddings=True)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    model = oracle_model(model_dir)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
