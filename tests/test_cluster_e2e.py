"""End to end through Ray: Cluster handle → controller actor → rank actor(s) → tokens.

One embedded local Ray for the session; one cluster per module. Outputs are checked against
the transformers + PEFT oracle on the same files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from oracle import oracle_greedy, oracle_logits

from lora_cluster import Cluster, ClusterConfig, SamplingParams, errors

pytestmark = pytest.mark.ray

ADAPTERS = {
    "attn": {"targets": ["attention"], "r": 8, "alpha": 16, "seed": 21},
    "experts2d": {"targets": ["experts"], "r": 8, "alpha": 16, "seed": 22},
    "all-rs": {"targets": ["all"], "r": 16, "alpha": 32, "seed": 23, "use_rslora": True},
    "fused3d": {"targets": ["attention", "experts"], "r": 4, "alpha": 8, "seed": 24,
                "expert_format": "3d"},
}
PROMPTS = [[1, 17, 42, 99, 7], [1, 200, 5, 9], [1, 33, 34, 35, 36, 37, 38], [1, 250, 251],
           [1, 8, 16, 32, 64]]
MAX_NEW = 6


@pytest.fixture(scope="module")
def served(ray_session: Any, fixture_cache: Any) -> Any:
    model_dir = fixture_cache.model("qwen3_moe")
    dirs = {name: fixture_cache.adapter(model_dir, **opts) for name, opts in ADAPTERS.items()}
    cfg = ClusterConfig(model=str(model_dir), device="cpu", max_loras=4, max_cpu_loras=8,
                        kv_cache_bytes=16 << 20)
    cluster = Cluster.start(cfg)
    for name, path in dirs.items():
        cluster.load_adapter(name, str(path))
    yield cluster, model_dir, dirs
    cluster.shutdown()


def _batch(cluster: Cluster) -> list[Any]:
    names: list[str | None] = ["attn", "experts2d", None, "all-rs", "fused3d"]
    return cluster.generate(PROMPTS, adapters=names,
                            sampling=SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))


def test_mixed_batch_matches_transformers_peft(served: Any) -> None:
    cluster, model_dir, dirs = served
    results = _batch(cluster)
    for prompt, res in zip(PROMPTS, results):
        adapter_dir = dirs[res.adapter] if res.adapter else None
        want = oracle_greedy(model_dir, adapter_dir, prompt, MAX_NEW, stop_at_eos=False)
        assert list(res.token_ids) == want, res.adapter
        assert res.finish_reason == "length"


def test_score_logits_travel_by_reference_and_match(served: Any) -> None:
    cluster, model_dir, dirs = served
    logits = cluster.score(PROMPTS[:2], adapters=["all-rs", None])
    for prompt, got, adapter in zip(PROMPTS[:2], logits, [dirs["all-rs"], None]):
        want = oracle_logits(model_dir, adapter, prompt)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got - want).norm() / want.norm() < 1e-4


def test_text_prompt_uses_the_tokenizer(served: Any) -> None:
    cluster, _, _ = served
    (res,) = cluster.generate(["The quick brown fox"], adapters="attn",
                              sampling=SamplingParams(max_tokens=4, ignore_eos=True))
    assert res.text is not None and len(res.token_ids) == 4 and res.adapter == "attn"


@pytest.mark.parametrize("fault", ["missing_config", "truncated_header", "dora", "shape",
                                   "unknown_module"])
def test_bad_adapter_is_refused_typed_and_the_rest_keeps_serving(
        served: Any, fixture_cache: Any, tmp_path: Path, fault: str) -> None:
    from lora_cluster.testing import write_adapter

    cluster, model_dir, _ = served
    before = _batch(cluster)
    names_before = {i.name for i in cluster.list_adapters()}
    bad = write_adapter(tmp_path / "bad", model_dir, corrupt=fault, targets=["attention"])
    with pytest.raises(errors.AdapterError) as info:
        cluster.load_adapter("bad", str(bad))
    assert type(info.value).__module__ == "lora_cluster.errors"
    assert {i.name for i in cluster.list_adapters()} == names_before
    assert [r.token_ids for r in _batch(cluster)] == [r.token_ids for r in before]


def test_missing_directory_and_unknown_adapter(served: Any, tmp_path: Path) -> None:
    cluster, _, _ = served
    with pytest.raises(errors.AdapterNotFoundError, match="nowhere"):
        cluster.load_adapter("ghost", str(tmp_path / "nowhere"))
    with pytest.raises(errors.UnknownAdapterError, match="ghost"):
        cluster.generate([[1, 2, 3]], adapters="ghost")


def test_rank_above_max_is_refused(served: Any, fixture_cache: Any) -> None:
    cluster, model_dir, _ = served
    big = fixture_cache.adapter(model_dir, targets=["attention"], r=128, alpha=128, seed=5)
    with pytest.raises(errors.AdapterRankError, match="128"):
        cluster.load_adapter("big", str(big))


def test_list_stats_evict(served: Any, fixture_cache: Any) -> None:
    cluster, model_dir, _ = served
    extra = fixture_cache.adapter(model_dir, targets=["attention"], r=4, alpha=4, seed=77)
    info = cluster.load_adapter("extra", str(extra))
    assert info.name == "extra" and info.rank == 4 and info.bytes_per_rank and info.load_ms > 0
    assert "extra" in {i.name for i in cluster.list_adapters()}
    stats = cluster.stats()
    assert stats["world_size"] == 1 and "tiers" in stats
    cluster.evict_adapter("extra")
    assert "extra" not in {i.name for i in cluster.list_adapters()}
    with pytest.raises(errors.UnknownAdapterError):
        cluster.generate([[1, 2]], adapters="extra")
