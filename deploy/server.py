"""``LoRAServer``: the Serve deployment whose replica is one lora_cluster replica.

Each Serve replica owns a placement group (bundle 0: this replica; bundle r+1: rank r), a
``RayRankGroup`` of rank actors inside it, and a ``ControllerCore`` — wrapped by
``ReplicaService``. Its methods mirror the Python API (``handle.generate.remote(...)``,
``handle.load_adapter.remote(...)``, ...). Blocking engine calls run on a dedicated thread
pool sized to the replica's request cap, so the event loop never waits on the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve

from deploy.directory_client import HandleDirectory
from deploy.replica import ReplicaService, ServedBatch, collect
from deploy.settings import AppSettings
from deploy.streaming import StreamChunk, merge_streams, stream_handle
from lora_cluster.api_types import AdapterInfo, GenerationResult
from lora_cluster.cluster.handle import normalize_adapters
from lora_cluster.config import ClusterConfig, SamplingParams

Prompt = str | Sequence[int]


@serve.deployment(name="LoRAServer")
class LoRAServer:
    """One replica: controller core + rank actors in this replica's placement group."""

    async def __init__(self, config: ClusterConfig, directory: Any,  # type: ignore[misc]
                       settings: AppSettings) -> None:
        # Async so the slow parts (rank actors, model load, first directory sync) run on a
        # worker thread: handle calls must not block the replica's event loop.
        replica_id = serve.get_replica_context().replica_id.unique_id
        self._pool = ThreadPoolExecutor(max_workers=settings.max_ongoing_for(config) + 16,
                                        thread_name_prefix="lora-serve")
        self.service = await self._run(_build_service, config, directory, settings, replica_id)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- the Python API ----------------------------------------------------------------
    async def load_adapter(self, name: str, source: str) -> AdapterInfo:
        return await self._run(self.service.load_adapter, name, str(source))

    async def update_adapter(self, name: str, source: str) -> AdapterInfo:
        return await self._run(self.service.update_adapter, name, str(source))

    async def evict_adapter(self, name: str) -> None:
        await self._run(self.service.evict_adapter, name)

    async def pin_adapter(self, name: str) -> None:
        await self._run(self.service.pin_adapter, name)

    async def unpin_adapter(self, name: str) -> None:
        await self._run(self.service.unpin_adapter, name)

    async def list_adapters(self) -> list[AdapterInfo]:
        return await self._run(self.service.list_adapters)

    async def generate(self, prompts: Sequence[Prompt] | str,
                       adapters: str | Sequence[str | None] | None = None,
                       sampling: SamplingParams | None = None) -> list[GenerationResult]:
        """Like ``Cluster.generate``: results in prompt order."""
        batch = await self.complete(prompts, adapters, sampling)
        return list(batch.results)

    async def score(self, prompts: Sequence[Prompt],
                    adapters: str | Sequence[str | None] | None = None) -> list[Any]:
        """Object refs to float32 [len, vocab] logits, held by this replica's output rank."""
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        names = normalize_adapters(adapters, len(prompt_list))
        return await self._run(self.service.score, prompt_list, names)

    async def stats(self) -> dict[str, Any]:
        return await self._run(self.service.stats)

    # ---- serving -------------------------------------------------------------------------
    async def complete(self, prompts: Sequence[Prompt] | str,
                       adapters: str | Sequence[str | None] | None = None,
                       sampling: SamplingParams | None = None) -> ServedBatch:
        """Generate and say which replica served it and where the adapter was (ingress).

        If the caller goes away (Serve cancels this coroutine), the requests are aborted
        instead of running to completion for nobody."""
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        names = normalize_adapters(adapters, len(prompt_list))
        handles, arrival = await self._run(self.service.submit_many, prompt_list, names,
                                           sampling)
        try:
            results = await self._run(collect, handles)
        except BaseException:
            for handle in handles:
                if not handle.done:
                    self._pool.submit(handle.cancel)
            raise
        finally:
            self.service.finished()
        return ServedBatch(results, self.service.replica_id, arrival)

    async def stream(self, prompts: Sequence[Prompt] | str, adapter: str | None,
                     sampling: SamplingParams | None = None) -> AsyncIterator[StreamChunk]:
        """Token chunks of every prompt (``chunk.index``) as they come; the first chunk is
        empty and confirms admission, so errors surface before any streaming starts."""
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        handles, arrival = await self._run(self.service.submit_many, prompt_list,
                                           [adapter] * len(prompt_list), sampling)
        meta = {"replica_id": self.service.replica_id, "arrival": arrival}
        try:
            yield StreamChunk((), "", **meta)
            tokenizer = self.service.core.tokenizer
            decode = tokenizer.decode if tokenizer is not None else None
            streams = [stream_handle(h, self._pool, decode, index=i, **meta)
                       for i, h in enumerate(handles)]
            async for chunk in merge_streams(streams):
                yield chunk
        finally:
            for handle in handles:
                if not handle.done:
                    # The engine's lock may be held by an adapter load: never wait on the loop.
                    self._pool.submit(handle.cancel)
            self.service.finished()

    # ---- Serve hooks ---------------------------------------------------------------------
    def record_routing_stats(self) -> dict[str, Any]:
        return self.service.routing_stats()

    async def check_health(self) -> None:
        await self._run(self.service.check_health)

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.shutdown()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _build_service(config: ClusterConfig, directory: Any, settings: AppSettings,
                   replica_id: str) -> ReplicaService:
    """Form the rank group in this replica's placement group and start syncing."""
    from lora_cluster.cluster.ray_rank_group import RayRankGroup
    from lora_cluster.engine.controller_core import ControllerCore
    from lora_cluster.engine.tokenizer import Tokenizer
    from lora_cluster.model.spec import load_model_spec

    spec = load_model_spec(config.model)
    tokenizer = Tokenizer.from_model_dir(config.model)
    group = RayRankGroup(config, ray.util.get_current_placement_group())
    core = ControllerCore(config, spec, group, tokenizer)
    service = ReplicaService(core, HandleDirectory(directory), replica_id=replica_id,
                             report_period_s=settings.report_period_s,
                             unload_ack_timeout_s=settings.unload_ack_timeout_s)
    try:
        service.start()
    except BaseException:
        service.shutdown()
        raise
    return service
