"""Prefill parts padded to a token bucket (what ``PrefillGraphs`` replays on GPU, run here by
its eager stand-in ``EagerPrefill`` on CPU) give the logits, KV writes and tokens of the
unpadded eager forward and of transformers + PEFT.

Covered: prompts of varied lengths, three adapters and base rows, a chunked prefill
continuing over cached context, single-row sequences riding as 1-row spans, padding rows and
padding sequences, split steps (decodes through the decode stand-in) and whole steps.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # the static-plan kernel test runs Triton interpreted
    os.environ["TRITON_INTERPRET"] = "1"

from test_engine_split import (
    ADAPTERS,
    ARRIVALS,
    MAX_TOKENS,
    SLOTS,
    FixedSlots,
    _assert_oracle_greedy,
    _rel,
    _runtime,
    _wait_for,
)

from lora_cluster.config import ClusterConfig, PrefillBatching, SamplingParams
from lora_cluster.engine.controller_core import ControllerCore
from lora_cluster.engine.messages import SampleSpec, SeqStep, Step
from lora_cluster.engine.prefill_graphs import (
    EagerPrefill,
    PrefillLayout,
    pack_prefill,
    prefill_buckets,
    unpack_prefill,
)
from lora_cluster.engine.rank_group import LocalRankGroup
from lora_cluster.engine.runner import build_batch
from lora_cluster.engine.scheduler import Scheduler, SchedulerConfig
from lora_cluster.engine.sequence import Sequence
from lora_cluster.engine.tokenizer import Tokenizer
from lora_cluster.model.paged_attention import plan_attention
from lora_cluster.model.spec import load_model_spec

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*pattern keys did not match:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]


def test_buckets_and_packed_padding():
    assert prefill_buckets(4096) == (128, 256, 512, 1024, 2048)
    assert prefill_buckets(600) == (128, 256, 512, 600)
    assert prefill_buckets(64) == (64,)
    layout = PrefillLayout(rows=8, seqs=3, width=2)
    a = SeqStep(seq_id=5, token_ids=(11, 12, 13), start_pos=2, slot=1, sample=SampleSpec())
    b = SeqStep(seq_id=6, token_ids=(21,), start_pos=0)
    host = pack_prefill([a, b], [[4, 7], [9]], 4, layout)
    assert host.numel() == layout.tables_at + 2 * layout.width  # padding tables not sent
    packed = torch.full((layout.size,), 99, dtype=torch.int64)  # stale padding tables
    packed[:host.numel()] = host
    batch = unpack_prefill(packed, layout, max_context_len=64)
    assert batch.input_ids.tolist() == [11, 12, 13, 21, 0, 0, 0, 0]
    assert batch.positions.tolist() == [2, 3, 4, 0, 0, 0, 0, 0]
    assert batch.token_slots.tolist() == [1, 1, 1, -1, -1, -1, -1, -1]
    assert batch.kv_slot_mapping.tolist() == [18, 19, 28, 36, -1, -1, -1, -1]
    assert batch.logits_rows.tolist() == [2, 3, 0]
    assert batch.span_table is not None
    assert batch.span_table.tolist() == [[0, 0, 3, 5], [1, 3, 1, 1], [2, 4, 0, 1]]
    assert batch.query_start_loc.tolist() == [0, 3, 4, 4]
    assert batch.block_tables[:2].tolist() == [[4, 7], [9, 0]]
    plan = plan_attention(batch)  # static: nothing read back, every row zeroed first
    assert not plan.decode and plan.spans == () and plan.covered_rows == 0
    assert plan.max_span_rows == 8 and plan.single_rows is None
    with pytest.raises(ValueError, match="do not fit"):
        pack_prefill([a] * 3, [[4, 7]] * 3, 4, PrefillLayout(rows=8, seqs=3, width=2))


def _seq(seq_id: int, tokens: list[int], start: int, table: list[int], slot: int,
         sample: bool = True) -> SeqStep:
    return SeqStep(seq_id=seq_id, token_ids=tuple(tokens), start_pos=start,
                   new_blocks=tuple(table), slot=slot, sample=SampleSpec() if sample else None)


def test_padded_prefill_equals_unpadded_forward(fixture_cache, qwen3_moe_dir):
    """Logits rows and KV writes of the padded batch equal the unpadded eager forward's."""
    adapters = {n: fixture_cache.adapter(qwen3_moe_dir, name=n, **o) for n, o in ADAPTERS.items()}
    rt = _runtime(qwen3_moe_dir, adapters)
    bs = 4
    # Cached context first: sequence 3's first chunk of 8 tokens (blocks 20, 21).
    head = _seq(3, list(range(50, 58)), 0, [20, 21, 22, 23], SLOTS["experts"], sample=False)
    padded, plain = rt.kv_cache, rt.model.make_kv_cache(num_blocks=rt.num_kv_blocks,
                                                        block_size=bs)
    for cache in (padded, plain):
        batch, _ = build_batch([head], [list(head.new_blocks)], block_size=bs, device=rt.device)
        rt.model.forward(batch, cache)
    seqs = [
        _seq(0, [1, 40, 41, 42, 300, 7, 99], 0, [0, 1], SLOTS["attn"]),
        _seq(1, [5, 6, 7], 0, [2], -1),
        dataclasses.replace(head, token_ids=tuple(range(58, 64)), start_pos=8,
                            sample=SampleSpec()),  # continuation over cached context
        _seq(4, [9], 0, [3], SLOTS["all"]),  # a one-token prompt: a 1-row span
        _seq(5, [77], 12, [4, 5, 6, 7], SLOTS["attn"]),  # a decode row at context 13
        _seq(6, list(range(100, 111)), 0, [8, 9, 10], -1, sample=False),  # a chunk: no logits
    ]
    tables = [list(s.new_blocks) for s in seqs]
    # Position 12 of sequence 5 attends 0..11: give it the same cached keys in both caches.
    torch.manual_seed(0)
    for cache in (padded, plain):
        for layer in range(cache.num_layers):
            k, v = cache.layer(layer)
            gen = torch.Generator().manual_seed(layer)
            for block in (4, 5, 6):
                k[block] = torch.randn(k[block].shape, generator=gen)
                v[block] = torch.randn(v[block].shape, generator=gen)
    executor = EagerPrefill(rt.model, padded, device=rt.device, buckets=(16, 40, 64),
                            max_seqs=8, max_blocks_per_seq=6, max_context_len=64)
    assert executor.bucket_for(seqs) == 40  # 29 rows
    got = executor.run(seqs, tables, bs)
    batch, spans = build_batch(seqs, tables, block_size=bs, device=rt.device)
    want = rt.model.forward(batch, plain)
    assert got.shape == (len(seqs), want.shape[1]) and got.dtype == torch.float32
    for i, (begin, end) in enumerate(spans):
        if seqs[i].sample is not None:
            assert end == begin + 1
            assert _rel(got[i], want[begin]) < 1e-5, i
            assert torch.allclose(got[i], want[begin], atol=1e-5, rtol=1e-5)
    assert executor.padding_rows == 40 - 29
    for layer in range(padded.num_layers):  # the same KV written, padding wrote nothing
        for a, b in zip(padded.layer(layer), plain.layer(layer)):
            # (the last block is the padding sink; later layers differ by matmul rounding)
            assert torch.allclose(a[:-1], b[:-1], atol=1e-5, rtol=1e-5), layer
            assert torch.equal(a[:-1] == 0, b[:-1] == 0), layer
    scoring = dataclasses.replace(seqs[0], logits="emit")
    assert executor.bucket_for([scoring]) is None  # every row's logits: eager
    assert executor.bucket_for(seqs * 2) is None  # 12 sequences > max_seqs
    assert executor.bucket_for([_seq(9, list(range(65)), 0, [], -1)]) is None  # > 64 rows


