"""OpenAI-style request and response shapes for ``/v1/completions`` and friends.

Requests are validated here into ``SamplingParams`` and prompt lists; fields we cannot honour
(``n > 1``, ``echo``, ``logprobs``, stop *strings*, penalties) are refused with a 400 naming
the field instead of being silently ignored, and unknown fields are refused too.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from lora_cluster.api_types import AdapterInfo, GenerationResult
from lora_cluster.config import SamplingParams
from lora_cluster.errors import RequestError

Prompt = str | list[int]


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions`` (OpenAI fields plus vLLM-style extensions)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[int] | list[str | list[int]]
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None
    # vLLM-style extensions
    top_k: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False


class LoadAdapterRequest(BaseModel):
    """The body of ``POST /v1/load_lora_adapter``."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    """The body of ``POST /v1/unload_lora_adapter`` (``lora_int_id`` accepted, unused)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None


def parse_body(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body; a 400 naming the first bad field otherwise."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise RequestError(f"{where}: {first.get('msg', 'invalid')}", field=where) from None


@dataclass(frozen=True)
class CompletionPlan:
    """A validated completion request: prompts, adapter (None = base) and sampling."""

    prompts: tuple[Prompt, ...]
    adapter: str | None
    model: str
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    return_token_ids: bool


def plan_completion(req: CompletionRequest, base_name: str) -> CompletionPlan:
    """Check what the engine cannot honour and build its inputs."""
    if req.n != 1 or (req.best_of is not None and req.best_of != 1):
        raise RequestError("n: only n=1 (and best_of=1) is supported", field="n")
    if req.echo:
        raise RequestError("echo: not supported", field="echo")
    if req.logprobs is not None:
        raise RequestError("logprobs: not supported", field="logprobs")
    if req.stop:
        raise RequestError("stop: stop strings are not supported; use stop_token_ids",
                           field="stop")
    if req.suffix:
        raise RequestError("suffix: not supported", field="suffix")
    if req.logit_bias:
        raise RequestError("logit_bias: not supported", field="logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise RequestError(f"{name}: penalties are not supported (must be 0)", field=name)
    prompts = _prompts(req.prompt)
    model = req.model or base_name
    sampling = SamplingParams(
        max_tokens=16 if req.max_tokens is None else req.max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0, seed=req.seed, ignore_eos=req.ignore_eos,
        stop_token_ids=tuple(req.stop_token_ids or ()))
    include_usage = bool((req.stream_options or {}).get("include_usage", False))
    return CompletionPlan(prompts=prompts, adapter=None if model == base_name else model,
                          model=model, sampling=sampling, stream=req.stream,
                          include_usage=include_usage, return_token_ids=req.return_token_ids)


def _prompts(prompt: Any) -> tuple[Prompt, ...]:
    if isinstance(prompt, str):
        return (prompt,)
    if not prompt:
        raise RequestError("prompt: must not be empty", field="prompt")
    if all(isinstance(t, int) for t in prompt):
        return (list(prompt),)
    out: list[Prompt] = []
    for i, p in enumerate(prompt):
        if isinstance(p, list) and not p:
            raise RequestError(f"prompt[{i}]: must not be empty", field="prompt")
        out.append(p if isinstance(p, str) else list(p))
    return tuple(out)


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion_body(req_id: str, plan: CompletionPlan,
                    results: tuple[GenerationResult, ...]) -> dict[str, Any]:
    """A ``text_completion`` object for finished results."""
    choices = []
    for i, res in enumerate(results):
        choice: dict[str, Any] = {"index": i, "text": res.text or "",
                                  "finish_reason": res.finish_reason, "logprobs": None}
        if plan.return_token_ids:
            choice["token_ids"] = list(res.token_ids)
            choice["prompt_token_ids"] = list(res.prompt_token_ids)
        choices.append(choice)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in results)
    completion_tokens = sum(len(r.token_ids) for r in results)
    return {"id": req_id, "object": "text_completion", "created": int(time.time()),
            "model": plan.model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def stream_event(req_id: str, plan: CompletionPlan, index: int, text: str,
                 token_ids: tuple[int, ...], finish_reason: str | None) -> str:
    """One server-sent event carrying a chunk of choice ``index``."""
    choice: dict[str, Any] = {"index": index, "text": text, "finish_reason": finish_reason,
                              "logprobs": None}
    if plan.return_token_ids:
        choice["token_ids"] = list(token_ids)
    return sse({"id": req_id, "object": "text_completion", "created": int(time.time()),
                "model": plan.model, "choices": [choice]})


def usage_event(req_id: str, plan: CompletionPlan, prompt_tokens: int,
                completion_tokens: int) -> str:
    return sse({"id": req_id, "object": "text_completion", "created": int(time.time()),
                "model": plan.model, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}})


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def adapter_json(info: AdapterInfo) -> dict[str, Any]:
    """An ``AdapterInfo`` as JSON (tuples become lists)."""
    from lora_cluster.cli_format import to_jsonable

    return dict(to_jsonable(info))
