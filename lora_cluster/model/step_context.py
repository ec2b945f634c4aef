"""Per-step state built once per forward and shared by every layer.

LoRA rows are grouped by *index group* (the linears that one adapter either has or lacks as a
whole: q/k/v, o, dense gate/up, dense down, experts, shared gate/up, shared down, embed,
lm_head). A device-side mask ``[G, S]`` says which slot holds which group; a token whose slot
lacks a group gets entry -1 there, so no LoRA work is done for it — decided on the device,
never by a host-side branch a CUDA graph would freeze.

Shape legend: T rows, N logit rows, S slots, G groups, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lora_kernels.meta import LoRAMeta, build_lora_meta

from lora_cluster.model.batch import ForwardBatch
from lora_cluster.model.paged_attention import AttentionPlan, plan_attention

LORA_GROUPS: tuple[str, ...] = (
    "attn.qkv", "attn.o", "mlp.gate_up", "mlp.down", "experts",
    "shared.gate_up", "shared.down", "embed", "lm_head",
)
GROUP_INDEX = {name: i for i, name in enumerate(LORA_GROUPS)}

KIND_GROUP: dict[str, str] = {
    "q_proj": "attn.qkv", "k_proj": "attn.qkv", "v_proj": "attn.qkv", "o_proj": "attn.o",
    "gate_proj": "mlp.gate_up", "up_proj": "mlp.gate_up", "down_proj": "mlp.down",
    "experts.gate_proj": "experts", "experts.up_proj": "experts",
    "experts.down_proj": "experts",
    "shared_expert.gate_proj": "shared.gate_up", "shared_expert.up_proj": "shared.gate_up",
    "shared_expert.down_proj": "shared.down",
    "embed_tokens": "embed", "lm_head": "lm_head",
}


@dataclass(frozen=True)
class StepContext:
    """Everything a layer reads besides its input: positions' cos/sin, attention plan, LoRA.

    lora:          group → LoRAMeta over the step's rows (lm_head: over ``logits_rows``)
    expert_slots:  [T] slot of each row for expert LoRA, -1 when its slot lacks experts
    """

    batch: ForwardBatch
    cos: torch.Tensor
    sin: torch.Tensor
    attention: AttentionPlan
    lora: dict[str, LoRAMeta] | None
    expert_slots: torch.Tensor | None

    def meta(self, group: str) -> LoRAMeta | None:
        return None if self.lora is None else self.lora.get(group)


def group_slots(token_slots: torch.Tensor, group_mask: torch.Tensor) -> torch.Tensor:
    """[G, T] slot of each row per group: the row's slot if that slot holds the group, else -1."""
    slots = token_slots.long()
    has = group_mask[:, slots.clamp(min=0)] & (slots >= 0)[None, :]
    return torch.where(has, slots[None, :], torch.full_like(slots, -1)[None, :])


def build_lora_state(batch: ForwardBatch, group_mask: torch.Tensor, groups: tuple[str, ...]
                     ) -> tuple[dict[str, LoRAMeta], torch.Tensor | None]:
    """One LoRAMeta per group the model has (device ops only) and the experts' row slots."""
    num_slots = group_mask.shape[1]
    per_group = group_slots(batch.token_slots, group_mask)
    metas: dict[str, LoRAMeta] = {}
    for name in groups:
        if name == "lm_head":
            lm = GROUP_INDEX["lm_head"]
            rows = group_slots(batch.token_slots.index_select(0, batch.logits_rows),
                               group_mask[lm:lm + 1])[0]
        else:
            rows = per_group[GROUP_INDEX[name]]
        metas[name] = build_lora_meta(rows, num_slots)
    experts = per_group[GROUP_INDEX["experts"]].to(torch.int32) if "experts" in groups else None
    return metas, experts


def build_step_context(batch: ForwardBatch, cos: torch.Tensor, sin: torch.Tensor,
                       group_mask: torch.Tensor | None, groups: tuple[str, ...]) -> StepContext:
    """The shared per-step state; ``group_mask`` None means the model has no LoRA slots."""
    lora, expert_slots = (None, None) if group_mask is None else build_lora_state(
        batch, group_mask, groups)
    return StepContext(batch, cos, sin, plan_attention(batch), lora, expert_slots)
