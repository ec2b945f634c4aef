"""The controller actor: a Ray shell around ``ControllerCore`` driving a ``RayRankGroup``.

Threaded (several callers at once); the core serializes adapter commands with steps. The
rank group is formed on a background thread so construction errors (a bad model directory,
a failed rendezvous) reach the caller of ``wait_ready`` as typed errors.
"""

from __future__ import annotations

import threading
from typing import Any, cast

import ray

from lora_cluster.api_types import AdapterInfo, GenerationResult
from lora_cluster.config import ClusterConfig, SamplingParams
from lora_cluster.errors import ClusterError, LoRAClusterError


class ControllerActorImpl:
    """Owns the registry, the scheduler and the rank group of one replica."""

    def __init__(self, config: ClusterConfig, placement_group: Any) -> None:
        self.config = config
        self._pg = placement_group
        self.core: Any = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._build, name="controller-init", daemon=True).start()

    def _build(self) -> None:
        from lora_cluster.cluster.ray_rank_group import RayRankGroup
        from lora_cluster.engine.controller_core import ControllerCore
        from lora_cluster.engine.tokenizer import Tokenizer
        from lora_cluster.model.spec import load_model_spec

        try:
            spec = load_model_spec(self.config.model)
            group = RayRankGroup(self.config, self._pg)
            self.core = ControllerCore(self.config, spec, group,
                                       Tokenizer.from_model_dir(self.config.model))
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def wait_ready(self) -> bool:
        self._ready.wait()
        if self._error is not None:
            err = self._error
            raise err if isinstance(err, LoRAClusterError) else ClusterError(
                f"cluster failed to start: {type(err).__name__}: {err}")
        return True

    def _core(self) -> Any:
        self.wait_ready()
        return self.core

    def load_adapter(self, name: str, source: str) -> AdapterInfo:
        return self._core().load_adapter(name, source)

    def register_adapters(self, sources: list[tuple[str, str]]) -> list[AdapterInfo]:
        return self._core().register_adapters(sources)

    def update_adapter(self, name: str, source: str) -> AdapterInfo:
        return self._core().update_adapter(name, source)

    def evict_adapter(self, name: str) -> None:
        self._core().evict_adapter(name)

    def pin_adapter(self, name: str) -> None:
        self._core().pin_adapter(name)

    def unpin_adapter(self, name: str) -> None:
        self._core().unpin_adapter(name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self._core().list_adapters()

    def generate(self, prompts: list[Any], adapters: list[str | None],
                 sampling: SamplingParams) -> list[GenerationResult]:
        return self._core().generate(prompts, adapters, sampling)

    def score(self, prompts: list[Any], adapters: list[str | None]) -> list[Any]:
        """Object references to float32 [len, vocab] logits held by the output rank."""
        return self._core().score(prompts, adapters)

    def stats(self) -> dict[str, Any]:
        return self._core().stats()

    def rank_stats(self) -> list[dict[str, Any]]:
        return self._core().group.stats()

    def check_health(self) -> dict[str, Any]:
        core = self._core()
        core.check_health()
        return {"ok": True, "ranks": self.config.world_size, "generation": core.group.generation}

    def rank_pids(self) -> list[int]:
        return self._core().group.rank_pids()

    def kill_rank(self, rank: int) -> None:
        self._core().group.kill_rank(rank)

    def shutdown(self) -> None:
        if self.core is not None:
            self.core.shutdown()


ControllerActor: Any = cast(Any, ray.remote)(max_restarts=0, max_concurrency=64)(
    ControllerActorImpl)
