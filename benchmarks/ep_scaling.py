"""Expert-parallel scaling through the real ``Cluster`` handle: decode tokens/s and per-rank
memory (base weights, adapter slots, adapter host cache) for ep ∈ {1, 2, 4}, one rank per GPU.

Run (GPU host, Ray staged, e.g. from benchmarks/multigpu.sh):
    python3 benchmarks/ep_scaling.py                      # ep 1,2,4 as far as the GPUs go
Dry run (CPU, tiny model, gloo, seconds):
    .venv/bin/python benchmarks/ep_scaling.py --device cpu

Model (cuda): a Qwen3-30B-A3B-shaped MoE cut to ``--layers`` layers and a 32k vocab (H=2048,
32 q / 4 kv heads of 128, 128 experts top-8, expert I=768): the experts hold ~88% of the
weights. Random bf16 weights and ``--adapters`` rank-16 attention+expert PEFT adapters are
written at run time under ``--cache-dir`` (reused while the machine is warm).

Decode tokens/s: ``--batch`` prompts of ``--prompt-len`` tokens, one adapter each (round
robin over all adapters, every slot resident), sent as one ``generate`` call with greedy
sampling and ``ignore_eos``, once with ``--short`` and once with ``--long`` new tokens; both
admit every prompt in one prefill, so the difference is pure decode:
    decode tok/s = batch · (long − short) / (t_long − t_short)
(best of ``--repeats`` pairs, after one warm-up call). It includes the controller's planning
and its round trip to the ranks per step, as served. Per-rank memory is read inside each rank
actor: buffers of the LoRA slot modules, the adapter host cache, the KV cache, the rest of the
model's buffers (base weights), and CUDA's allocated / peak bytes.
Prints a table naming the card and writes ``<out>/ep_scaling_<card>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Before Ray starts: the driver and every process Ray spawns keep NVLink multicast off.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine

from lora_cluster import Cluster, ClusterConfig, SamplingParams
from lora_cluster.testing import TinyModelSpec, write_adapter, write_tiny_model

MARKER = ".written"


def model_spec(device: str, layers: int) -> TinyModelSpec:
    """Experts dominate: per layer 128 × 3 × 2048 × 768 expert weights vs ~19M attention."""
    if device == "cpu":
        return TinyModelSpec(family="qwen3_moe", vocab_size=384, hidden_size=64,
                             intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=16, num_experts=8, num_experts_per_tok=2,
                             moe_intermediate_size=32, max_position_embeddings=256)
    return TinyModelSpec(family="qwen3_moe", vocab_size=32_768, hidden_size=2048,
                         intermediate_size=6144, num_layers=layers, num_heads=32, num_kv_heads=4,
                         head_dim=128, num_experts=128, num_experts_per_tok=8,
                         moe_intermediate_size=768, max_position_embeddings=4096)


def write_assets(root: Path, spec: TinyModelSpec, dtype: str, adapters: int,
                 rank: int) -> tuple[Path, list[Path], float]:
    """The model and adapters under ``root`` (written once; a marker is written last)."""
    start = time.perf_counter()
    model_dir = root / "model"
    if not (model_dir / MARKER).exists():
        write_tiny_model(model_dir, spec, dtype=dtype, tokenizer=spec.vocab_size <= 4096)
        (model_dir / MARKER).write_text("ok\n")

    def one(i: int) -> Path:
        path = root / "adapters" / f"a{i:03d}"
        if not (path / MARKER).exists():
            write_adapter(path, spec, targets=["attention", "experts"], r=rank, alpha=2 * rank,
                          seed=i, dtype=dtype)
            (path / MARKER).write_text("ok\n")
        return path

    # torch's random draws and safetensors writes release the GIL: threads overlap them.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        dirs = list(pool.map(one, range(adapters)))
    return model_dir, dirs, time.perf_counter() - start


def rank_memory(cluster: Cluster, tp_size: int) -> list[dict[str, Any]]:
    """Each rank's memory by kind (``Cluster.rank_stats()``), with its ranks and device."""
    out = []
    for stats in cluster.rank_stats():
        rank = int(stats["rank"])
        out.append({"rank": rank, "ep_rank": rank // tp_size, "device": stats["device"],
                    **stats["memory"]})
    return out


