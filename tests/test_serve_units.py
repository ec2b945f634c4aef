"""The Serve app's pure parts, no Ray: routing policy, settings, request parsing, error
mapping, the directory's bookkeeping, Prometheus rendering and streamed-text deltas."""

from __future__ import annotations

import json
import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.affinity import ReplicaLoad, classify, rank_replicas
from deploy.directory_state import DirectoryState
from deploy.http_errors import ForbiddenError, as_typed, error_body
from deploy.metrics import render
from deploy.openai_models import (
    CompletionRequest,
    completion_body,
    parse_body,
    plan_completion,
    stream_event,
)
from deploy.replica_stats import LoadHistogram, LoadWatcher
from deploy.settings import AppSettings, split_args
from deploy.streaming import IncrementalText
from lora_cluster.api_types import AdapterInfo, GenerationResult
from lora_cluster.errors import (
    AdapterFormatError,
    ClusterError,
    ConfigError,
    LoRAClusterError,
    RequestError,
    UnknownAdapterError,
)

# ---------------------------------------------------------------- routing policy
R = [ReplicaLoad("r0", 0, device=frozenset({"a"})),
     ReplicaLoad("r1", 0, host=frozenset({"a"})),
     ReplicaLoad("r2", 0)]


def test_holders_first_device_before_host() -> None:
    ranks = rank_replicas("a", R, spill_threshold=4)
    assert ranks[0] == ["r0"] and ranks[1] == ["r1"]
    assert set(ranks[-1]) == {"r0", "r1", "r2"}  # never starve


def test_saturated_holders_spill_to_least_loaded_others() -> None:
    replicas = [ReplicaLoad("hot", 5, device=frozenset({"a"})), ReplicaLoad("busy", 9),
                ReplicaLoad("idle", 1)]
    ranks = rank_replicas("a", replicas, spill_threshold=4)
    assert ranks[0] == ["hot", "idle"]  # "busy" is saturated too: not offered first
    assert classify("a", replicas[2], replicas) == "spill"
    # Below the threshold the holder keeps it, however idle the others are.
    calm = [ReplicaLoad("hot", 3, device=frozenset({"a"})), ReplicaLoad("idle", 0)]
    assert rank_replicas("a", calm, spill_threshold=4)[0] == ["hot"]


def test_cold_adapter_and_base_go_to_the_least_loaded() -> None:
    replicas = [ReplicaLoad("x", 3), ReplicaLoad("y", 1), ReplicaLoad("z", 2)]
    assert rank_replicas("new", replicas, 4) == [["y", "z", "x"]]
    assert rank_replicas(None, replicas, 4) == [["y", "z", "x"]]
    assert classify("new", replicas[1], replicas) == "cold"
    assert classify(None, replicas[1], replicas) == "base"
    assert classify("a", R[0], R) == "device_hit" and classify("a", R[1], R) == "host_hit"
    assert rank_replicas("a", [], 4) == []


# ---------------------------------------------------------------- settings
def test_split_args_coerces_serve_run_strings() -> None:
    cfg, app = split_args({"model": "/m", "tp-size": "2", "adapter_roots": "/a,/b",
                           "use_cuda_graphs": "false", "kv_cache_bytes": "none",
                           "replicas": "3", "spill_threshold": "5", "admin_token": "t"})
    assert (cfg.tp_size, cfg.adapter_roots, cfg.use_cuda_graphs, cfg.kv_cache_bytes) == \
        (2, ("/a", "/b"), False, None)
    assert (app.replicas, app.spill_threshold, app.admin_token) == (3, 5, "t")
    assert app.spill_for(cfg) == 5 and AppSettings().spill_for(cfg) == cfg.max_num_seqs


@pytest.mark.parametrize("args, field", [({"model": "/m", "bogus": 1}, "bogus"),
                                         ({"model": "/m", "tp_size": "two"}, "tp_size"),
                                         ({"model": "/m", "replicas": 0}, "replicas"),
                                         ({"tp_size": 1}, "model")])
