"""Writing adapters into the model's LoRA slots: validate everything, then clear and write.

The model owns a table ``(layer, kind) → target`` built once from its layers; an adapter's
modules are checked against it (shape, rank ≤ R) before a single byte is written, so a bad
adapter leaves the slot as it was. ``AdapterWeights`` (lora_cluster.adapters) satisfies the
``SlotWeights`` protocol; the model package only depends on its shape.

Shape legend: r a module's rank, R max rank, E local experts, V local vocab, H hidden.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lora_cluster.errors import AdapterRankError, AdapterShapeError, UnsupportedAdapterError
from lora_cluster.model.step_context import KIND_GROUP

ModuleKey = tuple[int | None, str]
Writer = Callable[[int, torch.Tensor, torch.Tensor, float], None]


class SlotTensors(Protocol):
    a: torch.Tensor
    b: torch.Tensor
    scaling: float


class SlotWeights(Protocol):
    """What a slot write reads: ``lora_cluster.adapters.weights.AdapterWeights`` fits."""

    name: str
    modules: Mapping[ModuleKey, SlotTensors]


@dataclass(frozen=True)
class LoRATarget:
    """One LoRA-capable module on this rank: expected local shapes (``-1`` = the rank) + writer.

    linear: a (r, in_local), b (out_local, r); experts: a (E, r, in_local), b (E, out_local, r);
    embed_tokens: a (r, V_local), b (H, r).
    """

    group: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    write: Writer


def _fits(shape: tuple[int, ...], expected: tuple[int, ...], rank: int) -> bool:
    return len(shape) == len(expected) and all(
        s == (rank if e == -1 else e) for s, e in zip(shape, expected))


class LoRASlotTable:
    """All LoRA targets of one rank's model, and the slot write/clear logic over them."""

    def __init__(self, targets: dict[ModuleKey, LoRATarget], skipped: frozenset[str],
                 clearers: Sequence[Callable[[int], None]], max_rank: int) -> None:
        self.targets = targets
        self.skipped = skipped  # kinds another EP rank holds (ignored here, not an error)
        self._clearers = clearers
        self.max_rank = max_rank

    def validate(self, weights: SlotWeights) -> list[tuple[LoRATarget, SlotTensors]]:
        """Every module checked against its target; raises before anything is written."""
        plan = []
        for key, tensors in weights.modules.items():
            target = self.targets.get(key)
            if target is None:
                if key[1] in self.skipped:
                    continue
                raise UnsupportedAdapterError(
                    f"adapter {weights.name!r}: module (layer={key[0]}, kind={key[1]!r}) is not "
                    "a LoRA target of this model", adapter=weights.name, module=str(key))
            a, b = tensors.a, tensors.b
            rank = int(a.shape[-2]) if a.dim() >= 2 else -1
            if rank > self.max_rank:
                raise AdapterRankError(
                    f"adapter {weights.name!r}: rank {rank} of (layer={key[0]}, kind={key[1]!r})"
                    f" exceeds max_lora_rank={self.max_rank}", adapter=weights.name,
                    module=str(key), rank=rank, max_lora_rank=self.max_rank)
            if rank < 1 or not (_fits(tuple(a.shape), target.a_shape, rank)
                                and _fits(tuple(b.shape), target.b_shape, rank)):
                raise AdapterShapeError(
                    f"adapter {weights.name!r}: (layer={key[0]}, kind={key[1]!r}) has A "
                    f"{list(a.shape)} and B {list(b.shape)}; this rank expects A "
                    f"{_show(target.a_shape)} and B {_show(target.b_shape)} (r ≤ {self.max_rank})",
                    adapter=weights.name, module=str(key))
            plan.append((target, tensors))
        return plan

    def clear(self, slot: int) -> None:
        for clear in self._clearers:
            clear(slot)

    def write(self, slot: int, weights: SlotWeights) -> frozenset[str]:
        """Validate, clear ``slot``, write every module; returns the groups the adapter has."""
        plan = self.validate(weights)
        self.clear(slot)
        for target, tensors in plan:
            target.write(slot, tensors.a, tensors.b, float(tensors.scaling))
        return frozenset(target.group for target, _ in plan)


def _show(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("r" if d == -1 else str(d) for d in shape) + "]"


def linear_target(kind: str, in_local: int, out_local: int, write: Writer) -> LoRATarget:
    return LoRATarget(KIND_GROUP[kind], (-1, in_local), (out_local, -1), write)


def expert_target(kind: str, experts: int, in_local: int, out_local: int,
                  write: Writer) -> LoRATarget:
    return LoRATarget(KIND_GROUP[kind], (experts, -1, in_local), (experts, out_local, -1), write)


def embedding_target(vocab_local: int, hidden: int, write: Writer) -> LoRATarget:
    return LoRATarget(KIND_GROUP["embed_tokens"], (-1, vocab_local), (hidden, -1), write)
