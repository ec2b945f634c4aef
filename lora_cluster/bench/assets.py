"""The benchmark's model and adapter directories, written once into a cache dir and reused.

Layout: ``<cache>/<preset>-<digest>/model`` and ``.../adapters/a00000 …``; the digest covers
everything that shapes the files (model spec, dtypes, adapter rank and targets), so a changed
preset never reuses stale files. A directory counts as written once its marker exists (the
marker is written last), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lora_cluster.bench.presets import BenchPreset

MARKER = ".bench_written"
Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class BenchAssets:
    """Where the preset's model and its first ``len(adapter_dirs)`` adapters live."""

    root: Path
    model_dir: Path
    adapter_dirs: tuple[Path, ...]

    def adapter_names(self, count: int) -> list[str]:
        return [adapter_name(i) for i in range(count)]


def adapter_name(index: int) -> str:
    """The registered name of adapter ``index`` (0 = most popular)."""
    return f"a{index:05d}"


def _digest(preset: BenchPreset) -> str:
    record = {"model": asdict(preset.model), "model_dtype": preset.model_dtype,
              "rank": preset.adapter_rank, "targets": list(preset.adapter_targets), "v": 1}
    text = json.dumps(record, sort_keys=True, default=repr)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def asset_root(preset: BenchPreset, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / f"{preset.name}-{_digest(preset)}"


def prepare_assets(preset: BenchPreset, cache_dir: str | Path, num_adapters: int,
                   progress: Progress | None = None) -> BenchAssets:
    """Write (or reuse) the model and ``num_adapters`` adapters; adapter i is seeded with i."""
    from lora_cluster.testing import write_adapter, write_tiny_model

    root = asset_root(preset, cache_dir)
    model_dir = root / "model"
    if not (model_dir / MARKER).exists():
        write_tiny_model(model_dir, preset.model, dtype=preset.model_dtype,
                         tokenizer=preset.model.vocab_size <= 4096)
        (model_dir / MARKER).write_text("ok\n")
    adapters_root = root / "adapters"
    adapters_root.mkdir(parents=True, exist_ok=True)
    dirs = []
    for i in range(num_adapters):
        path = adapters_root / adapter_name(i)
        if not (path / MARKER).exists():
            # The model spec (not the directory) is passed: no config re-read per adapter.
            write_adapter(path, preset.model, targets=list(preset.adapter_targets),
                          r=preset.adapter_rank, alpha=2 * preset.adapter_rank, seed=i,
                          dtype=preset.model_dtype)
            (path / MARKER).write_text("ok\n")
        dirs.append(path)
        if progress is not None and (i % 64 == 0 or i == num_adapters - 1):
            progress(i + 1, num_adapters)
    return BenchAssets(root=root, model_dir=model_dir, adapter_dirs=tuple(dirs))
