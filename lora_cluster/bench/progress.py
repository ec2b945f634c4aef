"""A progress bar on stderr for the benchmark's long phases (no dependency).

On a terminal the bar redraws in place (at most ~8 times a second); elsewhere (a log file,
CI) it prints one line when a phase starts and one when it ends, so logs stay short.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

_WIDTH = 28
_REDRAW_S = 0.125


class ProgressBar:
    """``label [#######-------]  45%  note`` for work measured in units (or seconds)."""

    def __init__(self, label: str, total: float, *, enabled: bool = True,
                 stream: TextIO | None = None, unit: str = "") -> None:
        self.label, self.total, self.unit = label, max(float(total), 1e-9), unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.done = 0.0
        self.note = ""
        self._start = time.perf_counter()
        self._last_draw = 0.0
        self._closed = False
        if enabled and not self.tty:
            print(f"{label} …", file=self.stream, flush=True)

    def update(self, done: float, note: str | None = None) -> None:
        """Set progress to ``done`` units (clamped to the total)."""
        self.done = min(float(done), self.total)
        if note is not None:
            self.note = note
        now = time.perf_counter()
        if self.tty and (now - self._last_draw >= _REDRAW_S or self.done >= self.total):
            self._last_draw = now
            self._draw()

    def _draw(self, end: str = "") -> None:
        frac = self.done / self.total
        filled = round(frac * _WIDTH)
        bar = "#" * filled + "-" * (_WIDTH - filled)
        note = f"  {self.note}" if self.note else ""
        print(f"\r{self.label} [{bar}] {frac:4.0%}{note}\033[K", end=end, file=self.stream,
              flush=True)

    def close(self, note: str | None = None) -> None:
        """Finish the bar with the elapsed time."""
        if self._closed:
            return
        self._closed = True
        if note is not None:
            self.note = note
        elapsed = time.perf_counter() - self._start
        if self.tty:
            self.done = self.total
            self.note = f"{self.note}  ({elapsed:.1f} s)".strip()
            self._draw(end="\n")
        elif self.enabled:
            extra = f": {self.note}" if self.note else ""
            print(f"{self.label} done ({elapsed:.1f} s){extra}", file=self.stream, flush=True)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_with_bar(bar: ProgressBar, seconds: float, stop: threading.Event | None = None,
                  offset: float = 0.0) -> None:
    """Sleep ``seconds`` (or until ``stop`` is set), advancing ``bar`` from ``offset`` as time passes."""
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        bar.update(offset + elapsed)
        if elapsed >= seconds or (stop is not None and stop.is_set()):
            return
        time.sleep(min(0.1, seconds - elapsed))
