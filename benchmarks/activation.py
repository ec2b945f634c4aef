"""Slot activation on a GPU: throughput vs pinned host→device bandwidth, the host time to
issue one, and decode step time with and without a concurrent activation; old path vs new.

Run (GPU, no Ray):   PYTHONPATH=$PWD:$PWD/kernels python3 benchmarks/activation.py
                     [--layers 8 --hidden 2048 --experts 128 --moe-inter 768 --rank 16 ...]
                     (about a minute on an H100; --no-legacy skips the old-path comparison)
Dry run (CPU, tiny): .venv/bin/python benchmarks/activation.py --dry-run
                     (every code path; JSON to a temp dir unless --out)
CPU, real sizes:     .venv/bin/python benchmarks/activation.py --device cpu --layers 2 ...
                     (host issue time is meaningful on CPU too: a write there is synchronous)

Model: a Qwen3-MoE-shaped rank (default H=2048, 32 q / 4 kv heads × 128, 128 experts top-8
of I=768, vocab 151,936, ``--layers`` decoder layers) with random bf16 weights, built in
memory (slots of rank ``--max-lora-rank``); adapters: LoRA rank ``--rank`` on q/k/v/o and on
every expert's gate/up/down (per-expert, i.e. 2D), slot-ready host-cache entries exactly as a
rank holds them (``slot_ready``: packed into pinned pages). Measured, on one card:

  pinned H2D     one large pinned host → device copy (CUDA events): the bandwidth ceiling
  activation     ``SlotActivator.activate`` on its side stream, nothing else running: device
                 time (events around the write) → bytes/s; host time to issue it. Entries
                 are validated and planned when they enter the host cache (timed apart), the
                 first write into a slot also builds that slot's views (reported apart)
  legacy         the same through the previous path (validate + clear + one copy per tensor
                 from per-tensor pinned copies), for comparison
  decode         decode steps of ``--batch`` sequences at a fixed context (CUDA graphs, as the
                 engine runs them; half the rows on adapters in slots 0/1, half base) — alone,
                 then with activations into spare slots 2/3 issued back to back so one is in
                 flight during (nearly) every step; rounds alternate. Step time is the step's
                 device time (CUDA events) and its wall time; iteration time adds the host time
                 spent issuing the activation.
  correctness    a step that first uses a freshly activated slot equals the same step after a
                 synchronous write (no half-written slot is ever read)

Goals (issue 5): activation ≥ 80 % of pinned H2D bandwidth; decode ≤ 5 % slower with a
concurrent activation. Prints a table; writes benchmarks/results/activation_<card>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine

from lora_cluster.adapters.weights import AdapterWeights, LoRATensors
from lora_cluster.engine.messages import SampleSpec, SeqStep, StepPlan, StepResult
from lora_cluster.engine.runner import StepRunner
from lora_cluster.engine.slot_activation import SlotActivator, slot_ready
from lora_cluster.model.decoder import DecoderModel
from lora_cluster.model.kv_cache import KVCache
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.slot_host import PAGE_BYTES
from lora_cluster.model.spec import ModelSpec, spec_from_hf_config
from lora_cluster.model.step_context import LORA_GROUPS

LORA_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj",
              "experts.gate_proj", "experts.up_proj", "experts.down_proj")
DRY_RUN = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "experts": 8,
           "topk": 2, "moe_inter": 32, "vocab": 512, "rank": 4, "batch": 4, "context": 16,
           "steps": 4, "rounds": 1, "reps": 2, "device": "cpu", "pinned_mb": 4,
           "page_kb": 64}


def build_spec(a: argparse.Namespace) -> ModelSpec:
    return spec_from_hf_config({
        "model_type": "qwen3_moe", "vocab_size": a.vocab, "hidden_size": a.hidden,
        "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim, "num_hidden_layers": a.layers, "intermediate_size": 4 * a.hidden,
        "moe_intermediate_size": a.moe_inter, "num_experts": a.experts,
        "num_experts_per_tok": a.topk, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
        "max_position_embeddings": max(4096, a.context + 64), "rope_theta": 1e6,
        "eos_token_id": 1, "tie_word_embeddings": False})


@torch.no_grad()
def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                max_rank: int) -> DecoderModel:
    """The rank's model with random base weights (LoRA slots stay zero)."""
    model = DecoderModel(spec, dtype=dtype, device=device, max_loras=4, max_lora_rank=max_rank)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, buf in model.named_buffers():
        if buf is None or not buf.is_floating_point() or ".lora." in name or "rotary" in name:
            continue
        if buf.dim() == 1:  # norms
            buf.fill_(1.0)
        else:
            buf.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def make_adapter(model: DecoderModel, name: str, rank: int, dtype: torch.dtype, seed: int,
                 pin: bool, page_bytes: int) -> AdapterWeights:
    """Slot-ready host copies (pinned on GPU hosts) of a random adapter on LORA_KINDS."""
    assert model.slot_table is not None
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for key, target in model.slot_table.targets.items():
        if key[1] not in LORA_KINDS:
            continue
        a_shape = tuple(rank if d == -1 else d for d in target.a_shape)
        b_shape = tuple(rank if d == -1 else d for d in target.b_shape)
        modules[key] = LoRATensors(torch.randn(a_shape, generator=gen) * 0.05,
                                   torch.randn(b_shape, generator=gen) * 0.05, 2.0)
    return AdapterWeights(name, 1, rank, slot_ready(modules, dtype, pin=pin,
                                                    page_bytes=page_bytes))


