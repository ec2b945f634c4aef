"""A rank's memory by kind: base weights, LoRA slot buffers, adapter host cache, KV cache.

The weight split walks the model's modules once, at load (slot buffers are allocated up front
and never resized); ``memory_stats`` itself only sums the host cache entries and asks CUDA.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lora_cluster.model.layers.lora_buffers import EmbeddingLoRA, ExpertLoRA, LinearLoRA

LORA_BUFFER_TYPES = (LinearLoRA, EmbeddingLoRA, ExpertLoRA)


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the model's own tensors: the base shard vs the LoRA slot buffers."""

    base: int
    lora_slots: int


def weight_bytes(model: torch.nn.Module) -> WeightBytes:
    """Split every parameter and buffer of ``model`` into base weights and LoRA slot buffers."""
    base = slots = 0
    for module in model.modules():
        own = sum(t.numel() * t.element_size() for t in module.buffers(recurse=False)
                  if t is not None)
        own += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        if isinstance(module, LORA_BUFFER_TYPES):
            slots += own
        else:
            base += own
    return WeightBytes(base=base, lora_slots=slots)


def memory_stats(weights: WeightBytes, host_entry_bytes: Iterable[int], kv_cache_bytes: int,
                 device: torch.device) -> dict[str, int]:
    """The ``memory`` entry of a rank's stats (bytes; ``cuda_*`` on CUDA ranks only)."""
    host = [int(n) for n in host_entry_bytes]
    out = {"base_weight_bytes": weights.base, "lora_slot_bytes": weights.lora_slots,
           "adapter_host_cache_bytes": sum(host), "adapters_in_host_cache": len(host),
           "adapter_bytes": weights.lora_slots + sum(host), "kv_cache_bytes": kv_cache_bytes}
    if device.type == "cuda":
        out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["cuda_reserved_bytes"] = torch.cuda.memory_reserved(device)
    return out
