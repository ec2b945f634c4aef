"""TP × EP selective loading: every rank's slices put back together give the tp=ep=1 tensors,
and each rank materializes no more than its own share (+5 %) — remote experts never."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_cluster.adapters import AdapterWeights, build_load_spec, load_adapter
from lora_cluster.model.parallel import ParallelInfo, local_experts
from lora_cluster.model.sharding import COLUMN_KINDS
from lora_cluster.model.spec import SHARED_EXPERT_KINDS, ModelSpec, load_model_spec

LAYOUTS = [(tp, ep, placement) for tp in (1, 2) for ep in (1, 2, 4)
           for placement in ("contiguous", "round_robin") if (tp, ep) != (1, 1)
           and not (ep == 1 and placement == "round_robin")]
ADAPTERS = {
    "experts_and_attention_2d": ("qwen2_moe", {"targets": ["all"], "expert_format": "2d"}),
    "experts_and_attention_3d": ("qwen2_moe", {"targets": ["all"], "expert_format": "3d"}),
    "no_expert_targets": ("qwen3_moe", {"targets": ["attention", "embed_tokens", "lm_head"]}),
    "experts_only_2d": ("mixtral", {"targets": ["experts"], "expert_format": "2d"}),
    "experts_only_3d": ("qwen3_moe", {"targets": ["experts"], "expert_format": "3d"}),
    "dense_and_sparse_layers": ("qwen3_moe_dense_layers", {"targets": ["all"],
                                                           "expert_format": "3d"}),
}


def _ranks(tp: int, ep: int, placement: str) -> list[ParallelInfo]:
    return [ParallelInfo.from_rank(r, tp, ep, placement) for r in range(tp * ep)]


def _assemble(spec: ModelSpec, shards: list[tuple[ParallelInfo, AdapterWeights]], key,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Put one module's per-rank slices back together (and check the replicated parts)."""
    _, kind = key
    column = kind in COLUMN_KINDS
    held = [(p, w.modules[key]) for p, w in shards if key in w.modules]
    tp = shards[0][0].tp_size
    if kind in SHARED_EXPERT_KINDS:
        assert {p.ep_rank for p, _ in held} == {0}, "shared experts live on EP rank 0 only"
    if not kind.startswith("experts."):
        by_tp = {}
        for p, t in held:  # replicated over EP: every EP rank holds the same slice
            if p.tp_rank in by_tp:
                assert torch.equal(by_tp[p.tp_rank].a, t.a) and torch.equal(by_tp[p.tp_rank].b, t.b)
            by_tp[p.tp_rank] = t
        parts = [by_tp[i] for i in range(tp)]
        if column:
            assert all(torch.equal(parts[0].a, q.a) for q in parts)
            return parts[0].a, torch.cat([q.b for q in parts], dim=0)
        assert all(torch.equal(parts[0].b, q.b) for q in parts)
        return torch.cat([q.a for q in parts], dim=-1), parts[0].b
    # experts: [E_local, ...] per EP rank, TP-sliced inside each expert
    a_full: dict[int, list[torch.Tensor]] = {}
    b_full: dict[int, list[torch.Tensor]] = {}
    for p, t in sorted(held, key=lambda x: x[0].tp_rank):
        for local, e in enumerate(local_experts(spec.num_experts, p)):
            a_full.setdefault(e, []).append(t.a[local])
            b_full.setdefault(e, []).append(t.b[local])
    assert sorted(a_full) == list(range(spec.num_experts))
    if column:
        return (torch.stack([a_full[e][0] for e in range(spec.num_experts)]),
                torch.stack([torch.cat(b_full[e], dim=0) for e in range(spec.num_experts)]))
    return (torch.stack([torch.cat(a_full[e], dim=-1) for e in range(spec.num_experts)]),
            torch.stack([b_full[e][0] for e in range(spec.num_experts)]))


