"""Per-rank adapter loading under expert parallelism: bytes read and peak resident memory.

Run: .venv/bin/python benchmarks/ep_load.py [--layers 48 --experts 128 --rank 16]
Writes one large synthetic PEFT adapter (per-expert gate/up/down + attention LoRA) for a
Qwen3-MoE-shaped spec, then loads it as rank 0 and as the last rank of ep ∈ {1, 2, 4, 8}, each
load in a fresh process. Reports bytes the loader read, the growth of the process's peak RSS
during the load (sampled every ms from /proc; memory-mapped pages it touched count), and the ideal share (attention
replicated over EP, experts split). Table on stdout, JSON in benchmarks/results/ep_load_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json

CHILD = r"""
import json, os, sys, threading, time
from lora_cluster.adapters.loader import load_adapter
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.spec import load_model_spec
def rss():
    # (anonymous, file-backed) resident bytes of this process
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                key, kb = line.split()[:2]
                vals[key] = int(kb) * 1024
    return vals["RssAnon:"], vals["RssFile:"]
model_dir, adapter_dir, ep, rank = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
spec = load_model_spec(model_dir)
info = ParallelInfo(ep_rank=rank, ep_size=ep)
base = rss()
peak = [base[0], base[1], sum(base)]
stop = threading.Event()
def sample():  # resident set (mapped file pages included), sampled every millisecond
    while not stop.is_set():
        now = rss()
        peak[0], peak[1], peak[2] = max(peak[0], now[0]), max(peak[1], now[1]), max(peak[2], sum(now))
        time.sleep(0.001)
sampler = threading.Thread(target=sample)
sampler.start()
t0 = time.perf_counter()
loaded = load_adapter(adapter_dir, spec, info, name="big", max_lora_rank=64)
ms = (time.perf_counter() - t0) * 1e3
stop.set(); sampler.join()
print(json.dumps({"bytes_read": loaded.stats.bytes_read, "held": loaded.weights.nbytes,
                  "peak_rss_growth": peak[2] - sum(base), "peak_anon_growth": peak[0] - base[0],
                  "peak_file_growth": peak[1] - base[1], "load_ms": ms}))
"""

def write_assets(root: Path, layers: int, experts: int, hidden: int, inter: int, rank: int) -> tuple[Path, Path, int, int]:
    """A config-only model dir and the adapter; returns (model, adapter, expert bytes, other bytes)."""
    import torch
    from safetensors.torch import save_file

    model = root / "model"
    model.mkdir(parents=True, exist_ok=True)
    heads, kv_heads, head_dim = 8, 4, hidden // 8
    (model / "config.json").write_text(json.dumps({
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "intermediate_size": inter * 4,
        "moe_intermediate_size": inter, "num_experts": experts, "num_experts_per_tok": 8,
        "vocab_size": 1024, "max_position_embeddings": 4096, "norm_topk_prob": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}))
    adapter = root / "adapter"
    adapter.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    expert_bytes = other_bytes = 0
    pre = "base_model.model.model.layers"

    def add(name: str, shape: tuple[int, int]) -> int:
        tensors[name] = (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)
        return tensors[name].numel() * 2

    q, kv = heads * head_dim, kv_heads * head_dim
    for layer in range(layers):
        for proj, (i, o) in {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
                             "o_proj": (q, hidden)}.items():
            base = f"{pre}.{layer}.self_attn.{proj}"
            other_bytes += add(f"{base}.lora_A.weight", (rank, i)) + add(f"{base}.lora_B.weight", (o, rank))
        for e in range(experts):
            for proj, (i, o) in {"gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                                 "down_proj": (inter, hidden)}.items():
                base = f"{pre}.{layer}.mlp.experts.{e}.{proj}"
                expert_bytes += add(f"{base}.lora_A.weight", (rank, i)) + add(f"{base}.lora_B.weight", (o, rank))
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"], "base_model_name_or_path": str(model)}))
    return model, adapter, expert_bytes, other_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--ep", default="1,2,4,8")
    args = parser.parse_args()
    from lora_cluster.cli_format import format_table

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model, adapter, expert_bytes, other_bytes = write_assets(
            Path(tmp), args.layers, args.experts, args.hidden, args.inter, args.rank)
        file_bytes = (adapter / "adapter_model.safetensors").stat().st_size
        print(f"adapter: {file_bytes / 2**20:.0f} MiB ({args.layers} layers × {args.experts} experts, "
              f"rank {args.rank}); written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rows, results = [], []
        for ep in [int(x) for x in args.ep.split(",")]:
            ideal = other_bytes + expert_bytes // ep
            for rank in sorted({0, ep - 1}):
                out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(adapter), str(ep),
                                      str(rank)], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r.update(ep=ep, rank=rank, ideal_bytes=ideal)
                results.append(r)
                mib = 2**20
                rows.append((ep, rank, f"{ideal / mib:.1f}", f"{r['bytes_read'] / mib:.1f}",
                             f"{r['bytes_read'] / ideal:.3f}", f"{r['held'] / mib:.1f}",
                             f"{r['peak_anon_growth'] / mib:.1f}",
                             f"{r['peak_file_growth'] / mib:.1f}",
                             f"{r['peak_rss_growth'] / ideal:.2f}", f"{r['load_ms']:.0f}"))
    print(format_table(["ep", "rank", "ideal MiB", "read MiB", "read/ideal", "held MiB",
                        "peak anon +MiB", "peak mapped +MiB", "peak RSS/ideal", "load ms"], rows))
    path = write_json("ep_load_cpu.json", {
        "adapter": {"layers": args.layers, "experts": args.experts, "hidden": args.hidden,
                    "moe_intermediate": args.inter, "rank": args.rank, "dtype": "bfloat16",
                    "file_bytes": file_bytes, "expert_bytes": expert_bytes,
                    "other_bytes": other_bytes},
        "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
