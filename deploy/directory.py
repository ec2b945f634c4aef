"""``AdapterDirectory``: the app's one-replica registry deployment (a shell over ``DirectoryState``).

Replicas long-poll ``wait_for_change`` and acknowledge generations through ``report``;
``wait_acked`` lets an unload return only once every live replica has dropped the adapter.
Part of the application, so Serve starts, restarts and deletes it with the app.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ray import serve

from deploy.directory_client import Lookup, Registered
from deploy.directory_state import DirectorySnapshot, DirectoryState, DirectoryView
from lora_cluster.api_types import AdapterInfo


@serve.deployment(num_replicas=1, max_ongoing_requests=100_000,
                  ray_actor_options={"num_cpus": 0})
class AdapterDirectory:
    """Registered adapters (name → source, version) and the replicas' last reports."""

    def __init__(self, stale_after_s: float = 5.0) -> None:
        self.state = DirectoryState(stale_after_s=stale_after_s,
                                    forget_after_s=max(60.0, 10 * stale_after_s))
        self._changed_cv: asyncio.Condition | None = None

    @property
    def _changed(self) -> asyncio.Condition:
        # Created on first use so it binds to the loop Serve runs this replica's methods on.
        if self._changed_cv is None:
            self._changed_cv = asyncio.Condition()
        return self._changed_cv

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait(self, ready: Any, timeout_s: float) -> None:
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(ready), timeout_s)

    async def lookup(self, name: str) -> Lookup:
        return self.state.lookup(name), self.state.generation

    async def register(self, name: str, source: str, info: AdapterInfo | None) -> Registered:
        entry = self.state.register(name, source, info)
        await self._notify()
        return entry, self.state.generation

    async def update(self, name: str, source: str, info: AdapterInfo | None) -> Registered:
        entry = self.state.update(name, source, info)
        await self._notify()
        return entry, self.state.generation

    async def remove(self, name: str) -> int:
        generation = self.state.remove(name)
        await self._notify()
        return generation

    async def wait_for_change(self, epoch: str, generation: int, timeout_s: float) -> DirectoryView:
        await self._wait(lambda: self.state.epoch != epoch or self.state.generation != generation,
                         timeout_s)
        return self.state.view()

    async def report(self, replica_id: str, stats: dict[str, Any], acked_generation: int) -> None:
        self.state.report(replica_id, stats, acked_generation)
        await self._notify()

    async def report_router(self, router_id: str, decisions: dict[str, int]) -> None:
        self.state.report_router(router_id, decisions)

    async def wait_acked(self, generation: int, timeout_s: float) -> list[str]:
        await self._wait(lambda: not self.state.unacked(generation), timeout_s)
        return self.state.unacked(generation)

    async def snapshot(self) -> DirectorySnapshot:
        return self.state.snapshot()
