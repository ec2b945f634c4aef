"""Token selection on the output rank: greedy, temperature, top-k, top-p, per-request seeds.

Random rows use the exponential-race form of sampling: ``argmax(p / E)`` with
``E ~ Exp(1)`` per vocabulary entry draws a token with probability ``p``. The uniform behind
``E`` is a counter-based hash of (seed, output index, token id) computed with integer tensor
ops, so a request's tokens depend on nothing else in the batch, no generator state is
carried between steps, and the same draw comes out on any device (no host sync, capturable).

Shape legend: B rows (sequences sampling this step), V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lora_cluster.engine.messages import SampleSpec

_MASK64 = (1 << 64) - 1


def _i64(value: int) -> int:
    """A 64-bit pattern as the signed int torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finalizer on int64 tensors (wrapping arithmetic)."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniform_noise(seeds: torch.Tensor, indices: torch.Tensor, vocab: int) -> torch.Tensor:
    """u[b, v] in (0, 1), a pure function of (seeds[b], indices[b], v).

    Args: seeds [B] int64; indices [B] int64. Returns [B, V] float32.
    """
    row = _mix(_mix(seeds * _GOLDEN + 1) ^ (indices + 1))  # [B]
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64) * _GOLDEN
    bits = _mix(row[:, None] + cols[None, :])
    # 23 high bits + 0.5 is exact in float32's 24-bit mantissa, so u stays strictly inside
    # (0, 1) and -log(u) never reaches 0.
    return (_shr(bits, 41).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters as tensors on the logits' device.

    temperature [B] float32 (0 = greedy) · top_k [B] int64 (0 = all) · top_p [B] float32 ·
    seeds [B] int64 · indices [B] int64 (output index of the token being drawn)
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seeds: torch.Tensor
    indices: torch.Tensor
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool

    @staticmethod
    def from_specs(specs: Sequence[SampleSpec], device: torch.device | str) -> SamplingBatch:
        """Build from the step plan's per-sequence specs (one host→device copy per field)."""
        temps = [float(s.temperature) for s in specs]
        return SamplingBatch(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            top_k=torch.tensor([s.top_k for s in specs], dtype=torch.int64, device=device),
            top_p=torch.tensor([s.top_p for s in specs], dtype=torch.float32, device=device),
            seeds=torch.tensor([_i64(s.seed) for s in specs], dtype=torch.int64, device=device),
            indices=torch.tensor([s.index for s in specs], dtype=torch.int64, device=device),
            all_greedy=all(t == 0.0 for t in temps),
            any_top_k=any(s.top_k > 0 and s.temperature > 0 for s in specs),
            any_top_p=any(s.top_p < 1.0 and s.temperature > 0 for s in specs),
        )


def _filter_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k and top-p nucleus."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    vocab = logits.shape[-1]
    if batch.any_top_k:
        k = torch.where(batch.top_k > 0, batch.top_k, torch.full_like(batch.top_k, vocab))
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    if batch.any_top_p:
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token while the mass *before* it is below p: the top token always stays.
        before = torch.cumsum(probs, dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(before >= batch.top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Pick one token per row.

    Semantics:
        greedy rows (temperature 0): argmax(logits[b]), ties → lowest id (torch.argmax)
        other rows: q = softmax(filter_top_k_top_p(logits[b] / T[b]))
                    token = argmax_v q[v] / -log(u[b, v]),  u = uniform_noise(seed, index, v)
    Args: logits [B, V] float32. Returns [B] int64.
    """
    greedy = torch.argmax(logits, dim=-1)
    if batch.all_greedy:
        return greedy
    temps = torch.where(batch.temperature > 0, batch.temperature, torch.ones_like(batch.temperature))
    scaled = logits.float() / temps[:, None]
    if batch.any_top_k or batch.any_top_p:
        scaled = _filter_top_k_top_p(scaled, batch)
    probs = torch.softmax(scaled, dim=-1)
    exp_noise = -torch.log(uniform_noise(batch.seeds, batch.indices, logits.shape[-1]))
    drawn = torch.argmax(probs / exp_noise, dim=-1)
    return torch.where(batch.temperature > 0, drawn, greedy)
