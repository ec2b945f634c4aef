"""``PlanCache``: a plan validated once serves every adapter with byte-identical config and
header — same weights as a full load — while whatever is file-specific is still checked: a
copy truncated after its twin was validated fails with the full validation's typed error, and
every fixture fault is refused exactly as without the cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lora_cluster.adapters import inspect_adapter, load_adapter
from lora_cluster.adapters.plan_cache import PlanCache
from lora_cluster.errors import AdapterError, AdapterFormatError
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.spec import load_model_spec
from lora_cluster.testing.faults import FAULTS

RANK = 16


@pytest.fixture(scope="module")
def qwen(fixture_cache):
    model_dir = fixture_cache.model("qwen3_moe")
    return model_dir, load_model_spec(model_dir)


def _twins(fixture_cache, model_dir: Path) -> tuple[Path, Path]:
    return tuple(fixture_cache.adapter(model_dir, name=f"twin{s}", targets=["attention", "experts"],
                                       r=4, seed=s) for s in (1, 2))  # type: ignore[return-value]


def _load(path: Path, spec, plans: PlanCache | None):
    return load_adapter(path, spec, ParallelInfo(), name="a", max_lora_rank=RANK, plans=plans)


def test_identical_structure_reuses_the_plan_with_the_same_weights(qwen, fixture_cache) -> None:
    model_dir, spec = qwen
    first, second = _twins(fixture_cache, model_dir)
    cache = PlanCache(spec, max_lora_rank=RANK)
    _load(first, spec, cache)
    got = _load(second, spec, cache)
    assert cache.stats() | {"tensors": 0} == {"plans": 1, "tensors": 0, "hits": 1, "misses": 1}
    want = _load(second, spec, None)
    assert got.plan.table.path == want.plan.table.path
    assert got.plan.config.path == want.plan.config.path
    assert got.weights.modules.keys() == want.weights.modules.keys()
    for key, t in want.weights.modules.items():
        mine = got.weights.modules[key]
        assert torch.equal(mine.a, t.a) and torch.equal(mine.b, t.b), key
        assert mine.scaling == t.scaling
    # The twins differ in their data: the hit really read the second file.
    one = _load(first, spec, None).weights.modules
    assert any(not torch.equal(one[k].a, t.a) for k, t in want.weights.modules.items())


def test_a_copy_truncated_after_validation_still_fails_typed(qwen, fixture_cache,
                                                               tmp_path: Path) -> None:
    model_dir, spec = qwen
    first, _ = _twins(fixture_cache, model_dir)
    cache = PlanCache(spec, max_lora_rank=RANK)
    _load(first, spec, cache)
    bad = tmp_path / "bad"
    shutil.copytree(first, bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # header intact
    with pytest.raises(AdapterFormatError) as full:
        inspect_adapter(bad, spec, max_lora_rank=RANK)
    with pytest.raises(AdapterFormatError) as cached:
        _load(bad, spec, cache)
    assert cache.stats()["hits"] == 1  # the header matched: only the size check caught it
    assert str(cached.value) == str(full.value)
    assert "adapter_model.safetensors" in str(cached.value) and "truncated" in str(cached.value)


def test_changed_config_or_rank_limit_is_validated_again(qwen, fixture_cache,
                                                         tmp_path: Path) -> None:
    model_dir, spec = qwen
    first, _ = _twins(fixture_cache, model_dir)
    cache = PlanCache(spec, max_lora_rank=RANK)
    base = _load(first, spec, cache)
    edited = tmp_path / "edited"
    shutil.copytree(first, edited)
    cfg_path = edited / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["lora_alpha"] = 2 * cfg["lora_alpha"]
    cfg_path.write_text(json.dumps(cfg))
    got = _load(edited, spec, cache)
    assert cache.stats()["misses"] == 2 and cache.stats()["plans"] == 2
    key = next(iter(base.weights.modules))
    assert got.weights.modules[key].scaling == 2 * base.weights.modules[key].scaling
    # A cache for another rank limit never answers with a plan checked against this one.
    small = PlanCache(spec, max_lora_rank=2)
    with pytest.raises(AdapterError, match="max_lora_rank"):
        load_adapter(first, spec, ParallelInfo(), name="a", max_lora_rank=2, plans=small)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_faults_are_refused_as_without_the_cache(fault: str, qwen, fixture_cache) -> None:
    model_dir, spec = qwen
    path = fixture_cache.adapter(model_dir, name=f"fault-{fault}", corrupt=fault,
                                 targets=["attention", "experts"])
    cache = PlanCache(spec, max_lora_rank=RANK)
    with pytest.raises(AdapterError) as full:
        _load(path, spec, None)
    for _ in range(2):  # a refusal is never kept
        with pytest.raises(type(full.value)) as cached:
            _load(path, spec, cache)
        assert str(cached.value) == str(full.value)
    assert cache.stats()["plans"] == 0


def test_capacity_evicts_least_recently_used(qwen, fixture_cache, tmp_path: Path) -> None:
    model_dir, spec = qwen
    first, _ = _twins(fixture_cache, model_dir)
    cache = PlanCache(spec, max_lora_rank=RANK, capacity=2)
    dirs = []
    for alpha in (3, 5, 7):
        d = tmp_path / f"alpha{alpha}"
        shutil.copytree(first, d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["lora_alpha"] = alpha
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        dirs.append(d)
        _load(d, spec, cache)
    assert cache.stats()["plans"] == 2
    _load(dirs[0], spec, cache)  # pushed out: validated again
    assert cache.stats()["misses"] == 4
    _load(dirs[2], spec, cache)
    assert cache.stats()["hits"] == 1
