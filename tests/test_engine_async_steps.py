"""Asynchronous steps (``ClusterConfig.async_steps``): step k+1 is sent before step k's result.

Scheduler units (no torch): pending tokens fed as ``PREV_TOKEN``, a pending token that surely
ends its sequence not fed, the token after an EOS discarded and its blocks released, a
preempted sequence keeping its in-flight token. Then the whole core on a tiny Qwen3-MoE: the
same tokens (greedy, seeded, stop tokens that end sequences a step early, max_tokens) and
logits as the synchronous path, on one rank, on TP and EP thread groups (tokens shared over
the world), with cancels, preemption, and a rank failure with a step in flight.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from oracle import oracle_greedy
from rank_groups import ThreadRankGroup

from lora_cluster.config import ClusterConfig, SamplingParams
from lora_cluster.engine.controller_core import ControllerCore
from lora_cluster.engine.messages import PREV_TOKEN, AdapterKey
from lora_cluster.engine.rank_group import LocalRankGroup, async_by_default, supports_async
from lora_cluster.engine.scheduler import Scheduler, SchedulerConfig
from lora_cluster.engine.sequence import SeqStatus, Sequence
from lora_cluster.engine.tokenizer import Tokenizer
from lora_cluster.errors import ConfigError
from lora_cluster.model.spec import load_model_spec

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore:.*pattern keys did not match:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]

PROMPTS = [[1, 40, 41, 42, 300, 7, 99], [5, 6, 7], list(range(100, 130)), [200, 17],
           [1, 250, 251, 252, 8], [9]]


class NoSlots:
    """A ``SlotProvider`` for base-only sequences."""

    def acquire(self, name: str, bound: AdapterKey | None) -> tuple[AdapterKey, int] | None:
        raise AssertionError("no adapters here")

    def release(self, key: AdapterKey) -> None: ...

    def unbind(self, key: AdapterKey) -> None: ...


def scheduler(**overrides) -> Scheduler:
    options = {"num_blocks": 16, "block_size": 4, "max_num_seqs": 8,
               "max_num_batched_tokens": 64, "context_limit": 32, "eos_token_ids": (2,),
               "async_steps": True, **overrides}
    return Scheduler(SchedulerConfig(**options), NoSlots())


def seq(seq_id: int, prompt: tuple[int, ...], max_tokens: int = 8) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_ids=prompt, sampling=SamplingParams(max_tokens=max_tokens))


# ---------------------------------------------------------------- scheduler units
def test_pending_token_is_fed_as_placeholder_with_the_next_sample_index():
    s = scheduler()
    a = seq(0, (5, 6, 7))
    s.add(a)
    first = s.schedule()
    assert first is not None and first.plan.share_tokens and not first.plan.placeholders
    assert a.pending == 1 and a.num_tokens == 4 and a.output_ids == []
    second = s.schedule()  # before the first step's result is back
    assert second is not None and second.plan.placeholders == (0,)
    fed = second.plan.seqs[0]
    assert fed.token_ids == (PREV_TOKEN,) and fed.start_pos == 3
    assert fed.sample is not None and fed.sample.index == 1
    assert a.pending == 2
    events = s.apply(first, [(0, 11)])
    assert [(e.new_token, e.finished) for e in events] == [(11, False)]
    events = s.apply(second, [(0, 12)])
    assert [(e.new_token, e.finished) for e in events] == [(12, False)]
    assert a.output_ids == [11, 12] and a.pending == 0


def test_token_after_eos_is_discarded_and_blocks_released():
    s = scheduler()
    a = seq(0, (5, 6, 7))
    s.add(a)
    first = s.schedule()
    second = s.schedule()
    assert first is not None and second is not None
    free_before = s.blocks.num_free
    events = s.apply(first, [(0, 2)])  # EOS
    assert [(e.new_token, e.finished) for e in events] == [(2, True)]
    assert a.finish_reason == "stop" and s.blocks.num_free > free_before
    assert s.apply(second, [(0, 99)]) == []  # the extra token is never emitted
    assert a.output_ids == [2]
    b = seq(1, (8, 9))
    s.add(b)
    third = s.schedule()
    assert third is not None and third.plan.released == (0,)


def test_pending_token_that_surely_ends_the_sequence_is_not_fed():
    s = scheduler()
    a, b = seq(0, (5, 6, 7), max_tokens=1), seq(1, (8, 9), max_tokens=3)
    s.add(a)
    s.add(b)
    first = s.schedule()
    second = s.schedule()
    assert first is not None and second is not None
    assert [x.seq_id for x in second.plan.seqs] == [1]  # a's one token is already in flight
    events = s.apply(first, [(0, 50), (1, 51)])
    assert a.is_finished and a.finish_reason == "length"
    assert [e.finished for e in events] == [True, False]
    # Context limit: a pending token that fills the context is not fed either.
    s2 = scheduler(context_limit=4)
    c = seq(2, (5, 6, 7))
    s2.add(c)
    assert s2.schedule() is not None and s2.schedule() is None


def test_preempted_sequence_keeps_its_token_and_waits_for_it():
    s = scheduler(num_blocks=2, context_limit=8)  # two sequences of 4 collide on growth
    a, b = seq(0, (1, 3, 4, 5)), seq(1, (6, 7, 8, 9))
    s.add(a)
    s.add(b)
    first = s.schedule()
    assert first is not None and len(first.plan.seqs) == 2
    second = s.schedule()  # a needs a block: b (newest) is preempted with its token in flight
    assert second is not None and [x.seq_id for x in second.plan.seqs] == [0]
    assert b.status is SeqStatus.WAITING and b.pending == 1 and second.plan.released == (1,)
    assert s.schedule() is None  # b cannot be re-admitted before its token is back
    events = s.apply(first, [(0, 20), (1, 21)])
    assert [e.new_token for e in events] == [20, 21]
    assert b.output_ids == [21] and b.pending == 0 and b.num_computed == 0


def test_preempt_all_forgets_tokens_lost_with_the_ranks():
    s = scheduler()
    a = seq(0, (5, 6, 7))
    s.add(a)
    assert s.schedule() is not None and s.schedule() is not None
    s.preempt_all()
    assert a.pending == 0 and a.num_tokens == 3 and a.status is SeqStatus.WAITING


# ---------------------------------------------------------------- the whole core
def make_core(model_dir: Path, group: str = "local", **overrides) -> ControllerCore:
    options = {"model": str(model_dir), "device": "cpu", "dtype": "float32", "max_loras": 4,
               "max_cpu_loras": 8, "max_lora_rank": 16, "kv_cache_bytes": 4 << 20,
               "block_size": 8, **overrides}
    cfg = ClusterConfig(**options)
    ranks = ThreadRankGroup(cfg) if group == "thread" else LocalRankGroup(cfg)
    return ControllerCore(cfg, load_model_spec(model_dir), ranks,
                          Tokenizer.from_model_dir(model_dir))


@pytest.fixture(scope="module")
def adapter(fixture_cache, qwen3_moe_dir):
    return fixture_cache.adapter(qwen3_moe_dir, name="all", targets=["all"], seed=3)


def run_mix(core: ControllerCore, adapter_dir: Path, stop: int | None = None) -> tuple:
    """Greedy and seeded requests with varied lengths (and a stop token), plus scores."""
    core.load_adapter("a", str(adapter_dir))
    names = ["a", None, "a", None, "a", "a"]
    sampling = [SamplingParams(max_tokens=3 + i, ignore_eos=True,
                               stop_token_ids=() if stop is None else (stop,),
                               temperature=0.0 if i % 2 else 0.8, top_p=0.9, seed=i)
                for i in range(len(PROMPTS))]
    handles = []
    for i, p in enumerate(PROMPTS):
        handles.append(core.submit(p, names[i], sampling[i]))
        time.sleep(0.01 * (i % 3))
    tokens = [h.result(60).token_ids for h in handles]
    scores = core.score(PROMPTS[:2], ["a", None])
    return tokens, scores


def test_async_equals_sync_tokens_logits_and_stop_tokens(qwen3_moe_dir, adapter):
    results = {}
    stats = {}
    for mode in (False, True):
        core = make_core(qwen3_moe_dir, async_steps=mode, max_num_batched_tokens=16)
        try:
            assert core.async_steps is mode
            tokens, scores = run_mix(core, adapter)
            # A stop token each request meets early: async steps sample one token past it.
            stop = tokens[1][1]
            stopped, _ = run_mix(core, adapter, stop=stop)
            results[mode] = (tokens, scores, stopped)
            stats[mode] = core.stats()
        finally:
            core.shutdown()
    (t0, s0, x0), (t1, s1, x1) = results[False], results[True]
    assert t1 == t0 and x1 == x0
    assert any(len(a) < len(b) for a, b in zip(x0, t0))  # the stop token ended some early
    for a, b in zip(s0, s1):
        assert float((a - b).norm() / a.norm()) < 1e-5
    assert stats[True]["tokens_discarded"] >= 1 and stats[False].get("tokens_discarded", 0) == 0
    assert stats[True]["generated_tokens"] == stats[False]["generated_tokens"]
    assert stats[True]["kv_blocks_free"] == stats[True]["kv_blocks_total"]


def test_async_preemption_and_cancel_keep_tokens(qwen3_moe_dir, adapter):
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    # Few KV blocks: sequences preempt each other (some with a token in flight).
    outs = {}
    for mode in (False, True):
        core = make_core(qwen3_moe_dir, async_steps=mode, kv_cache_bytes=50_000, block_size=4,
                         max_model_len=48, max_num_seqs=4)
        try:
            core.load_adapter("a", str(adapter))
            doomed = core.submit(list(range(10, 20)), "a", SamplingParams(max_tokens=30,
                                                                          ignore_eos=True))
            next(iter(doomed))
            doomed.cancel()
            outs[mode] = [r.token_ids for r in core.generate(PROMPTS, "a", greedy)]
            st = core.stats()
            assert st["kv_blocks_total"] <= 13 and st["num_preemptions"] > 0
            assert st["kv_blocks_free"] == st["kv_blocks_total"]
        finally:
            core.shutdown()
    assert outs[True] == outs[False]


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)])
def test_async_multi_rank_shares_tokens(qwen3_moe_dir, adapter, tp, ep):
    outs = {}
    for mode in (False, True):
        core = make_core(qwen3_moe_dir, group="thread", async_steps=mode, tp_size=tp,
                         ep_size=ep)
        try:
            assert core.async_steps is mode
            outs[mode] = run_mix(core, adapter)[0]
        finally:
            core.shutdown()
    assert outs[True] == outs[False]


def test_rank_failure_with_a_step_in_flight(qwen3_moe_dir, adapter):
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    core = make_core(qwen3_moe_dir, async_steps=True)
    try:
        core.load_adapter("a", str(adapter))
        want = core.generate(PROMPTS, "a", greedy)
        runtime = core.group.runtime  # type: ignore[attr-defined]
        real, calls = runtime.execute, []

        def dies_on_fourth_step(command):
            calls.append(command)
            if len(calls) == 4:
                raise RuntimeError("simulated rank crash")
            return real(command)

        runtime.execute = dies_on_fourth_step
        got = core.generate(PROMPTS, "a", greedy)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        st = core.stats()
        assert st["rank_group_restarts"] == 1 and st["steps_abandoned"] == 1
    finally:
        core.shutdown()


def test_async_steps_option():
    with pytest.raises(ConfigError, match="async_steps"):
        ClusterConfig(model="m", async_steps="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="async_steps"):
        ClusterConfig(model="m", async_steps=1)  # type: ignore[arg-type]

    class Forwarding:  # forwards attributes: cannot see the steps it would time
        def __getattr__(self, name):
            return getattr(LocalRankGroup, name)

    assert not supports_async(Forwarding())


def test_async_true_needs_a_group_that_can_hold_steps(qwen3_moe_dir):
    class SyncOnly:
        def describe(self): ...

    cfg = ClusterConfig(model=str(qwen3_moe_dir), device="cpu", dtype="float32",
                        async_steps=True)
    with pytest.raises(ConfigError, match="submit/collect"):
        ControllerCore(cfg, load_model_spec(qwen3_moe_dir), SyncOnly())  # type: ignore[arg-type]


def test_async_tokens_match_the_hf_peft_oracle(qwen3_moe_dir, adapter):
    core = make_core(qwen3_moe_dir, async_steps=True)
    try:
        core.load_adapter("a", str(adapter))
        got = core.generate(PROMPTS[:3], ["a", None, "a"],
                            SamplingParams(max_tokens=6, ignore_eos=True))
        assert core.stats()["async_steps"] and core.stats()["steps"] >= 6
    finally:
        core.shutdown()
    for res, prompt, ad in zip(got, PROMPTS[:3], [adapter, None, adapter]):
        want = oracle_greedy(qwen3_moe_dir, ad, prompt, 6, stop_at_eos=False)
        assert list(res.token_ids) == want


def test_auto_is_on_for_groups_of_other_processes_only(qwen3_moe_dir):
    class Remote:  # stands for RayRankGroup (ranks in other processes)
        def submit(self, command): ...

        def collect(self, ticket): ...

    assert async_by_default(Remote())
    cfg = ClusterConfig(model=str(qwen3_moe_dir), device="cpu", dtype="float32",
                        kv_cache_bytes=1 << 20)
    local = LocalRankGroup(cfg)
    try:
        assert supports_async(local) and not async_by_default(local)
    finally:
        local.close()
