"""Adapters that are wrong on purpose, each in one specific way, for refusal tests.

Logical faults change the config or tensors before saving; file faults damage the saved files.

    dora              use_dora: true + ``…lora_magnitude_vector [out]`` per module (as PEFT saves DoRA)
    bias              bias: "all", lora_bias: true + ``…lora_B.bias [out]`` per module
    shape             the first q_proj's lora_A (else the first lora_A) has in-dim + 16
    rank_mismatch     the first q_proj's lora_B (else the first lora_B) has rank + 1
    unknown_module    extra ``model.layers.0.self_attn.qkv_proj`` tensors and target (no such module)
    layer_out_of_range  extra q_proj tensors for layer ``num_layers`` (past the last layer)
    wrong_peft_type   peft_type: "IA3"
    bad_config_json   adapter_config.json is not valid JSON
    missing_config    no adapter_config.json
    missing_weights   no adapter_model.safetensors
    truncated_header  adapter_model.safetensors cut inside its JSON header
    truncated_data    adapter_model.safetensors cut inside its tensor data
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lora_cluster.testing.adapters import AdapterFixture
from lora_cluster.testing.peft_format import PREFIX, lora_keys

LOGICAL_FAULTS = ("dora", "bias", "shape", "rank_mismatch", "unknown_module",
                  "layer_out_of_range", "wrong_peft_type")
FILE_FAULTS = ("bad_config_json", "missing_config", "missing_weights", "truncated_header",
               "truncated_data")
FAULTS = LOGICAL_FAULTS + FILE_FAULTS


def _first_lora_a(tensors: dict[str, torch.Tensor]) -> str:
    """The victim of shape faults: the first q_proj's lora_A if any, else the first lora_A."""
    keys = [k for k in tensors if k.endswith("lora_A.weight")]
    return next((k for k in keys if ".self_attn.q_proj." in k), keys[0])


def _module_prefixes(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")]


def apply_fault(fixture: AdapterFixture, fault: str) -> AdapterFixture:
    """The fixture with a logical fault applied (file faults pass through unchanged)."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r} (known: {FAULTS})")
    cfg, tensors = dict(fixture.config), dict(fixture.tensors)
    gen = torch.Generator().manual_seed(1234)
    dtype = next(iter(tensors.values())).dtype
    if fault == "dora":
        cfg["use_dora"] = True
        for p in _module_prefixes(tensors):
            out = tensors[f"{p}.lora_B.weight"].shape[0]
            tensors[f"{p}.lora_magnitude_vector"] = (1 + torch.rand(out, generator=gen)).to(dtype)
    elif fault == "bias":
        cfg.update(bias="all", lora_bias=True)
        for p in _module_prefixes(tensors):
            out = tensors[f"{p}.lora_B.weight"].shape[0]
            tensors[f"{p}.lora_B.bias"] = torch.randn(out, generator=gen).to(dtype)
    elif fault == "shape":
        k = _first_lora_a(tensors)
        a = tensors[k]
        tensors[k] = torch.cat([a, torch.randn(a.shape[0], 16, generator=gen).to(dtype)], dim=1)
    elif fault == "rank_mismatch":
        kb = _first_lora_a(tensors).replace("lora_A", "lora_B")
        b = tensors[kb]
        tensors[kb] = torch.cat([b, torch.randn(b.shape[0], 1, generator=gen).to(dtype)], dim=1)
    elif fault == "unknown_module":
        spec = fixture.spec
        assert spec is not None
        r = int(cfg["r"])
        ka, kb = lora_keys("model.layers.0.self_attn.qkv_proj")
        tensors[ka] = torch.randn(r, spec.hidden_size, generator=gen).to(dtype)
        tensors[kb] = torch.randn(spec.q_size + 2 * spec.kv_size, r, generator=gen).to(dtype)
        tm = cfg["target_modules"]
        cfg["target_modules"] = sorted([*tm, "qkv_proj"]) if isinstance(tm, list) else ["qkv_proj"]
    elif fault == "layer_out_of_range":
        spec = fixture.spec
        assert spec is not None
        r = int(cfg["r"])
        path = f"model.layers.{spec.num_layers}.self_attn.q_proj"
        ka, kb = lora_keys(path)
        tensors[ka] = torch.randn(r, spec.hidden_size, generator=gen).to(dtype)
        tensors[kb] = torch.randn(spec.q_size, r, generator=gen).to(dtype)
    elif fault == "wrong_peft_type":
        cfg["peft_type"] = "IA3"
    assert all(k.startswith(PREFIX) for k in tensors)
    return dataclasses.replace(fixture, config=dict(sorted(cfg.items())),
                               tensors=dict(sorted(tensors.items())))


def apply_file_fault(adapter_dir: Path, fault: str) -> None:
    """Damage the saved files for a file fault (logical faults: nothing to do)."""
    weights = adapter_dir / "adapter_model.safetensors"
    config = adapter_dir / "adapter_config.json"
    if fault == "bad_config_json":
        config.write_text(config.read_text()[: len(config.read_text()) // 2])
    elif fault == "missing_config":
        config.unlink()
    elif fault == "missing_weights":
        weights.unlink()
    elif fault == "truncated_header":
        data = weights.read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        weights.write_bytes(data[: 8 + header_len // 2])
    elif fault == "truncated_data":
        data = weights.read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        weights.write_bytes(data[: 8 + header_len + (len(data) - 8 - header_len) // 2])
