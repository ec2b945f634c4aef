"""Planned slot writes (host-cache entries): the same slot contents as the per-module writers,
validated and planned once per entry, staged in rounds through a device buffer.

Staging is forced on CPU here (a CPU "device" buffer, tiny pages and rounds) so the span /
round / offset logic CUDA uses runs in CI; ``-m gpu`` runs the real thing.
"""

from __future__ import annotations

import gc

import pytest
import torch
from model_support import shard_adapter

from lora_cluster.adapters.weights import AdapterWeights
from lora_cluster.engine.slot_activation import slot_ready
from lora_cluster.errors import AdapterShapeError
from lora_cluster.model.layers.lora_buffers import EmbeddingLoRA, ExpertLoRA, LinearLoRA
from lora_cluster.model.loader import load_model
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.slot_transfer import SlotTransfer
from lora_cluster.testing import build_adapter

R = 8
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def slot_state(model, slot: int) -> list[torch.Tensor]:
    """Every LoRA buffer's part of ``slot`` (copies, on the CPU)."""
    out = []
    for m in model.modules():
        if isinstance(m, LinearLoRA):
            out += [m.lora_a[:, slot], m.lora_b[slot]]
        elif isinstance(m, EmbeddingLoRA):
            out += [m.lora_a[slot], m.lora_b[slot]]
        elif isinstance(m, ExpertLoRA):
            rows = slice(slot * m.num_local, (slot + 1) * m.num_local)
            out += [m.a13[:, rows], m.b13[rows], m.a2[:, rows], m.b2[rows]]
    return [t.detach().cpu().clone() for t in out]


def entry(weights: AdapterWeights, dtype: torch.dtype, **kw) -> AdapterWeights:
    """A host-cache entry: slot-ready and packed (as the rank runtime makes them)."""
    return AdapterWeights(weights.name, weights.version, weights.rank,
                          slot_ready(weights.modules, dtype, pin=False, **kw))


