"""Tiny PEFT adapters are real: PEFT loads them with the weights meant, in both expert formats."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_cluster.testing import AdapterFixture, build_adapter, pack_fused, unpack_fused
from lora_cluster.testing.cache import FixtureCache

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*pattern keys did not match:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

# (preset, build_adapter options) that PEFT 0.21.2 + transformers 5.24 load natively.
NATIVE = {
    "llama-attention": ("llama", {"targets": ["attention"]}),
    "llama-all-bin": ("llama", {"targets": ["all"], "r": 4, "alpha": 4, "weights_format": "bin"}),
    "llama3-mlp-rslora": ("llama3", {"targets": ["mlp"], "use_rslora": True, "r": 16}),
    "qwen3-patterns": ("qwen3", {"targets": ["all"], "rank_pattern": {
        "q_proj": 4, "model.layers.1.mlp.down_proj": 2}, "alpha_pattern": {"o_proj": 3}}),
    "qwen3_moe-experts-2d": ("qwen3_moe", {"targets": ["experts"], "expert_format": "2d"}),
    "qwen3_moe-all-3d-rslora": ("qwen3_moe", {
        "targets": ["all"], "expert_format": "3d", "use_rslora": True,
        "rank_pattern": {"model.layers.1.mlp.experts.down_proj": 4, "q_proj": 2}}),
    "qwen3_moe-down-3d": ("qwen3_moe", {"targets": ["experts.down"], "expert_format": "3d"}),
    "qwen3_moe-gate-up-3d-bf16": ("qwen3_moe", {"targets": ["experts.gate_up"],
                                                "expert_format": "3d", "dtype": "bfloat16"}),
    "mixtral-experts-2d": ("mixtral", {"targets": ["attention", "experts"], "expert_format": "2d"}),
    "mixtral-all-3d": ("mixtral", {"targets": ["all"], "expert_format": "3d"}),
    "qwen2_moe-shared-2d": ("qwen2_moe", {"targets": ["attention", "shared_expert"]}),
    "qwen2_moe-all-3d": ("qwen2_moe", {"targets": ["all"], "expert_format": "3d", "r": 4}),
}
# Adapters PEFT cannot load faithfully on transformers 5 (FORMATS.md); the oracle can.
GAPS = {
    "qwen2_moe-experts-2d": ("qwen2_moe", {"targets": ["all"], "expert_format": "2d"}),
    "qwen3_moe-dense-mlp-2d": ("qwen3_moe_dense_layers", {"targets": ["all"], "expert_format": "2d"}),
    "qwen3_moe-experts-2d-rslora": ("qwen3_moe", {"targets": ["experts"], "use_rslora": True}),
}
PROMPT = [1, 40, 41, 42, 300, 7, 99]


def _write(cache: FixtureCache, preset: str, options: dict[str, Any]
           ) -> tuple[Path, Path, AdapterFixture]:
    model_dir = cache.model(preset)
    adapter_dir = cache.adapter(model_dir, **options)
    build_options = {k: v for k, v in options.items() if k != "weights_format"}
    return model_dir, adapter_dir, build_adapter(model_dir, **build_options)


def _peft_native(model_dir: Path, adapter_dir: Path) -> Any:
    """PeftModel.from_pretrained exactly as a user would call it (no oracle workarounds)."""
    from oracle import load_base_model
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base_model(model_dir), str(adapter_dir)).eval()


def _peft_deltas(peft_model: Any, fx: AdapterFixture) -> dict[str, torch.Tensor]:
    """Every module's effective delta in PEFT, experts split per expert (on-disk names)."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    spec = fx.spec
    assert spec is not None
    gate, up, down = spec.expert_proj_names
    i = spec.expert_intermediate_size
    out: dict[str, torch.Tensor] = {}
    for name, mod in peft_model.base_model.model.named_modules():
        if isinstance(mod, ParamWrapper) and "default" in mod.lora_A:
            delta = mod.get_delta_weight("default")  # [E, out, in]
            pre = name.replace(".base_layer", "").replace(".mlp.", f".{spec.moe_prefix}.")
            for e in range(delta.shape[0]):
                if mod.parameter_name == "gate_up_proj":
                    out[f"{pre}.{e}.{gate}"], out[f"{pre}.{e}.{up}"] = delta[e, :i], delta[e, i:]
                else:
                    out[f"{pre}.{e}.{down}"] = delta[e]
        elif isinstance(mod, LoraLayer) and not isinstance(mod, ParamWrapper) and (
                "default" in mod.lora_A or "default" in mod.lora_embedding_A):
            out[name] = mod.get_delta_weight("default")
    return out


