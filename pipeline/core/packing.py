"""The layout of a micro-batch: B pairs as 2B sequences, right-padded or packed into one row. Pure torch.

Rows [0, B) are the chosen sequences and rows [B, 2B) the rejected ones (TRL's DataCollatorForPreference
layout). `pack` drops the padding: the real tokens of every sequence in one row, positions restarting per
sequence and the boundaries as `cu_seq_lens`, which a varlen attention keeps apart (`pipeline.models.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PairBatch:
    """B pairs as 2B sequences: rows [0, B) are chosen, rows [B, 2B) rejected."""

    input_ids: Tensor  # (2B, T) right-padded
    attention_mask: Tensor  # (2B, T) 1 on real tokens
    completion_mask: Tensor  # (2B, T) 1 on completion tokens
    shared_len: Tensor  # (2B,) LD-DPO shared length of the pair, repeated for both rows

    @property
    def num_pairs(self) -> int:
        return self.input_ids.size(0) // 2

    @property
    def num_tokens(self) -> int:
        """Non-pad tokens."""
        return int(self.attention_mask.sum())


def scored_tokens(length: int, completion_start: int) -> int:
    """Completion tokens that get a log-prob: the first token of a sequence never does (shift)."""
    return max(0, length - max(completion_start, 1))


@dataclass(frozen=True)
class PackedRow:
    """The real tokens of a PairBatch as one row: sequence i is `input_ids[0, cu[i]:cu[i+1]]`."""

    input_ids: Tensor  # (1, Σ lengths)
    position_ids: Tensor  # (1, Σ lengths), 0.. per sequence
    cu_seq_lens: Tensor  # (2B+1,) int32 sequence boundaries
    max_length: int
    index: Tensor  # (2B, T) where position t of sequence i sits in the row; -1 on padding


def pack(batch: PairBatch) -> PackedRow:
    """Drop the padding of a right-padded PairBatch; row-major order keeps each sequence contiguous."""
    real = batch.attention_mask.bool()
    lengths = real.sum(dim=1)
    positions = torch.arange(real.size(1)).expand_as(real)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    index = torch.full_like(batch.input_ids, -1)
    index[real] = torch.arange(int(lengths.sum()))
    return PackedRow(batch.input_ids[real].unsqueeze(0), positions[real].unsqueeze(0), cu, int(lengths.max()), index)
