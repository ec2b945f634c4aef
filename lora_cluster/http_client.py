"""``HTTPClient``: the Serve app over HTTP, with the Python API's method names.

    client = HTTPClient("http://127.0.0.1:8000", admin_token="s3cret")
    client.load_adapter("sql", "/adapters/sql")
    client.generate(["SELECT"], adapters="sql", sampling=SamplingParams(max_tokens=8))
    for text in client.stream("Once upon", adapter="sql"): print(text, end="")

Standard library only (urllib). Error responses come back as the same typed
``lora_cluster.errors`` classes the Python API raises, matched by their ``code``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lora_cluster.api_types import AdapterInfo, GenerationResult
from lora_cluster.config import SamplingParams
from lora_cluster.errors import ALL_ERRORS, AuthError, ClusterError, LoRAClusterError

Prompt = str | Sequence[int]
_BY_CODE = {cls.code: cls for cls in ALL_ERRORS}


class HTTPClient:
    """A client for the OpenAI-style app that ``lora-cluster serve`` / ``deploy.app`` run."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *,
                 admin_token: str | None = None, timeout: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.admin_token = admin_token
        self.timeout = timeout
        self._base_name: str | None = None

    # ---- adapters ------------------------------------------------------------------------
    def load_adapter(self, name: str, source: str) -> AdapterInfo:
        """Register ``name`` from ``source`` (validated by loading it on one replica)."""
        body = self._request("POST", "/v1/load_lora_adapter",
                             {"lora_name": name, "lora_path": str(source)}, admin=True)
        return adapter_info(body["adapter"])

    def evict_adapter(self, name: str) -> None:
        """Unregister ``name`` on every replica (HTTP: unload_lora_adapter)."""
        self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name}, admin=True)

    def list_adapters(self) -> list[AdapterInfo]:
        """Registered adapters; residency is the warmest tier on any replica."""
        return [adapter_info(m["lora"]) for m in self.models() if "lora" in m]

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the base model first, then every adapter with its residency."""
        data = list(self._request("GET", "/v1/models")["data"])
        if data:
            self._base_name = data[0]["id"]
        return data

    @property
    def base_model(self) -> str:
        """The base model's served name (what ``model`` means "no adapter")."""
        if self._base_name is None:
            self.models()
        assert self._base_name is not None
        return self._base_name

    # ---- generation ----------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt] | str,
                 adapters: str | Sequence[str | None] | None = None,
                 sampling: SamplingParams | None = None) -> list[GenerationResult]:
        """Like ``Cluster.generate``: one request per adapter, results in prompt order."""
        prompt_list: list[Prompt] = [prompts] if isinstance(prompts, str) else list(prompts)
        if adapters is None or isinstance(adapters, str):
            names: list[str | None] = [adapters] * len(prompt_list)
        else:
            names = list(adapters)
            if len(names) != len(prompt_list):
                raise ValueError(f"adapters: expected one per prompt ({len(prompt_list)}), "
                                 f"got {len(names)}")
        groups: dict[str | None, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        sampling = sampling or SamplingParams()

        def run(name: str | None) -> list[GenerationResult]:
            idx = groups[name]
            body = self.completions([_wire(prompt_list[i]) for i in idx], name, sampling,
                                    return_token_ids=True)
            return [_result(c, name) for c in sorted(body["choices"], key=lambda c: c["index"])]

        out: list[GenerationResult | None] = [None] * len(prompt_list)
        with ThreadPoolExecutor(max_workers=min(8, len(groups)) or 1) as pool:
            for name, results in zip(groups, pool.map(run, groups)):
                for i, res in zip(groups[name], results):
                    out[i] = res
        return [r for r in out if r is not None]

    def completions(self, prompt: Any, adapter: str | None = None,
                    sampling: SamplingParams | None = None, **extra: Any) -> dict[str, Any]:
        """A raw ``POST /v1/completions`` (non-streaming); returns the response object."""
        return self._request("POST", "/v1/completions", self._body(prompt, adapter, sampling,
                                                                   **extra))

    def stream(self, prompt: Prompt, adapter: str | None = None,
               sampling: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one completion as the server streams them (SSE)."""
        for event in self.stream_events(prompt, adapter, sampling):
            for choice in event.get("choices", []):
                if choice.get("text"):
                    yield choice["text"]

    def stream_events(self, prompt: Prompt, adapter: str | None = None,
                      sampling: SamplingParams | None = None, **extra: Any,
                      ) -> Iterator[dict[str, Any]]:
        """Every server-sent event (parsed JSON) of one streamed completion, until [DONE]."""
        body = self._body(_wire(prompt), adapter, sampling, stream=True, **extra)
        with self._open("POST", "/v1/completions", body) as resp:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise _typed(event, 500)
                yield event

    # ---- operations ----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def metrics(self) -> str:
        """The Prometheus text of ``GET /metrics``."""
        with self._open("GET", "/metrics", None) as resp:
            return str(resp.read().decode("utf-8"))

    # ---- plumbing ------------------------------------------------------------------------
    def _body(self, prompt: Any, adapter: str | None, sampling: SamplingParams | None,
              **extra: Any) -> dict[str, Any]:
        s = sampling or SamplingParams()
        body: dict[str, Any] = {"model": adapter or self.base_model, "prompt": prompt,
                                "max_tokens": s.max_tokens, "temperature": s.temperature,
                                "top_p": s.top_p, "seed": s.seed, "ignore_eos": s.ignore_eos}
        if s.top_k:
            body["top_k"] = s.top_k
        if s.stop_token_ids:
            body["stop_token_ids"] = list(s.stop_token_ids)
        body.update(extra)
        return body

    def _request(self, method: str, path: str, body: Any = None, *,
                 admin: bool = False) -> Any:
        with self._open(method, path, body, admin=admin) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def _open(self, method: str, path: str, body: Any, *, admin: bool = False) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if admin and self.admin_token:
            headers["Authorization"] = f"Bearer {self.admin_token}"
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers,
                                     method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raw = exc.read().decode("utf-8", "replace")
            try:
                payload = json.loads(raw)
            except json.JSONDecodeError:
                payload = {"error": {"message": raw.strip() or exc.reason}}
            raise _typed(payload, exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ClusterError(f"cannot reach {self.base_url}: {exc}") from None


def _typed(payload: dict[str, Any], status: int) -> LoRAClusterError:
    """The typed error of an error body, matched by its code (else by status)."""
    err = payload.get("error") or {}
    message = str(err.get("message", f"HTTP {status}"))
    cls = _BY_CODE.get(str(err.get("code")))
    if cls is None:
        cls = AuthError if status in (401, 403) else (
            ClusterError if status == 503 else LoRAClusterError)
    typed = cls(message, **({"field": err["param"]} if err.get("param") else {}))
    typed.http_status = status
    return typed


def _wire(prompt: Any) -> Any:
    return prompt if isinstance(prompt, str) else [int(t) for t in prompt]


def _result(choice: dict[str, Any], adapter: str | None) -> GenerationResult:
    return GenerationResult(prompt_token_ids=tuple(choice.get("prompt_token_ids", ())),
                            token_ids=tuple(choice.get("token_ids", ())), text=choice["text"],
                            finish_reason=choice["finish_reason"], adapter=adapter)


def adapter_info(data: dict[str, Any]) -> AdapterInfo:
    """An ``AdapterInfo`` from its JSON form (lists back to tuples)."""
    return AdapterInfo(
        name=data["name"], source=data["source"], rank=int(data["rank"]),
        alpha=float(data["alpha"]), scaling=float(data["scaling"]),
        use_rslora=bool(data["use_rslora"]), target_modules=tuple(data["target_modules"]),
        residency=data["residency"], version=int(data.get("version", 1)),
        pinned=bool(data.get("pinned", False)),
        bytes_per_rank=tuple(data.get("bytes_per_rank", ())),
        load_ms=float(data.get("load_ms", 0.0)),
        load_breakdown_ms=tuple((str(k), float(v)) for k, v in data.get("load_breakdown_ms", ())),
        error=data.get("error"))
