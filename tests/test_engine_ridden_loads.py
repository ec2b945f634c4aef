"""Loads riding on the step: a prefetched version whose read-ahead the output rank reported
done is loaded by an op on the next step that needs it (``Step.adapter_ops``), not by a
standalone ``LoadAdapter`` round trip while the step is planned.

Bottom up: the rank's reader reports only successful reads (``ReadAhead.take_ready``); a
step's ridden load files what was read (or reads it, if the read was lost) before the
placement that follows it; ``StepOps`` takes a ridden load of a dropped version off the step;
then the whole path — tokens equal a run without prefetch, loads ride on TP × EP thread
groups too, and a ridden load failing on a rank fails only the requests that needed it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rank_groups import ThreadRankGroup

from lora_cluster.config import ClusterConfig, SamplingParams
from lora_cluster.engine.controller_core import ControllerCore
from lora_cluster.engine.messages import (
    DropAdapter,
    EvictSlot,
    LoadAdapter,
    LoadResult,
    PlaceAdapter,
    PlaceResult,
    ReadAheadHint,
    Step,
    StepPlan,
)
from lora_cluster.engine.rank_group import LocalRankGroup
from lora_cluster.engine.rank_runtime import RankRuntime
from lora_cluster.engine.read_ahead import ReadAhead
from lora_cluster.engine.step_ops import RIDES, StepOps
from lora_cluster.errors import AdapterError, AdapterFormatError
from lora_cluster.model.parallel import LocalComm, ParallelInfo
from lora_cluster.model.spec import load_model_spec

G = SamplingParams(max_tokens=4, ignore_eos=True)
PROMPTS = [[5, 40, 41, 42, 300], [1, 17, 42, 99], [1, 200, 5, 9, 11, 12]]


def _config(model_dir: Path, **overrides: Any) -> ClusterConfig:
    options: dict[str, Any] = {
        "model": str(model_dir), "device": "cpu", "dtype": "float32", "max_loras": 2,
        "max_cpu_loras": 6, "max_lora_rank": 8, "max_num_seqs": 2, "kv_cache_bytes": 4 << 20,
        **overrides}
    return ClusterConfig(**options)


@pytest.fixture(scope="module")
def sources(fixture_cache: Any, qwen3_moe_dir: Path) -> dict[str, str]:
    return {f"r{i}": str(fixture_cache.adapter(qwen3_moe_dir, name=f"ride{i}",
                                               targets=["attention"], r=4, seed=700 + i))
            for i in range(10)}


def _run(core: ControllerCore, names: list[str]) -> list[tuple[int, ...]]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    return [r.token_ids for r in core.generate(prompts, names, G, timeout=120)]


# ==================================================================== units
def test_inline_reads_run_only_when_asked_and_report_like_the_pool() -> None:
    reads: list[str] = []

    def read(path: str, name: str, version: int) -> str:
        reads.append(name)
        if name == "bad":
            raise AdapterError(f"{path}: corrupt")
        return name

    ra: ReadAhead[str] = ReadAhead(read, capacity=3, workers=0)
    assert ra.offer([ReadAheadHint(name=n, version=1, path=f"/src/{n}")
                     for n in ("a", "bad", "b", "c")]) == 4
    assert reads == []  # nothing runs until the command thread asks
    assert ra.run_pending(2) == 2 and reads == ["bad", "b"]  # "a" was pushed out (capacity)
    assert ra.take_ready() == (("b", 1),)
    assert ra.take(("bad", 1)) == (None, "retried")
    assert ra.take(("c", 1)) == (None, "none")  # not read yet: the load reads it itself
    assert ra.take(("b", 1)) == ("b", "hit")
    assert ra.run_pending(5) == 0 and ra.stats()["wasted"] == 1
    ra.close()


def test_reader_reports_only_finished_good_reads() -> None:
    def read(path: str, name: str, version: int) -> str:
        if name == "bad":
            raise AdapterError(f"{path}: corrupt")
        return name

    ra: ReadAhead[str] = ReadAhead(read, capacity=4, idle_wait_s=0.0)
    hints = [ReadAheadHint(name=n, version=1, path=f"/src/{n}") for n in ("a", "bad", "b")]
    ra.offer(hints)
    deadline = time.monotonic() + 5
    ready: set[tuple[str, int]] = set()
    while ready != {("a", 1), ("b", 1)} and time.monotonic() < deadline:
        ready.update(ra.take_ready())
        time.sleep(0.005)
    assert ready == {("a", 1), ("b", 1)}
    assert ra.take_ready() == ()  # each is reported once
    ra.close()


def test_step_ops_take_a_ridden_load_of_a_dropped_version_off_the_step() -> None:
    ops = StepOps()
    ops.begin()
    ops.load(("a", 1), "/src/a")
    ops.place(("a", 1), 0)
    ops.load(("b", 1), "/src/b")
    ops.place(("b", 1), 1)
    ops.drop(("a", 1))
    sent = ops.take_drops()
    assert sent == [EvictSlot(seq=RIDES, slot=0), DropAdapter(seq=RIDES, name="a", version=1)]
    assert ops.take() == (LoadAdapter(seq=RIDES, name="b", version=1, path="/src/b"),
                          PlaceAdapter(seq=RIDES, name="b", version=1, slot=1))


def test_a_ridden_load_files_the_read_or_reads_it(fixture_cache: Any, qwen3_moe_dir: Path,
                                                   sources: dict[str, str]) -> None:
    rt = RankRuntime(_config(qwen3_moe_dir), ParallelInfo(), LocalComm())
    try:
        # "r0" read ahead (reported ready), "r1" never hinted: both ride, in order, before
        # the placements that follow them.
        hint = ReadAheadHint(name="r0", version=1, path=sources["r0"])
        first = rt.execute(Step(seq=0, plan=StepPlan(seqs=()), read_ahead=(hint,)))
        # A CPU rank reads inline, after the step's forward: reported by that very step.
        assert rt.read_ahead.inline and first.read_ahead_ready == (("r0", 1),)
        ops = (LoadAdapter(seq=RIDES, name="r0", version=1, path=sources["r0"]),
               PlaceAdapter(seq=RIDES, name="r0", version=1, slot=0),
               LoadAdapter(seq=RIDES, name="r1", version=1, path=sources["r1"]),
               PlaceAdapter(seq=RIDES, name="r1", version=1, slot=1))
        result = rt.execute(Step(seq=1, plan=StepPlan(seqs=()), adapter_ops=ops))
        loads = [r for r in result.adapter_results if isinstance(r, LoadResult)]
        assert [r.read_ahead for r in loads] == ["hit", "none"]
        assert all(isinstance(r, PlaceResult) for r in result.adapter_results[1::2])
        assert rt.slots == [("r0", 1), ("r1", 1)] and set(rt.host_cache) == {("r0", 1), ("r1", 1)}
        # r1 shares r0's structure: read through r0's recipe (or, without one, its plan).
        stats = rt.stats()
        assert stats["packed_reads"]["hits"] + stats["plan_cache"]["hits"] >= 1
    finally:
        rt.close()


# ==================================================================== whole path
def test_prefetched_loads_ride_with_identical_tokens(qwen3_moe_dir: Path,
                                                     sources: dict[str, str]) -> None:
    names = list(sources) * 2  # 10 adapters through a host cache of 6: every one is read
    spec = load_model_spec(qwen3_moe_dir)
    cfg = _config(qwen3_moe_dir)
    plain = ControllerCore(cfg, spec, LocalRankGroup(cfg), prefetch_depth=0)
    try:
        plain.register_adapters(sources)
        expected = _run(plain, names)
    finally:
        plain.shutdown()
    core = ControllerCore(cfg, spec, LocalRankGroup(cfg))
    try:
        core.register_adapters(sources)
        assert _run(core, names) == expected
        stats = core.stats()
        assert stats["prefetch"]["ridden"] >= 4, stats["prefetch"]
        assert stats["loads_on_step"] == stats["prefetch"]["ridden"]
        # A ridden load is recorded like a standalone one.
        ridden = [n for n in sources if stats["adapters"][n]["load_ms"] > 0]
        assert len(ridden) == len(sources)
        with core._exec, core._lock:
            core.adapters.send_queued_drops()
            runtime = core.group.runtime
            assert runtime is not None
            host = {core.adapters.keys[t] for t in core.adapters.tiers.host_names()}
            assert set(runtime.host_cache) == host - set(core.adapters.prefetch.admitted)
    finally:
        core.shutdown()


def test_loads_ride_on_a_tp_ep_group(qwen3_moe_dir: Path, sources: dict[str, str]) -> None:
    names = list(sources)[:8] * 2
    spec = load_model_spec(qwen3_moe_dir)
    plain_cfg = _config(qwen3_moe_dir)
    plain = ControllerCore(plain_cfg, spec, LocalRankGroup(plain_cfg), prefetch_depth=0)
    try:
        plain.register_adapters(sources)
        expected = _run(plain, names)
    finally:
        plain.shutdown()
    cfg = _config(qwen3_moe_dir, tp_size=2, ep_size=2)
    group = ThreadRankGroup(cfg)
    core = ControllerCore(cfg, spec, group)
    try:
        core.register_adapters(sources)
        assert _run(core, names) == expected
        assert core.stats()["prefetch"]["ridden"] >= 2
        host = {core.adapters.keys[t] for t in core.adapters.tiers.host_names()}
        pending = set(core.adapters.prefetch.admitted) | set(core.adapters.prefetch.queued_drops)
        for rank in group.ranks:
            assert set(rank.host_cache) - pending <= host
    finally:
        core.shutdown()


def test_a_ridden_load_failing_on_a_rank_fails_only_its_requests(
        qwen3_moe_dir: Path, sources: dict[str, str]) -> None:
    cfg = _config(qwen3_moe_dir, max_num_seqs=1)
    core = ControllerCore(cfg, load_model_spec(qwen3_moe_dir), LocalRankGroup(cfg))
    try:
        core.register_adapters(sources)
        good = ["r0", "r1"]
        expected = _run(core, good)
        runtime = core.group.runtime
        assert runtime is not None
        real_load, calls = runtime._load, threading.Event()

        def refuses_r5(cmd: LoadAdapter) -> LoadResult:
            if cmd.name == "r5" and cmd.seq == RIDES:
                calls.set()
                raise AdapterFormatError(f"{cmd.path}: injected: unreadable after its read")
            return real_load(cmd)

        runtime._load = refuses_r5  # type: ignore[method-assign]
        # One sequence at a time: r5 waits behind two requests, so it is read ahead and rides.
        names = ["r0", "r1", "r5", "r0"]
        handles = [core.submit(PROMPTS[good.index(n)] if n in good else PROMPTS[2], n, G)
                   for n in names]
        with pytest.raises(AdapterFormatError, match=r"could not be activated.*injected"):
            handles[2].result(timeout=120)
        assert calls.is_set()
        served = [h.result(timeout=120).token_ids for n, h in zip(names, handles) if n != "r5"]
        assert served == [expected[0], expected[1], expected[0]]
        stats = core.stats()
        assert stats["step_op_failures"] == 1 and stats["rank_group_restarts"] == 1
        assert stats["failed_reloads_by_cause"] == {"adapter_format": 1}
        assert stats["adapters"]["r5"]["residency"] in ("failed", "registered", "host")
        # The rebuilt rank is a fresh one (no injection): r5 serves again.
        assert len(_run(core, ["r5"])[0]) == G.max_tokens and _run(core, good) == expected
    finally:
        core.shutdown()
