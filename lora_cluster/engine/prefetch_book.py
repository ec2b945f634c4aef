"""The controller's record of prefetch: versions admitted ahead of use, victims whose drop is
not sent yet, and how the ranks met each confirming load.

Pure bookkeeping (no torch, no locks): ``AdapterControl`` owns one and guards it with its
state lock; ``engine/prefetch.py`` fills it. Counters, as ``stats()["prefetch"]`` shows them:

    issued     versions hinted to the ranks (admitted to the host tier ahead of use)
    hits       confirming loads every rank answered from its finished read-ahead
    waited     confirming loads that joined a read still in flight on some rank
    missed     confirming loads some rank read on the step path (read lost, not started, or failed)
    ridden     confirming loads that rode on a step (the output rank had reported the read done)
    wasted     versions read ahead, then evicted or dropped before any request used them
    step_path_loads   loads of any kind that read from disk on the step path
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lora_cluster.engine.messages import AdapterKey, LoadResult, RankReply


@dataclass
class PrefetchBook:
    """Prefetch state and counters of one controller (see module docstring)."""

    # Versions admitted to the host tier ahead of use → their source path; a ``LoadAdapter``
    # confirms (and removes) each before its first placement.
    admitted: dict[AdapterKey, str] = field(default_factory=dict)
    # Victims evicted from the host tier to make room, whose ``DropAdapter`` is not sent yet.
    queued_drops: dict[AdapterKey, None] = field(default_factory=dict)
    # Admitted versions the output rank reported read (``StepResult.read_ahead_ready``): their
    # confirming load rides on the step being planned instead of being a round trip.
    ready: set[AdapterKey] = field(default_factory=set)
    issued: int = 0
    hits: int = 0
    waited: int = 0
    missed: int = 0
    wasted: int = 0
    step_path_loads: int = 0
    ridden: int = 0

    def admit(self, key: AdapterKey, path: str) -> None:
        self.admitted[key] = path
        self.issued += 1

    def confirm(self, key: AdapterKey) -> bool:
        """``key``'s load is being sent: True when prefetch had admitted it."""
        self.ready.discard(key)
        return self.admitted.pop(key, None) is not None

    def mark_ready(self, keys: tuple[AdapterKey, ...]) -> None:
        """The output rank finished reading these (only those still admitted count)."""
        self.ready.update(k for k in keys if k in self.admitted)

    def forget(self, key: AdapterKey) -> None:
        """``key`` left the host tier: wasted if it was read ahead and never used."""
        self.ready.discard(key)
        if self.admitted.pop(key, None) is not None:
            self.wasted += 1

    def reset(self) -> None:
        """The ranks were rebuilt: their read-ahead buffers and host caches are gone."""
        self.wasted += len(self.admitted)
        self.admitted.clear()
        self.queued_drops.clear()
        self.ready.clear()

    def record_ridden(self, result: LoadResult | None) -> None:
        """Fold in the output rank's outcome of a load that rode on a step."""
        self.ridden += 1
        self.record_load((RankReply(rank=0, result=result),), True)

    def record_load(self, replies: tuple[RankReply, ...], confirming: bool) -> None:
        """Fold the ranks' read-ahead outcomes of one load in."""
        outcomes = {r.result.read_ahead for r in replies if isinstance(r.result, LoadResult)}
        if not outcomes:
            return  # the load failed: counted as a load failure, not here
        on_step_path = bool(outcomes & {"none", "retried"})
        self.step_path_loads += on_step_path
        if not confirming:
            return
        if on_step_path:
            self.missed += 1
        elif "waited" in outcomes:
            self.waited += 1
        else:
            self.hits += 1

    def as_dict(self) -> dict[str, int]:
        return {"issued": self.issued, "hits": self.hits, "waited": self.waited,
                "missed": self.missed, "wasted": self.wasted,
                "step_path_loads": self.step_path_loads, "ridden": self.ridden,
                "ready": len(self.ready), "pending": len(self.admitted),
                "queued_drops": len(self.queued_drops)}
