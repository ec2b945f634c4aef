"""ControllerCore over a fake rank group: tiers, pins, versions, failures, threads (no model).

The fake group mirrors what ranks hold (host cache, slots, block tables) from the commands it
receives and fails loudly when a step reads an adapter the controller did not place, so the
controller's bookkeeping is checked against an independent mirror. Its "model" emits
``(last token + 1 + 7 · version-of-the-slot's-adapter) % 50``, so every token tells which
adapter version produced it.
"""

from __future__ import annotations

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
    AdapterNotFoundError,
    CapacityError,
    ClusterError,
    RequestError,
    UnknownAdapterError,
)
from lora_cluster.model.spec import spec_from_hf_config

VOCAB = 50
SPEC = spec_from_hf_config({
    "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 8, "num_attention_heads": 2,
    "num_hidden_layers": 1, "intermediate_size": 8, "max_position_embeddings": 64,
    "eos_token_id": 49,
})


class FakeGroup:
    def __init__(self, *, num_blocks: int = 64, block_size: int = 4, max_loras: int = 2) -> None:
        self.num_blocks, self.block_size, self.max_loras = num_blocks, block_size, max_loras
        self.fail_load: set[str] = set()
        self.fail_steps = 0
        self.step_delay = 0.0
        self.commands: list[object] = []
        self.restarts = 0
        self._reset()

    def _reset(self) -> None:
        self.host: dict[tuple[str, int], str] = {}
        self.slots: list[tuple[str, int] | None] = [None] * self.max_loras
        self.tables: dict[int, list[int]] = {}
        self.served: dict[int, set[tuple[str, int] | None]] = {}
        self.last_seq = -1

    def describe(self) -> GroupInfo:
        return GroupInfo(world_size=1, num_kv_blocks=self.num_blocks, block_size=self.block_size,
                         device="cpu", dtype="float32", max_loras=self.max_loras)

    def _order(self, seq: int) -> None:
        assert seq > self.last_seq, "commands out of order"
        self.last_seq = seq

    def execute(self, command: Step) -> StepResult:
        self._order(command.seq)
        self.commands.append(command)
        if self.fail_steps:
            self.fail_steps -= 1
            raise ClusterError("rank 0 died (injected)")
        for op in command.adapter_ops:  # placements and drops riding on the step, in order
            self._adapter_op(op)
        time.sleep(self.step_delay)
        plan = command.plan
        for seq_id in plan.released:
            self.tables.pop(seq_id, None)
        tokens = []
        for s in plan.seqs:
            self.tables[s.seq_id] = self.tables.get(s.seq_id, [])[: s.blocks_from] + list(s.new_blocks)
            key = None if s.slot < 0 else self.slots[s.slot]
            assert s.slot < 0 or key is not None, f"slot {s.slot} is empty on the rank"
            self.served.setdefault(s.seq_id, set()).add(key)
            if s.sample is not None:
                bump = 0 if key is None else 7 * key[1]
                tokens.append((s.seq_id, (s.token_ids[-1] + 1 + bump) % VOCAB))
        return StepResult(seq=command.seq, tokens=tuple(tokens))

    def execute_all(self, command) -> tuple[RankReply, ...]:
        self._order(command.seq)
        self.commands.append(command)
        if isinstance(command, LoadAdapter | UpdateAdapter):
            if command.name in self.fail_load:
                return (RankReply(rank=0, error=AdapterFormatError(f"{command.path}: corrupt")),)
            assert command.key not in self.host
            assert len(self.host) < 64
            self.host[command.key] = command.path
            return (RankReply(rank=0, result=LoadResult(name=command.name, version=command.version,
                                                         nbytes=1000, breakdown_ms=(("read", 1.0),))),)
        return self._adapter_op(command)

    def _adapter_op(self, command) -> tuple[RankReply, ...]:
        if isinstance(command, PlaceAdapter):
            assert command.key in self.host, "placing an adapter that is not in the host cache"
            self.slots[command.slot] = command.key
            return (RankReply(rank=0, result=PlaceResult(slot=command.slot, ms=0.1)),)
        if isinstance(command, DropAdapter):
            self.host.pop(command.key, None)
            self.slots = [None if k == command.key else k for k in self.slots]
        elif isinstance(command, EvictSlot):
            self.slots[command.slot] = None
        return (RankReply(rank=0),)

    def restart(self) -> GroupInfo:
        self.restarts += 1
        self._reset()
        return self.describe()

    def close(self) -> None:
        pass

    def loads(self, name: str) -> int:
        return sum(isinstance(c, LoadAdapter) and c.name == name for c in self.commands)


