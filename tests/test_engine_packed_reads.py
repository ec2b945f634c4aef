"""``PackedReads``: an adapter whose structure was read before goes straight into its
slot-ready page — bit for bit the page the general path (``load_adapter`` + ``slot_ready``)
builds, for every dtype, scaling and module layout it takes on — and what it cannot describe
keeps the general path; a file broken after its twin taught the recipe fails typed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lora_cluster.adapters import load_adapter
from lora_cluster.adapters.plan_cache import PlanCache
from lora_cluster.adapters.weights import AdapterWeights
from lora_cluster.engine.packed_reads import PackedReads, ReadMiss
from lora_cluster.engine.slot_activation import slot_ready
from lora_cluster.errors import AdapterFormatError, AdapterNotFoundError
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.spec import load_model_spec

RANK = 16


def _general(path: Path, spec, parallel: ParallelInfo, dtype: torch.dtype) -> AdapterWeights:
    w = load_adapter(path, spec, parallel, name="x", max_lora_rank=RANK).weights
    return AdapterWeights(w.name, w.version, w.rank, slot_ready(w.modules, dtype, pin=False))


def _read(reads: PackedReads, path: Path, spec, parallel: ParallelInfo, dtype: torch.dtype):
    """What the rank does: the recipe when there is one, else the general read that teaches it."""
    got = reads.read(str(path), "x", 1)
    if not isinstance(got, ReadMiss):
        return got.weights
    loaded = load_adapter(path, spec, parallel, name="x", max_lora_rank=RANK, plan=got.plan)
    packed = AdapterWeights("x", 1, loaded.weights.rank,
                            slot_ready(loaded.weights.modules, dtype, pin=False))
    reads.learn(got, loaded, packed)
    return packed


def _assert_bit_equal(ours: AdapterWeights, want: AdapterWeights) -> None:
    assert list(ours.modules) == list(want.modules)
    assert ours.rank == want.rank
    for key, t in want.modules.items():
        mine = ours.modules[key]
        for x, y in ((mine.a, t.a), (mine.b, t.b)):
            assert x.shape == y.shape and x.stride() == y.stride() and x.dtype == y.dtype, key
            assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)), key
        assert mine.scaling == t.scaling == 1.0


CASES = {
    # attention + dense MLP + embedding (transposed A block) + lm_head, scaling 8
    "dense-all-f32": ("llama", dict(targets=["attention", "mlp", "embed_tokens", "lm_head"],
                                    r=4, alpha=32), torch.float32),
    "dense-all-bf16-model": ("llama", dict(targets=["attention", "mlp", "embed_tokens"],
                                           r=4, alpha=32), torch.bfloat16),
    # ragged ranks and alphas per module, rsLoRA
    "patterns": ("qwen3", dict(targets=["attention"], r=8, alpha=16, use_rslora=True,
                               rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3.0}),
                 torch.float32),
    # a float16 file into a float32 model; scaling exactly 1 (no multiply at all)
    "f16-file": ("qwen3_moe", dict(targets=["attention"], r=8, alpha=8, dtype="float16"),
                 torch.float32),
    "bf16-file-bf16-model": ("qwen3_moe", dict(targets=["attention"], r=8, alpha=16,
                                               dtype="bfloat16"), torch.bfloat16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_reads_equal_the_general_path_bit_for_bit(case: str, fixture_cache) -> None:
    family, options, dtype = CASES[case]
    model_dir = fixture_cache.model(family)
    spec = load_model_spec(model_dir)
    twins = [fixture_cache.adapter(model_dir, name=f"{case}-{s}", seed=s, **options)
             for s in (1, 2, 3)]
    reads = PackedReads(PlanCache(spec, max_lora_rank=RANK), spec, ParallelInfo(),
                        dtype=dtype, pin=False)
    first = _read(reads, twins[0], spec, ParallelInfo(), dtype)
    _assert_bit_equal(first, _general(twins[0], spec, ParallelInfo(), dtype))
    stats = reads.stats()
    assert stats | {"bytes": 0} == {"recipes": 1, "bytes": 0, "hits": 0, "learnt": 1, "refused": 0}
    assert stats["bytes"] > 0
    for twin in twins[1:]:
        got = reads.read(str(twin), "x", 1)
        assert not isinstance(got, ReadMiss)
        weights, breakdown = got.weights, got.breakdown
        _assert_bit_equal(weights, _general(twin, spec, ParallelInfo(), dtype))
        assert set(breakdown) >= {"read", "validate", "convert"}
    assert reads.stats()["hits"] == 2
    # The twins differ in their data: the hits really read their own files.
    key = next(iter(first.modules))
    assert not torch.equal(first.modules[key].b, weights.modules[key].b)


def test_structures_without_a_recipe_keep_the_general_path(fixture_cache) -> None:
    model_dir = fixture_cache.model("qwen3_moe")
    spec = load_model_spec(model_dir)
    experts = [fixture_cache.adapter(model_dir, name=f"moe-{s}", targets=["attention", "experts"],
                                     r=4, seed=s) for s in (1, 2)]
    attention = [fixture_cache.adapter(model_dir, name=f"attn-{s}", targets=["attention"], r=4,
                                       seed=s) for s in (1, 2)]
    # Expert layouts: no recipe; the second read is a miss again and still equals the general path.
    reads = PackedReads(PlanCache(spec, max_lora_rank=RANK), spec, ParallelInfo(),
                        dtype=torch.float32, pin=False)
    for path in experts:
        _assert_bit_equal(_read(reads, path, spec, ParallelInfo(), torch.float32),
                          _general(path, spec, ParallelInfo(), torch.float32))
    assert reads.stats() == {"recipes": 0, "bytes": 0, "hits": 0, "learnt": 0, "refused": 1}
    # A TP rank holds slices of attention: no recipe either, and its reads stay right.
    tp = ParallelInfo(tp_rank=1, tp_size=2)
    reads = PackedReads(PlanCache(spec, max_lora_rank=RANK), spec, tp, dtype=torch.float32,
                        pin=False)
    for path in attention:
        _assert_bit_equal(_read(reads, path, spec, tp, torch.float32),
                          _general(path, spec, tp, torch.float32))
    assert reads.stats()["refused"] == 1 and reads.stats()["hits"] == 0


def test_a_twin_broken_after_the_recipe_was_learnt_fails_typed(fixture_cache,
                                                               tmp_path: Path) -> None:
    model_dir = fixture_cache.model("qwen3_moe")
    spec = load_model_spec(model_dir)
    first, second = (fixture_cache.adapter(model_dir, name=f"tw-{s}", targets=["attention"],
                                           r=4, seed=s) for s in (1, 2))
    reads = PackedReads(PlanCache(spec, max_lora_rank=RANK), spec, ParallelInfo(),
                        dtype=torch.float32, pin=False)
    _read(reads, first, spec, ParallelInfo(), torch.float32)
    bad = tmp_path / "bad"
    shutil.copytree(second, bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 64])  # header intact
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors"):
        reads.read(str(bad), "x", 1)
    weights.unlink()
    with pytest.raises(AdapterNotFoundError, match=r"no adapter_model\.safetensors"):
        reads.read(str(bad), "x", 1)
    # The recipe still serves its structure.
    assert not isinstance(reads.read(str(second), "x", 1), ReadMiss)


def test_recipes_stay_under_their_memory_bound(fixture_cache) -> None:
    """A recipe larger than the bound is refused (general path, same pages); under a bound
    that holds one recipe, learning a second structure pushes the first out."""
    model_dir = fixture_cache.model("qwen3_moe")
    spec = load_model_spec(model_dir)
    small = [fixture_cache.adapter(model_dir, name=f"b-{s}", targets=["attention"], r=4, seed=s)
             for s in (1, 2)]
    other = [fixture_cache.adapter(model_dir, name=f"b-o-{s}", targets=["attention"], r=2,
                                   seed=s) for s in (1, 2)]
    tiny = PackedReads(PlanCache(spec, max_lora_rank=RANK), spec, ParallelInfo(),
                       dtype=torch.float32, pin=False, max_bytes=64)
    for path in small:
        _assert_bit_equal(_read(tiny, path, spec, ParallelInfo(), torch.float32),
                          _general(path, spec, ParallelInfo(), torch.float32))
    assert tiny.stats()["recipes"] == 0 and tiny.stats()["refused"] == 1
    probe = PackedReads(PlanCache(spec, max_lora_rank=RANK), spec, ParallelInfo(),
                        dtype=torch.float32, pin=False)
    _read(probe, small[0], spec, ParallelInfo(), torch.float32)
    one = probe.stats()["bytes"]
    bounded = PackedReads(PlanCache(spec, max_lora_rank=RANK), spec, ParallelInfo(),
                          dtype=torch.float32, pin=False, max_bytes=one + 16)
    _read(bounded, small[0], spec, ParallelInfo(), torch.float32)
    _read(bounded, other[0], spec, ParallelInfo(), torch.float32)  # smaller: fits, pushes out
    assert bounded.stats()["recipes"] == 1 and bounded.stats()["bytes"] <= one + 16
    assert isinstance(bounded.read(str(small[1]), "x", 1), ReadMiss)  # pushed out
    assert not isinstance(bounded.read(str(other[1]), "x", 1), ReadMiss)


def test_hits_carry_the_slot_plan_and_other_layouts_take_the_general_checks(
        fixture_cache, tmp_path: Path) -> None:
    """A hit returns what ``learn`` was given as the slot plan; an adapter in PEFT's
    subfolder layout (no files at the top) is still a hit, through the general lookup."""
    model_dir = fixture_cache.model("qwen3_moe")
    spec = load_model_spec(model_dir)
    first, second, third = (fixture_cache.adapter(model_dir, name=f"sp-{s}",
                                                  targets=["attention"], r=4, seed=s)
                            for s in (1, 2, 3))
    reads = PackedReads(PlanCache(spec, max_lora_rank=RANK), spec, ParallelInfo(),
                        dtype=torch.float32, pin=False)
    miss = reads.read(str(first), "x", 1)
    assert isinstance(miss, ReadMiss)
    loaded = load_adapter(first, spec, ParallelInfo(), name="x", max_lora_rank=RANK,
                          plan=miss.plan)
    packed = AdapterWeights("x", 1, loaded.weights.rank,
                            slot_ready(loaded.weights.modules, torch.float32, pin=False))
    marker = object()
    reads.learn(miss, loaded, packed, marker)
    got = reads.read(str(second), "x", 1)
    assert not isinstance(got, ReadMiss) and got.slot_plan is marker
    nested = tmp_path / "root"
    shutil.copytree(third, nested / "tenant-a")
    got = reads.read(str(nested), "tenant-a", 1)
    assert not isinstance(got, ReadMiss) and got.slot_plan is marker
    _assert_bit_equal(got.weights, _general(third, spec, ParallelInfo(), torch.float32))
    assert reads.stats()["hits"] == 2
