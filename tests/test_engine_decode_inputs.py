"""Host-side inputs of a decode graph replay: the packed buffer and placeholder filling.

The CUDA graphs themselves run only on a GPU (tests/test_engine_gpu.py); what the host
writes for them is plain tensor code, checked here against the layout written out by hand.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lora_cluster.engine.cuda_graphs import pack_decode
from lora_cluster.engine.messages import PREV_TOKEN, SampleSpec, SeqStep


def _seq(seq_id: int, token: int, start_pos: int, slot: int) -> SeqStep:
    return SeqStep(seq_id=seq_id, token_ids=(token,), start_pos=start_pos, slot=slot,
                   sample=SampleSpec())


def _expected(seqs: list[SeqStep], tables: list[list[int]], block_size: int, bucket: int,
              width: int) -> list[int]:
    """The layout of cuda_graphs' docstring, field by field, padded to ``bucket`` rows."""
    pad = bucket - len(seqs)
    rows = [[*t, *([0] * (width - len(t)))] for t in tables] + [[0] * width] * pad
    kv = [t[s.start_pos // block_size] * block_size + s.start_pos % block_size
          for s, t in zip(seqs, tables)]
    return ([s.token_ids[0] for s in seqs] + [0] * pad
            + [s.start_pos for s in seqs] + [0] * pad
            + [s.slot for s in seqs] + [-1] * pad
            + [s.context_len for s in seqs] + [1] * pad
            + kv + [-1] * pad
            + [v for row in rows for v in row])


@pytest.mark.parametrize("bucket", [3, 8])
def test_pack_decode_writes_every_field_over_a_dirty_buffer(bucket: int) -> None:
    block_size, width = 4, 6
    seqs = [_seq(10, 7, 5, 2), _seq(11, 9, 0, -1), _seq(12, 3, 13, 0)]
    tables = [[4, 8], [1], [2, 3, 5, 6]]
    out = torch.full((bucket * (5 + width) + 5,), 12345, dtype=torch.int64)  # poisoned
    size = pack_decode(seqs, tables, block_size, bucket, width, out)
    assert size == bucket * (5 + width)
    assert out[:size].tolist() == _expected(seqs, tables, block_size, bucket, width)
    assert (out[size:] == 12345).all()  # nothing past the bucket's fields is touched

    # A second, shorter step over the same buffer: the longer tables of the first leave nothing.
    size = pack_decode(seqs[1:2], tables[1:2], block_size, bucket, width, out)
    assert out[:size].tolist() == _expected(seqs[1:2], tables[1:2], block_size, bucket, width)


def test_pack_decode_refuses_what_does_not_fit() -> None:
    seqs = [_seq(1, 5, 0, 0), _seq(2, 5, 0, 0)]
    out = torch.zeros(64, dtype=torch.int64)
    with pytest.raises(ValueError, match="do not fit bucket 1"):
        pack_decode(seqs, [[0], [1]], 4, 1, 2, out)
    with pytest.raises(ValueError, match="exceeds the width 2"):
        pack_decode(seqs[:1], [[0, 1, 2]], 4, 1, 2, out)


def test_with_tokens_equals_dataclasses_replace() -> None:
    s = SeqStep(seq_id=3, token_ids=(PREV_TOKEN,), start_pos=17, blocks_from=2,
                new_blocks=(9,), slot=4, sample=SampleSpec(temperature=0.5), logits="emit")
    filled = s.with_tokens((42,))
    assert filled == dataclasses.replace(s, token_ids=(42,))
    assert s.token_ids == (PREV_TOKEN,)  # the original is left as it was
    with pytest.raises(dataclasses.FrozenInstanceError):
        filled.slot = 1  # type: ignore[misc]
