"""``OpenAIIngress``: the HTTP surface (FastAPI under Serve), names as vLLM's server uses them.

``POST /v1/completions`` · ``GET /v1/models`` · ``POST /v1/load_lora_adapter`` ·
``POST /v1/unload_lora_adapter`` · ``GET /health`` · ``GET /metrics``. Requests go to the
``LoRAServer`` deployment with the adapter as ``multiplexed_model_id`` (the affinity
router's key); errors are rendered by ``deploy.http_errors`` only.
"""

# No ``from __future__ import annotations`` here: FastAPI must see real annotation objects
# (``Request``) after Serve rebinds the route methods, so strings would not resolve.
import asyncio
import contextlib
import functools
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from deploy.affinity import routing_decisions
from deploy.directory_state import DirectorySnapshot
from deploy.http_errors import ForbiddenError, as_typed, error_body, error_response
from deploy.metrics import CONTENT_TYPE, render
from deploy.openai_models import (
    SSE_DONE,
    CompletionPlan,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    adapter_json,
    completion_body,
    completion_id,
    parse_body,
    plan_completion,
    sse,
    stream_event,
    usage_event,
)
from deploy.settings import AppSettings
from lora_cluster.errors import AuthError, ClusterError, RequestError

api = FastAPI(title="lora_cluster", description="Many LoRA adapters on one MoE model.")
_TIER_ORDER = {"device": 2, "host": 1}


