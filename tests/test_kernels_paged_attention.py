"""Triton paged attention against the torch path (itself checked against the HF oracle).

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET is set before the
kernel module is decorated; ``_interpreted`` reloads it if something imported it earlier);
with a GPU the same tests run the compiled kernels. Outputs are poisoned (NaN) so a row the
kernels fail to write fails the comparison. The ``gpu`` tests run real sizes in bf16 and
check CUDA-graph replays against eager calls.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from lora_kernels import paged_attention as kernels  # noqa: E402

from lora_cluster.errors import ConfigError  # noqa: E402
from lora_cluster.model import paged_attention as pa  # noqa: E402
from lora_cluster.model.batch import ForwardBatch  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}
BLOCK = 8  # small blocks: contexts cross many block boundaries
CONTEXTS = (1, 7, 8, 9, 16, 17, 40, 67)  # 1, around block boundaries, several tiles


def _interpreted() -> None:
    if ON_GPU:
        return
    from triton.runtime.interpreter import InterpretedFunction

    module = sys.modules["lora_kernels.paged_attention"]
    if not isinstance(module._decode_kernel, InterpretedFunction):
        importlib.reload(module)


@pytest.fixture(autouse=True)
def _kernels_interpreted() -> Iterator[None]:
    _interpreted()
    yield


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


class Cache:
    """Random K/V blocks and a shuffled block table per sequence (block 0 is a live block)."""

    def __init__(self, contexts: list[int], kv_heads: int, dim: int, dtype: torch.dtype,
                 seed: int, width: int = 12, block: int = BLOCK) -> None:
        gen = torch.Generator().manual_seed(seed)
        num_blocks = len(contexts) * width + 1
        self.k = torch.randn(num_blocks, block, kv_heads, dim, generator=gen).to(DEVICE, dtype)
        self.v = torch.randn(num_blocks, block, kv_heads, dim, generator=gen).to(DEVICE, dtype)
        perm = torch.randperm(num_blocks, generator=gen)
        self.tables = perm[:len(contexts) * width].view(len(contexts), width)
        self.tables = self.tables.to(torch.int32).to(DEVICE)
        self.contexts = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)

    def pad(self, seq: int) -> None:
        """Make ``seq`` a CUDA-graph padding sequence: context 1 over block 0, zero table."""
        self.contexts[seq] = 1
        self.tables[seq] = 0

    def f32(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.float(), self.v.float()


def _torch_decode(q: torch.Tensor, cache: Cache, bound: int, window: int | None) -> torch.Tensor:
    k, v = cache.f32()
    with pa.use_attention_backend("torch"):
        return pa.decode_attention(q.float(), k, v, cache.tables, cache.contexts, bound,
                                   q.shape[-1] ** -0.5, window)


DECODE_CASES = [
    pytest.param(dtype, group, window, splits, id=f"{str(dtype)[6:]}-G{group}-w{window}-s{splits}")
    for dtype in (torch.float32, torch.float16) for group in (1, 2, 4)
    for window in (None, 5) for splits in (1, 4)
]


@pytest.mark.parametrize(("dtype", "group", "window", "splits"), DECODE_CASES)
def test_decode_matches_torch(dtype: torch.dtype, group: int, window: int | None,
                              splits: int) -> None:
    kv_heads, dim = 2, 32
    cache = Cache([*CONTEXTS, 5], kv_heads, dim, dtype, seed=group * 10 + splits)
    cache.pad(len(CONTEXTS))  # the last sequence is a graph padding row
    gen = torch.Generator().manual_seed(group)
    q = torch.randn(len(CONTEXTS) + 1, kv_heads * group, dim, generator=gen).to(DEVICE, dtype)
    bound = 96  # a bucket bound well past every length: splits past them must exit
    out = torch.full_like(q, float("nan"))
    got = kernels.paged_decode(q, cache.k, cache.v, cache.tables, cache.contexts, bound,
                               dim ** -0.5, window, out=out,
                               config=kernels.DecodeConfig(block_n=16, num_splits=splits))
    assert got is out and torch.isfinite(out).all()
    assert _rel(out, _torch_decode(q, cache, bound, window)) < TOL[dtype]
    if splits > 1:
        assert kernels.decode_splits(q.shape[0], kv_heads, bound, q.device, 16, splits)[0] > 1


def test_decode_dispatch_and_odd_head_dim() -> None:
    """decode_attention forced to Triton (auto splits, non-power-of-two D, a 16-key block)."""
    cache = Cache([3, 16, 31, 50], kv_heads=3, dim=24, dtype=torch.float32, seed=3, block=16)
    q = torch.randn(4, 6, 24).to(DEVICE)
    with pa.use_attention_backend("triton"):
        got = pa.decode_attention(q, cache.k, cache.v, cache.tables, cache.contexts, 64,
                                  24 ** -0.5, None)
    assert _rel(got, _torch_decode(q, cache, 64, None)) < TOL[torch.float32]


def test_decode_splits_static() -> None:
    """Split counts come from shapes only; partitions cover the bound; full grids never split."""
    dev = torch.device("cpu")
    assert kernels.decode_splits(128, 4, 4096, dev) == (1, 4096)
    splits, part = kernels.decode_splits(1, 4, 4096, dev)
    assert splits > 1 and part >= kernels.MIN_PARTITION and splits * part >= 4096
    assert kernels.decode_splits(1, 4, 300, dev)[0] == 1  # too short to be worth a reduce
    assert kernels.decode_splits(2, 2, 40, dev, 16, 4) == (3, 16)


def _general_batch(cache: Cache, rows: list[int], total_rows: int) -> ForwardBatch:
    """A general step: sequence b has rows[b] new rows (its last ones), then padding rows."""
    starts = [0]
    for n in rows:
        starts.append(starts[-1] + n)
    t = total_rows
    return ForwardBatch(
        input_ids=torch.zeros(t, dtype=torch.long, device=DEVICE),
        positions=torch.zeros(t, dtype=torch.long, device=DEVICE),
        token_slots=torch.full((t,), -1, dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        context_lens=cache.contexts, block_tables=cache.tables,
        kv_slot_mapping=torch.full((t,), -1, dtype=torch.long, device=DEVICE),
        logits_rows=torch.zeros(1, dtype=torch.long, device=DEVICE),
        is_decode=False, max_context_len=int(cache.contexts.max()),
    )


GENERAL_CASES = [
    pytest.param(dtype, group, window, id=f"{str(dtype)[6:]}-G{group}-w{window}")
    for dtype in (torch.float32, torch.float16) for group in (1, 2, 4) for window in (None, 6)
]


@pytest.mark.parametrize(("dtype", "group", "window"), GENERAL_CASES)
def test_general_step_matches_torch(dtype: torch.dtype, group: int, window: int | None) -> None:
    """Prefill spans (whole prompts, a chunk after cached context, a block-sized span) beside
    single rows, in two launches into a poisoned output; padding rows come out zero."""
    contexts = [17, 40, 1, 16, 67, 9, 33]
    rows = [17, 12, 1, 16, 1, 2, 1]
    kv_heads, dim = 2, 32
    cache = Cache(contexts, kv_heads, dim, dtype, seed=group + 100)
    batch = _general_batch(cache, rows, sum(rows) + 3)
    plan = pa.plan_attention(batch)
    assert len(plan.spans) == 4 and plan.covered_rows == sum(rows)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(batch.num_tokens, kv_heads * group, dim, generator=gen).to(DEVICE, dtype)
    out = torch.full_like(q, float("nan"))
    pa._triton_general(q, cache.k, cache.v, batch, plan, dim ** -0.5, window, out)
    k, v = cache.f32()
    with pa.use_attention_backend("torch"):
        want = pa.paged_attention(q.float(), k, v, batch, plan, dim ** -0.5, window)
    assert torch.isfinite(out).all()
    assert (out[sum(rows):] == 0).all()
    assert _rel(out, want) < TOL[dtype]
    with pa.use_attention_backend("triton"):  # the dispatching entry point
        again = pa.paged_attention(q, cache.k, cache.v, batch, plan, dim ** -0.5, window)
    assert torch.equal(again, out)


@pytest.mark.parametrize("block_m", [16, 64])
def test_span_attention_dispatch(block_m: int) -> None:
    """One span through span_attention, and a whole prompt with row tiles smaller than it."""
    cache = Cache([45], kv_heads=2, dim=32, dtype=torch.float32, seed=5)
    q = torch.randn(45, 4, 32).to(DEVICE)
    k, v = cache.f32()
    with pa.use_attention_backend("torch"):
        want = pa.span_attention(q[30:], k, v, cache.tables[0], 45, 32 ** -0.5, 4)
    with pa.use_attention_backend("triton"):
        got = pa.span_attention(q[30:], cache.k, cache.v, cache.tables[0], 45, 32 ** -0.5, 4)
    assert _rel(got, want) < TOL[torch.float32]
    spans = torch.tensor([[0, 0, 45, 45]], dtype=torch.long, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    kernels.paged_prefill(q, cache.k, cache.v, cache.tables, spans, 45, 32 ** -0.5, None,
                          out=out, config=kernels.PrefillConfig(block_m=block_m, block_n=16))
    with pa.use_attention_backend("torch"):
        full = pa.span_attention(q, k, v, cache.tables[0], 45, 32 ** -0.5, None)
    assert _rel(out, full) < TOL[torch.float32]


def test_backend_switch() -> None:
    with pytest.raises(ConfigError, match="attention backend"):
        pa.set_attention_backend("flash")
    with pa.use_attention_backend("torch"):
        assert not pa._use_triton(torch.zeros(1, device=DEVICE))
    assert pa._use_triton(torch.zeros(1, device=DEVICE)) == ON_GPU
    with pytest.raises(ValueError, match="multiple of KV heads"):
        kernels.paged_decode(torch.zeros(1, 3, 8), torch.zeros(2, 4, 2, 8),
                             torch.zeros(2, 4, 2, 8), torch.zeros(1, 1, dtype=torch.int32),
                             torch.ones(1, dtype=torch.int32), 4, 1.0, None)


@pytest.mark.parametrize("window", [None, 3])
def test_model_with_triton_attention_matches_transformers(tmp_path, window) -> None:
    """A tiny Mistral (GQA 4/2) through prefill, chunked prefill, mixed and decode steps with
    attention on the kernels equals transformers (float32: 1e-4, same greedy tokens)."""
    from model_support import make_checkpoint, rel_err, run_prompts

    from lora_cluster.model.loader import load_model

    hf = make_checkpoint(tmp_path / "mistral", "mistral", sliding_window=window)
    hf.config._attn_implementation = "eager"
    model = load_model(tmp_path / "mistral", dtype="float32", device=DEVICE)
    prompts = [[(5 * i + 1) % 90 for i in range(14)], [44, 20, 91], [7, 7, 60, 3, 81]]
    cache = model.make_kv_cache(num_blocks=32, block_size=4)

    def forward(b: ForwardBatch) -> torch.Tensor:
        moved = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in vars(b).items()}
        return model(ForwardBatch(**moved), cache).cpu()

    with pa.use_attention_backend("triton"):
        trace = run_prompts(forward, prompts, [-1] * 3, new_tokens=4, chunk_first=5)
    for s, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + trace.generated[s][:-1]])).logits[0]
        # On a GPU the model's other Triton float32 dots may run in TF32.
        assert rel_err(trace.full_logits(s), ref) <= (5e-3 if ON_GPU else 1e-4)
        assert trace.generated[s] == ref[len(prompt) - 1:].argmax(-1).tolist()


@pytest.mark.skipif(ON_GPU, reason="the dry run is the interpreter's; the GPU runs the real one")
def test_benchmark_dry_run() -> None:
    """benchmarks/attention.py end to end on tiny shapes: every path agrees with float32 torch."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "attention.py"
    spec = importlib.util.spec_from_file_location("attention_benchmark", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses resolve annotations through it
    spec.loader.exec_module(bench)
    rows = bench.main(["--dry-run"])
    assert {r["path"] for r in rows} >= {"torch", "triton"}
    assert all(r["rel_err"] < 1e-5 and r["us"] > 0 for r in rows)


# ---- real sizes on a GPU --------------------------------------------------------------------

def _real_cache(contexts: list[int], seed: int) -> Cache:
    return Cache(contexts, kv_heads=4, dim=128, dtype=torch.bfloat16, seed=seed, width=256,
                 block=16)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("num_seqs", [1, 8, 128])
@pytest.mark.parametrize("window", [None, 1000])
@pytest.mark.parametrize("forced_splits", [None, 1, 8])
def test_gpu_decode_real_sizes(num_seqs: int, window: int | None,
                               forced_splits: int | None) -> None:
    gen = torch.Generator().manual_seed(num_seqs)
    contexts = torch.randint(1, 4096, (num_seqs,), generator=gen).tolist()
    cache = _real_cache(contexts, seed=num_seqs)
    q = torch.randn(num_seqs, 32, 128, generator=gen).to(DEVICE, torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    kernels.paged_decode(q, cache.k, cache.v, cache.tables, cache.contexts, 4096, 128 ** -0.5,
                         window, out=out, config=kernels.DecodeConfig(num_splits=forced_splits))
    assert _rel(out, _torch_decode(q, cache, 4096, window)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_gpu_general_real_sizes() -> None:
    """Two 160-token prompts (one after 300 cached tokens) beside 126 decodes, bf16."""
    gen = torch.Generator().manual_seed(11)
    decodes = torch.randint(1, 1200, (126,), generator=gen).tolist()
    contexts, rows = [160, 460, *decodes], [160, 160] + [1] * 126
    cache = _real_cache(contexts, seed=11)
    batch = _general_batch(cache, rows, sum(rows) + 8)
    plan = pa.plan_attention(batch)
    q = torch.randn(batch.num_tokens, 32, 128, generator=gen).to(DEVICE, torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    for window in (None, 100):
        pa._triton_general(q, cache.k, cache.v, batch, plan, 128 ** -0.5, window, out)
        k, v = cache.f32()
        with pa.use_attention_backend("torch"):
            want = pa.paged_attention(q.float(), k, v, batch, plan, 128 ** -0.5, window)
        assert _rel(out, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("num_seqs", [2, 128])
def test_gpu_decode_graph_replay(num_seqs: int) -> None:
    """Captured once with a 4096 bound, replayed for new lengths and tables = eager calls."""
    gen = torch.Generator().manual_seed(num_seqs + 1)
    cache = _real_cache([1] * num_seqs, seed=num_seqs)
    q = torch.randn(num_seqs, 32, 128, generator=gen).to(DEVICE, torch.bfloat16)
    ctx, tables = cache.contexts.clone(), cache.tables.clone()

    def step() -> torch.Tensor:
        with pa.use_attention_backend("auto"):
            return pa.decode_attention(q, cache.k, cache.v, tables, ctx, 4096, 128 ** -0.5, None)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for trial in range(3):
        ctx.copy_(torch.randint(1, 4096, (num_seqs,), generator=gen).to(torch.int32))
        tables.copy_(torch.roll(cache.tables, trial + 1, dims=0))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, step())
