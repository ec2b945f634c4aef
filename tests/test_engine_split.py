"""Mixed steps split in two (decode rows through the decode executor, prefill / chunk / scoring
rows through a second eager forward) give the tokens and logits of the unsplit step and of
transformers + PEFT. On CPU the executor is ``EagerDecode``, the stand-in for CUDA graphs.

Two runtimes are fed the same plans from one real scheduler (staggered arrivals, chunked
prefills, scoring prompts kept across chunks, a one-token scoring prompt, three adapters and
base rows), one splitting every mixed step, the other running each step as one forward.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from oracle import oracle_logits

from lora_cluster.config import ClusterConfig, PrefillBatching, SamplingParams
from lora_cluster.engine.controller_core import ControllerCore
from lora_cluster.engine.messages import (
    AdapterKey,
    LoadAdapter,
    PlaceAdapter,
    SampleSpec,
    SeqStep,
    Step,
    StepPlan,
)
from lora_cluster.engine.rank_group import LocalRankGroup
from lora_cluster.engine.rank_runtime import RankRuntime
from lora_cluster.engine.runner import EagerDecode
from lora_cluster.engine.scheduler import Scheduler, SchedulerConfig
from lora_cluster.engine.sequence import Sequence
from lora_cluster.engine.tokenizer import Tokenizer
from lora_cluster.model.parallel import LocalComm, ParallelInfo
from lora_cluster.model.spec import load_model_spec

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*pattern keys did not match:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

ADAPTERS = {"attn": {"targets": ["attention"], "seed": 1},
            "experts": {"targets": ["experts"], "expert_format": "3d", "r": 4, "seed": 2},
            "all": {"targets": ["all"], "expert_format": "2d", "use_rslora": True, "r": 16,
                    "seed": 3}}
SLOTS = {"attn": 0, "experts": 1, "all": 2}
MAX_TOKENS = 10
# step index → (prompt, adapter, score)
ARRIVALS = {
    0: [([1, 40, 41, 42, 300, 7, 99], "attn", False), ([5, 6, 7], None, False),
        ([200, 17], "all", False)],
    2: [(list(range(100, 130)), "experts", False)],  # 30 tokens: chunked beside the decodes
    3: [([1, 250, 251, 252, 8], "all", True), ([9], "attn", True)],  # one-token scoring prompt
    4: [(list(range(60, 83)), None, True), ([33, 34], "experts", False)],  # chunked scoring
    7: [([3, 3, 3, 3], "attn", False), (list(range(10, 29)), "all", False)],
}


class FixedSlots:
    """Every adapter resident in its own slot for the whole run."""

    def acquire(self, name: str, bound: AdapterKey | None) -> tuple[AdapterKey, int] | None:
        return (name, 1), SLOTS[name]

    def release(self, key: AdapterKey) -> None:
        pass

    def unbind(self, key: AdapterKey) -> None:
        pass


def _runtime(model_dir, adapters) -> RankRuntime:
    cfg = ClusterConfig(model=str(model_dir), device="cpu", dtype="float32", max_loras=3,
                        max_cpu_loras=3, max_lora_rank=16, kv_cache_bytes=2 << 20, block_size=4,
                        max_num_seqs=8)
    rt = RankRuntime(cfg, ParallelInfo(), LocalComm())
    for i, (name, path) in enumerate(adapters.items()):
        rt.execute(LoadAdapter(seq=2 * i, name=name, version=1, path=str(path)))
        rt.execute(PlaceAdapter(seq=2 * i + 1, name=name, version=1, slot=SLOTS[name]))
    return rt


def _wait_for(ready, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def _assert_oracle_greedy(model_dir, adapter, prompt, outputs) -> None:
    """``outputs`` are the oracle's greedy tokens: each is the argmax of transformers + PEFT
    logits over the prompt and the outputs before it (one teacher-forced forward)."""
    ids = [*prompt, *outputs]
    logits = oracle_logits(model_dir, adapter, ids[:-1])[len(prompt) - 1:]
    assert logits.argmax(-1).tolist() == list(outputs), (adapter, prompt)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_split_steps_match_unsplit_and_oracle(fixture_cache, qwen3_moe_dir):
    adapters = {n: fixture_cache.adapter(qwen3_moe_dir, name=n, **o) for n, o in ADAPTERS.items()}
    split, whole = _runtime(qwen3_moe_dir, adapters), _runtime(qwen3_moe_dir, adapters)
    executor = split.runner.use_eager_decode()
    split.runner.split_min_decodes = 1
    sched = Scheduler(SchedulerConfig(num_blocks=split.num_kv_blocks, block_size=4,
                                      max_num_seqs=8, max_num_batched_tokens=16,
                                      context_limit=split.context_limit), FixedSlots())
    seqs: list[tuple[Sequence, str | None]] = []
    kinds: set[str] = set()
    cmd = 100
    for index in range(200):
        for prompt, name, score in ARRIVALS.get(index, []):
            s = Sequence(seq_id=len(seqs), prompt_ids=tuple(prompt), adapter_name=name,
                         sampling=SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
                         score=score)
            sched.add(s)
            seqs.append((s, name))
        step = sched.schedule()
        if step is None:
            assert not sched.has_work()
            break
        if split.runner.split_of(step.plan) is not None:
            for s in step.plan.seqs:
                if len(s.token_ids) > 1:
                    kinds.add("score" if s.logits != "none" else
                              "prefill" if s.sample is not None else "chunk")
                kinds.add("base" if s.slot < 0 else "adapter")
        cmd += 1
        got, want = split.execute(Step(seq=cmd, plan=step.plan)), whole.execute(Step(seq=cmd, plan=step.plan))
        assert got is not None and want is not None
        assert got.tokens == want.tokens, f"step {index}"
        assert [i for i, _ in got.logits] == [i for i, _ in want.logits]
        for (_, a), (_, b) in zip(got.logits, want.logits):
            assert a.shape == b.shape and _rel(a, b) < 1e-5
        sched.apply(step, want.tokens, want.logits)
    stats = split.runner.stats()
    assert stats["split_steps"] >= 5 and stats["split_decode_rows"] >= 10
    assert stats["decode_steps"] >= 5  # pure decode steps go through the executor too
    assert executor.replays == stats["split_steps"] + stats["decode_steps"]
    assert whole.runner.stats()["split_steps"] == 0
    # Every kind of multi-row work and of row rode beside executor-run decodes.
    assert kinds == {"prefill", "chunk", "score", "adapter", "base"}
    for s, name in seqs:
        path = adapters.get(name) if name else None
        assert s.is_finished
        if s.score:
            ref = oracle_logits(qwen3_moe_dir, path, s.prompt_ids)
            assert s.logits.shape == ref.shape and _rel(s.logits, ref) < 1e-4, s.prompt_ids
        else:
            assert len(s.output_ids) == MAX_TOKENS
            _assert_oracle_greedy(qwen3_moe_dir, path, s.prompt_ids, s.output_ids)


def test_split_decision_reads_the_plan_only(qwen3_moe_dir):
    rt = _runtime(qwen3_moe_dir, {})
    runner = rt.runner
    decode = SeqStep(seq_id=1, token_ids=(5,), start_pos=3, sample=SampleSpec())
    prefill = SeqStep(seq_id=2, token_ids=(5, 6, 7), start_pos=0, sample=SampleSpec())
    mixed = StepPlan(seqs=(prefill, decode, dataclasses.replace(decode, seq_id=3)))
    assert runner.decode is None and runner.split_of(mixed) is None  # CPU: no executor
    assert isinstance(runner.use_eager_decode(), EagerDecode)
    assert runner.split_min_decodes == 8 and runner.split_of(mixed) is None  # too few decodes
    runner.split_min_decodes = 2
    assert runner.split_of(mixed) == ([1, 2], [0])
    runner.split_mixed = False
    assert runner.split_of(mixed) is None


def test_core_with_split_and_prefill_batching_serves_oracle_tokens(fixture_cache, qwen3_moe_dir):
    """The whole engine (controller thread, rank runtime) with split steps and held
    admissions: staggered arrivals still give the oracle's tokens; both features ran."""
    adapters = {n: fixture_cache.adapter(qwen3_moe_dir, name=n, **o) for n, o in ADAPTERS.items()}
    cfg = ClusterConfig(model=str(qwen3_moe_dir), device="cpu", dtype="float32", max_loras=4,
                        max_cpu_loras=8, max_lora_rank=16, kv_cache_bytes=4 << 20, block_size=8,
                        max_num_seqs=8, max_num_batched_tokens=24)
    group = LocalRankGroup(cfg)
    core = ControllerCore(cfg, load_model_spec(qwen3_moe_dir), group,
                          Tokenizer.from_model_dir(qwen3_moe_dir))
    try:
        assert group.runtime is not None
        group.runtime.runner.use_eager_decode()
        group.runtime.runner.split_min_decodes = 2
        core.scheduler.cfg = dataclasses.replace(
            core.scheduler.cfg, prefill_batching=PrefillBatching(hold_steps=3, min_prompts=3))
        for name, path in adapters.items():
            core.load_adapter(name, str(path))
        greedy = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        prompts = [p for arrivals in ARRIVALS.values() for p, _, score in arrivals if not score]
        names = [n for arrivals in ARRIVALS.values() for _, n, score in arrivals if not score]
        # The first three decode long enough for the others to arrive behind them.
        long = SamplingParams(max_tokens=3 * MAX_TOKENS, ignore_eos=True)
        handles = [core.submit(p, n, long) for p, n in zip(prompts[:3], names[:3])]
        # The others arrive one at a time while those decode, each once the previous one is in.
        for prompt, name in zip(prompts[3:], names[3:]):
            _wait_for(lambda: core.stats()["prefill_admitted"] >= len(handles))
            handles.append(core.submit(prompt, name, greedy))
        results = [h.result(120) for h in handles]
        for prompt, name, res in zip(prompts, names, results):
            assert len(res.token_ids) in (MAX_TOKENS, 3 * MAX_TOKENS)
            _assert_oracle_greedy(qwen3_moe_dir, adapters.get(name) if name else None, prompt,
                                  res.token_ids)
        stats = core.stats()
        assert stats["prefill_held_steps"] > 0 and stats["prefill_admitted"] == len(prompts)
        assert group.runtime.runner.stats()["split_steps"] > 0
    finally:
        core.shutdown()