def test_split_args_names_the_bad_key(args: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        split_args(args)
    assert info.value.details["field"] == field and field in str(info.value)


# ---------------------------------------------------------------- requests and responses
def test_completion_request_forms_and_defaults() -> None:
    plan = plan_completion(parse_body(CompletionRequest, {"model": "sql", "prompt": [[1, 2], [3]],
                                                          "max_tokens": 4, "temperature": 0}),
                           "base")
    assert plan.adapter == "sql" and plan.prompts == ([1, 2], [3])
    assert plan.sampling.greedy and plan.sampling.max_tokens == 4
    base = plan_completion(parse_body(CompletionRequest, {"prompt": "hi"}), "base")
    assert base.adapter is None and base.model == "base" and base.sampling.temperature == 1.0
    assert plan_completion(parse_body(CompletionRequest, {"model": "base", "prompt": [5, 6]}),
                           "base").prompts == ([5, 6],)


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "n": 2}, "n"), ({"prompt": "x", "stop": ["\n"]}, "stop"),
    ({"prompt": "x", "logprobs": 1}, "logprobs"), ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"), ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": []}, "prompt"), ({"prompt": "x", "bogus": 1}, "bogus"), ({}, "prompt"),
])
def test_unsupported_or_bad_fields_are_400_naming_the_field(body: dict, field: str) -> None:
    with pytest.raises(RequestError) as info:
        plan_completion(parse_body(CompletionRequest, body), "base")
    assert info.value.http_status == 400 and field in str(info.value.details.get("field"))


def test_response_shapes_are_openai_like() -> None:
    plan = plan_completion(parse_body(CompletionRequest, {"model": "a", "prompt": "x",
                                                          "return_token_ids": True}), "base")
    res = GenerationResult(prompt_token_ids=(1, 2), token_ids=(5, 6, 7), text="abc",
                           finish_reason="length", adapter="a")
    body = completion_body("cmpl-1", plan, (res,))
    assert body["object"] == "text_completion" and body["model"] == "a"
    assert body["choices"] == [{"index": 0, "text": "abc", "finish_reason": "length",
                                "logprobs": None, "token_ids": [5, 6, 7],
                                "prompt_token_ids": [1, 2]}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    event = stream_event("cmpl-1", plan, 0, "ab", (5,), None)
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[6:])["choices"][0]["text"] == "ab"


