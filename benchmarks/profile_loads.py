"""Where an adapter load's time goes on the step path: the cpu-tiny preset in process.

Runs the bench's closed loop (48 clients, Zipf over N registered adapters) against one
in-process ``ControllerCore`` + ``LocalRankGroup`` (no Ray: controller and rank share one
GIL, so absolute step times are not the Ray figures; use it to see *which* functions grow
with N) with cProfile enabled on the step-loop thread and on the rank's reader thread, and
prints the top functions of each plus the controller's step breakdown and prefetch counters.

    .venv/bin/python benchmarks/profile_loads.py --adapters 10000 --duration 10   # ~40 s
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import time
from typing import Any

from lora_cluster.bench.assets import prepare_assets
from lora_cluster.bench.cli import DEFAULT_CACHE
from lora_cluster.bench.presets import PRESETS
from lora_cluster.bench.runners import run_closed_loop
from lora_cluster.bench.target import start_local
from lora_cluster.bench.workload import RequestStream


def _profiled(cls: Any, method: str, prof: cProfile.Profile) -> None:
    """Run ``cls.method`` under ``prof`` on whatever thread calls it."""
    real = getattr(cls, method)

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        prof.enable()
        try:
            return real(self, *args, **kwargs)
        finally:
            prof.disable()

    setattr(cls, method, wrapper)


def _top(prof: cProfile.Profile, n: int) -> str:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(n)
    return out.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=10_000)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--top", type=int, default=35)
    p.add_argument("--no-profile", action="store_true", help="only the step breakdown")
    args = p.parse_args()

    from lora_cluster.engine.controller_core import ControllerCore
    from lora_cluster.engine.read_ahead import ReadAhead

    gc_ms: dict[int, float] = {0: 0.0, 1: 0.0, 2: 0.0}
    gc_runs: dict[int, int] = {0: 0, 1: 0, 2: 0}
    started: list[float] = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            gc_ms[info["generation"]] += (time.perf_counter() - started[0]) * 1e3
            gc_runs[info["generation"]] += 1

    preset = PRESETS["cpu-tiny"]
    assets = prepare_assets(preset, DEFAULT_CACHE, args.adapters)
    loop_prof, read_prof = cProfile.Profile(), cProfile.Profile()
    if not args.no_profile:
        _profiled(ControllerCore, "_step", loop_prof)
        _profiled(ReadAhead, "_run", read_prof)
    core = start_local(preset.cluster_config(str(assets.model_dir)))
    try:
        names = assets.adapter_names(args.adapters)
        t = time.perf_counter()
        core.register_adapters(list(zip(names, map(str, assets.adapter_dirs), strict=True)))
        print(f"registered {args.adapters} in {time.perf_counter() - t:.1f} s")
        gc.callbacks.append(on_gc)
        run = run_closed_loop(core, RequestStream(preset.workload(args.adapters, 0)), names,
                              clients=preset.clients, warmup_s=args.warmup,
                              duration_s=args.duration)
        before, after = run.stats_before, run.stats_after
        def delta(key: str) -> float:
            return float(after.get(key, 0) - before.get(key, 0))

        steps = delta("steps")
        keys = ("step_plan_us", "step_execute_us", "step_rank_us", "step_total_us")
        seconds = run.window[1] - run.window[0]
        print(json.dumps({"steps": steps, "ms_per_step": {k: delta(k) / max(steps, 1) / 1e3
                                                          for k in keys},
                          "tokens_per_s": delta("generated_tokens") / seconds,
                          "gc_ms_by_generation (warm-up included)": gc_ms, "gc_runs": gc_runs,
                          "counters": {k: delta(k) for k in after if isinstance(after[k], int)
                                       and not isinstance(after[k], bool) and delta(k)},
                          "prefetch": after.get("prefetch"),
                          "read_ahead": core.group.stats()[0]["read_ahead"]}, indent=1))
    finally:
        core.shutdown()
    if not args.no_profile:
        print("==== step loop thread (ControllerCore._step, rank included: in process)")
        print(_top(loop_prof, args.top))
        if read_prof.getstats():
            print("==== rank reader thread (ReadAhead._run)")
            print(_top(read_prof, args.top // 2))
        else:  # CPU ranks read inline, inside the step: its read and placement functions
            print("==== inline reads and slot writes (within the step loop above)")
            out = io.StringIO()
            pstats.Stats(loop_prof, stream=out).sort_stats("cumulative").print_stats(
                r"\((_read|_load|_place|load_adapter|inspect|slot_ready|pack_slot_ready|prepare|"
                r"activate|_planned|_plan|replay|run)\)$")
            print(out.getvalue())


if __name__ == "__main__":
    main()
