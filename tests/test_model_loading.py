"""Loading: spec parsing per family, fused on-disk experts, and typed errors naming file/key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from model_support import rel_err, run_prompts
from safetensors.torch import load_file, save_file

from lora_cluster.errors import ConfigError, ModelLoadError
from lora_cluster.model.loader import load_model
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.spec import load_model_spec, spec_from_hf_config

PROMPT = [5, 17, 33, 9, 100, 250, 7, 8]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _logits(model_dir: Path) -> torch.Tensor:
    model = load_model(model_dir)
    cache = model.make_kv_cache(num_blocks=32, block_size=4)
    return run_prompts(lambda b: model(b, cache), [PROMPT], [-1], new_tokens=2).full_logits(0)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_expert_layout_on_disk(fixture_cache, tmp_path, family) -> None:
    """``mlp.experts.gate_up_proj [E, 2I, H]`` + ``down_proj [E, H, I]`` load like per-expert keys."""
    src = fixture_cache.model(family)
    spec = load_model_spec(src)
    tensors = load_file(str(src / "model.safetensors"))
    gate, up, down = ("w1", "w3", "w2") if family == "mixtral" else (
        "gate_proj", "up_proj", "down_proj")
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}.{block}.experts"
        pick = [[tensors.pop(f"{p}.{e}.{w}.weight") for e in range(spec.num_experts)]
                for w in (gate, up, down)]
        fused = f"model.layers.{layer}.mlp.experts"
        tensors[f"{fused}.gate_up_proj"] = torch.stack(
            [torch.cat([g, u]) for g, u in zip(pick[0], pick[1])])
        tensors[f"{fused}.down_proj"] = torch.stack(pick[2])
    dst = tmp_path / "fused"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(tensors, str(dst / "model.safetensors"))
    assert rel_err(_logits(dst), _logits(src)) == 0.0
    ep_rank1 = load_model(dst, parallel=ParallelInfo(ep_rank=1, ep_size=2, tp_rank=1, tp_size=2))
    moe = ep_rank1.decoder_layers()[0].moe
    assert moe is not None and moe.experts == (4, 5, 6, 7)
    i = spec.moe_intermediate_size if family != "mixtral" else spec.intermediate_size
    half = slice(i // 2, i)
    full = tensors["model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(moe.w13[0], torch.cat([full[4, half], full[4, i:][half]]))


def _write(model_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(model_dir / "model.safetensors"))


def test_missing_and_misshaped_tensors_name_file_and_key(fixture_cache, tmp_path) -> None:
    src = fixture_cache.model("qwen2_moe")
    d = _copy(src, tmp_path / "missing")
    tensors = load_file(str(d / "model.safetensors"))
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    del tensors[key]
    _write(d, tensors)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: missing tensor .*experts\.3"):
        load_model(d)
    # an EP rank that does not own expert 3 never asks for it
    load_model(d, parallel=ParallelInfo(ep_rank=1, ep_size=2))

    d = _copy(src, tmp_path / "shape")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(5)
    _write(d, tensors)
    with pytest.raises(ModelLoadError, match=r"k_proj\.bias.*shape \[5\], expected \[64\]") as err:
        load_model(d)
    assert err.value.details["key"] == "model.layers.0.self_attn.k_proj.bias"
    assert err.value.details["file"].endswith("model.safetensors")


def test_broken_files_raise_model_load_error(fixture_cache, tmp_path) -> None:
    src = fixture_cache.model("llama", sharded=2)
    d = _copy(src, tmp_path / "lost_shard")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (d / shard).unlink()
    with pytest.raises(ModelLoadError, match=f"{shard}: missing checkpoint shard"):
        load_model(d)

    d = _copy(src, tmp_path / "corrupt")
    (d / shard).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match=f"{shard}: corrupt safetensors"):
        load_model(d)

    d = _copy(src, tmp_path / "no_weights")
    for f in d.glob("model*.safetensors*"):
        f.unlink()
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        load_model(d)
    with pytest.raises(ModelLoadError, match=r"config\.json: not found"):
        load_model(tmp_path / "nowhere")


BASE = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
        "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 256}


@pytest.mark.parametrize(("extra", "match"), [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "qwen3", "use_sliding_window": True}, "sliding-window"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "rope type 'dynamic' is not supported"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "longrope"}}, "'longrope'"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}}, "needs rope_parameters.factor"),
    ({"model_type": "llama", "partial_rotary_factor": 0.5,
      "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "partial_rotary_factor"),
    ({"model_type": "qwen3_moe", "moe_intermediate_size": 8}, "'num_experts'"),
])
def test_unsupported_configs_are_refused(extra, match) -> None:
    with pytest.raises(ModelLoadError, match=match):
        spec_from_hf_config({**BASE, **extra})


def test_family_specific_config_semantics() -> None:
    qwen2_moe = spec_from_hf_config({**BASE, "model_type": "qwen2_moe", "num_experts": 4,
                                     "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                                     "qkv_bias": False})
    assert not qwen2_moe.qkv_bias and not qwen2_moe.o_bias
    llama = spec_from_hf_config({**BASE, "model_type": "llama", "attention_bias": True,
                                 "mlp_bias": True})
    assert llama.qkv_bias and llama.o_bias and llama.mlp_bias
    assert spec_from_hf_config({**BASE, "model_type": "mistral"}).sliding_window == 4096
    assert spec_from_hf_config({**BASE, "model_type": "mistral",
                                "sliding_window": None}).sliding_window is None
    mixtral = spec_from_hf_config({**BASE, "model_type": "mixtral", "num_local_experts": 4,
                                   "num_experts_per_tok": 2})
    assert mixtral.rope.theta == 1e6 and mixtral.norm_topk_prob and mixtral.sliding_window is None
    qwen3 = spec_from_hf_config({**BASE, "model_type": "qwen3"})
    assert qwen3.head_dim == 128 and qwen3.rope.theta == 10_000.0  # transformers' defaults
    q3moe = spec_from_hf_config({**BASE, "model_type": "qwen3_moe", "num_local_experts": 8,
                                 "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                                 "mlp_only_layers": [0]})
    assert q3moe.num_experts == 8 and q3moe.sparse_layers == (False,)


def test_mesh_that_does_not_divide_the_model_is_refused(fixture_cache) -> None:
    model_dir = fixture_cache.model("qwen3_moe")  # 8 heads, 4 KV heads, 8 experts
    with pytest.raises(ConfigError, match="num_attention_heads"):
        load_model(model_dir, parallel=ParallelInfo(tp_rank=0, tp_size=3))
    with pytest.raises(ConfigError, match="ep_size: 3"):
        load_model(model_dir, parallel=ParallelInfo(ep_rank=0, ep_size=3))
