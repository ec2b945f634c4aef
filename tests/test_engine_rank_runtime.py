"""RankRuntime on a real tiny checkpoint: command order, atomic adapter commands, KV sizing,
held scoring logits across prefill chunks, and block-table checks."""

from __future__ import annotations

import pytest
import torch
from oracle import oracle_logits

from lora_cluster.config import ClusterConfig
from lora_cluster.engine.messages import (
    DropAdapter,
    EvictSlot,
    LoadAdapter,
    LoadResult,
    PlaceAdapter,
    SampleSpec,
    SeqStep,
    Shutdown,
    Step,
    StepPlan,
)
from lora_cluster.engine.rank_runtime import CPU_KV_BASE_BYTES, RankRuntime
from lora_cluster.errors import AdapterFormatError, ClusterError, ConfigError
from lora_cluster.model.parallel import LocalComm, ParallelInfo

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def runtime(model_dir, **overrides) -> RankRuntime:
    options = {"model": str(model_dir), "device": "cpu", "dtype": "float32", "max_loras": 2,
               "max_cpu_loras": 2, "max_lora_rank": 8, "kv_cache_bytes": 1 << 20, "block_size": 4,
               **overrides}
    return RankRuntime(ClusterConfig(**options), ParallelInfo(), LocalComm())


def test_adapter_commands_are_atomic_and_ordered(fixture_cache, qwen3_moe_dir):
    good = fixture_cache.adapter(qwen3_moe_dir, name="good", targets=["attention"])
    bad = fixture_cache.adapter(qwen3_moe_dir, name="bad", corrupt="truncated_data")
    rt = runtime(qwen3_moe_dir)
    result = rt.execute(LoadAdapter(seq=0, name="good", version=1, path=str(good)))
    assert isinstance(result, LoadResult) and result.nbytes > 0
    assert set(dict(result.breakdown_ms)) == {"read", "validate", "convert"}
    before = rt.stats()
    with pytest.raises(AdapterFormatError):
        rt.execute(LoadAdapter(seq=1, name="bad", version=1, path=str(bad)))
    assert rt.stats()["host_cache"] == before["host_cache"] and set(rt.host_cache) == {("good", 1)}
    rt.execute(PlaceAdapter(seq=2, name="good", version=1, slot=1))
    assert rt.slots == [None, ("good", 1)] and rt.model.slot_contents()[1] == ("good", 1)
    with pytest.raises(ClusterError, match="not in the host cache"):
        rt.execute(PlaceAdapter(seq=3, name="bad", version=1, slot=0))
    with pytest.raises(ClusterError, match="strictly ordered"):
        rt.execute(EvictSlot(seq=3, slot=1))
    rt.execute(EvictSlot(seq=4, slot=1))
    assert rt.slots == [None, None] and ("good", 1) in rt.host_cache
    rt.execute(PlaceAdapter(seq=5, name="good", version=1, slot=0))
    rt.execute(DropAdapter(seq=6, name="good", version=1))
    assert rt.slots == [None, None] and not rt.host_cache
    rt.execute(Shutdown(seq=7))
    with pytest.raises(ClusterError, match="shut down"):
        rt.execute(EvictSlot(seq=8, slot=0))


def test_host_cache_capacity_is_the_controllers_to_keep(fixture_cache, qwen3_moe_dir):
    path = fixture_cache.adapter(qwen3_moe_dir, name="good", targets=["attention"])
    rt = runtime(qwen3_moe_dir)
    for v in (1, 2):
        rt.execute(LoadAdapter(seq=v, name="a", version=v, path=str(path)))
    with pytest.raises(ClusterError, match="host cache full"):
        rt.execute(LoadAdapter(seq=3, name="a", version=3, path=str(path)))