def _intended(fx: AdapterFixture) -> dict[str, torch.Tensor]:
    return {p: (m.delta().T if p == "model.embed_tokens" else m.delta())
            for p, m in fx.modules.items()}


@pytest.mark.parametrize("case", list(NATIVE))
def test_peft_loads_adapter_with_intended_weights(fixture_cache: FixtureCache, case: str) -> None:
    model_dir, adapter_dir, fx = _write(fixture_cache, *NATIVE[case])
    got = _peft_deltas(_peft_native(model_dir, adapter_dir), fx)
    want = _intended(fx)
    assert sorted(got) == sorted(want)
    for path, delta in want.items():
        torch.testing.assert_close(got[path], delta, rtol=1e-5, atol=1e-6, msg=path)


def test_peft_gaps_on_transformers_5(fixture_cache: FixtureCache) -> None:
    """Pins the PEFT 0.21.2 behaviour the oracle works around (update FORMATS.md if it fails)."""
    m, a, fx = _write(fixture_cache, *GAPS["qwen2_moe-experts-2d"])
    got = _peft_deltas(_peft_native(m, a), fx)
    assert not any(".experts." in p for p in got)  # per-expert tensors silently ignored
    assert any(".shared_expert." in p for p in got)

    m, a, fx = _write(fixture_cache, *GAPS["qwen3_moe-dense-mlp-2d"])
    got = _peft_deltas(_peft_native(m, a), fx)
    assert "model.layers.1.mlp.gate_proj" in fx.modules
    assert not any(p.startswith("model.layers.1.mlp.") for p in got)  # dense MLP dropped

    m, a, fx = _write(fixture_cache, *GAPS["qwen3_moe-experts-2d-rslora"])
    got = _peft_deltas(_peft_native(m, a), fx)
    g = "model.layers.0.mlp.experts.5.gate_proj"
    d = "model.layers.0.mlp.experts.5.down_proj"
    ratio = (got[g] / _intended(fx)[g]).mean().item()
    assert math.isclose(ratio, math.sqrt(2), rel_tol=1e-4)  # fused gate/up scaled by √2
    torch.testing.assert_close(got[d], _intended(fx)[d])


def _merged_logits(model_dir: Path, fx: AdapterFixture, ids: list[int]) -> torch.Tensor:
    """Logits of the base model with every intended delta added into its weights."""
    from oracle import load_base_model

    model = load_base_model(model_dir)
    spec = fx.spec
    assert spec is not None
    params = dict(model.named_parameters())
    i = spec.expert_intermediate_size
    gate, up, _ = spec.expert_proj_names
    with torch.no_grad():
        for path, m in fx.modules.items():
            delta = m.delta()
            if ".experts." in path:
                pre, e, proj = path.replace(".block_sparse_moe.", ".mlp.").rsplit(".", 2)
                rows = {gate: slice(0, i), up: slice(i, 2 * i)}.get(proj)
                name = f"{pre}.gate_up_proj" if rows else f"{pre}.down_proj"
                params[name][int(e), rows or slice(None)] += delta
            else:
                params[f"{path}.weight"] += delta.T if path == "model.embed_tokens" else delta
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("case", ["qwen3_moe-all-3d-rslora", "mixtral-experts-2d",
                                  "qwen2_moe-all-3d", "qwen3-patterns", *GAPS])
def test_oracle_equals_merged_weights(fixture_cache: FixtureCache, case: str) -> None:
    from oracle import oracle_logits

    model_dir, adapter_dir, fx = _write(fixture_cache, *{**NATIVE, **GAPS}[case])
    want = _merged_logits(model_dir, fx, PROMPT)
    got = oracle_logits(model_dir, adapter_dir, PROMPT)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    base = oracle_logits(model_dir, None, PROMPT)
    assert ((got - base).norm() / base.norm()).item() > 0.1


