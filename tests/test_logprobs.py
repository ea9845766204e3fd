"""sequence_stats against a naive float64 implementation that builds the full (N, T, V) logits."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pipeline.core.logprobs import SequenceStats, ld_logps, lm_head_calls, sequence_stats

N, T, H, V = 4, 9, 16, 37


def naive(hidden: Tensor, weight: Tensor, ids: Tensor, mask: Tensor, shared_len: Tensor) -> dict[str, Tensor]:
    """Full logits in float64, log_softmax over the vocabulary, then masked sums."""
    logits = hidden.double()[:, :-1] @ weight.double().T
    logp_all = torch.log_softmax(logits, dim=-1)
    labels = ids[:, 1:]
    m = mask[:, 1:].double()
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    pos = mask[:, 1:].cumsum(1)
    shared = ((pos <= shared_len[:, None]) & (m > 0)).double()
    probs = logp_all.exp()
    sum_sq = torch.log((probs**2).sum(-1))
    return {
        "logps": (logp * m).sum(1),
        "tokens": mask[:, 1:].sum(1),
        "shared_logps": (logp * shared).sum(1),
        "tail_logps": (logp * (m - shared)).sum(1),
        "wpo_logps": ((logp - sum_sq) * m).sum(1),
        "logits_sum": (logits.mean(-1) * m).sum(1),
        "entropy_sum": (-(probs * logp_all).sum(-1) * m).sum(1),
        "top1_hits": ((logits.argmax(-1) == labels) & (m > 0)).sum(1),
    }


def make_batch(seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, T, H, generator=g, dtype=torch.float64).to(dtype)
    head = torch.nn.Linear(H, V, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=torch.float64))
    ids = torch.randint(0, V, (N, T), generator=g)
    # Completion starts at 3, 1, 5 and (row 3) never: a row with no completion tokens; right padding.
    mask = torch.zeros(N, T, dtype=torch.long)
    mask[0, 3:] = 1
    mask[1, 1:6] = 1
    mask[2, 5:8] = 1
    shared_len = torch.tensor([4, 2, 3, 0])
    return hidden, head, ids, mask, shared_len


def assert_matches(stats: SequenceStats, ref: dict[str, Tensor], atol: float, rtol: float = 0.0) -> None:
    for name, expected in ref.items():
        got = getattr(stats, name)
        if name in ("tokens", "top1_hits"):
            assert got.dtype == torch.int64
            assert torch.equal(got, expected), name
        else:
            torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 1024])
def test_fp32_matches_naive_float64(chunk_size):
    hidden, head, ids, mask, shared_len = make_batch()
    stats = sequence_stats(hidden, head, ids, mask, shared_len, chunk_size=chunk_size, with_metrics=True)
    assert stats.logps.dtype == torch.float32
    # float32 sums over up to 6 tokens of values up to ~50: 1e-5, plus 16 ulps of the value (a one-row chunk takes a
    # matrix-vector kernel whose rounding differs by CPU: entropy_sum 8.0 off by 1.4e-5 on an AVX-512 machine)
    assert_matches(stats, naive(hidden, head.weight, ids, mask, shared_len), atol=1e-5, rtol=2e-6)


def test_float64_is_exact():
    hidden, head, ids, mask, shared_len = make_batch(dtype=torch.float64)
    stats = sequence_stats(hidden, head, ids, mask, shared_len, chunk_size=4, with_metrics=True)
    assert stats.logps.dtype == torch.float64
    assert_matches(stats, naive(hidden, head.weight, ids, mask, shared_len), atol=1e-12)


def test_row_without_completion_is_zero_and_split_adds_up():
    hidden, head, ids, mask, shared_len = make_batch()
    stats = sequence_stats(hidden, head, ids, mask, shared_len, chunk_size=3)
    assert stats.logps[3] == 0 and stats.tokens[3] == 0
    assert stats.tokens.tolist() == [6, 5, 3, 0]
    torch.testing.assert_close(stats.shared_logps + stats.tail_logps, stats.logps)
    assert stats.wpo_logps is None and stats.top1_hits is None  # metrics only on request


def test_padded_rows_equal_unpadded():
    hidden, head, ids, mask, shared_len = make_batch(dtype=torch.float64)
    batch = sequence_stats(hidden, head, ids, mask, shared_len, chunk_size=2, with_metrics=True)
    for row, length in enumerate([9, 6, 8]):  # each sequence alone, without its padding
        alone = sequence_stats(
            hidden[row : row + 1, :length],
            head,
            ids[row : row + 1, :length],
            mask[row : row + 1, :length],
            shared_len[row : row + 1],
            chunk_size=2,
            with_metrics=True,
        )
        for name in (
            "logps",
            "tokens",
            "shared_logps",
            "tail_logps",
            "wpo_logps",
            "logits_sum",
            "entropy_sum",
            "top1_hits",
        ):
            torch.testing.assert_close(getattr(alone, name)[0], getattr(batch, name)[row], atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_gradients_match_naive(chunk_size):
    hidden, head, ids, mask, shared_len = make_batch(dtype=torch.float64)
    hidden.requires_grad_(True)
    coef = torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=torch.float64)
    stats = sequence_stats(hidden, head, ids, mask, shared_len, chunk_size=chunk_size)
    ((stats.logps * coef).sum() + (stats.shared_logps * coef.flip(0)).sum()).backward()
    ours = hidden.grad.clone(), head.weight.grad.clone()

    hidden_ref = hidden.detach().clone().requires_grad_(True)
    weight_ref = head.weight.detach().clone().requires_grad_(True)
    ref = naive(hidden_ref, weight_ref, ids, mask, shared_len)
    ((ref["logps"] * coef).sum() + (ref["shared_logps"] * coef.flip(0)).sum()).backward()
    torch.testing.assert_close(ours[0], hidden_ref.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(ours[1], weight_ref.grad, atol=1e-12, rtol=0)


def test_fp32_gradients_close_to_naive():
    hidden, head, ids, mask, shared_len = make_batch()
    hidden.requires_grad_(True)
    sequence_stats(hidden, head, ids, mask, shared_len, chunk_size=3).logps.sum().backward()
    hidden_ref = hidden.detach().double().requires_grad_(True)
    weight_ref = head.weight.detach().double().requires_grad_(True)
    naive(hidden_ref, weight_ref, ids, mask, shared_len)["logps"].sum().backward()
    torch.testing.assert_close(hidden.grad.double(), hidden_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad.double(), weight_ref.grad, atol=1e-5, rtol=1e-5)


def test_lm_head_sees_only_completion_tokens_in_chunks():
    hidden, head, ids, mask, shared_len = make_batch()
    hidden.requires_grad_(True)
    seen: list[int] = []

    def counting_head(h: Tensor) -> Tensor:
        seen.append(h.shape[0])
        return head(h)

    stats = sequence_stats(hidden, counting_head, ids, mask, shared_len, chunk_size=4)
    assert seen == [4, 4, 4, 2]  # 14 completion tokens, never the (N, T, V) logits
    assert lm_head_calls(mask, 4) == 4
    stats.logps.sum().backward()
    assert sum(seen[4:]) == 14 and max(seen) <= 4  # backward recomputes chunk by chunk


def test_min_chunks_pads_with_empty_calls():
    hidden, head, ids, mask, shared_len = make_batch()
    seen: list[int] = []

    def counting_head(h: Tensor) -> Tensor:
        seen.append(h.shape[0])
        return head(h)

    base = sequence_stats(hidden, head, ids, mask, shared_len, chunk_size=8)
    padded = sequence_stats(hidden, counting_head, ids, mask, shared_len, chunk_size=8, min_chunks=5)
    assert seen == [8, 6, 0, 0, 0]
    torch.testing.assert_close(padded.logps, base.logps)


def test_no_completion_tokens_at_all_still_backpropagates():
    hidden, head, ids, _, shared_len = make_batch()
    hidden.requires_grad_(True)
    mask = torch.zeros(N, T, dtype=torch.long)
    stats = sequence_stats(hidden, head, ids, mask, shared_len, with_metrics=True)
    assert stats.logps.tolist() == [0.0] * N and stats.tokens.tolist() == [0] * N
    assert lm_head_calls(mask) == 1
    stats.logps.sum().backward()  # connected to the graph, like TRL's masked_scatter
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(head.weight.grad) == 0


def test_no_grad_path_gives_same_values():
    hidden, head, ids, mask, shared_len = make_batch()
    with_grad = sequence_stats(hidden, head, ids, mask, shared_len, chunk_size=3)
    with torch.no_grad():
        without = sequence_stats(hidden, head, ids, mask, shared_len, chunk_size=3)
    assert not without.logps.requires_grad
    torch.testing.assert_close(without.logps, with_grad.logps.detach(), atol=0, rtol=0)


def test_bf16_inputs():
    hidden, head, ids, mask, shared_len = make_batch(dtype=torch.bfloat16)
    hidden.requires_grad_(True)
    stats = sequence_stats(hidden, head, ids, mask, shared_len, chunk_size=3, with_metrics=True)
    assert stats.logps.dtype == torch.float32  # log-softmax upcast
    # The reference: bf16-rounded logits (what the head returns), then float64 math.
    logits = (hidden.detach()[:, :-1] @ head.weight.detach().T).double()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected = (logp * mask[:, 1:]).sum(1)
    torch.testing.assert_close(stats.logps.double(), expected, atol=1e-4, rtol=0)
    stats.logps.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and torch.isfinite(hidden.grad).all()
    assert torch.isfinite(head.weight.grad).all()


def test_chunk_size_must_be_positive():
    hidden, head, ids, mask, shared_len = make_batch()
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_stats(hidden, head, ids, mask, shared_len, chunk_size=0)


def test_ld_logps():
    shared, tail = torch.tensor([-2.0, -1.0]), torch.tensor([-4.0, 0.0])
    assert ld_logps(shared, tail, None).tolist() == [-6.0, -1.0]
    assert ld_logps(shared, tail, 0.5).tolist() == [-4.0, -1.0]
    assert ld_logps(shared, tail, 0.0).tolist() == [-2.0, -1.0]
