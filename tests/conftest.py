"""Shared pytest fixtures. Keep this file small and import-light (no transformers/peft here).

Tiny real-format checkpoints and adapters, written once per session:

    def test_x(fixture_cache):
        model_dir = fixture_cache.model("mixtral", sharded=True)
        adapter_dir = fixture_cache.adapter(model_dir, targets=["experts"], expert_format="3d")

The oracle (transformers + PEFT) lives in ``tests/oracle.py``: ``from oracle import
oracle_greedy, oracle_logits``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lora_cluster.testing.cache import FixtureCache


@pytest.fixture(scope="session")
def fixture_cache(tmp_path_factory: pytest.TempPathFactory) -> FixtureCache:
    """Session-wide memoised writer of tiny models and adapters (see lora_cluster.testing)."""
    return FixtureCache(tmp_path_factory.mktemp("tiny-fixtures"))


@pytest.fixture(scope="session")
def qwen3_moe_dir(fixture_cache: FixtureCache) -> Path:
    """The default tiny Qwen3-MoE checkpoint (2 MoE layers, 8 experts top-2, with tokenizer)."""
    return fixture_cache.model("qwen3_moe")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """One embedded local Ray for the whole test session (never a stray cluster)."""
    import os

    import ray

    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    if not ray.is_initialized():
        ray.init(address="local", namespace="lora_cluster", include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