def json_errors(route: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Every failure of a route becomes the one error shape (see deploy.http_errors)."""

    @functools.wraps(route)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return await route(*args, **kwargs)
        except Exception as exc:  # rendered with its typed status
            return error_response(exc)

    return wrapped


def _tier(residency: str | None) -> str:
    return residency if residency in ("device", "host") else "none"


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise RequestError("body: expected a JSON object", field="body") from None


@serve.deployment(name="OpenAIIngress")
@serve.ingress(api)
class OpenAIIngress:
    """OpenAI-style routes over the ``LoRAServer`` replicas and the adapter directory."""

    def __init__(self, server: Any, directory: Any, settings: AppSettings, base_name: str,
                 model_path: str) -> None:
        self.server = server
        self.directory = directory
        self.settings = settings
        self.admin_token = settings.resolved_admin_token()
        self.base_name = base_name
        self.model_path = model_path
        self.created = int(time.time())
        self.ingress_id = serve.get_replica_context().replica_id.unique_id
        self._reporter: asyncio.Task[None] | None = None

    # ---- plumbing --------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.admin_token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("admin route: send 'Authorization: Bearer <admin token>'")
        if not hmac.compare_digest(token.strip().encode(), self.admin_token.encode()):
            raise ForbiddenError("admin route: the admin token is wrong")

    def _start_reporter(self) -> None:
        """Report this process's routing decisions to the directory every period."""
        if self._reporter is None or self._reporter.done():
            self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    async def _report_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.directory.report_router.remote(self.ingress_id, routing_decisions())
            await asyncio.sleep(self.settings.report_period_s)

    def _server_for(self, adapter: str | None) -> Any:
        return self.server.options(multiplexed_model_id=adapter or "")

    # ---- completions -----------------------------------------------------------------------
    @api.post("/v1/completions")
    @json_errors
    async def completions(self, request: Request) -> Any:
        self._start_reporter()
        plan = plan_completion(parse_body(CompletionRequest, await _json(request)),
                               self.base_name)
        req_id = completion_id()
        if plan.stream:
            return await self._stream(req_id, plan)
        batch = await self._server_for(plan.adapter).complete.remote(
            list(plan.prompts), plan.adapter, plan.sampling)
        return JSONResponse(completion_body(req_id, plan, batch.results),
                            headers={"x-lora-replica": batch.replica_id,
                                     "x-lora-arrival": batch.arrival})

    async def _stream(self, req_id: str, plan: CompletionPlan) -> Any:
        # One call streams every prompt from one replica (batched together, as non-streamed
        # completions are).
        gen = self._server_for(plan.adapter).options(stream=True).stream.remote(
            list(plan.prompts), plan.adapter, plan.sampling)
        try:
            # The first chunk confirms admission: errors (unknown adapter, bad prompt) still
            # get their status code here instead of a 200 stream that fails later.
            first = await gen.__anext__()
        except BaseException:
            gen.cancel()
            raise
        headers = {"x-lora-replica": first.replica_id, "x-lora-arrival": first.arrival,
                   "cache-control": "no-cache"}
        return StreamingResponse(self._events(req_id, plan, gen), headers=headers,
                                 media_type="text/event-stream")

    async def _events(self, req_id: str, plan: CompletionPlan, gen: Any) -> AsyncIterator[str]:
        prompt_tokens = completion_tokens = 0
        finished = False
        try:
            async for chunk in gen:
                if chunk.text or chunk.finish_reason or (plan.return_token_ids
                                                         and chunk.token_ids):
                    yield stream_event(req_id, plan, chunk.index, chunk.text, chunk.token_ids,
                                       chunk.finish_reason)
                if chunk.finish_reason:
                    prompt_tokens += chunk.prompt_tokens
                    completion_tokens += chunk.completion_tokens
            finished = True
            if plan.include_usage:
                yield usage_event(req_id, plan, prompt_tokens, completion_tokens)
        except Exception as exc:  # the status line is sent: report it in the stream
            yield sse(error_body(as_typed(exc)))
        finally:
            if not finished:  # client gone or failed: stop the generation on the replica
                gen.cancel()
        yield SSE_DONE

    # ---- models and adapters ---------------------------------------------------------------
    @api.get("/v1/models")
    @json_errors
    async def models(self) -> Any:
        snap: DirectorySnapshot = await self.directory.snapshot.remote()
        data: list[dict[str, Any]] = [{
            "id": self.base_name, "object": "model", "created": self.created,
            "owned_by": "lora_cluster", "root": self.model_path, "parent": None,
            "replicas": len(snap.replicas)}]
        for entry in snap.adapters:
            per_replica = {r.replica_id: _tier(r.stats.get("residency", {}).get(entry.name))
                           for r in snap.replicas}
            warmest = max(per_replica.values(), key=lambda t: _TIER_ORDER.get(t, 0),
                          default="none")
            item: dict[str, Any] = {
                "id": entry.name, "object": "model", "created": self.created,
                "owned_by": "lora_cluster", "root": entry.source, "parent": self.base_name,
                "version": entry.version,
                "residency": {"state": warmest, "replicas": per_replica,
                              **{t: list(per_replica.values()).count(t)
                                 for t in ("device", "host", "none")}}}
            if entry.info is not None:
                item["lora"] = {**adapter_json(entry.info), "residency": warmest}
            data.append(item)
        return {"object": "list", "data": data}

    @api.post("/v1/load_lora_adapter")
    @json_errors
    async def load_lora_adapter(self, request: Request) -> Any:
        self._authorize(request)
        body = parse_body(LoadAdapterRequest, await _json(request))
        if body.lora_name == self.base_name:
            raise RequestError(f"lora_name: {body.lora_name!r} is the base model's name",
                               field="lora_name")
        info = await self._server_for(body.lora_name).load_adapter.remote(body.lora_name,
                                                                          body.lora_path)
        return {"object": "lora_adapter", "id": body.lora_name,
                "message": f"Success: LoRA adapter '{body.lora_name}' added successfully.",
                "adapter": adapter_json(info)}

    @api.post("/v1/unload_lora_adapter")
    @json_errors
    async def unload_lora_adapter(self, request: Request) -> Any:
        self._authorize(request)
        body = parse_body(UnloadAdapterRequest, await _json(request))
        await self.server.evict_adapter.remote(body.lora_name)
        return {"object": "lora_adapter", "id": body.lora_name,
                "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}

    # ---- operations ------------------------------------------------------------------------
    @api.get("/health")
    @json_errors
    async def health(self) -> Any:
        snap: DirectorySnapshot = await self.directory.snapshot.remote()
        if not snap.replicas:
            raise ClusterError("no live replica has reported to the adapter directory")
        return {"status": "ok", "replicas": len(snap.replicas), "adapters": len(snap.adapters)}

    @api.get("/metrics")
    @json_errors
    async def metrics(self) -> Any:
        self._start_reporter()
        await self.directory.report_router.remote(self.ingress_id, routing_decisions())
        snap: DirectorySnapshot = await self.directory.snapshot.remote()
        return Response(render(snap), media_type=CONTENT_TYPE)
