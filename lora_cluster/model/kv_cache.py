"""Paged KV cache of one rank, reserved up front from a byte budget.

Per layer, K and V are ``[num_blocks + 1, block_size, n_kv_local, D]``: blocks ``0 ..
num_blocks - 1`` are handed out by the block manager; the extra last block is a write sink
for padding rows (slot mapping -1), so writes need no data-dependent filtering and stay
capturable in a CUDA graph.
"""

from __future__ import annotations

import os

import torch

from lora_cluster.errors import CapacityError, ConfigError
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.sharding import attention_shard
from lora_cluster.model.spec import ModelSpec


class KVCache:
    """K/V blocks of every layer; ``write`` stores one step's new tokens."""

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ConfigError(f"KV cache needs num_blocks >= 1 and block_size >= 1, got "
                              f"{num_blocks} and {block_size}", field="kv_cache")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device)
                       for _ in range(num_layers)]
        self._sink = num_blocks * block_size  # first slot of the sink block

    @classmethod
    def for_model(cls, spec: ModelSpec, parallel: ParallelInfo, *, num_blocks: int,
                  block_size: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        """A cache shaped for this rank's KV heads of ``spec``."""
        return cls(num_layers=spec.num_layers, num_blocks=num_blocks, block_size=block_size,
                   num_kv_heads=attention_shard(spec, parallel).num_kv_heads,
                   head_dim=spec.head_dim, dtype=dtype, device=device)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    def write(self, index: int, k: torch.Tensor, v: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
        """Store k, v [T, n_kv, D] at flat slots [T] (block · block_size + offset; -1 = skip)."""
        slots = torch.where(slot_mapping < 0, torch.full_like(slot_mapping, self._sink),
                            slot_mapping)
        kc, vc = self.keys[index], self.values[index]
        flat = (-1, self.num_kv_heads, self.head_dim)
        kc.view(flat).index_copy_(0, slots, k.to(kc.dtype))
        vc.view(flat).index_copy_(0, slots, v.to(vc.dtype))


def kv_block_bytes(spec: ModelSpec, parallel: ParallelInfo, *, block_size: int,
                   dtype: torch.dtype) -> int:
    """Bytes one block costs on this rank across all layers (K and V)."""
    heads = attention_shard(spec, parallel).num_kv_heads
    per_token = 2 * spec.num_layers * heads * spec.head_dim * torch.empty((), dtype=dtype).element_size()
    return per_token * block_size


def num_blocks_for_budget(spec: ModelSpec, parallel: ParallelInfo, *, block_size: int,
                          dtype: torch.dtype, budget_bytes: int) -> int:
    """How many usable blocks fit ``budget_bytes`` (the sink block is paid from it too)."""
    per_block = kv_block_bytes(spec, parallel, block_size=block_size, dtype=dtype)
    blocks = budget_bytes // per_block - 1
    if blocks < 1:
        raise CapacityError(
            f"KV cache budget of {budget_bytes} bytes holds no block (one block of "
            f"{block_size} tokens costs {per_block} bytes on this rank)", budget=budget_bytes)
    return int(blocks)


def free_memory_bytes(device: torch.device | str) -> int:
    """Free memory of ``device`` now: CUDA's free bytes, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def kv_budget_bytes(device: torch.device | str, *, fraction: float | None = None,
                    budget_bytes: int | None = None) -> int:
    """The KV budget: an explicit byte count wins, else ``fraction`` of the free memory now
    (call it after the weights and LoRA slots are allocated)."""
    if budget_bytes is not None:
        return int(budget_bytes)
    if fraction is None or not 0.0 < fraction <= 1.0:
        raise ConfigError(f"kv_cache_fraction: must be in (0, 1], got {fraction}",
                          field="kv_cache_fraction")
    return int(free_memory_bytes(device) * fraction)