def _share_bytes(full: AdapterWeights, info: ParallelInfo, num_experts: int) -> int:
    """Bytes this rank must hold, from the full tensors (a fused A shared by gate and up once)."""
    total, seen = 0, set()
    for (_, kind), t in full.modules.items():
        if kind in SHARED_EXPERT_KINDS and info.ep_rank != 0:
            continue
        expert_part = len(local_experts(num_experts, info)) / num_experts if kind.startswith(
            "experts.") else 1.0
        a_split = 1 if kind in COLUMN_KINDS else info.tp_size
        b_split = info.tp_size if kind in COLUMN_KINDS else 1
        for tensor, split in ((t.a, a_split), (t.b, b_split)):
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += int(tensor.numel() * tensor.element_size() * expert_part / split)
    return total


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_rank_slices_reassemble_and_stay_within_share(adapter: str, fixture_cache) -> None:
    family, options = ADAPTERS[adapter]
    model_dir = fixture_cache.model(family)
    adapter_dir = fixture_cache.adapter(model_dir, name=adapter, seed=5, **options)
    spec = load_model_spec(model_dir)
    full = load_adapter(adapter_dir, spec, ParallelInfo(), name=adapter, max_lora_rank=16).weights
    for tp, ep, placement in LAYOUTS:
        shards, stats = [], []
        for info in _ranks(tp, ep, placement):
            loaded = load_adapter(adapter_dir, spec, info, name=adapter, max_lora_rank=16)
            shards.append((info, loaded.weights))
            stats.append((info, loaded.stats))
        keys = {k for _, w in shards for k in w.modules}
        assert keys == set(full.modules), (tp, ep, placement)
        for key in sorted(keys, key=str):
            a, b = _assemble(spec, shards, key)
            ref = full.modules[key]
            assert torch.equal(a, ref.a) and torch.equal(b, ref.b), (key, tp, ep, placement)
            assert all(w.modules[key].scaling == ref.scaling for _, w in shards
                       if key in w.modules)
        for info, st in stats:
            share = _share_bytes(full, info, spec.num_experts)
            assert st.bytes_read <= 1.05 * share, (adapter, tp, ep, placement, info.rank,
                                                   st.bytes_read, share)


def test_load_spec_depends_only_on_model_and_coordinates(fixture_cache) -> None:
    spec = load_model_spec(fixture_cache.model("qwen2_moe"))
    info = ParallelInfo.from_rank(3, 2, 4, "round_robin")
    load = build_load_spec(spec, info)
    assert load.local_experts == (1, 5)
    assert load.local_of.tolist() == [-1, 0, -1, -1, -1, 1, -1, -1]
    assert not load.holds("shared_expert.gate_proj") and load.holds("experts.up_proj")
    assert load.shards["q_proj"].out_range == (64, 128)
    assert load.shards["experts.down_proj"].in_range == (16, 32)
    assert load.shards["embed_tokens"].in_range == (192, 384)
    assert load.expert_runs() == [(1, 2), (5, 6)]
    contiguous = build_load_spec(spec, ParallelInfo.from_rank(2, 2, 4, "contiguous"))
    assert contiguous.local_experts == (2, 3) and contiguous.expert_runs() == [(2, 4)]
    assert contiguous.holds("experts.gate_proj")


def test_ranks_never_read_remote_expert_tensors(fixture_cache, tmp_path: Path) -> None:
    """Per-expert (2D) tensors of other EP ranks are not even opened: tensor count per rank."""
    model_dir = fixture_cache.model("qwen3_moe")
    adapter_dir = fixture_cache.adapter(model_dir, name="experts2d", targets=["experts"],
                                        expert_format="2d")
    spec = load_model_spec(model_dir)
    full = load_adapter(adapter_dir, spec, ParallelInfo(), name="x", max_lora_rank=16)
    for info in _ranks(1, 4, "round_robin"):
        part = load_adapter(adapter_dir, spec, info, name="x", max_lora_rank=16)
        assert part.stats.tensors_read * 4 == full.stats.tensors_read
        assert part.stats.bytes_read * 4 == full.stats.bytes_read
