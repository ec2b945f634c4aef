"""``lora-cluster serve`` in a subprocess (its own embedded Ray), driven by ``HTTPClient``;
SIGINT then stops it cleanly (exit 0)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lora_cluster import SamplingParams
from lora_cluster.errors import (
    AdapterFormatError,
    AuthError,
    ClusterError,
    RequestError,
    UnknownAdapterError,
)
from lora_cluster.http_client import HTTPClient
from lora_cluster.testing import write_adapter

pytestmark = pytest.mark.ray

CLI = [sys.executable, "-m", "lora_cluster.cli"]
TOKEN = "cli-token"
GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(fixture_cache: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    model_dir = fixture_cache.model("qwen3_moe")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1",
           "LORA_CLUSTER_STATE_DIR": str(log.parent)}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", "--model", str(model_dir), "--port", str(port), "--device", "cpu",
             "--kv-cache-bytes", str(16 << 20), "--max-loras", "2", "--num-cpus-per-rank",
             "0.1", "--admin-token", TOKEN],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = HTTPClient(f"http://127.0.0.1:{port}", admin_token=TOKEN, timeout=120)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"serve exited early:\n{log.read_text()[-3000:]}"
            # Up once the CLI says so (the proxy answers 404 before the app is deployed).
            if "Ctrl-C to stop" in log.read_text():
                assert client.health()["status"] == "ok"
                break
            assert time.monotonic() < deadline, f"serve did not come up:\n{log.read_text()}"
            time.sleep(0.5)
        yield proc, client, model_dir, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_http_client_speaks_the_python_api(served: Any, fixture_cache: Any,
                                           tmp_path: Path) -> None:
    _, client, model_dir, _ = served
    path = fixture_cache.adapter(model_dir, targets=["attention"], r=8, alpha=16, seed=51)
    info = client.load_adapter("sql", str(path))
    assert info.name == "sql" and info.rank == 8 and info.source == str(path)
    assert [a.name for a in client.list_adapters()] == ["sql"]
    assert client.base_model == model_dir.name

    results = client.generate([[1, 17, 42], "hello world"], adapters=["sql", None],
                              sampling=GREEDY)
    assert [r.adapter for r in results] == ["sql", None]
    assert all(len(r.token_ids) == 5 and r.finish_reason == "length" for r in results)
    assert results[0].prompt_token_ids == (1, 17, 42)
    again = client.generate([[1, 17, 42]], adapters="sql", sampling=GREEDY)
    assert again[0].token_ids == results[0].token_ids  # greedy is deterministic
    streamed = "".join(client.stream("hello world", adapter=None, sampling=GREEDY))
    assert streamed == results[1].text

    text = client.metrics()
    assert 'lora_adapter_residency{adapter="sql"' in text and "lora_device_slots_total" in text

    broken = write_adapter(tmp_path / "broken", model_dir, corrupt="truncated_header",
                           targets=["attention"])
    with pytest.raises(AdapterFormatError):
        client.load_adapter("broken", str(broken))
    with pytest.raises(RequestError) as bad:
        client.completions("x", None, SamplingParams(max_tokens=2), n=2)
    assert bad.value.http_status == 400 and bad.value.details["field"] == "n"
    wrong = HTTPClient(client.base_url, admin_token="wrong")
    with pytest.raises(AuthError) as denied:
        wrong.evict_adapter("sql")
    assert denied.value.http_status == 403
    with pytest.raises(AuthError) as missing:
        HTTPClient(client.base_url).load_adapter("x", str(path))
    assert missing.value.http_status == 401

    client.evict_adapter("sql")
    assert client.list_adapters() == []
    with pytest.raises(UnknownAdapterError):
        client.generate(["x"], adapters="sql", sampling=GREEDY)


def test_serve_stops_cleanly_on_sigint(served: Any) -> None:
    proc, client, _, log = served
    assert client.health()["replicas"] == 1
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert "Ctrl-C to stop" in output and "stopped" in output.splitlines()[-1]
    with pytest.raises(ClusterError):
        client.health()


def test_serve_rejects_bad_flags_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([*CLI, "serve", "--model", str(tmp_path), "--tp-size", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ConfigError: tp_size")
