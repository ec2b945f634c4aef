"""Public result types returned by the Python API (plain, picklable, frozen)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# registered: known, only on disk/hub · host: in the host cache · device: in a device slot
Residency = Literal["registered", "loading", "host", "device", "failed"]
FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, kw_only=True)
class AdapterInfo:
    """What the registry knows about one adapter."""

    name: str
    source: str
    rank: int
    alpha: float
    scaling: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    residency: Residency
    version: int = 1
    pinned: bool = False
    bytes_per_rank: tuple[int, ...] = ()
    load_ms: float = 0.0
    load_breakdown_ms: tuple[tuple[str, float], ...] = ()
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """One prompt's output."""

    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str | None
    finish_reason: FinishReason
    adapter: str | None
    adapter_version: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
