"""ControllerCore + LocalRankGroup on real tiny checkpoints and PEFT adapters vs transformers+PEFT.

Every family serves one greedy batch mixing three adapters and base-only prompts (token for
token equal to the oracle run one prompt at a time with its adapter) and scores prompts
(logits within 1e-4 relative in norm). On Qwen3-MoE: adapter variants, continuous batching
with staggered arrivals and chunked prefill, LRU with transparent reload, in-flight pins,
and every refusal leaving the core serving unchanged outputs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from oracle import oracle_greedy, oracle_logits

from lora_cluster.config import ClusterConfig, SamplingParams
from lora_cluster.engine.controller_core import ControllerCore
from lora_cluster.engine.rank_group import LocalRankGroup
from lora_cluster.engine.tokenizer import Tokenizer
from lora_cluster.errors import (
    AdapterError,
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterRankError,
    AdapterShapeError,
    UnsupportedAdapterError,
)
from lora_cluster.model.spec import load_model_spec

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*pattern keys did not match:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

# Three adapters per family the oracle loads faithfully (see lora_cluster/testing/FORMATS.md).
FAMILY_ADAPTERS = {
    "qwen3_moe": {"attn": {"targets": ["attention"], "seed": 1},
                  "experts": {"targets": ["experts"], "expert_format": "3d", "r": 4, "seed": 2},
                  "all": {"targets": ["all"], "expert_format": "2d", "use_rslora": True,
                          "r": 16, "seed": 3}},
    "mixtral": {"attn": {"targets": ["attention"], "seed": 1},
                "experts": {"targets": ["attention", "experts"], "expert_format": "2d", "seed": 2},
                "all": {"targets": ["all"], "expert_format": "3d", "seed": 3}},
    "qwen2_moe": {"attn": {"targets": ["attention"], "seed": 1},
                  "shared": {"targets": ["attention", "shared_expert"], "seed": 2},
                  "all": {"targets": ["all"], "expert_format": "3d", "r": 4, "seed": 3}},
    "llama": {"attn": {"targets": ["q_proj", "v_proj"], "seed": 1},
              "mlp": {"targets": ["mlp"], "use_rslora": True, "r": 16, "seed": 2},
              "all": {"targets": ["all"], "r": 4, "alpha": 4, "seed": 3}},
    "qwen3": {"attn": {"targets": ["attention"], "seed": 1},
              "mlp": {"targets": ["mlp"], "seed": 2},
              "all": {"targets": ["all"], "seed": 3, "rank_pattern": {"q_proj": 4},
                      "alpha_pattern": {"o_proj": 3}}},
}
PROMPTS = [[1, 40, 41, 42, 300, 7, 99], [5, 6, 7], list(range(100, 130)), [200, 17],
           [1, 250, 251, 252, 8], [9]]
MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)


def make_core(model_dir: Path, **overrides) -> ControllerCore:
    options = {"model": str(model_dir), "device": "cpu", "dtype": "float32", "max_loras": 4,
               "max_cpu_loras": 8, "max_lora_rank": 16, "kv_cache_bytes": 4 << 20,
               "block_size": 8, **overrides}
    cfg = ClusterConfig(**options)
    return ControllerCore(cfg, load_model_spec(model_dir), LocalRankGroup(cfg),
                          Tokenizer.from_model_dir(model_dir))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("family", list(FAMILY_ADAPTERS))
def test_mixed_adapter_batch_matches_oracle(fixture_cache, family):
    model_dir = fixture_cache.model(family)
    adapters = {name: fixture_cache.adapter(model_dir, name=name, **opts)
                for name, opts in FAMILY_ADAPTERS[family].items()}
    names = [*adapters, None]
    batch_adapters = [names[i % len(names)] for i in range(len(PROMPTS))]  # 3 adapters + base
    core = make_core(model_dir)
    try:
        for name, path in adapters.items():
            info = core.load_adapter(name, str(path))
            assert info.residency == "host" and info.bytes_per_rank[0] > 0
        results = core.generate(PROMPTS, batch_adapters, GREEDY)
        for prompt, name, res in zip(PROMPTS, batch_adapters, results):
            want = oracle_greedy(model_dir, adapters.get(name), prompt, MAX_TOKENS, stop_at_eos=False)
            assert list(res.token_ids) == want, f"{family} adapter={name} prompt={prompt}"
            assert res.adapter == name and res.finish_reason == "length"
        scored = core.score(PROMPTS[:4], batch_adapters[:4])
        for prompt, name, logits in zip(PROMPTS, batch_adapters, scored):
            ref = oracle_logits(model_dir, adapters.get(name), prompt)
            assert logits.shape == ref.shape and logits.dtype == torch.float32
            assert rel_err(logits, ref) < 1e-4, f"{family} adapter={name}"
            if name is not None:  # the adapter really changes the model
                assert rel_err(logits, oracle_logits(model_dir, None, prompt)) > 1e-2
    finally:
        core.shutdown()


VARIANTS = {
    "attention-only": {"targets": ["attention"], "r": 4},
    "experts-only-2d": {"targets": ["experts"], "expert_format": "2d"},
    "experts-only-3d": {"targets": ["experts"], "expert_format": "3d"},
    "embed-lm_head": {"targets": ["embed_tokens", "lm_head", "q_proj"]},
    "rslora-patterns-3d": {"targets": ["all"], "expert_format": "3d", "use_rslora": True,
                           "rank_pattern": {"model.layers.1.mlp.experts.down_proj": 4, "q_proj": 2},
                           "alpha_pattern": {"k_proj": 3}},
}


def test_adapter_variants_match_oracle(fixture_cache, qwen3_moe_dir):
    core = make_core(qwen3_moe_dir, max_loras=len(VARIANTS))
    try:
        paths = {}
        for name, opts in VARIANTS.items():
            paths[name] = fixture_cache.adapter(qwen3_moe_dir, name=name, seed=7, **opts)
            core.load_adapter(name, str(paths[name]))
        names = list(VARIANTS)
        prompt = PROMPTS[0]
        scored = core.score([prompt] * len(names), names)
        generated = core.generate([prompt] * len(names), names, GREEDY)
        base = oracle_logits(qwen3_moe_dir, None, prompt)
        for name, logits, res in zip(names, scored, generated):
            assert rel_err(logits, oracle_logits(qwen3_moe_dir, paths[name], prompt)) < 1e-4, name
            assert rel_err(logits, base) > 1e-3, name
            assert list(res.token_ids) == oracle_greedy(qwen3_moe_dir, paths[name], prompt,
                                                        MAX_TOKENS, stop_at_eos=False), name
    finally:
        core.shutdown()


@pytest.fixture(scope="module")
def qwen3_adapters(fixture_cache, qwen3_moe_dir):
    return {name: fixture_cache.adapter(qwen3_moe_dir, name=name, **opts)
            for name, opts in FAMILY_ADAPTERS["qwen3_moe"].items()}


def test_staggered_arrivals_and_chunked_prefill_equal_one_at_a_time(qwen3_moe_dir, qwen3_adapters):
    names = [*qwen3_adapters, None]
    requests = [(p, names[i % len(names)]) for i, p in enumerate(PROMPTS)]
    sampling = [GREEDY, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.9, seed=5)]
    core = make_core(qwen3_moe_dir)
    try:
        for name, path in qwen3_adapters.items():
            core.load_adapter(name, str(path))
        alone = [core.generate([p], a, sampling[i % 2])[0].token_ids
                 for i, (p, a) in enumerate(requests)]
    finally:
        core.shutdown()
    # A small token budget forces chunked prefills mixed with running decodes.
    core = make_core(qwen3_moe_dir, max_num_batched_tokens=12, block_size=4)
    try:
        for name, path in qwen3_adapters.items():
            core.load_adapter(name, str(path))
        handles = []
        for i, (p, a) in enumerate(requests):
            handles.append(core.submit(p, a, sampling[i % 2]))
            time.sleep(0.02 * (i % 3))
        assert [h.result(60).token_ids for h in handles] == alone
        stats = core.stats()
        assert stats["generated_tokens"] == sum(len(t) for t in alone)
        assert stats["steps"] > MAX_TOKENS  # the 12-token budget split the prefills
    finally:
        core.shutdown()


def test_lru_eviction_reloads_transparently(qwen3_moe_dir, qwen3_adapters):
    core = make_core(qwen3_moe_dir, max_loras=1, max_cpu_loras=2)
    try:
        first, second, third = qwen3_adapters
        core.load_adapter(first, str(qwen3_adapters[first]))
        before = core.generate([PROMPTS[0]], first, GREEDY)[0].token_ids
        core.load_adapter(second, str(qwen3_adapters[second]))
        core.generate([PROMPTS[1]], second, GREEDY)  # first is now least recently used
        core.load_adapter(third, str(qwen3_adapters[third]))
        residency = {i.name: i.residency for i in core.list_adapters()}
        assert residency[first] == "registered" and residency[third] == "host"
        assert core.generate([PROMPTS[0]], first, GREEDY)[0].token_ids == before
        assert {i.name: i.residency for i in core.list_adapters()}[first] == "device"
        assert core.stats()["tiers"]["host"]["evictions"] >= 1
    finally:
        core.shutdown()


def test_in_flight_adapter_is_not_evicted(qwen3_moe_dir, qwen3_adapters):
    first, second, _ = qwen3_adapters
    core = make_core(qwen3_moe_dir, max_loras=1, max_cpu_loras=1)
    try:
        core.load_adapter(first, str(qwen3_adapters[first]))
        core.load_adapter(second, str(qwen3_adapters[second]))  # first leaves the host cache
        long = core.submit(PROMPTS[2], first, SamplingParams(max_tokens=24, ignore_eos=True))
        next(iter(long))
        other = core.submit(PROMPTS[1], second, GREEDY)  # needs the only slot: waits
        assert list(long.result(60).token_ids) == oracle_greedy(
            qwen3_moe_dir, qwen3_adapters[first], PROMPTS[2], 24, stop_at_eos=False)
        assert list(other.result(60).token_ids) == oracle_greedy(
            qwen3_moe_dir, qwen3_adapters[second], PROMPTS[1], MAX_TOKENS, stop_at_eos=False)
    finally:
        core.shutdown()


REFUSALS = {
    "missing_dir": AdapterNotFoundError,
    "truncated_header": AdapterFormatError,
    "truncated_data": AdapterFormatError,
    "rank_too_large": AdapterRankError,
    "shape": AdapterShapeError,
    "unknown_module": UnsupportedAdapterError,
    "dora": UnsupportedAdapterError,
}


def test_refusals_leave_the_core_serving(fixture_cache, qwen3_moe_dir, qwen3_adapters, tmp_path):
    core = make_core(qwen3_moe_dir, max_lora_rank=16, failed_load_ttl_s=0.0)
    try:
        for name, path in qwen3_adapters.items():
            core.load_adapter(name, str(path))
        names = [*qwen3_adapters, None]
        before = core.generate(PROMPTS[:4], names, GREEDY)
        listed = core.list_adapters()
        for fault, error in REFUSALS.items():
            if fault == "missing_dir":
                source = tmp_path / "does-not-exist"
            elif fault == "rank_too_large":
                source = fixture_cache.adapter(qwen3_moe_dir, name=fault, r=32)
            else:
                source = fixture_cache.adapter(qwen3_moe_dir, name=fault, corrupt=fault,
                                               targets=["attention", "experts"])
            with pytest.raises(error) as caught:
                core.load_adapter(fault, str(source))
            assert isinstance(caught.value, AdapterError) and caught.value.message
            assert core.list_adapters() == listed, fault
            after = core.generate(PROMPTS[:4], names, GREEDY)
            assert [r.token_ids for r in after] == [r.token_ids for r in before], fault
    finally:
        core.shutdown()


def test_preemption_under_a_small_kv_cache_keeps_outputs(qwen3_moe_dir, qwen3_adapters):
    names = [*qwen3_adapters, None]
    # 12 blocks of 4 tokens: the six requests cannot all hold their KV at once.
    core = make_core(qwen3_moe_dir, block_size=4, kv_cache_bytes=13 * 4096)
    try:
        assert core.context_limit == 48
        for name, path in qwen3_adapters.items():
            core.load_adapter(name, str(path))
        batch = [names[i % len(names)] for i in range(len(PROMPTS))]
        results = core.generate(PROMPTS, batch, GREEDY)
        assert core.stats()["num_preemptions"] > 0
        for prompt, name, res in zip(PROMPTS, batch, results):
            assert list(res.token_ids) == oracle_greedy(
                qwen3_moe_dir, qwen3_adapters.get(name), prompt, MAX_TOKENS, stop_at_eos=False)
    finally:
        core.shutdown()


def test_rank_failure_mid_batch_recovers_with_same_tokens(qwen3_moe_dir, qwen3_adapters):
    names = [*qwen3_adapters, None]
    batch = [names[i % len(names)] for i in range(len(PROMPTS))]
    core = make_core(qwen3_moe_dir, max_loras=2)
    try:
        for name, path in qwen3_adapters.items():
            core.load_adapter(name, str(path))
        want = core.generate(PROMPTS, batch, GREEDY)
        runtime = core.group.runtime  # type: ignore[attr-defined]
        real, calls = runtime.execute, []

        def dies_on_third_step(command):
            calls.append(command)
            if len(calls) == 3:
                raise RuntimeError("simulated rank crash")
            return real(command)

        runtime.execute = dies_on_third_step
        got = core.generate(PROMPTS, batch, GREEDY)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert core.group.runtime is not runtime  # type: ignore[attr-defined]
        assert core.stats()["rank_group_restarts"] == 1
        assert {i.residency for i in core.list_adapters()} <= {"host", "device"}
    finally:
        core.shutdown()
