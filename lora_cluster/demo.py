"""``lora-cluster demo``: a tiny MoE model, four adapters, one mixed batch, a table."""

from __future__ import annotations

import time
from pathlib import Path

from lora_cluster.cli_format import format_table, print_json, progress


def run_demo(*, cache_dir: Path, device: str = "cpu", as_json: bool = False,
             max_tokens: int = 12) -> int:
    """Write (or reuse) the demo assets, serve one batch mixing every adapter and the base."""
    from lora_cluster import Cluster, ClusterConfig, SamplingParams
    from lora_cluster.testing import DEMO_PROMPTS, demo_assets

    show = not as_json
    with progress(f"writing tiny MoE model and adapters to {cache_dir}", show):
        model_dir, adapters = demo_assets(cache_dir)
    names = list(adapters)
    config = ClusterConfig(model=str(model_dir), device=device,  # type: ignore[arg-type]
                           max_loras=len(names), max_cpu_loras=max(8, len(names)),
                           kv_cache_bytes=32 << 20)
    with progress("starting an embedded local Ray cluster", show):
        cluster = Cluster.start(config)
    with cluster:
        for name, path in adapters.items():
            with progress(f"loading adapter {name!r}", show):
                cluster.load_adapter(name, str(path))
        batch_adapters: list[str | None] = [*names, None]
        prompts = list(DEMO_PROMPTS[: len(batch_adapters)])
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        start = time.perf_counter()
        with progress(f"generating a batch of {len(prompts)} prompts mixing "
                      f"{len(names)} adapters and the base", show):
            results = cluster.generate(prompts, adapters=batch_adapters, sampling=sampling)
        elapsed = time.perf_counter() - start
        new_tokens = sum(len(r.token_ids) for r in results)
        rows = [
            (r.adapter or "(base)", p, r.text if r.text is not None else list(r.token_ids),
             len(r.token_ids), new_tokens / elapsed)
            for p, r in zip(prompts, results)
        ]
        if as_json:
            print_json({"model": str(model_dir), "elapsed_s": elapsed,
                        "tokens_per_s": new_tokens / elapsed,
                        "results": [{"adapter": r.adapter, "prompt": p, "text": r.text,
                                     "token_ids": list(r.token_ids)}
                                    for p, r in zip(prompts, results)]})
        else:
            print(format_table(["adapter", "prompt", "output", "tokens", "batch tok/s"], rows))
            print(f"\n{new_tokens} tokens in {elapsed:.2f} s ({new_tokens / elapsed:.1f} tok/s, "
                  f"one batch, {len(names)} adapters + base, device {config.device})")
    return 0
