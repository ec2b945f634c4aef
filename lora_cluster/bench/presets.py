"""Benchmark presets: the model, adapters, engine settings and workload of one machine class.

``cpu-tiny``: the tiny Qwen3-MoE fixture (H=96, 2 layers, 8 experts top-2) in float32 on CPU,
rank-8 attention-only adapters, 1 … 10,000 adapters, one torch thread per process (the tiny
model's ops are too small to gain from a second thread, and on a small shared host a 2-thread
region stalls whenever one core is busy elsewhere: measured 2× slower decode steps on 2 cores).
``h100-moe``: a Qwen3-30B-A3B-like MoE at real dimensions (H=2048, 32 q / 4 kv heads of 128,
128 experts top-8, expert I=768, vocab 151,936) with 4 layers and random bf16 weights, rank-16
attention-only adapters, 1 … 1,000 adapters, on one CUDA device. Weights are written at run
time on the machine that runs it (never committed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lora_cluster.bench.workload import WorkloadSpec
from lora_cluster.config import ClusterConfig
from lora_cluster.errors import ConfigError
from lora_cluster.testing.presets import TinyModelSpec, get_spec

ADAPTER_COUNTS = (1, 5, 8, 32, 100, 1000, 10000)


@dataclass(frozen=True, kw_only=True)
class BenchPreset:
    """Everything one benchmark run needs besides durations and the adapter counts to sweep."""

    name: str
    description: str
    model: TinyModelSpec
    model_dtype: str  # on disk
    device: str
    dtype: str
    adapter_rank: int
    adapter_targets: tuple[str, ...] = ("attention",)
    adapter_counts: tuple[int, ...] = ADAPTER_COUNTS
    max_loras: int = 32
    max_cpu_loras: int = 1024
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    kv_cache_bytes: int | None = None
    clients: int = 48  # closed-loop clients (> max_num_seqs keeps the batch full)
    prompt_len: tuple[int, int] = (8, 48)
    output_len: tuple[int, int] = (8, 32)
    warmup_s: float = 4.0
    # Once, before the first N: on a GPU the first minute compiles kernels for new shapes
    # (every prefill length bucket); none of that belongs in the first N's figures.
    initial_warmup_s: float = 0.0
    duration_s: float = 15.0
    windows: int = 3  # closed-loop sub-windows (the median one is the headline figure)
    open_duration_s: float = 15.0
    # Open-loop Poisson rate (requests/s), the same for every N; None: rate_fraction × the
    # smallest N's closed-loop requests/s (for machines whose capacity is not known yet).
    open_rate: float | None = None
    rate_fraction: float = 0.5
    peft_max_adapters: int = 100
    merged_max_adapters: int = 100
    baseline_duration_s: float = 10.0
    step_seqs: int = 32
    step_decode_tokens: int = 24
    # torch intra-op threads for every CPU part (ranks, in-process engine, HF baselines), the
    # same for all; None leaves each at its default.
    cpu_threads: int | None = None

    def cluster_config(self, model_dir: str, **overrides: object) -> ClusterConfig:
        """The engine's settings for this preset (``overrides``: ClusterConfig fields)."""
        cfg = ClusterConfig(
            model=str(model_dir), device=self.device, dtype=self.dtype,  # type: ignore[arg-type]
            max_loras=self.max_loras, max_cpu_loras=self.max_cpu_loras,
            max_lora_rank=self.adapter_rank, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            kv_cache_bytes=self.kv_cache_bytes)
        if self.device == "cpu" and self.cpu_threads:
            cfg = cfg.replace(extra_env=(("LORA_CLUSTER_CPU_THREADS", str(self.cpu_threads)),))
        return cfg.replace(**overrides) if overrides else cfg

    def workload(self, num_adapters: int, seed: int = 0) -> WorkloadSpec:
        """The request stream of one adapter count (same seed → same requests)."""
        return WorkloadSpec(num_adapters=num_adapters, prompt_len=self.prompt_len,
                            output_len=self.output_len,
                            token_range=(4, self.model.vocab_size), seed=seed)

    def replace(self, **changes: object) -> BenchPreset:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


_QWEN3_30B_A3B_LIKE = TinyModelSpec(
    family="qwen3_moe", vocab_size=151_936, hidden_size=2048, intermediate_size=6144,
    num_layers=4, num_heads=32, num_kv_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, moe_intermediate_size=768, max_position_embeddings=4096,
    rope_theta=1_000_000.0)

PRESETS: dict[str, BenchPreset] = {
    "cpu-tiny": BenchPreset(
        name="cpu-tiny",
        description="tiny Qwen3-MoE (H=96, 2 layers, 8 experts top-2), float32, CPU",
        model=get_spec("qwen3_moe"), model_dtype="float32", device="cpu", dtype="float32",
        adapter_rank=8, kv_cache_bytes=64 << 20, open_rate=20.0, cpu_threads=1),
    "h100-moe": BenchPreset(
        name="h100-moe",
        description="Qwen3-30B-A3B-like MoE (H=2048, 128 experts top-8, I=768, 4 layers), "
                    "random bf16 weights, one CUDA device",
        model=_QWEN3_30B_A3B_LIKE, model_dtype="bfloat16", device="cuda", dtype="bfloat16",
        adapter_rank=16, adapter_counts=(1, 5, 8, 32, 100, 1000),
        # A full batch of 128 Zipf draws holds ~48 distinct adapters at N=100 and ~77 at
        # N=1,000: fewer slots than that throttle the batch (measured: 32 slots → 45–65 of
        # 128 sequences running at N ≥ 100).
        max_loras=128, max_cpu_loras=1024,
        max_num_seqs=128, max_num_batched_tokens=8192, clients=160, prompt_len=(64, 192),
        output_len=(32, 96), warmup_s=4.0, initial_warmup_s=45.0, duration_s=15.0,
        open_duration_s=15.0, open_rate=16.0, baseline_duration_s=12.0, step_seqs=32,
        step_decode_tokens=32),
}


def get_preset(name: str) -> BenchPreset:
    """A preset by name (typed error naming the known ones)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset: unknown {name!r} (known: {', '.join(PRESETS)})",
                          field="preset") from None
