"""Sparse MoE block: replicated router, this rank's experts, optional gated shared expert.

Experts are partitioned over EP ranks (``parallel.local_experts``) and each is TP-sharded
inside its EP group: w13 keeps this rank's rows of gate *and* of up, w2 its input columns.
Every rank sees all tokens and computes its local experts' partial sums; Qwen2-MoE's shared
expert adds its TP partial on EP rank 0 only, and one ``all_reduce_world`` combines it all.

Shape legend: T rows, H hidden, E global experts, E_l local experts, K top-k,
I_l local expert intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lora_kernels import ops
from torch import nn

from lora_cluster.model.checkpoint import CheckpointReader
from lora_cluster.model.layers.lora_buffers import ExpertLoRA, LoRACapacity
from lora_cluster.model.layers.mlp import DenseMLP
from lora_cluster.model.parallel import Comm, ParallelInfo, expert_map, local_experts
from lora_cluster.model.sharding import holds_shared_expert, intermediate_shard
from lora_cluster.model.spec import ModelSpec
from lora_cluster.model.step_context import StepContext

# On-disk names of (gate, up, down) for one expert.
_EXPERT_NAMES = {"qwen": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, renormalize: bool,
          keep_float32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] → (weights [T, K], expert ids [T, K]): float32 softmax, top-k, renormalize.

    Qwen routers cast the weights back to the model dtype; Mixtral's keep float32.
    """
    logits = F.linear(x, router_weight)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights if keep_float32 else weights.to(logits.dtype)), ids


class SparseMoE(nn.Module):
    """x [T, H] → Σ_k w_k · expert_k(x) (+ sigmoid-gated shared expert), summed over ranks."""

    router: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    expert_map: torch.Tensor
    shared_gate: torch.Tensor

    def __init__(self, spec: ModelSpec, parallel: ParallelInfo, *, comm: Comm,
                 cap: LoRACapacity | None, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.spec, self.comm = spec, comm
        self.experts = local_experts(spec.num_experts, parallel)
        self.inter_cols = intermediate_shard(spec.moe_intermediate_size, parallel,
                                             "moe_intermediate_size")
        e_local, h = len(self.experts), spec.hidden_size
        i_local = self.inter_cols[1] - self.inter_cols[0]

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=device)

        self.register_buffer("router", empty(spec.num_experts, h))
        self.register_buffer("w13", empty(e_local, 2 * i_local, h))
        self.register_buffer("w2", empty(e_local, h, i_local))
        self.register_buffer("expert_map", torch.tensor(
            expert_map(spec.num_experts, parallel), dtype=torch.int32, device=device))
        self.lora = ExpertLoRA(e_local, h, i_local, cap, dtype, device) if cap else None
        self.shared: DenseMLP | None = None
        if spec.shared_expert_intermediate_size and holds_shared_expert(parallel):
            self.shared = DenseMLP(
                h, spec.shared_expert_intermediate_size, parallel, comm=comm, bias=False,
                groups=("shared.gate_up", "shared.down"), what="shared_expert_intermediate_size",
                cap=cap, dtype=dtype, device=device)
            self.register_buffer("shared_gate", empty(1, h))

    def load(self, reader: CheckpointReader, layer_prefix: str) -> None:
        """Read the router, this rank's experts' slices and the shared expert of one layer."""
        spec, h = self.spec, self.spec.hidden_size
        block = f"{layer_prefix}.block_sparse_moe" if spec.expert_naming == "mixtral" else (
            f"{layer_prefix}.mlp")
        self.router.copy_(reader.read(f"{block}.gate.weight", (spec.num_experts, h)))
        fused = next((p for p in (f"{block}.experts", f"{layer_prefix}.mlp.experts")
                      if reader.has(f"{p}.gate_up_proj")), None)
        if fused is not None:
            self._load_fused(reader, fused)
        else:
            self._load_per_expert(reader, f"{block}.experts")
        if self.shared is not None:
            self.shared.load(reader, f"{block}.shared_expert")
            self.shared_gate.copy_(reader.read(f"{block}.shared_expert_gate.weight", (1, h)))

    def _load_per_expert(self, reader: CheckpointReader, prefix: str) -> None:
        gate, up, down = _EXPERT_NAMES[self.spec.expert_naming]
        full_i, h = self.spec.moe_intermediate_size, self.spec.hidden_size
        lo, hi = self.inter_cols
        i_local = hi - lo
        for local, expert in enumerate(self.experts):  # remote experts are never opened
            base = f"{prefix}.{expert}"
            self.w13[local, :i_local].copy_(
                reader.read(f"{base}.{gate}.weight", (full_i, h), (slice(lo, hi),)))
            self.w13[local, i_local:].copy_(
                reader.read(f"{base}.{up}.weight", (full_i, h), (slice(lo, hi),)))
            self.w2[local].copy_(reader.read(f"{base}.{down}.weight", (h, full_i),
                                             (slice(None), slice(lo, hi))))

    def _load_fused(self, reader: CheckpointReader, prefix: str) -> None:
        """``gate_up_proj [E, 2I, H]`` (gate rows then up rows) and ``down_proj [E, H, I]``."""
        n, full_i, h = self.spec.num_experts, self.spec.moe_intermediate_size, self.spec.hidden_size
        lo, hi = self.inter_cols
        i_local = hi - lo
        for local, expert in enumerate(self.experts):
            key = f"{prefix}.gate_up_proj"
            self.w13[local, :i_local].copy_(
                reader.read(key, (n, 2 * full_i, h), (expert, slice(lo, hi))))
            self.w13[local, i_local:].copy_(
                reader.read(key, (n, 2 * full_i, h), (expert, slice(full_i + lo, full_i + hi))))
            self.w2[local].copy_(reader.read(f"{prefix}.down_proj", (n, h, full_i),
                                             (expert, slice(None), slice(lo, hi))))

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        spec = self.spec
        weights, ids = route(x, self.router, spec.num_experts_per_tok, spec.norm_topk_prob,
                             keep_float32=spec.family == "mixtral")
        lora = self.lora.as_moe_lora() if self.lora is not None else None
        out = ops.fused_moe(x, weights, ids, self.w13, self.w2, self.expert_map, lora,
                            ctx.expert_slots if lora is not None else None)
        if self.shared is not None:
            gate = torch.sigmoid(F.linear(x, self.shared_gate))
            out = out + gate * self.shared(x, ctx, reduce=False)
        return self.comm.all_reduce_world(out)
