"""Write each tiny model or adapter once per parameter set under one root (test sessions).

``FixtureCache(root).model("mixtral", sharded=True)`` returns the same directory for the same
arguments, writing it on first use; ``.adapter(model_dir, targets=["experts"], ...)`` likewise.
Directory names are readable (preset or adapter label) plus a short hash of the arguments.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from lora_cluster.testing.adapters import write_adapter
from lora_cluster.testing.checkpoint import write_tiny_model
from lora_cluster.testing.presets import TinyModelSpec


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=repr)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


class FixtureCache:
    """Memoised ``write_tiny_model`` / ``write_adapter`` under ``root`` (thread-safe)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._done: dict[str, Path] = {}

    def model(self, family: str | TinyModelSpec = "qwen3_moe", **kwargs: Any) -> Path:
        """A model directory written by ``write_tiny_model(dir, family, **kwargs)``."""
        label = family if isinstance(family, str) else family.family
        key = f"model-{label}-{_digest([repr(family), kwargs])}"
        return self._get(key, lambda d: write_tiny_model(d, family, **kwargs))

    def adapter(self, model_dir: str | Path, *, name: str = "adapter", **options: Any) -> Path:
        """An adapter directory written by ``write_adapter(dir, model_dir, **options)``."""
        key = f"{Path(model_dir).name}--{name}-{_digest([str(model_dir), options])}"
        return self._get(key, lambda d: write_adapter(d, model_dir, **options))

    def _get(self, key: str, write: Any) -> Path:
        with self._lock:
            if key not in self._done:
                self._done[key] = Path(write(self.root / key))
            return self._done[key]
