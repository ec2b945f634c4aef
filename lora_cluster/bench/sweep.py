"""The whole benchmark: the engine over every adapter count, decode step time, HF baselines.

Order matters on one device: the engine sweep (one cluster, adapters registered cumulatively
as N grows: 1 → 5 → … → 10,000, a warm-up before each measurement), then the in-process
step-time run, then the HF baselines (merged weights first, on the plain model; then PEFT,
which wraps it). Each part frees its device memory before the next starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cluster.bench.assets import BenchAssets, adapter_name, prepare_assets
from lora_cluster.bench.goals import evaluate_goals
from lora_cluster.bench.machine import load_average, machine_info
from lora_cluster.bench.metrics import percentiles, summarize
from lora_cluster.bench.presets import BenchPreset
from lora_cluster.bench.progress import ProgressBar
from lora_cluster.bench.runners import run_closed_loop, run_open_loop
from lora_cluster.bench.target import Backend, open_target
from lora_cluster.bench.workload import RequestStream, poisson_arrivals
from lora_cluster.errors import ConfigError

PARTS = ("engine", "steptime", "merged", "peft")
_REGISTER_CHUNK = 1000
_EAGER_SAMPLE = 32  # adapters timed through load_adapter (eager) after the sweep


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """One benchmark run: a preset, the adapter counts, which parts, where files go."""

    preset: BenchPreset
    adapter_counts: tuple[int, ...]
    cache_dir: Path
    backend: Backend = "ray"
    parts: tuple[str, ...] = PARTS
    rate: float | None = None  # open-loop requests/s; None: the preset's (see BenchPreset)
    seed: int = 0
    # Closed-loop rounds: after the first sweep (closed + open loop at every N), rounds - 1
    # more closed loops at every N in the same order on the same cluster; ratios between
    # adapter counts are then paired round by round (``metrics.paired_ratio``).
    rounds: int = 1
    show_progress: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.parts) - set(PARTS)
        if unknown or not self.parts:
            raise ConfigError(f"parts: choose from {', '.join(PARTS)}, got {list(self.parts)}",
                              field="parts")
        if not self.adapter_counts or min(self.adapter_counts) < 1:
            raise ConfigError(f"adapters: need counts >= 1, got {list(self.adapter_counts)}",
                              field="adapters")
        if self.rounds < 1:
            raise ConfigError(f"rounds: need >= 1, got {self.rounds}", field="rounds")
        if self.rate is not None and not self.rate > 0:
            raise ConfigError(f"rate: must be > 0 requests/s, got {self.rate}", field="rate")


@dataclass
class _Log:
    """Timestamps of the run's phases, and the load average around them (noise indicator)."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def mark(self, what: str) -> None:
        self.events.append({"what": what, "t": time.time(), "load_average": load_average()})


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Run the selected parts; returns the JSON-ready result (see ``report`` for its layout)."""
    import torch

    threads = torch.get_num_threads()
    if opts.preset.device == "cpu" and opts.preset.cpu_threads:
        torch.set_num_threads(opts.preset.cpu_threads)  # in-process engine, step time, baselines
    try:
        return _run_parts(opts)
    finally:
        torch.set_num_threads(threads)


def _run_parts(opts: BenchOptions) -> dict[str, Any]:
    preset, counts = opts.preset, tuple(sorted(set(opts.adapter_counts)))
    log = _Log()
    log.mark("start")
    need = max(max(counts), preset.step_seqs if "steptime" in opts.parts else 1)
    with ProgressBar("writing model and adapters", need, enabled=opts.show_progress) as bar:
        assets = prepare_assets(preset, opts.cache_dir, need, progress=lambda d, t: bar.update(d))
    result: dict[str, Any] = {
        "preset": preset.name, "description": preset.description, "command": opts.command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(),
        "backend": opts.backend, "seed": opts.seed, "adapter_counts": list(counts),
        "rounds": opts.rounds,
        "settings": _settings(preset, assets),
    }
    if "engine" in opts.parts:
        log.mark("engine")
        result["engine"] = run_engine_sweep(opts, assets, counts)
    if "steptime" in opts.parts:
        log.mark("steptime")
        from lora_cluster.bench.steptime import measure_decode_steps

        with ProgressBar("decode step time (3 modes)", 1, enabled=opts.show_progress):
            result["step_time"] = measure_decode_steps(
                preset.cluster_config(str(assets.model_dir)), assets.adapter_dirs,
                num_seqs=preset.step_seqs, decode_tokens=preset.step_decode_tokens)
    if {"merged", "peft"} & set(opts.parts):
        log.mark("baselines")
        from lora_cluster.bench.baseline_sweep import run_hf_baselines

        result["baselines"] = run_hf_baselines(opts, assets, counts)
    log.mark("end")
    result["log"] = log.events
    result["goals"] = evaluate_goals(result)
    return result


def _settings(preset: BenchPreset, assets: BenchAssets) -> dict[str, Any]:
    cfg = preset.cluster_config(str(assets.model_dir))
    return {
        "model": {k: getattr(preset.model, k) for k in (
            "family", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size", "vocab_size")},
        "model_dtype": preset.model_dtype, "device": preset.device, "dtype": preset.dtype,
        "adapter_rank": preset.adapter_rank, "adapter_targets": list(preset.adapter_targets),
        "max_loras": cfg.max_loras, "max_cpu_loras": cfg.max_cpu_loras,
        "max_num_seqs": cfg.max_num_seqs, "clients": preset.clients,
        "cpu_threads": preset.cpu_threads if preset.device == "cpu" else None,
        "prompt_len": list(preset.prompt_len), "output_len": list(preset.output_len),
        "zipf_alpha": 1.0, "warmup_s": preset.warmup_s,
        "initial_warmup_s": preset.initial_warmup_s, "duration_s": preset.duration_s,
        "windows": preset.windows,
        "open_duration_s": preset.open_duration_s,
        "baseline_duration_s": preset.baseline_duration_s, "asset_dir": str(assets.root),
    }


def _register(target: Any, assets: BenchAssets, start: int, stop: int,
              bar: ProgressBar) -> list[float]:
    """Register adapters [start, stop) in chunks; seconds per chunk call."""
    times = []
    for lo in range(start, stop, _REGISTER_CHUNK):
        hi = min(stop, lo + _REGISTER_CHUNK)
        t = time.perf_counter()
        target.register_adapters([(adapter_name(i), str(assets.adapter_dirs[i]))
                                  for i in range(lo, hi)])
        times.append(time.perf_counter() - t)
        bar.update(hi, note=f"registering {hi:,}/{stop:,}")
    return times


def run_engine_sweep(opts: BenchOptions, assets: BenchAssets,
                     counts: tuple[int, ...]) -> dict[str, Any]:
    """Closed loop then open loop at every N, on one cluster; registration and load costs."""
    preset = opts.preset
    names = assets.adapter_names(max(counts))
    by_n: dict[str, Any] = {}
    # One closed-loop stream per N, continued by every round: a round draws new requests
    # (new cold adapters at large N), not a replay of the first round's.
    streams: dict[int, RequestStream] = {}
    registration: dict[str, Any] = {"register_s": 0.0, "registered": 0}
    rate = opts.rate if opts.rate is not None else preset.open_rate
    cfg = preset.cluster_config(str(assets.model_dir))
    starting = ProgressBar(f"starting the engine ({opts.backend})", 1, enabled=opts.show_progress)
    with open_target(cfg, opts.backend) as target:
        starting.close()
        done = 0
        if preset.initial_warmup_s > 0:
            _initial_warmup(target, assets, opts, counts[0])
            done = counts[0]
        for n in counts:
            label = f"N={n:,}"
            with ProgressBar(f"{label:>9} register", n, enabled=opts.show_progress) as bar:
                chunks = _register(target, assets, done, n, bar)
            registration["register_s"] += sum(chunks)
            registration["registered"] = n
            done = n
            streams[n] = RequestStream(preset.workload(n, opts.seed))
            closed = _closed_loop(target, opts, streams[n], names, label)
            if rate is None:
                rate = preset.rate_fraction * closed["requests_per_s_median"]
            count = max(1, round(rate * preset.open_duration_s))
            requests = RequestStream(preset.workload(n, opts.seed + 1)).take_many(count)
            arrivals = poisson_arrivals(rate, count, seed=opts.seed)
            with ProgressBar(f"{label:>9} open loop", float(arrivals[-1]),
                             enabled=opts.show_progress, unit="s") as bar:
                opened = summarize(run_open_loop(
                    target, requests, arrivals, names,
                    max_in_flight=_max_in_flight(preset), bar=bar))
                opened["rate"] = rate
                p99 = opened["ttft_s"]["p99"]
                bar.note = f"TTFT p99 {p99 * 1e3:.0f} ms" if p99 is not None else ""
            by_n[str(n)] = {"adapters": n, "closed": closed, "open": opened,
                            "closed_rounds": [closed]}
        for k in range(2, opts.rounds + 1):
            for n in counts:
                by_n[str(n)]["closed_rounds"].append(
                    _closed_loop(target, opts, streams[n], names, f"N={n:,} r{k}"))
        registration.update(_registration_costs(target, assets, registration, done))
    return {"by_adapters": by_n, "registration": registration, "open_loop_rate": rate}


def _closed_loop(target: Any, opts: BenchOptions, stream: RequestStream, names: list[str],
                 label: str) -> dict[str, Any]:
    """One closed-loop phase on ``stream`` (warm-up, then the measured sub-windows)."""
    preset = opts.preset
    with ProgressBar(f"{label:>9} closed loop", preset.warmup_s + preset.duration_s,
                     enabled=opts.show_progress, unit="s") as bar:
        closed = summarize(run_closed_loop(
            target, stream, names,
            clients=preset.clients, warmup_s=preset.warmup_s,
            duration_s=preset.duration_s, windows=preset.windows, bar=bar))
        bar.note = f"{closed['requests_per_s']:.1f} req/s"
    return closed


def _initial_warmup(target: Any, assets: BenchAssets, opts: BenchOptions, n: int) -> None:
    """Run the first N's workload once, unmeasured, for ``initial_warmup_s``."""
    preset = opts.preset
    target.register_adapters([(adapter_name(i), str(assets.adapter_dirs[i])) for i in range(n)])
    with ProgressBar("warming up (kernel compiles, caches)", preset.initial_warmup_s,
                     enabled=opts.show_progress, unit="s") as bar:
        run_closed_loop(target, RequestStream(preset.workload(n, opts.seed + 7)),
                        assets.adapter_names(n), clients=preset.clients,
                        warmup_s=preset.initial_warmup_s, duration_s=0.0, bar=bar)


def _max_in_flight(preset: BenchPreset) -> int:
    """Open-loop client threads: enough that arrivals are sent on time even when the engine
    queues a full batch's worth, within the controller actor's concurrency (see handle.py)."""
    return 2 * preset.max_num_seqs + 8


def _registration_costs(target: Any, assets: BenchAssets, registration: dict[str, Any],
                        registered: int) -> dict[str, Any]:
    """Per-adapter cost of lazy registration (measured over the sweep) and of an eager
    ``load_adapter`` (read into the host cache), timed on fresh copies of a few adapters."""
    per_lazy = registration["register_s"] / max(registered, 1)
    eager = []
    for i in range(min(_EAGER_SAMPLE, len(assets.adapter_dirs))):
        t = time.perf_counter()
        target.load_adapter(f"eager-{i}", str(assets.adapter_dirs[i]))
        eager.append(time.perf_counter() - t)
    out: dict[str, Any] = {"register_ms_per_adapter": per_lazy * 1e3,
                           "load_adapter_ms": percentiles(x * 1e3 for x in eager)}
    mean = out["load_adapter_ms"]["mean"]
    if mean is not None:
        out["eager_10000_estimate_s"] = mean / 1e3 * 10_000
    return out
