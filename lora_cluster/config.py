"""Frozen, keyword-only configuration: the cluster's settings and per-request sampling.

"auto" values are resolved by ``resolved()`` into a new instance, never by mutation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from lora_cluster.errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
ExpertPlacement = Literal["contiguous", "round_robin"]

_DEVICES = ("auto", "cpu", "cuda")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_PLACEMENTS = ("contiguous", "round_robin")

# ``prefill_hold_steps=None`` on CUDA with decode graphs: a graph-replayed decode step costs a
# few ms and an eager prefill forward a roughly fixed ~10 ms of launches however many prompts
# it holds, so holding new prompts up to 8 decode steps cuts the prefill forwards several-fold
# for at most ~8 decode steps (tens of ms) of added time to first token.
AUTO_PREFILL_HOLD_STEPS = 8


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}", field=field_name)


@dataclass(frozen=True, kw_only=True)
class PrefillBatching:
    """When the scheduler lets waiting prompts into a step that is decoding.

    ``hold_steps == 0`` admits a prompt as soon as there is room (every step may carry a
    prefill). Otherwise prompts wait while the step would be a pure decode of at least
    ``min_prompts`` sequences, until any of: ``min_prompts`` of them have free seats, the
    waiting tokens fill the step's token budget, or ``hold_steps`` steps / ``hold_ms``
    milliseconds (None: no time bound) have passed since holding began. The trade: one prefill
    forward amortized over several prompts (throughput) for a bounded wait before admission
    (time to first token). A step that runs a prefill anyway, an idle engine, or a decode
    batch smaller than ``min_prompts`` never holds.
    """

    hold_steps: int = 0
    hold_ms: float | None = None
    min_prompts: int = 1

    def __post_init__(self) -> None:
        _require(isinstance(self.hold_steps, int) and self.hold_steps >= 0, "prefill_hold_steps",
                 f"must be an int >= 0, got {self.hold_steps!r}")
        _require(self.hold_ms is None or self.hold_ms > 0, "prefill_hold_ms",
                 f"must be > 0, got {self.hold_ms!r}")
        _require(isinstance(self.min_prompts, int) and self.min_prompts >= 1,
                 "prefill_batch_prompts", f"must be an int >= 1, got {self.min_prompts!r}")


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Everything one replica needs: model, layout, adapter capacity, memory, Ray placement."""

    model: str
    tp_size: int = 1
    ep_size: int = 1
    expert_placement: ExpertPlacement = "contiguous"
    max_loras: int = 8
    max_cpu_loras: int = 64
    max_lora_rank: int = 64
    device: Device = "auto"
    dtype: DType = "auto"
    adapter_roots: tuple[str, ...] = ()
    address: str | None = None
    namespace: str = "lora_cluster"
    # KV cache: an explicit byte budget wins over the fraction of device memory.
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float = 0.5
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None
    served_model_name: str | None = None
    failed_load_ttl_s: float = 30.0
    step_timeout_s: float = 120.0
    use_cuda_graphs: bool = True
    # Prefill batching (``PrefillBatching``): hold new prompts up to this many decode steps so
    # several share one prefill forward. None: auto, AUTO_PREFILL_HOLD_STEPS on CUDA with
    # decode graphs (where a prefill forward costs several graph decode steps), else 0 (admit
    # at once: on CPU a forward's cost grows with its rows, batching prompts saves nothing).
    prefill_hold_steps: int | None = None
    prefill_hold_ms: float = 100.0  # ...and never longer than this
    # Admit at once when this many waiting prompts have seats. None: max(2, max_num_seqs // 8).
    prefill_batch_prompts: int | None = None
    num_cpus_per_rank: float = 1.0
    # Asynchronous steps: send step k+1 to the ranks before step k's result is back, so the
    # controller's planning and applying overlap the ranks' forward (docs/ARCHITECTURE.md).
    # "auto": on when the rank group can keep a step in flight (``submit``/``collect``) and
    # its ranks run in other processes (Ray); True also in process (LocalRankGroup).
    async_steps: bool | Literal["auto"] = "auto"
    seed: int = 0
    extra_env: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _require(bool(self.model), "model", "a model directory or hub id is required")
        for name in ("tp_size", "ep_size", "max_loras", "max_cpu_loras", "max_lora_rank",
                     "block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, f"must be an int >= 1, got {value!r}")
        _require(self.max_cpu_loras >= self.max_loras, "max_cpu_loras",
                 f"must be >= max_loras ({self.max_loras}), got {self.max_cpu_loras}")
        _require(self.device in _DEVICES, "device", f"must be one of {_DEVICES}, got {self.device!r}")
        _require(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        _require(self.expert_placement in _PLACEMENTS, "expert_placement",
                 f"must be one of {_PLACEMENTS}, got {self.expert_placement!r}")
        _require(0.0 < self.kv_cache_fraction <= 1.0, "kv_cache_fraction",
                 f"must be in (0, 1], got {self.kv_cache_fraction}")
        _require(self.kv_cache_bytes is None or self.kv_cache_bytes > 0, "kv_cache_bytes",
                 f"must be positive, got {self.kv_cache_bytes}")
        _require(self.max_model_len is None or self.max_model_len >= 1, "max_model_len",
                 f"must be >= 1, got {self.max_model_len}")
        _require(self.failed_load_ttl_s >= 0, "failed_load_ttl_s", "must be >= 0")
        _require(self.step_timeout_s > 0, "step_timeout_s", "must be > 0")
        for name in ("prefill_hold_steps", "prefill_batch_prompts"):
            value = getattr(self, name)
            least = 0 if name == "prefill_hold_steps" else 1
            _require(value is None or (isinstance(value, int) and not isinstance(value, bool)
                                       and value >= least), name,
                     f"must be None (auto) or an int >= {least}, got {value!r}")
        _require(isinstance(self.async_steps, bool) or self.async_steps == "auto", "async_steps",
                 f"must be True, False or 'auto', got {self.async_steps!r}")
        _require(isinstance(self.prefill_hold_ms, int | float) and self.prefill_hold_ms > 0,
                 "prefill_hold_ms", f"must be > 0, got {self.prefill_hold_ms!r}")
        if isinstance(self.adapter_roots, str):
            raise ConfigError("adapter_roots: must be a tuple of directories, not a string",
                              field="adapter_roots")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.ep_size

    def replace(self, **changes: object) -> ClusterConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def resolved(self, *, cuda_available: bool) -> ClusterConfig:
        """Resolve "auto" device and dtype: cuda + bfloat16 when a GPU exists, else cpu + float32."""
        device = self.device
        if device == "auto":
            device = "cuda" if cuda_available else "cpu"
        if device == "cuda" and not cuda_available:
            raise ConfigError("device: 'cuda' requested but no CUDA device is visible", field="device")
        dtype = self.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        batching = self.replace(device=device).prefill_batching()
        return self.replace(device=device, dtype=dtype, prefill_hold_steps=batching.hold_steps,
                            prefill_batch_prompts=batching.min_prompts)

    def prefill_batching(self) -> PrefillBatching:
        """The admission policy, "auto" values resolved for this device (unresolved "auto"
        device: no holding)."""
        steps = self.prefill_hold_steps
        if steps is None:
            graphs = self.device == "cuda" and self.use_cuda_graphs
            steps = AUTO_PREFILL_HOLD_STEPS if graphs else 0
        prompts = self.prefill_batch_prompts
        if prompts is None:
            prompts = min(self.max_num_seqs, max(2, self.max_num_seqs // 8))
        return PrefillBatching(hold_steps=steps, hold_ms=float(self.prefill_hold_ms),
                               min_prompts=prompts)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-request sampling: greedy when temperature == 0."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        from lora_cluster.errors import RequestError

        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise RequestError(f"max_tokens: must be an int >= 1, got {self.max_tokens!r}",
                               field="max_tokens")
        if not self.temperature >= 0.0:
            raise RequestError(f"temperature: must be >= 0, got {self.temperature!r}",
                               field="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p: must be in (0, 1], got {self.top_p!r}", field="top_p")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise RequestError(f"top_k: must be an int >= 0, got {self.top_k!r}", field="top_k")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
