"""A CPU rank's per-adapter costs at 10,000 adapters, isolated: read, placement, and what
they cost the next forward.

On the cpu-tiny preset (one torch thread, one in-process rank, no controller) it times
``RankRuntime._read`` (recipe hits after the first adapter: file reads, gather into the
slot-ready page, slot plan) and ``SlotActivator.activate`` (a placement) with warm caches
and with a cold cache (a 32 MB buffer touched between operations, as a forward does), then a
32-sequence decode forward alone and right after a read + placement. Medians over
``--reads`` distinct adapters; prints a table and writes JSON.

    .venv/bin/python benchmarks/rank_reads.py [--reads 600] [--out benchmarks/results/rank_reads_cpu.json]

To compare two trees, run it from each with ``PYTHONPATH=<tree>:<tree>/kernels``,
alternating. The figures depend on the host's state: compare runs made back to back.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_cluster.bench.assets import prepare_assets
from lora_cluster.bench.cli import DEFAULT_CACHE
from lora_cluster.bench.presets import PRESETS

ADAPTERS = 10_000


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reads", type=int, default=600, help="distinct adapters per phase")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: none)")
    args = p.parse_args()
    torch.set_num_threads(1)
    random.seed(0)

    from lora_cluster.engine.messages import SeqStep
    from lora_cluster.engine.rank_group import LocalRankGroup
    from lora_cluster.engine.step_executors import build_batch

    preset = PRESETS["cpu-tiny"]
    assets = prepare_assets(preset, DEFAULT_CACHE, ADAPTERS)
    config = preset.cluster_config(str(assets.model_dir)).resolved(cuda_available=False)
    group = LocalRankGroup(config)
    rt: Any = group.runtime
    names = assets.adapter_names(ADAPTERS)
    dirs = list(map(str, assets.adapter_dirs))
    n = args.reads
    if 3 * n + 100 > ADAPTERS:
        raise SystemExit(f"--reads {n}: at most {(ADAPTERS - 100) // 3}")
    junk = torch.randn(8 << 20)  # 32 MB: touched to leave the caches cold

    def pollute() -> None:
        junk.mul_(1.0000001)

    # The first read of the structure goes the general way and teaches the recipe.
    warm_up = [rt._read(dirs[i], names[i], 1)[0] for i in range(64)]
    for slot in range(32):
        rt.activator.activate(slot, warm_up[slot])

    def phase(first: int, cold: bool) -> dict[str, float]:
        reads, places = [], []
        for i in range(first, first + n):
            if cold:
                pollute()
            t0 = time.perf_counter()
            weights, _ = rt._read(dirs[i], names[i], 1)
            t1 = time.perf_counter()
            if cold:
                pollute()
            t2 = time.perf_counter()
            rt.activator.activate(i % 32, weights)
            t3 = time.perf_counter()
            reads.append(t1 - t0)
            places.append(t3 - t2)
        return {"read_ms": _median_ms(reads), "place_ms": _median_ms(places)}

    warm = phase(100, cold=False)
    cold = phase(100 + n, cold=True)

    model, kv = rt.activator.model, rt.kv_cache
    seqs = [SeqStep(seq_id=i, token_ids=(5,), start_pos=30, slot=random.randrange(32))
            for i in range(32)]
    tables = [[2 * i, 2 * i + 1, 64 + i] for i in range(32)]
    batch, _ = build_batch(seqs, tables, block_size=rt.runner.block_size,
                           device=torch.device("cpu"))

    def forward() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.forward(batch, kv)
        return time.perf_counter() - t0

    nxt = [100 + 2 * n]

    def read_and_place(i: int) -> None:
        weights, _ = rt._read(dirs[nxt[0]], names[nxt[0]], 1)
        nxt[0] += 1
        rt.activator.activate(i % 32, weights)

    def forwards(before: Callable[[int], None] | None) -> float:
        out = []
        for i in range(n // 2):
            if before is not None:
                before(i)
            out.append(forward())
        return _median_ms(out)

    forwards(None)  # warm-up
    plain = [forwards(None), forwards(None)]
    after = [forwards(read_and_place), forwards(read_and_place)]
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "reads": n,
        "warm": warm, "cold": cold,
        "forward_ms": statistics.median(plain),
        "forward_after_read_place_ms": statistics.median(after),
    }
    result["forward_penalty_ms"] = (result["forward_after_read_place_ms"]
                                    - result["forward_ms"])
    print(f"cpu-tiny rank, {n} distinct adapters per phase (medians, ms)")
    print(f"{'':24} {'warm':>8} {'cold':>8}")
    print(f"{'read + pack + plan':24} {warm['read_ms']:8.3f} {cold['read_ms']:8.3f}")
    print(f"{'placement':24} {warm['place_ms']:8.3f} {cold['place_ms']:8.3f}")
    print(f"decode forward (32 seqs) {result['forward_ms']:.3f}; right after a read + placement "
          f"{result['forward_after_read_place_ms']:.3f} "
          f"(+{result['forward_penalty_ms']:.3f})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
