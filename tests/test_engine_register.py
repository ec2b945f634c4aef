"""``register_adapters``: validate and register on disk only; the first request loads it.

In-process (``ControllerCore`` over ``LocalRankGroup``) on the tiny Qwen3-MoE: registering
reads no tensors, a registered adapter serves the same tokens as an eagerly loaded one, bad
input is refused all or nothing, and re-registering the same source is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_cluster.config import ClusterConfig, SamplingParams
from lora_cluster.engine.controller_core import ControllerCore
from lora_cluster.engine.rank_group import LocalRankGroup
from lora_cluster.errors import AdapterNotFoundError, RequestError
from lora_cluster.model.spec import load_model_spec
from lora_cluster.testing.cache import FixtureCache

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPT = [5, 40, 41, 42, 300]


@pytest.fixture
def core(qwen3_moe_dir: Path) -> Iterator[ControllerCore]:
    cfg = ClusterConfig(model=str(qwen3_moe_dir), device="cpu", dtype="float32", max_loras=2,
                        max_cpu_loras=2, max_lora_rank=8, kv_cache_bytes=4 << 20)
    core = ControllerCore(cfg, load_model_spec(qwen3_moe_dir), LocalRankGroup(cfg))
    yield core
    core.shutdown()


def _adapters(cache: FixtureCache, model_dir: Path, n: int) -> dict[str, str]:
    return {f"a{i}": str(cache.adapter(model_dir, name=f"reg{i}", targets=["attention"], r=4,
                                       seed=100 + i)) for i in range(n)}


def test_register_reads_nothing_and_loads_on_first_use(core: ControllerCore,
                                                       fixture_cache: FixtureCache,
                                                       qwen3_moe_dir: Path) -> None:
    sources = _adapters(fixture_cache, qwen3_moe_dir, 4)
    infos = core.register_adapters(sources)
    assert [i.name for i in infos] == list(sources)
    assert {i.residency for i in infos} == {"registered"}
    stats = core.stats()
    assert stats["tiers"]["host"]["resident"] == 0 and stats["tiers"]["host"]["misses"] == 0
    lazy = core.generate([PROMPT] * 4, list(sources), GREEDY)
    # Four adapters through a host cache of two: each loaded from disk on its first request.
    assert core.stats()["tiers"]["host"]["misses"] == 4
    assert core.list_adapters()[0].bytes_per_rank  # load recorded once it happened
    core.evict_adapter("a0")
    core.load_adapter("a0", sources["a0"])
    eager = core.generate([PROMPT], ["a0"], GREEDY)
    assert eager[0].token_ids == lazy[0].token_ids
    assert len({r.token_ids for r in lazy}) > 1  # the adapters differ


def test_register_is_idempotent_and_all_or_nothing(core: ControllerCore,
                                                   fixture_cache: FixtureCache,
                                                   qwen3_moe_dir: Path, tmp_path: Path) -> None:
    sources = _adapters(fixture_cache, qwen3_moe_dir, 2)
    core.register_adapters(list(sources.items()))
    again = core.register_adapters(sources)  # same sources: nothing changes
    assert [i.version for i in again] == [1, 1]
    with pytest.raises(AdapterNotFoundError):
        core.register_adapters({"new": sources["a0"], "missing": str(tmp_path / "nope")})
    assert "new" not in {i.name for i in core.list_adapters()}
    with pytest.raises(RequestError, match="already registered"):
        core.register_adapters({"a0": sources["a1"]})
    with pytest.raises(RequestError, match="twice"):
        core.register_adapters([("x", sources["a0"]), ("x", sources["a1"])])
