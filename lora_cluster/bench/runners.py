"""Load generators: closed-loop clients at saturation, open-loop Poisson arrivals.

A target is anything with the Python API's ``generate(prompts, adapters, sampling)`` and
``stats()``: the Ray ``Cluster`` handle, or an in-process ``ControllerCore``. Every request
is sent alone (one prompt per call) from its own client thread, as independent users would.
Output lengths are exact: ``max_tokens`` with EOS ignored, greedy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from lora_cluster.bench.progress import ProgressBar, wait_with_bar
from lora_cluster.bench.workload import BenchRequest, RequestStream
from lora_cluster.config import SamplingParams

_DRAIN_TIMEOUT_S = 300.0


class Target(Protocol):
    """What the runners drive (``Cluster`` and ``ControllerCore`` both qualify)."""

    def generate(self, prompts: Any, adapters: Any = None, sampling: Any = None) -> Any: ...

    def stats(self) -> dict[str, Any]: ...


@dataclass
class RequestRecord:
    """One finished (or failed) request as the client saw it, with the server's metrics."""

    adapter: int
    prompt_len: int
    max_tokens: int
    start: float  # client clock (time.monotonic): when it was sent (open loop: scheduled)
    end: float = 0.0
    output_tokens: int = 0
    server: dict[str, float] = field(default_factory=dict)  # ttft_s, tpot_s, latency_s, queue_s
    error: str | None = None


@dataclass
class PhaseRun:
    """Raw outcome of one load phase: the records, the measured window, stats around it."""

    kind: str  # "closed" or "open"
    records: list[RequestRecord]
    window: tuple[float, float]  # client clock
    stats_before: dict[str, Any]
    stats_after: dict[str, Any]
    stats_times: tuple[float, float]  # client clock when each snapshot returned
    clients: int = 0
    rate: float = 0.0
    offered: int = 0
    # closed loop: (stats, client time) at every sub-window boundary, first and last included
    boundaries: list[tuple[dict[str, Any], float]] = field(default_factory=list)


def sampling_for(request: BenchRequest) -> SamplingParams:
    return SamplingParams(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)


def send(target: Target, request: BenchRequest, names: Sequence[str],
         start: float | None = None) -> RequestRecord:
    """Run one request to completion; failures are recorded, not raised."""
    record = RequestRecord(adapter=request.adapter, prompt_len=len(request.prompt),
                           max_tokens=request.max_tokens,
                           start=time.monotonic() if start is None else start)
    try:
        result = target.generate([list(request.prompt)], [names[request.adapter]],
                                 sampling_for(request))[0]
    except Exception as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    else:
        record.output_tokens = len(result.token_ids)
        record.server = {k: float(v) for k, v in result.metrics.items()}
    record.end = time.monotonic()
    return record


def client_ttft(record: RequestRecord) -> float | None:
    """Time to first token as the client saw it (an upper bound): the engine's TTFT plus
    everything the engine did not see — waiting to be sent, transport both ways."""
    server = record.server
    if "ttft_s" not in server or "latency_s" not in server:
        return None
    return server["ttft_s"] + max(0.0, (record.end - record.start) - server["latency_s"])


def _send_then(done: Callable[[RequestRecord], None], target: Target, request: BenchRequest,
               names: Sequence[str], start: float) -> None:
    done(send(target, request, names, start=start))


def _snapshot(target: Target) -> tuple[dict[str, Any], float]:
    stats = target.stats()
    rank_stats = getattr(target, "rank_stats", None)  # the Ray cluster: rank processes' GC
    if callable(rank_stats):
        ranks = rank_stats()
        stats = {**stats, "rank_gc": [r.get("gc") for r in ranks],
                 "rank_loop": [r.get("loop") for r in ranks]}
    return stats, time.monotonic()


def run_closed_loop(target: Target, stream: RequestStream, names: Sequence[str], *,
                    clients: int, warmup_s: float, duration_s: float, windows: int = 1,
                    bar: ProgressBar | None = None) -> PhaseRun:
    """``clients`` threads each send a request as soon as their last one finished.

    The first ``warmup_s`` seconds are not measured; the window is the next ``duration_s``,
    cut into ``windows`` equal sub-windows with a stats snapshot at each boundary (the
    summary reports each, and their median, beside the whole window). Records of every
    finished request are kept (the summary picks the window's).
    """
    stop = threading.Event()
    records: list[RequestRecord] = []
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            record = send(target, stream.take(), names)
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, name=f"bench-client-{i}", daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    tick = bar or ProgressBar("", 1.0, enabled=False)
    wait_with_bar(tick, warmup_s)
    boundaries = [_snapshot(target)]
    for k in range(windows):
        wait_with_bar(tick, duration_s / windows, offset=warmup_s + k * duration_s / windows)
        boundaries.append(_snapshot(target))
    (before, t0), (after, t1) = boundaries[0], boundaries[-1]
    stop.set()
    deadline = time.monotonic() + _DRAIN_TIMEOUT_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        done = list(records)
    return PhaseRun(kind="closed", records=done, window=(t0, t1), stats_before=before,
                    stats_after=after, stats_times=(t0, t1), clients=clients,
                    offered=len(done), boundaries=boundaries)


def run_open_loop(target: Target, requests: Sequence[BenchRequest], arrivals: np.ndarray,
                  names: Sequence[str], *, max_in_flight: int = 60,
                  bar: ProgressBar | None = None,
                  on_done: Callable[[int], None] | None = None) -> PhaseRun:
    """Send ``requests[i]`` at ``arrivals[i]`` seconds after the start, whatever is in flight.

    A request's latency counts from its scheduled arrival, so time spent waiting for a free
    client thread (more than ``max_in_flight`` outstanding) is charged to it, not hidden.
    """
    if len(requests) != len(arrivals):
        raise ValueError("one arrival time per request")
    before, _ = _snapshot(target)
    records: list[RequestRecord] = []
    lock = threading.Lock()
    total = float(arrivals[-1]) if len(arrivals) else 0.0

    def finished(record: RequestRecord) -> None:
        with lock:
            records.append(record)
            count = len(records)
        if on_done is not None:
            on_done(count)

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="bench-open") as pool:
        for request, offset in zip(requests, arrivals):
            due = t0 + float(offset)
            while (now := time.monotonic()) < due:
                time.sleep(min(due - now, 0.05))
                if bar is not None:
                    bar.update(now - t0)
            pool.submit(_send_then, finished, target, request, names, due)
    # leaving the pool waits for every request to finish
    t1 = time.monotonic()
    if bar is not None:
        bar.update(total)
    after, _ = _snapshot(target)
    return PhaseRun(kind="open", records=records, window=(t0, t1), stats_before=before,
                    stats_after=after, stats_times=(t0, t1),
                    rate=len(requests) / total if total else 0.0, offered=len(requests))
