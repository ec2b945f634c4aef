"""Assets for ``lora-cluster demo``: a tiny Qwen3-MoE checkpoint and four adapters, cached.

Written once per parameter set: each directory carries a record of what it was written
with, and is reused while that record matches (so a second ``demo`` starts at once). Writes
go to a temporary sibling first and are renamed into place, so an interrupted run never
leaves a half-written directory that looks complete.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_cluster.testing.adapters import write_adapter
from lora_cluster.testing.checkpoint import write_tiny_model

DEMO_FAMILY = "qwen3_moe"
DEMO_VERSION = 1  # bump when the demo's weights or adapters change
DEMO_ADAPTERS: dict[str, dict[str, Any]] = {
    "attn-r8": {"targets": ["attention"], "r": 8, "alpha": 16, "seed": 11},
    "experts-r8": {"targets": ["experts"], "r": 8, "alpha": 16, "seed": 12,
                   "expert_format": "2d"},
    "all-rslora-r16": {"targets": ["all"], "r": 16, "alpha": 32, "seed": 13, "use_rslora": True,
                       "expert_format": "2d"},
    "experts-fused3d": {"targets": ["attention", "experts"], "r": 4, "alpha": 8, "seed": 14,
                        "expert_format": "3d"},
}
DEMO_PROMPTS = (
    "The quick brown fox",
    "SELECT name FROM users",
    "Once upon a time",
    "def add(a, b):",
    "Question: what is the capital of France?",
)
_RECORD = ".lora_cluster_demo.json"


def _ensure(target: Path, record: dict[str, Any], write: Callable[[Path], Any]) -> Path:
    """Reuse ``target`` if it was written with ``record``, else (re)write it atomically."""
    marker = target / _RECORD
    try:
        if json.loads(marker.read_text()) == record:
            return target
    except (OSError, json.JSONDecodeError):
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
    try:
        write(tmp)
        (tmp / _RECORD).write_text(json.dumps(record, sort_keys=True))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_assets(cache_dir: str | Path, *, seed: int = 0) -> tuple[Path, dict[str, Path]]:
    """(model_dir, {adapter name: adapter_dir}) under ``cache_dir``, written on first use."""
    root = Path(cache_dir).expanduser()
    model_record = {"version": DEMO_VERSION, "family": DEMO_FAMILY, "seed": seed}
    model_dir = _ensure(root / "model", model_record,
                        lambda d: write_tiny_model(d, DEMO_FAMILY, seed=seed))
    adapters = {}
    for name, options in DEMO_ADAPTERS.items():
        record = {"model": model_record, "options": options}
        adapters[name] = _ensure(root / "adapters" / name, record,
                                 functools.partial(_write_demo_adapter, model_dir, options))
    return model_dir, adapters


def _write_demo_adapter(model_dir: Path, options: dict[str, Any], out: Path) -> Path:
    return write_adapter(out, model_dir, **options)
