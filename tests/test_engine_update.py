"""In-place adapter updates on a real tiny Qwen3-MoE: layer groups staged on every rank while
generation runs, the switch at a step boundary (every output all-old or all-new, equal to the
reference of its version), the out-of-order warning through the rank path, failures leaving
the old version serving with the staging freed, and the same on two EP ranks."""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from pathlib import Path

import pytest
from rank_groups import ThreadRankGroup
from test_adapters_staging import kind_major

from lora_cluster.adapters import load_adapter
from lora_cluster.config import ClusterConfig, SamplingParams
from lora_cluster.engine import update_staging
from lora_cluster.engine.controller_core import ControllerCore
from lora_cluster.engine.messages import LoadAdapter, LoadResult, Step, UpdateAdapter
from lora_cluster.engine.rank_group import LocalRankGroup
from lora_cluster.engine.rank_runtime import RankRuntime
from lora_cluster.errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterRankError,
    AdapterShapeError,
    UnknownAdapterError,
)
from lora_cluster.model.parallel import LocalComm, ParallelInfo
from lora_cluster.model.spec import load_model_spec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PROMPTS = [[1, 40, 41, 42], [5, 6, 7], list(range(100, 118)), [200, 17], [9]]
G = SamplingParams(max_tokens=8, ignore_eos=True)
LONG = [3, 4, 5]
LONG_G = SamplingParams(max_tokens=40, ignore_eos=True)


def config(model_dir: Path, **overrides) -> ClusterConfig:
    options = {"model": str(model_dir), "device": "cpu", "dtype": "float32", "max_loras": 4,
               "max_cpu_loras": 8, "max_lora_rank": 16, "kv_cache_bytes": 4 << 20,
               "block_size": 8, **overrides}
    return ClusterConfig(**options)


def make_core(model_dir: Path, **overrides) -> ControllerCore:
    cfg = config(model_dir, **overrides)
    group = ThreadRankGroup(cfg) if cfg.world_size > 1 else LocalRankGroup(cfg)
    return ControllerCore(cfg, load_model_spec(model_dir), group)


@pytest.fixture(scope="module")
def versions(fixture_cache, qwen3_moe_dir) -> dict[int, Path]:
    """Two versions of one adapter (attention + 2D experts + embeddings/lm_head: every kind)."""
    return {v: fixture_cache.adapter(qwen3_moe_dir, name=f"v{v}", targets=["all"],
                                     expert_format="2d", seed=20 + v) for v in (1, 2)}


def references(core: ControllerCore, versions: dict[int, Path]) -> dict[int, list[tuple[int, ...]]]:
    """Each version's greedy outputs for PROMPTS (and LONG last), under names of their own."""
    refs = {}
    for v, path in versions.items():
        core.load_adapter(f"ref{v}", str(path))
        refs[v] = [r.token_ids for r in core.generate(PROMPTS, f"ref{v}", G)]
        refs[v].append(core.generate([LONG], f"ref{v}", LONG_G)[0].token_ids)
        core.evict_adapter(f"ref{v}")
    assert refs[1] != refs[2]
    return refs


def recording(group) -> list[object]:
    """Every command the group runs, in order."""
    seen: list[object] = []
    execute, execute_all = group.execute, group.execute_all

    def run_step(cmd):
        seen.append(cmd)
        return execute(cmd)

    def run_all(cmd):
        seen.append(cmd)
        return execute_all(cmd)

    group.execute, group.execute_all = run_step, run_all
    if hasattr(group, "submit"):  # asynchronous steps send steps through submit
        submit = group.submit

        def submit_step(cmd):
            seen.append(cmd)
            return submit(cmd)

        group.submit = submit_step
    return seen


