"""From raw phase records to the reported figures: throughput, percentiles, tier counters.

Closed loop: requests that *finished* inside the measured window count; req/s and tok/s are
their number and output tokens over the window. The server's own token counter over the same
window (``server_tokens_per_s``) is reported beside it as a cross-check. The window is also
cut into sub-windows; ``tokens_per_s_median`` / ``requests_per_s_median`` (the median
sub-window) is the headline figure: on a shared machine it discounts a burst of someone
else's load that lands in one sub-window, and every sub-window's figures are kept.
Open loop: every request counts; latency is from its scheduled arrival to the answer.
``latency_s`` is the client's end-to-end time; ``ttft_s`` the client's time to first token
(the engine's TTFT plus the time the engine did not see: waiting to be sent, transport both
ways — an upper bound by one return trip); ``server_ttft_s``, ``tpot_s`` and ``queue_s`` are
the engine's own (from the controller's receipt of the request).
Tier counters are deltas over the phase: ``slot_hit_rate`` = device-slot hits / admissions
with an adapter, ``slot_loads`` = host → device placements, ``adapter_loads`` = reads from
disk into the host cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lora_cluster.bench.runners import PhaseRun, RequestRecord, client_ttft

PERCENTILES = (50, 90, 99)


def percentiles(values: Iterable[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 and the mean (None when there are no values)."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {**{f"p{p}": None for p in PERCENTILES}, "mean": None}
    out: dict[str, float | None] = {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}
    out["mean"] = float(arr.mean())
    return out


def _tier(stats: dict[str, Any], tier: str, key: str) -> int:
    return int(stats.get("tiers", {}).get(tier, {}).get(key, 0))


def step_breakdown(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float] | None:
    """Mean ms per step between two ``stats()`` snapshots: the controller's planning, the
    round trip to the ranks, the output rank's own step (and of it, the host time until its
    forwards were issued), the rank's ridden adapter ops and inline reads, the whole step; and the share of
    steps that carried a prefill."""
    steps = int(after.get("steps", 0)) - int(before.get("steps", 0))
    if steps <= 0 or "step_total_us" not in after:
        return None

    def per_step(key: str) -> float:
        return (int(after.get(key, 0)) - int(before.get(key, 0))) / steps / 1e3

    return {"plan": per_step("step_plan_us"), "execute": per_step("step_execute_us"),
            "rank": per_step("step_rank_us"), "rank_launch": per_step("step_rank_launch_us"),
            "rank_ops": per_step("step_rank_ops_us"), "rank_reads": per_step("step_rank_reads_us"),
            "total": per_step("step_total_us"),
            "prefill_share": per_step("steps_with_prefill") * 1e3}


def rank_gc(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Per rank process: cyclic-GC collections by generation, their ms, and ms per step
    between two snapshots (None when the target has no rank processes)."""
    pairs = list(zip(before.get("rank_gc") or [], after.get("rank_gc") or []))
    if not pairs or any(a is None or b is None for a, b in pairs):
        return None
    steps = max(1, int(after.get("steps", 0)) - int(before.get("steps", 0)))
    out = []
    for a, b in pairs:
        ms = [y - x for x, y in zip(a["ms"], b["ms"])]
        out.append({"collections": [y - x for x, y in zip(a["collections"], b["collections"])],
                    "ms": [round(m, 3) for m in ms], "ms_per_step": sum(ms) / steps,
                    "max_ms": b["max_ms"], "thresholds": b["thresholds"]})
    return out


def rank_loop(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, float]] | None:
    """Per rank process, ms per step outside its commands: waiting for the next one (the
    controller was late), decoding commands and sending replies (None: no rank processes)."""
    pairs = list(zip(before.get("rank_loop") or [], after.get("rank_loop") or []))
    if not pairs or any(not a or not b for a, b in pairs):
        return None
    steps = max(1, int(after.get("steps", 0)) - int(before.get("steps", 0)))
    return [{k: (b[k] - a[k]) / steps for k in b} for a, b in pairs]