# ---------------------------------------------------------------- errors
class _Wrapped(Exception):
    """Stands in for Ray's RayTaskError: the real error rides in ``.cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("wrapped")
        self.cause = cause


@pytest.mark.parametrize("err, status, code", [
    (UnknownAdapterError("no 'x'"), 404, "adapter_not_found"),
    (AdapterFormatError("bad header"), 422, "adapter_format"),
    (RequestError("bad", field="prompt"), 400, "invalid_request"),
    (ForbiddenError("wrong token"), 403, "forbidden"),
    (ClusterError("down"), 503, "cluster_unavailable"),
])
def test_typed_errors_map_to_status_through_wrappers(err: LoRAClusterError, status: int,
                                                     code: str) -> None:
    typed = as_typed(_Wrapped(_Wrapped(err)))
    assert typed is err and typed.http_status == status
    body = error_body(typed)["error"]
    assert body["code"] == code and body["message"] == err.message


def test_serve_failures_are_503_and_the_rest_500() -> None:
    class DeploymentUnavailableError(Exception):
        pass

    assert as_typed(DeploymentUnavailableError("gone")).http_status == 503
    assert as_typed(KeyError("x")).http_status == 500


# ---------------------------------------------------------------- directory state
def test_directory_registry_generations_and_acks() -> None:
    now = [0.0]
    state = DirectoryState(stale_after_s=5.0, clock=lambda: now[0])
    first = state.register("a", "/a")
    assert state.register("a", "/a") == first and state.generation == 1  # idempotent
    with pytest.raises(RequestError, match="already registered"):
        state.register("a", "/other")
    assert state.update("a", "/a2").version == 2
    state.report("r1", {}, acked_generation=2)
    state.report("r2", {}, acked_generation=2)
    gen = state.remove("a")
    assert state.unacked(gen) == ["r1", "r2"]
    state.report("r1", {}, acked_generation=gen)
    now[0] = 10.0  # r2 went silent: it no longer holds up unloads
    state.report("r1", {}, acked_generation=gen)
    assert state.unacked(gen) == []
    with pytest.raises(UnknownAdapterError):
        state.remove("a")


# ---------------------------------------------------------------- metrics
def _info(name: str, load_ms: float, version: int = 1) -> AdapterInfo:
    return AdapterInfo(name=name, source=f"/{name}", rank=8, alpha=16.0, scaling=2.0,
                       use_rslora=False, target_modules=("q_proj",), residency="host",
                       version=version, load_ms=load_ms)


def test_metrics_report_every_adapter_on_every_replica_including_idle() -> None:
    state = DirectoryState()
    for name in ("hot", "idle"):
        state.register(name, f"/{name}")
    watcher = LoadWatcher()
    watcher.observe([_info("hot", 12.0)])
    watcher.observe([_info("hot", 12.0)])  # unchanged: not counted twice
    watcher.observe([_info("hot", 300.0, version=2)])
    stats = {"world_size": 2, "slots_used": 1, "max_loras": 4, "residency": {"hot": "device"},
             "load_histogram": watcher.histogram.as_dict(), "tokens_per_s": 5.0,
             "requests_by_adapter": {"hot": 3}, "load_failures_by_cause": {"adapter_format": 1}}
    state.report("r1", stats, 2)
    state.report_router("ingress", {"device_hit": 3})
    families = {f.name: f for f in text_string_to_metric_families(render(state.snapshot())
                                                                   .decode())}
    residency = {(s.labels["adapter"], s.labels["state"]): s.value
                 for s in families["lora_adapter_residency"].samples}
    assert residency[("idle", "none")] == 1 and residency[("idle", "device")] == 0
    assert residency[("hot", "device")] == 1
    slots = [s for s in families["lora_device_slots_used"].samples]
    assert {s.labels["rank"] for s in slots} == {"0", "1"}
    load = {s.name: s.value for s in families["lora_adapter_load_seconds"].samples
            if s.labels.get("le") in (None, "0.025", "0.5")}
    assert load["lora_adapter_load_seconds_count"] == 2
    assert abs(load["lora_adapter_load_seconds_sum"] - 0.312) < 1e-9
    fails = families["lora_adapter_load_failures"].samples
    assert fails[0].labels["cause"] == "adapter_format" and fails[0].value == 1
    assert families["lora_routing_decisions"].samples[0].value == 3


def test_load_histogram_buckets() -> None:
    hist = LoadHistogram((10, 100))
    for ms in (1, 10, 50, 1000):
        hist.observe(ms)
    assert hist.counts == [2, 1, 1] and hist.count == 4 and hist.sum_ms == 1061


# ---------------------------------------------------------------- streamed text
def test_incremental_text_concatenates_to_the_full_decode(fixture_cache) -> None:
    from lora_cluster.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_model_dir(fixture_cache.model("qwen3_moe"))
    assert tok is not None
    ids = tok.encode("Unicode: café, 東京, Ωμέγα 🙂 → ∑") + list(random.Random(0).sample(
        range(4, tok.vocab_size), 40))
    text = IncrementalText(tok.decode)
    pieces, i = [], 0
    rng = random.Random(1)
    while i < len(ids):
        step = rng.randint(1, 3)
        pieces.append(text.push(ids[i:i + step]))
        i += step
    pieces.append(text.finish(tok.decode(ids)))
    assert "".join(pieces) == tok.decode(ids)
