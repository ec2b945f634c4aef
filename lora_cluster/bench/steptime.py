"""Decode step time with B sequences on B distinct adapters against all on one adapter.

Runs in process (``ControllerCore`` over ``LocalRankGroup``, no Ray) with a wrapper around
the rank group that times every step: ``forward_ms`` is the rank's own figure (plan → sampled
tokens, device synchronised by the sampler's copy to the host), ``wall_ms`` the controller's
view of the same call. Only steps where every one of the B sequences decodes exactly one
token count. Each mode runs once to warm up (slots placed, CUDA graphs captured) and is then
measured; ``max_loras`` ≥ B so the distinct adapters all hold a slot.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cluster.config import ClusterConfig, SamplingParams
from lora_cluster.engine.messages import Step, StepResult


@dataclass(frozen=True)
class StepSample:
    num_seqs: int
    is_decode: bool
    distinct_slots: int
    forward_ms: float
    wall_ms: float


class TimedRankGroup:
    """A ``RankGroup`` that records every step's size and time (other calls pass through)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.samples: list[StepSample] = []

    def execute(self, command: Step) -> StepResult:
        start = time.perf_counter()
        result = self.inner.execute(command)
        wall = (time.perf_counter() - start) * 1e3
        seqs = command.plan.seqs
        self.samples.append(StepSample(
            num_seqs=len(seqs), is_decode=command.plan.is_decode,
            distinct_slots=len({s.slot for s in seqs if s.slot >= 0}),
            forward_ms=float(result.forward_ms), wall_ms=wall))
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _stats(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0],
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "count": float(len(ordered))}


def measure_decode_steps(config: ClusterConfig, adapter_dirs: Sequence[Path], *,
                         num_seqs: int = 32, decode_tokens: int = 24, prompt_len: int = 16,
                         repeats: int = 2) -> dict[str, Any]:
    """Median decode step time for modes ``base`` (no adapter), ``one`` (all sequences on one
    adapter) and ``distinct`` (each on its own); ``ratio_distinct_vs_one`` is the goal figure."""
    from lora_cluster.bench.target import start_local

    if len(adapter_dirs) < num_seqs:
        raise ValueError(f"need {num_seqs} adapters, got {len(adapter_dirs)}")
    config = config.replace(max_loras=max(config.max_loras, num_seqs),
                            max_cpu_loras=max(config.max_cpu_loras, num_seqs),
                            max_num_seqs=max(config.max_num_seqs, num_seqs))
    timed: list[TimedRankGroup] = []

    def wrap(group: Any) -> TimedRankGroup:
        timed.append(TimedRankGroup(group))
        return timed[-1]

    core = start_local(config, rank_group_wrapper=wrap)
    group = timed[0]
    try:
        names = [f"step{i}" for i in range(num_seqs)]
        for name, path in zip(names, adapter_dirs):
            core.load_adapter(name, str(path))
        vocab = core.spec.vocab_size
        prompts = [[4 + (31 * i + 7 * j) % (vocab - 4) for j in range(prompt_len)]
                   for i in range(num_seqs)]
        sampling = SamplingParams(max_tokens=decode_tokens + 1, ignore_eos=True)
        modes: dict[str, list[str | None]] = {
            "base": [None] * num_seqs, "one": [names[0]] * num_seqs, "distinct": list(names)}
        out: dict[str, Any] = {"num_seqs": num_seqs, "decode_tokens": decode_tokens,
                               "prompt_len": prompt_len, "device": str(core.group_info.device),
                               "max_loras": config.max_loras, "modes": {}}
        for mode, adapters in modes.items():
            forward: list[float] = []
            wall: list[float] = []
            distinct: set[int] = set()
            for rep in range(repeats + 1):
                group.samples.clear()
                core.generate(prompts, adapters, sampling)
                if rep == 0:
                    continue  # warm-up: slots placed, graphs captured, caches hot
                full = [s for s in group.samples if s.is_decode and s.num_seqs == num_seqs]
                forward += [s.forward_ms for s in full]
                wall += [s.wall_ms for s in full]
                distinct.update(s.distinct_slots for s in full)
            if not forward:
                raise RuntimeError(f"step-time mode {mode!r}: no full decode step was observed")
            out["modes"][mode] = {"forward_ms": _stats(forward), "wall_ms": _stats(wall),
                                  "distinct_slots": sorted(distinct)}
        one = out["modes"]["one"]["forward_ms"]["median"]
        out["ratio_distinct_vs_one"] = out["modes"]["distinct"]["forward_ms"]["median"] / one
        out["ratio_one_vs_base"] = one / out["modes"]["base"]["forward_ms"]["median"]
        return out
    finally:
        core.shutdown()
