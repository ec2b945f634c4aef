"""The benchmark end to end on the tiny model with N ∈ {1, 3}: every part runs, the report's
figures are real numbers consistent with each other, the baselines generate the engine's
tokens, the CLI writes its files, and the closed loop runs through a Ray cluster."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from lora_cluster.bench.assets import prepare_assets
from lora_cluster.bench.presets import BenchPreset, get_preset
from lora_cluster.bench.report import format_report, merge_results, plot, write_json
from lora_cluster.bench.sweep import BenchOptions, run_bench
from lora_cluster.bench.workload import RequestStream


def _tiny() -> BenchPreset:
    return get_preset("cpu-tiny").replace(
        adapter_counts=(1, 3), warmup_s=0.3, initial_warmup_s=0.3, duration_s=2.0, open_duration_s=1.5, clients=6,
        max_num_seqs=4, prompt_len=(3, 12), output_len=(2, 6), baseline_duration_s=0.3,
        step_seqs=3, step_decode_tokens=3, kv_cache_bytes=8 << 20)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cache = tmp_path_factory.mktemp("bench-cache")
    return run_bench(BenchOptions(preset=_tiny(), adapter_counts=(1, 3), cache_dir=cache,
                                  backend="local", rate=20.0, rounds=2, show_progress=False))


def _ordered(block: dict[str, float | None]) -> bool:
    p50, p90, p99 = block["p50"], block["p90"], block["p99"]
    return p50 is not None and p90 is not None and p99 is not None and 0 <= p50 <= p90 <= p99


def test_engine_figures_are_consistent(result: dict[str, Any]) -> None:
    preset = _tiny()
    for n in (1, 3):
        closed = result["engine"]["by_adapters"][str(n)]["closed"]
        opened = result["engine"]["by_adapters"][str(n)]["open"]
        for phase in (closed, opened):
            assert phase["errors"] == 0, phase["first_error"]
            assert phase["requests"] > 0
            assert phase["requests_per_s"] == pytest.approx(phase["requests"] / phase["duration_s"])
            assert phase["tokens_per_s"] == pytest.approx(
                phase["output_tokens"] / phase["duration_s"])
            lo, hi = preset.output_len
            assert lo <= phase["mean_output_tokens"] <= hi
            assert 1 <= phase["distinct_adapters"] <= n
            for key in ("ttft_s", "tpot_s", "latency_s"):
                assert _ordered(phase[key]), (n, key, phase[key])
            # per request TTFT <= end-to-end latency, so every percentile is ordered too
            assert all(phase["ttft_s"][p] <= phase["latency_s"][p] for p in ("p50", "p90", "p99"))
            # the client's TTFT adds what the engine cannot see to the engine's own
            assert all(phase["server_ttft_s"][p] <= phase["ttft_s"][p] for p in ("p50", "p99"))
            assert 0.0 <= phase["slot_hit_rate"] <= 1.0
            assert phase["adapter_loads"] <= n and phase["slot_loads"] <= n
            assert phase["steps"] > 0 and 0 < phase["tokens_per_step"] <= preset.max_num_seqs
            assert phase["step_ms"] * phase["steps"] == pytest.approx(
                phase["duration_s"] * 1e3, rel=0.2)
        # the server's token counter over the same window agrees with the client's count
        assert 0.5 < closed["server_tokens_per_s"] / closed["tokens_per_s"] < 2.0
        windows = [w["tokens_per_s"] for w in closed["windows"]]
        assert len(windows) == preset.windows == 3
        assert sorted(windows)[1] == closed["tokens_per_s_median"]
        assert sum(w["duration_s"] for w in closed["windows"]) == pytest.approx(
            closed["duration_s"], rel=0.05)
        assert closed["clients"] == preset.clients
        assert opened["requests"] == opened["offered_requests"] == round(20.0 * 1.5)
        assert opened["rate"] == 20.0
    reg = result["engine"]["registration"]
    assert reg["registered"] == 3 and reg["register_ms_per_adapter"] > 0
    assert reg["load_adapter_ms"]["p50"] > 0


def test_rounds_repeat_the_closed_loop_at_every_n(result: dict[str, Any]) -> None:
    for n in (1, 3):
        row = result["engine"]["by_adapters"][str(n)]
        rounds = row["closed_rounds"]
        assert len(rounds) == 2 and rounds[0] == row["closed"]
        assert all(c["errors"] == 0 and c["requests"] > 0 for c in rounds)
        # how adapter commands travelled, and whether the step pipeline ran dry
        assert all(c[k] >= 0 for c in rounds for k in (
            "loads_on_step", "placements_on_step", "standalone_commands", "async_drains"))
    report = format_report(result)
    assert "closed-loop rounds" in report and "N=3:" in report


def test_step_time_and_goals(result: dict[str, Any]) -> None:
    step = result["step_time"]
    assert step["num_seqs"] == 3
    assert step["modes"]["base"]["distinct_slots"] == [0]
    assert step["modes"]["one"]["distinct_slots"] == [1]
    assert step["modes"]["distinct"]["distinct_slots"] == [3]
    ratio = step["modes"]["distinct"]["forward_ms"]["median"] / step["modes"]["one"]["forward_ms"]["median"]
    assert step["ratio_distinct_vs_one"] == pytest.approx(ratio)
    goals = result["goals"]
    assert goals["decode_step_distinct_vs_one"]["value"] == pytest.approx(ratio)
    assert goals["decode_step_distinct_vs_one"]["met"] is (ratio <= 1.1)
    assert goals["scale_10000_vs_5"]["met"] is None  # not measured at N ∈ {1, 3}


def test_baselines_ran_with_real_numbers(result: dict[str, Any]) -> None:
    baselines = result["baselines"]
    for kind in ("merged", "peft"):
        for n in (1, 3):
            row = baselines[kind][str(n)]
            assert row["requests"] >= 4 and row["batch_size"] == 4
            assert row["tokens_per_s"] == pytest.approx(row["output_tokens"] / row["duration_s"])
            assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
            assert row["tokens_per_s_median"] > 0
            assert 1 <= row["distinct_adapters_per_batch"] <= n
    assert baselines["merged"]["bytes_per_adapter"] > 0


def test_report_json_and_png(result: dict[str, Any], tmp_path: Path) -> None:
    text = format_report(result)
    assert "N=5" in text and "decode step" in text and "registration: 3 adapters" in text
    path = write_json(result, tmp_path / "e2e.json")
    assert json.loads(path.read_text())["engine"]["by_adapters"]["3"]["closed"]["requests"] > 0
    note = plot(result, tmp_path / "e2e.png")
    if note is None:
        assert (tmp_path / "e2e.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib" in note
    partial = {"preset": result["preset"], "command": "second", "adapter_counts": [3],
               "baselines": {"peft": {"3": {"skipped": "x"}}}}
    merged = merge_results(result, partial)
    assert merged["engine"] == result["engine"] and merged["baselines"]["peft"]["3"]["skipped"]
    assert merged["baselines"]["merged"] == result["baselines"]["merged"]
    with pytest.raises(ValueError, match="preset"):
        merge_results(result, {**partial, "preset": "h100-moe"})


def test_baselines_generate_the_engines_tokens(tmp_path: Path) -> None:
    from lora_cluster.bench.assets import adapter_name
    from lora_cluster.bench.hf_baselines import HFModel, MergedWeights, PeftMixed
    from lora_cluster.bench.runners import send
    from lora_cluster.bench.target import start_local

    preset = _tiny()
    assets = prepare_assets(preset, tmp_path, 3)
    requests = RequestStream(preset.workload(3, seed=5)).take_many(6)
    names = assets.adapter_names(3)
    core = start_local(preset.cluster_config(str(assets.model_dir)))
    try:
        core.register_adapters({n: str(d) for n, d in zip(names, assets.adapter_dirs)})
        ours = [list(core.generate([list(r.prompt)], [names[r.adapter]],
                                   sampling=_sampling(r))[0].token_ids) for r in requests]
        assert send(core, requests[0], names).output_tokens == requests[0].max_tokens
    finally:
        core.shutdown()
    hf = HFModel(assets.model_dir, device="cpu", dtype="float32")
    merged = MergedWeights(hf)
    for d in assets.adapter_dirs:
        merged.add(d)
    assert merged.run_batch(requests) == ours
    peft = PeftMixed(hf)
    for i, d in enumerate(assets.adapter_dirs):
        peft.add(adapter_name(i), d)
    assert peft.run_batch(requests) == ours
    assert len({tuple(t) for t in ours}) > 1


def _sampling(request: Any) -> Any:
    from lora_cluster.bench.runners import sampling_for

    return sampling_for(request)


def test_cli_writes_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lora_cluster.cli import main

    code = main(["bench", "--preset", "cpu-tiny", "--adapters", "2", "--parts", "engine",
                 "--backend", "local", "--duration", "0.6", "--warmup", "0.2",
                 "--open-duration", "0.5", "--rate", "10", "--clients", "4",
                 "--max-num-seqs", "4", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    out = capsys.readouterr()
    assert "preset cpu-tiny (local)" in out.out and "wrote" in out.err
    saved = json.loads((tmp_path / "out" / "e2e_cpu-tiny.json").read_text())
    assert saved["adapter_counts"] == [2] and saved["settings"]["max_num_seqs"] == 4
    assert saved["command"].startswith("lora-cluster") or "bench" in saved["command"]
    # --render redraws a saved result without running anything
    assert main(["bench", "--render", str(tmp_path / "out" / "e2e_cpu-tiny.json"),
                 "--out", str(tmp_path / "render")]) == 0
    assert "preset cpu-tiny (local)" in capsys.readouterr().out


@pytest.mark.ray
def test_closed_loop_through_ray(ray_session: Any, tmp_path: Path) -> None:
    from lora_cluster.bench.metrics import summarize
    from lora_cluster.bench.runners import run_closed_loop
    from lora_cluster.bench.target import open_target

    preset = _tiny()
    assets = prepare_assets(preset, tmp_path, 3)
    names = assets.adapter_names(3)
    with open_target(preset.cluster_config(str(assets.model_dir)), "ray") as cluster:
        infos = cluster.register_adapters(list(zip(names, map(str, assets.adapter_dirs))))
        assert {i.residency for i in infos} == {"registered"}
        run = run_closed_loop(cluster, RequestStream(preset.workload(3)), names, clients=4,
                              warmup_s=0.3, duration_s=1.5)
    summary = summarize(run)
    assert summary["errors"] == 0 and summary["requests"] > 0
    # registered lazily: each adapter was read from disk exactly once, on its first request
    assert run.stats_after["tiers"]["host"]["misses"] == summary["distinct_adapters"] == 3
    assert 0.0 <= summary["slot_hit_rate"] <= 1.0
