"""The engine on CUDA: decode steps replayed from CUDA graphs give the tokens of eager CUDA and
of the CPU path, with mixed adapters and base rows in every bucket; the seeded sampler draws
the same tokens on both devices.

Runs only with a GPU (``-m gpu``).
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from lora_cluster.config import ClusterConfig, PrefillBatching, SamplingParams
from lora_cluster.engine.controller_core import ControllerCore
from lora_cluster.engine.messages import SampleSpec
from lora_cluster.engine.rank_group import LocalRankGroup
from lora_cluster.engine.sampler import SamplingBatch, sample
from lora_cluster.engine.tokenizer import Tokenizer
from lora_cluster.model.spec import load_model_spec
from lora_cluster.testing.cache import FixtureCache

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ADAPTERS = {"attn": {"targets": ["attention"], "seed": 1},
            "experts": {"targets": ["experts"], "expert_format": "3d", "r": 4, "seed": 2},
            "all": {"targets": ["all"], "use_rslora": True, "r": 16, "seed": 3}}
PROMPTS = [[1, 40, 41, 42, 300, 7, 99], [5, 6, 7], list(range(100, 130)), [200, 17],
           [1, 250, 251, 252, 8], [9], [33, 34], list(range(60, 80)), [3, 3, 3]]
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


def _core(model_dir, adapters, device: str, graphs: bool, dtype: str = "float32") -> ControllerCore:
    cfg = ClusterConfig(model=str(model_dir), device=device, dtype=dtype,  # type: ignore[arg-type]
                        max_loras=4, max_cpu_loras=8, max_lora_rank=16,
                        kv_cache_bytes=16 << 20, block_size=16, max_num_seqs=16,
                        use_cuda_graphs=graphs,
                        # admit at once: staggered arrivals must give decode batches of
                        # many sizes (holding prefills would admit them together)
                        prefill_hold_steps=0)
    core = ControllerCore(cfg, load_model_spec(model_dir), LocalRankGroup(cfg),
                          Tokenizer.from_model_dir(model_dir))
    for name, path in adapters.items():
        core.load_adapter(name, str(path))
    return core


def _run(core: ControllerCore, names: list) -> tuple[list, list, list]:
    batch = [r.token_ids for r in core.generate(PROMPTS, names, GREEDY)]
    # Staggered arrivals: decode batches of many sizes (every graph bucket up to 16).
    handles = []
    for i, (p, a) in enumerate(zip(PROMPTS, names)):
        handles.append(core.submit(p, a, GREEDY))
        time.sleep(0.01 * (i % 3))
    staggered = [h.result(120).token_ids for h in handles]
    scored = core.score(PROMPTS[:4], names[:4])
    return batch, staggered, scored


def test_cuda_graph_decode_matches_eager_and_cpu(tmp_path) -> None:
    cache = FixtureCache(tmp_path)
    model_dir = cache.model("qwen3_moe")
    adapters = {n: cache.adapter(model_dir, name=n, **o) for n, o in ADAPTERS.items()}
    names = [[*adapters, None][i % 4] for i in range(len(PROMPTS))]
    out = {}
    for label, device, graphs in (("cpu", "cpu", False), ("eager", "cuda", False),
                                  ("graphs", "cuda", True)):
        core = _core(model_dir, adapters, device, graphs)
        try:
            out[label] = _run(core, names)
            stats = core.group.stats()[0]  # type: ignore[attr-defined]
            if graphs:
                assert stats["cuda_graph_buckets"] == [1, 2, 4, 8, 16]
                assert stats["cuda_graph_replays"] >= 2 * GREEDY.max_tokens
            else:
                assert stats["cuda_graph_replays"] == 0
        finally:
            core.shutdown()
    cpu_batch, cpu_staggered, cpu_scored = out["cpu"]
    assert cpu_staggered == cpu_batch
    for label in ("eager", "graphs"):
        batch, staggered, scored = out[label]
        assert batch == cpu_batch, label
        assert staggered == cpu_batch, label
        for ours, ref in zip(scored, cpu_scored):
            assert ours.device.type == "cpu" and ours.dtype == torch.float32
            # Triton float32 dots may run in TF32: looser than the CPU's 1e-4.
            assert float((ours - ref).norm() / ref.norm()) < 5e-3, label


def test_bfloat16_graphs_serve(tmp_path) -> None:
    cache = FixtureCache(tmp_path)
    model_dir = cache.model("mixtral")
    adapters = {"all": cache.adapter(model_dir, name="all", targets=["all"], expert_format="3d")}
    core = _core(model_dir, adapters, "cuda", True, dtype="bfloat16")
    try:
        res = core.generate(PROMPTS, ["all", None, "all"] * 3, GREEDY)
        assert all(len(r.token_ids) == GREEDY.max_tokens for r in res)
        assert core.group.stats()[0]["cuda_graph_replays"] > 0  # type: ignore[attr-defined]
    finally:
        core.shutdown()


def test_sampler_same_draws_on_cuda_and_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 1000, generator=gen) * 3
    specs = [SampleSpec(temperature=0.7 + 0.01 * i, top_k=(0, 40)[i % 2], top_p=(1.0, 0.9)[i % 3 == 0],
                        seed=1000 + i, index=i) for i in range(32)]
    cpu = sample(logits, SamplingBatch.from_specs(specs, "cpu"))
    cuda = sample(logits.cuda(), SamplingBatch.from_specs(specs, "cuda"))
    assert cuda.cpu().tolist() == cpu.tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hundred_prompts_graph_replay_equals_eager(tmp_path, dtype: str) -> None:
    """100 prompts mixing three adapters and base-only rows: graph replay == eager, 100/100."""
    cache = FixtureCache(tmp_path)
    model_dir = cache.model("qwen3_moe")
    adapters = {n: cache.adapter(model_dir, name=n, **o) for n, o in ADAPTERS.items()}
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(4, 380, (int(torch.randint(1, 40, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(100)]
    names = [[*adapters, None][int(torch.randint(0, 4, (1,), generator=gen))] for _ in range(100)]
    outputs = {}
    for graphs in (False, True):
        cfg = ClusterConfig(model=str(model_dir), device="cuda", dtype=dtype,  # type: ignore[arg-type]
                            max_loras=4, max_cpu_loras=8, max_lora_rank=16,
                            kv_cache_bytes=64 << 20, max_num_seqs=32, use_cuda_graphs=graphs)
        core = ControllerCore(cfg, load_model_spec(model_dir), LocalRankGroup(cfg),
                              Tokenizer.from_model_dir(model_dir))
        try:
            for name, path in adapters.items():
                core.load_adapter(name, str(path))
            outputs[graphs] = [r.token_ids for r in core.generate(prompts, names, GREEDY)]
            replays = core.group.stats()[0]["cuda_graph_replays"]  # type: ignore[attr-defined]
            assert (replays > 0) == graphs
        finally:
            core.shutdown()
    same = sum(a == b for a, b in zip(outputs[False], outputs[True]))
    assert same == 100, f"{same}/100 identical greedy outputs ({dtype})"


def test_split_mixed_steps_equal_unsplit(tmp_path) -> None:
    """100 prompts (some chunked) and scoring requests through 32 seats: nearly every step mixes
    new prompts into decodes. Split steps (decode rows replayed from the graphs, the rest in an
    eager forward), with and without prefill batching, give the greedy tokens and scores of
    unsplit steps — float32, TF32 off."""
    cache = FixtureCache(tmp_path)
    model_dir = cache.model("qwen3_moe")
    adapters = {n: cache.adapter(model_dir, name=n, **o) for n, o in ADAPTERS.items()}
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(4, 380, (int(torch.randint(1, 60, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(100)]
    names = [[*adapters, None][int(torch.randint(0, 4, (1,), generator=gen))] for _ in range(100)]
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    outputs = {}
    try:
        for mode in ("unsplit", "split", "split+hold"):
            # Holding: a step budget of 64 tokens is filled by the 1-3 prompts a free seat or
            # two let in, so nothing is ever held (measured: 0 held steps); 128 tokens with
            # batches of 8 prompts holds some (4 on CPU with the same prompts).
            cfg = ClusterConfig(model=str(model_dir), device="cuda", dtype="float32",
                                max_loras=4, max_cpu_loras=8, max_lora_rank=16,
                                kv_cache_bytes=64 << 20, max_num_seqs=32,
                                max_num_batched_tokens=128 if mode == "split+hold" else 64,
                                use_cuda_graphs=True)
            group = LocalRankGroup(cfg)
            core = ControllerCore(cfg, load_model_spec(model_dir), group,
                                  Tokenizer.from_model_dir(model_dir))
            try:
                assert group.runtime is not None
                runner = group.runtime.runner
                runner.split_mixed = mode != "unsplit"
                runner.split_min_decodes = 1
                batching = PrefillBatching(hold_steps=4, min_prompts=8) if mode == "split+hold" \
                    else PrefillBatching()
                core.scheduler.cfg = dataclasses.replace(core.scheduler.cfg,
                                                         prefill_batching=batching)
                for name, path in adapters.items():
                    core.load_adapter(name, str(path))
                handles = [core.submit(p, n, GREEDY) for p, n in zip(prompts, names)]
                scores = [core.submit(p, n, score=True) for p, n in zip(prompts[::10], names[::10])]
                tokens = [h.result(300).token_ids for h in handles]
                logits = [h.logits(300) for h in scores]
                outputs[mode] = (tokens, logits)
                stats = runner.stats()
                if mode == "unsplit":
                    assert stats["split_steps"] == 0
                else:
                    assert stats["split_steps"] >= 10 and stats["split_decode_rows"] > 0, stats
                if mode == "split+hold":
                    assert core.stats()["prefill_held_steps"] > 0
            finally:
                core.shutdown()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    ref_tokens, ref_logits = outputs["unsplit"]
    for mode in ("split", "split+hold"):
        tokens, logits = outputs[mode]
        same = sum(a == b for a, b in zip(ref_tokens, tokens))
        assert same == 100, f"{same}/100 identical greedy outputs ({mode})"
        for ours, ref in zip(logits, ref_logits):
            assert float((ours - ref).norm() / ref.norm()) < 1e-4, mode


def _graph_vs_eager_prefill_logits(runner) -> float:
    """Largest relative error of last-row logits: a prefill graph replay vs the eager forward
    of the same 8 prompts (varied lengths, slots and base rows) on an idle engine's cache."""
    from lora_cluster.engine.messages import SeqStep
    from lora_cluster.engine.runner import build_batch

    gen = torch.Generator().manual_seed(3)
    bs, next_block, seqs = runner.block_size, 0, []
    for i in range(8):
        n = int(torch.randint(2, 30, (1,), generator=gen))  # 8 x < 30 rows fit the 256 bucket
        blocks = tuple(range(next_block, next_block + -(-n // bs)))
        next_block += len(blocks)
        seqs.append(SeqStep(seq_id=10**6 + i, token_ids=tuple(
            torch.randint(4, 380, (n,), generator=gen).tolist()), start_pos=0,
            new_blocks=blocks, slot=i % 4 - 1, sample=SampleSpec()))
    tables = [list(s.new_blocks) for s in seqs]
    with torch.inference_mode():
        graph = runner.prefill_graphs.run(seqs, tables, bs).float().clone()
        batch, spans = build_batch(seqs, tables, block_size=bs, device=runner.device)
        eager = runner.model.forward(batch, runner.kv_cache).float()
    rows = torch.tensor([end - 1 for _, end in spans], device=eager.device)
    eager = eager.index_select(0, rows)
    return float(((graph - eager).norm(dim=-1) / eager.norm(dim=-1)).max())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_graphs_equal_eager_prefill(tmp_path, dtype: str) -> None:
    """100 prompts (1-80 tokens, three adapters and base rows, some chunked) through 32 seats,
    split steps on: prefill parts replayed from the prefill graphs give the greedy tokens of
    eager prefill forwards (float32, TF32 off); a replay's logits match the eager forward's
    (float32 1e-4, bfloat16 1e-2 relative)."""
    cache = FixtureCache(tmp_path)
    model_dir = cache.model("qwen3_moe")
    adapters = {n: cache.adapter(model_dir, name=n, **o) for n, o in ADAPTERS.items()}
    gen = torch.Generator().manual_seed(13)
    prompts = [torch.randint(4, 380, (int(torch.randint(1, 80, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(100)]
    names = [[*adapters, None][int(torch.randint(0, 4, (1,), generator=gen))] for _ in range(100)]
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    outputs = {}
    try:
        for on in (False, True):
            cfg = ClusterConfig(model=str(model_dir), device="cuda", dtype=dtype,  # type: ignore[arg-type]
                                max_loras=4, max_cpu_loras=8, max_lora_rank=16,
                                kv_cache_bytes=64 << 20, max_num_seqs=32,
                                max_num_batched_tokens=256, use_cuda_graphs=True)
            group = LocalRankGroup(cfg)
            core = ControllerCore(cfg, load_model_spec(model_dir), group,
                                  Tokenizer.from_model_dir(model_dir))
            try:
                assert group.runtime is not None
                runner = group.runtime.runner
                assert runner.prefill_graphs is not None
                runner.set_prefill_graphs(on)
                runner.split_min_decodes = 1
                for name, path in adapters.items():
                    core.load_adapter(name, str(path))
                handles = [core.submit(p, n, GREEDY) for p, n in zip(prompts, names)]
                outputs[on] = [h.result(300).token_ids for h in handles]
                stats = runner.stats()
                if on:
                    assert stats["prefill_graph_forwards"] >= 10, stats
                    assert stats["prefill_graph_capture_ms"] > 0, stats
                    err = _graph_vs_eager_prefill_logits(runner)
                    assert err < (1e-2 if dtype == "bfloat16" else 1e-4), err
                else:
                    assert stats["prefill_graph_forwards"] == 0
            finally:
                core.shutdown()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if dtype == "float32":
        same = sum(a == b for a, b in zip(outputs[False], outputs[True]))
        assert same == 100, f"{same}/100 identical greedy outputs"