def test_scheduled_steps_through_prefill_stand_in_match_eager(fixture_cache, qwen3_moe_dir):
    """A real scheduler's steps (chunked prefills, scoring, staggered arrivals) through the
    padded prefill executor give the tokens and logits of plain eager steps, and the oracle's."""
    adapters = {n: fixture_cache.adapter(qwen3_moe_dir, name=n, **o) for n, o in ADAPTERS.items()}
    padded, whole = _runtime(qwen3_moe_dir, adapters), _runtime(qwen3_moe_dir, adapters)
    padded.runner.use_eager_decode()
    padded.runner.split_min_decodes = 4  # fewer decodes: they ride in the padded part
    executor = padded.runner.use_eager_prefill(buckets=(4, 8, 16), max_seqs=6)
    sched = Scheduler(SchedulerConfig(num_blocks=padded.num_kv_blocks, block_size=4,
                                      max_num_seqs=8, max_num_batched_tokens=16,
                                      context_limit=padded.context_limit), FixedSlots())
    seqs: list[tuple[Sequence, str | None]] = []
    seen: set[str] = set()
    cmd = 100
    for index in range(200):
        for prompt, name, score in ARRIVALS.get(index, []):
            s = Sequence(seq_id=len(seqs), prompt_ids=tuple(prompt), adapter_name=name,
                         sampling=SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
                         score=score)
            sched.add(s)
            seqs.append((s, name))
        step = sched.schedule()
        if step is None:
            break
        before = executor.runs
        cmd += 1
        got = padded.execute(Step(seq=cmd, plan=step.plan))
        want = whole.execute(Step(seq=cmd, plan=step.plan))
        assert got is not None and want is not None
        if executor.runs > before:
            split = padded.runner.split_of(step.plan) is not None
            seen.add("split" if split else "whole")
            for s in step.plan.seqs:
                if split and len(s.token_ids) == 1:
                    continue
                seen.add("continuation" if s.start_pos > 0 and len(s.token_ids) > 1 else
                         "single" if len(s.token_ids) == 1 else "prompt")
                seen.add("base" if s.slot < 0 else "adapter")
        assert got.tokens == want.tokens, f"step {index}"
        assert [i for i, _ in got.logits] == [i for i, _ in want.logits]
        for (_, a), (_, b) in zip(got.logits, want.logits):
            assert a.shape == b.shape and _rel(a, b) < 1e-5
        sched.apply(step, want.tokens, want.logits)
    stats = padded.runner.stats()
    assert stats["prefill_graph_forwards"] == executor.runs >= 5
    assert stats["prefill_graph_padding_rows"] > 0 and stats["split_steps"] > 0
    assert stats["eager_forwards"] > 0  # scoring prefills stayed eager
    assert seen >= {"split", "whole", "continuation", "single", "prompt", "base", "adapter"}
    for s, name in seqs:
        assert s.is_finished
        if not s.score:
            _assert_oracle_greedy(qwen3_moe_dir, adapters.get(name) if name else None,
                                  s.prompt_ids, s.output_ids)


