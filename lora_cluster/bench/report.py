"""Tables, JSON and the PNG plot of a benchmark result; merging partial runs into one result.

Result layout (JSON): ``preset``, ``machine``, ``command``, ``settings``, ``adapter_counts``,
``engine.by_adapters[N].{closed,open}`` (see ``metrics.summarize``), ``engine.registration``,
``step_time`` (see ``steptime``), ``baselines.{merged,peft}[N]`` (figures or ``skipped``),
``goals`` (see ``goals``). matplotlib is optional (the ``bench`` extra): without it the PNG
is skipped and the reason returned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_cluster.bench.goals import baseline_tok_s, evaluate_goals
from lora_cluster.bench.machine import machine_name
from lora_cluster.bench.metrics import engine_tok_s, headline, paired_ratio, round_figures
from lora_cluster.cli_format import format_table

_SECTIONS = ("engine", "step_time", "baselines")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _num(value: float | None, fmt: str = "{:,.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _baseline_cell(result: dict[str, Any], kind: str, n: int) -> str:
    row = result.get("baselines", {}).get(kind, {}).get(str(n))
    if row is None:
        return "-"
    if "skipped" in row:
        return "skip"
    return f"{headline(row):,.0f}"


def _req_s(n_row: dict[str, Any]) -> float:
    """Closed-loop requests/s of one N: the median over its rounds' median sub-windows."""
    rounds = n_row.get("closed_rounds") or [n_row["closed"]]
    figures = sorted(float(c.get("requests_per_s_median", c["requests_per_s"])) for c in rounds)
    mid = len(figures) // 2
    return figures[mid] if len(figures) % 2 else (figures[mid - 1] + figures[mid]) / 2


def round_lines(result: dict[str, Any]) -> list[str]:
    """Per-round tok/s and ratio to N = 5 of every N, where the sweep ran rounds."""
    by_n = result.get("engine", {}).get("by_adapters", {})
    ref = by_n.get("5")
    lines = []
    for n in result.get("adapter_counts", []):
        row = by_n.get(str(n))
        if row is None or len(row.get("closed_rounds") or ()) < 2:
            continue
        figures = ", ".join(f"{v:,.0f}" for v in round_figures(row))
        ratios = paired_ratio(row, ref)[1] if ref is not None and n != 5 else []
        vs = f" (vs N=5: {', '.join(f'{r:.0%}' for r in ratios)})" if ratios else ""
        lines.append(f"  N={n:,}: {figures} tok/s{vs}")
    if lines:
        lines.insert(0, "closed-loop rounds (each sweeps every N in turn; tok/s and vs N=5 "
                        "above are medians over rounds, the ratio paired round by round):")
    return lines


