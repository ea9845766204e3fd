"""Every DPO loss type of TRL 1.16 as a pure function of per-sequence log-probs, and their weighted mix.

    out = dpo_loss(cfg.loss, PreferenceInputs(policy_chosen_logps=..., ...))
    out.loss.backward()

No model, no trainer, no distribution: (B,) tensors in, a scalar loss and (B,) rewards out. The numbers
are TRL 1.16 `DPOTrainer._compute_loss`'s (tests/test_trl_parity.py runs TRL itself); where we differ,
the function's docstring says so under `TRL:`.

Shared symbols (each loss docstring repeats the ones it uses):
    β            cfg.beta
    π, π_ref     policy and reference; log π(y|x) sums the completion tokens (LD-weighted with ld_alpha)
    ρ_w, ρ_l     chosen / rejected log-ratio log π(y|x) − log π_ref(y|x)
    s_w, s_l     f-divergence scores of ρ_w, ρ_l (f_divergence_score); = ρ for reverse_kl, the default
    Δ            s_w − s_l
    |y_w|, |y_l| completion token counts (clamped to ≥ 1 where they divide)
    ε            cfg.label_smoothing
    σ            the logistic function
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class LossSettings(Protocol):
    """What the losses read from their settings; `pipeline.config.LossConfig` is one (validated on load)."""

    @property
    def beta(self) -> float: ...
    @property
    def loss_type(self) -> tuple[str, ...]: ...
    @property
    def weights(self) -> tuple[float, ...]: ...
    @property
    def label_smoothing(self) -> float: ...
    @property
    def f_divergence_type(self) -> str: ...
    @property
    def f_alpha_divergence_coef(self) -> float: ...
    @property
    def f_divergence_clamp(self) -> bool: ...
    @property
    def use_weighting(self) -> bool: ...
    @property
    def discopop_tau(self) -> float: ...


@dataclass(frozen=True)
class PreferenceInputs:
    """One local batch of B preference pairs; every field is (B,).

    Log-probs are sums over completion tokens, LD-combined already when ld_alpha is set
    (`logprobs.ld_logps`); policy fields carry the gradient. Give the reference in the policy's dtype
    (the cache stores float64) to get TRL's float32 numbers.
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_tokens: Tensor  # scored completion tokens (int): ipo / sigmoid_norm / WPO normalisation, sft mean
    rejected_tokens: Tensor
    policy_chosen_full_logps: Tensor | None = None  # sft: Σ over ALL chosen tokens, never LD-weighted;
    # None = policy_chosen_logps (the same thing when ld_alpha is None)
    wpo_chosen_logps: Tensor | None = None  # use_weighting: SequenceStats.wpo_logps of the policy
    wpo_rejected_logps: Tensor | None = None


@dataclass(frozen=True)
class Scores:
    """The per-pair quantities the loss functions share, computed once per batch; all (B,)."""

    chosen_logratios: Tensor  # ρ_w
    rejected_logratios: Tensor  # ρ_l
    chosen_scores: Tensor  # s_w
    rejected_scores: Tensor  # s_l

    @property
    def delta(self) -> Tensor:
        """Δ = s_w − s_l."""
        return self.chosen_scores - self.rejected_scores


@dataclass(frozen=True)
class LossOutput:
    loss: Tensor  # scalar: Σ_k w_k · mean_b(loss_k)
    losses: dict[str, Tensor]  # per loss type: mean_b(loss_k), WPO-weighted, before w_k
    chosen_rewards: Tensor  # (B,) β·ρ_w, detached
    rejected_rewards: Tensor  # (B,) β·ρ_l, detached


LossFn = Callable[[PreferenceInputs, Scores, LossSettings], Tensor]
LOSSES: dict[str, LossFn] = {}


