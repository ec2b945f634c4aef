"""TP × EP on one process: rank models run in lock-step on threads (``ThreadComm``) and must
give the single-rank logits; each rank reads only its shards and its local experts.
"""

from __future__ import annotations

import pytest
import torch
from model_support import ThreadComm, rel_err, run_prompts, run_ranks, shard_adapter

from lora_cluster.model.checkpoint import CheckpointReader
from lora_cluster.model.loader import load_model
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.testing import build_adapter

PROMPTS = [[5, 17, 33, 9, 100, 250, 7], [44, 20, 91], [7, 7, 150, 3, 81]]


def _ranked_forward(model_dir, tp, ep, placement, adapters):
    comms = ThreadComm.group(tp, ep, placement)
    models, caches = [], []
    for comm in comms:
        m = load_model(model_dir, parallel=comm.info, comm=comm, max_loras=2, max_lora_rank=8)
        for slot, modules in adapters.items():
            m.set_lora_slot(slot, shard_adapter(modules, m.spec, comm.info))
        models.append(m)
        caches.append(m.make_kv_cache(num_blocks=96, block_size=4))

    def forward(batch):
        outs = run_ranks([lambda m=m, c=c: m(batch, c) for m, c in zip(models, caches)])
        for other in outs[1:]:  # every rank ends with the full-vocab logits
            assert torch.equal(other, outs[0])
        return outs[0]
    return forward, models


@pytest.mark.parametrize(("family", "tp", "ep", "placement"), [
    ("qwen2_moe", 2, 1, "contiguous"),
    ("qwen2_moe", 1, 2, "round_robin"),
    ("qwen2_moe", 2, 2, "contiguous"),
    ("qwen3_moe_dense_layers", 2, 2, "round_robin"),
    ("mixtral", 1, 4, "contiguous"),
    ("llama", 8, 1, "contiguous"),  # tp > KV heads: KV heads replicated over rank pairs
])
def test_mesh_equals_single_rank(fixture_cache, family, tp, ep, placement) -> None:
    model_dir = fixture_cache.model(family)
    adapter = build_adapter(model_dir, targets=["all"], r=4, seed=11,
                            rank_pattern={"k_proj": 2})
    slots = [1, -1, 1]
    single = load_model(model_dir, max_loras=2, max_lora_rank=8)
    single.set_lora_slot(1, shard_adapter(adapter.modules, single.spec, ParallelInfo()))
    cache = single.make_kv_cache(num_blocks=96, block_size=4)
    ref = run_prompts(lambda b: single(b, cache), PROMPTS, slots, new_tokens=3, chunk_first=3,
                      num_blocks=96)
    forward, models = _ranked_forward(model_dir, tp, ep, placement, {1: adapter.modules})
    ours = run_prompts(forward, PROMPTS, slots, new_tokens=3, chunk_first=3, num_blocks=96)
    for s in range(len(PROMPTS)):
        assert ours.generated[s] == ref.generated[s]
        assert rel_err(ours.full_logits(s), ref.full_logits(s)) <= 1e-5
    # no rank holds another's shard: per-rank weights add up to one model's (+ replicas)
    if ep > 1 and models[0].spec.is_moe:
        layer = next(i for i in range(models[0].spec.num_layers) if models[0].spec.is_sparse(i))
        owned = sorted(e for m in models[:: tp] for e in m.decoder_layers()[layer].moe.experts)
        assert owned == list(range(models[0].spec.num_experts))


def _expected_bytes(model_dir, info: ParallelInfo, spec) -> int:
    """Independent rule: replicated tensors in full, TP-sharded ones 1/tp, remote experts 0."""
    from lora_cluster.model.parallel import local_experts

    total = 0
    mine = set(local_experts(spec.num_experts, info))
    with CheckpointReader(model_dir) as reader:
        for key in reader.tensor_names():
            n = 1
            for d in reader.shape(key):
                n *= d
            parts = key.split(".")
            if ".experts." in key and int(parts[parts.index("experts") + 1]) not in mine:
                continue
            if ".shared_expert" in key and info.ep_rank != 0:
                continue
            replicated = key.endswith(("norm.weight", "mlp.gate.weight", "moe.gate.weight",
                                       "shared_expert_gate.weight"))
            total += 4 * (n if replicated else n // info.tp_size)
    return total


@pytest.mark.parametrize(("family", "tp", "ep"), [("qwen2_moe", 1, 2), ("qwen2_moe", 2, 2),
                                                  ("mixtral", 2, 1)])
def test_each_rank_reads_only_its_share(fixture_cache, family, tp, ep) -> None:
    model_dir = fixture_cache.model(family, sharded=3)
    reads: dict[int, list[str]] = {}
    original = CheckpointReader.read

    for rank in range(tp * ep):
        info = ParallelInfo.from_rank(rank, tp, ep, "contiguous")
        seen: list[str] = []

        def spy(self, key, full_shape, index=(), seen=seen):
            seen.append(key)
            return original(self, key, full_shape, index)

        CheckpointReader.read = spy  # type: ignore[method-assign]
        try:
            model = load_model(model_dir, parallel=info)
        finally:
            CheckpointReader.read = original  # type: ignore[method-assign]
        reads[rank] = seen
        assert model.load_report is not None
        assert model.load_report.bytes_read == _expected_bytes(model_dir, info, model.spec)
        mine = {str(e) for e in model.decoder_layers()[0].moe.experts}
        remote = [k for k in seen if ".experts." in k
                  and k.split(".experts.")[1].split(".")[0] not in mine]
        assert not remote, remote[:3]
        if info.ep_rank:
            assert not [k for k in seen if "shared_expert" in k]
