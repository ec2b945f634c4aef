"""One rank of a replica, without Ray: model shard, KV cache, adapter host cache and slots.

``RankRuntime.execute(command)`` runs the controller's ordered command stream. The rank
keeps no policy of its own: which adapter goes to which slot, and what leaves the host
cache, is decided by the controller and mirrored here exactly, so the controller's view of
every rank is exact. Adapter commands are atomic: a failed load leaves the rank unchanged.

KV budget: ``kv_cache_bytes`` when set; else ``kv_cache_fraction`` of the device's free
memory after the weights and LoRA slots are allocated (CUDA), or on CPU of
``min(CPU_KV_BASE_BYTES, free host memory)`` — a CPU rank shares its host with everything
else, so it never claims a fraction of all RAM. Either way the cache is capped at what
``max_num_seqs`` sequences of full context could ever use.

Read-ahead: a ``Step``'s hints queue adapter versions for a side buffer
(``engine/read_ahead.py``). On GPU a reader thread reads them, starting a read only while this
rank is between commands (or after ``READ_AHEAD_IDLE_WAIT_S`` of waiting for a gap); on CPU,
where the forward is Python-bound and a reader thread would cost it GIL hand-offs, the command
thread reads up to ``CPU_READS_PER_STEP`` after each step's forward. A read also validates and
plans the entry's slot copies; the output rank reports finished reads in its ``StepResult``
(their loads may then ride on a step). A later ``LoadAdapter`` takes the entry instead of
reading on the command path; the host cache itself changes only through the stream. The controller counts read-ahead versions in its host tier and drops a victim for
each (the drop comes with its next command), so cache plus buffer stay within
``max_cpu_loras``; the buffer's own bound (``read_ahead_depth``) caps the overlap meanwhile.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from typing import Any

import torch

from lora_cluster.adapters.plan_cache import PlanCache
from lora_cluster.adapters.weights import AdapterWeights
from lora_cluster.config import ClusterConfig
from lora_cluster.engine.messages import (
    AdapterKey,
    AnyCommand,
    DropAdapter,
    EvictSlot,
    LoadAdapter,
    LoadResult,
    PlaceAdapter,
    PlaceResult,
    Shutdown,
    Step,
    StepResult,
    UpdateAdapter,
)
from lora_cluster.engine.packed_reads import PackedReads, ReadMiss
from lora_cluster.engine.rank_memory import memory_stats, weight_bytes
from lora_cluster.engine.read_ahead import ReadAhead, read_ahead_depth
from lora_cluster.engine.runner import StepRunner
from lora_cluster.engine.slot_activation import SlotActivator, slot_ready
from lora_cluster.engine.step_ops import op_failure
from lora_cluster.engine.update_staging import StagedUpdate
from lora_cluster.errors import ClusterError, ConfigError, LoRAClusterError
from lora_cluster.model.kv_cache import KVCache, kv_budget_bytes, num_blocks_for_budget
from lora_cluster.model.parallel import Comm, ParallelInfo
from lora_cluster.model.spec import ModelSpec, load_model_spec

CPU_KV_BASE_BYTES = 2 << 30
# Reader threads per rank: reads are short (ms) and mostly memory copies; one keeps up with
# a step's admissions and leaves the cores to the forward.
READ_AHEAD_WORKERS = 1
READ_AHEAD_IDLE_WAIT_S = 0.05  # a read starts after this long even if no gap came
# CPU ranks read ahead inline (read_ahead.py's inline mode): at most this many per step,
# after its forward — a reader thread beside a Python-bound forward costs it more in GIL
# hand-offs than the read itself.
CPU_READS_PER_STEP = 2

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def context_limit_for(config: ClusterConfig, spec: ModelSpec) -> int:
    """Longest sequence (prompt + output) served: ``max_model_len`` or the model's context."""
    limit = config.max_model_len or spec.max_position_embeddings
    if config.max_model_len and config.max_model_len > spec.max_position_embeddings:
        raise ConfigError(
            f"max_model_len: {config.max_model_len} exceeds the model's "
            f"max_position_embeddings ({spec.max_position_embeddings})", field="max_model_len")
    return int(limit)


