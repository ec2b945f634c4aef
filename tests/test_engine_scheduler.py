"""Scheduler + block manager: admission, queueing, preemption, slot pins, stops, errors."""

from __future__ import annotations

from collections import Counter, OrderedDict

import pytest

from lora_cluster.config import ClusterConfig, PrefillBatching, SamplingParams
from lora_cluster.engine.block_manager import BlockManager
from lora_cluster.engine.messages import AdapterKey, StepPlan
from lora_cluster.engine.scheduler import Scheduler, SchedulerConfig
from lora_cluster.engine.sequence import SeqStatus, Sequence
from lora_cluster.errors import AdapterNotFoundError, ConfigError, RequestError

VOCAB = 100


class FakeSlots:
    """LRU device slots with per-sequence pins, like the controller's tier."""

    def __init__(self, num_slots: int, failing: tuple[str, ...] = ()) -> None:
        self.num_slots = num_slots
        self.resident: OrderedDict[AdapterKey, int] = OrderedDict()
        self.pins: Counter[AdapterKey] = Counter()
        self.failing = failing
        self.loads: list[AdapterKey] = []
        self.bound: Counter[AdapterKey] = Counter()

    def acquire(self, name: str, bound: AdapterKey | None) -> tuple[AdapterKey, int] | None:
        adapter = bound or (name, 1)
        if name in self.failing:
            raise AdapterNotFoundError(f"{name}: source is gone")
        if adapter not in self.resident:
            used = set(self.resident.values())
            free = [s for s in range(self.num_slots) if s not in used]
            if not free:
                victims = [k for k in self.resident if self.pins[k] == 0]
                if not victims:
                    return None
                free = [self.resident.pop(victims[0])]
            self.resident[adapter] = free[0]
            self.loads.append(adapter)
        self.resident.move_to_end(adapter)
        self.pins[adapter] += 1
        self.bound[adapter] += 0 if bound else 1
        return adapter, self.resident[adapter]

    def release(self, adapter: AdapterKey) -> None:
        assert self.pins[adapter] > 0
        self.pins[adapter] -= 1

    def unbind(self, adapter: AdapterKey) -> None:
        assert self.bound[adapter] > 0
        self.bound[adapter] -= 1