def test_kv_sizing(qwen3_moe_dir):
    rt = runtime(qwen3_moe_dir, kv_cache_bytes=1 << 20)
    assert rt.kv_cache.nbytes <= 1 << 20 and rt.num_kv_blocks > 1
    # Capped at what max_num_seqs full-length sequences could use.
    capped = runtime(qwen3_moe_dir, kv_cache_bytes=1 << 30, max_num_seqs=2)
    assert capped.num_kv_blocks == 2 * capped.context_limit // 4
    # No byte budget on CPU: a fraction of min(CPU_KV_BASE_BYTES, free memory).
    frac = runtime(qwen3_moe_dir, kv_cache_bytes=None, kv_cache_fraction=0.001, max_num_seqs=4096)
    assert frac.kv_cache.nbytes <= 0.001 * CPU_KV_BASE_BYTES + 1e6
    with pytest.raises(ConfigError, match="max_model_len"):
        runtime(qwen3_moe_dir, max_model_len=10**6)
    with pytest.raises(ConfigError, match="resolved"):
        RankRuntime(ClusterConfig(model=str(qwen3_moe_dir)), ParallelInfo(), LocalComm())


def test_score_logits_held_across_chunks_and_table_checks(qwen3_moe_dir):
    rt = runtime(qwen3_moe_dir)
    prompt = tuple(range(30, 48))  # 18 tokens, 3 chunks over blocks of 4
    steps = [(0, 7, (0, 1)), (7, 13, (2, 3)), (13, 18, (4,))]
    emitted = None
    for seq, (lo, hi, blocks) in enumerate(steps):
        mode = "emit" if hi == len(prompt) else "keep"
        plan = StepPlan(seqs=(SeqStep(seq_id=5, token_ids=prompt[lo:hi], start_pos=lo,
                                      blocks_from=blocks[0], new_blocks=blocks, logits=mode),))
        result = rt.execute(Step(seq=seq, plan=plan))
        assert result is not None
        if mode == "keep":
            assert result.logits == ()
        else:
            emitted = dict(result.logits)[5]
    ref = oracle_logits(qwen3_moe_dir, None, prompt)
    assert emitted.shape == ref.shape
    assert float((emitted - ref).norm() / ref.norm()) < 1e-4
    # A decode on a sequence whose table does not cover its position is refused.
    bad = StepPlan(seqs=(SeqStep(seq_id=6, token_ids=(1,), start_pos=8, new_blocks=(9,),
                                 sample=SampleSpec()),))
    with pytest.raises(RuntimeError, match="out of step"):
        rt.execute(Step(seq=10, plan=bad))
    # Released sequences lose their state; a sampled step returns one token per sequence.
    plan = StepPlan(seqs=(SeqStep(seq_id=7, token_ids=(3, 4), start_pos=0, new_blocks=(10,),
                                  sample=SampleSpec()),), released=(5,))
    result = rt.execute(Step(seq=11, plan=plan))
    assert result is not None and [s for s, _ in result.tokens] == [7]
    assert result.tokens[0][1] == int(torch.argmax(oracle_logits(qwen3_moe_dir, None, (3, 4))[-1]))
    assert rt.runner.num_live_seqs == 1  # only 7: the refused table was never recorded


def test_stats_may_run_beside_the_command_thread(fixture_cache, qwen3_moe_dir):
    """A Ray rank answers ``stats`` on another thread while commands reorder its host cache,
    slots and load records: every call must see a consistent copy, never raise."""
    import sys
    import threading

    paths = [fixture_cache.adapter(qwen3_moe_dir, name=f"st{i}", targets=["attention"], seed=i)
             for i in range(4)]
    rt = runtime(qwen3_moe_dir, max_loras=2, max_cpu_loras=3)
    errors: list[BaseException] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                rt.stats()
            except BaseException as exc:  # the test reports any failure
                errors.append(exc)
                return

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        seq = 0
        for i in range(60):
            name = f"st{i % 4}"
            if (name, 1) not in rt.host_cache:
                if len(rt.host_cache) == 3:
                    old = next(iter(rt.host_cache))
                    rt.execute(DropAdapter(seq=seq, name=old[0], version=1))
                    seq += 1
                rt.execute(LoadAdapter(seq=seq, name=name, version=1, path=str(paths[i % 4])))
                seq += 1
            rt.execute(PlaceAdapter(seq=seq, name=name, version=1, slot=i % 2))
            seq += 1
    finally:
        done.set()
        poller.join()
        sys.setswitchinterval(switch)
    assert errors == []
    assert len(rt.stats()["host_cache"]) == 3