def test_engine_with_prefill_stand_in_serves_oracle_tokens(fixture_cache, qwen3_moe_dir):
    """The whole engine (controller thread, rank runtime, held admissions) with padded
    prefills and split steps gives the oracle's greedy tokens."""
    adapters = {n: fixture_cache.adapter(qwen3_moe_dir, name=n, **o) for n, o in ADAPTERS.items()}
    cfg = ClusterConfig(model=str(qwen3_moe_dir), device="cpu", dtype="float32", max_loras=4,
                        max_cpu_loras=8, max_lora_rank=16, kv_cache_bytes=4 << 20, block_size=8,
                        max_num_seqs=8, max_num_batched_tokens=24)
    group = LocalRankGroup(cfg)
    core = ControllerCore(cfg, load_model_spec(qwen3_moe_dir), group,
                          Tokenizer.from_model_dir(qwen3_moe_dir))
    try:
        assert group.runtime is not None
        runner = group.runtime.runner
        runner.use_eager_decode()
        executor = runner.use_eager_prefill(buckets=(8, 16, 24))
        runner.split_min_decodes = 2
        core.scheduler.cfg = dataclasses.replace(
            core.scheduler.cfg, prefill_batching=PrefillBatching(hold_steps=3, min_prompts=3))
        for name, path in adapters.items():
            core.load_adapter(name, str(path))
        greedy = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        prompts = [p for arrivals in ARRIVALS.values() for p, _, score in arrivals if not score]
        names = [n for arrivals in ARRIVALS.values() for _, n, score in arrivals if not score]
        long = SamplingParams(max_tokens=3 * MAX_TOKENS, ignore_eos=True)
        handles = [core.submit(p, n, long) for p, n in zip(prompts[:3], names[:3])]
        for prompt, name in zip(prompts[3:], names[3:]):
            _wait_for(lambda: core.stats()["prefill_admitted"] >= len(handles))
            handles.append(core.submit(prompt, name, greedy))
        results = [h.result(120) for h in handles]
        for prompt, name, res in zip(prompts, names, results):
            _assert_oracle_greedy(qwen3_moe_dir, adapters.get(name) if name else None, prompt,
                                  res.token_ids)
        stats = runner.stats()
        assert executor.runs == stats["prefill_graph_forwards"] > 0
        assert stats["split_steps"] > 0
    finally:
        core.shutdown()


