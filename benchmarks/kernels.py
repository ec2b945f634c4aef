"""LoRA kernel benchmark (GPU): our Triton LoRA linear and fused MoE-LoRA vs torch and floors.

  python benchmarks/kernels.py --out results.json            # the issue's grid, both modes
  python benchmarks/kernels.py --sweep --out sweep.json      # launch-config sweep
  python benchmarks/kernels.py --compare results.json --anchors ../shared/anchors

Shapes: H = K = 4096, R in {16, 64}, dense N = 4096 and GQA qkv 4096+1024+1024, tokens in
{1, 16, 64, 256, 1024, 4096}, adapters in {1, 8, 32} drawn from 32 slots, tokens assigned
uniformly at random among them. "eager" = triton do_bench with L2 flushed per call (host
launch cost included); "graph" = do_bench_cudagraph (replays of a captured op, warm L2).
The bytes floor reads x once, each active adapter's A and B once, and reads and writes the
output once, at the copy bandwidth measured in the same run. LoRA metadata is built once
per step and shared by every layer, so it is timed on its own ("meta").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "kernels"), str(Path(__file__).resolve().parent)]

from lora_kernels import config as cfg  # noqa: E402
from lora_kernels import ops, reference  # noqa: E402
from lora_kernels.meta import build_lora_meta  # noqa: E402

SHAPES = {"dense": (0, 4096), "qkv_gqa": (0, 4096, 5120, 6144)}
TOKENS = (1, 16, 64, 256, 1024, 4096)
ADAPTERS = (1, 8, 32)
RANKS = (16, 64)
SLOTS, K = 32, 4096
DT = torch.bfloat16


def _bench(fn, graph: bool, rep: int = 30) -> float:
    from triton.testing import do_bench, do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    if graph:
        return float(do_bench_cudagraph(fn, rep=rep, return_mode="median")) * 1e3
    return float(do_bench(fn, warmup=5, rep=rep, return_mode="median")) * 1e3


def copy_bandwidth() -> float:
    """Device copy GB/s counting bytes read plus written (1 GiB fp32)."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    us = _bench(lambda: dst.copy_(src), graph=False, rep=200)
    return 2 * src.numel() * 4 / (us * 1e-6) / 1e9


class Case:
    """Inputs of one LoRA-linear shape with a random token → adapter layout."""

    def __init__(self, shape: str, rank: int, tokens: int, adapters: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed + tokens * 7 + adapters)
        self.offs = SHAPES[shape]
        n, n_cols = len(self.offs) - 1, self.offs[-1]
        drawn = torch.randperm(SLOTS, generator=gen)[:adapters]
        idx = drawn[torch.randint(0, adapters, (tokens,), generator=gen)]
        self.active = int(idx.unique().numel())
        self.idx = idx.to(torch.int32).cuda()
        self.x = torch.randn(tokens, K, generator=gen).to("cuda", DT)
        self.a = (torch.randn(n, SLOTS, rank, K, generator=gen) / 64).to("cuda", DT)
        self.b = (torch.randn(SLOTS, n_cols, rank, generator=gen) / 4).to("cuda", DT)
        self.out = torch.randn(tokens, n_cols, generator=gen).to("cuda", DT)
        self.meta = build_lora_meta(self.idx, SLOTS)
        self.floor_bytes = 2 * (tokens * K + self.active * (n * rank * K + n_cols * rank)
                                + 2 * tokens * n_cols)

    def ours(self, config: cfg.LinearConfig | None = None):
        from lora_kernels import linear

        return lambda: linear.lora_linear(self.out, self.x, self.a, self.b, self.meta, self.offs,
                                          config=config)

    def torch_loop(self):
        """PEFT-style: per active adapter, index_select + two matmuls + index_add."""
        def run() -> None:
            for w in torch.unique(self.idx).tolist():
                rows = torch.nonzero(self.idx == w).flatten()
                xs = self.x.index_select(0, rows)
                delta = torch.cat([(xs @ self.a[s, w].T) @ self.b[w, lo:hi].T for s, (lo, hi)
                                   in enumerate(zip(self.offs[:-1], self.offs[1:]))], dim=1)
                self.out.index_add_(0, rows, delta)
        return run

    def gather_bmm(self):
        """Per-token gather of A and B, then two batched matmuls (graph-capturable)."""
        w = self.idx.long().clamp(min=0)
        keep = (self.idx >= 0).to(DT)[:, None]

        def run() -> None:
            parts = []
            for s, (lo, hi) in enumerate(zip(self.offs[:-1], self.offs[1:])):
                y = torch.bmm(self.x[:, None, :], self.a[s][w].transpose(1, 2))
                parts.append(torch.bmm(y, self.b[w, lo:hi].transpose(1, 2))[:, 0])
            self.out.add_(torch.cat(parts, 1) * keep)
        return run

    def gather_bytes(self) -> int:
        n, _, rank, _ = self.a.shape
        return self.x.shape[0] * (n * rank * K + self.offs[-1] * rank) * 2