def tier_deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Slot hit rate and load counts between two ``stats()`` snapshots."""
    d = {f"{tier}_{key}": _tier(after, tier, key) - _tier(before, tier, key)
         for tier in ("device", "host") for key in ("hits", "misses", "evictions")}
    admissions = d["device_hits"] + d["device_misses"]
    return {
        "slot_hit_rate": d["device_hits"] / admissions if admissions else None,
        "slot_loads": d["device_misses"],
        "slot_evictions": d["device_evictions"],
        "adapter_loads": d["host_misses"],
        "host_evictions": d["host_evictions"],
        "steps": int(after.get("steps", 0)) - int(before.get("steps", 0)),
        # Adapter commands that rode on a step vs sent alone (a standalone command waits for
        # the step in flight), and steps after which the asynchronous pipeline ran dry.
        **{k: int(after.get(k, 0)) - int(before.get(k, 0)) for k in (
            "loads_on_step", "placements_on_step", "standalone_commands", "async_drains")},
        "step_breakdown_ms": step_breakdown(before, after),
        "rank_gc": rank_gc(before, after),
        "rank_loop_ms": rank_loop(before, after),
        "server_generated_tokens": (int(after.get("generated_tokens", 0))
                                    - int(before.get("generated_tokens", 0))),
    }


def _latency_block(records: Sequence[RequestRecord]) -> dict[str, Any]:
    return {
        "ttft_s": percentiles(client_ttft(r) for r in records),  # type: ignore[misc]
        "server_ttft_s": percentiles(r.server.get("ttft_s") for r in records),  # type: ignore[misc]
        "tpot_s": percentiles(r.server.get("tpot_s") for r in records),  # type: ignore[misc]
        "queue_s": percentiles(r.server.get("queue_s") for r in records),  # type: ignore[misc]
        "latency_s": percentiles(r.end - r.start for r in records),
    }


def _windows(run: PhaseRun, ok: Sequence[RequestRecord]) -> dict[str, Any]:
    """Per sub-window throughput (closed loop) and the median sub-window's."""
    rows = []
    for (before, t0), (after, t1) in zip(run.boundaries, run.boundaries[1:]):
        inside = [r for r in ok if t0 <= r.end <= t1]
        span = max(t1 - t0, 1e-9)
        served = int(after.get("generated_tokens", 0)) - int(before.get("generated_tokens", 0))
        rows.append({"duration_s": span, "requests_per_s": len(inside) / span,
                     "tokens_per_s": sum(r.output_tokens for r in inside) / span,
                     "server_tokens_per_s": served / span})
    if not rows:
        return {}
    median = sorted(rows, key=lambda w: w["tokens_per_s"])[(len(rows) - 1) // 2]
    return {"windows": rows, "tokens_per_s_median": median["tokens_per_s"],
            "requests_per_s_median": median["requests_per_s"]}


def headline(row: dict[str, Any]) -> float:
    """The figure tables, plots and goals use: the median sub-window where there is one."""
    return float(row.get("tokens_per_s_median", row["tokens_per_s"]))


def round_figures(n_row: dict[str, Any]) -> list[float]:
    """Headline tok/s of each closed-loop round of one adapter count (one without rounds)."""
    return [headline(c) for c in n_row.get("closed_rounds") or [n_row["closed"]]]


def engine_tok_s(n_row: dict[str, Any]) -> float:
    """One adapter count's closed-loop tok/s: the median over its rounds."""
    return float(np.median(round_figures(n_row)))


def paired_ratio(n_row: dict[str, Any], ref_row: dict[str, Any]) -> tuple[float, list[float]]:
    """(median, per-round) tok/s ratios of ``n_row`` to ``ref_row``, round k against round k.

    Rounds sweep every N in turn, so round k of both ran minutes apart at most: the host's
    drift between rounds (large on a shared VM) cancels in each ratio. Without rounds on both
    sides, the one ratio of their medians.
    """
    mine, ref = round_figures(n_row), round_figures(ref_row)
    if len(mine) != len(ref):
        mine, ref = [engine_tok_s(n_row)], [engine_tok_s(ref_row)]
    ratios = [m / r for m, r in zip(mine, ref, strict=True) if r > 0]
    return (float(np.median(ratios)) if ratios else float("nan")), ratios


def summarize(run: PhaseRun) -> dict[str, Any]:
    """The reported figures of one phase (see the module docstring)."""
    t0, t1 = run.window
    ok = [r for r in run.records if r.error is None]
    errors = [r.error for r in run.records if r.error is not None]
    counted = [r for r in ok if t0 <= r.end <= t1] if run.kind == "closed" else ok
    duration = max(t1 - t0, 1e-9)
    tokens = sum(r.output_tokens for r in counted)
    deltas = tier_deltas(run.stats_before, run.stats_after)
    s0, s1 = run.stats_times
    out: dict[str, Any] = {
        "kind": run.kind,
        "duration_s": duration,
        "requests": len(counted),
        "requests_per_s": len(counted) / duration,
        "output_tokens": tokens,
        "tokens_per_s": tokens / duration,
        "server_tokens_per_s": deltas["server_generated_tokens"] / max(s1 - s0, 1e-9),
        "mean_output_tokens": tokens / len(counted) if counted else None,
        "distinct_adapters": len({r.adapter for r in counted}),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        **_latency_block(counted),
        **deltas,
    }
    out["tokens_per_step"] = (deltas["server_generated_tokens"] / deltas["steps"]
                              if deltas["steps"] else None)
    # wall time per engine step over the window (prefill, decode and adapter loads together)
    out["step_ms"] = (s1 - s0) / deltas["steps"] * 1e3 if deltas["steps"] else None
    if run.kind == "closed":
        out["clients"] = run.clients
        out.update(_windows(run, ok))
    else:
        out["offered_requests"] = run.offered
        out["offered_rate"] = run.rate
    return out
