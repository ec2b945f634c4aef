"""Tiny real-format fixtures: HF checkpoints, a tokenizer and PEFT adapters (tests and demo).

Imports only torch, safetensors, tokenizers and the standard library (never transformers or
peft), so the demo can use it at run time. Format facts: ``FORMATS.md`` beside this file.
"""

from lora_cluster.testing.adapters import (
    TARGET_GROUPS,
    AdapterFixture,
    ModuleLoRA,
    build_adapter,
    save_adapter,
    select_modules,
    write_adapter,
)
from lora_cluster.testing.checkpoint import (
    load_spec,
    model_state_dict,
    read_fixture_record,
    write_tiny_model,
)
from lora_cluster.testing.demo import DEMO_ADAPTERS, DEMO_PROMPTS, demo_assets
from lora_cluster.testing.faults import FAULTS, FILE_FAULTS, LOGICAL_FAULTS
from lora_cluster.testing.hf_config import generation_config, hf_config
from lora_cluster.testing.peft_format import pack_fused, unpack_fused
from lora_cluster.testing.presets import (
    BOS_ID,
    EOS_ID,
    FAMILIES,
    MOE_FAMILIES,
    PAD_ID,
    PRESETS,
    UNK_ID,
    TinyModelSpec,
    get_spec,
)
from lora_cluster.testing.tokenizer import build_tokenizer, write_tokenizer

__all__ = [
    "BOS_ID",
    "DEMO_ADAPTERS",
    "DEMO_PROMPTS",
    "EOS_ID",
    "FAMILIES",
    "FAULTS",
    "FILE_FAULTS",
    "LOGICAL_FAULTS",
    "MOE_FAMILIES",
    "PAD_ID",
    "PRESETS",
    "TARGET_GROUPS",
    "UNK_ID",
    "AdapterFixture",
    "ModuleLoRA",
    "TinyModelSpec",
    "build_adapter",
    "build_tokenizer",
    "demo_assets",
    "generation_config",
    "get_spec",
    "hf_config",
    "load_spec",
    "model_state_dict",
    "pack_fused",
    "read_fixture_record",
    "save_adapter",
    "select_modules",
    "unpack_fused",
    "write_adapter",
    "write_tiny_model",
    "write_tokenizer",
]
