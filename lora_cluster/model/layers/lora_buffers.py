"""Slot-indexed LoRA buffers that live inside the layers (never swapped at run time).

An adapter is written into a slot once (rank zero-padded to R, ``scaling`` folded into B,
cast to the model dtype); every step then reads the buffers through ``lora_kernels.ops``.
Writers assume the slot was cleared first and the shapes were validated by the caller.

Shape legend: S slots, R max rank, n slices, E local experts, H hidden, V local vocab,
I local expert intermediate, r an adapter module's own rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from lora_kernels import ops
from lora_kernels.meta import LoRAMeta
from lora_kernels.reference import MoELoRA
from torch import nn


@dataclass(frozen=True)
class LoRACapacity:
    """How many adapters a layer can hold at once and their largest rank."""

    max_loras: int
    max_rank: int


# Host → device copies are non-blocking (casts run on the device): from pinned host memory they
# are plain DMAs on the caller's stream, so a slot write issued on a side stream never blocks
# the host (see engine/slot_activation.py). Tensors already in the buffer's dtype with the
# scale folded in ("slot-ready", scaling 1.0) are copied as they are: one copy per tensor.


def _scaled(b: torch.Tensor, scaling: float, like: torch.Tensor) -> torch.Tensor:
    if scaling == 1.0 and b.dtype == like.dtype:
        return b
    # Fold the scale in float32 before the cast so low-precision models lose nothing extra.
    b = b.to(device=like.device, non_blocking=True)
    return (b.to(torch.float32) * scaling).to(like.dtype)


def _cast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if a.dtype == like.dtype:
        return a
    return a.to(device=like.device, non_blocking=True).to(like.dtype)


class LinearLoRA(nn.Module):
    """LoRA of one linear whose output is ``n`` merged slices (q/k/v, gate/up, or one).

    lora_a [n, S, R, in_local]; lora_b [S, out_total, R]; slice ``i`` owns output columns
    ``slice_offsets[i]:slice_offsets[i + 1]``.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor

    def __init__(self, in_local: int, out_sizes: Sequence[int], cap: LoRACapacity,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        offsets = [0]
        for size in out_sizes:
            offsets.append(offsets[-1] + size)
        self.slice_offsets: tuple[int, ...] = tuple(offsets)
        self.register_buffer("lora_a", torch.zeros(
            len(out_sizes), cap.max_loras, cap.max_rank, in_local, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(
            cap.max_loras, offsets[-1], cap.max_rank, dtype=dtype, device=device))

    def add_to(self, out: torch.Tensor, x: torch.Tensor, meta: LoRAMeta) -> None:
        """``out [T, out_total] += LoRA(x [T, in_local])`` for rows whose entry is not -1."""
        ops.add_lora(out, x, self.lora_a, self.lora_b, meta, self.slice_offsets)

    def clear(self, slot: int) -> None:
        self.lora_a[:, slot].zero_()
        self.lora_b[slot].zero_()

    def views(self, slot: int, index: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where slice ``index`` of ``slot`` keeps a rank-``r`` pair: a [r, in], b [out_i, r]."""
        lo, hi = self.slice_offsets[index], self.slice_offsets[index + 1]
        return self.lora_a[index, slot, :r], self.lora_b[slot, lo:hi, :r]

    def write(self, slot: int, index: int, a: torch.Tensor, b: torch.Tensor,
              scaling: float) -> None:
        """Slice ``index`` of ``slot`` ← a [r, in_local], b [out_i, r] · scaling."""
        a_dst, b_dst = self.views(slot, index, a.shape[0])
        a_dst.copy_(_cast(a, self.lora_a), non_blocking=True)
        b_dst.copy_(_scaled(b, scaling, self.lora_b), non_blocking=True)


class EmbeddingLoRA(nn.Module):
    """LoRA of a vocab-parallel embedding: a [S, V_local, R] (rows gathered by token), b [S, H, R]."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor

    def __init__(self, vocab_local: int, hidden: int, cap: LoRACapacity, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.register_buffer("lora_a", torch.zeros(
            cap.max_loras, vocab_local, cap.max_rank, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(
            cap.max_loras, hidden, cap.max_rank, dtype=dtype, device=device))

    def add_to(self, out: torch.Tensor, local_ids: torch.Tensor, meta: LoRAMeta) -> None:
        """``out [T, H] += A[token] @ B.T``; ids outside this vocab shard are -1 (no delta)."""
        ops.add_lora_embedding(out, local_ids, self.lora_a, self.lora_b, meta)

    def clear(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def views(self, slot: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where ``slot`` keeps a rank-``r`` pair: a [r, V_local] (a transposed view), b [H, r]."""
        return self.lora_a[slot, :, :r].T, self.lora_b[slot, :, :r]

    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """``slot`` ← a [r, V_local] (PEFT lora_embedding_A), b [H, r] · scaling."""
        a_dst, b_dst = self.views(slot, a.shape[0])
        a_dst.copy_(_cast(a, self.lora_a), non_blocking=True)
        b_dst.copy_(_scaled(b, scaling, self.lora_b), non_blocking=True)


EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")


class ExpertLoRA(nn.Module):
    """Expert LoRA of one MoE layer, entry = slot · E + local expert (``MoELoRA`` layout).

    a13 [2, S·E, R, H] (gate, up), b13 [S·E, 2I, R], a2 [1, S·E, R, I], b2 [S·E, H, R].
    """

    a13: torch.Tensor
    b13: torch.Tensor
    a2: torch.Tensor
    b2: torch.Tensor

    def __init__(self, num_local: int, hidden: int, inter_local: int, cap: LoRACapacity,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.num_local = num_local
        self.inter_local = inter_local
        entries, r = cap.max_loras * num_local, cap.max_rank

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.register_buffer("a13", zeros(2, entries, r, hidden))
        self.register_buffer("b13", zeros(entries, 2 * inter_local, r))
        self.register_buffer("a2", zeros(1, entries, r, inter_local))
        self.register_buffer("b2", zeros(entries, hidden, r))

    def as_moe_lora(self) -> MoELoRA:
        return MoELoRA(self.a13, self.b13, self.a2, self.b2)

    def _entries(self, slot: int) -> slice:
        return slice(slot * self.num_local, (slot + 1) * self.num_local)

    def clear(self, slot: int) -> None:
        rows = self._entries(slot)
        for buf in (self.b13, self.b2):
            buf[rows].zero_()
        for buf in (self.a13, self.a2):
            buf[:, rows].zero_()

    def views(self, slot: int, part: str, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where ``part`` of ``slot``'s experts keeps a rank-``r`` pair: a [E, r, in_local],
        b [E, out_local, r] (gate and up B interleave per expert inside b13)."""
        rows, inter = self._entries(slot), self.inter_local
        if part == "down_proj":
            return self.a2[0, rows, :r], self.b2[rows, :, :r]
        index = EXPERT_PARTS.index(part)
        return (self.a13[index, rows, :r],
                self.b13[rows, index * inter:(index + 1) * inter, :r])

    def write(self, slot: int, part: str, a: torch.Tensor, b: torch.Tensor,
              scaling: float) -> None:
        """``part`` of every local expert ← a [E, r, in_local], b [E, out_local, r] · scaling."""
        a_dst, b_dst = self.views(slot, part, a.shape[1])
        a_dst.copy_(_cast(a, a_dst), non_blocking=True)
        b_dst.copy_(_scaled(b, scaling, b_dst), non_blocking=True)