def bench_linear(bw: float, quick: bool) -> list[dict[str, Any]]:
    rows = []
    for shape in SHAPES:
        for rank in RANKS:
            for tokens in TOKENS:
                for adapters in ADAPTERS:
                    if tokens == 1 and adapters > 1 and quick:
                        continue
                    c = Case(shape, rank, tokens, adapters)
                    row: dict[str, Any] = dict(shape=shape, rank=rank, tokens=tokens,
                                               adapters=adapters, active=c.active)
                    row["config"] = repr(cfg.choose_linear(
                        tokens, c.offs[-1], K, rank, len(c.offs) - 1, SLOTS))
                    row["ours_graph_us"] = _bench(c.ours(), graph=True)
                    row["ours_eager_us"] = _bench(c.ours(), graph=False)
                    row["floor_us"] = c.floor_bytes / (bw * 1e3)
                    row["pct_floor_graph"] = 100 * row["floor_us"] / row["ours_graph_us"]
                    if not quick:
                        row["torch_loop_eager_us"] = _bench(c.torch_loop(), graph=False, rep=20)
                        if c.gather_bytes() < 3e9:
                            row["gather_bmm_eager_us"] = _bench(c.gather_bmm(), False, rep=20)
                            row["gather_bmm_graph_us"] = _bench(c.gather_bmm(), True, rep=20)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    del c
    return rows


def bench_meta() -> list[dict[str, Any]]:
    rows = []
    for tokens in TOKENS:
        idx = torch.randint(-1, SLOTS, (tokens,), device="cuda", dtype=torch.int32)
        fn = lambda idx=idx: build_lora_meta(idx, SLOTS)  # noqa: E731
        rows.append(dict(tokens=tokens, graph_us=_bench(fn, True), eager_us=_bench(fn, False)))
    return rows


def sweep_candidates(tokens: int) -> list[cfg.LinearConfig]:
    """Configs around the first sweep's winners (docs/KERNELS.md)."""
    out: list[cfg.LinearConfig] = []
    if tokens <= 16:
        out += [cfg.SplitConfig(16, bk, sk, 64, cs) for bk in (64, 256) for sk in (4, 8, 16)
                for cs in (32, 64, 96)]
        out += [cfg.FusedConfig(16, 256, 64, cs, 8, 4) for cs in (32, 64)]
    elif tokens <= 64:
        out += [cfg.SplitConfig(16, bk, sk, bn, cs) for bk in (64, 128) for sk in (4, 8, 16)
                for bn, cs in ((64, 16), (128, 16), (128, 32))]
    elif tokens <= 256:
        out += [cfg.SplitConfig(bm, 64, sk, 128, cs) for bm in (16, 32) for sk in (4, 8)
                for cs in (8, 16)]
        out += [cfg.FusedConfig(32, 128, 128, cs, 4, 3) for cs in (8, 16)]
    else:
        out += [cfg.FusedConfig(bm, bk, 128, cs, w, st) for bm, w in ((32, 4), (64, 4), (64, 8))
                for bk, st in ((64, 3), (128, 3), (64, 4)) for cs in (2, 4, 8)]
        out += [cfg.FusedConfig(128, 64, 128, cs, 8, 3) for cs in (1, 2)]
        out += [cfg.SplitConfig(64, 128, 1, 128, cs, 4, 8) for cs in (4, 8)]
    return out


SWEEP_CASES = [(s, r, t, 32 if t > 1 else 1) for s in SHAPES for r in RANKS for t in TOKENS]


def _warm_worker(jobs: list[tuple]) -> None:
    torch.cuda.init()
    cases: dict[tuple, Case] = {}
    for key, config in jobs:
        c = cases.setdefault(key, Case(*key))
        try:
            c.ours(config)()
        except Exception as exc:  # a config the compiler rejects is reported, not fatal
            print(f"warm {key} {config}: {type(exc).__name__}: {exc}", flush=True)
    torch.cuda.synchronize()


