"""Every adapter the server cannot serve faithfully is refused with a typed error naming why."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch

from lora_cluster import errors
from lora_cluster.adapters import inspect_adapter, load_adapter
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.spec import load_model_spec
from lora_cluster.testing import FAULTS, build_adapter, save_adapter

# fault → (error type, words the message must contain)
EXPECTED = {
    "dora": (errors.UnsupportedAdapterError, ["DoRA", "use_dora"]),
    "bias": (errors.UnsupportedAdapterError, ["bias"]),
    "shape": (errors.AdapterShapeError, ["q_proj.lora_A.weight", "[8, 112]", "[8, 96]"]),
    "rank_mismatch": (errors.AdapterShapeError, ["lora_B.weight", "[128, 9]", "[128, 8]"]),
    "unknown_module": (errors.UnsupportedAdapterError, ["qkv_proj", "does not have"]),
    "layer_out_of_range": (errors.UnsupportedAdapterError, ["layer 2", "2 layers",
                                                            "layers.2.self_attn.q_proj"]),
    "wrong_peft_type": (errors.UnsupportedAdapterError, ["IA3", "peft_type"]),
    "bad_config_json": (errors.AdapterFormatError, ["adapter_config.json", "malformed JSON"]),
    "missing_config": (errors.AdapterNotFoundError, ["adapter_config.json"]),
    "missing_weights": (errors.AdapterNotFoundError, ["adapter_model.safetensors"]),
    "truncated_header": (errors.AdapterFormatError, ["adapter_model.safetensors",
                                                     "corrupt safetensors header"]),
    "truncated_data": (errors.AdapterFormatError, ["adapter_model.safetensors", "truncated"]),
}


@pytest.fixture(scope="module")
def qwen(fixture_cache):
    model_dir = fixture_cache.model("qwen3_moe")
    return model_dir, load_model_spec(model_dir)


def _load(adapter_dir: Path, spec, *, max_lora_rank: int = 16):
    return load_adapter(adapter_dir, spec, ParallelInfo(), name="a", max_lora_rank=max_lora_rank)


def test_every_fixture_fault_is_covered() -> None:
    assert set(EXPECTED) == set(FAULTS)


@pytest.mark.parametrize("fault", sorted(EXPECTED))
def test_fixture_faults_are_refused(fault: str, qwen, fixture_cache) -> None:
    model_dir, spec = qwen
    adapter_dir = fixture_cache.adapter(model_dir, name=f"fault-{fault}", corrupt=fault,
                                        targets=["attention", "experts"])
    kind, words = EXPECTED[fault]
    with pytest.raises(kind) as info:
        _load(adapter_dir, spec)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    again = pickle.loads(pickle.dumps(info.value))  # errors cross Ray actors
    assert type(again) is kind and str(again) == str(info.value)


def _write(tmp_path: Path, model_dir: Path, *, tensors=None, drop=(), config=None, **options) -> Path:
    fixture = build_adapter(model_dir, **options)
    new_tensors = {k: v for k, v in fixture.tensors.items() if k not in drop}
    new_tensors.update(tensors or {})
    fixture = dataclasses.replace(fixture, tensors=dict(sorted(new_tensors.items())),
                                  config={**fixture.config, **(config or {})})
    return save_adapter(tmp_path / "adapter", fixture)


P = "base_model.model.model.layers"


@pytest.mark.parametrize("case", [
    "expert_out_of_range", "router", "shared_expert_gate", "dense_mlp_on_moe_layer",
    "shared_expert_missing", "modules_to_save_config", "module_weight_tensor",
    "lora_A_without_B", "both_2d_and_3d", "resized_vocab", "fan_in_fan_out_3d",
    "bad_rank_field", "bad_pattern_regex", "integer_dtype"])
def test_refusals(case: str, qwen, tmp_path: Path) -> None:
    model_dir, spec = qwen
    r, h = 8, spec.hidden_size
    t = torch.randn
    cases = {
        "expert_out_of_range": ({"tensors": {
            f"{P}.0.mlp.experts.8.gate_proj.lora_A.weight": t(r, h),
            f"{P}.0.mlp.experts.8.gate_proj.lora_B.weight": t(32, r)}, "targets": ["experts"]},
            errors.UnsupportedAdapterError, ["expert 8", "8 experts", "experts.8.gate_proj"]),
        "router": ({"tensors": {f"{P}.1.mlp.gate.lora_A.weight": t(r, h),
                                f"{P}.1.mlp.gate.lora_B.weight": t(8, r)}},
                   errors.UnsupportedAdapterError, ["router", "layers.1.mlp.gate.lora_A"]),
        "shared_expert_gate": ({"tensors": {
            f"{P}.0.mlp.shared_expert_gate.lora_A.weight": t(r, h),
            f"{P}.0.mlp.shared_expert_gate.lora_B.weight": t(1, r)}},
            errors.UnsupportedAdapterError, ["router", "shared_expert_gate"]),
        "dense_mlp_on_moe_layer": ({"tensors": {f"{P}.0.mlp.gate_proj.lora_A.weight": t(r, h),
                                                f"{P}.0.mlp.gate_proj.lora_B.weight": t(160, r)}},
                                   errors.UnsupportedAdapterError, ["layer 0", "MoE block"]),
        "shared_expert_missing": ({"tensors": {
            f"{P}.0.mlp.shared_expert.up_proj.lora_A.weight": t(r, h),
            f"{P}.0.mlp.shared_expert.up_proj.lora_B.weight": t(80, r)}},
            errors.UnsupportedAdapterError, ["shared expert", "qwen3_moe"]),
        "modules_to_save_config": ({"config": {"modules_to_save": ["lm_head"]}},
                                   errors.UnsupportedAdapterError, ["modules_to_save"]),
        "module_weight_tensor": ({"tensors": {"base_model.model.lm_head.weight": t(384, h)}},
                                 errors.UnsupportedAdapterError, ["full module weights",
                                                                  "lm_head.weight"]),
        "lora_A_without_B": ({"drop": [f"{P}.1.self_attn.k_proj.lora_B.weight"]},
                             errors.AdapterFormatError, ["layers.1.self_attn.k_proj.lora_A", "no matching lora_B"]),
        "both_2d_and_3d": ({"targets": ["experts"], "expert_format": "3d", "tensors": {
            f"{P}.0.mlp.experts.{e}.down_proj.lora_{ab}.weight": t(*shape)
            for e in range(8) for ab, shape in (("A", (r, 32)), ("B", (h, r)))}},
            errors.AdapterFormatError, ["experts.down_proj", "given twice"]),
        "resized_vocab": ({"targets": ["embed_tokens"], "tensors": {
            "base_model.model.model.embed_tokens.base_layer.weight": t(400, h)}},
            errors.UnsupportedAdapterError, ["resized vocabulary", "(400, 96)"]),
        "fan_in_fan_out_3d": ({"targets": ["experts"], "expert_format": "3d",
                               "config": {"fan_in_fan_out": True}},
                              errors.UnsupportedAdapterError, ["fan_in_fan_out"]),
        "bad_rank_field": ({"config": {"r": "8"}}, errors.AdapterFormatError, ["'r'"]),
        "bad_pattern_regex": ({"config": {"rank_pattern": {"q_proj(": 4}}},
                              errors.AdapterFormatError, ["rank_pattern", "q_proj("]),
        "integer_dtype": ({"tensors": {f"{P}.0.self_attn.q_proj.lora_A.weight":
                                       torch.zeros(r, h, dtype=torch.int32)}},
                          errors.AdapterFormatError, ["I32", "q_proj.lora_A"]),
    }
    options, kind, words = cases[case]
    options = {"targets": ["attention"], "r": r, **options}
    adapter_dir = _write(tmp_path, model_dir, **options)
    with pytest.raises(kind) as info:
        _load(adapter_dir, spec)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_rank_above_max_lora_rank(qwen, tmp_path: Path) -> None:
    model_dir, spec = qwen
    adapter_dir = _write(tmp_path, model_dir, targets=["attention"], r=8,
                         rank_pattern={"o_proj": 32})
    with pytest.raises(errors.AdapterRankError) as info:
        _load(adapter_dir, spec, max_lora_rank=16)
    assert "rank 32" in str(info.value) and "max_lora_rank=16" in str(info.value)
    assert "o_proj" in str(info.value)
    assert _load(adapter_dir, spec, max_lora_rank=32).weights.rank == 32


def test_missing_directory_and_garbage_file(qwen, tmp_path: Path) -> None:
    model_dir, spec = qwen
    with pytest.raises(errors.AdapterNotFoundError, match="does not exist"):
        _load(tmp_path / "nope", spec)
    adapter_dir = _write(tmp_path, model_dir, targets=["attention"])
    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(errors.AdapterFormatError, match=r"adapter_model\.safetensors.*invalid JSON"):
        _load(adapter_dir, spec)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(errors.AdapterFormatError, match="corrupt safetensors header"):
        _load(adapter_dir, spec)


def test_bin_adapter_loads_weights_only(qwen, tmp_path: Path) -> None:
    model_dir, spec = qwen
    fixture = build_adapter(model_dir, targets=["attention", "experts"], expert_format="3d")
    st = _load(save_adapter(tmp_path / "st", fixture), spec).weights
    binary = _load(save_adapter(tmp_path / "bin", fixture, weights_format="bin"), spec).weights
    assert st.modules.keys() == binary.modules.keys()
    for key, m in st.modules.items():
        assert torch.equal(m.a, binary.modules[key].a) and torch.equal(m.b, binary.modules[key].b)
    # a pickle that is not plain tensors is refused, never executed
    bad = tmp_path / "evil"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(fixture.config))
    torch.save({"x": torch.zeros(2), "obj": _Payload()}, bad / "adapter_model.bin")
    with pytest.raises(errors.AdapterFormatError, match="weights-only"):
        _load(bad, spec)


class _Payload:
    """An arbitrary object: a weights-only unpickler must refuse it."""


def test_inspect_refuses_without_reading_tensor_data(qwen, tmp_path: Path) -> None:
    """Validation runs from config + header: a data section full of garbage passes inspection
    (bytes are only checked for extent), and shapes are still checked."""
    model_dir, spec = qwen
    adapter_dir = _write(tmp_path, model_dir, targets=["attention"])
    weights = adapter_dir / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    raw[8 + header_len:] = b"\xab" * (len(raw) - 8 - header_len)
    weights.write_bytes(bytes(raw))
    plan = inspect_adapter(adapter_dir, spec, max_lora_rank=16)
    assert set(plan.kinds()) == {"q_proj", "k_proj", "v_proj", "o_proj"}
