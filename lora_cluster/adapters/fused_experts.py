"""PEFT's fused ("3D") expert LoRA → this rank's canonical per-expert tensors, reading only the
local experts' rows of A and columns of B.

Layout (peft ``ParamWrapper``; verified in lora_cluster/testing/FORMATS.md), E experts, R rank::

    A [E·R, in]   expert-major:  A_e = rows e·R … e·R+R-1
    B [out, E·R]  rank-major:    B_e = columns e, e+E, …, e+(R-1)·E
    delta_e = scaling · B_e @ A_e           [out, in]
    gate_up_proj (in H, out 2I): gate = B rows [0, I), up = rows [I, 2I), both with A_e
    down_proj    (in I, out H)

Canonical result for local experts (local order): a [E_local, R, in_local], b [E_local, out_local, R].
"""

from __future__ import annotations

import numpy as np
import torch

from lora_cluster.adapters.reader import Range, TensorReader


def fused_a_rows(experts: np.ndarray, rank: int) -> np.ndarray:
    """Rows of A holding ``experts`` (in that order): [E_local·R]."""
    return (experts[:, None] * rank + np.arange(rank)[None, :]).reshape(-1)


def fused_b_cols(experts: np.ndarray, rank: int, num_experts: int) -> np.ndarray:
    """Columns of B holding ``experts``, rank-major: [R·E_local] (k·E + e)."""
    return (np.arange(rank)[:, None] * num_experts + experts[None, :]).reshape(-1)


def read_fused_a(reader: TensorReader, pos: int, experts: np.ndarray, rank: int,
                 cols: Range) -> torch.Tensor:
    """a [E_local, R, in_local]: the local experts' A rows, A columns ``cols``."""
    a = reader.read(pos, rows=fused_a_rows(experts, rank), cols=cols)
    return a.reshape(experts.size, rank, a.shape[-1])


def read_fused_b(reader: TensorReader, pos: int, experts: np.ndarray, rank: int,
                 num_experts: int, rows: Range) -> torch.Tensor:
    """B rows ``rows`` (this kind's part, TP-sliced) × the local experts' columns, as stored:
    [out_local, R·E_local] rank-major (``fused_b_to_experts`` makes it canonical)."""
    return reader.read(pos, rows=rows, cols=fused_b_cols(experts, rank, num_experts))


def fused_b_to_experts(b: torch.Tensor, rank: int) -> torch.Tensor:
    """[out_local, R·E_local] rank-major → b [E_local, out_local, R]."""
    out_local = b.shape[0]
    return b.reshape(out_local, rank, -1).permute(2, 0, 1).contiguous()
