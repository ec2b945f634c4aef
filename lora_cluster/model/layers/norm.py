"""RMSNorm with the transformers numerics: normalize in float32, cast, then scale."""

from __future__ import annotations

import torch
from torch import nn

from lora_cluster.model.checkpoint import CheckpointReader


class RMSNorm(nn.Module):
    """x [..., D] → weight · (x / rms(x)); replicated on every rank."""

    weight: torch.Tensor

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.size, self.eps = size, eps
        self.register_buffer("weight", torch.ones(size, dtype=dtype, device=device))

    def load(self, reader: CheckpointReader, key: str) -> None:
        self.weight.copy_(reader.read(key, (self.size,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
