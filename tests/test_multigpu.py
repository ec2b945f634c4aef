"""Issue #7 on a multi-GPU host: the rank group over NCCL through the real ``Cluster`` handle.

One rank per GPU, every rank in one placement group on one host. float32 (TF32 off): greedy
tokens of a mixed-adapter batch (attention, expert, all-module adapters and base rows) at each
layout equal the single-GPU run of the same settings; bf16: score logits within 1e-2 relative
in norm of the single-GPU bf16 run. A rank killed mid-batch: the request finishes after the
group is rebuilt (same tokens) or fails with ClusterError, in bounded time, and the cluster
serves again. A collective whose peer died never completes, and its rank can be ended from outside.

Marked ``multigpu`` (deselected by default). On the GPU host:
``pytest -m multigpu tests/test_multigpu.py`` (a case skips unless
``torch.cuda.device_count()`` covers its world size). ``LORA_CLUSTER_MULTIGPU_CPU=1`` runs the
same cases on CPU ranks over gloo (world sizes 2 and 4, no CUDA; the bf16 cases skip).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import ray
import torch

from lora_cluster import Cluster, ClusterConfig, SamplingParams, errors

# Before Ray starts: the driver, and every process Ray spawns from it, keep NVLink multicast off.
os.environ["NCCL_NVLS_ENABLE"] = "0"

CPU_MODE = os.environ.get("LORA_CLUSTER_MULTIGPU_CPU") == "1"
DEVICE = "cpu" if CPU_MODE else "cuda"

pytestmark = [pytest.mark.multigpu, pytest.mark.ray,
              pytest.mark.skipif(not CPU_MODE and torch.cuda.device_count() < 2,
                                 reason="needs 2+ CUDA devices (or LORA_CLUSTER_MULTIGPU_CPU=1)")]

ADAPTERS = {
    "attn": {"targets": ["attention"], "r": 8, "alpha": 16, "seed": 71},
    "experts": {"targets": ["experts"], "r": 8, "alpha": 16, "seed": 72},
    "all": {"targets": ["all"], "r": 16, "alpha": 32, "seed": 73, "use_rslora": True},
    "fused3d": {"targets": ["attention", "experts"], "r": 4, "alpha": 8, "seed": 74,
                "expert_format": "3d"},
}
PROMPTS = [[1, 17, 42, 99, 7], [1, 200, 5, 9], [1, 33, 34, 35, 36, 37, 38], [1, 250, 251],
           [1, 8, 16, 32, 64]]
NAMES: list[str | None] = ["attn", "experts", None, "all", "fused3d"]
MAX_NEW = 8
# (tp, ep); the tiny Qwen3-MoE has 8 experts (divisible by every ep here) and 8 heads.
LAYOUTS = [(2, 1), (1, 2), (2, 2), (1, 4)]
# The dead-rank drill: the step deadline (also the collectives' timeout) and the time a
# rebuild may take on top (new actors, model load, CUDA graph capture, adapters restored).
STEP_TIMEOUT_S = 30.0
REBUILD_SLACK_S = 150.0
# Long enough that the kill lands mid-batch (a GPU step takes milliseconds, the kill tens of
# them), short enough to stay clear of near-ties late in a sequence; within the 256-token
# context of the fixture.
DRILL_TOKENS = 24 if CPU_MODE else 96


@dataclass(frozen=True)
class Outputs:
    """One layout's answers: greedy tokens and score logits per prompt."""

    tokens: list[list[int]]
    logits: list[torch.Tensor]


def _need(world: int) -> None:
    if not CPU_MODE and torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices, {torch.cuda.device_count()} visible")


def _config(model_dir: Any, dtype: str, **changes: Any) -> ClusterConfig:
    cfg = ClusterConfig(model=str(model_dir), device=DEVICE, dtype=dtype,  # type: ignore[arg-type]
                        max_loras=4, max_cpu_loras=8, max_lora_rank=16,
                        kv_cache_bytes=16 << 20, max_num_seqs=8, max_num_batched_tokens=256,
                        prefill_hold_steps=0)
    if dtype == "float32" and not CPU_MODE:
        # TF32 off in cuBLAS/cuDNN in every rank (torch's matmul default is already off).
        cfg = cfg.replace(extra_env=(("NVIDIA_TF32_OVERRIDE", "0"),))
    return cfg.replace(**changes)