def timed_generate(cluster: Cluster, prompts: list[list[int]], names: list[str],
                   tokens: int) -> tuple[float, dict[str, Any]]:
    before = cluster.stats()
    start = time.perf_counter()
    results = cluster.generate(prompts, adapters=names,
                               sampling=SamplingParams(max_tokens=tokens, ignore_eos=True))
    took = time.perf_counter() - start
    after = cluster.stats()
    assert all(len(r.token_ids) == tokens for r in results)
    keys = ("steps", "steps_with_prefill", "step_total_us", "step_rank_us", "step_execute_us")
    return took, {k: after.get(k, 0) - before.get(k, 0) for k in keys}


def measure(cfg: ClusterConfig, adapter_dirs: list[Path], args: argparse.Namespace,
            vocab: int) -> dict[str, Any]:
    """One ep setting: start, load adapters, time decode, read per-rank memory, stop."""
    t0 = time.perf_counter()
    cluster = Cluster.start(cfg)
    try:
        start_s = time.perf_counter() - t0
        names = [f"a{i:03d}" for i in range(len(adapter_dirs))]
        t1 = time.perf_counter()
        for name, path in zip(names, adapter_dirs):
            cluster.load_adapter(name, str(path))
        load_s = time.perf_counter() - t1
        gen = torch.Generator().manual_seed(0)
        prompts = [[1, *torch.randint(4, vocab, (args.prompt_len - 1,), generator=gen).tolist()]
                   for _ in range(args.batch)]
        batch_names = [names[i % len(names)] for i in range(args.batch)]
        timed_generate(cluster, prompts, batch_names, args.long)  # warm-up
        pairs = []
        for _ in range(args.repeats):
            short_s, _ = timed_generate(cluster, prompts, batch_names, args.short)
            long_s, counters = timed_generate(cluster, prompts, batch_names, args.long)
            pairs.append((long_s - short_s, short_s, long_s, counters))
        decode_s, short_s, long_s, counters = min(pairs, key=lambda p: p[0])
        decode_tokens = args.batch * (args.long - args.short)
        memory = rank_memory(cluster, cfg.tp_size)
        steps = max(1, counters["steps"])
        return {
            "ep": cfg.ep_size, "tp": cfg.tp_size, "world_size": cfg.world_size,
            "decode_tok_s": decode_tokens / max(decode_s, 1e-9),
            "decode_step_ms": 1e3 * decode_s / (args.long - args.short),
            "short_call_s": short_s, "long_call_s": long_s,
            "long_call_steps": counters["steps"],
            "long_call_step_ms": counters["step_total_us"] / 1e3 / steps,
            "long_call_rank_ms_per_step": counters["step_rank_us"] / 1e3 / steps,
            "all_pairs_decode_s": [p[0] for p in pairs],
            "start_s": start_s, "adapter_load_s": load_s, "per_rank": memory,
        }
    finally:
        cluster.shutdown()


def card_name(device: str) -> tuple[str, str]:
    """(full card name, short tag for the file name)."""
    if device != "cuda":
        return "CPU (gloo ranks)", "cpu"
    name = torch.cuda.get_device_name(0)
    known = re.search(r"\b([A-Z]\d{2,3})\b", name)
    tag = known.group(1).lower() if known else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return name, tag


