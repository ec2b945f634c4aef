"""Paged attention micro-benchmark (GPU): the torch path vs the Triton kernels, one layer.

  PYTHONPATH=$PWD:$PWD/kernels python3 benchmarks/attention.py [--out name.json]
  python benchmarks/attention.py --dry-run      # CPU, Triton interpreter, tiny shapes, no file

Shapes of the H100 benchmark model: 32 query heads, 4 KV heads, D = 128, bf16, 16-token
blocks, a 4096-token context limit (256 blocks per table row).

  decode:  128 sequences of ~300 cached tokens, attention bound = the context limit (what a
           CUDA-graph bucket passes); eager (do_bench, L2 flushed) and CUDA-graph replay;
           the torch path is also timed with the bound at the true longest context.
  long:    4 sequences of ~4000 tokens: split-KV (auto) vs one program per KV head.
  general: two 160-token prompts (one after 300 cached tokens) beside 126 decodes (eager;
           the step's plan is built once, outside the timing, and timed on its own).

"floor µs" is the K/V bytes the step must read (each sequence's own keys, once) at the
device copy bandwidth measured in the same run. Prints a table; writes
benchmarks/results/attention_<card>.json. About a minute on an H100.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(Path(__file__).resolve().parent)]

from common import write_json  # noqa: E402

from lora_cluster.model import paged_attention as pa  # noqa: E402
from lora_cluster.model.batch import ForwardBatch  # noqa: E402


@dataclass(frozen=True)
class Setup:
    """Model shape, device and the three workloads' sizes."""

    heads: int = 32
    kv_heads: int = 4
    dim: int = 128
    block: int = 16
    limit: int = 4096
    decode_seqs: int = 128
    decode_ctx: tuple[int, int] = (250, 350)
    long_seqs: int = 4
    long_ctx: tuple[int, int] = (3800, 4096)
    prompt: int = 160
    cached_before: int = 300  # the second prompt's rows follow this many cached tokens
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"

    @property
    def scale(self) -> float:
        return self.dim ** -0.5


DRY = Setup(heads=4, kv_heads=2, dim=32, block=8, limit=256, decode_seqs=6, decode_ctx=(20, 40),
            long_seqs=1, long_ctx=(200, 256), prompt=12, cached_before=6,
            dtype=torch.float32, device="cpu")


def _bench(fn: Callable[[], Any], graph: bool, device: str, rep: int = 50) -> float:
    """Median µs of one call: eager with L2 flushed, or replays of a captured call (GPU);
    a few plain calls under the interpreter."""
    if device != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    from triton.testing import do_bench, do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    if graph:
        return float(do_bench_cudagraph(fn, rep=rep, return_mode="median")) * 1e3
    return float(do_bench(fn, warmup=10, rep=rep, return_mode="median")) * 1e3


def copy_bandwidth(device: str) -> float:
    """Device copy GB/s, bytes read plus written (512 MiB fp32 on a GPU)."""
    src = torch.randn(2**27 if device == "cuda" else 2**20, device=device)
    dst = torch.empty_like(src)
    us = _bench(lambda: dst.copy_(src), graph=False, device=device, rep=100)
    return 2 * src.numel() * 4 / (us * 1e-6) / 1e9


