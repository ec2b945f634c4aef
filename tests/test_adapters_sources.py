"""Adapter sources: adapter_roots confinement, hub ids from an offline HF cache, and the
memory of failed loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_cluster import errors
from lora_cluster.adapters import FailedLoads, resolve_source


def _adapter(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


@pytest.fixture()
def roots(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    _adapter(root / "sql")
    _adapter(tmp_path / "outside")
    return root, tmp_path / "outside"


def test_sources_inside_roots_resolve(roots) -> None:
    root, _ = roots
    assert resolve_source("sql", adapter_roots=[root]) == (root / "sql").resolve()
    assert resolve_source(str(root / "sql"), adapter_roots=[root]) == (root / "sql").resolve()
    assert resolve_source("sql/../sql", adapter_roots=[root]) == (root / "sql").resolve()
    (root / "alias").symlink_to(root / "sql")  # a link that stays inside is fine
    assert resolve_source("alias", adapter_roots=[root]) == (root / "sql").resolve()


@pytest.mark.parametrize("escape", ["dotdot", "dotdot_missing", "absolute", "dir_symlink",
                                    "file_symlink", "home"])
def test_escapes_are_refused(escape: str, roots, tmp_path: Path) -> None:
    root, outside = roots
    source = {"dotdot": "../outside", "dotdot_missing": "../../etc/nothing-here",
              "absolute": str(outside), "dir_symlink": "link", "file_symlink": "sql",
              "home": "~"}[escape]
    if escape == "dir_symlink":
        (root / "link").symlink_to(outside)
    if escape == "file_symlink":
        weights = root / "sql" / "adapter_model.safetensors"
        weights.unlink()
        weights.symlink_to(outside / "adapter_model.safetensors")
    with pytest.raises(errors.AdapterAccessError) as info:
        resolve_source(source, adapter_roots=[root])
    assert "adapter_roots" in str(info.value)


def test_without_roots_any_existing_directory(roots) -> None:
    _, outside = roots
    assert resolve_source(str(outside)) == outside.resolve()
    with pytest.raises(errors.AdapterNotFoundError, match="no such adapter directory"):
        resolve_source(str(outside / "missing"))
    with pytest.raises(errors.AdapterNotFoundError):
        resolve_source("")


def _hf_cache(cache: Path, repo: str, sha: str = "0123abcd") -> Path:
    """A cache directory in huggingface_hub's own layout."""
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = _adapter(base / "snapshots" / sha)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(sha)
    return snap


def test_hub_id_resolves_from_offline_cache(tmp_path: Path, roots,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hf-cache"
    snap = _hf_cache(cache, "org/sql-lora")
    assert resolve_source("org/sql-lora", cache_dir=cache, offline=True) == snap
    assert resolve_source("org/sql-lora@main", cache_dir=cache, offline=True) == snap
    root, _ = roots  # roots confine local paths only; a hub id is fetched into the HF cache
    assert resolve_source("org/sql-lora", adapter_roots=[root], cache_dir=cache,
                          offline=True) == snap
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline=None follows HF_HUB_OFFLINE
    assert resolve_source("org/sql-lora", cache_dir=cache) == snap
    with pytest.raises(errors.AdapterNotFoundError, match="offline"):
        resolve_source("org/not-cached", cache_dir=cache)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_failed_loads_remember_for_ttl() -> None:
    now = [100.0]
    failed = FailedLoads(ttl_s=30.0, max_entries=2, clock=lambda: now[0])
    err = errors.AdapterShapeError("adapter x: bad shape", key="k")
    failed.record("x", err)
    failed.check("y")
    with pytest.raises(errors.AdapterShapeError, match="bad shape") as info:
        failed.check("x")
    assert info.value is not err and info.value.details == {"key": "k"}
    now[0] += 29.9
    assert failed.get("x") is not None and len(failed) == 1
    now[0] += 0.2
    failed.check("x")  # expired
    assert len(failed) == 0
    for key in ("a", "b", "c"):
        failed.record(key, err)
    assert failed.get("a") is None and failed.get("c") is not None  # bounded, oldest dropped
    failed.forget("c")
    assert failed.get("c") is None
    never = FailedLoads(ttl_s=0.0)
    never.record("x", err)
    never.check("x")
