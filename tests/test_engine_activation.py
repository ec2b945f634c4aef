"""Slot activation on a real tiny model: a step that first uses a freshly activated slot sees
the whole adapter (equal to a synchronized write), steps that do not use a slot do not wait
for it, and a version staged by an in-place update activates like a loaded one.

On CPU activation is synchronous (nothing pending); on CUDA it runs on the side stream
(``-m gpu`` runs the CUDA half; it is skipped without a device).
"""

from __future__ import annotations

import pytest
import torch

from lora_cluster.config import ClusterConfig
from lora_cluster.engine.messages import (
    LoadAdapter,
    PlaceAdapter,
    SampleSpec,
    SeqStep,
    Step,
    StepPlan,
    StepResult,
    UpdateAdapter,
)
from lora_cluster.engine.rank_runtime import RankRuntime
from lora_cluster.engine.slot_activation import SlotActivator, slot_ready
from lora_cluster.model.parallel import LocalComm, ParallelInfo

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]
PROMPT = (1, 40, 41, 42, 300, 7, 99, 5)


class Runner:
    """Drives one RankRuntime with hand-made plans (fresh sequence ids, whole tables)."""

    def __init__(self, rt: RankRuntime) -> None:
        self.rt, self.seq, self.next_id, self.next_block = rt, 0, 0, 0

    def command(self, cmd_type, **kw):
        self.seq += 1
        return self.rt.execute(cmd_type(seq=self.seq, **kw))

    def score(self, slots: list[int]) -> list[torch.Tensor]:
        """Prefill PROMPT once per slot in one step; every row's logits (float32, CPU)."""
        seqs = []
        for slot in slots:
            blocks = tuple(range(self.next_block, self.next_block + 2))
            self.next_block += 2
            seqs.append(SeqStep(seq_id=self.next_id, token_ids=PROMPT, start_pos=0,
                                new_blocks=blocks, slot=slot, sample=SampleSpec(),
                                logits="emit"))
            self.next_id += 1
        result = self.command(Step, plan=StepPlan(seqs=tuple(seqs)))
        assert isinstance(result, StepResult)
        return [payload for _, payload in result.logits]


@pytest.fixture(scope="module")
def adapters(fixture_cache, qwen3_moe_dir):
    return {name: str(fixture_cache.adapter(qwen3_moe_dir, name=name, targets=["all"],
                                            expert_format="2d", seed=seed))
            for name, seed in (("a", 41), ("b", 42))}


@pytest.mark.parametrize("device", DEVICES)
def test_first_user_of_a_slot_sees_the_whole_adapter_and_others_do_not_wait(
        qwen3_moe_dir, adapters, device):
    cfg = ClusterConfig(model=str(qwen3_moe_dir), device=device, dtype="float32", max_loras=3,
                        max_cpu_loras=4, max_lora_rank=16, kv_cache_bytes=2 << 20,
                        block_size=8, use_cuda_graphs=False)
    rt = RankRuntime(cfg, ParallelInfo(), LocalComm())
    run = Runner(rt)
    try:
        for name in ("a", "b"):
            run.command(LoadAdapter, name=name, version=1, path=adapters[name])
        run.command(PlaceAdapter, name="a", version=1, slot=0)
        asynchronous = rt.activator.asynchronous
        assert rt.activator.pending() == ([0] if asynchronous else [])
        base_first = run.score([-1])[0]  # does not use slot 0: must not consume its event
        assert rt.activator.pending() == ([0] if asynchronous else [])
        fresh = run.score([0])[0]  # the first step using slot 0 waits for its write
        assert rt.activator.pending() == []
        # Slot 1 activated while slot 0 serves: a slot-0 step leaves slot 1's write pending.
        run.command(PlaceAdapter, name="b", version=1, slot=1)
        again = run.score([0, -1])
        assert rt.activator.pending() == ([1] if asynchronous else [])
        b_fresh = run.score([1])[0]
        rt.activator.synchronize()
        settled = run.score([0, 1, -1])
        # Batches differ, so equal up to float rounding (Triton's fp32 dots may round inputs to
        # tf32 on GPU); adapters move these logits by ~10, a half-written slot is far off.
        tol = 1e-5 if device == "cpu" else 2e-3

        def same(x: torch.Tensor, y: torch.Tensor) -> bool:
            return bool(torch.allclose(x, y, rtol=tol, atol=tol))

        assert same(fresh, settled[0]) and same(again[0], settled[0])
        assert same(b_fresh, settled[1])
        assert same(base_first, settled[2]) and same(again[1], settled[2])
        assert not same(settled[0], settled[2]) and not same(settled[0], settled[1])
        stats = rt.stats()["activation"]
        assert stats["activations"] == 2 and stats["asynchronous"] == asynchronous
        assert stats["bytes_activated"] == sum(rt.host_cache[(n, 1)].nbytes for n in "ab")
        # A version staged layer group by layer group activates like a loaded one.
        run.command(UpdateAdapter, name="a", version=2, path=adapters["a"], layers=(1,),
                    final=False)
        run.command(UpdateAdapter, name="a", version=2, path=adapters["a"], final=True)
        run.command(PlaceAdapter, name="a", version=2, slot=2)
        assert same(run.score([2])[0], settled[0])
    finally:
        rt.close()


