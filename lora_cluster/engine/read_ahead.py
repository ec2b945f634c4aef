"""A rank's read-ahead buffer: adapter versions read from disk by a small reader pool, off
the command path, until an ordered ``LoadAdapter`` takes them into the host cache.

Only hints (``messages.ReadAheadHint``) fill it, and nothing the controller mirrors changes
when they do: the host cache gains an entry only when a load command takes one. So a hint may
arrive late, twice, or for a version dropped meanwhile — the worst it costs is a wasted read.

Threads: ``offer``/``take``/``done``/``discard``/``busy`` run on the rank's command thread
(``offer`` is safe from any thread); reads on the pool's threads. One lock guards the buffer;
no read and no wait happens under it. A reader starts a read only while no command runs
(``busy``), or after waiting ``idle_wait_s`` for such a gap: on a host whose steps are
Python-bound, a read contending with a step for the GIL costs the step what it saved. A read
a load takes before it started is not read twice: the load reads it itself.

Inline mode (``workers=0``): no reader thread; the command thread reads queued entries
itself, a few at a time, when it is told to (``run_pending``, at a step boundary). For a rank
whose forward is Python-bound (CPU), a reader thread running beside it only trades the read's
CPU time for GIL hand-offs on every small op of the forward — measured on the cpu-tiny preset
through Ray, each read then took ~3.5 ms of wall time and the forward grew by more than the
reads cost; read inline, a step pays exactly the read.

Bounds: at most ``capacity`` entries (read, in flight or queued); the oldest goes first to
make room (counted ``wasted``). A failed read stays an entry that ``take`` answers with
``"retried"``: the caller reads again, so the error reaches the request exactly as it would
have without read-ahead. A failure never stops the pool or touches other entries.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from lora_cluster.engine.messages import AdapterKey, ReadAheadHint, ReadAheadOutcome

T = TypeVar("T")
Reader = Callable[[str, str, int], T]  # (path, name, version) → what the host cache holds


# offered: hints seen · started: reads begun · hits: loads that found the read done ·
# waited: loads that joined a read in flight · not_started: loads that found the read still
# queued and read themselves · retried: loads whose read-ahead failed · wasted: entries
# dropped or pushed out unused.
_COUNTS = ("offered", "started", "hits", "waited", "not_started", "retried", "wasted")


class _Entry(Generic[T]):
    """One buffered version: its read (``future``), whether the read began, or was given up."""

    __slots__ = ("abandoned", "future", "hint", "started")

    def __init__(self, hint: ReadAheadHint) -> None:
        self.hint = hint
        self.started = False
        self.abandoned = False  # taken, discarded or pushed out before its read began
        self.future: Future[T | None] = Future()


def read_ahead_depth(max_loras: int, max_cpu_loras: int) -> int:
    """Adapter versions read ahead at most at once: twice the device slots (a few steps of
    admissions), and never more host entries than the slots leave over (0: no read-ahead)."""
    return max(0, min(2 * max_loras, max_cpu_loras - max_loras))


class ReadAhead(Generic[T]):
    """Versions being read (or read) ahead of their load command; see module docstring."""

    def __init__(self, read: Reader[T], *, capacity: int, workers: int = 1,
                 resident: Callable[[AdapterKey], bool] = lambda key: False,
                 idle_wait_s: float = 0.05) -> None:
        self.capacity = capacity
        self.idle_wait_s = idle_wait_s
        self._read = read
        self._resident = resident  # already in the host cache (or staging): nothing to read
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._busy = 0
        self._entries: OrderedDict[AdapterKey, _Entry[T]] = OrderedDict()  # oldest first
        self._loading: set[AdapterKey] = set()  # taken by a load command that is not done
        self.inline = workers <= 0
        self._pool = None if self.inline else ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="lora-read-ahead")
        self._closed = False
        self._ready: list[AdapterKey] = []  # reads finished since the last ``take_ready``
        self.counts: Counter[str] = Counter(dict.fromkeys(_COUNTS, 0))

    def offer(self, hints: Iterable[ReadAheadHint]) -> int:
        """Start reading every hinted version not resident, buffered or being loaded;
        returns how many reads started. Never blocks on a read; safe from any thread."""
        started = 0
        with self._lock:
            if self._closed or self.capacity <= 0:
                return 0
            for hint in hints:
                key = hint.key
                self.counts["offered"] += 1
                if key in self._entries or key in self._loading or self._resident(key):
                    continue
                while len(self._entries) >= self.capacity:
                    _, oldest = self._entries.popitem(last=False)
                    oldest.abandoned = True  # not begun: never read; running: result dropped
                    self.counts["wasted"] += 1
                entry: _Entry[T] = _Entry(hint)
                self._entries[key] = entry
                if self._pool is not None:
                    self._pool.submit(self._run, entry)
                started += 1
            self.counts["started"] += started
        return started

    def take(self, key: AdapterKey) -> tuple[T | None, ReadAheadOutcome]:
        """The read-ahead value of ``key`` (waiting for a read in flight) and how it was met;
        None: the caller reads it itself. ``key`` counts as loading until ``done(key)``."""
        with self._lock:
            self._loading.add(key)
            entry = self._entries.pop(key, None)
            if entry is None:
                return None, "none"
            if not entry.started:
                # Still queued, or waiting for a gap: reading it now beats waiting.
                entry.abandoned = True
                self.counts["not_started"] += 1
                return None, "none"
        waited = not entry.future.done()
        try:
            value = entry.future.result()
        except Exception:  # the caller's own read reports the error (same as without hints)
            value = None
        if value is None:
            self._count("retried")
            return None, "retried"
        self._count("waited" if waited else "hits")
        return value, "waited" if waited else "hit"

    def done(self, key: AdapterKey) -> None:
        """The load that took ``key`` finished (the host cache holds it, or it failed)."""
        with self._lock:
            self._loading.discard(key)

    def discard(self, key: AdapterKey) -> None:
        """Forget ``key``'s entry (its version was dropped before any load took it)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                entry.abandoned = True
                self.counts["wasted"] += 1

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Around each command: readers start no new read meanwhile."""
        with self._lock:
            self._busy += 1
            self._idle.clear()
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()

    def run_pending(self, limit: int) -> int:
        """Inline mode: read up to ``limit`` queued entries, oldest first, on this thread;
        returns how many were read (a failed read counts: ``take`` reports it)."""
        done = 0
        while done < limit:
            with self._lock:
                entry = next((e for e in self._entries.values()
                              if not e.started and not e.abandoned), None)
                if entry is None or self._closed:
                    return done
                entry.started = True
            self._read_into(entry)
            done += 1
        return done

    def _run(self, entry: _Entry[T]) -> None:
        """A reader's job: wait for a gap between commands, then read (unless given up)."""
        self._idle.wait(self.idle_wait_s)
        with self._lock:
            if entry.abandoned or self._closed:
                entry.future.set_result(None)
                return
            entry.started = True
        self._read_into(entry)

    def _read_into(self, entry: _Entry[T]) -> None:
        try:
            value = self._read(entry.hint.path, entry.hint.name, entry.hint.version)
        except BaseException as exc:  # kept for ``take``; never ends the reader
            entry.future.set_exception(exc)
            return
        entry.future.set_result(value)
        with self._lock:
            if not entry.abandoned and value is not None:
                self._ready.append(entry.hint.key)

    def take_ready(self) -> tuple[AdapterKey, ...]:
        """Versions whose read finished successfully since the last call (their load will
        find them read unless they are dropped or pushed out meanwhile)."""
        with self._lock:
            ready, self._ready = tuple(self._ready), []
            return ready

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"capacity": self.capacity, "buffered": len(self._entries),
                    **{k: int(v) for k, v in self.counts.items()}}

    def close(self) -> None:
        """Drop every entry and stop the readers (a read in progress finishes unseen)."""
        with self._lock:
            self._closed = True
            for entry in self._entries.values():
                entry.abandoned = True
            self._entries.clear()
            self._idle.set()  # waiting readers give up at once
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