class RankRuntime:
    """Executes commands on one rank; the Ray rank actor is a shell around it."""

    def __init__(self, config: ClusterConfig, parallel: ParallelInfo, comm: Comm) -> None:
        from lora_cluster.model.loader import load_model

        if config.device == "auto" or config.dtype == "auto":
            raise ConfigError("RankRuntime needs a resolved config (ClusterConfig.resolved)",
                              field="device")
        self.config = config
        self.parallel = parallel
        self.comm = comm
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device.index or 0)
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = _DTYPES[config.dtype]
        self.spec = load_model_spec(config.model)
        start = time.perf_counter()
        self.model = load_model(config.model, parallel=parallel, comm=comm, dtype=self.dtype,
                                device=self.device, max_loras=config.max_loras,
                                max_lora_rank=config.max_lora_rank)
        self.model_load_ms = (time.perf_counter() - start) * 1e3
        self.weight_bytes = weight_bytes(self.model)  # slot buffers never resize: once
        self.context_limit = context_limit_for(config, self.spec)
        self.num_kv_blocks = self._num_kv_blocks()
        self.kv_cache = KVCache.for_model(self.spec, parallel, num_blocks=self.num_kv_blocks,
                                          block_size=config.block_size, dtype=self.dtype,
                                          device=self.device)
        self.runner = StepRunner(self.model, self.kv_cache, device=self.device,
                                 block_size=config.block_size,
                                 context_limit=min(self.context_limit,
                                                   self.num_kv_blocks * config.block_size),
                                 max_num_seqs=config.max_num_seqs,
                                 max_num_batched_tokens=config.max_num_batched_tokens,
                                 is_output_rank=parallel.is_output_rank,
                                 use_cuda_graphs=config.use_cuda_graphs,
                                 share=comm.all_reduce_world if parallel.world_size > 1 else None)
        self.runner.capture()
        self.host_cache: OrderedDict[AdapterKey, AdapterWeights] = OrderedDict()
        self.slots: list[AdapterKey | None] = [None] * config.max_loras
        # Slot writes: a side CUDA stream overlapping steps on GPU, synchronous on CPU.
        self.activator = SlotActivator(self.model, self.device)
        # In-place updates being staged layer group by layer group (one entry per version).
        self._staging: dict[AdapterKey, StagedUpdate] = {}
        self.load_stats: dict[AdapterKey, LoadResult] = {}
        # Plans of adapters validated before, by config + header bytes (adapters/plan_cache.py).
        self.plans = PlanCache(self.spec, max_lora_rank=config.max_lora_rank)
        self.packed_reads = PackedReads(self.plans, self.spec, self.parallel, dtype=self.dtype,
                                        pin=self.device.type == "cuda")
        self.read_ahead: ReadAhead[tuple[AdapterWeights, dict[str, float]]] = ReadAhead(
            self._read, capacity=read_ahead_depth(config.max_loras, config.max_cpu_loras),
            workers=0 if self.device.type == "cpu" else READ_AHEAD_WORKERS,
            idle_wait_s=READ_AHEAD_IDLE_WAIT_S,
            resident=lambda key: key in self.host_cache or key in self._staging)
        self._last_seq = -1
        self._closed = False
        self.steps = 0

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.kv_cache_bytes is not None:
            budget = cfg.kv_cache_bytes
        elif self.device.type == "cuda":
            budget = kv_budget_bytes(self.device, fraction=cfg.kv_cache_fraction)
        else:
            free = kv_budget_bytes(self.device, fraction=1.0)
            budget = int(min(CPU_KV_BASE_BYTES, free) * cfg.kv_cache_fraction)
        blocks = num_blocks_for_budget(self.spec, self.parallel, block_size=cfg.block_size,
                                       dtype=self.dtype, budget_bytes=budget)
        useful = cfg.max_num_seqs * -(-self.context_limit // cfg.block_size)
        return min(blocks, useful)

    # ---------------------------------------------------------------- commands
    def execute(self, command: AnyCommand) -> StepResult | LoadResult | PlaceResult | None:
        """Run one command of the stream; the result (tokens only on the output rank), or None."""
        if self._closed:
            raise ClusterError(f"rank {self.parallel.rank}: already shut down",
                               rank=self.parallel.rank)
        if command.seq <= self._last_seq:
            raise ClusterError(
                f"rank {self.parallel.rank}: command {command.seq} arrived after "
                f"{self._last_seq} (the stream must be strictly ordered)", rank=self.parallel.rank)
        self._last_seq = command.seq
        with self.read_ahead.busy():  # no read starts while a command runs
            return self._dispatch(command)

    def _dispatch(self, command: AnyCommand) -> StepResult | LoadResult | PlaceResult | None:
        if isinstance(command, Step):
            self.steps += 1
            t0 = time.perf_counter()
            # Placements and drops planned with this step, before it (see engine/step_ops.py).
            done = self._apply_ops(command) if command.adapter_ops else ()
            if command.read_ahead:
                self.read_ahead.offer(command.read_ahead)
            # Only this step's own adapters: a slot still being written elsewhere is not waited on.
            self.activator.wait_for(s.slot for s in command.plan.seqs if s.slot >= 0)
            ops_ms = (time.perf_counter() - t0) * 1e3
            result = self.runner.run(command.plan, command.seq)
            t0 = time.perf_counter()
            if self.read_ahead.inline:
                self.read_ahead.run_pending(CPU_READS_PER_STEP)
            if isinstance(result, StepResult):  # only the output rank returns one
                ready = self.read_ahead.take_ready()  # their loads may ride (step_ops.py)
                result = dataclasses.replace(result, adapter_results=done,
                                             read_ahead_ready=ready, ops_ms=ops_ms,
                                             reads_ms=(time.perf_counter() - t0) * 1e3)
            return result
        if isinstance(command, LoadAdapter):
            return self._load(command)
        if isinstance(command, UpdateAdapter):
            return self._update(command)
        if isinstance(command, PlaceAdapter):
            return self._place(command)
        if isinstance(command, EvictSlot):
            self._clear_slot(command.slot)
            return None
        if isinstance(command, DropAdapter):
            self._drop(command.key)
            return None
        if isinstance(command, Shutdown):
            self.close()
            return None
        raise ClusterError(f"rank {self.parallel.rank}: unknown command {type(command).__name__}")

    def _apply_ops(self, command: Step) -> tuple[PlaceResult | LoadResult | None, ...]:
        """Run a step's ridden ops in order, exactly as their standalone commands would; the
        first that fails fails the step (before its forward) with ``op_failure``'s error."""
        out: list[PlaceResult | LoadResult | None] = []
        for index, op in enumerate(command.adapter_ops):
            try:
                if isinstance(op, PlaceAdapter):
                    out.append(self._place(op))
                elif isinstance(op, LoadAdapter):
                    out.append(self._load(op))  # read ahead: files the entry it read
                elif isinstance(op, DropAdapter):
                    self._drop(op.key)
                    out.append(None)
                else:
                    raise ClusterError(f"{type(op).__name__} cannot ride on a step")
            except Exception as err:
                raise op_failure(self.parallel.rank, command.seq, index, op, err) from err
        return tuple(out)

    def _read(self, path: str, name: str, version: int) -> tuple[AdapterWeights, dict[str, float]]:
        """This rank's slices of one adapter version, and where the time went."""
        from lora_cluster.adapters import load_adapter

        # A structure read before: straight into its slot-ready page (engine/packed_reads.py).
        fast = self.packed_reads.read(path, name, version)
        if not isinstance(fast, ReadMiss):
            t0 = time.perf_counter()
            self.activator.prepare(fast.weights, like=fast.slot_plan)
            fast.breakdown["validate"] += (time.perf_counter() - t0) * 1e3
            return fast.weights, fast.breakdown
        loaded = load_adapter(path, self.spec, self.parallel, name=name, version=version,
                              max_lora_rank=self.config.max_lora_rank, plan=fast.plan)
        breakdown = dict(loaded.stats.breakdown())
        # Slot-ready host copies (model dtype, scale folded; pinned on GPU hosts): activating
        # them is plain copies, an async DMA from pinned memory.
        t0 = time.perf_counter()
        w = loaded.weights
        weights = AdapterWeights(w.name, w.version, w.rank,
                                 slot_ready(w.modules, self.dtype, pin=self.device.type == "cuda"))
        ms = (time.perf_counter() - t0) * 1e3
        if self.device.type == "cuda":
            breakdown["pin"] = ms  # cast, fold and page-lock
        else:
            breakdown["convert"] += ms
        # Validated against the slots and planned here, beside the read (on the reader thread
        # for a read-ahead), so the load command only files the entry.
        t0 = time.perf_counter()
        self.activator.prepare(weights)
        breakdown["validate"] += (time.perf_counter() - t0) * 1e3
        self.packed_reads.learn(fast, loaded, weights, self.activator.template_of(weights))
        return weights, breakdown

    def _load(self, cmd: LoadAdapter) -> LoadResult:
        if cmd.key in self.host_cache:
            return self.load_stats[cmd.key]
        self._check_room(cmd.key)
        start = time.perf_counter()
        got, outcome = self.read_ahead.take(cmd.key)
        try:
            if got is None:
                # No read-ahead, or it failed: read here, so errors surface as without hints.
                weights, breakdown = self._read(cmd.path, cmd.name, cmd.version)
            else:
                weights, breakdown = got[0], dict(got[1])
                breakdown["read_ahead_wait"] = (time.perf_counter() - start) * 1e3
            self.activator.prepare(weights)  # planned by ``_read``: a lookup here
            # Nothing above touched the rank's state: a failed read leaves it as it was.
            self.host_cache[cmd.key] = weights
        finally:
            self.read_ahead.done(cmd.key)
        result = LoadResult(name=cmd.name, version=cmd.version, nbytes=weights.nbytes,
                            breakdown_ms=tuple(breakdown.items()), read_ahead=outcome)
        self.load_stats[cmd.key] = result
        return result

    def _update(self, cmd: UpdateAdapter) -> LoadResult | None:
        """Stage the named layers of a new version (only their tensors are read); on ``final``
        the rest is read and the version becomes a host-cache entry. A failure frees the
        version's staging and leaves everything else as it was."""
        if cmd.key in self.host_cache:
            raise ClusterError(f"rank {self.parallel.rank}: adapter {cmd.name!r} version "
                               f"{cmd.version} is already resident", name=cmd.name)
        staged = self._staging.get(cmd.key)
        if staged is None:
            self._check_room(cmd.key)
            staged = StagedUpdate(cmd.path, self.spec, self.parallel, name=cmd.name,
                                  version=cmd.version, max_lora_rank=self.config.max_lora_rank,
                                  dtype=self.dtype, pin=self.device.type == "cuda",
                                  check=self._check_fits)
            self._staging[cmd.key] = staged
        try:
            if cmd.layers is not None or not cmd.final:
                staged.stage(cmd.layers)
            if not cmd.final:
                return None
            weights, breakdown = staged.finish()
            self.activator.prepare(weights)  # validated and planned once, not per activation
        except BaseException:
            self._staging.pop(cmd.key, None)
            staged.close()
            raise
        del self._staging[cmd.key]
        self.host_cache[cmd.key] = weights
        result = LoadResult(name=cmd.name, version=cmd.version, nbytes=weights.nbytes,
                            breakdown_ms=breakdown)
        self.load_stats[cmd.key] = result
        return result

    def _check_fits(self, weights: AdapterWeights) -> None:
        """Typed refusal (shape, rank, unknown module) of modules the slots could not take."""
        if self.model.slot_table is not None:
            self.model.slot_table.validate(weights)  # type: ignore[arg-type]

    def _check_room(self, key: AdapterKey) -> None:
        # A version being staged holds a host-cache entry from its first command on.
        if len(self.host_cache) + len(self._staging) >= self.config.max_cpu_loras:
            raise ClusterError(
                f"rank {self.parallel.rank}: host cache full ({self.config.max_cpu_loras}) while "
                f"loading {key}; the controller must drop an adapter first", name=key[0])

    def _place(self, cmd: PlaceAdapter) -> PlaceResult:
        if not 0 <= cmd.slot < len(self.slots):
            raise ClusterError(f"rank {self.parallel.rank}: slot {cmd.slot} out of range")
        weights = self.host_cache.get(cmd.key)
        if weights is None:
            raise ClusterError(f"rank {self.parallel.rank}: adapter {cmd.name!r} version "
                               f"{cmd.version} is not in the host cache", name=cmd.name)
        start = time.perf_counter()
        self.slots[cmd.slot] = None
        try:
            # Validates, then clears and writes in place (on GPU queued on the side stream).
            self.activator.activate(cmd.slot, weights)
        except LoRAClusterError:
            self.activator.clear(cmd.slot)
            raise
        self.slots[cmd.slot] = cmd.key
        self.host_cache.move_to_end(cmd.key)
        return PlaceResult(slot=cmd.slot, ms=(time.perf_counter() - start) * 1e3)

    def _clear_slot(self, slot: int) -> None:
        if self.slots[slot] is not None:
            self.activator.clear(slot)
            self.slots[slot] = None

    def _drop(self, key: AdapterKey) -> None:
        for slot, held in enumerate(self.slots):
            if held == key:
                self._clear_slot(slot)
        self.host_cache.pop(key, None)
        self.read_ahead.discard(key)
        staged = self._staging.pop(key, None)
        if staged is not None:
            staged.close()
        self.load_stats.pop(key, None)

    # ---------------------------------------------------------------- reporting
    def stats(self) -> dict[str, Any]:
        """This rank's adapters (bytes, load ms), slots and memory.

        Safe beside the command thread (a Ray rank answers ``stats`` on another thread): the
        containers that thread changes are copied first, each copy one C-level call that
        the GIL does not interrupt, and only the copies are walked in Python."""
        slots = list(self.slots)
        load_stats = dict(self.load_stats)
        staging = dict(self._staging)
        host = list(self.host_cache.items())
        return {
            "rank": self.parallel.rank,
            "device": str(self.device),
            "model_load_ms": self.model_load_ms,
            "kv_blocks": self.num_kv_blocks,
            "kv_cache_bytes": self.kv_cache.nbytes,
            "slots": [None if k is None else f"{k[0]}@v{k[1]}" for k in slots],
            "host_cache": {f"{k[0]}@v{k[1]}": {"bytes": r.nbytes, "load_ms": dict(r.breakdown_ms)}
                           for k, r in load_stats.items()},
            "staging": {f"{k[0]}@v{k[1]}": {"bytes": u.nbytes, "commands": u.commands,
                                            "buffered_layers": len(u.arrivals)}
                        for k, u in staging.items()},
            "activation": self.activator.stats(),
            "read_ahead": self.read_ahead.stats(),
            "plan_cache": self.plans.stats(),
            "packed_reads": self.packed_reads.stats(),
            "live_sequences": self.runner.num_live_seqs,
            "cuda_graph_buckets": list(self.runner.graphs.buckets) if self.runner.graphs else [],
            "cuda_graph_replays": self.runner.graphs.replays if self.runner.graphs else 0,
            **self.runner.stats(),
            "steps": self.steps,
            "memory": memory_stats(
                self.weight_bytes,
                (load_stats[k].nbytes if k in load_stats else w.nbytes for k, w in host),
                int(self.kv_cache.nbytes), self.device),
        }

    def close(self) -> None:
        """Free the model and caches."""
        self._closed = True
        self.read_ahead.close()
        self.activator.synchronize()
        self.host_cache.clear()
        for staged in self._staging.values():
            staged.close()
        self._staging.clear()
        self.runner.reset()
        del self.model, self.kv_cache
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
