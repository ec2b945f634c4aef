"""Prefetch: waiting requests' adapters are read into the ranks' host caches before the
requests are admitted, off the step path.

Without it, a request whose adapter is not host-resident loads it when admitted: a disk read
on every rank inside the step loop, under the exec lock, while the whole batch waits. The
``Prefetcher`` looks ``depth`` requests ahead in the waiting queue (admission order), and
for each current adapter version there that is not host-resident it

1. admits the version to the host tier ahead of use (``AdapterControl.prefetch.admitted``),
   making room only by evicting an entry that is unheld (not pinned, not used by a running
   request), off the device, not read ahead itself and not wanted by the look-ahead: one
   victim per version, and when no entry qualifies it stops rather than evict more;
2. queues the victims' ``DropAdapter`` (the step loop sends them before the step, and any
   command sent earlier sends them first: a rank's cache follows the tiers before a load);
3. returns a ``ReadAheadHint`` for it, which rides on the step about to run: every rank's
   reader thread reads it in the gaps between commands (``engine/read_ahead.py``).

On admission ``AdapterControl`` sends the usual ``LoadAdapter``, which *confirms* the version:
each rank takes what it read (or joins the read in flight); if the read-ahead failed or was
lost, the rank reads again right there, so a bad file reaches the request exactly as without
prefetch (typed error to that request, the reload-failure count, the cluster keeps serving).
At most ``depth`` versions wait for confirmation at once (``read_ahead_depth``: 2 × max_loras
within the host entries the slots leave over); one that no request within ``STALE_WINDOW``
× depth of the queue head wants any more (its requests were cancelled) is dropped again.

Where it runs: in the step loop right after ``schedule()`` (both locks held), as plain
bookkeeping over at most ``STALE_WINDOW × depth`` queued requests — tens of microseconds; the
disk reads themselves never run under a lock or on the step path. Hints ride on the ``Step``
(no extra message, no extra thread: on a host whose steps are Python-bound, a separate hint
channel — an actor call per hint, a planning thread — measurably slowed the steps). A request
admitted in the same step it arrived loads on admission, as without prefetch; the look-ahead
covers every request that waits at least one step.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from lora_cluster.engine.adapter_control import AdapterControl, tier_id
from lora_cluster.engine.messages import AdapterKey, ReadAheadHint
from lora_cluster.engine.sequence import Sequence

STALE_WINDOW = 4  # an admitted version no request among the first 4 × depth wants is dropped


class Prefetcher:
    """Plans read-ahead for the waiting queue, step by step (see module docstring)."""

    def __init__(self, adapters: AdapterControl, depth: int) -> None:
        self.adapters = adapters
        self.depth = max(0, depth)

    def stats(self) -> dict[str, int]:
        """Prefetch counters (``prefetch_book``) and the look-ahead depth (caller holds lock)."""
        return {**self.adapters.prefetch.as_dict(), "depth": self.depth}

    # ---------------------------------------------------------------- planning
    def plan_locked(self, waiting: Iterable[Sequence]) -> tuple[ReadAheadHint, ...]:
        """Admit the look-ahead's missing versions to the host tier; their hints (caller
        holds the state lock)."""
        if self.depth <= 0:
            return ()
        ac, book = self.adapters, self.adapters.prefetch
        queue = list(itertools.islice(waiting, STALE_WINDOW * self.depth))
        wanted = self._wanted(queue[:self.depth])
        if book.admitted:
            still_wanted = set(wanted) | set(self._wanted(queue[self.depth:]))
            for key in [k for k in book.admitted if k not in still_wanted]:
                self._evict(tier_id(key))  # its requests are gone: give the entry back
        todo = [(k, p) for k, p in wanted.items() if not ac.tiers.in_host(tier_id(k))
                and k not in ac.staging and k not in book.queued_drops]
        if not todo:
            return ()
        names = ac.tiers.host_names()  # least recently used first
        free = ac.tiers.max_cpu_loras - len(names)
        victims = self._victims(names, keep={tier_id(k) for k in wanted})
        hints = []
        for key, path in todo:
            tid = tier_id(key)
            if len(book.admitted) >= self.depth:
                break
            if free > 0:
                free -= 1
            else:
                victim = next(victims, None)
                if victim is None:
                    break  # every other entry is held, on the device or wanted soon
                self._evict(victim)
            ac.tiers.admit_host(tid)
            ac.keys[tid] = key
            book.admit(key, path)
            hints.append(ReadAheadHint(name=key[0], version=key[1], path=path))
        return tuple(hints)

    def _wanted(self, queue: Iterable[Sequence]) -> dict[AdapterKey, str]:
        """Current versions (→ path) the queued requests will bind, in admission order."""
        ac = self.adapters
        out: dict[AdapterKey, str] = {}
        for seq in queue:
            if seq.adapter_name is None:
                continue
            rec = ac.records.get(seq.adapter_name)
            # A failed reload is retried by its own request, not read ahead; a sequence bound
            # to an older version (preempted across an update) loads it on admission.
            if rec is None or rec.error is not None or seq.adapter not in (None, rec.key):
                continue
            path = ac.paths.get(rec.key)
            if path is not None:
                out.setdefault(rec.key, path)
        return out

    def _victims(self, names: list[str], keep: set[str]) -> Iterator[str]:
        """Host entries prefetch may evict, least recently used first (checked lazily)."""
        ac = self.adapters
        for tid in names:
            key = ac.keys.get(tid)
            if (key is None or tid in keep or not ac.tiers.in_host(tid) or ac.tiers.held(tid)
                    or ac.tiers.slot_of(tid) is not None or key in ac.prefetch.admitted
                    or key in ac.staging):
                continue
            yield tid

    def _evict(self, tid: str) -> None:
        """Take ``tid`` out of the host tier now; the ranks drop it with the next command."""
        ac = self.adapters
        key = ac.keys[tid]
        ac.tiers.remove(tid)
        ac.tiers.host_stats.evictions += 1
        ac.prefetch.forget(key)
        ac.prefetch.queued_drops[key] = None
        ac._forget_if_dead(key)