def legacy_entry(weights: AdapterWeights, pin: bool) -> AdapterWeights:
    """The previous host-cache layout: one (pinned) host tensor per a and b."""
    def own(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous().clone()
        return t.pin_memory() if pin else t
    return AdapterWeights(weights.name, weights.version, weights.rank,
                          {k: LoRATensors(own(t.a), own(t.b), 1.0)
                           for k, t in weights.modules.items()})


class LegacyWriter:
    """The previous slot write, for comparison: validate, clear every buffer of the slot, one
    non-blocking copy per tensor (no plan, no staging)."""

    def __init__(self, model: DecoderModel) -> None:
        self.model = model

    def set_lora_slot(self, slot: int, weights: AdapterWeights) -> None:
        table, groups = self.model.slot_table, self.model.slot_groups
        assert table is not None and groups is not None
        plan = table.validate(weights)  # type: ignore[arg-type]
        table.clear(slot)
        for target, t in plan:
            target.write(slot, t.a, t.b, 1.0)
        has = {target.group for target, _ in plan}
        groups[:, slot].copy_(torch.tensor([g in has for g in LORA_GROUPS]), non_blocking=True)

    def clear_lora_slot(self, slot: int) -> None:
        self.model.clear_lora_slot(slot)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pinned_bandwidth(nbytes: int, device: torch.device, reps: int) -> dict[str, float]:
    """GB/s of one ``nbytes`` copy from pinned host memory to the device (events timed)."""
    cuda = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = []
    for _ in range(reps + 1):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            ms = (time.perf_counter() - t0) * 1e3
        rates.append(nbytes / max(ms, 1e-6) / 1e6)
    rates = rates[1:]  # the first copy pays for page faults / driver setup
    return {"bytes": nbytes, "best_gb_s": max(rates), "median_gb_s": statistics.median(rates)}


def isolated_activation(act: SlotActivator, weights: list[AdapterWeights],
                        device: torch.device, reps: int) -> dict[str, Any]:
    """Activations with nothing else running: device time per activation and issue time.

    The first write of each entry (validation and planning, once per entry) is timed apart.
    """
    issue, device_ms, first = [], [], []
    for i in range(reps + len(weights)):
        sync(device)
        t0 = time.perf_counter()
        act.activate(2 + i % 2, weights[i % len(weights)])
        issued = (time.perf_counter() - t0) * 1e3
        act.synchronize()
        if i < len(weights):
            first.append(issued)  # also pays allocator growth, first touch of pages
            continue
        issue.append(issued)
        if device.type == "cuda":
            device_ms.append(act.finished_timings()[-1][1])
        else:
            device_ms.append(issued)
    nbytes = weights[0].nbytes
    best = min(device_ms)
    return {"bytes": nbytes, "issue_ms_median": statistics.median(issue),
            "issue_ms_min": min(issue), "first_issue_ms_max": max(first),
            "device_ms_median": statistics.median(device_ms), "device_ms_best": best,
            "gb_s_best": nbytes / max(best, 1e-6) / 1e6,
            "gb_s_median": nbytes / max(statistics.median(device_ms), 1e-6) / 1e6}


class Decoder:
    """A batch of sequences decoding at a fixed context through the engine's StepRunner."""

    def __init__(self, model: DecoderModel, spec: ModelSpec, device: torch.device,
                 dtype: torch.dtype, batch: int, context: int, block_size: int = 16) -> None:
        self.device = device
        blocks_per_seq = -(-(context + 1) // block_size)
        self.kv = KVCache.for_model(spec, ParallelInfo(), num_blocks=batch * blocks_per_seq,
                                    block_size=block_size, dtype=dtype, device=device)
        self.runner = StepRunner(model, self.kv, device=device, block_size=block_size,
                                 context_limit=blocks_per_seq * block_size,
                                 max_num_seqs=batch, is_output_rank=True,
                                 use_cuda_graphs=device.type == "cuda")
        self.runner.capture()
        self.slots = [i % 2 if i % 4 < 2 else -1 for i in range(batch)]  # half on adapters
        gen = torch.Generator().manual_seed(1)
        prompts = torch.randint(2, spec.vocab_size, (batch, context), generator=gen).tolist()
        self.seq = 0
        seqs = [SeqStep(seq_id=i, token_ids=tuple(p), start_pos=0, slot=s,
                        new_blocks=tuple(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)),
                        sample=SampleSpec()) for i, (p, s) in enumerate(zip(prompts, self.slots))]
        first = self.run(StepPlan(seqs=tuple(seqs)))
        tokens = dict(first.tokens)
        # Every decode step feeds the same position: constant cost, as long as we like.
        self.decode = StepPlan(seqs=tuple(
            SeqStep(seq_id=i, token_ids=(tokens[i],), start_pos=context,
                    blocks_from=blocks_per_seq, slot=s, sample=SampleSpec())
            for i, s in enumerate(self.slots)))

    def run(self, plan: StepPlan) -> StepResult:
        self.seq += 1
        result = self.runner.run(plan, self.seq)
        assert result is not None
        return result


def decode_rounds(dec: Decoder, act: SlotActivator, spares: list[AdapterWeights],
                  steps: int, rounds: int) -> dict[str, Any]:
    """Alternating rounds: decode alone, then with activations in flight (module docstring)."""
    used = sorted({s for s in dec.slots if s >= 0})
    cuda = dec.device.type == "cuda"
    alone: list[float] = []
    step_only: list[float] = []
    iteration: list[float] = []
    events: dict[str, list[tuple[Any, Any]]] = {"alone": [], "with": []}
    overlapped = issued = 0
    issue_ms: list[float] = []

    def step(mode: str) -> None:
        if not cuda:
            dec.run(dec.decode)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dec.run(dec.decode)
        end.record()
        events[mode].append((start, end))

    for _ in range(steps):  # warm-up
        act.wait_for(used)
        dec.run(dec.decode)
    for _ in range(rounds):
        act.synchronize()
        for _ in range(steps):
            t0 = time.perf_counter()
            act.wait_for(used)
            step("alone")
            alone.append((time.perf_counter() - t0) * 1e3)
        for i in range(steps):
            t0 = time.perf_counter()
            last = act.last_event()
            # GPU: a new activation as soon as the previous one is done (one always in
            # flight); CPU (dry run, synchronous): every other step.
            due = (last is None or bool(last.query())) if cuda else i % 2 == 0
            if due:
                act.activate(2 + issued % 2, spares[issued % 2])
                issued += 1
                issue_ms.append((time.perf_counter() - t0) * 1e3)
            t1 = time.perf_counter()
            in_flight = cuda and not act.last_event().query()
            act.wait_for(used)  # the batch's own slots only: spare-slot writes are not awaited
            step("with")
            t2 = time.perf_counter()
            overlapped += in_flight
            step_only.append((t2 - t1) * 1e3)
            iteration.append((t2 - t0) * 1e3)
    act.synchronize()
    timings = act.finished_timings()
    mean_alone = statistics.mean(alone)
    out = {
        "steps_per_mode": len(alone), "activations_issued": issued,
        "steps_with_activation_in_flight": overlapped,
        "alone_ms_mean": mean_alone, "alone_ms_median": statistics.median(alone),
        "with_activation_iteration_ms_mean": statistics.mean(iteration),
        "with_activation_step_ms_mean": statistics.mean(step_only),
        "with_activation_step_ms_median": statistics.median(step_only),
        "slowdown_iteration": statistics.mean(iteration) / mean_alone - 1.0,
        "slowdown_step": statistics.mean(step_only) / mean_alone - 1.0,
        "issue_ms_mean": statistics.mean(issue_ms) if issue_ms else 0.0,
        "issue_ms_median": statistics.median(issue_ms) if issue_ms else 0.0,
        "concurrent_activation_gb_s": (sum(n for n, _ in timings) / max(
            sum(ms for _, ms in timings), 1e-6) / 1e6) if timings else None,
    }
    if cuda:
        dev = {mode: statistics.mean(s.elapsed_time(e) for s, e in pairs)
               for mode, pairs in events.items()}
        out.update({"alone_device_ms_mean": dev["alone"],
                    "with_activation_device_ms_mean": dev["with"],
                    "slowdown_device": dev["with"] / dev["alone"] - 1.0})
    return out


def correctness(dec: Decoder, act: SlotActivator, model: DecoderModel,
                weights: AdapterWeights) -> dict[str, Any]:
    """A step first using a freshly activated slot == the same step after a synchronous write.

    Also measures what separates a race from rounding: the same step run twice after the
    synchronous write (run-to-run noise), and a side-stream write followed by a full
    synchronize (same write path, no overlap).
    """
    plan = StepPlan(seqs=tuple(SeqStep(seq_id=s.seq_id, token_ids=s.token_ids,
                                       start_pos=s.start_pos, blocks_from=s.blocks_from, slot=2,
                                       sample=SampleSpec(), logits="emit")
                               for s in dec.decode.seqs))

    def max_diff(x: StepResult, y: StepResult) -> float:
        return max(float((a[1] - b[1]).abs().max()) for a, b in zip(x.logits, y.logits))

    act.clear(2)
    act.synchronize()
    act.activate(2, weights)  # queued on the side stream
    act.wait_for([2])
    fresh = dec.run(plan)
    act.synchronize()
    act.clear(2)
    act.synchronize()
    act.activate(2, weights)  # side stream again, but fully finished before the step
    act.synchronize()
    act.wait_for([2])
    after_sync = dec.run(plan)
    model.set_lora_slot(2, weights)  # type: ignore[arg-type]  # same write, default stream
    sync(dec.device)
    settled = dec.run(plan)
    settled_again = dec.run(plan)
    base = StepPlan(seqs=tuple(SeqStep(seq_id=s.seq_id, token_ids=s.token_ids,
                                       start_pos=s.start_pos, blocks_from=s.blocks_from, slot=-1,
                                       sample=SampleSpec(), logits="emit")
                               for s in dec.decode.seqs))
    effect = max_diff(settled, dec.run(base))
    noise = max_diff(settled, settled_again)
    diff = max_diff(fresh, settled)
    return {"max_abs_diff": diff, "side_stream_synced_diff": max_diff(after_sync, settled),
            "run_to_run_noise": noise, "adapter_effect": effect,
            "ok": effect > 0 and diff <= max(noise, 1e-3 * effect)}


def card_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for flag, default in (("layers", 8), ("hidden", 2048), ("heads", 32), ("kv-heads", 4),
                          ("head-dim", 128), ("experts", 128), ("topk", 8), ("moe-inter", 768),
                          ("vocab", 151936), ("rank", 16), ("batch", 32), ("context", 512),
                          ("steps", 100), ("rounds", 4), ("reps", 5), ("pinned-mb", 512),
                          ("page-kb", PAGE_BYTES >> 10)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--max-lora-rank", type=int, default=0,
                   help="slot rank R (default: --rank; larger pads every slot write)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--no-legacy", action="store_true", help="skip the old-path comparison")
    p.add_argument("--dry-run", action="store_true", help="tiny config on CPU (code paths only)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    a = p.parse_args()
    if a.dry_run:
        for k, v in DRY_RUN.items():
            setattr(a, k, v)
    a.max_lora_rank = max(a.max_lora_rank, a.rank)
    return a


def table_rows(bandwidth: dict[str, Any], iso: dict[str, Any], decode: dict[str, Any],
               check: dict[str, Any], legacy: dict[str, Any] | None) -> list[tuple[str, str]]:
    ratio = iso["gb_s_best"] / bandwidth["best_gb_s"]
    rows = [
        ("pinned H2D bandwidth (GB/s, best/median)",
         f"{bandwidth['best_gb_s']:.1f} / {bandwidth['median_gb_s']:.1f}"),
        ("activation throughput (GB/s, best/median)",
         f"{iso['gb_s_best']:.1f} / {iso['gb_s_median']:.1f}"),
        ("activation / pinned bandwidth (goal ≥ 80 %)", f"{100 * ratio:.1f} %"),
        ("activation device ms / host issue ms (median)",
         f"{iso['device_ms_median']:.2f} / {iso['issue_ms_median']:.3f}"),
        ("validate + plan an entry at load / its first write (host ms)",
         f"{iso['prepare_ms']:.2f} / {iso['first_issue_ms_max']:.2f}"),
    ]
    if legacy is not None:
        li = legacy["activation"]
        rows += [
            ("legacy: activation GB/s best (% of pinned)",
             f"{li['gb_s_best']:.1f} ({100 * li['gb_s_best'] / bandwidth['best_gb_s']:.1f} %)"),
            ("legacy: device ms / host issue ms (median)",
             f"{li['device_ms_median']:.2f} / {li['issue_ms_median']:.3f}"),
        ]
    rows += [
        ("decode step alone: wall / device (ms, mean)",
         f"{decode['alone_ms_mean']:.3f} / {decode.get('alone_device_ms_mean', float('nan')):.3f}"),
        ("decode with activation in flight: step wall / device / iteration (ms)",
         f"{decode['with_activation_step_ms_mean']:.3f} / "
         f"{decode.get('with_activation_device_ms_mean', float('nan')):.3f} / "
         f"{decode['with_activation_iteration_ms_mean']:.3f}"),
        ("slowdown step device / step wall / iteration (goal ≤ 5 %)",
         f"{100 * decode.get('slowdown_device', float('nan')):.1f} % / "
         f"{100 * decode['slowdown_step']:.1f} % / {100 * decode['slowdown_iteration']:.1f} %"),
        ("host issue ms per activation during decode (mean)", f"{decode['issue_ms_mean']:.3f}"),
    ]
    if legacy is not None:
        ld = legacy["decode"]
        rows.append(("legacy: slowdown iteration, issue ms during decode",
                     f"{100 * ld['slowdown_iteration']:.1f} %, {ld['issue_ms_mean']:.3f}"))
    rows += [
        ("steps overlapping an activation", f"{decode['steps_with_activation_in_flight']} of "
                                            f"{decode['steps_per_mode']}"),
        ("fresh-slot step == synchronous write", f"{check['ok']} (max diff "
                                                 f"{check['max_abs_diff']:.2e})"),
        ("  side-stream write then sync / run-to-run noise / adapter effect",
         f"{check['side_stream_synced_diff']:.2e} / {check['run_to_run_noise']:.2e} / "
         f"{check['adapter_effect']:.2e}"),
    ]
    return rows


def main() -> None:
    a = parse_args()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if a.device == "auto" else a.device))
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, a.dtype)
    pin = device.type == "cuda"
    spec = build_spec(a)
    t0 = time.perf_counter()
    model = build_model(spec, device, dtype, a.max_lora_rank)
    adapters = [make_adapter(model, f"ad{i}", a.rank, dtype, seed=i, pin=pin,
                             page_bytes=a.page_kb << 10) for i in range(4)]
    act = SlotActivator(model, device)
    t1 = time.perf_counter()
    for w in adapters:
        act.prepare(w)  # as the rank does when an entry enters its host cache
    prepare_ms = (time.perf_counter() - t1) * 1e3 / len(adapters)
    for slot in (0, 1):
        act.activate(slot, adapters[slot])
    act.synchronize()
    setup_s = time.perf_counter() - t0
    pages = {t.untyped_storage().data_ptr() for m in adapters[0].modules.values()
             for t in (m.a, m.b)}
    print(f"device {device} ({card_slug(device)}), {a.layers} layers, adapter "
          f"{adapters[0].nbytes / 2**20:.1f} MiB ({len(adapters[0].modules)} modules, "
          f"{len(pages)} host pages), setup {setup_s:.1f} s", flush=True)

    bandwidth = pinned_bandwidth(max(a.pinned_mb << 20, adapters[0].nbytes), device, a.reps)
    isolated = isolated_activation(act, adapters[2:], device, a.reps)
    isolated["prepare_ms"] = prepare_ms
    dec = Decoder(model, spec, device, dtype, a.batch, a.context)
    decode = decode_rounds(dec, act, adapters[2:], a.steps, a.rounds)
    legacy = None
    if not a.no_legacy:
        old = [legacy_entry(w, pin) for w in adapters[2:]]
        old_act = SlotActivator(LegacyWriter(model), device)
        legacy = {"activation": isolated_activation(old_act, old, device, a.reps),
                  "decode": decode_rounds(dec, old_act, old, a.steps, max(1, a.rounds // 2))}
        del old
    check = correctness(dec, act, model, adapters[3])

    ratio = isolated["gb_s_best"] / bandwidth["best_gb_s"]
    rows = table_rows(bandwidth, isolated, decode, check, legacy)
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    table = model.slot_table
    assert table is not None
    payload = {
        "config": {k: v for k, v in vars(a).items() if k not in ("out",)},
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": machine(), "date": time.strftime("%Y-%m-%d"),
        "adapter_bytes": adapters[0].nbytes, "adapter_modules": len(adapters[0].modules),
        "host_pages": len(pages), "staging_bytes": table.transfer.staging_nbytes,
        "pinned_h2d": bandwidth, "activation": isolated, "activation_vs_pinned": ratio,
        "decode": decode, "legacy": legacy, "correctness": check,
        "goals": {"activation_ge_80pct": ratio >= 0.8,
                  "decode_slowdown_le_5pct": decode["slowdown_iteration"] <= 0.05},
        "dry_run": bool(a.dry_run),
    }
    out = a.out
    if out is None:
        base = Path(tempfile.gettempdir()) if a.dry_run else RESULTS
        out = base / f"activation_{card_slug(device)}{'_dryrun' if a.dry_run else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