ADAPTERS = {
    # every target at the slot rank: dense copies, gate/up B as one block, nothing to zero
    "full": dict(targets=["all"], r=R, seed=3),
    # ragged ranks under R, absent kinds: strided copies and zeroed padding
    "ragged": dict(targets=["attention", "experts", "embed_tokens"], r=6, seed=4,
                   rank_pattern={"o_proj": 4, "down_proj": 2, "embed_tokens": 3}),
    "attn": dict(targets=["q_proj", "v_proj"], r=R, seed=5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("staged", [False, True])
def test_planned_write_equals_the_per_module_writers(fixture_cache, dtype, staged):
    model_dir = fixture_cache.model("qwen3_moe_dense_layers")
    model = load_model(model_dir, dtype=str(dtype).split(".")[-1], max_loras=3, max_lora_rank=R)
    table = model.slot_table
    assert table is not None
    if staged:  # tiny staging: several rounds, spans split across pages
        table.transfer = SlotTransfer(torch.device("cpu"), staged=True, staging_bytes=8 << 10)
    raw = {name: shard_adapter(build_adapter(model_dir, **kw).modules, model.spec,
                               ParallelInfo(), name=name) for name, kw in ADAPTERS.items()}
    packed = {name: entry(w, dtype, page_bytes=16 << 10) for name, w in raw.items()}
    # Slot-ready but not packed (a tensor per storage; a strided A): planned all the same.
    loose = {k: type(t)(t.a.to(dtype).mT.contiguous().mT, (t.b.float() * t.scaling).to(dtype), 1.0)
             for k, t in raw["ragged"].modules.items()}
    raw["loose"], packed["loose"] = raw["ragged"], AdapterWeights("loose", 0, R, loose)
    # Slot 0 by the per-module writers (file dtype, unfolded scale), slot 1 planned; each
    # sequence overwrites a bigger adapter with smaller ones, so stale padding would show.
    for name in ("full", "ragged", "full", "attn", "ragged", "full", "loose"):
        model.set_lora_slot(0, raw[name])
        model.set_lora_slot(1, packed[name])
        assert name != "full" or torch.equal(model.slot_groups[:, 0], model.slot_groups[:, 1])
        for want, got in zip(slot_state(model, 0), slot_state(model, 1)):
            assert torch.equal(want, got), name
        assert model.slot_contents()[1] == (packed[name].name, 0)
        assert id(packed[name]) in table._plans  # the planned path wrote it
    full_plan = table._plans[id(packed["full"])]
    moe_layers = sum(1 for layer in model.decoder_layers() if layer.moe is not None)
    assert sum(1 for k in full_plan.dst_keys if k[0] == "pair") == moe_layers
    assert not full_plan.zero_dense and not full_plan.zero_strided  # it covers every slot byte
    if staged:
        assert len(full_plan.rounds) > 1 and table.transfer.staging_nbytes >= 8 << 10
    else:
        assert len(full_plan.rounds) >= 1 and table.transfer.staging_nbytes == 0
    ragged_plan = table._plans[id(packed["ragged"])]
    assert ragged_plan.zero_dense and ragged_plan.dst_keys[ragged_plan.rounds[0].mid:]


def test_entries_are_validated_and_planned_once(fixture_cache, monkeypatch):
    model_dir = fixture_cache.model("qwen3_moe")
    model = load_model(model_dir, max_loras=3, max_lora_rank=R)
    table = model.slot_table
    assert table is not None
    weights = entry(shard_adapter(build_adapter(model_dir, targets=["all"], r=R).modules,
                                  model.spec, ParallelInfo(), name="a"), torch.float32)
    checks = []
    real = table._check
    monkeypatch.setattr(table, "_check", lambda w: checks.append(w.name) or real(w))
    for slot in (0, 1, 2, 0):
        model.set_lora_slot(slot, weights)
    assert checks == ["a"]
    # The entry's modules change (never done by the host cache, but not silently reused):
    # validated again, and a bad module is refused before anything is written.
    before = slot_state(model, 0)
    key = (0, "q_proj")
    good = weights.modules[key]
    weights.modules[key] = type(good)(good.a[:, :-1], good.b, 1.0)
    with pytest.raises(AdapterShapeError, match=r"layer=0, kind='q_proj'"):
        model.set_lora_slot(0, weights)
    assert all(torch.equal(x, y) for x, y in zip(before, slot_state(model, 0)))
    weights.modules[key] = good  # the very modules the plan was made for: still valid
    model.set_lora_slot(0, weights)
    assert checks == ["a", "a"] and len(table._plans) == 1
    weights.modules[key] = type(good)(good.a.clone(), good.b.clone(), 1.0)
    model.set_lora_slot(0, weights)
    assert checks == ["a", "a", "a"] and len(table._plans) == 1
    del weights, good
    gc.collect()
    assert table._plans == {}  # plans live as long as their entry


def test_slot_ready_packs_into_pages_in_slot_layout(fixture_cache):
    model_dir = fixture_cache.model("qwen3_moe")
    model = load_model(model_dir, max_loras=1, max_lora_rank=R)
    raw = shard_adapter(build_adapter(model_dir, targets=["all"], r=R).modules, model.spec,
                        ParallelInfo())
    packed = slot_ready(raw.modules, torch.bfloat16, pin=False, page_bytes=64 << 10)
    storages = {t.untyped_storage().data_ptr() for m in packed.values() for t in (m.a, m.b)}
    total = sum(m.nbytes for m in packed.values())
    assert 1 < len(storages) <= total // (32 << 10) + 1  # pages, not one buffer per tensor
    assert list(packed) == list(raw.modules)
    for key, m in packed.items():
        src = raw.modules[key]
        assert m.scaling == 1.0 and m.a.shape == src.a.shape and m.b.shape == src.b.shape
        assert torch.equal(m.a, src.a.to(torch.bfloat16))
        assert torch.equal(m.b, (src.b * src.scaling).to(torch.bfloat16))
    emb = packed[(None, "embed_tokens")].a
    assert emb.T.is_contiguous()  # stored as the slots hold it: [V, r]
    gate, up = packed[(0, "experts.gate_proj")].b, packed[(0, "experts.up_proj")].b
    assert gate.untyped_storage().data_ptr() == up.untyped_storage().data_ptr()
    assert up.storage_offset() == gate.storage_offset() + gate.shape[1] * gate.shape[2]


@pytest.mark.parametrize("device", DEVICES)
def test_planned_write_on_the_model_device(fixture_cache, device):
    """The default transfer of the model's device (CUDA: pinned pages, staging, side-stream
    safe) writes what the per-module writers write."""
    model_dir = fixture_cache.model("qwen3_moe")
    model = load_model(model_dir, device=device, dtype="float32", max_loras=2, max_lora_rank=R)
    raw = shard_adapter(build_adapter(model_dir, targets=["all"], r=R, seed=8).modules,
                        model.spec, ParallelInfo(), name="x")
    packed = AdapterWeights("x", 0, R, slot_ready(raw.modules, torch.float32,
                                                  pin=device == "cuda"))
    model.set_lora_slot(0, raw)
    model.set_lora_slot(1, packed)
    if device == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model.set_lora_slot(1, packed)  # the staging buffer moves to another stream
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
    table = model.slot_table
    assert table is not None and id(packed) in table._plans  # the planned path ran
    assert table.transfer.staged == (device == "cuda")
    for want, got in zip(slot_state(model, 0), slot_state(model, 1)):
        assert torch.equal(want, got)


def _same_plan(x, y) -> bool:
    def geo(t):
        return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
    return (x.dst_keys == y.dst_keys and x.src_offsets == y.src_offsets
            and x.zero_dense == y.zero_dense and x.zero_strided == y.zero_strided
            and x.groups == y.groups and x.staging_bytes == y.staging_bytes
            and [geo(t) for t in x.srcs] == [geo(t) for t in y.srcs]
            and [(r.lo, r.mid, r.hi, [(geo(h), at) for h, at in r.spans]) for r in x.rounds]
            == [(r.lo, r.mid, r.hi, [(geo(h), at) for h, at in r.spans]) for r in y.rounds])


@pytest.mark.parametrize("staged", [False, True])
def test_entries_of_one_structure_replay_the_plan_of_the_first(fixture_cache, staged):
    """A second entry of the same recipe (other weights, same packing) replays the first's
    plan on its own pages: the very plan a fresh table builds, and the same slot bytes."""
    model_dir = fixture_cache.model("qwen3_moe_dense_layers")
    model = load_model(model_dir, max_loras=2, max_lora_rank=R)
    table = model.slot_table
    assert table is not None
    if staged:
        table.transfer = SlotTransfer(torch.device("cpu"), staged=True, staging_bytes=8 << 10)
    kw = ADAPTERS["ragged"]
    raws = [shard_adapter(build_adapter(model_dir, **{**kw, "seed": seed}).modules, model.spec,
                          ParallelInfo(), name=f"r{seed}") for seed in (4, 9)]
    first, second = (entry(w, torch.float32, page_bytes=16 << 10) for w in raws)
    model.set_lora_slot(1, first)
    assert len(table._templates) == 1
    planned = []
    real = table._plan
    table._plan = lambda *a: planned.append(1) or real(*a)  # type: ignore[method-assign]
    model.set_lora_slot(1, second)
    assert planned == []  # replayed, not planned
    replayed = table._plans[id(second)]
    table._templates.clear()
    fresh = real(table._check(second), replayed.fingerprint)
    assert _same_plan(replayed, fresh)
    model.set_lora_slot(0, raws[1])  # per-module writers
    for want, got in zip(slot_state(model, 0), slot_state(model, 1)):
        assert torch.equal(want, got)


def test_prepare_as_replays_a_template_without_validating_again(fixture_cache, monkeypatch):
    """``prepare_as`` (an entry laid out like a prepared one: a read recipe's pages) skips
    validation and builds the very plan a full ``prepare`` would; an entry in another number
    of storages than the template's is prepared in full."""
    model_dir = fixture_cache.model("qwen3_moe_dense_layers")
    model = load_model(model_dir, max_loras=2, max_lora_rank=R)
    table = model.slot_table
    assert table is not None
    kw = ADAPTERS["ragged"]
    raws = [shard_adapter(build_adapter(model_dir, **{**kw, "seed": seed}).modules, model.spec,
                          ParallelInfo(), name=f"r{seed}") for seed in (4, 9, 11)]
    first, second = (entry(w, torch.float32, page_bytes=16 << 10) for w in raws[:2])
    assert table.template_of(first) is None  # not prepared yet
    table.prepare(first)
    template = table.template_of(first)
    assert template is not None and template.storages > 1
    checks: list[str] = []
    real = table._check
    monkeypatch.setattr(table, "_check", lambda w: checks.append(w.name) or real(w))
    table.prepare_as(second, template)
    assert checks == []
    fresh = table._plan(real(second), table._plans[id(second)].fingerprint)
    assert _same_plan(table._plans[id(second)], fresh)
    model.set_lora_slot(1, second)
    assert checks == []  # the kept plan serves the write
    model.set_lora_slot(0, raws[1])  # per-module writers
    for want, got in zip(slot_state(model, 0), slot_state(model, 1)):
        assert torch.equal(want, got)
    # One page instead of several: not the template's layout, validated and planned in full.
    checks.clear()
    third = entry(raws[2], torch.float32)
    table.prepare_as(third, template)
    assert checks == ["r11"]
    model.set_lora_slot(1, third)
    model.set_lora_slot(0, raws[2])
    for want, got in zip(slot_state(model, 0), slot_state(model, 1)):
        assert torch.equal(want, got)


def test_a_slot_rewritten_by_an_entry_of_the_same_coverage_skips_known_zeros(fixture_cache):
    """A planned write zeroes what its entry leaves uncovered only when the slot may hold
    something there: after a clear, or after an entry that covered it. Whatever the order
    of writes, the slot's bytes equal those of the same entry written into a cleared slot."""
    model_dir = fixture_cache.model("qwen3_moe_dense_layers")
    model = load_model(model_dir, max_loras=2, max_lora_rank=R)
    fresh = load_model(model_dir, max_loras=2, max_lora_rank=R)
    table = model.slot_table
    assert table is not None
    zeroed: list[int] = []
    real_run = table.transfer.run

    def run(plan, dsts, zero_dense, zero_strided):
        zeroed.append(len(zero_dense) + len(zero_strided))
        real_run(plan, dsts, zero_dense, zero_strided)

    table.transfer.run = run  # type: ignore[method-assign]

    def make(name: str, seed: int, **kw) -> AdapterWeights:
        raw = shard_adapter(build_adapter(model_dir, seed=seed, **kw).modules, model.spec,
                            ParallelInfo(), name=name)
        return entry(raw, torch.float32)

    attn = [make(f"a{s}", s, targets=["attention"], r=4) for s in (1, 2, 3)]
    full = make("full", **ADAPTERS["full"])
    ragged = make("ragged", **ADAPTERS["ragged"])
    order = [attn[0], attn[1], full, attn[2], attn[0], ragged, attn[1], attn[2]]
    for i, weights in enumerate(order):
        model.set_lora_slot(1, weights)
        fresh.clear_lora_slot(0)
        fresh.set_lora_slot(0, weights)
        for want, got in zip(slot_state(fresh, 0), slot_state(model, 1)):
            assert torch.equal(want, got), (i, weights.name)
    # a1 after a0 and a2 after a1: same zero lists, nothing zeroed; after full / ragged
    # (other coverage) the attention entries zero again.
    assert zeroed[1] == 0 and zeroed[7] == 0
    assert zeroed[0] > 0 and zeroed[3] > 0 and zeroed[6] > 0
    model.clear_lora_slot(1)  # a clear leaves everything zero: no zeroing after it
    model.set_lora_slot(1, attn[0])
    assert zeroed[-1] == 0
    fresh.clear_lora_slot(0)
    fresh.set_lora_slot(0, attn[0])
    for want, got in zip(slot_state(fresh, 0), slot_state(model, 1)):
        assert torch.equal(want, got)
