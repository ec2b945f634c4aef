"""PEFT adapters: parsing, kind-based validation, EP/TP selective loading, sources and tiers.

No Ray and no transformers/peft here (those are test oracles only).
"""

from lora_cluster.adapters.config import AdapterConfig, parse_adapter_config, read_adapter_config
from lora_cluster.adapters.layer_stream import LayerStream
from lora_cluster.adapters.load_spec import LoadSpec, build_load_spec
from lora_cluster.adapters.loader import (
    LoadedAdapter,
    LoadStats,
    inspect_adapter,
    load_adapter,
    load_adapter_weights,
)
from lora_cluster.adapters.plan import AdapterPlan, TargetPlan
from lora_cluster.adapters.sources import FailedLoads, resolve_source
from lora_cluster.adapters.staging import BufferedLayers, LayerArrivals
from lora_cluster.adapters.tiers import AdapterTiers, Placement, TierStats
from lora_cluster.adapters.validation import NameVerdict, check_names
from lora_cluster.adapters.weights import AdapterWeights, LoRATensors, ModuleKey

__all__ = [
    "AdapterConfig",
    "AdapterPlan",
    "AdapterTiers",
    "AdapterWeights",
    "BufferedLayers",
    "FailedLoads",
    "LayerArrivals",
    "LayerStream",
    "LoRATensors",
    "LoadSpec",
    "LoadStats",
    "LoadedAdapter",
    "ModuleKey",
    "NameVerdict",
    "Placement",
    "TargetPlan",
    "TierStats",
    "build_load_spec",
    "check_names",
    "inspect_adapter",
    "load_adapter",
    "load_adapter_weights",
    "parse_adapter_config",
    "read_adapter_config",
    "resolve_source",
]
