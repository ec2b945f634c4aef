"""Closed-loop throughput with asynchronous steps on vs off (``ClusterConfig.async_steps``).

Rounds alternate the two settings on fresh engines (off, on, off, on, ...) so that a shared
host's load drifts over both alike; each round registers N adapters, warms up, and measures
one closed-loop window. Prints a line per round (tokens/s, ms per step and its breakdown,
load average) and the median per setting; ``--out`` writes the JSON.

CPU:  .venv/bin/python benchmarks/async_steps.py --preset cpu-tiny --backend ray \\
          --adapters 5 --max-num-seqs 128 --clients 160 --rounds 3
GPU (Ray staged, see benchmarks/e2e_gpu.sh):  bash benchmarks/e2e_gpu.sh async-ab
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from lora_cluster.bench.assets import adapter_name, prepare_assets
from lora_cluster.bench.machine import load_average, machine_info
from lora_cluster.bench.metrics import step_breakdown, summarize
from lora_cluster.bench.presets import get_preset
from lora_cluster.bench.runners import run_closed_loop
from lora_cluster.bench.target import open_target
from lora_cluster.bench.workload import RequestStream


def one_round(preset: Any, assets: Any, n: int, backend: str, async_steps: bool,
              warmup_s: float, duration_s: float, seed: int) -> dict[str, Any]:
    cfg = preset.cluster_config(str(assets.model_dir), async_steps=async_steps)
    names = assets.adapter_names(n)
    load_before = load_average()
    with open_target(cfg, backend) as target:  # type: ignore[arg-type]
        target.register_adapters([(adapter_name(i), str(assets.adapter_dirs[i]))
                                  for i in range(n)])
        run = run_closed_loop(target, RequestStream(preset.workload(n, seed)), names,
                              clients=preset.clients, warmup_s=warmup_s, duration_s=duration_s)
        summary = summarize(run)
        stats = target.stats()
    return {"async_steps": async_steps, "engine_async": bool(stats.get("async_steps")),
            "tokens_per_s": summary["tokens_per_s"], "requests_per_s": summary["requests_per_s"],
            "step_ms": summary["step_ms"], "tokens_per_step": summary["tokens_per_step"],
            "breakdown_ms": step_breakdown(run.stats_before, run.stats_after),
            "tokens_discarded": int(stats.get("tokens_discarded", 0)),
            "errors": summary["errors"], "load_average_before": load_before,
            "load_average_after": load_average()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu-tiny")
    ap.add_argument("--backend", default="ray", choices=("ray", "local"))
    ap.add_argument("--adapters", type=int, default=5)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per setting")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "lora_cluster_bench"))
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()
    preset = get_preset(args.preset)
    changes: dict[str, Any] = {}
    if args.max_num_seqs:
        changes["max_num_seqs"] = args.max_num_seqs
    if args.clients:
        changes["clients"] = args.clients
    preset = preset.replace(**changes) if changes else preset
    if preset.device == "cpu" and preset.cpu_threads:
        import torch

        torch.set_num_threads(preset.cpu_threads)  # the in-process engine (--backend local)
    assets = prepare_assets(preset, args.cache_dir, args.adapters)
    rounds = []
    for r in range(args.rounds):
        for mode in (False, True):
            got = one_round(preset, assets, args.adapters, args.backend, mode, args.warmup,
                            args.duration, args.seed + r)
            got["round"] = r
            rounds.append(got)
            b = got["breakdown_ms"] or {}
            print(f"round {r} async={mode!s:5} {got['tokens_per_s']:8.1f} tok/s  "
                  f"step {got['step_ms'] or 0:6.2f} ms (plan {b.get('plan', 0):.2f}, "
                  f"wait {b.get('execute', 0):.2f}, rank {b.get('rank', 0):.2f})  "
                  f"discarded {got['tokens_discarded']}  load {got['load_average_before']} → "
                  f"{got['load_average_after']}", flush=True)
    medians = {str(mode): statistics.median(x["tokens_per_s"] for x in rounds
                                            if x["async_steps"] is mode) for mode in (False, True)}
    print(f"median tok/s: off {medians['False']:.1f}  on {medians['True']:.1f}  "
          f"ratio {medians['True'] / medians['False']:.3f}")
    result = {"what": "closed-loop tokens/s, async_steps off vs on, interleaved rounds",
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(),
              "preset": preset.name, "backend": args.backend, "adapters": args.adapters,
              "max_num_seqs": preset.max_num_seqs, "clients": preset.clients,
              "warmup_s": args.warmup, "duration_s": args.duration, "rounds": rounds,
              "median_tokens_per_s": medians,
              "ratio_on_vs_off": medians["True"] / medians["False"]}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