def test_slot_ready_copies_fold_the_scale_like_the_slot_writer():
    from lora_cluster.adapters.weights import LoRATensors

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, generator=gen), torch.randn(32, 4, generator=gen)
    ready = slot_ready({(0, "q_proj"): LoRATensors(a, b, 0.37)}, torch.bfloat16, pin=False)
    got = ready[(0, "q_proj")]
    assert got.scaling == 1.0 and got.a.dtype == got.b.dtype == torch.bfloat16
    assert torch.equal(got.a, a.to(torch.bfloat16))
    assert torch.equal(got.b, (b * 0.37).to(torch.bfloat16))  # float32 product, then the cast
    same = slot_ready({(0, "q_proj"): LoRATensors(a, b, 1.0)}, torch.float32, pin=False)
    assert torch.equal(same[(0, "q_proj")].b, b)
    # One host buffer: a and b are views into the same page (one DMA activates both).
    assert got.a.untyped_storage().data_ptr() == got.b.untyped_storage().data_ptr()


def test_cpu_activator_is_synchronous():
    calls: list[tuple[str, int]] = []

    class Model:
        def set_lora_slot(self, slot, weights):
            calls.append(("set", slot))

        def clear_lora_slot(self, slot):
            calls.append(("clear", slot))

    act = SlotActivator(Model(), torch.device("cpu"))
    act.activate(2, object())
    act.clear(2)
    act.wait_for([2])
    act.synchronize()
    assert calls == [("set", 2), ("clear", 2)] and act.pending() == []
    assert not act.asynchronous and act.stats()["activations"] == 1


def test_activation_benchmark_dry_run(tmp_path):
    """benchmarks/activation.py runs every code path on CPU (tiny config) and writes its JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "activation.py"
    out = tmp_path / "activation.json"
    proc = subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "activation / pinned bandwidth" in proc.stdout
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["card"] == "cpu" and report["correctness"]["ok"]
    assert report["decode"]["steps_per_mode"] > 0 and report["activation"]["bytes"] > 0


def test_host_cache_entries_are_planned_at_load_not_at_activation(qwen3_moe_dir, adapters,
                                                                  monkeypatch):
    cfg = ClusterConfig(model=str(qwen3_moe_dir), device="cpu", dtype="float32", max_loras=2,
                        max_cpu_loras=2, max_lora_rank=16, kv_cache_bytes=2 << 20,
                        block_size=8, use_cuda_graphs=False)
    rt = RankRuntime(cfg, ParallelInfo(), LocalComm())
    run = Runner(rt)
    try:
        table = rt.model.slot_table
        assert table is not None
        run.command(LoadAdapter, name="a", version=1, path=adapters["a"])
        entry = rt.host_cache[("a", 1)]
        assert id(entry) in table._plans  # validated and planned when it entered the cache
        checks = []
        real = table._check
        monkeypatch.setattr(table, "_check", lambda w: checks.append(w.name) or real(w))
        for slot in (0, 1, 0):
            run.command(PlaceAdapter, name="a", version=1, slot=slot)
        assert checks == [] and rt.activator.stats()["activations"] == 3
        assert run.score([0])[0].shape == run.score([1])[0].shape
    finally:
        rt.close()
