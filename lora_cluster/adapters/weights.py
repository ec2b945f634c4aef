"""Canonical per-rank adapter tensors: what the loader produces and the LoRA layers consume.

Keys are ``(layer, kind)`` with ``kind`` from ``lora_cluster.model.spec`` (``q_proj``,
``experts.gate_proj``, ``shared_expert.down_proj``, …) and ``layer`` None for the model-wide
kinds ``embed_tokens`` and ``lm_head``. Tensors are already this rank's slices (TP shard of
the output for column-parallel targets, of the input for row-parallel ones, local experts
only), unscaled, in the file's dtype; the slot writer pads the rank, folds ``scaling`` into
``b`` and casts. One exception keeps this exact: when ``rank_pattern``/``alpha_pattern`` give
the experts of one layer different ranks or scalings, their stack is zero-padded to the
largest rank and each expert's own scaling is already folded into its ``b`` (``scaling`` 1.0).
Local experts the adapter has no LoRA for are zero entries.

Shapes (R = this module's rank; *_local = this rank's shard):
    linear:        a [R, in_local]              b [out_local, R]
    experts.*:     a [E_local, R, in_local]     b [E_local, out_local, R]
    embed_tokens:  a [R, V_local]  (PEFT lora_embedding_A)   b [H, R]  (lora_embedding_B)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ModuleKey = tuple[int | None, str]


@dataclass(frozen=True)
class LoRATensors:
    """One target module's LoRA pair on one rank."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[-2])

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


@dataclass(frozen=True)
class AdapterWeights:
    """Every target module of one adapter version, as one rank holds it."""

    name: str
    version: int
    rank: int  # the largest module rank (rank_pattern may lower some)
    modules: dict[ModuleKey, LoRATensors] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.modules.values())

    def kinds(self) -> frozenset[str]:
        return frozenset(kind for _, kind in self.modules)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> AdapterWeights:
        moved = {
            key: LoRATensors(t.a.to(device, non_blocking=non_blocking),
                             t.b.to(device, non_blocking=non_blocking), t.scaling)
            for key, t in self.modules.items()
        }
        return AdapterWeights(self.name, self.version, self.rank, moved)
