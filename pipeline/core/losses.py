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

Reference-free losses (cpo, simpo, orpo: TRL 1.16's experimental CPO and ORPO trainers) read the policy alone;
a batch for them alone needs no reference log-probs, and a mix of them with reference-based losses is one
weighted sum like any other mix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

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
    @property
    def cpo_beta(self) -> float | None: ...
    @property
    def cpo_alpha(self) -> float: ...
    @property
    def simpo_gamma(self) -> float: ...
    @property
    def alphapo_alpha(self) -> float: ...
    @property
    def orpo_lambda(self) -> float: ...


@dataclass(frozen=True)
class PreferenceInputs:
    """One local batch of B preference pairs; every field is (B,).

    Log-probs are sums over completion tokens, LD-combined already when ld_alpha is set
    (`logprobs.ld_logps`); policy fields carry the gradient. Give the reference in the policy's dtype
    (the cache stores float64) to get TRL's float32 numbers.
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor | None  # None: no reference (only reference-free losses can be computed)
    ref_rejected_logps: Tensor | None
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
    """The combined loss and what the metrics report. Rewards and logps are the reference-based ones (β·ρ and
    the log-prob sums) whenever the mix has a reference-based loss; for reference-free losses alone they are
    those of the first loss type, as its TRL trainer logs them (`Rewards`)."""

    loss: Tensor  # scalar: Σ_k w_k · mean_b(loss_k)
    losses: dict[str, Tensor]  # per loss type: mean_b(loss_k), WPO-weighted, before w_k
    chosen_rewards: Tensor  # (B,) detached
    rejected_rewards: Tensor
    chosen_logps: Tensor  # (B,) detached: the log-probs the rewards are built from (logps/* metrics)
    rejected_logps: Tensor
    extras: dict[str, Tensor]  # reference-free metrics: nll_loss (scalar), log_odds_ratio, log_odds_chosen (B,)


LossFn = Callable[[PreferenceInputs, Scores, LossSettings], Tensor]
LOSSES: dict[str, LossFn] = {}  # reference-based: they read the scores
RefFreeLossFn = Callable[[PreferenceInputs, LossSettings], Tensor]
REFERENCE_FREE_LOSSES: dict[str, RefFreeLossFn] = {}  # they read the policy's log-probs alone


def _register(name: str) -> Callable[[LossFn], LossFn]:
    def add(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return add


def _register_reference_free(name: str) -> Callable[[RefFreeLossFn], RefFreeLossFn]:
    def add(fn: RefFreeLossFn) -> RefFreeLossFn:
        REFERENCE_FREE_LOSSES[name] = fn
        return fn

    return add


# --- the combined loss ---


def dpo_loss(cfg: LossSettings, x: PreferenceInputs) -> LossOutput:
    """The weighted mix of `cfg.loss_type`: Σ_k w_k · mean_b(ω_b · loss_k,b), ω = WPO weight or 1."""
    scores = _scores(cfg, x) if any(name in LOSSES for name in cfg.loss_type) else None
    weights = wpo_weights(x) if cfg.use_weighting else None
    losses = {}
    for name in cfg.loss_type:
        if name in LOSSES:
            assert scores is not None
            per_pair = LOSSES[name](x, scores, cfg)
        else:
            per_pair = REFERENCE_FREE_LOSSES[name](x, cfg)
        losses[name] = (per_pair if weights is None else per_pair * weights).mean()
    loss = torch.stack([losses[name] * w for name, w in zip(cfg.loss_type, cfg.weights, strict=True)]).sum()
    if scores is not None:
        rewards = Rewards(
            cfg.beta * scores.chosen_logratios.detach(),
            cfg.beta * scores.rejected_logratios.detach(),
            x.policy_chosen_logps.detach(),
            x.policy_rejected_logps.detach(),
        )
    else:
        rewards = reference_free_rewards(cfg.loss_type[0], x, cfg)
    return LossOutput(loss, losses, *rewards, extras=_reference_free_metrics(cfg, x))


def _scores(cfg: LossSettings, x: PreferenceInputs) -> Scores:
    if x.ref_chosen_logps is None or x.ref_rejected_logps is None:
        bad = [name for name in cfg.loss_type if name in LOSSES]
        raise ValueError(f"loss types {bad} need the reference log-probs (ref_chosen_logps, ref_rejected_logps)")
    chosen_logratios = x.policy_chosen_logps - x.ref_chosen_logps
    rejected_logratios = x.policy_rejected_logps - x.ref_rejected_logps
    return Scores(
        chosen_logratios,
        rejected_logratios,
        f_divergence_score(
            chosen_logratios, cfg.f_divergence_type, cfg.f_alpha_divergence_coef, cfg.f_divergence_clamp
        ),
        f_divergence_score(
            rejected_logratios, cfg.f_divergence_type, cfg.f_alpha_divergence_coef, cfg.f_divergence_clamp
        ),
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
    assert x.ref_chosen_logps is not None and x.ref_rejected_logps is not None  # dpo_loss checked
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
    return chosen_nll(x).expand(x.policy_chosen_logps.shape)


def chosen_nll(x: PreferenceInputs) -> Tensor:
    """−Σ_b log π(y_w,b) / Σ_b |y_w,b|: the chosen completions' NLL, a token mean over the local batch (scalar)."""
    full = x.policy_chosen_logps if x.policy_chosen_full_logps is None else x.policy_chosen_full_logps
    return -full.sum() / x.chosen_tokens.sum().clamp(min=1)


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


# --- reference-free losses: the policy's log-probs alone (TRL 1.16 trl.experimental.cpo / .orpo) ---


def _mean_logps(x: PreferenceInputs) -> tuple[Tensor, Tensor]:
    """ā_w, ā_l: log π(y)/|y|, the per-token mean log-probs (counts clamped to ≥ 1)."""
    return (
        x.policy_chosen_logps / x.chosen_tokens.clamp(min=1),
        x.policy_rejected_logps / x.rejected_tokens.clamp(min=1),
    )


def alphapo_reward(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO's reward shape: r = (1 − p^{−α})/α with p = e^{logps}; r = logps at α = 0.

    Paper: "AlphaPO: Reward Shape Matters for LLM Alignment", Gupta et al. 2025, https://arxiv.org/abs/2501.03884
    Formula: r = −expm1(−α·logps)/α, computed in float64 (returned as float64 when α ≠ 0)
    TRL: computes p^{−α} from p = e^{logps} in the log-probs' dtype, which overflows once α·logps < −88 (float32),
        as summed log-probs (cpo) soon are; in float64 the same number stays finite down to α·logps = −709.
        Beyond that the reward is −inf here too: AlphaPO is meant for per-token means (simpo).
    """
    return logps if alpha == 0.0 else -torch.expm1(-alpha * logps.double()) / alpha


def _cpo_beta(cfg: LossSettings) -> float:
    return cfg.beta if cfg.cpo_beta is None else cfg.cpo_beta


def _smoothed_pair(z: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z); at ε = 0 just −log σ(z), so that z = +inf gives 0, not inf·0 = NaN."""
    loss = -F.logsigmoid(z)
    return loss if eps == 0 else loss * (1 - eps) - F.logsigmoid(-z) * eps


@_register_reference_free("cpo")
def cpo(x: PreferenceInputs, cfg: LossSettings) -> Tensor:
    """CPO: DPO's logistic loss on the policy's own log-probs, plus a behaviour-cloning NLL on chosen.

    Paper: "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine
    Translation", Xu et al. 2024, https://arxiv.org/abs/2401.08417 (Eq. 3 with label smoothing)
    Formula: −(1−ε)·log σ(β·(r_w − r_l)) − ε·log σ(−β·(r_w − r_l)) + α_bc·NLL_w
    Where: r = alphapo_reward(log π(y), cfg.alphapo_alpha) (= log π(y), the sum, at α 0); β = cfg.cpo_beta or
        cfg.beta; ε = cfg.label_smoothing; α_bc = cfg.cpo_alpha; NLL_w = chosen_nll (a token mean over the
        local batch, the same for every pair).
    Shapes: x.policy_*_logps (B,) → (B,)
    """
    beta, alpha = _cpo_beta(cfg), cfg.alphapo_alpha
    margin = alphapo_reward(x.policy_chosen_logps, alpha) - alphapo_reward(x.policy_rejected_logps, alpha)
    pair = _smoothed_pair(beta * margin, cfg.label_smoothing).to(x.policy_chosen_logps.dtype)
    return pair + cfg.cpo_alpha * chosen_nll(x)


@_register_reference_free("simpo")
def simpo(x: PreferenceInputs, cfg: LossSettings) -> Tensor:
    """SimPO: a logistic loss on length-normalised log-probs with a target reward margin; no reference.

    Paper: "SimPO: Simple Preference Optimization with a Reference-Free Reward", Meng et al. 2024,
    https://arxiv.org/abs/2405.14734 (Eq. 6); AlphaPO (Gupta et al. 2025) with cfg.alphapo_alpha ≠ 0.
    Formula: −(1−ε)·log σ(β·(r_w − r_l) − γ) − ε·log σ(−(β·(r_w − r_l) − γ)) + α_bc·NLL_w
    Where: r = alphapo_reward(ā, cfg.alphapo_alpha), ā = log π(y)/|y| (the per-token mean; r = ā at α 0);
        β = cfg.cpo_beta or cfg.beta; γ = cfg.simpo_gamma; ε = cfg.label_smoothing; α_bc = cfg.cpo_alpha
        (TRL's default 1.0 is CPO-SimPO; 0 is the paper's SimPO); NLL_w as in cpo.
    Shapes: x.policy_*_logps, x.*_tokens (B,) → (B,)
    """
    beta, alpha = _cpo_beta(cfg), cfg.alphapo_alpha
    mean_w, mean_l = _mean_logps(x)
    z = beta * (alphapo_reward(mean_w, alpha) - alphapo_reward(mean_l, alpha)) - cfg.simpo_gamma
    return _smoothed_pair(z, cfg.label_smoothing).to(mean_w.dtype) + cfg.cpo_alpha * chosen_nll(x)


def orpo_log_odds(x: PreferenceInputs) -> Tensor:
    """log odds(y_w) − log odds(y_l), odds(y) = p̄/(1 − p̄), p̄ = e^{ā}: (ā_w − ā_l) − (log(1−e^{ā_w}) − log(1−e^{ā_l})).
    Computed in float32 at least (as TRL). (B,)"""
    mean_w, mean_l = (m.float() if m.dtype != torch.float64 else m for m in _mean_logps(x))
    return (mean_w - mean_l) - (_log1mexp(mean_w) - _log1mexp(mean_l))


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 − e^a) for a ≤ 0, accurate on both sides of −ln 2. Each branch sees its own side only (the branch
    `where` does not pick must stay finite, or its zero gradient times inf is NaN), and a = 0 counts as the
    smallest negative normal number: finite, with no gradient."""
    ln2 = math.log(2)
    far = torch.log1p(-torch.exp(a.clamp(max=-ln2)))
    near = torch.log(-torch.expm1(a.clamp(min=-ln2, max=-torch.finfo(a.dtype).tiny)))
    return torch.where(a < -ln2, far, near)


@_register_reference_free("orpo")
def orpo(x: PreferenceInputs, cfg: LossSettings) -> Tensor:
    """ORPO: chosen NLL plus a log-odds-ratio penalty; no reference.

    Paper: "ORPO: Monolithic Preference Optimization without Reference Model", Hong et al. 2024,
    https://arxiv.org/abs/2403.07691 (Eqs. 6-7)
    Formula: NLL_w − λ·log σ(log odds(y_w) − log odds(y_l))
    Where: λ = cfg.orpo_lambda (TRL's ORPOConfig.beta); odds(y) = p̄/(1−p̄) with p̄ = e^{ā}, ā = log π(y)/|y|
        (orpo_log_odds); NLL_w = chosen_nll.
    Shapes: x.policy_*_logps, x.*_tokens (B,) → (B,)
    TRL: its NLL covers the whole chosen sequence, prompt tokens included ("computed over the full prompt and
        response"); ours covers the chosen completion, as the paper's L_SFT = −log P(y_w|x) and CPO's NLL do.
        A per-token mean within float rounding of 0 (p̄ = 1: a certain or empty completion) gives TRL a NaN
        gradient for the whole batch; here a finite loss with no gradient through that mean (_log1mexp).
    """
    ratio = F.logsigmoid(orpo_log_odds(x)).to(x.policy_chosen_logps.dtype)
    return chosen_nll(x) - cfg.orpo_lambda * ratio


class Rewards(NamedTuple):
    """What rewards/* and logps/* report, (B,) each, detached."""

    chosen: Tensor
    rejected: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor


def reference_free_rewards(name: str, x: PreferenceInputs, cfg: LossSettings) -> Rewards:
    """The rewards and logps TRL's trainer of loss `name` logs: cpo β·r (sums), simpo β·r (per-token means),
    orpo λ·ā (per-token means); r = alphapo_reward(·, cfg.alphapo_alpha)."""
    logps = (x.policy_chosen_logps, x.policy_rejected_logps) if name == "cpo" else _mean_logps(x)
    chosen, rejected = (v.detach() for v in logps)
    if name == "orpo":
        return Rewards(cfg.orpo_lambda * chosen, cfg.orpo_lambda * rejected, chosen, rejected)
    beta, alpha = _cpo_beta(cfg), cfg.alphapo_alpha
    return Rewards(beta * alphapo_reward(chosen, alpha), beta * alphapo_reward(rejected, alpha), chosen, rejected)


def _reference_free_metrics(cfg: LossSettings, x: PreferenceInputs) -> dict[str, Tensor]:
    """TRL's extra metrics of the CPO/ORPO trainers: nll_loss with any reference-free loss, and ORPO's
    log_odds_ratio (log σ of the log odds) and log_odds_chosen (the log odds)."""
    extras: dict[str, Tensor] = {}
    if any(name in REFERENCE_FREE_LOSSES for name in cfg.loss_type):
        extras["nll_loss"] = chosen_nll(x).detach()
    if "orpo" in cfg.loss_type:
        log_odds = orpo_log_odds(x).detach()
        extras["log_odds_ratio"] = F.logsigmoid(log_odds)
        extras["log_odds_chosen"] = log_odds
    return extras
