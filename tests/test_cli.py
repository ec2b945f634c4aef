"""The ``lora-cluster`` CLI against a named, detached cluster it started (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.ray

CLI = [sys.executable, "-m", "lora_cluster.cli"]


def _run(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def _one_line_cause(stderr: str, expected: str) -> None:
    """Progress lines may precede it; the cause itself is exactly one line, and the last."""
    causes = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(causes) == 1 and expected in causes[0], stderr
    assert stderr.strip().splitlines()[-1] == causes[0]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = dict(os.environ)
    env["LORA_CLUSTER_STATE_DIR"] = str(tmp_path_factory.mktemp("cli-state"))
    env["RAY_DISABLE_USAGE_STATS"] = "1"
    return env


def test_start_load_list_generate_evict_status_stop(cli_env: dict[str, str],
                                                     fixture_cache: Any, tmp_path: Path) -> None:
    model_dir = fixture_cache.model("qwen3_moe")
    adapter = fixture_cache.adapter(model_dir, targets=["attention"], r=8, alpha=16, seed=41)
    name = ["--name", "clitest"]
    started = _run(cli_env, "start", "--model", str(model_dir), *name, "--device", "cpu",
                   "--kv-cache-bytes", str(16 << 20), "--max-loras", "2", "--json")
    state = json.loads(started.stdout)
    assert state["started"] == "clitest" and state["address"].startswith("127.0.0.1:")
    try:
        loaded = _run(cli_env, "load", "sql", str(adapter), *name)
        assert "loaded 'sql'" in loaded.stdout and "rank 8" in loaded.stdout

        table = _run(cli_env, "list", *name).stdout.splitlines()
        assert table[0].split()[:3] == ["name", "residency", "rank"]
        assert any(line.startswith("sql ") for line in table[2:])
        listed = json.loads(_run(cli_env, "list", *name, "--json").stdout)
        assert [a["name"] for a in listed] == ["sql"] and listed[0]["rank"] == 8

        gen = json.loads(_run(cli_env, "generate", *name, "--adapter", "sql", "--max-tokens",
                              "3", "--json", "hello", "world").stdout)
        assert len(gen) == 2 and all(len(r["token_ids"]) <= 3 for r in gen)
        assert {r["adapter"] for r in gen} == {"sql"}
        base = json.loads(_run(cli_env, "generate", *name, "--max-tokens", "3", "--json",
                               "hello").stdout)
        assert base[0]["adapter"] is None

        bad = _run(cli_env, "load", "ghost", str(tmp_path / "missing"), *name, ok=False)
        assert bad.returncode != 0
        _one_line_cause(bad.stderr, "AdapterNotFoundError")

        _run(cli_env, "evict", "sql", *name)
        assert json.loads(_run(cli_env, "list", *name, "--json").stdout) == []
        unknown = _run(cli_env, "generate", *name, "--adapter", "sql", "x", ok=False)
        assert unknown.returncode != 0 and "UnknownAdapterError" in unknown.stderr

        status = json.loads(_run(cli_env, "status", *name, "--json").stdout)
        assert status["world_size"] == 1
    finally:
        stopped = _run(cli_env, "stop", *name, ok=False)
    assert stopped.returncode == 0, stopped.stderr
    gone = _run(cli_env, "status", *name, ok=False)
    assert gone.returncode != 0
    _one_line_cause(gone.stderr, "ClusterError")


def test_bad_flag_value_is_one_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = _run(cli_env, "start", "--model", str(tmp_path / "nope"), "--name", "bad",
                "--tp-size", "0", ok=False)
    assert proc.returncode != 0
    _one_line_cause(proc.stderr, "ConfigError: tp_size")
