"""lora_cluster: serve one MoE LLM with many LoRA adapters on a Ray cluster.

``Cluster`` is imported lazily so the Ray-free packages (model, adapters, engine) never pull
Ray in through the package root.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_cluster import errors
from lora_cluster.api_types import AdapterInfo, GenerationResult
from lora_cluster.config import ClusterConfig, SamplingParams

if TYPE_CHECKING:
    from lora_cluster.cluster.handle import Cluster

__all__ = [
    "AdapterInfo",
    "Cluster",
    "ClusterConfig",
    "GenerationResult",
    "SamplingParams",
    "errors",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Cluster":
        from lora_cluster.cluster.handle import Cluster

        return Cluster
    raise AttributeError(f"module 'lora_cluster' has no attribute {name!r}")
