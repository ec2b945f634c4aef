"""Routing metadata of one MoE layer: token×top-k rows sorted by (local expert, slot).

Built on the device with fixed shapes and no host sync. One sort serves both groupings the
fused MoE needs: rows of one local expert are contiguous (the grouped GEMMs), and inside
them rows of one LoRA entry (slot·E + expert) are contiguous (the LoRA shrinks).

Shape legend: T tokens, K top-k, M = T·K rows, E local experts, S slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_kernels.meta import LoRAMeta


@dataclass(frozen=True)
class MoERouting:
    """Sorted rows of one MoE layer and their two segmentations.

    local_expert: [M] int32  local expert of row r = t·K + k, -1 when it lives elsewhere
    experts:      LoRAMeta over E entries (rows of non-local experts sorted last)
    lora:         LoRAMeta over S·E entries sharing ``experts.sorted_rows``, or None
    top_k:        K
    """

    local_expert: torch.Tensor
    experts: LoRAMeta
    lora: LoRAMeta | None
    top_k: int


def build_moe_routing(topk_ids: torch.Tensor, expert_map: torch.Tensor, num_local: int,
                      row_slots: torch.Tensor | None, num_slots: int) -> MoERouting:
    """Sort token×top-k rows by (local expert, slot + 1) with device ops only."""
    top_k = topk_ids.shape[1]
    device = topk_ids.device
    local = expert_map.to(torch.int32)[topk_ids.reshape(-1).long()]  # [M]
    has_lora = row_slots is not None and num_slots > 0
    groups = num_slots + 1 if has_lora else 1
    if has_lora:
        assert row_slots is not None
        slot = row_slots.to(torch.int32)[:, None].expand(-1, top_k).reshape(-1)
        slot = torch.where(local >= 0, slot, torch.full_like(slot, -1))
        key = torch.where(local >= 0, local * groups + slot + 1,
                          torch.full_like(local, num_local * groups))
    else:
        key = torch.where(local >= 0, local, torch.full_like(local, num_local))
    sorted_rows = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.zeros(num_local * groups + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(0, key.long(), torch.ones_like(key))
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    counts2d = counts[: num_local * groups].view(num_local, groups)
    starts2d = starts[: num_local * groups].view(num_local, groups)
    experts = LoRAMeta(local, sorted_rows, counts2d.sum(1, dtype=torch.int32),
                       starts2d[:, 0].contiguous(), num_local)
    lora = None
    if has_lora:
        entry = torch.where(slot >= 0, slot * num_local + local, torch.full_like(slot, -1))
        lora = LoRAMeta(entry, sorted_rows, counts2d[:, 1:].t().reshape(-1).contiguous(),
                        starts2d[:, 1:].t().reshape(-1).contiguous(), num_slots * num_local)
    return MoERouting(local, experts, lora, top_k)