def _register(name: str) -> Callable[[LossFn], LossFn]:
    def add(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return add


# --- the combined loss ---


def dpo_loss(cfg: LossSettings, x: PreferenceInputs) -> LossOutput:
    """The weighted mix of `cfg.loss_type`: Σ_k w_k · mean_b(ω_b · loss_k,b), ω = WPO weight or 1."""
    chosen_logratios = x.policy_chosen_logps - x.ref_chosen_logps
    rejected_logratios = x.policy_rejected_logps - x.ref_rejected_logps
    scores = Scores(
        chosen_logratios,
        rejected_logratios,
        f_divergence_score(
            chosen_logratios, cfg.f_divergence_type, cfg.f_alpha_divergence_coef, cfg.f_divergence_clamp
        ),
        f_divergence_score(
            rejected_logratios, cfg.f_divergence_type, cfg.f_alpha_divergence_coef, cfg.f_divergence_clamp
        ),
    )
    weights = wpo_weights(x) if cfg.use_weighting else None
    losses = {}
    for name in cfg.loss_type:
        per_pair = LOSSES[name](x, scores, cfg)
        losses[name] = (per_pair if weights is None else per_pair * weights).mean()
    loss = torch.stack([losses[name] * w for name, w in zip(cfg.loss_type, cfg.weights, strict=True)]).sum()
    return LossOutput(
        loss=loss,
        losses=losses,
        chosen_rewards=cfg.beta * chosen_logratios.detach(),
        rejected_rewards=cfg.beta * rejected_logratios.detach(),
    )


def f_divergence_score(logratio: Tensor, kind: str, alpha: float = 0.5, clamp: bool = False) -> Tensor:
    """f'(t) at t = π/π_ref, from ρ = log t: the f-DPO score that replaces ρ in the pairwise losses.

    Paper: "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
    Constraints", Wang et al. 2023, https://arxiv.org/abs/2309.16240
    Formula:
        reverse_kl        ρ
        forward_kl        1 − e^{−ρ}
        js_divergence     log 2 + log σ(ρ)
        alpha_divergence  (e^{min((α−1)ρ, c)} − 1) / (α − 1);  ρ when |α − 1| < 1e-6 (the α→1 limit)
    Where:
        ρ  log-ratio, any shape
        α  `alpha` (cfg.f_alpha_divergence_coef)
        c  80 (11 for float16), so e^c stays finite; the exponential runs in float32 (float64 stays float64)
    TRL: forward_kl has no clamp, so ρ < −88 (float32) overflows e^{−ρ} to inf and the gradient to NaN.
        `clamp=True` (cfg.f_divergence_clamp) applies alpha_divergence's clamp to it (forward_kl is
        alpha_divergence at α = 0); the default keeps TRL's numbers. TRL's clamp table has no float64
        entry (a KeyError); we clamp float64 at 80 too.
    """
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return _alpha_score(logratio, 0.0) if clamp else 1 - torch.exp(-logratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if kind == "alpha_divergence":
        return logratio if abs(alpha - 1.0) < 1e-6 else _alpha_score(logratio, alpha)
    raise ValueError(f"unknown f_divergence_type {kind!r}")


def _alpha_score(logratio: Tensor, alpha: float) -> Tensor:
    t = (alpha - 1.0) * logratio
    wide = t if t.dtype == torch.float64 else t.float()
    clamp_max = 11.0 if t.dtype == torch.float16 else 80.0
    return (torch.exp(wide.clamp(max=clamp_max)) - 1.0).to(t.dtype) * (1.0 / (alpha - 1.0))


def wpo_weights(x: PreferenceInputs) -> Tensor:
    """WPO pair weight ω = exp(ā_w) · exp(ā_l), no gradient; ā = aligned log-prob / |y| (WPO paper Eq. 2,
    https://arxiv.org/abs/2406.11827). (B,)"""
    if x.wpo_chosen_logps is None or x.wpo_rejected_logps is None:
        raise ValueError(
            "use_weighting needs wpo_chosen_logps and wpo_rejected_logps "
            "(sequence_stats(..., with_metrics=True).wpo_logps)"
        )
    with torch.no_grad():
        chosen = torch.exp(x.wpo_chosen_logps / x.chosen_tokens.clamp(min=1))
        rejected = torch.exp(x.wpo_rejected_logps / x.rejected_tokens.clamp(min=1))
    return chosen * rejected


# --- one function per loss type; each returns the (B,) per-pair loss ---


@_register("sigmoid")
def sigmoid(x: PreferenceInputs, s: Scores, cfg: LossSettings) -> Tensor:
    """DPO's logistic loss.

    Paper: "Direct Preference Optimization: Your Language Model is Secretly a Reward Model", Rafailov et
    al. 2023, https://arxiv.org/abs/2305.18290 (Eq. 7)
    Formula: −log σ(β·Δ)
    Where: β = cfg.beta; Δ = s_w − s_l, the chosen minus rejected score (log-ratio for reverse_kl).
    Shapes: s.* (B,) → (B,)
    """
    return -F.logsigmoid(cfg.beta * s.delta)


@_register("hinge")
def hinge(x: PreferenceInputs, s: Scores, cfg: LossSettings) -> Tensor:
    """SLiC's hinge loss on the normalised likelihood margin.

    Paper: "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", Zhao et al. 2023,
    https://arxiv.org/abs/2305.10425
    Formula: max(0, 1 − β·Δ)
    Where: β = cfg.beta (1/β is the margin); Δ = s_w − s_l.
    Shapes: s.* (B,) → (B,)
    """
    return torch.relu(1 - cfg.beta * s.delta)


def _per_token_delta(x: PreferenceInputs, s: Scores) -> Tensor:
    """s_w/|y_w| − s_l/|y_l|, counts clamped to ≥ 1."""
    return s.chosen_scores / x.chosen_tokens.clamp(min=1) - s.rejected_scores / x.rejected_tokens.clamp(min=1)


@_register("ipo")
def ipo(x: PreferenceInputs, s: Scores, cfg: LossSettings) -> Tensor:
    """IPO's squared loss on the per-token score margin.

    Paper: "A General Theoretical Paradigm to Understand Learning from Human Preferences", Azar et al.
    2023, https://arxiv.org/abs/2310.12036 (Eq. 17)
    Formula: (s_w/|y_w| − s_l/|y_l| − 1/(2τ))²
    Where: τ = cfg.beta; s_w, s_l scores; |y_w|, |y_l| completion token counts, clamped to ≥ 1 (TRL's length
        normalisation, confirmed with the IPO authors).
    Shapes: s.* (B,), x.chosen_tokens / x.rejected_tokens (B,) → (B,)
    TRL: counts completion tokens before the label shift; the counts differ from ours (the scored tokens)
        only when a completion starts at position 0 (empty prompt), whose first token is never scored.
    """
    margin = _per_token_delta(x, s)
    return (margin - 1 / (2 * cfg.beta)) ** 2


@_register("exo_pair")
def exo_pair(x: PreferenceInputs, s: Scores, cfg: LossSettings) -> Tensor:
    """EXO-pref: reverse KL from the policy's pair distribution to the smoothed labels.

    Paper: "Towards Efficient Exact Optimization of Language Model Alignment", Ji et al. 2024,
    https://arxiv.org/abs/2402.00856 (Eq. 16, K = 2)
    Formula: σ(βΔ)·(log σ(βΔ) − log(1−ε)) + σ(−βΔ)·(log σ(−βΔ) − log ε)
    Where: β = cfg.beta; Δ = s_w − s_l; ε = cfg.label_smoothing > 0 (the paper suggests 1e-3).
    Shapes: s.* (B,) → (B,)
    """
    z = cfg.beta * s.delta
    eps = cfg.label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


@_register("nca_pair")
def nca_pair(x: PreferenceInputs, s: Scores, cfg: LossSettings) -> Tensor:
    """NCA: absolute (not relative) likelihood of each response.

    Paper: "Noise Contrastive Alignment of Language Models with Explicit Rewards", Chen et al. 2024,
    https://arxiv.org/abs/2402.05369
    Formula: −log σ(r_w) − ½·log σ(−r_w) − ½·log σ(−r_l)
    Where: r_w = β·ρ_w, r_l = β·ρ_l (log-ratios, never f-divergence scores); β = cfg.beta.
    Shapes: s.* (B,) → (B,)
    """
    r_w, r_l = cfg.beta * s.chosen_logratios, cfg.beta * s.rejected_logratios
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


@_register("robust")
def robust(x: PreferenceInputs, s: Scores, cfg: LossSettings) -> Tensor:
    """Robust DPO: unbiased under labels flipped with probability ε.

    Paper: "Provably Robust DPO: Aligning Language Models with Noisy Feedback", Chowdhury et al. 2024,
    https://arxiv.org/abs/2403.00409 (Eq. 3)
    Formula: (−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1 − 2ε)
    Where: β = cfg.beta; Δ = s_w − s_l; ε = cfg.label_smoothing in [0, ½).
    Shapes: s.* (B,) → (B,)
    """
    z = cfg.beta * s.delta
    eps = cfg.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@_register("bco_pair")
def bco_pair(x: PreferenceInputs, s: Scores, cfg: LossSettings) -> Tensor:
    """BCO on pairs: classify chosen as good and rejected as bad, independently.

    Paper: "Binary Classifier Optimization for Large Language Model Alignment", Jung et al. 2024,
    https://arxiv.org/abs/2404.04656
    Formula: −log σ(β·ρ_w) − log σ(−β·ρ_l)
    Where: β = cfg.beta; ρ_w, ρ_l log-ratios.
    Shapes: s.* (B,) → (B,)
    TRL: leaves out the paper's reward shift δ (a running mean of the rewards); so do we.
    """
    return -F.logsigmoid(cfg.beta * s.chosen_logratios) - F.logsigmoid(-cfg.beta * s.rejected_logratios)


@_register("sppo_hard")
def sppo_hard(x: PreferenceInputs, s: Scores, cfg: LossSettings) -> Tensor:
    """SPPO with hard win probabilities (1 for chosen, 0 for rejected).

    Paper: "Self-Play Preference Optimization for Language Model Alignment", Wu et al. 2024,
    https://arxiv.org/abs/2405.00675 (Eq. 4.7)
    Formula: (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²
    Where: β = cfg.beta (1/β is the paper's η); ρ_w, ρ_l log-ratios.
    Shapes: s.* (B,) → (B,)
    """
    return (s.chosen_logratios - 0.5 / cfg.beta) ** 2 + (s.rejected_logratios + 0.5 / cfg.beta) ** 2


def _smoothed_logistic(delta: Tensor, cfg: LossSettings) -> Tensor:
    z = cfg.beta * delta
    return -F.logsigmoid(z) * (1 - cfg.label_smoothing) - F.logsigmoid(-z) * cfg.label_smoothing


@_register("aot")
def aot(x: PreferenceInputs, s: Scores, cfg: LossSettings) -> Tensor:
    """AOT (paired): align the sorted policy and reference log-ratio distributions over the batch.

    Paper: "Distributional Preference Alignment of LLMs via Optimal Transport", Melnyk et al. 2024,
    https://arxiv.org/abs/2406.05882
    Formula: −(1−ε)·log σ(β·δ_i) − ε·log σ(−β·δ_i),  δ = sort_b(h^π) − sort_b(h^ref)
    Where: h^π = log π(y_w) − log π(y_l), h^ref the same for π_ref; sort_b sorts over the local batch;
        β = cfg.beta; ε = cfg.label_smoothing. Row i is a rank, not pair i.
    Shapes: x.*_logps (B,) → (B,)
    """
    policy, _ = torch.sort(x.policy_chosen_logps - x.policy_rejected_logps, dim=0)
    ref, _ = torch.sort(x.ref_chosen_logps - x.ref_rejected_logps, dim=0)
    return _smoothed_logistic(policy - ref, cfg)


@_register("aot_unpaired")
def aot_unpaired(x: PreferenceInputs, s: Scores, cfg: LossSettings) -> Tensor:
    """AOT (unpaired): align the sorted chosen and rejected log-ratio distributions over the batch.

    Paper: "Distributional Preference Alignment of LLMs via Optimal Transport", Melnyk et al. 2024,
    https://arxiv.org/abs/2406.05882
    Formula: −(1−ε)·log σ(β·δ_i) − ε·log σ(−β·δ_i),  δ = sort_b(ρ_w) − sort_b(ρ_l)
    Where: ρ_w, ρ_l log-ratios; sort_b sorts over the local batch; β = cfg.beta; ε = cfg.label_smoothing.
    Shapes: s.* (B,) → (B,)
    """
    chosen, _ = torch.sort(s.chosen_logratios, dim=0)
    rejected, _ = torch.sort(s.rejected_logratios, dim=0)
    return _smoothed_logistic(chosen - rejected, cfg)


@_register("apo_zero")
def apo_zero(x: PreferenceInputs, s: Scores, cfg: LossSettings) -> Tensor:
    """APO-zero: raise chosen likelihood, lower rejected (chosen better than the model's outputs).

    Paper: "Anchored Preference Optimization and Contrastive Revisions", D'Oosterlinck et al. 2024,
    https://arxiv.org/abs/2408.06266 (Eq. 7)
    Formula: 1 − σ(β·ρ_w) + σ(β·ρ_l)
    Where: β = cfg.beta; ρ_w, ρ_l log-ratios.
    Shapes: s.* (B,) → (B,)
    """
    return 1 - torch.sigmoid(cfg.beta * s.chosen_logratios) + torch.sigmoid(cfg.beta * s.rejected_logratios)


@_register("apo_down")
def apo_down(x: PreferenceInputs, s: Scores, cfg: LossSettings) -> Tensor:
    """APO-down: lower both likelihoods, rejected more (chosen worse than the model's outputs).

    Paper: "Anchored Preference Optimization and Contrastive Revisions", D'Oosterlinck et al. 2024,
    https://arxiv.org/abs/2408.06266 (Eq. 8)
    Formula: σ(β·ρ_w) + 1 − σ(β·(ρ_w − ρ_l))
    Where: β = cfg.beta; ρ_w, ρ_l log-ratios.
    Shapes: s.* (B,) → (B,)
    """
    return (
        torch.sigmoid(cfg.beta * s.chosen_logratios)
        + 1
        - torch.sigmoid(cfg.beta * (s.chosen_logratios - s.rejected_logratios))
    )


@_register("discopop")
def discopop(x: PreferenceInputs, s: Scores, cfg: LossSettings) -> Tensor:
    """DiscoPOP (log-ratio modulated loss): a logistic/exponential blend switched by the margin.

    Paper: "Discovering Preference Optimization Algorithms with and for Large Language Models", Chris Lu
    et al. 2024, https://arxiv.org/abs/2406.08414 (Eq. 5)
    Formula: (1 − σ(z/τ))·(−log σ(z)) + σ(z/τ)·e^{−z},  z = β·Δ
    Where: β = cfg.beta; Δ = s_w − s_l; τ = cfg.discopop_tau.
    Shapes: s.* (B,) → (B,)
    TRL: multiplies e^{−z} by σ(z/τ), which is inf·0 = NaN once z < −88 (float32); we compute
        σ(z/τ)·e^{−z} = exp(log σ(z/τ) − z), equal wherever TRL's is finite and finite (→ 0 for τ < 1) there.
    """
    z = cfg.beta * s.delta
    tau = cfg.discopop_tau
    return -F.logsigmoid(z) * (1 - torch.sigmoid(z / tau)) + torch.exp(F.logsigmoid(z / tau) - z)


@_register("sft")
def sft(x: PreferenceInputs, s: Scores, cfg: LossSettings) -> Tensor:
    """Negative log-likelihood of the chosen completions, a token mean over the whole local batch (RPO's
    NLL term when mixed with sigmoid).

    Paper: "Iterative Reasoning Preference Optimization", Pang et al. 2024, https://arxiv.org/abs/2404.19733
    Formula: −Σ_b log π(y_w,b) / Σ_b |y_w,b|, the same value for every pair
    Where: log π(y_w,b) = Σ over all chosen completion tokens, never LD-weighted; |y_w,b| chosen token
        count. Used with a non-reverse-KL f-divergence it is unchanged (it has no log-ratio).
    Shapes: x.policy_chosen_full_logps, x.chosen_tokens (B,) → (B,) (the scalar, expanded)
    TRL: with use_weighting, TRL 1.16 raises a RuntimeError (it multiplies the WPO weights in place into
        this expanded tensor); we give what that line means, mean_b(ω_b)·sft. A batch with no chosen
        token gives 0 where TRL gives NaN.
    """
    full = x.policy_chosen_logps if x.policy_chosen_full_logps is None else x.policy_chosen_full_logps
    return (-full.sum() / x.chosen_tokens.sum().clamp(min=1)).expand(full.shape)


@_register("sigmoid_norm")
def sigmoid_norm(x: PreferenceInputs, s: Scores, cfg: LossSettings) -> Tensor:
    """DPO's logistic loss on length-normalised (per-token) scores.

    Paper: "Direct Preference Optimization: Your Language Model is Secretly a Reward Model", Rafailov et
    al. 2023, https://arxiv.org/abs/2305.18290, normalised per token as in SimPO (Meng et al. 2024,
    https://arxiv.org/abs/2405.14734) but keeping the reference model.
    Formula: −log σ(β·(s_w/|y_w| − s_l/|y_l|))
    Where: β = cfg.beta; s_w, s_l scores; |y_w|, |y_l| completion token counts clamped to ≥ 1 (see ipo for
        TRL's count).
    Shapes: s.* (B,), x.chosen_tokens / x.rejected_tokens (B,) → (B,)
    """
    margin = _per_token_delta(x, s)
    return -F.logsigmoid(cfg.beta * margin)
