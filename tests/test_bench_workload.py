"""Benchmark workloads: Zipf frequencies, reproducible seeds, lengths and tokens in range,
thread-safe streams, Poisson arrivals; presets and the CLI's literal name lists."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from lora_cluster.bench.workload import (
    RequestStream,
    WorkloadSpec,
    poisson_arrivals,
    zipf_probabilities,
)
from lora_cluster.errors import ConfigError


def test_zipf_probabilities_follow_one_over_rank() -> None:
    p = zipf_probabilities(10_000, 1.0)
    assert p.shape == (10_000,) and p.sum() == pytest.approx(1.0)
    assert p[0] / p[1] == pytest.approx(2.0) and p[0] / p[99] == pytest.approx(100.0)
    harmonic = (1.0 / np.arange(1, 10_001)).sum()
    assert p[0] == pytest.approx(1.0 / harmonic)
    assert np.allclose(zipf_probabilities(4, 0.0), 0.25)  # α = 0 is uniform


@pytest.mark.parametrize("num_adapters", [8, 100])
def test_stream_frequencies_match_zipf(num_adapters: int) -> None:
    draws = 40_000
    stream = RequestStream(WorkloadSpec(num_adapters=num_adapters, seed=3))
    counts = np.bincount([r.adapter for r in stream.take_many(draws)], minlength=num_adapters)
    assert counts.shape == (num_adapters,)
    expected = zipf_probabilities(num_adapters) * draws
    # every adapter's count within 5 binomial standard deviations of its expectation
    sigma = np.sqrt(expected * (1 - expected / draws))
    assert np.all(np.abs(counts - expected) < 5 * sigma + 1)
    assert counts[0] == counts.max()


def test_stream_is_reproducible_and_seeded() -> None:
    spec = WorkloadSpec(num_adapters=32, seed=7)
    a = RequestStream(spec).take_many(1200)  # crosses chunk boundaries
    b_stream = RequestStream(spec)
    b = [b_stream.take() for _ in range(700)] + b_stream.take_many(500)
    assert a == b
    assert [r.index for r in a] == list(range(1200))
    other = RequestStream(WorkloadSpec(num_adapters=32, seed=8)).take_many(50)
    assert [r.prompt for r in other] != [r.prompt for r in a[:50]]


def test_lengths_and_tokens_in_range() -> None:
    spec = WorkloadSpec(num_adapters=10_000, prompt_len=(3, 9), output_len=(2, 5),
                        token_range=(4, 50), seed=1)
    reqs = RequestStream(spec).take_many(3000)
    assert {len(r.prompt) for r in reqs} == set(range(3, 10))
    assert {r.max_tokens for r in reqs} == set(range(2, 6))
    tokens = np.concatenate([r.prompt for r in reqs])
    assert tokens.min() >= 4 and tokens.max() < 50
    assert all(0 <= r.adapter < 10_000 for r in reqs)


def test_take_is_thread_safe() -> None:
    stream = RequestStream(WorkloadSpec(num_adapters=5, seed=2))
    taken: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = [stream.take().index for _ in range(400)]
        with lock:
            taken.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == list(range(2400))


def test_poisson_arrivals() -> None:
    arrivals = poisson_arrivals(50.0, 20_000, seed=4)
    gaps = np.diff(np.concatenate([[0.0], arrivals]))
    assert np.all(gaps > 0)
    assert gaps.mean() == pytest.approx(1 / 50.0, rel=0.05)
    assert gaps.std() == pytest.approx(1 / 50.0, rel=0.05)  # exponential: std == mean
    assert np.array_equal(arrivals, poisson_arrivals(50.0, 20_000, seed=4))
    with pytest.raises(ConfigError, match="rate"):
        poisson_arrivals(0.0, 10)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"num_adapters": 0}, "num_adapters"),
    ({"num_adapters": 2, "prompt_len": (5, 4)}, "prompt_len"),
    ({"num_adapters": 2, "output_len": (0, 4)}, "output_len"),
    ({"num_adapters": 2, "token_range": (9, 9)}, "token_range"),
    ({"num_adapters": 2, "zipf_alpha": -1.0}, "zipf_alpha"),
])
def test_spec_refuses_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as err:
        WorkloadSpec(**kwargs)
    assert err.value.details["field"] == field


def test_presets_and_cli_names_agree() -> None:
    from lora_cluster.bench import cli
    from lora_cluster.bench.presets import PRESETS, get_preset
    from lora_cluster.bench.sweep import PARTS

    assert tuple(PRESETS) == cli.PRESET_NAMES and cli.PART_NAMES == PARTS
    h100 = get_preset("h100-moe")
    assert h100.max_loras >= 32 and h100.device == "cuda" and h100.model.hidden_size == 2048
    assert h100.model.num_experts == 128 and h100.model.num_experts_per_tok == 8
    assert get_preset("cpu-tiny").adapter_counts[-1] == 10_000
    with pytest.raises(ConfigError, match="preset"):
        get_preset("nope")


def test_goals_from_a_synthetic_result() -> None:
    from lora_cluster.bench.goals import evaluate_goals

    def row(tok_s: float) -> dict:
        return {"closed": {"tokens_per_s": tok_s}}

    result = {"engine": {"by_adapters": {"5": row(1000.0), "100": row(960.0),
                                         "10000": row(920.0)}},
              "baselines": {"peft": {"100": {"tokens_per_s": 30.0}}},
              "step_time": {"ratio_distinct_vs_one": 1.2}, "machine": {"gpu": "X"}}
    goals = evaluate_goals(result)
    assert goals["scale_10000_vs_5"]["value"] == pytest.approx(0.92)
    assert goals["scale_10000_vs_5"]["met"] is True
    assert goals["speedup_vs_peft_at_100"]["value"] == pytest.approx(32.0)
    assert goals["speedup_vs_peft_at_100"]["met"] is True
    assert goals["decode_step_distinct_vs_one"]["met"] is False
    del result["engine"]["by_adapters"]["10000"]
    result["baselines"]["peft"]["100"] = {"skipped": "not installed"}
    goals = evaluate_goals(result)
    assert goals["scale_10000_vs_5"]["met"] is None
    assert goals["speedup_vs_peft_at_100"]["met"] is None
    assert goals["scale_100_vs_5"]["value"] == pytest.approx(0.96)  # informational


def test_scale_goal_pairs_rounds() -> None:
    """With rounds, the 10,000 / 5 ratio is the median of round-by-round ratios: a host that
    slows down between rounds moves both sides of a pair, not the verdict."""
    from lora_cluster.bench.goals import evaluate_goals
    from lora_cluster.bench.metrics import engine_tok_s, paired_ratio

    def row(*tok_s: float) -> dict:
        rounds = [{"tokens_per_s": 0.0, "tokens_per_s_median": t} for t in tok_s]
        return {"closed": rounds[0], "closed_rounds": rounds}

    at5, at10k = row(1000.0, 600.0, 900.0), row(930.0, 560.0, 810.0)
    assert engine_tok_s(at5) == 900.0 and engine_tok_s(at10k) == 810.0
    median, ratios = paired_ratio(at10k, at5)
    assert ratios == pytest.approx([0.93, 560 / 600, 0.90])
    assert median == pytest.approx(0.93)
    goals = evaluate_goals({"engine": {"by_adapters": {"5": at5, "10000": at10k}}})
    assert goals["scale_10000_vs_5"]["value"] == pytest.approx(0.93)
    assert "3 paired rounds" in goals["scale_10000_vs_5"]["note"]
    # unpaired (different round counts): the ratio of the medians
    assert paired_ratio(row(810.0), at5)[0] == pytest.approx(0.90)
