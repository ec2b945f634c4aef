"""TP × EP rank groups on Ray (gloo on CPU): every layout computes what one rank computes.

Also the fault drill: a rank actor killed in the middle of a batch makes the controller
rebuild the group, reload the adapters and re-run the requests, which return the same tokens.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import ray
from oracle import oracle_greedy, oracle_logits

from lora_cluster import Cluster, ClusterConfig, SamplingParams
from lora_cluster.engine.gc_pauses import SERVE_THRESHOLDS

pytestmark = pytest.mark.ray

ADAPTERS = {
    "attn": {"targets": ["attention"], "r": 8, "alpha": 16, "seed": 31},
    "experts": {"targets": ["experts"], "r": 8, "alpha": 16, "seed": 32},
    "all3d": {"targets": ["all"], "r": 4, "alpha": 8, "seed": 33, "expert_format": "3d"},
}
PROMPTS = [[1, 17, 42, 99, 7], [1, 200, 5, 9], [1, 33, 34, 35, 36], [1, 250, 251, 252]]
NAMES: list[str | None] = ["attn", "experts", None, "all3d"]
MAX_NEW = 5


def _start(model_dir: Any, dirs: dict[str, Any], **layout: Any) -> Cluster:
    cfg = ClusterConfig(model=str(model_dir), device="cpu", max_loras=4, max_cpu_loras=8,
                        kv_cache_bytes=8 << 20, **layout)
    cluster = Cluster.start(cfg)
    for name, path in dirs.items():
        cluster.load_adapter(name, str(path))
    return cluster


@pytest.fixture(scope="module")
def assets(fixture_cache: Any) -> tuple[Any, dict[str, Any], list[list[int]]]:
    model_dir = fixture_cache.model("qwen3_moe")
    dirs = {name: fixture_cache.adapter(model_dir, **opts) for name, opts in ADAPTERS.items()}
    want = [oracle_greedy(model_dir, dirs[n] if n else None, p, MAX_NEW, stop_at_eos=False)
            for p, n in zip(PROMPTS, NAMES)]
    return model_dir, dirs, want


@pytest.mark.parametrize(("tp", "ep", "placement"), [
    (1, 2, "contiguous"), (1, 4, "round_robin"), (2, 1, "contiguous"), (2, 2, "round_robin"),
    (2, 4, "contiguous"),
])
def test_layout_matches_single_rank_and_oracle(ray_session: Any, assets: Any, tp: int, ep: int,
                                               placement: str) -> None:
    model_dir, dirs, want = assets
    with _start(model_dir, dirs, tp_size=tp, ep_size=ep, expert_placement=placement) as cluster:
        results = cluster.generate(PROMPTS, adapters=NAMES,
                                   sampling=SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))
        assert [list(r.token_ids) for r in results] == want
        (logits,) = cluster.score([PROMPTS[0]], adapters=["all3d"])
        ref = oracle_logits(model_dir, dirs["all3d"], PROMPTS[0])
        assert (logits - ref).norm() / ref.norm() < 1e-4
        per_rank = {i.name: i.bytes_per_rank for i in cluster.list_adapters()}
        assert all(len(b) == tp * ep for b in per_rank.values())
        ranks = cluster.rank_stats()
        assert [r["rank"] for r in ranks] == list(range(tp * ep))
        for r, stats in enumerate(ranks):
            memory = stats["memory"]
            assert memory["base_weight_bytes"] > 0 and memory["lora_slot_bytes"] > 0
            assert memory["adapters_in_host_cache"] == len(ADAPTERS)
            assert memory["adapter_host_cache_bytes"] == sum(b[r] for b in per_rank.values())
            # Rank processes serve with the raised GC thresholds, their model frozen out of
            # the collector, every collection timed (engine/gc_pauses.py).
            pauses = stats["gc"]
            assert pauses["thresholds"] == list(SERVE_THRESHOLDS) and pauses["frozen"] > 0
            assert len(pauses["collections"]) == len(pauses["ms"]) == 3


def test_killed_rank_mid_batch_is_rebuilt_and_requests_finish(ray_session: Any,
                                                              assets: Any) -> None:
    model_dir, dirs, want = assets
    many = 24
    with _start(model_dir, dirs, tp_size=1, ep_size=2) as cluster:
        out: dict[str, Any] = {}

        def run() -> None:
            try:
                out["results"] = cluster.generate(
                    PROMPTS, adapters=NAMES,
                    sampling=SamplingParams(max_tokens=many, ignore_eos=True))
            except BaseException as exc:
                out["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        # Kill rank 1 once decoding is under way.
        deadline = time.monotonic() + 60
        while cluster.stats().get("generated_tokens", 0) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        ray.get(cluster._controller.kill_rank.remote(1))
        worker.join(timeout=300)
        assert "error" not in out, out.get("error")
        results = out["results"]
        assert [list(r.token_ids)[:MAX_NEW] for r in results] == want
        assert cluster.health()["generation"] == 2
        # still serving afterwards, same answers
        again = cluster.generate(PROMPTS, adapters=NAMES,
                                 sampling=SamplingParams(max_tokens=many, ignore_eos=True))
        assert [r.token_ids for r in again] == [r.token_ids for r in results]
