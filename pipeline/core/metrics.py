"""Training metrics under TRL 1.16's names, synced once per optimizer step.

    row = batch_metric_sums(out, policy_stats)                  # per micro-batch, local sums (K,)
    step = torch.stack(rows_of_this_step)                       # (M, K)
    dist.all_reduce(step)                                       # the one collective of the step
    window.append(step)
    logs = finalize(torch.cat(window))                          # every logging_steps steps

Averaging, and how it compares with TRL: TRL's DPOTrainer computes each metric once per `compute_loss`
call, i.e. per micro-batch, from values gathered across ranks (a token-weighted ratio for logits/*,
entropy and mean_token_accuracy, a mean over all ranks' pairs for rewards/* and logps/*), and logs the
plain mean of those per-micro-batch values over the logging window. `loss` comes from the HF Trainer: the
mean over ranks and micro-batches of each micro-batch's loss. A row here holds one micro-batch's sums and
counts; after the all-reduce it holds the same sums over all ranks, and `finalize` takes each row's ratio
and then the mean over rows — the same numbers as TRL. (TRL's gather costs one collective per metric per
micro-batch; the all-reduce of the (M, K) rows costs one per step.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.core.logprobs import SequenceStats
from pipeline.core.losses import LossOutput

# Slots of a row: sums and the counts they are divided by.
SLOTS = (
    "loss",  # Σ over ranks of the micro-batch loss
    "ranks",  # 1 per rank
    "pairs",
    "rewards_chosen",  # Σ β·ρ_w
    "rewards_rejected",
    "rewards_correct",  # pairs with β·ρ_w > β·ρ_l (strict)
    "margins",  # Σ β·(ρ_w − ρ_l)
    "logps_chosen",  # Σ of LossOutput.chosen_logps: sequence log-probs (LD-combined when ld_alpha is set), or
    # per-token means for simpo/orpo alone
    "logps_rejected",
    "chosen_tokens",
    "rejected_tokens",
    "logits_chosen",  # Σ over chosen tokens of the mean-over-vocabulary logit
    "logits_rejected",
    "entropy",  # Σ over chosen and rejected tokens of the entropy
    "top1_hits",  # chosen tokens whose label is the argmax
    "input_tokens",  # non-pad tokens of the forward (throughput and the num_tokens metric)
    "nll_loss",  # reference-free losses: Σ over ranks of the micro-batch's chosen NLL (times loss_scale)
    "nll_ranks",  # 1 per rank where nll_loss was computed
    "log_odds_ratio",  # orpo: Σ log σ(log odds)
    "log_odds_chosen",  # orpo: Σ log odds
    "odds_pairs",  # pairs where the log odds were computed
)
# Metrics logged only when their count slot is non-zero over the rows (the CPO/ORPO trainers' extras).
_OPTIONAL = {"nll_loss": "nll_ranks", "log_odds_ratio": "odds_pairs", "log_odds_chosen": "odds_pairs"}
_INDEX = {name: i for i, name in enumerate(SLOTS)}


def batch_metric_sums(out: LossOutput, policy: SequenceStats, input_tokens: int = 0, loss_scale: float = 1.0) -> Tensor:
    """One micro-batch's local sums and counts, a (len(SLOTS),) float64 tensor on the loss's device.

    Args:
        out: `dpo_loss`'s output (loss before any gradient-accumulation scaling, rewards).
        policy: `sequence_stats(..., with_metrics=True)` of the 2B policy sequences, chosen first.
        input_tokens: non-pad tokens the forward ran on.
        loss_scale: the micro-batch's weight in the step's loss (`Schedule.loss_scale`; 1 for equal batches,
            which keeps TRL's mean over micro-batches), so the logged loss is the loss that was optimized.
    """
    if policy.logits_sum is None or policy.entropy_sum is None or policy.top1_hits is None:
        raise ValueError("batch_metric_sums needs sequence_stats(..., with_metrics=True)")
    chosen_tokens, rejected_tokens = policy.tokens.chunk(2)
    chosen_logits, rejected_logits = policy.logits_sum.chunk(2)
    chosen_hits, _ = policy.top1_hits.chunk(2)
    values = {
        "loss": out.loss * loss_scale,
        "ranks": 1.0,
        "pairs": out.chosen_rewards.numel(),
        "rewards_chosen": out.chosen_rewards.sum(),
        "rewards_rejected": out.rejected_rewards.sum(),
        "rewards_correct": (out.chosen_rewards > out.rejected_rewards).sum(),
        "margins": (out.chosen_rewards - out.rejected_rewards).sum(),
        "logps_chosen": out.chosen_logps.sum(),
        "logps_rejected": out.rejected_logps.sum(),
        "chosen_tokens": chosen_tokens.sum(),
        "rejected_tokens": rejected_tokens.sum(),
        "logits_chosen": chosen_logits.sum(),
        "logits_rejected": rejected_logits.sum(),
        "entropy": policy.entropy_sum.sum(),
        "top1_hits": chosen_hits.sum(),
        "input_tokens": input_tokens,
        "nll_loss": out.extras["nll_loss"] * loss_scale if "nll_loss" in out.extras else 0.0,
        "nll_ranks": float("nll_loss" in out.extras),
        "log_odds_ratio": out.extras["log_odds_ratio"].sum() if "log_odds_ratio" in out.extras else 0.0,
        "log_odds_chosen": out.extras["log_odds_chosen"].sum() if "log_odds_chosen" in out.extras else 0.0,
        "odds_pairs": out.extras["log_odds_ratio"].numel() if "log_odds_ratio" in out.extras else 0,
    }
    device = out.loss.device
    return torch.stack([torch.as_tensor(values[name], device=device).detach().to(torch.float64) for name in SLOTS])


def slot_total(rows: Tensor, name: str) -> float:
    """The sum of one slot over rows, e.g. the pairs or input tokens of a step."""
    return float(rows.reshape(-1, len(SLOTS))[:, _INDEX[name]].sum())


def finalize(rows: Tensor) -> dict[str, float]:
    """TRL-named metrics from rows of (all-reduced) sums: each row's ratios, then the mean over rows.

    Args:
        rows: (len(SLOTS),) or (S, len(SLOTS)), one row per micro-batch of the logging window.
    """
    rows = rows.detach().to(torch.float64).reshape(-1, len(SLOTS)).cpu()
    if rows.size(0) == 0:
        raise ValueError("finalize needs at least one row of sums")

    def col(name: str) -> Tensor:
        return rows[:, _INDEX[name]]

    def ratio(num: str, den: Tensor) -> Tensor:
        return torch.where(den > 0, col(num) / den.clamp(min=1e-300), 0.0)  # TRL logs 0 for 0 tokens

    pairs, chosen_tokens = col("pairs"), col("chosen_tokens")
    per_row = {
        "loss": ratio("loss", col("ranks")),
        "rewards/chosen": ratio("rewards_chosen", pairs),
        "rewards/rejected": ratio("rewards_rejected", pairs),
        "rewards/accuracies": ratio("rewards_correct", pairs),
        "rewards/margins": ratio("margins", pairs),
        "logps/chosen": ratio("logps_chosen", pairs),
        "logps/rejected": ratio("logps_rejected", pairs),
        "logits/chosen": ratio("logits_chosen", chosen_tokens),
        "logits/rejected": ratio("logits_rejected", col("rejected_tokens")),
        "entropy": ratio("entropy", chosen_tokens + col("rejected_tokens")),
        "mean_token_accuracy": ratio("top1_hits", chosen_tokens),
        "nll_loss": ratio("nll_loss", col("nll_ranks")),
        "log_odds_ratio": ratio("log_odds_ratio", col("odds_pairs")),
        "log_odds_chosen": ratio("log_odds_chosen", col("odds_pairs")),
    }
    shown = [name for name in per_row if name not in _OPTIONAL or col(_OPTIONAL[name]).sum() > 0]
    return {name: per_row[name].mean().item() for name in shown}