@pytest.fixture
def fake_inspect(monkeypatch):
    calls: list[str] = []

    def inspect(name, source, spec, config):
        calls.append(source)
        if source.startswith("missing"):
            raise AdapterNotFoundError(f"{source}: no such directory")
        return f"/abs/{source}", AdapterMeta(rank=8, alpha=16.0, scaling=2.0, use_rslora=False,
                                              target_modules=("q_proj",))

    monkeypatch.setattr(adapter_control, "inspect_adapter", inspect)
    return calls


def make(max_loras=2, max_cpu_loras=3, **kw):
    cfg = ClusterConfig(model="/unused", device="cpu", dtype="float32", max_loras=max_loras,
                        max_cpu_loras=max_cpu_loras, block_size=4, **kw)
    group = FakeGroup(max_loras=max_loras)
    return ControllerCore(cfg, SPEC, group), group


def expect(prompt, n, version=None):
    out, last = [], prompt[-1]
    for _ in range(n):
        last = (last + 1 + (0 if version is None else 7 * version)) % VOCAB
        out.append(last)
    return out


G = SamplingParams(max_tokens=4, ignore_eos=True)


def test_mixed_batch_and_residency(fake_inspect):
    core, _group = make()
    try:
        info = core.load_adapter("a", "src-a")
        assert info.residency == "host" and info.version == 1 and info.bytes_per_rank == (1000,)
        core.load_adapter("b", "src-b")
        res = core.generate([[1, 2], [3], [4, 5]], ["a", None, "b"], G)
        assert [list(r.token_ids) for r in res] == [expect([1, 2], 4, 1), expect([3], 4),
                                                  expect([4, 5], 4, 1)]
        assert [r.adapter for r in res] == ["a", None, "b"] and res[0].adapter_version == 1
        assert {i.name: i.residency for i in core.list_adapters()} == {"a": "device", "b": "device"}
        # Idempotent for the same source, refused for another one.
        assert core.load_adapter("a", "src-a").version == 1
        with pytest.raises(RequestError, match="already registered"):
            core.load_adapter("a", "other")
        stats = core.stats()
        assert stats["adapters"]["a"]["requests"] == 1 and stats["requests_base"] == 1
        assert stats["tiers"]["device"]["misses"] == 2
    finally:
        core.shutdown()


def test_lru_host_eviction_and_transparent_reload(fake_inspect):
    core, group = make(max_loras=1, max_cpu_loras=2)
    try:
        for name in ("a", "b"):
            core.load_adapter(name, f"src-{name}")
        first = core.generate([[1]], "a", G)[0].token_ids
        core.load_adapter("c", "src-c")  # host full: b is the LRU (a was used) → b leaves
        residency = {i.name: i.residency for i in core.list_adapters()}
        assert residency == {"a": "device", "b": "registered", "c": "host"}
        assert ("b", 1) not in group.host
        assert list(core.generate([[1]], "b", G)[0].token_ids) == expect([1], 4, 1) and group.loads("b") == 2
        assert core.generate([[1]], "a", G)[0].token_ids == first
        assert core.stats()["tiers"]["host"]["evictions"] >= 1
    finally:
        core.shutdown()


def test_in_flight_adapter_never_evicted_and_others_wait(fake_inspect):
    core, group = make(max_loras=1, max_cpu_loras=2)
    group.step_delay = 0.01
    try:
        core.load_adapter("a", "src-a")
        long = core.submit([1], "a", SamplingParams(max_tokens=30, ignore_eos=True))
        next(iter(long))  # a is running, pinned in the only slot
        core.load_adapter("b", "src-b")
        core.load_adapter("c", "src-c")  # evicts b (unpinned), never a
        assert ("a", 1) in group.host and ("b", 1) not in group.host
        waiter = core.submit([2], "c", G)  # needs the pinned slot: waits, no error
        time.sleep(0.05)
        assert not waiter.done
        assert list(long.result(10).token_ids) == expect([1], 30, 1)
        assert list(waiter.result(10).token_ids) == expect([2], 4, 1)
        assert group.served[long.request_id] == {("a", 1)}
    finally:
        core.shutdown()


