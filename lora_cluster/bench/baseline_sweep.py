"""The HF baselines over the adapter counts: batches of the same requests as the engine's.

A baseline serves the closed-loop request stream of each N (same seed, same order) in
batches of ``max_num_seqs`` requests — the engine's batch capacity — one after another, for
``baseline_duration_s`` (at least one batch) after a short warm-up. Adapters are added
cumulatively as N grows.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from lora_cluster.bench.assets import BenchAssets, adapter_name
from lora_cluster.bench.metrics import percentiles
from lora_cluster.bench.progress import ProgressBar
from lora_cluster.bench.workload import BenchRequest, RequestStream

RunBatch = Callable[[Sequence[BenchRequest]], list[list[int]]]


def measure_batches(run_batch: RunBatch, stream: RequestStream, *, batch_size: int,
                    duration_s: float, min_batches: int = 1,
                    bar: ProgressBar | None = None) -> dict[str, Any]:
    """Throughput of back-to-back batches for ``duration_s`` (at least ``min_batches``); the
    median batch's rate is the headline (as the engine's median sub-window).

    A short warm-up first (two requests of another stream of the same workload: kernels,
    allocator and caches warm, none of the measured requests spent).
    """
    warm = RequestStream(dataclasses.replace(stream.spec, seed=stream.spec.seed + 99))
    run_batch(warm.take_many(2))
    start = time.perf_counter()
    requests = tokens = batches = 0
    latencies = []
    distinct = []
    rates = []  # (tokens/s, requests/s) of each batch
    while batches < min_batches or time.perf_counter() - start < duration_s:
        batch = stream.take_many(batch_size)
        t = time.perf_counter()
        out = run_batch(batch)
        latencies.append(time.perf_counter() - t)
        distinct.append(len({r.adapter for r in batch}))
        if [len(o) for o in out] != [r.max_tokens for r in batch]:
            raise RuntimeError("baseline returned the wrong number of tokens for a request")
        rates.append((sum(len(o) for o in out) / latencies[-1], len(batch) / latencies[-1]))
        tokens += sum(len(o) for o in out)
        requests += len(batch)
        batches += 1
        if bar is not None:
            bar.update(min(time.perf_counter() - start, duration_s))
    elapsed = time.perf_counter() - start
    return {"requests": requests, "output_tokens": tokens, "duration_s": elapsed,
            "requests_per_s": requests / elapsed, "tokens_per_s": tokens / elapsed,
            "tokens_per_s_median": statistics.median(r[0] for r in rates),
            "requests_per_s_median": statistics.median(r[1] for r in rates),
            "batches": batches, "batch_size": batch_size,
            "distinct_adapters_per_batch": sum(distinct) / len(distinct),
            "batch_latency_s": percentiles(latencies)}


def run_hf_baselines(opts: Any, assets: BenchAssets, counts: Sequence[int]) -> dict[str, Any]:
    """``{"merged": {N: figures or {"skipped": why}}, "peft": {...}}`` for the selected parts."""
    from lora_cluster.bench.hf_baselines import (
        HFModel,
        MergedWeights,
        PeftMixed,
        hf_missing,
        memory_budget_bytes,
    )

    parts = [p for p in ("merged", "peft") if p in opts.parts]
    reason = hf_missing()
    if reason is not None:
        return {p: {"skipped": reason} for p in parts}
    preset = opts.preset
    show = opts.show_progress
    with ProgressBar("loading the HF model", 1, enabled=show):
        hf = HFModel(assets.model_dir, device=preset.device, dtype=preset.dtype)
    out: dict[str, Any] = {}

    def measure(kind: str, n: int, run_batch: RunBatch) -> dict[str, Any]:
        with ProgressBar(f"N={n:>6,} {kind}", preset.baseline_duration_s, enabled=show) as bar:
            figures = measure_batches(run_batch, RequestStream(preset.workload(n, opts.seed)),
                                      batch_size=preset.max_num_seqs,
                                      duration_s=preset.baseline_duration_s, bar=bar)
            bar.note = f"{figures['tokens_per_s']:.0f} tok/s"
        return figures

    if "merged" in parts:
        merged = MergedWeights(hf)
        budget = memory_budget_bytes(preset.device)
        rows: dict[str, Any] = {"memory_budget_bytes": budget}
        for n in counts:
            if n > preset.merged_max_adapters:
                rows[str(n)] = {"skipped": f"over the merged-weights limit "
                                           f"({preset.merged_max_adapters} adapters)"}
                continue
            need = n * merged.bytes_per_adapter
            if merged.sets and need > budget:
                rows[str(n)] = {"skipped": f"does not fit: {n} merged copies need "
                                           f"{need / 2**30:.1f} GiB, budget {budget / 2**30:.1f} GiB"}
                continue
            while len(merged.sets) < n:
                merged.add(assets.adapter_dirs[len(merged.sets)])
            rows[str(n)] = measure("merged", n, merged.run_batch)
        rows["bytes_per_adapter"] = merged.bytes_per_adapter
        merged.restore()
        del merged
        gc.collect()
        out["merged"] = rows
    if "peft" in parts:
        peft = PeftMixed(hf)
        rows = {}
        for n in counts:
            if n > preset.peft_max_adapters:
                rows[str(n)] = {"skipped": f"over the PEFT limit ({preset.peft_max_adapters} "
                                           f"adapters; raise --peft-max-adapters)"}
                continue
            t = time.perf_counter()
            while len(peft.names) < n:
                i = len(peft.names)
                peft.add(adapter_name(i), assets.adapter_dirs[i])
            load_s = time.perf_counter() - t
            rows[str(n)] = {**measure("peft", n, peft.run_batch), "adapter_load_s": load_s}
        out["peft"] = rows
    del hf
    gc.collect()
    _empty_cuda_cache()
    return out


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
