"""Mixed step time: decodes + new prompts' prefills as one eager forward vs split (decode rows
replayed from the CUDA graphs, prefill rows in a second forward), beside a pure decode step
and a prefill alone; the prefill forwards eager ("-eager") or replayed from the prefill
graphs ("-graph").

Run (GPU, no Ray):   PYTHONPATH=$PWD:$PWD/kernels python3 benchmarks/split_steps.py
                     [--decodes 120 --prompts 1,2,4,8,16 --prompt-len 128 --iters 20]
Dry run (CPU, tiny): .venv/bin/python benchmarks/split_steps.py --dry-run
                     (every code path on the cpu-tiny preset, EagerDecode and EagerPrefill
                     as the executors)

Model: the ``h100-moe`` bench preset (Qwen3-30B-A3B-like, 4 layers, bf16 random weights,
written under ``--cache-dir`` on first use), rank-16 attention adapters in ``--adapters``
slots, a quarter of the rows base-only. Decode rows sit at context ``--context``. Step time
is the rank's wall time for ``execute`` (the sampler's copy to the host synchronises).
Prints one line per (mode, prompts): median and p90 ms, and the amortized ms per step of
holding prompts for k decode steps (prefill batching): (k·decode + split) / (k + 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lora_cluster.bench.assets import prepare_assets
from lora_cluster.bench.presets import get_preset
from lora_cluster.engine.messages import (
    LoadAdapter,
    PlaceAdapter,
    SampleSpec,
    SeqStep,
    Step,
    StepPlan,
)
from lora_cluster.engine.rank_runtime import RankRuntime
from lora_cluster.model.parallel import LocalComm, ParallelInfo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--decodes", type=int, default=120)
    ap.add_argument("--prompts", default="1,2,4,8,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--context", type=int, default=160)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "lora_cluster_bench"))
    ap.add_argument("--out", default=None, help="JSON results (default: print only)")
    args = ap.parse_args()
    prompts = [int(p) for p in args.prompts.split(",")]
    if args.dry_run:
        preset = get_preset("cpu-tiny")
        args.decodes, prompts, args.prompt_len = 10, [1, 2], 12
        args.context, args.adapters, args.iters = 20, 4, 2
    else:
        preset = get_preset("h100-moe")
    assets = prepare_assets(preset, args.cache_dir, args.adapters)
    cfg = preset.cluster_config(str(assets.model_dir), max_num_seqs=args.decodes + max(prompts),
                                max_loras=args.adapters, max_model_len=args.context + args.prompt_len)
    rt = RankRuntime(cfg, ParallelInfo(), LocalComm())
    runner = rt.runner
    if args.dry_run:
        runner.use_eager_decode()
        runner.use_eager_prefill(buckets=(16, 32))
    prefill = runner.prefill
    cmd = 0
    for i, path in enumerate(assets.adapter_dirs):
        rt.execute(LoadAdapter(seq=cmd, name=f"a{i}", version=1, path=str(path)))
        rt.execute(PlaceAdapter(seq=cmd + 1, name=f"a{i}", version=1, slot=i))
        cmd += 2
    bs = cfg.block_size
    next_block = iter(range(rt.num_kv_blocks))
    gen = torch.Generator().manual_seed(0)
    top = min(1000, preset.model.vocab_size)

    def blocks(n_tokens: int) -> tuple[int, ...]:
        return tuple(next(next_block) for _ in range(-(-n_tokens // bs)))

    def slot(i: int) -> int:
        return -1 if i % 4 == 3 else i % args.adapters

    decodes = [SeqStep(seq_id=i, token_ids=(int(torch.randint(4, top, (1,), generator=gen)),),
                       start_pos=args.context - 1, new_blocks=blocks(args.context), slot=slot(i),
                       sample=SampleSpec()) for i in range(args.decodes)]
    fresh = [SeqStep(seq_id=10_000 + j,
                     token_ids=tuple(torch.randint(4, top, (args.prompt_len,), generator=gen).tolist()),
                     start_pos=0, new_blocks=blocks(args.prompt_len), slot=slot(j),
                     sample=SampleSpec()) for j in range(max(prompts))]

    def timed(plan: StepPlan, split: bool, graphs: bool = False) -> list[float]:
        nonlocal cmd
        runner.split_mixed = split
        runner.prefill = prefill if graphs else None
        out = []
        for it in range(args.iters + 3):  # 3 warm-ups: prefill shapes compile kernels
            cmd += 1
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            rt.execute(Step(seq=cmd, plan=plan))
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            if it >= 3:
                out.append((time.perf_counter() - start) * 1e3)
        return out

    rows: list[dict[str, object]] = []

    def report(mode: str, n: int, ms: list[float]) -> float:
        med = statistics.median(ms)
        p90 = sorted(ms)[min(len(ms) - 1, int(0.9 * len(ms)))]
        rows.append({"mode": mode, "prompts": n, "median_ms": med, "p90_ms": p90})
        print(f"{mode:>14} prompts={n:<3} median {med:8.2f} ms   p90 {p90:8.2f} ms", flush=True)
        return med

    print(f"device {rt.device} · {args.decodes} decodes at context {args.context} · prompts of "
          f"{args.prompt_len} tokens · {args.adapters} adapters")
    decode_ms = report("decode", 0, timed(StepPlan(seqs=tuple(decodes)), True))
    for n in prompts:
        mixed = StepPlan(seqs=tuple(decodes) + tuple(fresh[:n]))
        alone = StepPlan(seqs=tuple(fresh[:n]))
        report("prefill-eager", n, timed(alone, False))
        if prefill is not None and prefill.bucket_for(alone.seqs) is not None:
            report("prefill-graph", n, timed(alone, False, graphs=True))
        report("mixed-unsplit", n, timed(mixed, False))
        split_ms = report("split-eager", n, timed(mixed, True))
        if prefill is not None and prefill.bucket_for(alone.seqs) is not None:
            split_ms = report("split-graph", n, timed(mixed, True, graphs=True))
        for k in (0, 4, 8):
            print(f"{'':>14} hold {k} steps: {(k * decode_ms + split_ms) / (k + 1):8.2f} ms/step")
    print(json.dumps(runner.stats()))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": str(rt.device), "rows": rows}, indent=1))
    rt.close()


if __name__ == "__main__":
    main()