def test_failed_load_leaves_registry_and_is_remembered(fake_inspect):
    core, group = make(failed_load_ttl_s=60.0)
    try:
        core.load_adapter("good", "src-good")
        before = core.list_adapters()
        with pytest.raises(AdapterNotFoundError):
            core.load_adapter("x", "missing-dir")
        with pytest.raises(AdapterNotFoundError):
            core.load_adapter("x", "missing-dir")
        assert fake_inspect.count("missing-dir") == 1  # the second failed fast from memory
        group.fail_load.add("y")
        with pytest.raises(AdapterFormatError):
            core.load_adapter("y", "src-y")
        assert core.list_adapters() == before and ("y", 1) not in group.host
        with pytest.raises(UnknownAdapterError):
            core.submit([1], "y")
        assert core.generate([[1]], "good", G)[0].token_ids == tuple(expect([1], 4, 1))
        assert core.stats()["failed_loads_by_cause"] == {"adapter_source_missing": 1,
                                                         "adapter_format": 1}
    finally:
        core.shutdown()


def test_reload_failure_fails_only_that_request(fake_inspect):
    core, group = make(max_loras=1, max_cpu_loras=1)
    try:
        core.load_adapter("a", "src-a")
        core.load_adapter("b", "src-b")  # a leaves the host cache
        group.fail_load.add("a")
        with pytest.raises(AdapterFormatError):
            core.generate([[1]], "a", G)
        info = {i.name: i for i in core.list_adapters()}["a"]
        assert info.residency == "failed" and "reload failed" in (info.error or "")
        assert core.generate([[1], [2]], ["b", None], G)[1].token_ids == tuple(expect([2], 4))
    finally:
        core.shutdown()


def test_update_switches_between_steps_old_requests_keep_old_version(fake_inspect):
    core, group = make()
    group.step_delay = 0.005
    try:
        core.load_adapter("a", "src-a")
        old = core.submit([1], "a", SamplingParams(max_tokens=25, ignore_eos=True))
        next(iter(old))
        info = core.update_adapter("a", "src-a2")
        assert info.version == 2 and info.source == "src-a2"
        new = core.generate([[1]], "a", G)[0]
        assert new.adapter_version == 2 and list(new.token_ids) == expect([1], 4, 2)
        done = old.result(10)
        assert done.adapter_version == 1 and list(done.token_ids) == expect([1], 25, 1)
        assert group.served[old.request_id] == {("a", 1)}
        core.generate([[3]], None, G)  # a step boundary flushes the drop of v1
        assert ("a", 1) not in group.host and ("a", 2) in group.host
        assert [c.version for c in group.commands if isinstance(c, UpdateAdapter)] == [2]
    finally:
        core.shutdown()


def test_evict_adapter_running_requests_finish(fake_inspect):
    core, group = make()
    group.step_delay = 0.005
    try:
        core.load_adapter("a", "src-a")
        running = core.submit([1], "a", SamplingParams(max_tokens=10, ignore_eos=True))
        next(iter(running))
        core.evict_adapter("a")
        assert core.list_adapters() == []
        with pytest.raises(UnknownAdapterError):
            core.submit([1], "a")
        assert list(running.result(10).token_ids) == expect([1], 10, 1)
        core.generate([[2]], None, G)
        assert group.host == {}
        with pytest.raises(UnknownAdapterError):
            core.evict_adapter("a")
    finally:
        core.shutdown()


def test_pins(fake_inspect):
    core, group = make(max_loras=1, max_cpu_loras=2)
    try:
        core.load_adapter("a", "src-a")
        core.load_adapter("b", "src-b")
        core.pin_adapter("a")
        assert group.slots == [("a", 1)]
        info = {i.name: i for i in core.list_adapters()}
        assert info["a"].pinned and info["a"].residency == "device"
        with pytest.raises(CapacityError, match="pin_adapter"):
            core.generate([[1]], "b", G)
        with pytest.raises(CapacityError):
            core.pin_adapter("b")
        core.unpin_adapter("a")
        assert list(core.generate([[1]], "b", G)[0].token_ids) == expect([1], 4, 1)
    finally:
        core.shutdown()


def test_rank_failure_restarts_group_and_retries(fake_inspect):
    core, group = make()
    try:
        core.load_adapter("a", "src-a")
        want = core.generate([[1, 2], [3]], ["a", None], SamplingParams(max_tokens=6, ignore_eos=True))
        group.fail_steps = 1
        got = core.generate([[1, 2], [3]], ["a", None], SamplingParams(max_tokens=6, ignore_eos=True))
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert group.restarts == 1 and ("a", 1) in group.host
        assert core.stats()["rank_group_restarts"] == 1
        group.fail_steps = 2  # fails again right after the rebuild: the step's requests fail
        with pytest.raises(ClusterError, match="injected"):
            core.generate([[5]], None, G)
        assert core.generate([[5]], None, G)[0].token_ids == tuple(expect([5], 4))
    finally:
        core.shutdown()