def test_static_plan_triton_equals_torch():
    """The graph path's attention (static plan, Triton kernels; interpreted on CPU) equals the
    torch reference: spans of many rows over cached context, 1-row spans, padding spans of
    0 rows over stale tables, padding rows zero."""
    if not torch.cuda.is_available():
        from triton.runtime.interpreter import InterpretedFunction

        module = importlib.import_module("lora_kernels.paged_attention")
        if not isinstance(module._decode_kernel, InterpretedFunction):
            importlib.reload(sys.modules["lora_kernels.paged_attention"])
    from lora_cluster.model import paged_attention as pa
    from lora_cluster.model.batch import ForwardBatch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    block, kv_heads, heads, dim, rows = 4, 2, 4, 32, 16
    k = torch.randn(24, block, kv_heads, dim, generator=gen).to(device)
    v = torch.randn(24, block, kv_heads, dim, generator=gen).to(device)
    q = torch.randn(rows, heads, dim, generator=gen).to(device)
    # (seq, row_start, rows, context): a continuation, a single row, a prompt, padding.
    spans = torch.tensor([[0, 0, 5, 9], [1, 5, 1, 17], [2, 6, 4, 4], [3, 10, 0, 1]],
                         device=device)
    tables = torch.tensor([[3, 7, 1, 0, 0], [2, 9, 11, 4, 8], [5, 0, 0, 0, 0],
                           [999, 999, 999, 999, 999]], dtype=torch.int32, device=device)
    batch = ForwardBatch(
        input_ids=torch.zeros(rows, dtype=torch.long, device=device),
        positions=torch.zeros(rows, dtype=torch.long, device=device),
        token_slots=torch.full((rows,), -1, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, 5, 6, 10, 10], dtype=torch.int32, device=device),
        context_lens=spans[:, 3].to(torch.int32), block_tables=tables,
        kv_slot_mapping=torch.full((rows,), -1, dtype=torch.long, device=device),
        logits_rows=torch.tensor([4, 5, 9, 0], device=device), is_decode=False,
        max_context_len=20, span_table=spans, max_span_rows=rows)
    plan = pa.plan_attention(batch)
    outs = {}
    for backend in ("torch", "triton"):
        with pa.use_attention_backend(backend):
            outs[backend] = pa.paged_attention(q, k, v, batch, plan, dim ** -0.5, None)
    assert torch.isfinite(outs["triton"]).all()
    assert (outs["torch"][10:] == 0).all() and (outs["triton"][10:] == 0).all()
    assert _rel(outs["triton"], outs["torch"]) < 2e-5
