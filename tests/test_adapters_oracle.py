"""Canonical adapter tensors reproduce PEFT's merged weights, for every format variant.

For each adapter, ``W + scaling · b @ a`` per module (per expert; embeddings transposed) must
equal the weights of ``PeftModel.merge_and_unload()`` on the transformers model, and every
weight PEFT changes must be covered by a loaded module.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from oracle import oracle_model

from lora_cluster.adapters import AdapterWeights, load_adapter
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.spec import ModelSpec, load_model_spec

VARIANTS = {
    "attention": ("qwen3_moe", {"targets": ["attention"]}),
    "dense_mlp": ("llama", {"targets": ["mlp"]}),
    "dense_layers_of_moe": ("qwen3_moe_dense_layers", {"targets": ["mlp", "experts"],
                                                       "expert_format": "3d"}),
    "experts_2d": ("qwen3_moe", {"targets": ["experts"], "expert_format": "2d"}),
    "experts_3d": ("qwen3_moe", {"targets": ["attention", "experts"], "expert_format": "3d"}),
    "experts_3d_down_only": ("qwen3_moe", {"targets": ["experts.down"], "expert_format": "3d"}),
    "experts_3d_gate_up_only": ("qwen3_moe", {"targets": ["experts.gate_up"],
                                              "expert_format": "3d"}),
    "shared_expert_2d": ("qwen2_moe", {"targets": ["shared_expert", "experts"],
                                       "expert_format": "2d"}),
    "shared_expert_3d": ("qwen2_moe", {"targets": ["shared_expert", "experts"],
                                       "expert_format": "3d"}),
    "mixtral_2d": ("mixtral", {"targets": ["attention", "experts"], "expert_format": "2d"}),
    "mixtral_3d": ("mixtral", {"targets": ["experts"], "expert_format": "3d"}),
    "embed_lm_head": ("qwen3", {"targets": ["embed_tokens", "lm_head"]}),
    "rslora": ("qwen3_moe", {"targets": ["all"], "use_rslora": True, "r": 4, "alpha": 8,
                             "expert_format": "3d"}),
    "patterns_2d": ("qwen3_moe", {
        "targets": ["all"], "r": 4, "alpha": 8, "expert_format": "2d",
        # an index-dependent pattern: experts 0-3 get rank 6 (mixed ranks inside one layer)
        "rank_pattern": {"q_proj": 2, r"experts\.[0-3]\.up_proj": 6, "lm_head": 3},
        "alpha_pattern": {"down_proj": 5, r"layers\.1\.self_attn\.v_proj": 11}}),
    "patterns_3d": ("qwen3_moe", {
        "targets": ["all"], "r": 4, "alpha": 8, "expert_format": "3d", "use_rslora": True,
        "rank_pattern": {r"experts\.gate_up_proj": 2, r"layers\.0\.mlp\.experts\.down_proj": 6},
        "alpha_pattern": {"o_proj": 3}}),
}


def _param(spec: ModelSpec, layer: int | None, kind: str) -> tuple[str, slice | None]:
    """HF (transformers 5, in memory) parameter of a canonical module, and its expert rows."""
    if layer is None:
        return ("model.embed_tokens.weight" if kind == "embed_tokens" else "lm_head.weight"), None
    p = f"model.layers.{layer}"
    if kind in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return f"{p}.self_attn.{kind}.weight", None
    if kind.startswith("experts."):
        i = spec.moe_intermediate_size
        rows = {"experts.gate_proj": slice(0, i), "experts.up_proj": slice(i, 2 * i)}
        name = "down_proj" if kind == "experts.down_proj" else "gate_up_proj"
        return f"{p}.mlp.experts.{name}", rows.get(kind)
    return f"{p}.mlp.{kind}.weight", None


def _our_deltas(spec: ModelSpec, weights: AdapterWeights) -> dict[str, torch.Tensor]:
    """param name → [*, out, in] delta from our canonical tensors (experts stacked)."""
    parts: dict[str, list[tuple[slice | None, torch.Tensor]]] = {}
    for (layer, kind), t in weights.modules.items():
        name, rows = _param(spec, layer, kind)
        delta = t.scaling * (t.b.float() @ t.a.float())
        if kind == "embed_tokens":
            delta = delta.T
        parts.setdefault(name, []).append((rows, delta))
    out = {}
    for name, pieces in parts.items():
        if pieces[0][0] is None:
            out[name] = pieces[0][1]
        else:  # gate rows then up rows of the fused gate_up parameter
            out[name] = torch.cat([d for _, d in sorted(pieces, key=lambda p: p[0].start)], dim=1)
    return out


def _peft_deltas(model_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    merged = copy.deepcopy(oracle_model(model_dir, adapter_dir)).merge_and_unload().state_dict()
    base = oracle_model(model_dir, None).state_dict()
    return {k: merged[k] - base[k] for k in base if not torch.equal(merged[k], base[k])}


def _compare(spec: ModelSpec, weights: AdapterWeights, peft: dict[str, torch.Tensor]) -> None:
    ours = _our_deltas(spec, weights)
    assert peft, "the adapter changes nothing under PEFT: the comparison would be vacuous"
    assert set(peft) <= set(ours), f"PEFT changes weights we did not load: {set(peft) - set(ours)}"
    for name, delta in ours.items():
        want = peft.get(name, torch.zeros_like(delta))
        torch.testing.assert_close(delta, want.reshape(delta.shape), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_canonical_tensors_match_peft_merge(variant: str, fixture_cache, tmp_path: Path) -> None:
    family, options = VARIANTS[variant]
    model_dir = fixture_cache.model(family)
    adapter_dir = fixture_cache.adapter(model_dir, name=variant, seed=3, **options)
    spec = load_model_spec(model_dir)
    loaded = load_adapter(adapter_dir, spec, ParallelInfo(), name=variant, max_lora_rank=16)
    _compare(spec, loaded.weights, _peft_deltas(model_dir, adapter_dir))
    assert loaded.weights.rank == max(t.ranks.rank for t in loaded.plan.targets)
    if variant == "patterns_2d":  # the patterns really produced mixed ranks and scalings
        by_kind = {t.kind: t.ranks for t in loaded.plan.targets}
        assert by_kind["q_proj"].rank == 2 and by_kind["lm_head"].rank == 3
        up = by_kind["experts.up_proj"]
        assert up.per_index is not None and {r for r, _ in up.per_index.values()} == {4, 6}


def _randomize_lora(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_adapter_saved_by_peft_itself(tmp_path: Path) -> None:
    """An adapter written by PEFT's own save_pretrained (fused experts, embeddings, lm_head,
    a pattern, a non-default adapter name → subfolder layout) loads to PEFT's merge."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                         moe_intermediate_size=12, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=64)
    model = Qwen3MoeForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "embed_tokens",
                                                         "lm_head"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                      rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3})
    peft_model = get_peft_model(model, lora, adapter_name="custom")
    _randomize_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "custom" / "adapter_config.json").is_file()
    merged = peft_model.merge_and_unload().state_dict()
    peft = {k: merged[k] - base[k] for k in base if not torch.equal(merged[k], base[k])}

    spec = load_model_spec(tmp_path / "base")
    loaded = load_adapter(tmp_path / "adapter", spec, ParallelInfo(), name="custom",
                          max_lora_rank=8)
    assert json.loads((tmp_path / "adapter" / "custom" / "adapter_config.json").read_text())[
        "target_parameters"]
    assert {k for _, k in loaded.weights.modules} == {
        "q_proj", "o_proj", "embed_tokens", "lm_head", "experts.gate_proj", "experts.up_proj",
        "experts.down_proj"}
    _compare(spec, loaded.weights, peft)
    ranks = {t.kind: t.ranks.rank for t in loaded.plan.targets}
    assert ranks["experts.down_proj"] == 2 and ranks["experts.gate_proj"] == 4
