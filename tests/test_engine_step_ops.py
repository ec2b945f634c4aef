"""Slot placements and host drops riding on the step (``Step.adapter_ops``).

With many adapters and few slots every admission places an adapter; those placements must
reach the ranks inside the step (no standalone ``PlaceAdapter`` round trip), on every rank
of a TP × EP group, and the tokens must equal a run whose slots never change. A placement
that fails on a rank fails the step into recovery: the requests that needed it get the
rank's typed error, the others are recomputed on the rebuilt group, and serving goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rank_groups import ThreadRankGroup

from lora_cluster.config import ClusterConfig, SamplingParams
from lora_cluster.engine.adapter_control import tier_id
from lora_cluster.engine.controller_core import ControllerCore
from lora_cluster.engine.messages import DropAdapter, PlaceAdapter, Step
from lora_cluster.engine.rank_group import LocalRankGroup
from lora_cluster.engine.step_ops import RIDES, StepOps
from lora_cluster.errors import AdapterShapeError, ClusterError
from lora_cluster.model.spec import load_model_spec

G = SamplingParams(max_tokens=4, ignore_eos=True)
PROMPTS = [[5, 40, 41, 42, 300], [1, 17, 42, 99], [1, 200, 5, 9, 11, 12]]


def _config(model_dir: Path, **overrides: Any) -> ClusterConfig:
    options: dict[str, Any] = {
        "model": str(model_dir), "device": "cpu", "dtype": "float32", "max_loras": 2,
        "max_cpu_loras": 12, "max_lora_rank": 8, "max_num_seqs": 3, "kv_cache_bytes": 4 << 20,
        **overrides}
    return ClusterConfig(**options)


def _core(cfg: ClusterConfig, model_dir: Path) -> ControllerCore:
    group = ThreadRankGroup(cfg) if cfg.world_size > 1 else LocalRankGroup(cfg)
    return ControllerCore(cfg, load_model_spec(model_dir), group)


@pytest.fixture(scope="module")
def sources(fixture_cache: Any, qwen3_moe_dir: Path) -> dict[str, str]:
    return {f"s{i}": str(fixture_cache.adapter(qwen3_moe_dir, name=f"so{i}", targets=["attention"],
                                               r=4, seed=500 + i)) for i in range(6)}


def _run(core: ControllerCore, names: list[str]) -> list[tuple[int, ...]]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    return [r.token_ids for r in core.generate(prompts, names, G, timeout=120)]


def test_step_ops_keep_drops_ahead_of_a_load_and_undo_a_dropped_placement() -> None:
    ops = StepOps()
    ops.begin()
    ops.place(("a", 1), 0)
    ops.drop(("b", 1))
    ops.place(("c", 1), 1)
    ops.drop(("c", 1))  # placed, then dropped: what is left on a rank is an empty slot 1
    sent = ops.take_drops()
    assert [(type(c).__name__, getattr(c, "name", None) or c.slot) for c in sent] == [
        ("DropAdapter", "b"), ("EvictSlot", 1), ("DropAdapter", "c")]
    assert ops.take() == (PlaceAdapter(seq=RIDES, name="a", version=1, slot=0),)
    assert not ops.open


def test_placements_ride_steps_with_ample_slot_tokens(qwen3_moe_dir: Path,
                                                       sources: dict[str, str]) -> None:
    names = [*sources, *reversed(sources), *sources]
    ample = _core(_config(qwen3_moe_dir, max_loras=6), qwen3_moe_dir)
    try:
        ample.register_adapters(sources)
        expected = _run(ample, names)
    finally:
        ample.shutdown()

    # Two TP ranks, two slots for six adapters: almost every admission places one.
    core = _core(_config(qwen3_moe_dir, tp_size=2), qwen3_moe_dir)
    try:
        core.register_adapters(sources)
        assert _run(core, names) == expected
        stats = core.stats()
        group = core.group
        assert isinstance(group, ThreadRankGroup)
        ridden = [op for c in group.commands if isinstance(c, Step) for op in c.adapter_ops]
        standalone = [c for c in group.commands if isinstance(c, PlaceAdapter)]
        places = sum(isinstance(op, PlaceAdapter) for op in ridden)
        assert stats.get("rank_group_restarts", 0) == 0
        assert standalone == [] and places >= len(sources) + 2
        assert stats["placements_on_step"] == places
        assert stats["drops_on_step"] == sum(isinstance(op, DropAdapter) for op in ridden)
        assert all(stats["adapters"][n]["places"] >= 1 for n in sources)
        assert all(stats["adapters"][n]["place_ms"] > 0 for n in sources)
        # Every rank applied the same ops: its slots are the controller's tiers.
        slots = [None if t is None else core.adapters.keys[t]
                 for t in core.adapters.tiers.device_slots()]
        assert all(r.slots == slots for r in group.ranks)
    finally:
        core.shutdown()


def test_placement_failing_on_a_rank_fails_only_its_requests(qwen3_moe_dir: Path,
                                                             sources: dict[str, str]) -> None:
    core = _core(_config(qwen3_moe_dir, max_num_seqs=4), qwen3_moe_dir)
    try:
        core.register_adapters(sources)
        good = ["s0", "s1", "s2"]
        expected = _run(core, good)
        core.load_adapter("x", sources["s3"])  # host-resident, not on a slot …
        runtime = core.group.runtime
        assert runtime is not None
        key = core.adapters.record("x").key
        with core._exec:
            del runtime.host_cache[key]  # … and gone from the rank: placing it fails there
        handles = [core.submit(p, n, G) for p, n in zip([*PROMPTS, PROMPTS[0]],
                                                        [*good, "x"], strict=True)]
        with pytest.raises(ClusterError, match=r"adapter 'x' could not be activated.*host cache"):
            handles[-1].result(timeout=120)
        assert [h.result(timeout=120).token_ids for h in handles[:-1]] == expected
        stats = core.stats()
        assert stats["step_op_failures"] == 1 and stats["rank_group_restarts"] == 1
        assert core.adapters.tiers.slot_of(tier_id(key)) is None
        # The rebuilt group reloaded "x" from its source: it serves again, as do the others.
        assert _run(core, ["x"]) == _run(core, ["s3"]) and _run(core, good) == expected
    finally:
        core.shutdown()


def test_injected_placement_refusal_on_one_tp_rank_keeps_its_type(qwen3_moe_dir: Path,
                                                                  sources: dict[str, str]) -> None:
    core = _core(_config(qwen3_moe_dir, tp_size=2), qwen3_moe_dir)
    try:
        core.register_adapters(sources)
        expected = _run(core, ["s0", "s1"])
        group = core.group
        assert isinstance(group, ThreadRankGroup)
        group.fail = (1, lambda c: isinstance(c, PlaceAdapter) and c.name == "s4",
                      AdapterShapeError("injected: slot refused s4's shapes"))
        handles = [core.submit(PROMPTS[0], "s4", G), core.submit(PROMPTS[0], "s0", G),
                   core.submit(PROMPTS[1], "s1", G)]
        with pytest.raises(AdapterShapeError, match=r"rank 1.*injected"):
            handles[0].result(timeout=120)
        assert [h.result(timeout=120).token_ids for h in handles[1:]] == expected
        group.fail = None
        assert core.stats()["step_op_failures"] == 1
        assert len(_run(core, ["s4"])[0]) == G.max_tokens
    finally:
        core.shutdown()
