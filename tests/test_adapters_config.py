"""adapter_config.json parsing: fields, scaling (incl. rsLoRA), and every refused feature."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lora_cluster import errors
from lora_cluster.adapters import AdapterConfig, parse_adapter_config, read_adapter_config
from lora_cluster.adapters.layout import locate_adapter_files

BASE = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "bias": "none", "use_dora": False, "modules_to_save": None}


def test_fields_and_scaling() -> None:
    cfg = parse_adapter_config({**BASE, "rank_pattern": {"q_proj": 4, "experts": 2},
                                "alpha_pattern": {"v_proj": 3.5}, "layers_to_transform": 1,
                                "target_parameters": ["mlp.experts.down_proj"]}, "c.json")
    assert isinstance(cfg, AdapterConfig) and cfg.r == 8 and cfg.lora_alpha == 16.0
    assert cfg.rank_pattern == (("q_proj", 4), ("experts", 2))  # dict order kept
    assert cfg.alpha_pattern == (("v_proj", 3.5),)
    assert cfg.layers_to_transform == (1,)
    assert cfg.target_names() == ("q_proj", "v_proj", "mlp.experts.down_proj")
    assert cfg.default_scaling == 2.0 and cfg.scaling(4, 8) == 2.0
    rs = parse_adapter_config({**BASE, "use_rslora": True}, "c.json")
    assert rs.default_scaling == pytest.approx(16 / math.sqrt(8))
    regex = parse_adapter_config({**BASE, "target_modules": r".*\.q_proj"}, "c.json")
    assert regex.target_names() == (r".*\.q_proj",)
    assert parse_adapter_config({**BASE, "peft_type": "lora"}, "c.json").peft_type == "LORA"


@pytest.mark.parametrize("field,value,words", [
    ("use_dora", True, ["DoRA"]),
    ("bias", "all", ["bias='all'"]),
    ("bias", "lora_only", ["bias='lora_only'"]),
    ("lora_bias", True, ["lora_bias"]),
    ("modules_to_save", ["lm_head"], ["modules_to_save"]),
    ("layer_replication", [[0, 2]], ["layer_replication"]),
    ("trainable_token_indices", [1, 2], ["trainable_token_indices"]),
    ("alora_invocation_tokens", [5], ["alora_invocation_tokens"]),
    ("use_qalora", True, ["use_qalora"]),
    ("velora_config", {"x": 1}, ["velora_config"]),
    ("init_lora_weights", "mica", ["mica"]),
    ("peft_type", "LOHA", ["LOHA"]),
])
def test_refused_features(field: str, value, words: list[str]) -> None:
    with pytest.raises(errors.UnsupportedAdapterError) as info:
        parse_adapter_config({**BASE, field: value}, "dir/adapter_config.json")
    assert "dir/adapter_config.json" in str(info.value)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_harmless_fields_are_accepted() -> None:
    """Init-only and training-only fields do not change what a saved adapter computes."""
    cfg = parse_adapter_config({**BASE, "init_lora_weights": "gaussian", "lora_dropout": 0.1,
                                "modules_to_save": [], "fan_in_fan_out": True,
                                "eva_config": None, "loftq_config": {}}, "c.json")
    assert cfg.fan_in_fan_out  # PEFT resets it for nn.Linear targets; tensors are standard


@pytest.mark.parametrize("field,value", [("r", 0), ("r", "8"), ("r", True), ("lora_alpha", "x"),
                                         ("rank_pattern", {"q": 0}), ("rank_pattern", [1]),
                                         ("alpha_pattern", {"q": "a"}),
                                         ("target_modules", [1, 2]),
                                         ("layers_to_transform", ["a"])])
def test_bad_field_values_name_the_key(field: str, value) -> None:
    with pytest.raises(errors.AdapterFormatError) as info:
        parse_adapter_config({**BASE, field: value}, "c.json")
    assert repr(field) in str(info.value) or field in str(info.value)


def test_config_files(tmp_path: Path) -> None:
    with pytest.raises(errors.AdapterNotFoundError):
        read_adapter_config(tmp_path / "adapter_config.json")
    bad = tmp_path / "adapter_config.json"
    bad.write_text('{"r": 8,\n "lora_alpha": }')
    with pytest.raises(errors.AdapterFormatError, match=r"adapter_config\.json: malformed JSON "
                                                        r"at line 2"):
        read_adapter_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(errors.AdapterFormatError, match="expected a JSON object"):
        read_adapter_config(bad)


def test_adapter_file_layouts(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "adapter_config.json").write_text(json.dumps(BASE))
    (flat / "adapter_model.safetensors").write_bytes(b"")
    assert locate_adapter_files(flat).directory == flat
    nested = tmp_path / "nested"
    for name in ("one", "two"):
        (nested / name).mkdir(parents=True)
        (nested / name / "adapter_config.json").write_text(json.dumps(BASE))
        (nested / name / "adapter_model.bin").write_bytes(b"")
    files = locate_adapter_files(nested, "two")
    assert files.directory == nested / "two" and not files.is_safetensors
    with pytest.raises(errors.AdapterNotFoundError, match="several adapter subfolders"):
        locate_adapter_files(nested)
    (nested / "one" / "adapter_model.bin").unlink()
    with pytest.raises(errors.AdapterNotFoundError, match=r"adapter_model\.safetensors"):
        locate_adapter_files(nested, "one")
    with pytest.raises(errors.AdapterNotFoundError, match="not a directory"):
        locate_adapter_files(flat / "adapter_config.json")
