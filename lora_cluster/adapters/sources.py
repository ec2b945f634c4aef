"""Where an adapter comes from: a local directory (confined to ``adapter_roots``) or a Hugging
Face hub id; and the memory of failed loads, so a bad source fails fast with the same error.

    resolve_source("/srv/adapters/sql", adapter_roots=("/srv/adapters",))  -> Path
    resolve_source("org/sql-lora", adapter_roots=(), cache_dir=...)        -> Path (hub snapshot)
    resolve_source("org/sql-lora@v2", ...)                                 -> that revision

Confinement: a local source is resolved (``..`` collapsed, symlinks followed) and must lie
inside one resolved root, and so must the adapter files in it — a symlinked weights file
pointing outside is refused like a ``..`` escape. Hub ids are not confined by the roots (they
are fetched into the HF cache, adapter files only); offline mode (``HF_HUB_OFFLINE=1`` or
``offline=True``) serves them from the local HF cache.
"""

from __future__ import annotations

import copy
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from lora_cluster.errors import AdapterAccessError, AdapterNotFoundError, LoRAClusterError

HUB_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(?:@[\w./-]+)?")


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _check_files_confined(source: str, directory: Path, roots: Sequence[Path]) -> None:
    """The adapter files in ``directory`` (or one subfolder down) must resolve inside a root."""
    for child in [*directory.iterdir(), *(p for d in directory.iterdir() if d.is_dir()
                                          for p in d.iterdir())]:
        if child.name in HUB_PATTERNS and not _inside(child.resolve(), roots):
            raise AdapterAccessError(
                f"{source}: {child} links to {child.resolve()}, outside the allowed "
                "adapter_roots", source=source, path=str(child))


def _is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.fullmatch(source)) and ".." not in source


def _from_hub(source: str, cache_dir: str | Path | None, offline: bool | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    repo_id, _, revision = source.partition("@")
    local_only = offline if offline is not None else (
        constants.HF_HUB_OFFLINE
        or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"))
    try:
        path = snapshot_download(repo_id, revision=revision or None, cache_dir=cache_dir,
                                 allow_patterns=HUB_PATTERNS, local_files_only=local_only)
    except LocalEntryNotFoundError as exc:
        where = "the local HF cache (offline mode)" if local_only else "the hub"
        raise AdapterNotFoundError(f"{source}: not found in {where} ({exc})",
                                   source=source) from None
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as exc:
        raise AdapterNotFoundError(f"{source}: hub download failed ({exc})",
                                   source=source) from None
    return Path(str(path))


def resolve_source(source: str, *, adapter_roots: Sequence[str | Path] = (),
                   cache_dir: str | Path | None = None, offline: bool | None = None) -> Path:
    """The local directory holding the adapter named by ``source`` (see module docstring).

    With roots, a relative source is looked up under each root in order; any path that
    resolves outside every root is refused (AdapterAccessError) whether it exists or not.
    """
    if not source or "\x00" in source:
        raise AdapterNotFoundError(f"{source!r}: empty or invalid adapter source", source=source)
    roots = [Path(r).expanduser().resolve() for r in adapter_roots]
    raw = Path(source).expanduser()
    candidates = [raw] if raw.is_absolute() or not roots else [root / raw for root in roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        if roots and not _inside(resolved, roots):
            raise AdapterAccessError(
                f"{source}: resolves to {resolved}, outside the allowed adapter_roots "
                f"({', '.join(map(str, roots))})", source=source, path=str(resolved))
        if resolved.exists():
            if roots and resolved.is_dir():
                _check_files_confined(source, resolved, roots)
            return resolved
    if _is_hub_id(source):
        return _from_hub(source, cache_dir, offline)
    raise AdapterNotFoundError(f"{source}: no such adapter directory (and not a hub id)",
                               source=source)


class FailedLoads:
    """Recent load failures by key (adapter name or source): ``check`` re-raises the same
    error while it is younger than ``ttl_s``, so repeated requests fail fast."""

    def __init__(self, ttl_s: float, *, max_entries: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0, got {ttl_s}")
        self.ttl_s, self.max_entries, self._clock = ttl_s, max_entries, clock
        self._entries: OrderedDict[str, tuple[float, LoRAClusterError]] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, key: str, error: LoRAClusterError) -> None:
        """Remember that loading ``key`` failed with ``error``."""
        if self.ttl_s == 0:
            return
        with self._lock:
            self._entries[key] = (self._clock(), error)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def get(self, key: str) -> LoRAClusterError | None:
        """The remembered error (a fresh copy, same type and message) while it is recent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            when, error = entry
            if self._clock() - when >= self.ttl_s:
                del self._entries[key]
                return None
        return copy.copy(error)

    def check(self, key: str) -> None:
        """Raise the remembered error for ``key``, if any."""
        error = self.get(key)
        if error is not None:
            raise error

    def forget(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            now = self._clock()
            return sum(1 for when, _ in self._entries.values() if now - when < self.ttl_s)
