"""Each broken adapter is broken in exactly the intended way (so refusal tests mean something)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open

from lora_cluster.testing import FAULTS, demo_assets, write_adapter
from lora_cluster.testing.cache import FixtureCache

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*lora_bias=True.*"),
              pytest.mark.filterwarnings("ignore:.*pattern keys did not match:RuntimeWarning")]
PROMPT = [1, 40, 41, 42, 300]


@pytest.fixture(scope="module")
def model_dir(fixture_cache: FixtureCache) -> Path:
    return fixture_cache.model("qwen3_moe")


def _broken(cache: FixtureCache, model_dir: Path, fault: str, **options: object) -> Path:
    options.setdefault("targets", ["attention", "experts"])
    return cache.adapter(model_dir, name=fault, corrupt=fault, **options)


def _tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _config(adapter_dir: Path) -> dict:
    return json.loads((adapter_dir / "adapter_config.json").read_text())


def test_fault_list_is_covered() -> None:
    covered = {"dora", "bias", "shape", "rank_mismatch", "unknown_module", "layer_out_of_range",
               "wrong_peft_type", "bad_config_json", "missing_config", "missing_weights",
               "truncated_header", "truncated_data"}
    assert set(FAULTS) == covered
    with pytest.raises(ValueError, match="unknown fault"):
        write_adapter("/nonexistent/never-written", "qwen3_moe", corrupt="nope")


def test_dora_is_real_dora(fixture_cache: FixtureCache, model_dir: Path) -> None:
    from oracle import load_base_model
    from peft import PeftModel

    adapter = _broken(fixture_cache, model_dir, "dora", targets=["attention"])
    assert _config(adapter)["use_dora"] is True
    mags = [k for k in _tensors(adapter) if k.endswith(".lora_magnitude_vector")]
    assert len(mags) == 8  # 4 attention projections x 2 layers
    peft_model = PeftModel.from_pretrained(load_base_model(model_dir), str(adapter))
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.use_dora["default"]


def test_bias_changes_outputs(fixture_cache: FixtureCache, model_dir: Path) -> None:
    from oracle import oracle_logits

    plain = fixture_cache.adapter(model_dir, targets=["attention"])
    biased = _broken(fixture_cache, model_dir, "bias", targets=["attention"])
    cfg = _config(biased)
    assert (cfg["bias"], cfg["lora_bias"]) == ("all", True)
    tensors = _tensors(biased)
    assert any(k.endswith(".lora_B.bias") for k in tensors)
    # same LoRA weights, yet the bias moves the outputs: ignoring it would serve wrong answers
    for key, t in _tensors(plain).items():
        assert torch.equal(tensors[key], t)
    a = oracle_logits(model_dir, plain, PROMPT)
    b = oracle_logits(model_dir, biased, PROMPT)
    assert ((a - b).norm() / a.norm()).item() > 1e-2


@pytest.mark.parametrize("fault", ["shape", "rank_mismatch"])
def test_shape_faults_fail_in_peft(fixture_cache: FixtureCache, model_dir: Path, fault: str) -> None:
    from oracle import load_base_model
    from peft import PeftModel

    adapter = _broken(fixture_cache, model_dir, fault)
    tensors = _tensors(adapter)
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    if fault == "shape":
        assert a.shape == (8, 96 + 16) and b.shape == (128, 8)
    else:
        assert a.shape == (8, 96) and b.shape == (128, 9)
    k = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]
    assert k.shape == (8, 96)  # only one tensor is wrong
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(load_base_model(model_dir), str(adapter))


@pytest.mark.parametrize("fault", ["unknown_module", "layer_out_of_range"])
def test_modules_that_do_not_exist(fixture_cache: FixtureCache, model_dir: Path, fault: str) -> None:
    from oracle import load_base_model

    adapter = _broken(fixture_cache, model_dir, fault)
    modules = {name for name, _ in load_base_model(model_dir).named_modules()}
    paths = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in _tensors(adapter)}
    strangers = {p for p in paths if p not in modules and ".experts." not in p}
    expected = {"unknown_module": {"model.layers.0.self_attn.qkv_proj"},
                "layer_out_of_range": {"model.layers.2.self_attn.q_proj"}}[fault]
    assert strangers == expected
    if fault == "unknown_module":
        assert "qkv_proj" in _config(adapter)["target_modules"]


def test_wrong_peft_type(fixture_cache: FixtureCache, model_dir: Path) -> None:
    assert _config(_broken(fixture_cache, model_dir, "wrong_peft_type"))["peft_type"] == "IA3"


def test_file_faults(fixture_cache: FixtureCache, model_dir: Path) -> None:
    bad_json = _broken(fixture_cache, model_dir, "bad_config_json")
    with pytest.raises(json.JSONDecodeError):
        _config(bad_json)
    assert not (_broken(fixture_cache, model_dir, "missing_config") / "adapter_config.json").exists()
    missing = _broken(fixture_cache, model_dir, "missing_weights")
    assert not (missing / "adapter_model.safetensors").exists()
    assert (missing / "adapter_config.json").exists()
    for fault in ("truncated_header", "truncated_data"):
        adapter = _broken(fixture_cache, model_dir, fault)
        with pytest.raises(SafetensorError):
            _tensors(adapter)


def test_demo_assets_are_cached_and_import_light(tmp_path: Path) -> None:
    model_dir, adapters = demo_assets(tmp_path)
    assert sorted(adapters) == ["all-rslora-r16", "attn-r8", "experts-fused3d", "experts-r8"]
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    again_model, again = demo_assets(tmp_path)
    assert (again_model, again) == (model_dir, adapters)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert _config(adapters["experts-fused3d"])["target_parameters"]
    assert _config(adapters["all-rslora-r16"])["use_rslora"] is True
    # the demo imports lora_cluster.testing at run time: no transformers / peft / ray
    code = ("import sys, lora_cluster.testing as t; t.demo_assets(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'peft', 'ray')))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fresh")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
