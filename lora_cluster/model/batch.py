"""The tensors of one forward step, as the step runner hands them to the decoder.

Rows are the step's new tokens, sequences laid out contiguously (prefill chunks and
single decode tokens may mix). All tensors live on the rank's device; shapes are fixed for a
given (num_tokens, num_seqs, max_blocks) so decode steps can be captured in CUDA graphs.

Shape legend: T new tokens, B sequences, P max blocks per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ForwardBatch:
    """One step's inputs.

    input_ids:       [T] int64   token ids of the new tokens
    positions:       [T] int64   absolute position of each new token
    token_slots:     [T] int32   LoRA slot of each token's sequence, -1 = base model
    query_start_loc: [B+1] int32 rows of sequence b are query_start_loc[b]:query_start_loc[b+1]
    context_lens:    [B] int32   tokens in the KV cache for sequence b once this step's are written
    block_tables:    [B, P] int32 KV-cache block ids of each sequence (padding: 0)
    kv_slot_mapping: [T] int64   flat cache position (block * block_size + offset) of each new
                                 token's K/V; -1 = padding row, not written
    logits_rows:     [N] int64   rows whose logits the caller wants (last row of each sequence
                                 for sampling; every row for scoring)
    is_decode:       every sequence contributes exactly one row (graph-capturable path)
    max_context_len: host-side bound on context_lens (sizes the attention gather; a bucket
                     value under CUDA graphs, never read back from the device)
    span_table:      [B, 4] int64 or None — (seq, row_start, rows, context) of every sequence,
                     set by the prefill graph path: attention is then planned from it and
                     ``max_span_rows`` with no host read (rows 0 = a padding sequence)
    max_span_rows:   host-side bound on the table's ``rows`` column (a bucket value)
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    token_slots: torch.Tensor
    query_start_loc: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    kv_slot_mapping: torch.Tensor
    logits_rows: torch.Tensor
    is_decode: bool
    max_context_len: int
    span_table: torch.Tensor | None = None
    max_span_rows: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])
