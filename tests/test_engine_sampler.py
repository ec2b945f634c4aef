"""Sampler: greedy ties, batch-independent seeded draws, top-k/top-p support, distribution."""

from __future__ import annotations

import torch

from lora_cluster.engine.messages import SampleSpec
from lora_cluster.engine.sampler import SamplingBatch, sample, uniform_noise


def _batch(specs):
    return SamplingBatch.from_specs(specs, "cpu")


def test_greedy_matches_torch_argmax_including_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [0.0, -1.0, 2.0, 2.0]])
    got = sample(logits, _batch([SampleSpec()] * 3))
    assert got.tolist() == torch.argmax(logits, dim=-1).tolist() == [1, 0, 2]


def test_seeded_draw_does_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 257, generator=gen)
    specs = [SampleSpec(temperature=0.8, top_p=0.9, top_k=50, seed=11 + i, index=3 * i)
             for i in range(6)]
    together = sample(logits, _batch(specs))
    alone = [int(sample(logits[i:i + 1], _batch([specs[i]]))) for i in range(6)]
    shuffled_order = [4, 0, 5, 2, 1, 3]
    shuffled = sample(logits[shuffled_order], _batch([specs[i] for i in shuffled_order]))
    assert together.tolist() == alone
    assert shuffled.tolist() == [alone[i] for i in shuffled_order]
    # Greedy rows mixed in change nothing for the random rows.
    mixed = sample(torch.cat([logits, logits]), _batch(specs + [SampleSpec()] * 6))
    assert mixed[:6].tolist() == alone
    assert mixed[6:].tolist() == torch.argmax(logits, -1).tolist()


def test_seed_and_index_change_the_draw():
    logits = torch.zeros(64, 1000)
    same = sample(logits, _batch([SampleSpec(temperature=1.0, seed=5, index=0)] * 64))
    assert len(set(same.tolist())) == 1
    by_index = sample(logits, _batch([SampleSpec(temperature=1.0, seed=5, index=i) for i in range(64)]))
    by_seed = sample(logits, _batch([SampleSpec(temperature=1.0, seed=s, index=0) for s in range(64)]))
    assert len(set(by_index.tolist())) > 50 and len(set(by_seed.tolist())) > 50


def test_noise_is_uniform_and_strictly_inside_unit_interval():
    u = uniform_noise(torch.tensor([0, 1, -5, 2**62]), torch.tensor([0, 7, 1, 2**40]), 50_000)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.std()) - 12 ** -0.5) < 0.01


def test_distribution_top_k_and_top_p():
    n = 20_000
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(n, 1)

    def freqs(**kw):
        specs = [SampleSpec(seed=123, index=i, **kw) for i in range(n)]
        return torch.bincount(sample(logits, _batch(specs)), minlength=4).float() / n

    plain = freqs(temperature=1.0)
    assert torch.allclose(plain, torch.softmax(logits[0], -1), atol=0.015)
    hot = freqs(temperature=2.0)
    assert torch.allclose(hot, torch.softmax(logits[0] / 2, -1), atol=0.015)
    top2 = freqs(temperature=1.0, top_k=2)
    assert top2[2:].sum() == 0 and torch.allclose(top2[:2], torch.softmax(logits[0, :2], -1), atol=0.015)
    # p(0) ≈ 0.644 < 0.7 ≤ p(0) + p(1): the nucleus is the first two tokens.
    nucleus = freqs(temperature=1.0, top_p=0.7)
    assert nucleus[2:].sum() == 0 and torch.allclose(nucleus[:2], top2[:2], atol=0.015)
    # A tiny top_p keeps only the top token.
    assert freqs(temperature=1.0, top_p=0.01).tolist() == [1.0, 0.0, 0.0, 0.0]