def test_oracle_greedy_matches_full_recompute(fixture_cache: FixtureCache) -> None:
    from oracle import oracle_greedy, oracle_logits

    model_dir, adapter_dir, _ = _write(fixture_cache, *NATIVE["qwen3_moe-all-3d-rslora"])
    new = oracle_greedy(model_dir, adapter_dir, PROMPT, 10, stop_at_eos=False)
    assert len(new) == 10
    logits = oracle_logits(model_dir, adapter_dir, PROMPT + new[:-1])
    assert logits[len(PROMPT) - 1:].argmax(-1).tolist() == new


def test_oracle_refuses_what_peft_drops(fixture_cache: FixtureCache) -> None:
    from oracle import OracleError, oracle_model

    model_dir = fixture_cache.model("qwen3_moe")
    bad = fixture_cache.adapter(model_dir, name="bad", targets=["attention"],
                                corrupt="layer_out_of_range")
    with pytest.raises(OracleError, match="did not load"):
        oracle_model(model_dir, bad)


def test_demo_adapters_change_greedy_outputs(tmp_path: Path) -> None:
    from oracle import oracle_greedy

    from lora_cluster.testing import DEMO_PROMPTS, build_tokenizer, demo_assets

    model_dir, adapters = demo_assets(tmp_path)
    tok = build_tokenizer()
    for prompt in DEMO_PROMPTS[:3]:
        ids = tok.encode(prompt).ids
        outs = {name: tuple(oracle_greedy(model_dir, d, ids, 8)) for name, d in adapters.items()}
        outs["base"] = tuple(oracle_greedy(model_dir, None, ids, 8))
        assert len(set(outs.values())) == len(outs), (prompt, outs)


def test_key_names_and_config_fields(fixture_cache: FixtureCache) -> None:
    from safetensors import safe_open

    def keys(adapter_dir: Path) -> list[str]:
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
            return sorted(f.keys())

    _, a, _ = _write(fixture_cache, *NATIVE["mixtral-all-3d"])
    ks = keys(a)
    p = "base_model.model."
    assert f"{p}model.layers.0.self_attn.q_proj.lora_A.weight" in ks
    assert f"{p}model.embed_tokens.lora_embedding_A" in ks
    assert f"{p}model.embed_tokens.base_layer.weight" in ks
    assert f"{p}lm_head.lora_B.weight" in ks and f"{p}lm_head.base_layer.weight" in ks
    assert f"{p}model.layers.1.mlp.experts.base_layer.lora_A.weight" in ks  # gate_up, inner
    assert f"{p}model.layers.1.mlp.experts.lora_B.weight" in ks              # down, outer
    assert not any("block_sparse_moe" in k for k in ks)
    cfg = json.loads((a / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["peft_version"] == "0.21.2"
    assert cfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert cfg["target_modules"] == ["embed_tokens", "k_proj", "lm_head", "o_proj", "q_proj",
                                     "v_proj"]
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_dora"], cfg["bias"]) == (8, 16, False, "none")

    _, a, _ = _write(fixture_cache, *NATIVE["qwen3_moe-down-3d"])
    assert keys(a) == [f"{p}model.layers.{n}.mlp.experts.lora_{x}.weight"
                       for n in (0, 1) for x in "AB"]
    _, a, _ = _write(fixture_cache, *NATIVE["mixtral-experts-2d"])
    assert f"{p}model.layers.0.block_sparse_moe.experts.7.w3.lora_B.weight" in keys(a)


def test_fused_pack_is_peft_layout() -> None:
    e, r, in_f, out_f = 3, 2, 5, 4
    a = torch.randn(e, r, in_f)
    b = torch.randn(e, out_f, r)
    a2, b2 = pack_fused(a, b)
    assert a2.shape == (e * r, in_f) and b2.shape == (out_f, e * r)
    # expert-major A rows, rank-major B columns
    assert torch.equal(a2[1 * r + 1], a[1, 1]) and torch.equal(b2[:, 1 * e + 2], b[2, :, 1])
    a3, b3 = unpack_fused(a2, b2, e)
    assert torch.equal(a3, a) and torch.equal(b3, b)
    # the same contraction PEFT's ParamWrapper.get_delta_weight performs
    peft = torch.einsum("o r e, e r i -> e o i", b2.reshape(out_f, r, e), a2.reshape(e, r, in_f))
    torch.testing.assert_close(peft, b @ a)
