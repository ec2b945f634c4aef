"""Loader behaviour beyond the PEFT merge: casts, stats, partial expert sets, served names that
differ from PEFT's subfolder, and validation without touching tensor data."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from lora_cluster.adapters import inspect_adapter, load_adapter, load_adapter_weights
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.spec import load_model_spec
from lora_cluster.testing import build_adapter, save_adapter

P = "base_model.model.model.layers"


def test_dtype_cast_and_stats(fixture_cache) -> None:
    model_dir = fixture_cache.model("qwen3_moe")
    adapter_dir = fixture_cache.adapter(model_dir, name="all3d", targets=["all"],
                                        expert_format="3d")
    spec = load_model_spec(model_dir)
    loaded = load_adapter(adapter_dir, spec, ParallelInfo(), name="x", max_lora_rank=16,
                          dtype="bfloat16")
    assert {t.a.dtype for t in loaded.weights.modules.values()} == {torch.bfloat16}
    assert {t.b.dtype for t in loaded.weights.modules.values()} == {torch.bfloat16}
    st = loaded.stats
    assert st.read_ms > 0 and st.validate_ms > 0 and st.convert_ms > 0
    assert dict(st.breakdown()).keys() == {"read", "validate", "convert"}
    assert 0 < st.bytes_read < st.file_bytes  # the saved embedding copies are never read
    plan = loaded.plan
    assert "model.layers.*.mlp.experts.gate_up_proj" in plan.modules()
    assert set(plan.kinds()) >= {"experts.gate_proj", "experts.up_proj", "embed_tokens"}
    weights = load_adapter_weights(adapter_dir, spec, ParallelInfo(), name="x", version=3,
                                   max_lora_rank=16)
    assert weights.version == 3 and weights.rank == plan.rank == 8


def test_partial_expert_sets_zero_fill_and_skip(fixture_cache, tmp_path: Path) -> None:
    """2D LoRA for experts 0-2 of layer 0 only: local experts without LoRA are zero, and an EP
    rank holding none of them gets no module for that layer."""
    model_dir = fixture_cache.model("qwen3_moe")
    spec = load_model_spec(model_dir)
    fixture = build_adapter(model_dir, targets=["experts"], expert_format="2d", r=4)
    keep = {k: v for k, v in fixture.tensors.items()
            if f"{P}.0.mlp.experts." in k and int(k.split(".experts.")[1].split(".")[0]) < 3}
    adapter_dir = save_adapter(tmp_path / "partial", dataclasses.replace(fixture, tensors=keep))
    full = load_adapter(adapter_dir, spec, ParallelInfo(), name="p", max_lora_rank=8).weights
    assert {key for key in full.modules} == {(0, "experts.gate_proj"), (0, "experts.up_proj"),
                                             (0, "experts.down_proj")}
    gate = full.modules[(0, "experts.gate_proj")]
    assert gate.a.shape == (8, 4, spec.hidden_size)
    intent = fixture.modules
    for e in range(8):
        want = intent[f"model.layers.0.mlp.experts.{e}.gate_proj"]
        if e < 3:
            assert torch.equal(gate.a[e], want.a) and torch.equal(gate.b[e], want.b)
        else:
            assert not gate.a[e].any() and not gate.b[e].any()
    rank3 = load_adapter(adapter_dir, spec, ParallelInfo(ep_rank=3, ep_size=4), name="p",
                         max_lora_rank=8)
    assert rank3.weights.modules == {} and rank3.stats.bytes_read == 0
    rank1 = load_adapter(adapter_dir, spec, ParallelInfo(ep_rank=1, ep_size=4), name="p",
                         max_lora_rank=8).weights
    assert torch.equal(rank1.modules[(0, "experts.gate_proj")].a[0], gate.a[2])
    assert not rank1.modules[(0, "experts.gate_proj")].a[1].any()


def test_served_name_differs_from_peft_subfolder(fixture_cache, tmp_path: Path) -> None:
    model_dir = fixture_cache.model("qwen3_moe")
    adapter_dir = fixture_cache.adapter(model_dir, name="attn", targets=["attention"])
    nested = tmp_path / "saved" / "my_peft_name"
    shutil.copytree(adapter_dir, nested)
    spec = load_model_spec(model_dir)
    weights = load_adapter_weights(tmp_path / "saved", spec, ParallelInfo(), name="served",
                                   max_lora_rank=16)
    assert weights.name == "served" and len(weights.modules) == 8
    plan = inspect_adapter(tmp_path / "saved", spec, max_lora_rank=16, subfolder="my_peft_name")
    assert plan.table.path.endswith("my_peft_name/adapter_model.safetensors")


def test_reading_selected_layers_only(fixture_cache) -> None:
    model_dir = fixture_cache.model("qwen3_moe")
    spec = load_model_spec(model_dir)
    for fmt in ("2d", "3d"):
        adapter_dir = fixture_cache.adapter(model_dir, name=f"layers{fmt}", targets=["all"],
                                            expert_format=fmt)
        full = load_adapter(adapter_dir, spec, ParallelInfo(), name="x", max_lora_rank=16)
        one = load_adapter(adapter_dir, spec, ParallelInfo(), name="x", max_lora_rank=16,
                           layers=[1])
        assert {layer for layer, _ in one.weights.modules} == {1}
        assert one.stats.bytes_read < full.stats.bytes_read
        for key, t in one.weights.modules.items():
            assert torch.equal(t.a, full.weights.modules[key].a)
            assert torch.equal(t.b, full.weights.modules[key].b)
        model_wide = load_adapter(adapter_dir, spec, ParallelInfo(), name="x", max_lora_rank=16,
                                  layers=[None]).weights
        assert set(model_wide.modules) == {(None, "embed_tokens"), (None, "lm_head")}
