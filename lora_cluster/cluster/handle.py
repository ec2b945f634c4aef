"""``Cluster``: the Python client handle over one replica's controller actor."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayTaskError

from lora_cluster.api_types import AdapterInfo, GenerationResult
from lora_cluster.cluster.placement import create_placement
from lora_cluster.cluster.ray_session import ensure_ray
from lora_cluster.config import ClusterConfig, SamplingParams
from lora_cluster.errors import ClusterError, LoRAClusterError, RequestError

ACTOR_PREFIX = "lora_cluster:"
Prompt = str | Sequence[int]


def _unwrap(exc: Exception) -> Exception:
    """The typed error an actor raised, without Ray's wrapper."""
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, LoRAClusterError):
            return cause
        if cause is not None:
            return ClusterError(f"controller failed: {type(cause).__name__}: {cause}")
    if isinstance(exc, (ActorDiedError, ActorUnavailableError)):
        return ClusterError(f"cluster is not running ({type(exc).__name__})")
    if isinstance(exc, GetTimeoutError):
        return ClusterError("timed out waiting for the cluster")
    return exc


def normalize_adapters(adapters: str | Sequence[str | None] | None, count: int) -> list[str | None]:
    """One adapter name (or None) per prompt from a single name or a per-prompt list."""
    if adapters is None or isinstance(adapters, str):
        return [adapters] * count
    names = list(adapters)
    if len(names) != count:
        raise RequestError(f"adapters: expected one per prompt ({count}), got {len(names)}",
                           field="adapters")
    return names


class Cluster:
    """A running replica: start one (embedded or named/detached) or connect to a named one."""

    def __init__(self, controller: Any, *, name: str | None, placement: Any = None) -> None:
        self._controller = controller
        self._placement = placement
        self.name = name
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------
    @classmethod
    def start(cls, config: ClusterConfig, name: str | None = None) -> Cluster:
        """Start a replica. With ``name`` it is detached and ``Cluster.connect(name)`` finds it."""
        from lora_cluster.cluster.controller_actor import ControllerActor

        ensure_ray(config.address, config.namespace, connect_timeout_s=30.0)
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        config = config.resolved(cuda_available=gpus)
        placement = create_placement(config, name=name)
        # Each in-flight generate call holds an actor thread: leave room for a full batch
        # of waiting callers plus admin calls (stats, loads) at saturation.
        options: dict[str, Any] = {"scheduling_strategy": placement.controller_strategy(),
                                   "num_cpus": 0,
                                   "max_concurrency": max(64, 2 * config.max_num_seqs + 16)}
        if name is not None:
            options.update(name=ACTOR_PREFIX + name, lifetime="detached",
                           namespace=config.namespace)
        controller = ControllerActor.options(**options).remote(config, placement.group)
        cluster = cls(controller, name=name, placement=placement)
        try:
            cluster._call("wait_ready", timeout=config.step_timeout_s * 5)
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    @classmethod
    def connect(cls, name: str, address: str | None = "auto",
                namespace: str = "lora_cluster") -> Cluster:
        """Reach a named cluster started earlier (e.g. by ``lora-cluster start``)."""
        ensure_ray(address, namespace)
        try:
            controller = ray.get_actor(ACTOR_PREFIX + name, namespace=namespace)
        except ValueError:
            raise ClusterError(f"no cluster named {name!r} in namespace {namespace!r}",
                               name=name) from None
        return cls(controller, name=name)

    def shutdown(self) -> None:
        """Stop the ranks and the controller, and free the placement group."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            ray.get(self._controller.shutdown.remote(), timeout=60)
        ray.kill(self._controller, no_restart=True)
        if self._placement is not None:
            self._placement.remove()
        else:
            from lora_cluster.cluster.placement import remove_named_placement

            remove_named_placement(self.name)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- adapters --------------------------------------------------------------------
    def load_adapter(self, name: str, source: str) -> AdapterInfo:
        return self._call("load_adapter", name, str(source))

    def register_adapters(self, sources: Mapping[str, str] | Sequence[tuple[str, str]]
                          ) -> list[AdapterInfo]:
        """Validate and register adapters without loading them: each loads on first use."""
        items = list(sources.items()) if isinstance(sources, Mapping) else list(sources)
        return self._call("register_adapters", [(str(n), str(s)) for n, s in items])

    def update_adapter(self, name: str, source: str) -> AdapterInfo:
        return self._call("update_adapter", name, str(source))

    def evict_adapter(self, name: str) -> None:
        self._call("evict_adapter", name)

    def pin_adapter(self, name: str) -> None:
        self._call("pin_adapter", name)

    def unpin_adapter(self, name: str) -> None:
        self._call("unpin_adapter", name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self._call("list_adapters")

    # ---- requests --------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], adapters: str | Sequence[str | None] | None = None,
                 sampling: SamplingParams | None = None) -> list[GenerationResult]:
        prompts = _as_prompt_list(prompts)
        names = normalize_adapters(adapters, len(prompts))
        return self._call("generate", prompts, names, sampling or SamplingParams())

    def score(self, prompts: Sequence[Prompt],
              adapters: str | Sequence[str | None] | None = None) -> list[torch.Tensor]:
        """Float32 [len, vocab] logits per prompt; they travel from the output rank by reference."""
        prompts = _as_prompt_list(prompts)
        names = normalize_adapters(adapters, len(prompts))
        refs = self._call("score", prompts, names)
        try:
            return list(ray.get(refs))
        except Exception as exc:
            raise _unwrap(exc) from None

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    def rank_stats(self) -> list[dict[str, Any]]:
        """Each rank's own view, in rank order: slots, host cache, activation, and ``memory``
        (base weights, LoRA slots, adapter host cache, KV cache; CUDA allocator on GPU)."""
        return self._call("rank_stats", timeout=60)

    def health(self) -> dict[str, Any]:
        return self._call("check_health")

    # ---- plumbing --------------------------------------------------------------------
    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        if self._closed:
            raise ClusterError("cluster handle is shut down")
        try:
            return ray.get(getattr(self._controller, method).remote(*args), timeout=timeout)
        except Exception as exc:
            raise _unwrap(exc) from None


def _as_prompt_list(prompts: Sequence[Prompt] | str) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    out: list[str | list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, Sequence) and all(isinstance(t, int) for t in p):
            out.append([int(t) for t in p])
        else:
            raise RequestError(f"prompts[{i}]: expected text or a list of token ids", field="prompts")
    return out
