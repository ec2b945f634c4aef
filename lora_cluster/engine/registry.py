"""The controller's adapter registry: what is known about each registered adapter.

Residency is not stored here: it is derived from ``Residency`` (device / host) and the
record's own loading / failed flags, so the two can never disagree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lora_cluster.api_types import AdapterInfo, Residency
from lora_cluster.engine.messages import AdapterKey, LoadResult


@dataclass(frozen=True, kw_only=True)
class AdapterMeta:
    """The adapter's config as validated on the controller (header-level, no tensor reads)."""

    rank: int
    alpha: float
    scaling: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    # (decoder layer, bytes of its tensors in the file), from the header: sizes the groups an
    # in-place update is staged in. Empty: unknown (the update runs as one command).
    layer_bytes: tuple[tuple[int, int], ...] = ()


@dataclass
class AdapterRecord:
    """One registered adapter (current version plus any old versions still in use)."""

    name: str
    source: str
    path: str
    meta: AdapterMeta
    version: int
    bytes_per_rank: tuple[int, ...] = ()
    load_ms: float = 0.0
    load_breakdown_ms: tuple[tuple[str, float], ...] = ()
    pinned: bool = False
    error: str | None = None  # the last transparent reload failure, if any
    requests: int = 0
    place_ms: float = 0.0  # the last activation into a device slot (slowest rank)
    places: int = 0
    updates: int = 0
    registered_at: float = field(default_factory=time.time)

    @property
    def key(self) -> AdapterKey:
        return (self.name, self.version)

    def record_load(self, results: list[LoadResult], wall_ms: float) -> None:
        """Fold every rank's load report in (bytes per rank; the slowest rank's breakdown)."""
        self.bytes_per_rank = tuple(r.nbytes for r in results)
        slowest = max(results, key=lambda r: r.total_ms)
        self.load_breakdown_ms = (*slowest.breakdown_ms, ("total", wall_ms))
        self.load_ms = wall_ms
        self.error = None

    def info(self, residency: Residency) -> AdapterInfo:
        return AdapterInfo(
            name=self.name, source=self.source, rank=self.meta.rank, alpha=self.meta.alpha,
            scaling=self.meta.scaling, use_rslora=self.meta.use_rslora,
            target_modules=self.meta.target_modules, residency=residency, version=self.version,
            pinned=self.pinned, bytes_per_rank=self.bytes_per_rank, load_ms=self.load_ms,
            load_breakdown_ms=self.load_breakdown_ms, error=self.error,
        )
