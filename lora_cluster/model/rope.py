"""Rotary position embeddings: default, linear, llama3 and yarn frequency schedules.

The schedules follow transformers 5.x's ``rope_parameters`` semantics (frequencies in float32,
cos/sin scaled by the schedule's attention factor, the rotate-half layout), so positions
rotate exactly as in the reference model. Shape legend: T tokens, D head dim, h heads.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lora_cluster.errors import ModelLoadError
from lora_cluster.model.spec import RopeSpec


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(rope: RopeSpec, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(rope.theta, dim)
    old_len = float(rope.original_max_position_embeddings or 0)
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeSpec, dim: int) -> tuple[torch.Tensor, float]:
    theta, factor = rope.theta, rope.factor
    original = float(rope.original_max_position_embeddings or 0)
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(
                factor, rope.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # keep the ramp finite
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: high-frequency dims keep their original speed
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def inverse_frequencies(rope: RopeSpec, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [D/2] float32, attention scaling applied to cos/sin) of one RoPE schedule."""
    if rope.rope_type == "default":
        return _base_inv_freq(rope.theta, head_dim), 1.0
    if rope.rope_type == "linear":
        return _base_inv_freq(rope.theta, head_dim) / rope.factor, 1.0
    if rope.rope_type == "llama3":
        return _llama3(rope, head_dim), 1.0
    if rope.rope_type == "yarn":
        return _yarn(rope, head_dim)
    raise ModelLoadError(f"rope type {rope.rope_type!r} is not supported",
                         key="rope_parameters.rope_type")


class RotaryEmbedding(nn.Module):
    """Per-step cos/sin tables from absolute positions (no cached table: any position works)."""

    inv_freq: torch.Tensor

    def __init__(self, rope: RopeSpec, head_dim: int, device: torch.device) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = inverse_frequencies(rope, head_dim)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] → cos, sin [T, D] in ``dtype``."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, h, D] rotated by cos/sin [T, D] (rotate-half pairing of dims i and i + D/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