def engine_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per adapter count: throughput, open-loop latency, tiers, baselines."""
    by_n = result.get("engine", {}).get("by_adapters", {})
    ref = by_n.get("5")
    headers = ["N", "req/s", "tok/s", "vs N=5", "tok/step", "step ms", "rank ms", "TTFT p50/p90/p99 ms",
               "TPOT p50/p90/p99 ms", "e2e p99 ms", "slot hit", "disk loads", "PEFT tok/s",
               "merged tok/s", "× PEFT"]
    rows = []
    for n in result.get("adapter_counts", []):
        row = by_n.get(str(n))
        if row is None:
            continue
        c, o = row["closed"], row["open"]
        peft = baseline_tok_s(result, "peft", n)
        tok_s = engine_tok_s(row)
        rows.append([
            f"{n:,}", _num(_req_s(row)),
            _num(tok_s, "{:,.0f}"), _num(paired_ratio(row, ref)[0] if ref else None, "{:.0%}"),
            _num(c.get("tokens_per_step"), "{:.0f}"), _num(c.get("step_ms"), "{:.1f}"),
            _num((c.get("step_breakdown_ms") or {}).get("rank"), "{:.1f}"),
            "/".join(_ms(o["ttft_s"][p]) for p in ("p50", "p90", "p99")),
            "/".join(_ms(o["tpot_s"][p]) for p in ("p50", "p90", "p99")),
            _ms(o["latency_s"]["p99"]),
            _num(c["slot_hit_rate"], "{:.0%}"), f"{c['adapter_loads']:,}",
            _baseline_cell(result, "peft", n), _baseline_cell(result, "merged", n),
            _num(tok_s / peft if peft else None, "{:.1f}×"),
        ])
    return headers, rows


def format_report(result: dict[str, Any]) -> str:
    """The human-readable report: machine, engine table, registration, step time, goals."""
    lines = [f"lora-cluster bench — preset {result['preset']} ({result.get('backend')}) on "
             f"{machine_name(result.get('machine', {}))}"]
    engine = result.get("engine")
    if engine:
        rate = engine.get("open_loop_rate")
        lines += ["", f"closed loop: {result['settings']['clients']} clients, "
                      f"{result['settings']['duration_s']:.0f} s (req/s, tok/s: the median of "
                      f"{result['settings'].get('windows', 1)} sub-windows; baselines: the median "
                      f"batch); open loop: Poisson "
                      f"{_num(rate, '{:.1f}')} req/s (TTFT as the client sees it, TPOT the "
                      f"engine's, e2e from arrival)",
                  format_table(*engine_rows(result)), *round_lines(result)]
        reg = engine.get("registration", {})
        if reg:
            lines += ["", f"registration: {reg.get('registered', 0):,} adapters in "
                          f"{reg.get('register_s', 0):.1f} s "
                          f"({_num(reg.get('register_ms_per_adapter'), '{:.2f}')} ms each, "
                          f"lazy: loaded on first use); eager load_adapter "
                          f"{_num(reg.get('load_adapter_ms', {}).get('p50'), '{:.1f}')} ms "
                          f"median (10,000 eagerly ≈ "
                          f"{_num(reg.get('eager_10000_estimate_s'), '{:.0f}')} s)"]
    step = result.get("step_time")
    if step:
        modes = step["modes"]
        rows = [[m, f"{v['forward_ms']['median']:.2f}", f"{v['forward_ms']['p90']:.2f}",
                 f"{v['wall_ms']['median']:.2f}", ",".join(map(str, v["distinct_slots"]))]
                for m, v in modes.items()]
        lines += ["", f"decode step, {step['num_seqs']} sequences ({step['device']}): "
                      f"distinct/one = {step['ratio_distinct_vs_one']:.2f}×",
                  format_table(["mode", "forward ms p50", "p90", "wall ms p50",
                                "distinct slots"], rows)]
    goals = result.get("goals") or evaluate_goals(result)
    rows = [[name, _num(g["value"], "{:.2f}"), f"{g['rule']} {g['target']}",
             {True: "met", False: "MISSED", None: "not measured"}[g["met"]], g["note"]]
            for name, g in goals.items()]
    lines += ["", format_table(["goal", "value", "target", "verdict", "what"], rows, 70)]
    return "\n".join(lines)


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new``'s parts laid over ``old`` (same preset): for split runs on a time-limited machine."""
    if old.get("preset") != new.get("preset"):
        raise ValueError(f"cannot merge results of presets {old.get('preset')!r} and "
                         f"{new.get('preset')!r}")
    merged = dict(old)
    for key, value in new.items():
        if key == "baselines":
            merged["baselines"] = {**old.get("baselines", {}), **value}
        elif key not in _SECTIONS or value:
            merged[key] = value
    counts = set(old.get("adapter_counts", [])) | set(new.get("adapter_counts", []))
    merged["adapter_counts"] = sorted(counts)
    merged["commands"] = [*old.get("commands", [old.get("command", "")]), new.get("command", "")]
    merged["goals"] = evaluate_goals(merged)
    return merged


def write_json(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=True, default=float) + "\n")
    return path


def plot(result: dict[str, Any], path: Path) -> str | None:
    """Throughput and p99 latency against N (PNG); the reason when it cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'lora-cluster[bench]'): no PNG"
    by_n = result.get("engine", {}).get("by_adapters", {})
    counts = [n for n in result.get("adapter_counts", []) if str(n) in by_n]
    if not counts:
        return "no engine results to plot"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(counts, [engine_tok_s(by_n[str(n)]) for n in counts], "o-",
             label="lora_cluster")
    for kind, style in (("peft", "s--"), ("merged", "^:")):
        pts = [(n, v) for n in counts if (v := baseline_tok_s(result, kind, n)) is not None]
        if pts:
            ax1.plot(*zip(*pts), style, label=f"HF {kind}")
    ax1.set(xscale="log", yscale="log", xlabel="registered adapters N (Zipf α=1)",
            ylabel="output tokens/s (closed loop)", title="Throughput")
    for key, label in (("ttft_s", "TTFT p99"), ("tpot_s", "TPOT p99"), ("latency_s", "e2e p99")):
        vals = [(n, v * 1e3) for n in counts if (v := by_n[str(n)]["open"][key]["p99"]) is not None]
        if vals:
            ax2.plot(*zip(*vals), "o-", label=label)
    rate = result.get("engine", {}).get("open_loop_rate")
    ax2.set(xscale="log", yscale="log", xlabel="registered adapters N (Zipf α=1)", ylabel="ms",
            title=f"p99 latency, open loop at {rate or 0:.1f} req/s")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['preset']} on {machine_name(result.get('machine', {}))}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