def _start(assets: Any, dtype: str, **changes: Any) -> Cluster:
    model_dir, dirs = assets
    cluster = Cluster.start(_config(model_dir, dtype, **changes))
    try:
        for name, path in dirs.items():
            cluster.load_adapter(name, str(path))
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def _run(cluster: Cluster, max_tokens: int = MAX_NEW) -> Outputs:
    results = cluster.generate(PROMPTS, adapters=NAMES,
                               sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return Outputs([list(r.token_ids) for r in results], cluster.score(PROMPTS, adapters=NAMES))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def _on_ranks(cluster: Cluster, fn: Callable[[Any], Any]) -> list[Any]:
    """``fn(rank_actor_impl)`` on every rank of the cluster, in rank order."""
    def visit(controller: Any) -> list[Any]:
        import ray

        actors = controller.core.group._actors
        return ray.get([a.__ray_call__.remote(fn) for a in actors], timeout=60)

    return ray.get(cluster._controller.__ray_call__.remote(visit), timeout=120)


def _probe() -> Callable[[Any], dict[str, Any]]:
    # A local function: pickled by value, so the rank processes need not import this module.
    def probe(rank: Any) -> dict[str, Any]:
        import os

        import ray
        import torch
        import torch.distributed as dist

        return {"rank": rank.parallel.rank,
                "node": ray.get_runtime_context().get_node_id(),
                "gpus": [str(g) for g in ray.get_gpu_ids()],
                "backend": str(dist.get_backend()) if dist.is_initialized() else None,
                "nvls": os.environ.get("NCCL_NVLS_ENABLE"),
                "tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
    return probe


def _check_placement(cluster: Cluster, world: int, dtype: str) -> None:
    """One host, one GPU per rank, the expected backend, NVLink multicast off everywhere."""
    probes = _on_ranks(cluster, _probe())
    assert [p["rank"] for p in probes] == list(range(world))
    assert len({p["node"] for p in probes}) == 1, probes
    table = ray.util.placement_group_table(cluster._placement.group)
    assert table["strategy"] == "PACK" and len(set(table["bundles_to_node_id"].values())) == 1
    assert all(p["nvls"] == "0" for p in probes), probes
    if world > 1:
        assert {p["backend"] for p in probes} == {"gloo" if CPU_MODE else "nccl"}, probes
    if not CPU_MODE:
        assert all(len(p["gpus"]) == 1 for p in probes), probes
        assert len({p["gpus"][0] for p in probes}) == world, probes
    if dtype == "float32":
        assert not any(p["tf32"] for p in probes), probes


@pytest.fixture(scope="module")
def assets(ray_session: Any, fixture_cache: Any) -> tuple[Any, dict[str, Any]]:
    model_dir = fixture_cache.model("qwen3_moe")
    return model_dir, {n: fixture_cache.adapter(model_dir, **o) for n, o in ADAPTERS.items()}


@pytest.fixture(scope="module")
def single(assets: Any) -> Callable[[str], Outputs]:
    """The single-GPU (tp = ep = 1) answers per dtype, computed once on first use."""
    cache: dict[str, Outputs] = {}

    def get(dtype: str) -> Outputs:
        if dtype not in cache:
            _need(1)
            with _start(assets, dtype) as cluster:
                _check_placement(cluster, 1, dtype)
                cache[dtype] = _run(cluster)
        return cache[dtype]

    return get


# First: cheap, and independent of Ray (a call cut short still has it).
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective_worker(rank: int, port: int, device: str, timeout_s: float, queue: Any) -> None:
    """One rank of a 2-rank group: both all-reduce once, then rank 1 dies and rank 0 tries a
    second all-reduce. Reports what rank 0 saw; a watchdog abort ends the process instead."""
    from lora_cluster.cluster.dist_comm import TorchDistComm
    from lora_cluster.model.parallel import ParallelInfo

    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if device == "cuda" else "gloo"
    comm = TorchDistComm(ParallelInfo.from_rank(rank, 1, 2, "contiguous"), "127.0.0.1", port,
                         backend, timeout_s=timeout_s)
    x = torch.ones(1024, device=device)
    comm.all_reduce_world(x)
    if device == "cuda":
        torch.cuda.synchronize()
    queue.put((rank, "first", float(x[0])))
    if rank == 1:
        os._exit(0)
    time.sleep(1.0)  # rank 1 is gone by now
    try:
        comm.all_reduce_world(x)
        if device == "cuda":
            torch.cuda.synchronize()
        queue.put((rank, "completed", float(x[0])))
    except BaseException as exc:
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}"[:300]))
    os._exit(0)


def test_collective_with_a_dead_peer_never_completes_and_its_rank_can_be_ended() -> None:
    """What the controller relies on when a peer dies mid-collective: the survivor's collective
    never reports success, and the survivor can be ended from outside within seconds.

    gloo raises in the survivor. NCCL (torch 2.11, NCCL 2.28, measured on 2 x H100) logs the
    watchdog timeout after ``timeout_s`` but leaves the process alive, blocked on the GPU,
    under every TORCH_NCCL_ASYNC_ERROR_HANDLING mode tried (1 and 3) and with
    TORCH_NCCL_BLOCKING_WAIT=1: so the controller's step deadline kills the group's actors
    (``ray.kill``, a SIGKILL) rather than waiting for ranks to end themselves.
    """
    _need(2)
    timeout_s = 10.0
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()  # writes at put(): nothing lost to os._exit
    port = _free_port()
    procs = [ctx.Process(target=_collective_worker, args=(r, port, DEVICE, timeout_s, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    killed_after: float | None = None
    try:
        procs[1].join(timeout=120)
        assert not procs[1].is_alive(), "rank 1 did not exit"
        started = time.monotonic()
        procs[0].join(timeout=timeout_s + 15)
        ended_alone = not procs[0].is_alive()
        if not ended_alone:
            kill_at = time.monotonic()
            procs[0].kill()
            procs[0].join(timeout=30)
            assert not procs[0].is_alive(), "rank 0 survived SIGKILL for 30 s"
            killed_after = time.monotonic() - kill_at
        took = time.monotonic() - started
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    seen: list[tuple[int, str, Any]] = []
    while not queue.empty():
        seen.append(queue.get())
    how = ("raised" if any(what == "error" for _, what, _ in seen)
           else "ended by itself" if ended_alone else f"killed, gone {killed_after:.2f}s later")
    print(f"\n[dead peer] rank 0 after rank 1 died: {how} ({took:.1f}s, exit "
          f"{procs[0].exitcode}): {seen}")
    assert {(r, what) for r, what, _ in seen} >= {(0, "first"), (1, "first")}, seen
    assert all(v == 2.0 for _, what, v in seen if what == "first"), seen
    assert not any(what == "completed" for _, what, _ in seen), seen
    if CPU_MODE:
        assert any(what == "error" for _, what, _ in seen), seen


@pytest.mark.parametrize(("tp", "ep"), LAYOUTS, ids=[f"tp{t}-ep{e}" for t, e in LAYOUTS])
def test_float32_tokens_equal_single_gpu(assets: Any, single: Any, tp: int, ep: int) -> None:
    _need(tp * ep)
    want = single("float32")
    with _start(assets, "float32", tp_size=tp, ep_size=ep) as cluster:
        _check_placement(cluster, tp * ep, "float32")
        got = _run(cluster)
        per_rank = {i.name: i.bytes_per_rank for i in cluster.list_adapters()}
    errs = [_rel(g, w) for g, w in zip(got.logits, want.logits)]
    print(f"\n[float32 tp={tp} ep={ep}] score logits vs one rank: max rel err {max(errs):.2e}")
    assert got.tokens == want.tokens
    assert [g.shape for g in got.logits] == [w.shape for w in want.logits]
    assert max(errs) < 1e-4, errs
    assert all(len(b) == tp * ep for b in per_rank.values())


@pytest.mark.parametrize(("tp", "ep"), LAYOUTS, ids=[f"tp{t}-ep{e}" for t, e in LAYOUTS])
def test_bf16_logits_near_single_gpu(assets: Any, single: Any, tp: int, ep: int) -> None:
    if CPU_MODE:
        pytest.skip("bf16 is checked on CUDA only")
    _need(tp * ep)
    want = single("bfloat16")
    with _start(assets, "bfloat16", tp_size=tp, ep_size=ep) as cluster:
        _check_placement(cluster, tp * ep, "bfloat16")
        got = _run(cluster)
    errs = [_rel(g, w) for g, w in zip(got.logits, want.logits)]
    print(f"\n[bf16 tp={tp} ep={ep}] score logits vs one GPU: max rel err {max(errs):.2e}")
    assert max(errs) < 1e-2, errs


def test_killed_rank_mid_batch_is_bounded_and_the_cluster_serves_again(
        assets: Any, single: Any) -> None:
    _need(2)
    want = single("float32")
    drill = SamplingParams(max_tokens=DRILL_TOKENS, ignore_eos=True)
    with _start(assets, "float32", ep_size=2, step_timeout_s=STEP_TIMEOUT_S) as cluster:
        out: dict[str, Any] = {}

        def run() -> None:
            try:
                out["results"] = cluster.generate(PROMPTS, adapters=NAMES, sampling=drill)
            except BaseException as exc:
                out["error"] = exc
            out["ended"] = time.monotonic()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        deadline = time.monotonic() + 60
        while cluster.stats().get("generated_tokens", 0) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        at_kill = cluster.stats().get("generated_tokens", 0)
        killed_at = time.monotonic()
        ray.get(cluster._controller.kill_rank.remote(1))
        worker.join(timeout=STEP_TIMEOUT_S + REBUILD_SLACK_S)
        assert not worker.is_alive(), "the request hung after a rank died"
        took = out["ended"] - killed_at
        print(f"\n[drill] request ended {took:.1f}s after the kill: "
              f"{'error' if 'error' in out else 'completed'}")
        assert 8 <= at_kill < len(PROMPTS) * DRILL_TOKENS, f"not mid-batch: {at_kill} tokens"
        if "error" in out:
            assert isinstance(out["error"], errors.ClusterError), out["error"]
            assert took <= STEP_TIMEOUT_S + REBUILD_SLACK_S
        assert cluster.health()["generation"] == 2
        assert cluster.stats().get("rank_group_restarts", 0) == 1
        _check_placement(cluster, 2, "float32")
        # Serving again, with the answers of the single-GPU run.
        again = cluster.generate(PROMPTS, adapters=NAMES, sampling=drill)
        assert [list(r.token_ids)[:MAX_NEW] for r in again] == want.tokens
        if "results" in out:
            assert [r.token_ids for r in out["results"]] == [r.token_ids for r in again]
