"""ControllerCore over a mirror group of several ranks (no model): layerwise updates racing
generation, loads, evictions and pins, with ranks refusing update groups at random.

Each mirror rank keeps what a real rank would hold — host cache, staging per version with
the layers staged so far, slots — from the commands it receives, and fails loudly when a
step reads an empty slot, a version is placed before it is complete, or staging outlives its
update. Its "model" emits ``(last token + 1 + 7 · version) % 50``, so every token tells which
version produced it: a sequence must produce tokens of one version only.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time

import pytest

from lora_cluster.config import ClusterConfig, SamplingParams
from lora_cluster.engine import adapter_control
from lora_cluster.engine.controller_core import ControllerCore
from lora_cluster.engine.messages import (
    DropAdapter,
    EvictSlot,
    GroupInfo,
    LoadAdapter,
    LoadResult,
    PlaceAdapter,
    PlaceResult,
    RankReply,
    Step,
    StepResult,
    UpdateAdapter,
)
from lora_cluster.engine.registry import AdapterMeta
from lora_cluster.errors import (
    AdapterFormatError,
    CapacityError,
    ClusterError,
    RequestError,
    UnknownAdapterError,
)
from lora_cluster.model.spec import spec_from_hf_config

VOCAB = 50
LAYERS = 3
SPEC = spec_from_hf_config({
    "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 8, "num_attention_heads": 2,
    "num_hidden_layers": LAYERS, "intermediate_size": 8, "max_position_embeddings": 64,
    "eos_token_id": 49,
})


class MirrorRank:
    def __init__(self, rank: int, max_loras: int, max_cpu: int) -> None:
        self.rank, self.max_cpu = rank, max_cpu
        self.host: dict[tuple[str, int], str] = {}
        self.staging: dict[tuple[str, int], set[int]] = {}
        self.slots: list[tuple[str, int] | None] = [None] * max_loras

    def adapter_command(self, cmd, fail: bool) -> RankReply:
        if isinstance(cmd, LoadAdapter | UpdateAdapter):
            assert cmd.key not in self.host, f"rank {self.rank}: {cmd.key} loaded twice"
            if cmd.key not in self.staging:
                assert len(self.host) + len(self.staging) < self.max_cpu, "host cache overfull"
            if fail:  # a real rank frees the version's staging when a read fails
                self.staging.pop(cmd.key, None)
                return RankReply(rank=self.rank, error=AdapterFormatError(
                    f"{cmd.path}: injected read error on rank {self.rank}"))
            if isinstance(cmd, UpdateAdapter) and not cmd.final:
                staged = self.staging.setdefault(cmd.key, set())
                assert cmd.layers and staged.isdisjoint(cmd.layers), "layer staged twice"
                staged.update(cmd.layers)
                return RankReply(rank=self.rank)
            if isinstance(cmd, UpdateAdapter):
                # The final command reads whatever layers remain: the version is complete.
                self.staging.pop(cmd.key, None)
            self.host[cmd.key] = cmd.path
            return RankReply(rank=self.rank, result=LoadResult(
                name=cmd.name, version=cmd.version, nbytes=100 * (self.rank + 1),
                breakdown_ms=(("read", 1.0),)))
        if isinstance(cmd, PlaceAdapter):
            assert cmd.key in self.host, f"placing {cmd.key}, which is not complete on the rank"
            self.slots[cmd.slot] = cmd.key
            return RankReply(rank=self.rank, result=PlaceResult(slot=cmd.slot, ms=0.1))
        if isinstance(cmd, DropAdapter):
            self.host.pop(cmd.key, None)
            self.staging.pop(cmd.key, None)
            self.slots = [None if k == cmd.key else k for k in self.slots]
        elif isinstance(cmd, EvictSlot):
            self.slots[cmd.slot] = None
        return RankReply(rank=self.rank)


class MirrorGroup:
    def __init__(self, world: int, max_loras: int, max_cpu: int, rng: random.Random) -> None:
        self.ranks = [MirrorRank(r, max_loras, max_cpu) for r in range(world)]
        self.max_loras, self.rng = max_loras, rng
        self.fail_rate = 0.0
        self.last_seq = -1
        self.lock = threading.Lock()  # the core serializes; this checks that it does
        self.updates_between_steps = 0
        self._last_was_update = False
        self.kill_step_after_update = False  # the first step after an update group "dies"
        self.restarts = 0
        self.world, self.max_cpu = world, max_cpu

    def describe(self) -> GroupInfo:
        return GroupInfo(world_size=len(self.ranks), num_kv_blocks=256, block_size=4,
                         device="cpu", dtype="float32", max_loras=self.max_loras)

    def _order(self, seq: int) -> None:
        assert self.lock.acquire(blocking=False), "two commands at once"
        assert seq > self.last_seq, "commands out of order"
        self.last_seq = seq

    def execute(self, command: Step) -> StepResult:
        self._order(command.seq)
        try:
            if self._last_was_update:
                self.updates_between_steps += 1
                if self.kill_step_after_update:
                    self.kill_step_after_update = False
                    raise ClusterError("rank 1 died (injected)", rank=1)
            self._last_was_update = False
            for op in command.adapter_ops:  # placements and drops riding on the step, in order
                for r in self.ranks:
                    r.adapter_command(op, False)
            time.sleep(0.0005)
            tokens = []
            for s in command.plan.seqs:
                keys = {None if s.slot < 0 else r.slots[s.slot] for r in self.ranks}
                assert len(keys) == 1, f"ranks disagree on slot {s.slot}: {keys}"
                key = keys.pop()
                assert s.slot < 0 or key is not None, f"slot {s.slot} is empty on the ranks"
                if s.sample is not None:
                    bump = 0 if key is None else 7 * key[1]
                    tokens.append((s.seq_id, (s.token_ids[-1] + 1 + bump) % VOCAB))
            return StepResult(seq=command.seq, tokens=tuple(tokens))
        finally:
            self.lock.release()

    def execute_all(self, command) -> tuple[RankReply, ...]:
        self._order(command.seq)
        try:
            self._last_was_update = isinstance(command, UpdateAdapter) and not command.final
            victim = -1
            if isinstance(command, UpdateAdapter) and self.rng.random() < self.fail_rate:
                victim = self.rng.randrange(len(self.ranks))
            return tuple(r.adapter_command(command, r.rank == victim) for r in self.ranks)
        finally:
            self.lock.release()

    def restart(self) -> GroupInfo:
        self.restarts += 1
        self.ranks = [MirrorRank(r, self.max_loras, self.max_cpu) for r in range(self.world)]
        self._last_was_update = False
        return self.describe()

    def close(self) -> None:
        pass


@pytest.fixture
def chunked_inspect(monkeypatch):
    def inspect(name, source, spec, config):
        return f"/abs/{source}", AdapterMeta(
            rank=8, alpha=16.0, scaling=2.0, use_rslora=False, target_modules=("q_proj",),
            layer_bytes=tuple((layer, 10) for layer in range(LAYERS)))

    monkeypatch.setattr(adapter_control, "inspect_adapter", inspect)


def _check(handle) -> int | None:
    """Tokens of exactly one version (the one the result names); returns that version."""
    try:
        res = handle.result(20)
    except (UnknownAdapterError, CapacityError):
        return None
    last, version = res.prompt_token_ids[-1], res.adapter_version
    for tok in res.token_ids:
        last = (last + 1 + (0 if version is None else 7 * version)) % VOCAB
        assert tok == last, f"request {handle.request_id}: tokens of another version"
    return version


@pytest.mark.parametrize("seed", range(3))
def test_updates_race_generation_on_several_ranks(chunked_inspect, seed):
    rng = random.Random(seed)
    max_loras = rng.randint(1, 3)
    max_cpu = max_loras + rng.randint(1, 3)
    group = MirrorGroup(3, max_loras, max_cpu, random.Random(seed + 100))
    group.fail_rate = 0.15
    cfg = ClusterConfig(model="/unused", device="cpu", dtype="float32", max_loras=max_loras,
                        max_cpu_loras=max_cpu, block_size=4, tp_size=1, ep_size=3)
    core = ControllerCore(cfg, SPEC, group)
    core.updates.chunk_bytes = 10  # one layer per update command
    names = ["a", "b", "c"]
    live, errors, stop = [], [], threading.Event()

    def traffic() -> None:
        trng = random.Random(seed + 7)
        try:
            while not stop.is_set():
                name = trng.choice([*names, None])
                with contextlib.suppress(UnknownAdapterError):
                    live.append(core.submit([trng.randrange(VOCAB)], name, SamplingParams(
                        max_tokens=trng.randint(1, 8), ignore_eos=True)))
                time.sleep(0.001)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for name in names:
            core.load_adapter(name, f"src-{name}")
        outcomes = {"ok": 0, "failed": 0}
        for _ in range(40):
            time.sleep(0.003)  # let traffic flow between adapter operations
            op, name = rng.random(), rng.choice(names)
            try:
                if op < 0.6:
                    core.update_adapter(name, f"src-{name}-{rng.randint(0, 99)}")
                    outcomes["ok"] += 1
                elif op < 0.7:
                    core.evict_adapter(name)
                elif op < 0.8:
                    core.load_adapter(name, f"src-{name}")
                elif op < 0.9:
                    core.pin_adapter(name)
                else:
                    core.unpin_adapter(name)
            except AdapterFormatError:
                outcomes["failed"] += 1
            except (UnknownAdapterError, CapacityError, RequestError, ClusterError):
                pass
        stop.set()
        for t in threads:
            t.join(30)
        assert not errors
        versions = [_check(h) for h in live]
        core.generate([[1]], None, SamplingParams(max_tokens=1))  # flush pending drops
        with core._lock:
            tiers = core.adapters.tiers
            host = {core.adapters.keys[t] for t in tiers.host_names()}
            slots = [None if t is None else core.adapters.keys[t] for t in tiers.device_slots()]
            assert not core.adapters.staging and not core.updates.in_progress
        for r in group.ranks:
            assert set(r.host) == host and r.staging == {}  # nothing leaked on any rank
            assert all(s is None or s == k for s, k in zip(slots, r.slots))
        assert outcomes["ok"] >= 5 and outcomes["failed"] >= 1
        assert len({v for v in versions if v is not None}) > 3  # many versions served
        assert group.updates_between_steps > 0  # steps ran between update groups
        stats = core.stats()
        assert stats["failed_updates_by_cause"].get("adapter_format", 0) == outcomes["failed"]
    finally:
        stop.set()
        core.shutdown()


def test_rank_group_rebuilt_mid_update_fails_it_cleanly(chunked_inspect):
    group = MirrorGroup(2, 2, 4, random.Random(0))
    cfg = ClusterConfig(model="/unused", device="cpu", dtype="float32", max_loras=2,
                        max_cpu_loras=4, block_size=4, tp_size=1, ep_size=2)
    core = ControllerCore(cfg, SPEC, group)
    core.updates.chunk_bytes = 10
    try:
        core.load_adapter("a", "src-a")
        running = core.submit([5], "a", SamplingParams(max_tokens=30, ignore_eos=True))
        next(iter(running))
        group.kill_step_after_update = True
        with pytest.raises(ClusterError, match="rebuilt during the update"):
            core.update_adapter("a", "src-a-2")
        assert group.restarts == 1 and _check(running) == 1  # retried on v1 after the rebuild
        assert all(r.staging == {} and ("a", 2) not in r.host for r in group.ranks)
        assert not core.adapters.staging and core.list_adapters()[0].version == 1
        assert core.update_adapter("a", "src-a-3").version == 3
        handle = core.submit([5], "a", SamplingParams(max_tokens=3, ignore_eos=True))
        assert _check(handle) == 3
        assert core.stats()["failed_updates_by_cause"] == {"cluster_unavailable": 1}
    finally:
        core.shutdown()


def test_pinned_adapter_stays_pinned_across_an_update(chunked_inspect):
    group = MirrorGroup(2, 2, 4, random.Random(0))
    cfg = ClusterConfig(model="/unused", device="cpu", dtype="float32", max_loras=2,
                        max_cpu_loras=4, block_size=4, tp_size=1, ep_size=2)
    core = ControllerCore(cfg, SPEC, group)
    core.updates.chunk_bytes = 10
    try:
        core.load_adapter("a", "src-a")
        core.pin_adapter("a")
        info = core.update_adapter("a", "src-a-2")
        assert info.version == 2 and info.pinned and info.residency == "device"
        tiers = core.adapters.tiers
        assert tiers.is_pinned("a@v2") and not tiers.in_host("a@v1")
        assert all(("a", 2) in r.slots and ("a", 1) not in r.host for r in group.ranks)
        handle = core.submit([7], "a", SamplingParams(max_tokens=2, ignore_eos=True))
        assert _check(handle) == 2
    finally:
        core.shutdown()