def warm_compile(jobs: list[tuple], procs: int) -> None:
    """Compile every (case, config) once in parallel processes to fill Triton's disk cache."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    chunks = [jobs[i::procs] for i in range(procs)]
    with ctx.Pool(procs) as pool:
        pool.map(_warm_worker, chunks)


def sweep(procs: int) -> list[dict[str, Any]]:
    jobs: list[tuple] = [(key, c) for key in SWEEP_CASES
                         for c in [None, *sweep_candidates(key[2])]]
    t0 = time.time()
    warm_compile(jobs, procs)
    print(f"warm compile of {len(jobs)} jobs: {time.time() - t0:.0f} s", flush=True)
    rows = []
    for key in SWEEP_CASES:
        c = Case(*key)
        for config in [None, *sweep_candidates(key[2])]:
            try:
                us = _bench(c.ours(config), graph=True, rep=5)
            except Exception as exc:
                print(f"skip {key} {config}: {exc}", flush=True)
                continue
            rows.append(dict(shape=key[0], rank=key[1], tokens=key[2], adapters=key[3],
                             config=repr(config) if config else "heuristic", graph_us=us))
        best = min((r for r in rows if (r["shape"], r["rank"], r["tokens"]) == key[:3]),
                   key=lambda r: r["graph_us"], default=None)
        heur = [r["graph_us"] for r in rows if r["config"] == "heuristic"
                and (r["shape"], r["rank"], r["tokens"]) == key[:3]]
        print("best", key, best and (round(best["graph_us"], 2), best["config"]),
              "heuristic", heur and round(heur[0], 2), flush=True)
    return rows


def torch_moe(x: torch.Tensor, wts: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor, lora: reference.MoELoRA, slots: torch.Tensor) -> torch.Tensor:
    """bf16 torch baseline: loop over used experts, LoRA by per-row gather + bmm."""
    t_count, top_k = ids.shape
    e_count, two_i, _ = w13.shape
    inter = two_i // 2
    flat = ids.reshape(-1)
    tok = torch.arange(t_count, device=x.device).repeat_interleave(top_k)
    order = torch.argsort(flat)
    counts = torch.bincount(flat, minlength=e_count).tolist()
    out = torch.zeros(t_count, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        rows = order[start:start + c]
        start += c
        xs = x.index_select(0, tok[rows])
        slot = slots.index_select(0, tok[rows]).long()
        ent = (slot * e_count + e).clamp(min=0)
        keep = (slot >= 0).to(x.dtype)[:, None]
        gu = xs @ w13[e].T
        y = torch.bmm(xs[:, None, :].expand(-1, 2, -1).reshape(-1, 1, xs.shape[1]),
                      lora.a13[:, ent].transpose(0, 1).reshape(-1, *lora.a13.shape[2:])
                      .transpose(1, 2)).view(c, 2, -1)
        b = lora.b13[ent]
        gu = gu + torch.cat([torch.bmm(y[:, :1], b[:, :inter].transpose(1, 2)),
                             torch.bmm(y[:, 1:], b[:, inter:].transpose(1, 2))], 2)[:, 0] * keep
        h = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
        d = h @ w2[e].T
        y2 = torch.bmm(h[:, None], lora.a2[0, ent].transpose(1, 2))
        d = d + torch.bmm(y2, lora.b2[ent].transpose(1, 2))[:, 0] * keep
        out.index_add_(0, tok[rows], d.float() * wts.reshape(-1)[rows, None])
    return out.to(x.dtype)


def _moe_row(tokens: int, gen: torch.Generator, w13: torch.Tensor, w2: torch.Tensor,
             lora: reference.MoELoRA, quick: bool, bw: float) -> dict[str, Any]:
    from lora_kernels.testing import routing

    e, inter, h = w13.shape[0], w2.shape[2], w2.shape[1]
    slots = lora.b13.shape[0] // e
    emap = torch.arange(e, dtype=torch.int32, device="cuda")
    ids, wts = routing(tokens, 8, e, "uniform", gen)
    ids, wts = ids.cuda(), wts.cuda()
    x = torch.randn(tokens, h, generator=gen).to("cuda", DT)
    row_slots = torch.randint(-1, slots, (tokens,), generator=gen).to("cuda", torch.int32)
    used = int(ids.unique().numel())
    row: dict[str, Any] = dict(tokens=tokens, experts_used=used)

    def ours() -> torch.Tensor:
        return ops.fused_moe(x, wts, ids, w13, w2, emap, lora, row_slots)

    def base() -> torch.Tensor:
        return ops.fused_moe(x, wts, ids, w13, w2, emap)

    def loop() -> torch.Tensor:
        return torch_moe(x, wts, ids, w13, w2, lora, row_slots)

    row["ours_lora_graph_us"] = _bench(ours, True)
    row["ours_lora_eager_us"] = _bench(ours, False)
    row["ours_base_graph_us"] = _bench(base, True)
    # Floor: each used expert's weights once, x read and the output written once.
    row["floor_us"] = 2 * (used * 3 * h * inter + tokens * h * 2) / (bw * 1e3)
    if not quick:
        row["torch_loop_eager_us"] = _bench(loop, False, rep=20)
        got, want = ours().float(), loop().float()
        row["rel_err_vs_torch"] = float((got - want).norm() / want.norm())
    return row


def bench_moe(quick: bool, bw: float) -> list[dict[str, Any]]:
    """Qwen3-30B-A3B-like layer: H 2048, I 768, 128 experts top-8, 8 slots of rank 16."""
    h, inter, e, slots, rank = 2048, 768, 128, 8, 16
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(e, 2 * inter, h, generator=gen) / 45).to("cuda", DT)
    w2 = (torch.randn(e, h, inter, generator=gen) / 28).to("cuda", DT)
    lora = reference.MoELoRA(*(
        (torch.randn(*shape, generator=gen) / 30).to("cuda", DT) for shape in
        ((2, slots * e, rank, h), (slots * e, 2 * inter, rank), (1, slots * e, rank, inter),
         (slots * e, h, rank))))
    rows = []
    for tokens in (1, 16, 64, 256, 1024, 4096):
        rows.append(_moe_row(tokens, gen, w13, w2, lora, quick, bw))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def compare(results: dict[str, Any], anchors: Path) -> None:
    """Print ours vs the best recorded peer per shape (graph replay, rank 16, 32 slots)."""
    import csv

    best: dict[tuple[str, int, int], tuple[float, str]] = {}

    def offer(shape: str, m: int, n: int, us: float, who: str) -> None:
        if (shape, m, n) not in best or us < best[(shape, m, n)][0]:
            best[(shape, m, n)] = (us, who)

    vllm = (anchors / "vllm_lora_kernels_h100_cudagraph.csv").read_text().splitlines()
    for r in csv.DictReader(vllm):
        for col in ("vllm_us", "vllm_spec_us"):
            if r[col]:
                offer(r["shape"], int(r["M"]), int(r["n"]), float(r[col]), "vllm")
    parts: dict[tuple, float] = {}
    sglang = (anchors / "sglang_lora_kernels_h100.csv").read_text().splitlines()
    for r in csv.DictReader(sglang):
        if r["mode"] == "cudagraph" and r["layout"] == "rand" and r["backend"] in ("tri", "cs16"):
            shape = "qkv_gqa" if r["shape"] == "qkv" else r["shape"]
            key = (shape, int(r["M"]), int(r["n"]), r["backend"])
            parts[key] = parts.get(key, 0.0) + float(r["us"])
    for (shape, m, n, backend), us in parts.items():
        offer(shape, m, n, us, "sglang-" + backend)
    print(f"card: {results.get('device')}  copy {results.get('copy_GBps', 0):.0f} GB/s")
    print(f"{'shape':8} {'R':>3} {'T':>5} {'ad':>3} {'ours':>8} {'peer':>8} {'ratio':>6} "
          f"{'goal':>5} {'floor%':>7} {'eager':>8}")
    for row in results.get("linear", []):
        peer = best.get((row["shape"], row["tokens"], row["adapters"]))
        ours = row["ours_graph_us"]
        ratio = f"{ours / peer[0]:.2f}" if peer and row["rank"] == 16 else "-"
        goal = ("yes" if ours <= peer[0] / 2 else "no") if peer and row["rank"] == 16 else "-"
        print(f"{row['shape']:8} {row['rank']:>3} {row['tokens']:>5} {row['adapters']:>3} "
              f"{ours:8.2f} {peer[0] if peer else float('nan'):8.2f} {ratio:>6} {goal:>5} "
              f"{row['pct_floor_graph']:7.1f} {row['ours_eager_us']:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="ours only, no torch baselines")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--compare", type=Path)
    ap.add_argument("--anchors", type=Path, default=ROOT.parent / "shared" / "anchors")
    args = ap.parse_args()
    if args.compare:
        compare(json.loads(args.compare.read_text()), args.anchors)
        return
    bw = copy_bandwidth()
    results: dict[str, Any] = dict(device=torch.cuda.get_device_name(), copy_GBps=bw,
                                   torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    import triton

    results["triton"] = triton.__version__
    print(f"{results['device']}: copy {bw:.0f} GB/s", flush=True)
    if args.sweep:
        results["sweep"] = sweep(args.procs)
    else:
        if not args.skip_linear:
            results["meta"] = bench_meta()
            results["linear"] = bench_linear(bw, args.quick)
        if not args.skip_moe:
            results["moe"] = bench_moe(args.quick, bw)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    if "linear" in results and args.anchors.exists():
        compare(results, args.anchors)


if __name__ == "__main__":
    main()
