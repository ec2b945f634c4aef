"""The Serve app end to end on 127.0.0.1: an OpenAI-style client (httpx) against two replicas.

One app per module (2 ``LoRAServer`` replicas, each with its own rank actor, behind the
affinity router) on the session's Ray, plus a ``Cluster`` on the same Ray as the Python-API
reference for outputs.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lora_cluster import Cluster, ClusterConfig, SamplingParams
from lora_cluster.testing import write_adapter

pytestmark = pytest.mark.ray

APP = "lora_serve_test"
TOKEN = "s3cret-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS: list[Any] = [[1, 17, 42, 99, 7], "The quick brown fox"]
MAX_NEW = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(cond: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not met within {timeout_s}s"
        time.sleep(0.1)


def _config(model_dir: Path) -> ClusterConfig:
    return ClusterConfig(model=str(model_dir), device="cpu", max_loras=2, max_cpu_loras=4,
                         kv_cache_bytes=16 << 20, num_cpus_per_rank=0.1)


@pytest.fixture(scope="module")
def app(ray_session: Any, fixture_cache: Any) -> Iterator[dict[str, Any]]:
    from ray import serve

    from deploy.app import build_app

    model_dir = fixture_cache.model("qwen3_moe")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(_config(model_dir), replicas=2, admin_token=TOKEN, spill_threshold=2,
                        routing_stats_period_s=0.25, report_period_s=0.5),
              name=APP, route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        yield {"client": client, "model_dir": model_dir, "base": model_dir.name, "port": port}
    finally:
        client.close()
        serve.delete(APP)
        serve.shutdown()


@pytest.fixture(scope="module")
def adapters(app: dict[str, Any], fixture_cache: Any) -> dict[str, Path]:
    """The two adapters every test here uses, loaded over HTTP (asserting the route)."""
    model_dir = app["model_dir"]
    dirs = {"sql": fixture_cache.adapter(model_dir, targets=["attention"], r=8, alpha=16, seed=31),
            "chat": fixture_cache.adapter(model_dir, targets=["all"], r=4, alpha=8, seed=32)}
    for name, path in dirs.items():
        r = app["client"].post("/v1/load_lora_adapter",
                               json={"lora_name": name, "lora_path": str(path)}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["adapter"]["name"] == name and r.json()["adapter"]["rank"] in (4, 8)
    return dirs


@pytest.fixture(scope="module")
def reference(ray_session: Any, app: dict[str, Any], adapters: dict[str, Path]) -> dict[Any, Any]:
    """Greedy outputs of the Python API (``Cluster.generate``) for each adapter and the base."""
    cluster = Cluster.start(_config(app["model_dir"]))
    try:
        for name, path in adapters.items():
            cluster.load_adapter(name, str(path))
        out = {}
        for name in (None, "sql", "chat"):
            out[name] = cluster.generate(PROMPTS, adapters=name,
                                         sampling=SamplingParams(max_tokens=MAX_NEW,
                                                                 ignore_eos=True))
        return out
    finally:
        cluster.shutdown()


def _complete(client: httpx.Client, model: str, prompt: Any, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0,
            "ignore_eos": True, **extra}
    return client.post("/v1/completions", json=body)


def _metrics(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def _holders(client: httpx.Client, name: str) -> dict[str, str]:
    for model in client.get("/v1/models").json()["data"]:
        if model["id"] == name:
            return {r: t for r, t in model["residency"]["replicas"].items() if t != "none"}
    return {}


# ---------------------------------------------------------------- OpenAI surface
def test_completions_equal_the_python_api(app, adapters, reference) -> None:
    client = app["client"]
    for name in (None, "sql", "chat"):
        r = _complete(client, name or app["base"], PROMPTS, return_token_ids=True)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert body["model"] == (name or app["base"])
        for choice, want in zip(body["choices"], reference[name]):
            assert choice["token_ids"] == list(want.token_ids), name
            assert choice["text"] == want.text and choice["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == MAX_NEW * len(PROMPTS)
    assert [c["token_ids"] for c in _complete(client, "sql", PROMPTS, return_token_ids=True)
            .json()["choices"]] != [list(w.token_ids) for w in reference[None]]


def test_stream_chunks_concatenate_to_the_full_text(app, adapters, reference) -> None:
    client = app["client"]
    events = []
    with client.stream("POST", "/v1/completions",
                       json={"model": "sql", "prompt": PROMPTS[1], "max_tokens": MAX_NEW,
                             "temperature": 0, "ignore_eos": True, "stream": True,
                             "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert len(events) >= 3  # several chunks, then the usage chunk
    text = "".join(c["text"] for e in events for c in e["choices"])
    assert text == reference["sql"][1].text
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert finishes == ["length"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == MAX_NEW


def test_multi_prompt_stream_interleaves_choices(app, adapters, reference) -> None:
    with app["client"].stream("POST", "/v1/completions",
                              json={"model": "chat", "prompt": PROMPTS, "max_tokens": MAX_NEW,
                                    "temperature": 0, "ignore_eos": True, "stream": True,
                                    "return_token_ids": True}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    for index, want in enumerate(reference["chat"]):
        choices = [c for e in events for c in e["choices"] if c["index"] == index]
        assert [t for c in choices for t in c["token_ids"]] == list(want.token_ids)
        assert "".join(c["text"] for c in choices) == want.text


def test_deployment_handle_speaks_the_python_api(app, adapters, reference) -> None:
    import ray
    from ray import serve

    handle = serve.get_deployment_handle("LoRAServer", APP)
    greedy = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    results = handle.options(multiplexed_model_id="sql").generate.remote(
        PROMPTS, "sql", greedy).result(timeout_s=120)
    assert [r.token_ids for r in results] == [r.token_ids for r in reference["sql"]]
    names = {i.name for i in handle.list_adapters.remote().result(timeout_s=60)}
    assert {"sql", "chat"} <= names
    refs = handle.score.remote([PROMPTS[0]], "sql").result(timeout_s=60)
    (logits,) = ray.get(refs)
    assert logits.shape[0] == len(PROMPTS[0]) and str(logits.dtype) == "torch.float32"
    stats = handle.stats.remote().result(timeout_s=60)
    assert stats["replica_id"] and "requests_by_adapter" in stats


def test_models_list_base_and_adapters_with_residency(app, adapters) -> None:
    data = app["client"].get("/v1/models").json()
    ids = [m["id"] for m in data["data"]]
    assert data["object"] == "list" and ids[0] == app["base"]
    assert {"sql", "chat"} <= set(ids)
    sql = next(m for m in data["data"] if m["id"] == "sql")
    assert sql["parent"] == app["base"] and sql["root"] == str(adapters["sql"])
    assert sql["lora"]["rank"] == 8 and set(sql["residency"]["replicas"].values()) <= {
        "device", "host", "none"}
    assert app["client"].get("/health").json()["status"] == "ok"


def test_admin_routes_need_the_token(app, adapters, fixture_cache) -> None:
    client = app["client"]
    body = {"lora_name": "x", "lora_path": str(adapters["sql"])}
    missing = client.post("/v1/load_lora_adapter", json=body)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    wrong = client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"},
                        headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
    assert set(wrong.json()["error"]) >= {"message", "type", "code"}
    assert "x" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert _complete(client, "sql", [1, 2, 3]).status_code == 200  # "sql" still served


def test_corrupt_adapter_is_422_and_the_rest_keep_serving(app, adapters, reference,
                                                          tmp_path) -> None:
    client = app["client"]
    broken = write_adapter(tmp_path / "broken", app["model_dir"], corrupt="truncated_header",
                           targets=["attention"])
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "broken",
                                                    "lora_path": str(broken)}, headers=ADMIN)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "adapter_format" and "broken" in r.text
    assert "broken" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert _complete(client, "broken", [1, 2]).status_code == 404
    ok = _complete(client, "chat", PROMPTS, return_token_ids=True)
    assert [c["token_ids"] for c in ok.json()["choices"]] == [
        list(w.token_ids) for w in reference["chat"]]

    def failures() -> float:
        fam = _metrics(client).get("lora_adapter_load_failures")
        return sum(x.value for x in fam.samples if x.labels["cause"] == "adapter_format"
                   and x.name.endswith("_total")) if fam else 0

    assert _wait(lambda: failures() >= 1, what="load failure counted by cause")


def test_bad_requests_are_400_with_the_field(app, adapters) -> None:
    client = app["client"]
    r = _complete(client, "sql", "hi", n=3)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type":
                                                                      "application/json"})
    assert r.status_code == 400
    r = _complete(client, "sql", [10**9])
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]


def test_unload_then_404_on_every_replica(app, fixture_cache) -> None:
    client = app["client"]
    path = fixture_cache.adapter(app["model_dir"], targets=["experts"], r=4, seed=33)
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "tmp", "lora_path": str(path)},
                       headers=ADMIN).status_code == 200
    with ThreadPoolExecutor(4) as pool:  # spread it so both replicas may hold it
        codes = list(pool.map(lambda _: _complete(client, "tmp", [1, 5, 9]).status_code, range(6)))
    assert codes == [200] * 6
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "tmp"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    for _ in range(6):
        gone = _complete(client, "tmp", [1, 5, 9])
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "adapter_not_found"
    again = client.post("/v1/unload_lora_adapter", json={"lora_name": "tmp"}, headers=ADMIN)
    assert again.status_code == 404


def test_metrics_show_an_idle_adapters_residency(app, fixture_cache) -> None:
    client = app["client"]
    path = fixture_cache.adapter(app["model_dir"], targets=["attention"], r=4, seed=34)
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "idle",
                                                       "lora_path": str(path)},
                       headers=ADMIN).status_code == 200

    def idle_states() -> dict[str, float]:
        fam = _metrics(client)["lora_adapter_residency"]
        return {f"{s.labels['replica']}:{s.labels['state']}": s.value for s in fam.samples
                if s.labels["adapter"] == "idle"}

    def current() -> list[str]:
        return sorted(k.split(":")[1] for k, v in idle_states().items() if v == 1)

    # Loaded (validated) on one replica, never used: host there, none on the other — both
    # reported (the directory knows it at once; the loading replica's report trails).
    assert len(idle_states()) == 6 and set(current()) <= {"host", "none"}
    assert _wait(lambda: current() == ["host", "none"], what="the loader reports 'host'")
    families = _metrics(client)
    slots = {s.labels["replica"]: s.value for s in families["lora_device_slots_total"].samples}
    assert len(slots) == 2 and set(slots.values()) == {2}  # max_loras per rank, both replicas
    assert any(s.value >= 1 for s in families["lora_adapter_load_seconds"].samples
               if s.name.endswith("_count"))
    assert {s.labels["replica"] for s in families["lora_queue_depth"].samples} == set(slots)


# ---------------------------------------------------------------- routing over two replicas
def _load_hot(app: dict[str, Any], fixture_cache: Any) -> str:
    """Register "hot" (idempotent) and return a replica holding it."""
    client = app["client"]
    path = fixture_cache.adapter(app["model_dir"], targets=["attention"], r=8, seed=35)
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": str(path)},
                       headers=ADMIN).status_code == 200
    holders = _wait(lambda: _holders(client, "hot"), what="'hot' reported")
    return str(sorted(holders)[0])


def test_requests_land_on_the_replica_holding_their_adapter(app, fixture_cache) -> None:
    client = app["client"]
    holder = _load_hot(app, fixture_cache)

    def six_requests() -> tuple[Counter[str], float]:
        before = _decisions(client)
        served: Counter[str] = Counter()
        for i in range(6):
            r = _complete(client, "hot", [1, 2, 3, i])
            assert r.status_code == 200
            served[r.headers["x-lora-replica"]] += 1
        after = _decisions(client)
        return served, sum(after.get(k, 0) - before.get(k, 0) for k in ("device_hit", "host_hit"))

    # Routers learn residency from replica stats polled every 0.25 s: until then a request
    # is routed cold. Once they know, every request goes to the holder and counts as a hit.
    deadline = time.monotonic() + 30
    while True:
        served, hits = six_requests()
        if (served == {holder: 6} and hits == 6) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert served == {holder: 6} and hits == 6
    holder_count = _wait(lambda: _hot_requests(client).get(holder, 0) >= 6 and
                         _hot_requests(client)[holder], what="holder's request count")
    assert holder_count >= 6


def test_a_saturating_burst_spreads_to_both_replicas(app, fixture_cache) -> None:
    client = app["client"]
    holder = _load_hot(app, fixture_cache)
    others_held = len(_holders(client, "hot")) > 1
    before = _decisions(client)

    def one(i: int) -> str:
        r = _complete(client, "hot", [1, 7, i], max_tokens=24)
        assert r.status_code == 200, r.text
        return str(r.headers["x-lora-replica"])

    with ThreadPoolExecutor(12) as pool:
        served = Counter(pool.map(one, range(12)))
    assert len(served) == 2 and served[holder] >= 2, served
    if not others_held:  # the other replica got "hot" only by spilling
        assert _decisions(client).get("spill", 0) > before.get("spill", 0)
    per_replica = _wait(lambda: len(_hot_requests(client)) == 2 and _hot_requests(client),
                        what="both replicas count 'hot' requests")
    assert all(n > 0 for n in per_replica.values())
    assert len(_wait(lambda: len(_holders(client, "hot")) == 2 and _holders(client, "hot"),
                     what="both replicas hold 'hot'")) == 2


def _hot_requests(client: httpx.Client) -> dict[str, float]:
    return {s.labels["replica"]: s.value for s in _metrics(client)["lora_requests"].samples
            if s.labels["adapter"] == "hot"}


def _decisions(client: httpx.Client) -> dict[str, float]:
    fam = _metrics(client).get("lora_routing_decisions")
    return {} if fam is None else {s.labels["decision"]: s.value for s in fam.samples}
