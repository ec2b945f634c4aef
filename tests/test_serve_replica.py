"""``ReplicaService`` without Ray: two in-process replicas (ControllerCore + LocalRankGroup on the
tiny Qwen3-MoE) sharing one ``LocalDirectory`` — the registry semantics the Serve app relies on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from deploy.directory_client import LocalDirectory
from deploy.directory_state import DirectoryState
from deploy.replica import ReplicaService
from deploy.streaming import merge_streams, stream_handle
from lora_cluster.config import ClusterConfig, SamplingParams
from lora_cluster.engine.controller_core import ControllerCore
from lora_cluster.engine.rank_group import LocalRankGroup
from lora_cluster.engine.tokenizer import Tokenizer
from lora_cluster.errors import (
    AdapterFormatError,
    ClusterError,
    RequestError,
    UnknownAdapterError,
)
from lora_cluster.model.spec import load_model_spec
from lora_cluster.testing import write_adapter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)
PROMPT = [1, 40, 41, 42, 300, 7]


def _core(model_dir: Path) -> ControllerCore:
    cfg = ClusterConfig(model=str(model_dir), device="cpu", dtype="float32", max_loras=2,
                        max_cpu_loras=4, kv_cache_bytes=4 << 20, block_size=8)
    return ControllerCore(cfg, load_model_spec(model_dir), LocalRankGroup(cfg),
                          Tokenizer.from_model_dir(model_dir))


def _wait(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def pair(fixture_cache: Any) -> Iterator[tuple[ReplicaService, ReplicaService, LocalDirectory]]:
    model_dir = fixture_cache.model("qwen3_moe")
    directory = LocalDirectory()
    services = [ReplicaService(_core(model_dir), directory, replica_id=f"r{i}",
                               report_period_s=0.1, unload_ack_timeout_s=5.0)
                for i in range(2)]
    for s in services:
        s.start()
    yield services[0], services[1], directory
    for s in services:
        s.shutdown()


def _tokens(service: ReplicaService, adapter: str | None) -> tuple[int, ...]:
    return service.generate([PROMPT], [adapter], GREEDY).results[0].token_ids


def test_an_adapter_loaded_on_one_replica_is_fetched_by_another(pair, fixture_cache) -> None:
    a, b, directory = pair
    path = fixture_cache.adapter(fixture_cache.model("qwen3_moe"), targets=["attention"], seed=5)
    info = a.load_adapter("attn", str(path))
    assert info.name == "attn" and directory.state.lookup("attn").source == str(path)
    on_a = a.generate([PROMPT], ["attn"], GREEDY)
    on_b = b.generate([PROMPT], ["attn"], GREEDY)
    assert on_b.arrival == "fetched" and on_a.arrival in ("device", "host")
    assert on_a.results[0].token_ids == on_b.results[0].token_ids != _tokens(a, None)
    assert b.generate([PROMPT], ["attn"], GREEDY).arrival != "fetched"  # now held
    assert b.counters.as_dict()["requests_by_adapter"]["attn"] == 2
    assert "attn" in {n for tier in ("device", "host") for n in b.routing_stats()[tier]}


def test_bad_or_conflicting_loads_record_nothing(pair, fixture_cache, tmp_path) -> None:
    a, b, directory = pair
    model_dir = fixture_cache.model("qwen3_moe")
    broken = write_adapter(tmp_path / "broken", model_dir, corrupt="truncated_header",
                           targets=["attention"])
    before = directory.state.generation
    with pytest.raises(AdapterFormatError):
        b.load_adapter("broken", str(broken))
    assert directory.state.lookup("broken") is None and directory.state.generation == before
    assert "broken" not in [i.name for i in b.core.list_adapters()]
    one = fixture_cache.adapter(model_dir, targets=["attention"], seed=6)
    other = fixture_cache.adapter(model_dir, targets=["attention"], seed=7)
    a.load_adapter("taken", str(one))
    with pytest.raises(RequestError, match="already registered"):
        b.load_adapter("taken", str(other))
    assert directory.state.lookup("taken").source == str(one)
    assert "taken" not in [i.name for i in b.core.list_adapters()]
    with pytest.raises(UnknownAdapterError):
        b.generate([PROMPT], ["never-loaded"], GREEDY)


def test_unload_returns_after_every_replica_dropped_it(pair, fixture_cache) -> None:
    a, b, _ = pair
    path = fixture_cache.adapter(fixture_cache.model("qwen3_moe"), targets=["experts"], seed=8)
    b.load_adapter("gone", str(path))
    a.generate([PROMPT], ["gone"], GREEDY)  # both hold it now
    unacked = a.evict_adapter("gone")
    assert unacked == []
    for service in (a, b):
        assert "gone" not in [i.name for i in service.core.list_adapters()]
        with pytest.raises(UnknownAdapterError):
            service.generate([PROMPT], ["gone"], GREEDY)
    with pytest.raises(UnknownAdapterError):
        b.evict_adapter("gone")


def test_update_switches_every_replica(pair, fixture_cache) -> None:
    a, b, _ = pair
    model_dir = fixture_cache.model("qwen3_moe")
    v1 = fixture_cache.adapter(model_dir, targets=["attention"], seed=9)
    v2 = fixture_cache.adapter(model_dir, targets=["attention"], seed=10)
    a.load_adapter("upd", str(v1))
    old = _tokens(b, "upd")
    info = a.update_adapter("upd", str(v2))
    assert info.version == 2
    _wait(lambda: b._held.get("upd", ("",))[0] == str(v2))
    new_b, new_a = _tokens(b, "upd"), _tokens(a, "upd")
    assert new_b == new_a != old
    listed = {i.name: i for i in b.list_adapters()}
    assert listed["upd"].source == str(v2)


def test_a_restarted_directory_learns_adapters_back(pair, fixture_cache) -> None:
    a, b, directory = pair
    path = fixture_cache.adapter(fixture_cache.model("qwen3_moe"), targets=["attention"], seed=11)
    a.load_adapter("kept", str(path))
    with directory._cv:  # the directory replica restarted: empty registry, new epoch
        directory.state = DirectoryState()
        directory._cv.notify_all()
    _wait(lambda: directory.state.lookup("kept") is not None)
    assert directory.state.lookup("kept").source == str(path)
    assert _tokens(a, "kept") == _tokens(b, "kept")
    _wait(lambda: {r.replica_id for r in directory.state.live()} == {"r0", "r1"})


def test_health_fails_once_the_core_is_down(fixture_cache) -> None:
    service = ReplicaService(_core(fixture_cache.model("qwen3_moe")), LocalDirectory(),
                             replica_id="solo", report_period_s=0.1)
    service.start()
    assert service.check_health()["ok"]
    stats = service.stats()
    assert stats["replica_id"] == "solo" and stats["ongoing"] == 0
    service.shutdown()
    with pytest.raises(ClusterError, match="solo"):
        service.check_health()


def test_streams_merge_by_index_and_leaving_early_aborts(pair) -> None:
    a, _, _ = pair
    long = SamplingParams(max_tokens=200, ignore_eos=True)

    async def run() -> tuple[list[Any], list[Any]]:
        with ThreadPoolExecutor(4) as pool:
            handles, _ = a.submit_many([PROMPT, [1, 2, 3]], [None, None], GREEDY)
            chunks = [c async for c in merge_streams(
                [stream_handle(h, pool, a.core.tokenizer.decode, index=i)
                 for i, h in enumerate(handles)])]
            (slow,), _ = a.submit_many([PROMPT], [None], long)
            gen = stream_handle(slow, pool, a.core.tokenizer.decode)
            await gen.__anext__()
            await gen.aclose()  # the client went away
            return chunks, [slow.result(timeout=30)]

    chunks, (aborted,) = asyncio.run(run())
    a.finished()
    a.finished()
    for index in (0, 1):
        mine = [c for c in chunks if c.index == index]
        assert sum(len(c.token_ids) for c in mine) == 5 and mine[-1].finish_reason == "length"
    assert aborted.finish_reason == "abort" and len(aborted.token_ids) < 200