def test_streaming_cancel_and_concurrent_callers(fake_inspect):
    core, group = make(max_loras=2, max_cpu_loras=4)
    group.step_delay = 0.002
    try:
        for name in "abc":
            core.load_adapter(name, f"src-{name}")
        handle = core.submit([1], "a", SamplingParams(max_tokens=40, ignore_eos=True))
        stream = iter(handle)
        assert [next(stream) for _ in range(3)] == expect([1], 3, 1)
        handle.cancel()
        rest = list(stream)
        result = handle.result(5)
        assert result.finish_reason == "abort" and list(result.token_ids) == expect([1], 3 + len(rest), 1)

        errors: list[BaseException] = []
        outputs: dict[int, list] = {}

        def worker(i: int) -> None:
            try:
                names = ["a", "b", "c", None]
                if i == 3:
                    core.load_adapter("d", "src-d")
                    names[3] = "d"
                res = core.generate([[i + 1]] * 4, names, G)
                outputs[i] = [list(r.token_ids) for r in res]
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        for i, out in outputs.items():
            assert out[:3] == [expect([i + 1], 4, 1)] * 3
    finally:
        core.shutdown()
    with pytest.raises(ClusterError):
        core.submit([1])


def test_prompt_validation(fake_inspect):
    core, _ = make(max_model_len=16)
    try:
        with pytest.raises(RequestError, match="context limit"):
            core.submit(list(range(16)))
        with pytest.raises(RequestError, match="token ids"):
            core.submit([1, VOCAB])
        with pytest.raises(RequestError, match="tokenizer"):
            core.submit("text")
        with pytest.raises(RequestError, match="one per prompt"):
            core.generate([[1], [2]], ["a", None, None])
        with pytest.raises(UnknownAdapterError):
            core.generate([[1]], "nope")
    finally:
        core.shutdown()


def test_step_loop_crash_fails_callers_instead_of_hanging(fake_inspect):
    core, group = make()

    def broken(command):
        raise AssertionError("scheduler bug")

    group.execute = broken  # not a ClusterError: no recovery, a crash
    handle = core.submit([1], None, G)
    with pytest.raises(ClusterError, match="step loop crashed"):
        handle.result(5)
    with pytest.raises(ClusterError, match="step loop crashed"):
        core.submit([1])
    core.shutdown()


def _check_result(handle) -> None:
    """The request finished with tokens of the version it was bound to (or a typed refusal)."""
    try:
        res = handle.result(10)
    except (UnknownAdapterError, CapacityError):
        return
    version = res.adapter_version
    assert list(res.token_ids) == expect(list(res.prompt_token_ids), len(res.token_ids), version)


@pytest.mark.parametrize("seed", range(4))
def test_random_adapter_operations_keep_ranks_and_tiers_in_step(fake_inspect, seed):
    import random

    rng = random.Random(seed)
    max_loras = rng.randint(1, 3)
    core, group = make(max_loras=max_loras, max_cpu_loras=max_loras + rng.randint(0, 2))
    group.step_delay = 0.001
    names = ["a", "b", "c", "d", "e"]
    live: list = []
    try:
        for _ in range(60):
            op = rng.random()
            name = rng.choice(names)
            try:
                if op < 0.25:
                    core.load_adapter(name, f"src-{name}")
                elif op < 0.35:
                    core.update_adapter(name, f"src-{name}-{rng.randint(0, 9)}")
                elif op < 0.45:
                    core.evict_adapter(name)
                elif op < 0.5:
                    core.pin_adapter(name)
                elif op < 0.6:
                    core.unpin_adapter(name)
                else:
                    adapter = rng.choice([*names, None])
                    live.append(core.submit([rng.randrange(VOCAB)], adapter,
                                            SamplingParams(max_tokens=rng.randint(1, 6),
                                                           ignore_eos=True)))
            except (UnknownAdapterError, CapacityError, RequestError):
                pass
            if rng.random() < 0.2:
                for h in live:
                    _check_result(h)
                live.clear()
                core.generate([[1]], None, G)  # a step boundary: pending drops flushed
                with core._lock:
                    tiers = core.adapters.tiers
                    host = {core.adapters.keys[t] for t in tiers.host_names()}
                    assert host == set(group.host)
                    slots = [None if t is None else core.adapters.keys[t]
                             for t in tiers.device_slots()]
                    assert all(s is None or g == s for s, g in zip(slots, group.slots))
        for h in live:
            _check_result(h)
    finally:
        core.shutdown()