class FakeRanks:
    """Mirrors block tables from plans like a rank does and 'samples' last token + 1."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.tables: dict[int, list[int]] = {}
        self.owner: dict[int, int] = {}  # flat KV slot → seq_id that wrote it
        self.fed: dict[int, list[int]] = {}

    def run(self, plan: StepPlan) -> list[tuple[int, int]]:
        for seq_id in plan.released:
            self.tables.pop(seq_id, None)
            self.fed.pop(seq_id, None)
        out = []
        for s in plan.seqs:
            table = self.tables.get(s.seq_id, [])[: s.blocks_from] + list(s.new_blocks)
            self.tables[s.seq_id] = table
            assert len(table) * self.block_size >= s.context_len
            fed = self.fed.setdefault(s.seq_id, [])
            assert len(fed) == s.start_pos, "positions must continue the KV cache"
            fed.extend(s.token_ids)
            for i in range(s.start_pos, s.context_len):
                self.owner[table[i // self.block_size] * self.block_size + i % self.block_size] = s.seq_id
            if s.sample is not None:
                out.append((s.seq_id, (s.token_ids[-1] + 1) % VOCAB))
        # No two live sequences may share a block.
        live = [b for t in self.tables.values() for b in t]
        assert len(live) == len(set(live))
        return out


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, limit=None, slots=2,
         eos=(), watermark=0, failing=(), batching=None):
    cfg = SchedulerConfig(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=budget,
                          context_limit=limit or num_blocks * block_size,
                          eos_token_ids=eos, watermark_blocks=watermark,
                          prefill_batching=batching or PrefillBatching())
    fake_slots = FakeSlots(slots, failing)
    return Scheduler(cfg, fake_slots), fake_slots, FakeRanks(block_size)


_next_id = iter(range(10**9))


def seq(prompt, max_tokens=4, adapter=None, **sampling):
    return Sequence(seq_id=next(_next_id), prompt_ids=tuple(prompt),
                    sampling=SamplingParams(max_tokens=max_tokens, **sampling),
                    adapter_name=adapter)


def run_to_end(sched, ranks, max_steps=500):
    steps = []
    for _ in range(max_steps):
        step = sched.schedule()
        if step is None:
            if not sched.has_work():
                return steps
            raise AssertionError("scheduler stalled with work left")
        steps.append(step)
        sched.apply(step, ranks.run(step.plan))
    raise AssertionError("did not finish")


def expected_tokens(prompt, n):
    out, last = [], prompt[-1]
    for _ in range(n):
        last = (last + 1) % VOCAB
        out.append(last)
    return out


def test_block_manager_grow_and_free():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.grow(1, 5) == [0, 1]
    assert bm.grow(1, 8) == []
    assert bm.extra_blocks(1, 9) == 1 and bm.can_grow(1, 16) and not bm.can_grow(1, 17)
    assert bm.grow(2, 1) == [2]
    assert bm.free(1) == 2 and bm.num_free == 3
    with pytest.raises(RuntimeError):
        bm.grow(3, 17)


def test_prefill_then_decode_and_max_tokens():
    sched, _, ranks = make()
    s = seq([5, 6, 7], max_tokens=3)
    sched.add(s)
    steps = run_to_end(sched, ranks)
    assert [len(st.plan.seqs[0].token_ids) for st in steps] == [3, 1, 1]
    assert steps[1].plan.is_decode and not steps[0].plan.is_decode
    assert s.output_ids == expected_tokens([7], 3) and s.finish_reason == "length"
    assert sched.blocks.num_free == sched.blocks.num_blocks


def test_max_num_seqs_and_token_budget_chunk_prefill():
    sched, _, ranks = make(max_num_seqs=2, budget=5)
    a, b, c = seq(range(1, 8)), seq([1, 2]), seq([3])
    for s in (a, b, c):
        sched.add(s)
    first = sched.schedule()
    # a is chunked to the 5-token budget; b does not fit the budget left.
    assert [(e[0].seq_id, e[1]) for e in first.entries] == [(a.seq_id, 5)]
    assert first.plan.seqs[0].sample is None
    sched.apply(first, ranks.run(first.plan))
    second = sched.schedule()
    # a finishes its prompt (2 tokens) and samples; b is admitted with the rest of the budget.
    assert [(e[0].seq_id, e[1]) for e in second.entries] == [(a.seq_id, 2), (b.seq_id, 2)]
    assert all(st.sample is not None for st in second.plan.seqs)
    assert len(sched.running) == 2 and c in sched.waiting  # max_num_seqs
    sched.apply(second, ranks.run(second.plan))
    run_to_end(sched, ranks)
    for s in (a, b, c):
        assert s.output_ids == expected_tokens(s.prompt_ids, 4)


def test_queue_when_blocks_short_then_admit():
    sched, _, ranks = make(num_blocks=4, block_size=4)
    a, b = seq(range(1, 9), max_tokens=4), seq(range(1, 9), max_tokens=4)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    # 8 + 8 tokens would fit 4 blocks exactly, but a's decode needs a third block: both run,
    # and the newest is preempted by recompute when the blocks run out.
    sched.apply(step, ranks.run(step.plan))
    steps = run_to_end(sched, ranks)
    assert any(b.seq_id in st.plan.released for st in steps)
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    assert a.output_ids == expected_tokens(a.prompt_ids, 4)
    assert b.output_ids == expected_tokens(b.prompt_ids, 4)


def test_fcfs_memory_queueing_blocks_later_small_requests():
    sched, _, ranks = make(num_blocks=4, block_size=4, max_num_seqs=8)
    big1, big2, small = seq(range(1, 13), max_tokens=2), seq(range(1, 9), 2), seq([1], 2)
    for s in (big1, big2, small):
        sched.add(s)
    step = sched.schedule()
    # big1 takes 3 blocks; big2 needs 2 → waits, and small may not jump the queue.
    assert [e[0] for e in step.entries] == [big1]
    assert list(sched.waiting) == [big2, small]
    sched.apply(step, ranks.run(step.plan))
    run_to_end(sched, ranks)
    assert all(s.finish_reason == "length" for s in (big1, big2, small))


def test_preemption_recomputes_prompt_and_outputs():
    sched, _, ranks = make(num_blocks=3, block_size=4, max_num_seqs=4)
    a, b = seq([1, 2, 3], max_tokens=6), seq([10, 11, 12], max_tokens=6)
    sched.add(a)
    sched.add(b)
    steps = run_to_end(sched, ranks)
    assert b.num_preemptions >= 1
    resumed = [st for st in steps for s in st.plan.seqs if s.seq_id == b.seq_id and s.start_pos == 0]
    assert len(resumed) == 1 + b.num_preemptions
    # The recompute feeds prompt + outputs so far and continues the output index.
    again = next(s for st in resumed[1:] for s in st.plan.seqs if s.seq_id == b.seq_id)
    assert again.token_ids[:3] == (10, 11, 12) and len(again.token_ids) > 3
    assert again.sample is not None and again.sample.index == len(again.token_ids) - 3
    assert a.output_ids == expected_tokens(a.prompt_ids, 6)
    assert b.output_ids == expected_tokens(b.prompt_ids, 6)


def test_adapters_and_base_mix_in_one_step():
    sched, slots, ranks = make(slots=2)
    seqs = [seq([1, 2], adapter="a"), seq([3], adapter=None), seq([4, 5], adapter="b")]
    for s in seqs:
        sched.add(s)
    step = sched.schedule()
    assert sorted(s.slot for s in step.plan.seqs) == [-1, 0, 1]
    assert slots.pins == Counter({("a", 1): 1, ("b", 1): 1})
    sched.apply(step, ranks.run(step.plan))
    run_to_end(sched, ranks)
    assert +slots.pins == Counter() and +slots.bound == Counter()


def test_adapter_waits_while_slots_pinned_base_passes():
    sched, slots, ranks = make(slots=1)
    a = seq([1, 2], max_tokens=3, adapter="a")
    b = seq([3, 4], max_tokens=2, adapter="b")
    a2 = seq([5], max_tokens=2, adapter="a")
    base = seq([6], max_tokens=2)
    for s in (a, b, a2, base):
        sched.add(s)
    step = sched.schedule()
    # b waits for the pinned slot; a2 (resident adapter) must not overtake it; base passes.
    assert {e[0].seq_id for e in step.entries} == {a.seq_id, base.seq_id}
    assert list(sched.waiting) == [b, a2]
    while a.status is not SeqStatus.FINISHED:
        sched.apply(step, ranks.run(step.plan))
        step = sched.schedule()
    assert b in [e[0] for e in step.entries] and slots.resident == {("b", 1): 0}
    sched.apply(step, ranks.run(step.plan))
    run_to_end(sched, ranks)
    for s in (a, b, a2, base):
        assert s.output_ids == expected_tokens(s.prompt_ids, s.sampling.max_tokens)
    assert slots.loads == [("a", 1), ("b", 1), ("a", 1)]


def test_failed_adapter_fails_only_its_request():
    sched, _, ranks = make(failing=("gone",))
    bad, good = seq([1], adapter="gone"), seq([2], adapter="ok")
    sched.add(bad)
    sched.add(good)
    step = sched.schedule()
    assert [e[0] for e in step.entries] == [good]
    events = sched.take_events()
    assert [e.seq for e in events] == [bad]
    assert bad.finish_reason == "abort" and isinstance(bad.error, AdapterNotFoundError)
    sched.apply(step, ranks.run(step.plan))
    run_to_end(sched, ranks)
    assert good.output_ids == expected_tokens([2], 4)


@pytest.mark.parametrize(
    ("sampling", "eos", "limit", "want_len", "reason"),
    [
        ({"max_tokens": 10}, (4,), None, 2, "stop"),  # 2 → 3 → 4 (eos)
        ({"max_tokens": 10, "ignore_eos": True}, (4,), None, 10, "length"),
        ({"max_tokens": 10, "stop_token_ids": (5,)}, (), None, 3, "stop"),
        ({"max_tokens": 10, "ignore_eos": True, "stop_token_ids": (5,)}, (4,), None, 3, "stop"),
        ({"max_tokens": 10}, (), 6, 4, "length"),  # 2 prompt + 4 outputs == context limit
    ],
)
def test_stop_conditions(sampling, eos, limit, want_len, reason):
    sched, _, ranks = make(eos=eos, limit=limit)
    s = Sequence(seq_id=1, prompt_ids=(1, 2), sampling=SamplingParams(**sampling))
    sched.add(s)
    run_to_end(sched, ranks)
    assert len(s.output_ids) == want_len and s.finish_reason == reason
    assert s.output_ids[-1] in s.stop_ids or reason == "length"


def test_prompt_errors():
    sched, _, _ = make(num_blocks=4, block_size=4)
    with pytest.raises(RequestError, match="exceed the context limit"):
        sched.add(seq(range(16)))  # generation needs room for one more token
    sched.add(Sequence(seq_id=99, prompt_ids=tuple(range(16)), sampling=SamplingParams(), score=True))
    with pytest.raises(RequestError, match="at least one token"):
        sched.check(0, score=False)


def test_score_sequence_keeps_then_emits_logits():
    sched, _, ranks = make(budget=4)
    s = Sequence(seq_id=7, prompt_ids=tuple(range(1, 11)), sampling=SamplingParams(), score=True)
    sched.add(s)
    modes = []
    for _ in range(5):
        step = sched.schedule()
        if step is None:
            break
        modes.append([st.logits for st in step.plan.seqs])
        ranks.run(step.plan)
        emitted = [(7, "payload")] if modes[-1] == ["emit"] else []
        sched.apply(step, [], emitted)
    assert modes == [["keep"], ["keep"], ["emit"]]
    assert s.logits == "payload" and s.finish_reason == "stop" and not sched.has_work()


def test_abort_and_preempt_all_release_everything():
    sched, slots, ranks = make()
    a, b = seq([1, 2], max_tokens=8, adapter="a"), seq([3], max_tokens=8)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    sched.apply(step, ranks.run(step.plan))
    sched.abort(a)
    assert a.finish_reason == "abort" and slots.pins[("a", 1)] == 0
    step = sched.schedule()
    assert a.seq_id in step.plan.released
    sched.apply(step, ranks.run(step.plan))
    sched.preempt_all()
    assert not sched.running and list(sched.waiting) == [b]
    assert sched.blocks.num_free == sched.blocks.num_blocks
    ranks = FakeRanks(4)  # a rebuilt group starts empty
    run_to_end(sched, ranks)
    assert b.output_ids == expected_tokens([3], 8)


def test_preempted_sequence_keeps_its_bound_adapter_version():
    sched, slots, ranks = make(num_blocks=3, block_size=4, max_num_seqs=4)
    calls = []
    acquire = slots.acquire

    def spy(name, bound):
        calls.append((name, bound))
        return acquire(name, bound)

    slots.acquire = spy
    a, b = seq([1, 2, 3], max_tokens=6, adapter="x"), seq([10, 11, 12], max_tokens=6, adapter="y")
    sched.add(a)
    sched.add(b)
    run_to_end(sched, ranks)
    assert b.num_preemptions >= 1
    # First admission binds (bound None); every resume passes the version bound then.
    assert calls[:2] == [("x", None), ("y", None)]
    assert all(bound == ("y", 1) for name, bound in calls[2:] if name == "y") and len(calls) > 2
    assert +slots.bound == Counter() and +slots.pins == Counter()


def test_victims_are_never_sequences_already_in_the_step():
    sched, _, _ = make(num_blocks=4, block_size=4, max_num_seqs=4)
    # An older sequence midway through a long prefill, a newer one decoding: decodes are
    # planned first, so when the older one then needs blocks, the newer one is already in
    # the step and must not be the victim.
    old = seq(range(1, 13), max_tokens=4)
    new = seq([5, 6, 7, 8], max_tokens=4)
    new.output_ids.append(9)
    for s, computed in ((old, 4), (new, 4)):
        s.status = SeqStatus.RUNNING
        s.num_computed = computed
        sched.blocks.grow(s.seq_id, computed)
        sched.running.append(s)
    step = sched.schedule()
    assert [s.seq_id for s in step.plan.seqs] == [new.seq_id]
    assert old.num_preemptions == 1 and new.num_preemptions == 0
    for s in step.plan.seqs:  # every planned sequence owns the blocks it writes
        assert len(sched.blocks.table(s.seq_id)) * 4 >= s.context_len


@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_keep_invariants(seed):
    import random

    rng = random.Random(seed)
    sched, slots, ranks = make(num_blocks=rng.randint(6, 16), block_size=rng.choice([2, 4]),
                               max_num_seqs=rng.randint(1, 6), budget=rng.randint(3, 20),
                               slots=rng.randint(1, 3), watermark=rng.randint(0, 1))
    pending = []
    for _ in range(25):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 10))]
        adapter = rng.choice([None, "a", "b", "c", "d"])
        pending.append(seq(prompt, max_tokens=rng.randint(1, 8), adapter=adapter))
    added = []
    for _ in range(2000):
        while pending and rng.random() < 0.3:
            added.append(pending.pop())
            sched.add(added[-1])
        step = sched.schedule()
        if step is None:
            if not sched.has_work() and not pending:
                break
            continue
        # The step's sequences are running and own the blocks they write.
        for s, _ in step.entries:
            assert s.status is SeqStatus.RUNNING
        sched.apply(step, ranks.run(step.plan))
        if rng.random() < 0.05 and sched.running:
            sched.abort(rng.choice(sched.running))
    assert not sched.has_work() and not pending
    for s in added:
        if s.finish_reason != "abort":
            room = sched.cfg.context_limit - len(s.prompt_ids)
            assert s.output_ids == expected_tokens(s.prompt_ids, min(s.sampling.max_tokens, room))
    assert sched.blocks.num_free == sched.blocks.num_blocks
    assert +slots.pins == Counter() and +slots.bound == Counter()


# ---------------------------------------------------------------- prefill batching
HOLD = PrefillBatching(hold_steps=3, min_prompts=3)


def _decoding(sched, ranks, count, max_tokens=50):
    """``count`` sequences admitted together and past their prefill."""
    running = [seq([10 + i, 11 + i], max_tokens=max_tokens) for i in range(count)]
    for s in running:
        sched.add(s)
    step = sched.schedule()
    assert len(step.entries) == count
    sched.apply(step, ranks.run(step.plan))
    return running


def _step(sched, ranks):
    step = sched.schedule()
    sched.apply(step, ranks.run(step.plan))
    return step


def _admitted(step):
    return [s.seq_id for s, n in step.entries if n > 1]


def test_prefill_batching_holds_a_lone_prompt_a_bounded_number_of_steps():
    sched, _, ranks = make(batching=HOLD)
    _decoding(sched, ranks, 4)  # an idle engine admits at once
    late = seq([1, 2, 3], max_tokens=2)
    sched.add(late)
    held = [_step(sched, ranks) for _ in range(3)]
    assert all(st.plan.is_decode and len(st.plan.seqs) == 4 for st in held)
    assert _admitted(_step(sched, ranks)) == [late.seq_id]  # the 4th step lets it in
    assert sched.stats()["prefill_held_steps"] == 3
    # The hold counter starts afresh for the next prompt.
    nxt = seq([4, 5], max_tokens=2)
    sched.add(nxt)
    assert _step(sched, ranks).plan.is_decode
    assert sched.num_held_steps == 4


def test_prefill_batching_admits_a_batch_at_once():
    sched, _, ranks = make(batching=HOLD)
    _decoding(sched, ranks, 4)
    first = seq([1, 2, 3])
    sched.add(first)
    assert _step(sched, ranks).plan.is_decode  # held: alone
    group = [seq([7, 8]), seq([9, 10, 11])]
    for s in group:
        sched.add(s)
    step = _step(sched, ranks)  # three waiting >= min_prompts: all in one prefill
    assert _admitted(step) == [first.seq_id] + [s.seq_id for s in group]
    assert sched.stats()["prefill_admissions"] == 2 and sched.stats()["prefill_admitted"] == 7


def test_prefill_batching_never_holds_when_nothing_is_gained():
    # Too few decodes to protect: admitted at once.
    sched, _, ranks = make(batching=HOLD)
    _decoding(sched, ranks, 2)
    s = seq([1, 2, 3])
    sched.add(s)
    assert _admitted(_step(sched, ranks)) == [s.seq_id]
    # A step that runs a prefill chunk anyway takes waiting prompts along.
    sched, _, ranks = make(batching=HOLD, budget=10)
    _decoding(sched, ranks, 4)
    long = seq(range(1, 11))
    sched.add(long)  # 10 tokens fill the 6 the decodes leave: admitted at once, chunked
    assert [(e[0].seq_id, e[1]) for e in _step(sched, ranks).entries if e[1] > 1] == [(long.seq_id, 6)]
    rider = seq([5, 6])
    sched.add(rider)
    step = _step(sched, ranks)  # the chunk continues: the lone rider comes along, not held
    assert [(e[0].seq_id, e[1]) for e in step.entries if e[1] > 1] == [(long.seq_id, 4), (rider.seq_id, 2)]
    assert sched.num_held_steps == 0
    # Waiting prompts that fill the token budget are admitted at once.
    sched, _, ranks = make(batching=HOLD, budget=12)
    _decoding(sched, ranks, 4)
    big = seq(range(1, 20))
    sched.add(big)
    assert [(e[0].seq_id, e[1]) for e in _step(sched, ranks).entries if e[1] > 1] == [(big.seq_id, 8)]
    # No free seat: waiting is not holding (the hold starts when a seat frees).
    sched, _, ranks = make(batching=HOLD, max_num_seqs=4)
    running = _decoding(sched, ranks, 4, max_tokens=3)
    queued = seq([1, 2])
    sched.add(queued)
    while not any(s.is_finished for s in running):
        _step(sched, ranks)
    assert sched.num_held_steps == 0


def test_prefill_batching_admits_when_the_time_bound_passes(monkeypatch):
    from lora_cluster.engine import scheduler as scheduler_mod

    clock = [1000.0]
    monkeypatch.setattr(scheduler_mod.time, "monotonic", lambda: clock[0])
    sched, _, ranks = make(batching=PrefillBatching(hold_steps=100, hold_ms=50.0, min_prompts=3))
    _decoding(sched, ranks, 4)
    s = seq([1, 2, 3])
    sched.add(s)
    assert _step(sched, ranks).plan.is_decode
    clock[0] += 0.049
    assert _step(sched, ranks).plan.is_decode
    clock[0] += 0.002
    assert _admitted(_step(sched, ranks)) == [s.seq_id]


def test_prefill_batching_keeps_outputs_and_finishes_everything():
    plain, _, ranks_a = make(max_num_seqs=4, budget=16)
    held, _, ranks_b = make(max_num_seqs=4, budget=16, batching=HOLD)
    prompts = [list(range(i, i + 1 + i % 5)) for i in range(1, 13)]
    outs = []
    for sched, ranks in ((plain, ranks_a), (held, ranks_b)):
        seqs = [seq(p, max_tokens=3 + i % 4) for i, p in enumerate(prompts)]
        for s in seqs:
            sched.add(s)
        steps = run_to_end(sched, ranks)
        outs.append(([s.output_ids for s in seqs], sum(not st.plan.is_decode for st in steps)))
    assert outs[0][0] == outs[1][0]
    assert held.num_held_steps > 0 and outs[1][1] < outs[0][1]  # fewer steps run a prefill


def test_prefill_batching_config():
    cfg = ClusterConfig(model="m", max_num_seqs=128)
    assert cfg.prefill_batching() == PrefillBatching(hold_steps=0, hold_ms=100.0, min_prompts=16)
    cuda = cfg.replace(device="cuda").prefill_batching()
    assert cuda.hold_steps == 8 and cuda.min_prompts == 16
    assert cfg.replace(device="cuda", use_cuda_graphs=False).prefill_batching().hold_steps == 0
    assert ClusterConfig(model="m", max_num_seqs=4).prefill_batching().min_prompts == 2
    assert ClusterConfig(model="m", max_num_seqs=1).prefill_batching().min_prompts == 1
    explicit = cfg.replace(device="cuda", prefill_hold_steps=2, prefill_batch_prompts=5,
                           prefill_hold_ms=20.0).prefill_batching()
    assert explicit == PrefillBatching(hold_steps=2, hold_ms=20.0, min_prompts=5)
    resolved = cfg.resolved(cuda_available=True)
    assert (resolved.prefill_hold_steps, resolved.prefill_batch_prompts) == (8, 16)
    assert cfg.resolved(cuda_available=False).prefill_hold_steps == 0
    for bad in ({"prefill_hold_steps": -1}, {"prefill_batch_prompts": 0},
                {"prefill_hold_ms": 0.0}, {"prefill_hold_steps": 1.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))) as err:
            ClusterConfig(model="m", **bad)
        assert err.value.details["field"] == next(iter(bad))
    with pytest.raises(ConfigError, match="prefill_hold_ms"):
        PrefillBatching(hold_ms=-1.0)
