"""Per-sequence completion log-probabilities from final hidden states: the one function that both the
reference scorer (stage 2) and the trainer (stage 3) call, so policy and reference share every rule.

    stats = sequence_stats(model.model(ids, attention_mask=am).last_hidden_state, model.lm_head,
                           ids, completion_mask, shared_len)

Rules (TRL 1.16's fused LM head, `trl/kernels/chunked_logprob.py`, gives the same numbers):
- shift: the logits at position t score token t+1, so position 0 is never scored;
- only positions whose shifted completion mask is 1 go through the LM head, `chunk_size` tokens at a
  time, so neither the (N, T, V) logits nor their gradient ever exist; each chunk is checkpointed, so
  backward holds one chunk's (chunk_size, V) logits at a time;
- dtype: the LM head runs in the model's dtype (bf16 logits are rounded to bf16, as in TRL's fused head),
  then log-softmax, entropy and the other per-token terms run in float32 (float64 if the logits are
  float64). TRL's older `selective_log_softmax` ran bf16 logits' log-softmax in bf16; we never do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class SequenceStats:
    """Per-sequence sums over completion tokens; all (N,), float32 (float64 with float64 logits) unless noted.

    The metric fields are None unless `sequence_stats(..., with_metrics=True)`; they carry no gradient.
    """

    logps: Tensor  # Σ_t log p(y_t | y_<t)
    tokens: Tensor  # scored completion tokens, int64
    shared_logps: Tensor  # Σ over the first shared_len completion tokens (LD-DPO)
    tail_logps: Tensor  # Σ over the rest
    wpo_logps: Tensor | None = None  # Σ_t [log p(y_t) − log Σ_v p(v)²]  (WPO's aligned log-prob)
    logits_sum: Tensor | None = None  # Σ_t mean_v z_v
    entropy_sum: Tensor | None = None  # Σ_t H(p_t)
    top1_hits: Tensor | None = None  # tokens whose label is the first argmax of the logits, int64


def lm_head_calls(completion_mask: Tensor, chunk_size: int = 1024, hidden_index: Tensor | None = None) -> int:
    """How many times `sequence_stats` calls `lm_head` for this batch (at least once).

    Under DeepSpeed ZeRO-3 each call all-gathers the head's weights, a collective, so every rank must call
    it equally often: all-reduce this number with MAX and pass the result as `min_chunks`.
    """
    scored = int(_scored_mask(completion_mask, hidden_index).count_nonzero())
    return max(1, math.ceil(scored / chunk_size))


def _scored_mask(completion_mask: Tensor, hidden_index: Tensor | None) -> Tensor:
    """(N, T-1) bool: position t scores token t+1 here (a completion token, and this process holds t's state)."""
    mask = completion_mask[:, 1:].bool()
    return mask if hidden_index is None else mask & (hidden_index[:, :-1] >= 0)


def sequence_stats(
    hidden: Tensor,
    lm_head: Callable[[Tensor], Tensor],
    input_ids: Tensor,
    completion_mask: Tensor,
    shared_len: Tensor,
    chunk_size: int = 1024,
    with_metrics: bool = False,
    min_chunks: int = 1,
    hidden_index: Tensor | None = None,
) -> SequenceStats:
    """Sum the completion tokens' log-probs (and, optionally, logging terms) per sequence.

    Args:
        hidden: (N, T, H) final hidden states of the model body; with `hidden_index`, (M, H) rows of them.
        lm_head: the output-embedding module (or a callable wrapping it, e.g. with a logit soft-cap); it is
            called on (n ≤ chunk_size, H) chunks and never has its weight read, so ZeRO-3 can gather it.
        input_ids: (N, T) token ids.
        completion_mask: (N, T) int/bool, 1 on completion tokens, 0 on prompt and padding.
        shared_len: (N,) int, LD-DPO shared length: min of the pair's chosen and rejected token counts.
        chunk_size: tokens per LM-head call.
        with_metrics: also return wpo_logps, logits_sum, entropy_sum and top1_hits.
        min_chunks: call `lm_head` at least this often (extra calls get zero tokens); see `lm_head_calls`.
        hidden_index: (N, T) int, the row of `hidden` that holds position t of sequence i, or -1 where this
            process holds none: a packed row's layout, or the part of each sequence that this rank of a
            sequence-parallel group holds. Then only the held positions are scored, every sum covers them
            alone (a group sums its ranks' stats), and LD-DPO's shared split still counts from each
            sequence's first completion token.

    The tensors must be on the device where `lm_head` computes (for a model split over devices, the last one;
    `pipeline.models.forward.sequence_forward` moves them there), and the results are on it too.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mask = _scored_mask(completion_mask, hidden_index)
    rows, cols = mask.nonzero(as_tuple=True)  # row-major, so each row's tokens are in order
    selected = hidden[:, :-1][rows, cols] if hidden_index is None else hidden[hidden_index[rows, cols]]  # (M, H)
    labels = input_ids[:, 1:][rows, cols]
    position = completion_mask[:, 1:].cumsum(dim=1)[rows, cols]  # 1-based index among the row's completion tokens
    in_shared = position <= shared_len.to(position.device)[rows]

    n_chunks = max(min_chunks, math.ceil(labels.numel() / chunk_size), 1)
    parts = []
    for i in range(n_chunks):
        chunk = slice(i * chunk_size, (i + 1) * chunk_size)
        if torch.is_grad_enabled():
            parts.append(
                checkpoint(_score_chunk, selected[chunk], labels[chunk], lm_head, with_metrics, use_reentrant=False)
            )
        else:
            parts.append(_score_chunk(selected[chunk], labels[chunk], lm_head, with_metrics))
    per_token = [torch.cat(column) for column in zip(*parts, strict=True)]

    n = input_ids.size(0)
    logp = per_token[0]

    def per_sequence(values: Tensor) -> Tensor:
        return values.new_zeros(n).index_add(0, rows, values)

    stats = {
        "logps": per_sequence(logp),
        "tokens": mask.sum(dim=1),
        "shared_logps": per_sequence(torch.where(in_shared, logp, 0.0)),
        "tail_logps": per_sequence(torch.where(in_shared, 0.0, logp)),
    }
    if with_metrics:
        wpo, mean_logit, entropy, top1 = per_token[1:]
        stats |= {
            "wpo_logps": per_sequence(wpo),
            "logits_sum": per_sequence(mean_logit),
            "entropy_sum": per_sequence(entropy),
            "top1_hits": per_sequence(top1.long()),
        }
    return SequenceStats(**stats)


def _score_chunk(
    h: Tensor, labels: Tensor, lm_head: Callable[[Tensor], Tensor], with_metrics: bool
) -> tuple[Tensor, ...]:
    """Per-token log p(label) for one chunk, plus the metric terms (no grad) when asked."""
    logits = lm_head(h)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_z = logits.logsumexp(dim=-1)
    logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - log_z
    if not with_metrics:
        return (logp,)
    # Computed after everything backward needs, so checkpoint's early stop skips them on recompute.
    with torch.no_grad():
        logits, log_z = logits.detach(), log_z.detach()
        wpo = logp.detach() - ((2 * logits).logsumexp(dim=-1) - 2 * log_z)
        probs = torch.exp(logits - log_z.unsqueeze(-1))
        entropy = log_z - (probs * logits).sum(dim=-1)
        top1 = logits.argmax(dim=-1) == labels
    return logp, wpo, logits.mean(dim=-1), entropy, top1


def ld_logps(shared: Tensor, tail: Tensor, ld_alpha: float | None) -> Tensor:
    """LD-DPO log-prob: shared + α·tail; with α None (plain DPO) shared + tail."""
    return shared + tail if ld_alpha is None else shared + ld_alpha * tail
