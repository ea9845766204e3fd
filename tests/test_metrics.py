"""Metric sums and their finalisation into TRL 1.16's names and averaging."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import LossConfig
from pipeline.core.logprobs import SequenceStats
from pipeline.core.losses import PreferenceInputs, dpo_loss
from pipeline.core.metrics import SLOTS, batch_metric_sums, finalize

TRL_NAMES = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
}


def micro_batch(chosen, rejected, ref_chosen, ref_rejected, tokens, logits_sum, entropy_sum, top1_hits):
    """(loss output, inputs, policy stats) for one micro-batch; lists are per pair (tokens etc.: 2B, chosen
    first)."""
    t = torch.tensor
    stats = SequenceStats(
        logps=t(chosen + rejected),
        tokens=t(tokens),
        shared_logps=t(chosen + rejected),
        tail_logps=torch.zeros(len(tokens)),
        wpo_logps=torch.zeros(len(tokens)),
        logits_sum=t(logits_sum),
        entropy_sum=t(entropy_sum),
        top1_hits=t(top1_hits),
    )
    b = len(chosen)
    x = PreferenceInputs(t(chosen), t(rejected), t(ref_chosen), t(ref_rejected), stats.tokens[:b], stats.tokens[b:])
    return dpo_loss(LossConfig(beta=0.5), x), x, stats


def test_one_micro_batch_by_hand():
    # ρ_w = (1, −1), ρ_l = (−1, −1) → rewards (β = 0.5): chosen (0.5, −0.5), rejected (−0.5, −0.5)
    out, _, stats = micro_batch(
        chosen=[-4.0, -6.0],
        rejected=[-9.0, -3.0],
        ref_chosen=[-5.0, -5.0],
        ref_rejected=[-8.0, -2.0],
        tokens=[2, 3, 4, 1],
        logits_sum=[1.0, 2.0, -2.0, 0.5],
        entropy_sum=[3.0, 4.0, 2.0, 1.0],
        top1_hits=[1, 3, 0, 1],
    )
    m = finalize(batch_metric_sums(out, stats))
    assert set(m) == TRL_NAMES
    assert m["loss"] == pytest.approx(out.loss.item())
    assert m["rewards/chosen"] == pytest.approx(0.0)
    assert m["rewards/rejected"] == pytest.approx(-0.5)
    assert m["rewards/accuracies"] == pytest.approx(0.5)  # the tie (−0.5 vs −0.5) is not a win
    assert m["rewards/margins"] == pytest.approx(0.5)
    assert m["logps/chosen"] == pytest.approx(-5.0)
    assert m["logps/rejected"] == pytest.approx(-6.0)
    assert m["logits/chosen"] == pytest.approx(3.0 / 5)  # token-weighted, not (1/2 + 2/3) / 2
    assert m["logits/rejected"] == pytest.approx(-1.5 / 5)
    assert m["entropy"] == pytest.approx(10.0 / 10)  # over chosen and rejected tokens
    assert m["mean_token_accuracy"] == pytest.approx(4 / 5)  # chosen tokens only


def test_rows_are_float64_and_detached():
    out, _, stats = micro_batch([-1.0], [-2.0], [-1.5], [-1.5], [1, 1], [0.0, 0.0], [0.0, 0.0], [0, 0])
    row = batch_metric_sums(out, stats)
    assert row.shape == (len(SLOTS),) and row.dtype == torch.float64 and not row.requires_grad


def test_all_reduced_rows_equal_trl_gather_then_mean_over_micro_batches():
    """Two ranks, two micro-batches per step: summing the ranks' rows (the all-reduce) then finalising gives
    TRL's numbers: per micro-batch, a ratio over everything gathered from the ranks; then the plain mean."""
    args = [  # [micro-batch][rank]
        [
            ([-4.0], [-9.0], [-5.0], [-8.0], [2, 4], [1.0, -2.0], [3.0, 2.0], [1, 0]),
            (
                [-6.0, -1.0],
                [-3.0, -2.0],
                [-5.0, -1.5],
                [-2.0, -2.5],
                [3, 1, 1, 6],
                [2.0, 1.0, 0.5, 0.1],
                [4.0, 1.0, 1.0, 2.0],
                [3, 1, 1, 0],
            ),
        ],
        [
            ([-7.0], [-7.5], [-7.0], [-7.0], [5, 5], [0.1, 0.2], [5.0, 5.0], [2, 2]),
            ([-2.0], [-4.0], [-3.0], [-3.0], [1, 2], [0.3, 0.4], [0.5, 0.5], [0, 1]),
        ],
    ]
    built = [[micro_batch(*a) for a in mb] for mb in args]
    rows = torch.stack([sum(batch_metric_sums(o, s) for o, _, s in ranks) for ranks in built])  # the all-reduce
    got = finalize(rows)

    def trl_micro_batch(ranks) -> dict[str, float]:
        cat = {  # what accelerator.gather returns
            "cr": torch.cat([o.chosen_rewards for o, _, _ in ranks]),
            "rr": torch.cat([o.rejected_rewards for o, _, _ in ranks]),
            "cl": torch.cat([x.policy_chosen_logps for _, x, _ in ranks]),
            "rl": torch.cat([x.policy_rejected_logps for _, x, _ in ranks]),
        }
        halves = [(s.tokens.chunk(2), s.logits_sum.chunk(2), s.top1_hits.chunk(2), s.entropy_sum) for _, _, s in ranks]
        ct = sum(h[0][0].sum() for h in halves)
        rt = sum(h[0][1].sum() for h in halves)
        return {
            "loss": sum(o.loss for o, _, _ in ranks).item() / len(ranks),
            "rewards/chosen": cat["cr"].mean().item(),
            "rewards/rejected": cat["rr"].mean().item(),
            "rewards/accuracies": (cat["cr"] > cat["rr"]).float().mean().item(),
            "rewards/margins": (cat["cr"] - cat["rr"]).mean().item(),
            "logps/chosen": cat["cl"].mean().item(),
            "logps/rejected": cat["rl"].mean().item(),
            "logits/chosen": (sum(h[1][0].sum() for h in halves) / ct).item(),
            "logits/rejected": (sum(h[1][1].sum() for h in halves) / rt).item(),
            "entropy": (sum(h[3].sum() for h in halves) / (ct + rt)).item(),
            "mean_token_accuracy": (sum(h[2][0].sum() for h in halves) / ct).item(),
        }

    per_mb = [trl_micro_batch(ranks) for ranks in built]
    for name in TRL_NAMES:
        assert got[name] == pytest.approx(sum(v[name] for v in per_mb) / len(per_mb)), name


def test_no_tokens_logs_zero_like_trl():
    out, _, stats = micro_batch([0.0], [0.0], [0.0], [0.0], [0, 0], [0.0, 0.0], [0.0, 0.0], [0, 0])
    m = finalize(batch_metric_sums(out, stats))
    assert m["logits/chosen"] == m["logits/rejected"] == m["entropy"] == m["mean_token_accuracy"] == 0.0


def test_errors():
    out, _, stats = micro_batch([-1.0], [-2.0], [-1.5], [-1.5], [1, 1], [0.0, 0.0], [0.0, 0.0], [0, 0])
    bare = SequenceStats(stats.logps, stats.tokens, stats.shared_logps, stats.tail_logps)
    with pytest.raises(ValueError, match="with_metrics"):
        batch_metric_sums(out, bare)
    with pytest.raises(ValueError, match="at least one row"):
        finalize(torch.zeros(0, len(SLOTS)))
