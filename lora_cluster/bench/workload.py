"""Reproducible request streams: Zipf adapter popularity, lengths drawn from ranges, Poisson arrivals.

Adapter ``i`` (0-based) has popularity rank ``i + 1``: ``P(i) ∝ 1 / (i + 1)^α``, so adapter 0
is the most requested for every N. Streams are generated in fixed-size chunks from seeded
numpy generators, so the k-th request is the same for a given spec however many requests are
taken and from however many threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from lora_cluster.errors import ConfigError

_CHUNK = 512  # requests generated at a time (fixed: the stream must not depend on it)


@dataclass(frozen=True, kw_only=True)
class WorkloadSpec:
    """What one benchmark phase sends: N adapters with Zipf popularity, lengths, token range."""

    num_adapters: int
    zipf_alpha: float = 1.0
    prompt_len: tuple[int, int] = (8, 48)  # inclusive range
    output_len: tuple[int, int] = (8, 32)  # inclusive range (max_tokens, EOS ignored)
    token_range: tuple[int, int] = (4, 384)  # prompt token ids drawn from [lo, hi)
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.num_adapters, int) and self.num_adapters >= 1):
            raise ConfigError(f"num_adapters: must be an int >= 1, got {self.num_adapters!r}",
                              field="num_adapters")
        if not self.zipf_alpha >= 0:
            raise ConfigError(f"zipf_alpha: must be >= 0, got {self.zipf_alpha}", field="zipf_alpha")
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ConfigError(f"{name}: need 1 <= lo <= hi, got ({lo}, {hi})", field=name)
        lo, hi = self.token_range
        if not 0 <= lo < hi:
            raise ConfigError(f"token_range: need 0 <= lo < hi, got ({lo}, {hi})",
                              field="token_range")


@dataclass(frozen=True)
class BenchRequest:
    """One request of a stream: which adapter (index), the prompt, how many tokens to generate."""

    index: int
    adapter: int
    prompt: tuple[int, ...]
    max_tokens: int


def zipf_probabilities(num_adapters: int, alpha: float = 1.0) -> np.ndarray:
    """``p[i] ∝ (i + 1)^-α`` for i in [0, N), summing to 1 (float64 [N])."""
    weights = np.arange(1, num_adapters + 1, dtype=np.float64) ** -float(alpha)
    return weights / weights.sum()


class RequestStream:
    """The deterministic, endless request sequence of a ``WorkloadSpec`` (thread-safe ``take``)."""

    def __init__(self, spec: WorkloadSpec) -> None:
        self.spec = spec
        seeds = np.random.SeedSequence(spec.seed).spawn(3)
        self._adapter_rng, self._len_rng, self._tok_rng = (np.random.default_rng(s) for s in seeds)
        self._cdf = np.cumsum(zipf_probabilities(spec.num_adapters, spec.zipf_alpha))
        self._cdf[-1] = 1.0
        self._lock = threading.Lock()
        self._buffer: list[BenchRequest] = []
        self._next = 0  # index of the next request handed out
        self._made = 0

    def _chunk(self) -> list[BenchRequest]:
        spec = self.spec
        u = self._adapter_rng.random(_CHUNK)
        adapters = np.searchsorted(self._cdf, u, side="right").clip(max=spec.num_adapters - 1)
        p_lo, p_hi = spec.prompt_len
        o_lo, o_hi = spec.output_len
        prompt_lens = self._len_rng.integers(p_lo, p_hi + 1, size=_CHUNK)
        output_lens = self._len_rng.integers(o_lo, o_hi + 1, size=_CHUNK)
        tokens = self._tok_rng.integers(*spec.token_range, size=int(prompt_lens.sum()))
        bounds = np.concatenate([[0], np.cumsum(prompt_lens)])
        out = [BenchRequest(index=self._made + k, adapter=int(adapters[k]),
                            prompt=tuple(int(t) for t in tokens[bounds[k]:bounds[k + 1]]),
                            max_tokens=int(output_lens[k]))
               for k in range(_CHUNK)]
        self._made += _CHUNK
        return out

    def take(self) -> BenchRequest:
        """The next request of the sequence."""
        with self._lock:
            if self._next >= self._made:
                self._buffer = self._chunk()
            request = self._buffer[self._next - (self._made - _CHUNK)]
            self._next += 1
            return request

    def take_many(self, count: int) -> list[BenchRequest]:
        """The next ``count`` requests, in order."""
        return [self.take() for _ in range(count)]


def poisson_arrivals(rate: float, count: int, seed: int = 0) -> np.ndarray:
    """Arrival offsets in seconds (float64 [count], increasing) of a Poisson process at ``rate``/s."""
    if not rate > 0:
        raise ConfigError(f"rate: must be > 0 requests/s, got {rate}", field="rate")
    gaps = np.random.default_rng(np.random.SeedSequence([seed, 0x9E3779B9])).exponential(
        1.0 / rate, size=count)
    return np.cumsum(gaps)