class Step:
    """A paged cache holding ``contexts`` tokens per sequence and a step of ``rows`` rows each."""

    def __init__(self, s: Setup, contexts: list[int], rows: list[int], seed: int = 0) -> None:
        self.s = s
        gen = torch.Generator().manual_seed(seed)
        used = [-(-c // s.block) for c in contexts]
        num_blocks = sum(used) + 1
        shape = (num_blocks, s.block, s.kv_heads, s.dim)
        self.k = torch.randn(*shape, generator=gen).to(s.device, s.dtype)
        self.v = torch.randn(*shape, generator=gen).to(s.device, s.dtype)
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        tables = torch.zeros(len(contexts), s.limit // s.block, dtype=torch.int32)
        at = 0
        for b, n in enumerate(used):
            tables[b, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
            at += n
        starts = [0]
        for n in rows:
            starts.append(starts[-1] + n)
        t, dev = starts[-1], torch.device(s.device)
        self.batch = ForwardBatch(
            input_ids=torch.zeros(t, dtype=torch.long, device=dev),
            positions=torch.zeros(t, dtype=torch.long, device=dev),
            token_slots=torch.full((t,), -1, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(contexts, dtype=torch.int32, device=dev),
            block_tables=tables.to(dev),
            kv_slot_mapping=torch.full((t,), -1, dtype=torch.long, device=dev),
            logits_rows=torch.zeros(1, dtype=torch.long, device=dev),
            is_decode=all(n == 1 for n in rows), max_context_len=s.limit,
        )
        self.q = torch.randn(t, s.heads, s.dim, generator=gen).to(s.device, s.dtype)
        self.kv_bytes = sum(contexts) * s.kv_heads * s.dim * 2 * self.k.element_size()

    def decode(self, backend: str, bound: int) -> Callable[[], torch.Tensor]:
        b = self.batch

        def run() -> torch.Tensor:
            with pa.use_attention_backend(backend):
                return pa.decode_attention(self.q, self.k, self.v, b.block_tables,
                                           b.context_lens, bound, self.s.scale, None)
        return run

    def general(self, backend: str, plan: pa.AttentionPlan) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with pa.use_attention_backend(backend):
                return pa.paged_attention(self.q, self.k, self.v, self.batch, plan,
                                          self.s.scale, None)
        return run

    def reference(self) -> torch.Tensor:
        """The torch path in float32 on the same values (the accuracy yardstick)."""
        with pa.use_attention_backend("torch"):
            return pa.paged_attention(self.q.float(), self.k.float(), self.v.float(),
                                      self.batch, pa.plan_attention(self.batch), self.s.scale,
                                      None)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def _lengths(gen: torch.Generator, n: int, lo_hi: tuple[int, int]) -> list[int]:
    return torch.randint(lo_hi[0], lo_hi[1] + 1, (n,), generator=gen).tolist()


def run(s: Setup, bw: float) -> list[dict[str, Any]]:
    from lora_kernels import paged_attention as kernels

    gen = torch.Generator().manual_seed(1)
    rows: list[dict[str, Any]] = []
    modes = (False, True) if s.device == "cuda" else (False,)

    def add(case: str, path: str, fn: Callable[[], torch.Tensor], want: torch.Tensor,
            step: Step, graphs: tuple[bool, ...] = modes, **extra: Any) -> None:
        err = _rel(fn(), want)
        for graph in graphs:
            rows.append({"case": case, "path": path, "mode": "graph" if graph else "eager",
                         "us": _bench(fn, graph, s.device), "rel_err": err,
                         "floor_us": step.kv_bytes / (bw * 1e9) * 1e6, **extra})

    ctx = _lengths(gen, s.decode_seqs, s.decode_ctx)
    dec = Step(s, ctx, [1] * s.decode_seqs)
    want = dec.reference()
    case = f"decode {s.decode_seqs} x ~{sum(s.decode_ctx) // 2}, limit {s.limit}"
    for name, backend, bound in (("torch", "torch", s.limit),
                                 ("torch, bound = true max", "torch", max(ctx)),
                                 ("triton", "triton", s.limit)):
        add(case, name, dec.decode(backend, bound), want, dec)

    long = Step(s, _lengths(gen, s.long_seqs, s.long_ctx), [1] * s.long_seqs, seed=3)
    want, b = long.reference(), long.batch
    case = f"decode {s.long_seqs} x ~{sum(s.long_ctx) // 2}, limit {s.limit}"
    add(case, "torch", long.decode("torch", s.limit), want, long)
    for name, splits in (("triton, split-KV auto", None), ("triton, no split", 1)):
        config = kernels.DecodeConfig(num_splits=splits)

        def fn(config: kernels.DecodeConfig = config) -> torch.Tensor:
            return kernels.paged_decode(long.q, long.k, long.v, b.block_tables, b.context_lens,
                                        s.limit, s.scale, None, config=config)
        used = kernels.decode_splits(s.long_seqs, s.kv_heads, s.limit, long.q.device,
                                     config.block_n, splits)[0]
        add(case, f"{name} ({used})", fn, want, long)

    singles = s.decode_seqs - 2
    contexts = [s.prompt, s.prompt + s.cached_before, *_lengths(gen, singles, s.decode_ctx)]
    mix = Step(s, contexts, [s.prompt, s.prompt] + [1] * singles, seed=2)
    t0 = time.perf_counter()
    for _ in range(20):
        plan = pa.plan_attention(mix.batch)
    plan_us = (time.perf_counter() - t0) / 20 * 1e6
    want = mix.reference()
    case = f"general 2x{s.prompt} prompts + {singles} decodes"
    for backend in ("torch", "triton"):
        add(case, backend, mix.general(backend, plan), want, mix, graphs=(False,),
            plan_us=plan_us)
    return rows


def card_slug(device: str) -> str:
    if device != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    short = re.search(r"(gh200|h100|h200|a100|l40s?|b200)", name)
    return short.group(1) if short else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON file name under benchmarks/results "
                        "(default: attention_<card>.json)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny "
                        "shapes: checks the script, times nothing meaningful")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is first imported
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA device (or --dry-run)")
    s = DRY if args.dry_run else Setup()
    start = time.time()
    bw = copy_bandwidth(s.device)
    rows = run(s, bw)
    card = torch.cuda.get_device_name() if s.device == "cuda" else "cpu (interpreter)"
    print(f"{card}  copy {bw:.0f} GB/s  h={s.heads} g={s.kv_heads} D={s.dim} "
          f"{str(s.dtype)[6:]} block={s.block} limit={s.limit}")
    print(f"{'case':34s} {'path':28s} {'mode':6s} {'µs':>9s} {'floor µs':>9s} {'rel err':>9s}")
    for r in rows:
        print(f"{r['case']:34s} {r['path']:28s} {r['mode']:6s} {r['us']:9.1f} "
              f"{r['floor_us']:9.1f} {r['rel_err']:9.2e}")
    plan_us = next(r["plan_us"] for r in rows if "plan_us" in r)
    print(f"general-step plan (host, once per step, one sync): {plan_us:.0f} µs")
    payload = {"card": card, "copy_gbps": bw, "rows": rows, "wall_s": time.time() - start,
               "shape": {"heads": s.heads, "kv_heads": s.kv_heads, "dim": s.dim,
                         "block": s.block, "limit": s.limit, "dtype": str(s.dtype)}}
    if not args.dry_run or args.out:
        path = write_json(args.out or f"attention_{card_slug(s.device)}.json", payload)
        print(f"wrote {path} ({time.time() - start:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