def update_under_load(core: ControllerCore, versions, refs) -> None:
    """Generation threads run while ``a`` is updated v1 → v2; every output matches its version."""
    core.load_adapter("a", str(versions[1]))
    core.updates.chunk_bytes = 1  # one decoder layer per update command
    long = core.submit(LONG, "a", LONG_G)
    next(iter(long))  # admitted on v1 and running
    outputs, errors, stop = [], [], threading.Event()

    def worker() -> None:
        try:
            while not stop.is_set():
                outputs.extend(enumerate(core.generate(PROMPTS, "a", G, timeout=60)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        info = core.update_adapter("a", str(versions[2]))
        assert info.version == 2 and info.source == str(versions[2])
        assert not long.done  # admitted before the switch: still running, on v1
        assert core.stats()["old_versions_in_use"]["a@v1"] >= 1  # held while they run
        after = list(enumerate(core.generate(PROMPTS, "a", G)))
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors
    for i, res in outputs + after:
        assert res.adapter_version in (1, 2)
        assert res.token_ids == refs[res.adapter_version][i]  # all-old or all-new, never a mix
    assert all(res.adapter_version == 2 for _, res in after)
    done = long.result(60)
    assert done.adapter_version == 1 and done.token_ids == refs[1][-1]
    last = core.stats()["updates"]["last"]["a"]
    assert last["outcome"] == "ok" and last["groups"] == 3  # layers 0, 1, then the final
    core.generate([[2]], None, G)  # a step boundary after v1's last sequence: v1 is dropped
    stats = core.stats()
    assert "a@v1" not in stats["tiers"]["host_lru"] and stats["old_versions_in_use"] == {}
    assert stats["adapters"]["a"]["updates"] == 1 and stats["adapters"]["a"]["version"] == 2


def test_update_during_generation_every_output_is_all_old_or_all_new(qwen3_moe_dir, versions):
    core = make_core(qwen3_moe_dir)
    try:
        refs = references(core, versions)
        commands = recording(core.group)
        update_under_load(core, versions, refs)
        updates = [i for i, c in enumerate(commands) if isinstance(c, UpdateAdapter)]
        assert [(commands[i].layers, commands[i].final) for i in updates] == [
            ((0,), False), ((1,), False), (None, True)]
        # Steps ran between the update's commands: serving never stalled for the whole read.
        assert any(isinstance(c, Step) for c in commands[updates[0]:updates[-1]])
        rank = core.group.runtime
        assert rank is not None and rank._staging == {}
        assert ("a", 2) in rank.host_cache and ("a", 1) not in rank.host_cache
    finally:
        core.shutdown()


def test_update_on_two_ep_ranks(qwen3_moe_dir, versions):
    core = make_core(qwen3_moe_dir, ep_size=2)
    try:
        refs = references(core, versions)
        update_under_load(core, versions, refs)
        # One rank refuses the second layer group: nothing changes on any rank.
        group = core.group
        assert isinstance(group, ThreadRankGroup)
        group.fail = (1, lambda c: isinstance(c, UpdateAdapter) and c.layers == (1,),
                      AdapterFormatError("injected: rank 1 could not read layer 1"))
        with pytest.raises(AdapterFormatError, match="injected"):
            core.update_adapter("a", str(versions[1]))
        assert all(r._staging == {} and ("a", 3) not in r.host_cache for r in group.ranks)
        res = core.generate(PROMPTS, "a", G)
        assert [r.token_ids for r in res] == refs[2][:-1] and res[0].adapter_version == 2
        group.fail = None
        assert core.update_adapter("a", str(versions[1])).version == 4
        assert [r.token_ids for r in core.generate(PROMPTS, "a", G)] == refs[1][:-1]
    finally:
        core.shutdown()


def test_failed_updates_leave_the_old_version_serving(qwen3_moe_dir, versions, fixture_cache,
                                                      monkeypatch):
    core = make_core(qwen3_moe_dir)
    try:
        refs = references(core, versions)
        core.load_adapter("a", str(versions[1]))
        core.updates.chunk_bytes = 1
        staged_refs: list[weakref.ref] = []
        stage = update_staging.StagedUpdate.stage

        def failing_stage(self, layers):
            if layers is not None and 1 in layers:  # the file goes bad mid-way
                staged_refs.extend(weakref.ref(t.a) for t in self.staged.values())
                raise AdapterFormatError(f"{self.name}: injected read error in layer 1")
            return stage(self, layers)

        monkeypatch.setattr(update_staging.StagedUpdate, "stage", failing_stage)
        with pytest.raises(AdapterFormatError, match="injected read error"):
            core.update_adapter("a", str(versions[2]))
        monkeypatch.undo()
        gc.collect()
        assert staged_refs and all(r() is None for r in staged_refs)  # layer 0's staging freed
        rank = core.group.runtime
        assert rank is not None and rank._staging == {} and ("a", 2) not in rank.host_cache
        # A refused source (shape mismatch, caught from the header) and an unknown name.
        bad = fixture_cache.adapter(qwen3_moe_dir, name="bad", targets=["all"], corrupt="shape")
        with pytest.raises(AdapterShapeError):
            core.update_adapter("a", str(bad))
        with pytest.raises(UnknownAdapterError):
            core.update_adapter("nobody", str(versions[2]))
        res = core.generate(PROMPTS, "a", G)
        assert [r.token_ids for r in res] == refs[1][:-1] and res[0].adapter_version == 1
        stats = core.stats()
        assert stats["failed_updates_by_cause"] == {"adapter_format": 1,
                                                   "adapter_shape_mismatch": 1}
        assert stats["updates"]["last"]["a"]["outcome"] == "adapter_format"
        assert not any(t.startswith("a@v2") for t in stats["tiers"]["host_lru"])
        assert core.update_adapter("a", str(versions[2])).version == 3  # versions never repeat
        assert [r.token_ids for r in core.generate(PROMPTS, "a", G)] == refs[2][:-1]
    finally:
        core.shutdown()


def test_out_of_order_update_warns_once_with_layers_and_bytes(qwen3_moe_dir, versions,
                                                             fixture_cache, tmp_path, caplog):
    plain = fixture_cache.adapter(qwen3_moe_dir, name="att", targets=["attention"], seed=31)
    mixed = kind_major(plain, tmp_path / "att")  # k_proj of both layers, then o_proj, q, v
    spec = load_model_spec(qwen3_moe_dir)
    weights = load_adapter(plain, spec, ParallelInfo(), name="att", max_lora_rank=16).weights
    # Parts arrive k0 k1 o0 o1 q0 q1 v0 …: the peak is just before v0 completes layer 0.
    peak = sum(t.nbytes for (layer, kind), t in weights.modules.items() if kind != "v_proj")
    core = make_core(qwen3_moe_dir)
    try:
        core.load_adapter("att", str(plain))
        expected = [r.token_ids for r in core.generate(PROMPTS, "att", G)]
        with caplog.at_level(logging.WARNING, logger="lora_cluster.adapters"):
            info = core.update_adapter("att", str(mixed))
        warnings = [r.getMessage() for r in caplog.records if "out of layer order" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert "'att' v2" in warnings[0] and "layers [0, 1]" in warnings[0]
        assert f"({peak} bytes)" in warnings[0]
        assert info.version == 2
        rank = core.group.runtime
        assert rank is not None and rank._staging == {}
        # Same weights in another order: same outputs.
        assert [r.token_ids for r in core.generate(PROMPTS, "att", G)] == expected
    finally:
        core.shutdown()


def test_rank_stages_only_the_named_layers_and_matches_a_whole_load(qwen3_moe_dir, versions,
                                                                   tmp_path, caplog):
    cfg = config(qwen3_moe_dir)
    rt = RankRuntime(cfg, ParallelInfo(), LocalComm())
    path = str(versions[2])
    whole = rt.execute(LoadAdapter(seq=0, name="w", version=1, path=path))
    assert isinstance(whole, LoadResult)
    assert rt.execute(UpdateAdapter(seq=1, name="u", version=1, path=path, layers=(0,),
                                    final=False)) is None
    staged = rt._staging[("u", 1)]
    after0 = staged.stream.stats.bytes_read
    assert {k[0] for k in staged.staged} == {0} and rt.stats()["staging"]["u@v1"]["commands"] == 1
    rt.execute(UpdateAdapter(seq=2, name="u", version=1, path=path, layers=(1,), final=False))
    assert {k[0] for k in staged.staged} == {0, 1}
    after1 = staged.stream.stats.bytes_read
    done = rt.execute(UpdateAdapter(seq=3, name="u", version=1, path=path, final=True))
    assert isinstance(done, LoadResult) and done.nbytes == whole.nbytes
    assert set(dict(done.breakdown_ms)) == {"read", "validate", "convert"}
    assert 0 < after0 < 0.6 * after1  # the first command read only layer 0's tensors
    a, b = rt.host_cache[("w", 1)], rt.host_cache[("u", 1)]
    assert set(a.modules) == set(b.modules) and rt._staging == {}
    for key, t in a.modules.items():
        assert t.a.equal(b.modules[key].a) and t.b.equal(b.modules[key].b)
    rt.close()


def test_rank_refuses_a_layer_its_slots_cannot_hold(qwen3_moe_dir, versions):
    """Each staged layer is checked against the model's slots: a refusal is typed, mid-way,
    and frees the staging (here the slots are made narrower than the header check allows)."""
    rt = RankRuntime(config(qwen3_moe_dir), ParallelInfo(), LocalComm())
    try:
        rt.execute(LoadAdapter(seq=0, name="old", version=1, path=str(versions[1])))
        assert rt.model.slot_table is not None
        rt.model.slot_table.max_rank = 4  # the fixture adapters have rank 8
        with pytest.raises(AdapterRankError, match="exceeds max_lora_rank=4"):
            rt.execute(UpdateAdapter(seq=1, name="new", version=1, path=str(versions[2]),
                                     layers=(0,), final=False))
        assert rt._staging == {} and set(rt.host_cache) == {("old", 1)}
    finally:
        rt.close()


def test_stats_report_load_phases_place_tiers_and_failures(qwen3_moe_dir, versions):
    core = make_core(qwen3_moe_dir, max_loras=1, max_cpu_loras=2)
    try:
        core.load_adapter("a", str(versions[1]))
        core.load_adapter("b", str(versions[2]))
        core.generate([[1, 2]], "a", G)
        core.generate([[1, 2]], "b", G)  # b takes a's only slot: a device eviction
        core.update_adapter("a", str(versions[2]))
        core.generate([[1, 2]], "a", G)
        with pytest.raises(AdapterNotFoundError):
            core.load_adapter("c", str(Path(versions[1]).parent / "no-such-adapter"))
        stats = core.stats()
        a = stats["adapters"]["a"]
        assert a["version"] == 2 and a["updates"] == 1 and a["places"] >= 1 and a["place_ms"] > 0
        assert {"read", "validate", "convert", "total"} <= set(a["load_breakdown_ms"])
        assert a["bytes_per_rank"] == [core.group.runtime.host_cache[("a", 2)].nbytes]
        assert stats["tiers"]["device"]["evictions"] >= 1 and stats["tiers"]["device"]["misses"] >= 3
        assert {"hits", "misses", "evictions"} <= set(stats["tiers"]["host"])
        assert stats["failures_by_cause"] == stats["failed_loads_by_cause"] and sum(
            stats["failures_by_cause"].values()) == 1
        assert stats["updates"]["last"]["a"]["outcome"] == "ok"
        rank = core.group.runtime.stats()
        assert rank["activation"]["activations"] >= 3 and rank["staging"] == {}
    finally:
        core.shutdown()
