"""The model on CUDA: Triton LoRA kernels match the CPU path, and a decode step with mixed LoRA
slots is captured in a CUDA graph and replayed (capture fails on any host sync).

Runs only with a GPU (``-m gpu``); also runnable as a script: ``python tests/test_model_gpu.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from model_support import PagedSequences, rel_err, run_prompts, shard_adapter

from lora_cluster.model.batch import ForwardBatch
from lora_cluster.model.loader import load_model
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.testing import build_adapter, write_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[5, 17, 33, 9, 100, 250, 7, 8, 61], [44, 20, 91], [7, 7, 150, 3, 81, 19]]
SLOTS = [0, 2, -1]


def _models(family: str, root: Path, device: str, dtype: torch.dtype):
    model_dir = write_tiny_model(root / family, family, tokenizer=False)
    model = load_model(model_dir, device=device, dtype=dtype, max_loras=4, max_lora_rank=8)
    second = ["attention", "experts"] if family in ("qwen2_moe", "qwen3_moe_dense_layers",
                                                    "mixtral") else ["attention"]
    for slot, (targets, seed) in {0: (["all"], 1), 2: (second, 2)}.items():
        fixture = build_adapter(model_dir, targets=targets, r=8, seed=seed,
                                rank_pattern={"o_proj": 4})
        model.set_lora_slot(slot, shard_adapter(fixture.modules, model.spec, ParallelInfo()))
    return model


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe_dense_layers", "mixtral"])
def test_cuda_matches_cpu(tmp_path, family) -> None:
    cpu = _models(family, tmp_path / "cpu", "cpu", torch.float32)
    gpu = _models(family, tmp_path / "gpu", "cuda", torch.float32)
    traces = {}
    for name, model in (("cpu", cpu), ("gpu", gpu)):
        cache = model.make_kv_cache(num_blocks=96, block_size=4)

        def fwd(b: ForwardBatch, m=model, c=cache) -> torch.Tensor:
            return m(_to(b, m.device), c).cpu()
        traces[name] = run_prompts(fwd, PROMPTS, SLOTS, new_tokens=4, chunk_first=4)
    for s in range(len(PROMPTS)):
        # Triton float32 dots may run in TF32: a looser bound than the CPU's 1e-4.
        assert rel_err(traces["gpu"].full_logits(s), traces["cpu"].full_logits(s)) <= 5e-3
        assert traces["gpu"].generated[s] == traces["cpu"].generated[s]


def _to(b: ForwardBatch, device: torch.device) -> ForwardBatch:
    fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(b).items()}
    return ForwardBatch(**fields)


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_decode_step_is_cuda_graph_capturable(tmp_path, family) -> None:
    model = _models(family, tmp_path, "cuda", torch.bfloat16)
    cache = model.make_kv_cache(num_blocks=64, block_size=4)
    paged = PagedSequences(4, 64)
    model(_to(paged.step([(s, p, SLOTS[s]) for s, p in enumerate(PROMPTS)]), model.device), cache)
    step = _to(paged.step([(s, [s + 3], SLOTS[s]) for s in range(3)], decode=True,
                          max_blocks=8), model.device)
    static = {k: v.clone() for k, v in vars(step).items() if isinstance(v, torch.Tensor)}
    batch = ForwardBatch(**static, is_decode=True, max_context_len=step.max_context_len)
    snapshot = [t.clone() for t in (*cache.keys, *cache.values)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model(batch, cache)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(batch, cache)

    for slots in ([0, 2, -1], [-1, 0, 2], [2, 2, 2]):
        for t, s in zip((*cache.keys, *cache.values), snapshot):
            t.copy_(s)
        static["token_slots"].copy_(torch.tensor(slots, dtype=torch.int32))
        graph.replay()
        replayed = out.clone()
        for t, s in zip((*cache.keys, *cache.values), snapshot):
            t.copy_(s)
        eager = model(batch, cache)
        assert torch.isfinite(replayed).all()
        assert rel_err(replayed, eager) <= 1e-2, slots
        assert torch.equal(replayed.argmax(-1), eager.argmax(-1))


if __name__ == "__main__":
    import sys
    import traceback

    from lora_kernels import ops

    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(f"cuda == cpu [{b}] {f}", b, test_cuda_matches_cpu, f)
                for b in ("reference", "auto") for f in ("qwen2_moe", "qwen3_moe_dense_layers",
                                                         "mixtral", "llama")]
        runs += [(f"graph {f}", "auto", test_decode_step_is_cuda_graph_capturable, f)
                 for f in ("llama", "qwen2_moe")]
        for i, (label, backend, fn, fam) in enumerate(runs):
            try:
                with ops.use_backend(backend):
                    fn(Path(tmp) / str(i), fam)
                print("PASS", label, flush=True)
            except Exception:
                failed += 1
                print("FAIL", label, traceback.format_exc(limit=3)[-1500:], flush=True)
    sys.exit(1 if failed else 0)
