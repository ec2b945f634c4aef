"""Prefetch: waiting requests' adapters are read on the ranks' reader threads, off the step path.

Layers, bottom up: the rank's ``ReadAhead`` buffer (no torch: dedup, bound, failures, waits);
the controller's planning (``Prefetcher.plan_locked`` over a real ``AdapterControl`` and a
recording fake rank stream: victims respect pins, running requests, the device and the
look-ahead; victims are dropped before the next load); then the whole path with real ranks —
in process (``LocalRankGroup``) and through Ray — where prefetched reads serve the loads and
the tokens equal a run without prefetch, and a bad file fails only its own requests.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lora_cluster.config import ClusterConfig, SamplingParams
from lora_cluster.engine.adapter_control import AdapterControl, tier_id
from lora_cluster.engine.controller_core import ControllerCore
from lora_cluster.engine.messages import (
    LoadAdapter,
    LoadResult,
    PlaceAdapter,
    PlaceResult,
    RankReply,
    ReadAheadHint,
)
from lora_cluster.engine.prefetch import Prefetcher
from lora_cluster.engine.rank_group import LocalRankGroup
from lora_cluster.engine.read_ahead import ReadAhead, read_ahead_depth
from lora_cluster.engine.registry import AdapterMeta
from lora_cluster.engine.sequence import Sequence
from lora_cluster.errors import AdapterError
from lora_cluster.model.spec import load_model_spec

GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)
PROMPTS = [[5, 40, 41, 42, 300], [1, 17, 42, 99], [1, 200, 5, 9, 11, 12]]


def _hint(name: str, version: int = 1) -> ReadAheadHint:
    return ReadAheadHint(name=name, version=version, path=f"/src/{name}")


# ==================================================================== rank: ReadAhead
def test_read_ahead_dedups_bounds_waits_and_survives_bad_reads() -> None:
    gate = threading.Event()
    reads: list[str] = []

    def read(path: str, name: str, version: int) -> str:
        reads.append(name)
        if name == "slow":
            gate.wait(5)
        if name == "bad":
            raise AdapterError(f"{path}: corrupt")
        return f"weights of {name}@{version}"

    resident = {("cached", 1)}
    ra: ReadAhead[str] = ReadAhead(read, capacity=3, resident=lambda k: k in resident)
    assert ra.offer([_hint("bad"), _hint("a"), _hint("a"), _hint("cached")]) == 2
    deadline = time.monotonic() + 5
    while not all(e.future.done() for e in ra._entries.values()) and time.monotonic() < deadline:
        time.sleep(0.005)
    # A failed read is reported as "retried" (the caller reads again); others are untouched.
    assert ra.take(("bad", 1)) == (None, "retried")
    ra.done(("bad", 1))
    assert ra.take(("a", 1)) == ("weights of a@1", "hit")
    ra.done(("a", 1))
    assert ra.take(("never", 1)) == (None, "none")
    # A key being loaded by a command is not read again by a late hint.
    assert ra.offer([_hint("never")]) == 0
    ra.done(("never", 1))
    # In flight: the load joins the read instead of reading twice.
    assert ra.offer([_hint("slow")]) == 1
    while "slow" not in reads:
        time.sleep(0.005)
    threading.Timer(0.05, gate.set).start()
    assert ra.take(("slow", 1)) == ("weights of slow@1", "waited")
    ra.done(("slow", 1))
    assert reads.count("slow") == 1 and reads.count("a") == 1
    # Bounded: the oldest unclaimed entry makes room (wasted), a dropped version is discarded.
    ra.offer([_hint("x"), _hint("y"), _hint("z"), _hint("w")])
    ra.discard(("w", 1))
    stats = ra.stats()
    assert stats["buffered"] == 2 and stats["wasted"] == 2
    assert stats["hits"] == 1 and stats["waited"] == 1 and stats["retried"] == 1
    ra.close()
    assert ra.offer([_hint("late")]) == 0


def test_read_ahead_reads_only_between_commands() -> None:
    reads: list[str] = []
    ra: ReadAhead[str] = ReadAhead(lambda p, n, v: reads.append(n) or n, capacity=4,
                                   idle_wait_s=5.0)
    with ra.busy():  # a command runs: the hinted reads wait for the gap after it
        ra.offer([_hint("a"), _hint("b")])
        time.sleep(0.05)
        assert reads == []
        # Taken before its read began: the load reads it itself, and it is never read here.
        assert ra.take(("a", 1)) == (None, "none")
        ra.done(("a", 1))
    deadline = time.monotonic() + 5
    while "b" not in reads and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.02)
    assert reads == ["b"] and ra.take(("b", 1)) == ("b", "hit")
    assert ra.stats()["not_started"] == 1
    ra.close()


def test_read_ahead_depth() -> None:
    assert read_ahead_depth(32, 1024) == 64
    assert read_ahead_depth(2, 6) == 4
    assert read_ahead_depth(4, 4) == 0  # no host entry beyond the slots: no read-ahead


# ==================================================================== controller: planning
class RecordingRanks:
    """A rank stream that records commands and answers like a healthy rank."""

    def __init__(self) -> None:
        self.commands: list[Any] = []
        self._seq = 0

    def send_all(self, build: Any) -> tuple[RankReply, ...]:
        command = build(self._seq)
        self._seq += 1
        self.commands.append(command)
        if isinstance(command, LoadAdapter):
            return (RankReply(rank=0, result=LoadResult(name=command.name, version=command.version,
                                                        nbytes=10, read_ahead="hit")),)
        if isinstance(command, PlaceAdapter):
            return (RankReply(rank=0, result=PlaceResult(slot=command.slot, ms=0.1)),)
        return (RankReply(rank=0),)


def _control(model_dir: Path, names: list[str]) -> tuple[AdapterControl, RecordingRanks]:
    cfg = ClusterConfig(model=str(model_dir), device="cpu", dtype="float32", max_loras=2,
                        max_cpu_loras=6, max_lora_rank=8)
    ranks = RecordingRanks()
    ac = AdapterControl(cfg, load_model_spec(model_dir), ranks.send_all)
    meta = AdapterMeta(rank=4, alpha=8.0, scaling=2.0, use_rslora=False,
                       target_modules=("q_proj",))
    ac.register_on_disk([(n, f"/src/{n}", f"/src/{n}", meta) for n in names])
    return ac, ranks


def _waiting(names: list[str]) -> list[Sequence]:
    return [Sequence(seq_id=i, prompt_ids=(1, 2), sampling=GREEDY, adapter_name=n)
            for i, n in enumerate(names)]


def test_plan_evicts_only_unheld_off_device_unwanted_entries(qwen3_moe_dir: Path) -> None:
    ac, ranks = _control(qwen3_moe_dir, [f"a{i}" for i in range(10)])
    for i in range(6):  # a full host tier (6)
        ac.load_locked((f"a{i}", 1), f"/src/a{i}")
    ac.acquire("a0", None)  # a running request holds a0's slot
    ac._place_locked(("a1", 1))  # a1 on the device, unheld
    ac.tiers.pin(tier_id(("a2", 1)))  # a user pin
    pf = Prefetcher(ac, depth=read_ahead_depth(2, 6))
    ranks.commands.clear()
    hints = pf.plan_locked(_waiting(["a3", "a6", "a7", "a8", "a9"]))
    # a3 is host-resident and wanted: kept. Victims: a4 then a5 (LRU, unheld, off the
    # device). a8 finds none left (a0 running, a1 on the device, a2 pinned, a3 wanted,
    # a6/a7 read ahead): prefetch stops instead of evicting more.
    assert [h.name for h in hints] == ["a6", "a7"]
    assert list(ac.prefetch.queued_drops) == [("a4", 1), ("a5", 1)]
    assert ranks.commands == []  # nothing sent: planning never touches the stream
    assert ac.residency_of(ac.record("a6")) == "loading"
    # The admission confirms a6: the victims' drops go first, then the load (a hit).
    ac.acquire("a6", None)
    kinds = [(type(c).__name__, getattr(c, "name", None)) for c in ranks.commands]
    assert kinds[:3] == [("DropAdapter", "a4"), ("DropAdapter", "a5"),
                         ("LoadAdapter", "a6")]
    assert ac.residency_of(ac.record("a6")) == "device"
    # a7's requests went away: its entry is given back (wasted); a8 is read ahead, and
    # still no pinned or running adapter is touched.
    hints = pf.plan_locked(_waiting(["a8"]))
    assert [h.name for h in hints] == ["a8"]
    dropped = {k[0] for k in ac.prefetch.queued_drops}
    assert "a7" in dropped and not dropped & {"a0", "a2", "a6"}
    assert ac.tiers.in_host(tier_id(("a2", 1))) and ac.tiers.slot_of(tier_id(("a0", 1))) is not None
    stats = pf.stats()
    assert (stats["issued"], stats["hits"], stats["wasted"], stats["pending"]) == (3, 1, 1, 1)
    assert len(ac.tiers.host_names()) <= 6


def test_plan_stays_within_depth(qwen3_moe_dir: Path) -> None:
    ac, _ = _control(qwen3_moe_dir, [f"a{i}" for i in range(10)])
    pf = Prefetcher(ac, depth=3)
    first = pf.plan_locked(_waiting([f"a{i}" for i in range(10)]))
    again = pf.plan_locked(_waiting([f"a{i}" for i in range(10)]))
    assert [h.name for h in first] == ["a0", "a1", "a2"] and again == ()
    assert not ac.prefetch.queued_drops  # room was free: nothing evicted
    assert Prefetcher(ac, depth=0).plan_locked(_waiting(["a5"])) == ()


# ==================================================================== real ranks
def _config(model_dir: Path, **overrides: Any) -> ClusterConfig:
    options: dict[str, Any] = {
        "model": str(model_dir), "device": "cpu", "dtype": "float32", "max_loras": 2,
        "max_cpu_loras": 6, "max_lora_rank": 8, "max_num_seqs": 2, "kv_cache_bytes": 4 << 20,
        **overrides}
    return ClusterConfig(**options)


def _sources(fixture_cache: Any, model_dir: Path, n: int) -> dict[str, str]:
    return {f"p{i}": str(fixture_cache.adapter(model_dir, name=f"pf{i}", targets=["attention"],
                                               r=4, seed=300 + i)) for i in range(n)}


def _run(core: ControllerCore, names: list[str]) -> list[tuple[int, ...]]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    return [r.token_ids for r in core.generate(prompts, names, GREEDY, timeout=120)]


def test_prefetch_serves_loads_with_identical_outputs(fixture_cache: Any,
                                                      qwen3_moe_dir: Path) -> None:
    sources = _sources(fixture_cache, qwen3_moe_dir, 10)
    # 10 adapters cycled twice through a host cache of 6: every request's adapter is read.
    names = list(sources) * 2
    spec = load_model_spec(qwen3_moe_dir)
    cfg = _config(qwen3_moe_dir)
    plain = ControllerCore(cfg, spec, LocalRankGroup(cfg), prefetch_depth=0)
    try:
        plain.register_adapters(sources)
        expected = _run(plain, names)
        plain_stats = plain.stats()["prefetch"]
    finally:
        plain.shutdown()
    assert plain_stats["issued"] == 0 and plain_stats["step_path_loads"] == len(names)

    core = ControllerCore(cfg, spec, LocalRankGroup(cfg))
    try:
        core.register_adapters(sources)
        assert _run(core, names) == expected
        stats = core.stats()["prefetch"]
        rank = core.group.stats()[0]["read_ahead"]
        assert stats["depth"] == 4 and stats["issued"] >= 8
        assert stats["hits"] + stats["waited"] >= 8, stats
        assert stats["step_path_loads"] <= len(names) - 8, stats
        assert rank["started"] >= 8 and rank["hits"] + rank["waited"] >= 8, rank
        # The rank's host cache follows the tiers once the queued drops are sent, and cache +
        # buffer never exceed max_cpu_loras.
        with core._exec, core._lock:
            core.adapters.send_queued_drops()
            runtime = core.group.runtime
            assert runtime is not None
            host = {core.adapters.keys[t] for t in core.adapters.tiers.host_names()}
            assert set(runtime.host_cache) == host - set(core.adapters.prefetch.admitted)
            assert len(runtime.host_cache) + runtime.read_ahead.stats()["buffered"] <= 6
    finally:
        core.shutdown()


def test_prefetched_bad_file_fails_only_its_requests(fixture_cache: Any, qwen3_moe_dir: Path,
                                                     tmp_path: Path) -> None:
    sources = _sources(fixture_cache, qwen3_moe_dir, 4)
    bad = tmp_path / "bad"
    shutil.copytree(sources["p0"], bad)
    cfg = _config(qwen3_moe_dir, max_num_seqs=1)
    core = ControllerCore(cfg, load_model_spec(qwen3_moe_dir), LocalRankGroup(cfg))
    try:
        core.register_adapters({**sources, "bad": str(bad)})  # valid when registered …
        good = list(sources)
        expected = _run(core, good)
        weights = bad / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # … not now
        # One sequence at a time: "bad" waits behind two requests, so it is read ahead.
        names = [*good[:2], "bad", *good[2:], "bad"]
        prompts = [PROMPTS[good.index(n) % len(PROMPTS)] if n in good else PROMPTS[0]
                   for n in names]  # each good adapter with the prompt it had in ``expected``
        handles = [core.submit(p, n, GREEDY) for p, n in zip(prompts, names, strict=True)]
        for name, handle in zip(names, handles, strict=True):
            if name == "bad":
                with pytest.raises(AdapterError, match=r"adapter_model\.safetensors"):
                    handle.result(timeout=120)
        served = [h.result(timeout=120).token_ids for n, h in zip(names, handles, strict=True)
                  if n != "bad"]
        assert served == [expected[good.index(n)] for n in names if n != "bad"]
        stats = core.stats()
        assert stats["adapters"]["bad"]["residency"] == "failed"
        assert sum(stats["failed_reloads_by_cause"].values()) == 2
        assert core.group.stats()[0]["read_ahead"]["retried"] >= 1
        assert _run(core, good) == expected  # the cluster keeps serving
    finally:
        core.shutdown()


@pytest.mark.ray
def test_prefetch_through_ray(ray_session: Any, fixture_cache: Any, qwen3_moe_dir: Path) -> None:
    from lora_cluster import Cluster

    sources = _sources(fixture_cache, qwen3_moe_dir, 10)
    names = list(sources) * 2
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    cfg = _config(qwen3_moe_dir)
    plain = ControllerCore(cfg, load_model_spec(qwen3_moe_dir), LocalRankGroup(cfg),
                           prefetch_depth=0)
    try:
        plain.register_adapters(sources)
        expected = _run(plain, names)
    finally:
        plain.shutdown()
    cluster = Cluster.start(_config(qwen3_moe_dir, dtype="auto"))
    try:
        cluster.register_adapters(sources)
        out = cluster.generate(prompts, adapters=names, sampling=GREEDY)
        assert [r.token_ids for r in out] == expected
        stats = cluster.stats()["prefetch"]
        assert stats["issued"] >= 8 and stats["hits"] + stats["waited"] >= 8, stats
    finally:
        cluster.shutdown()