def print_table(rows: list[dict[str, Any]], card: str) -> None:
    mib = 2**20
    print(f"\nEP scaling on {card} (memory: the largest rank's, MiB)")
    print(f"{'ep':>3} {'decode tok/s':>13} {'step ms':>8} {'rank ms':>8} {'base weights':>13} "
          f"{'adapters (slots + host cache)':>32} {'start s':>8}")
    for r in rows:
        base = max(m["base_weight_bytes"] for m in r["per_rank"]) / mib
        slots = max(m["lora_slot_bytes"] for m in r["per_rank"]) / mib
        host = max(m["adapter_host_cache_bytes"] for m in r["per_rank"]) / mib
        adapters = f"{slots + host:.1f} ({slots:.1f} + {host:.1f})"
        print(f"{r['ep']:>3} {r['decode_tok_s']:>13.0f} {r['decode_step_ms']:>8.2f} "
              f"{r['long_call_rank_ms_per_step']:>8.2f} {base:>13.1f} {adapters:>32} "
              f"{r['start_s']:>8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--ep", default="1,2,4", help="ep sizes (cuda: those beyond the GPU count "
                                                  "are skipped)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--adapters", type=int, default=None, help="default: cuda 32, cpu 4")
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank (default: cuda 16, cpu 4)")
    ap.add_argument("--batch", type=int, default=None, help="sequences (default: cuda 64, cpu 8)")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--short", type=int, default=None)
    ap.add_argument("--long", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "lora_cluster_ep"))
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (use --device cpu)")
    defaults = {"adapters": (32, 4), "rank": (16, 4), "batch": (64, 8), "prompt_len": (32, 8),
                "short": (8, 2), "long": (72, 10)}
    for key, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, on_gpu if cuda else on_cpu)
    gpus = torch.cuda.device_count() if cuda else 0
    eps = [int(e) for e in args.ep.split(",")]
    skipped = [e for e in eps if cuda and e > gpus]
    eps = [e for e in eps if e not in skipped]
    spec = model_spec(args.device, args.layers)
    dtype = "bfloat16" if cuda else "float32"
    root = Path(args.cache_dir) / (f"{args.device}-L{spec.num_layers}-E{spec.num_experts}"
                                   f"-r{args.rank}")
    model_dir, adapter_dirs, write_s = write_assets(root, spec, dtype, args.adapters, args.rank)
    print(f"assets under {root} ({write_s:.1f}s)", flush=True)
    card, tag = card_name(args.device)
    base = ClusterConfig(
        model=str(model_dir), device=args.device, dtype=dtype,  # type: ignore[arg-type]
        max_loras=args.adapters, max_cpu_loras=max(args.adapters, 64), max_lora_rank=args.rank,
        max_num_seqs=args.batch, max_num_batched_tokens=max(256, args.batch * args.prompt_len),
        kv_cache_bytes=(256 << 20) if cuda else (16 << 20), prefill_hold_steps=0)
    info = machine()
    info.update({"card": card, "gpu_count": gpus})
    rows: list[dict[str, Any]] = []
    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": info, "card": card,
        "command": " ".join(sys.argv),
        "method": "decode tok/s = batch*(long-short)/(t_long-t_short) over generate() calls "
                  "through the Cluster handle (best of repeats, after a warm-up call)",
        "settings": {"device": args.device, "dtype": dtype, "model": {
            k: getattr(spec, k) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                          "num_kv_heads", "head_dim", "num_experts",
                                          "num_experts_per_tok", "moe_intermediate_size")},
            "adapters": args.adapters, "adapter_rank": args.rank,
            "adapter_targets": ["attention", "experts"], "max_loras": args.adapters,
            "batch": args.batch, "prompt_len": args.prompt_len, "short": args.short,
            "long": args.long, "repeats": args.repeats, "use_cuda_graphs": cuda,
            "asset_write_s": write_s},
        "skipped_ep": skipped, "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ep_scaling_{tag}.json"
    for ep in eps:
        row = measure(base.replace(ep_size=ep), adapter_dirs, args, spec.vocab_size)
        rows.append(row)
        print(f"ep={ep}: {row['decode_tok_s']:.0f} decode tok/s, start {row['start_s']:.1f}s, "
              f"adapters loaded in {row['adapter_load_s']:.1f}s", flush=True)
        # After every setting: a run cut short still leaves the finished rows.
        path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    print_table(rows, card)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
