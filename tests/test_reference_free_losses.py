"""The reference-free loss types (cpo, simpo, orpo), alone and mixed, against formulas written out here on
float64 scalars, one pair at a time; their rewards, metrics, config rules and numerics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from pipeline.config import LossConfig
from pipeline.core.logprobs import SequenceStats
from pipeline.core.losses import PreferenceInputs, dpo_loss
from pipeline.core.metrics import batch_metric_sums, finalize
from pipeline.errors import ConfigError

FREE = ("cpo", "simpo", "orpo")

# --- an independent naive implementation: python loops over pairs, 0-dim float64 tensors ---


def logsig(z: Tensor) -> Tensor:
    return torch.log(1 / (1 + torch.exp(-z)))


def reward(v: Tensor, alpha: float) -> Tensor:
    """AlphaPO: (1 − p^{−α})/α with p = e^v; v at α = 0."""
    return v if alpha == 0 else (1 - torch.exp(v) ** (-alpha)) / alpha


def log_odds(mean: Tensor) -> Tensor:
    p = torch.exp(mean)
    return torch.log(p / (1 - p))


def naive_losses(c: LossConfig, pw, pl, rw, rl, n_w, n_l, full_w=None) -> dict[str, Tensor]:
    """mean_b(loss_k,b) per loss type."""
    b = len(n_w)
    full = pw if full_w is None else full_w
    nll = -sum(full[i] for i in range(b)) / sum(n_w)
    beta_c = c.beta if c.cpo_beta is None else c.cpo_beta
    eps, alpha = c.label_smoothing, c.alphapo_alpha
    out = {}
    for name in c.loss_type:
        per = []
        for i in range(b):
            mean_w, mean_l = pw[i] / max(n_w[i], 1), pl[i] / max(n_l[i], 1)
            if name == "sigmoid":
                per.append(-logsig(c.beta * ((pw[i] - rw[i]) - (pl[i] - rl[i]))))
            elif name == "sft":
                per.append(nll)
            elif name == "orpo":
                per.append(nll - c.orpo_lambda * logsig(log_odds(mean_w) - log_odds(mean_l)))
            else:
                if name == "cpo":
                    z = beta_c * (reward(pw[i], alpha) - reward(pl[i], alpha))
                else:
                    z = beta_c * (reward(mean_w, alpha) - reward(mean_l, alpha)) - c.simpo_gamma
                per.append(-(1 - eps) * logsig(z) - eps * logsig(-z) + c.cpo_alpha * nll)
        out[name] = sum(per) / b
    return out


def naive_rewards(c: LossConfig, pw, pl, rw, rl, n_w, n_l) -> tuple[Tensor, ...]:
    """(chosen, rejected) rewards and logps: β·ρ and sums with any reference-based loss, else the first type's."""
    if any(name not in FREE for name in c.loss_type):
        return c.beta * (pw - rw), c.beta * (pl - rl), pw, pl
    first, beta_c = c.loss_type[0], (c.beta if c.cpo_beta is None else c.cpo_beta)
    if first == "cpo":
        return beta_c * reward(pw, c.alphapo_alpha), beta_c * reward(pl, c.alphapo_alpha), pw, pl
    mean_w, mean_l = pw / torch.tensor(n_w), pl / torch.tensor(n_l)
    if first == "orpo":
        return c.orpo_lambda * mean_w, c.orpo_lambda * mean_l, mean_w, mean_l
    return beta_c * reward(mean_w, c.alphapo_alpha), beta_c * reward(mean_l, c.alphapo_alpha), mean_w, mean_l


# --- fixtures ---

N_W = [3, 7, 1, 5, 2]
N_L = [4, 2, 6, 5, 1]


def batch(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = -10 * torch.rand(3, 5, generator=g, dtype=torch.float64) - 0.05  # mean log-probs < 0 (p̄ < 1)
    return {
        "pw": base[0],
        "pl": base[1],
        "rw": base[0] + 3 * (torch.rand(5, generator=g, dtype=torch.float64) - 0.5),
        "rl": base[1] + 3 * (torch.rand(5, generator=g, dtype=torch.float64) - 0.5),
        "full_w": base[2] - 5,
    }


def cfg(loss_type, **kw) -> LossConfig:
    return LossConfig(loss_type=tuple(loss_type), **kw)


CASES = [
    *(cfg((name,)) for name in FREE),
    cfg(("cpo",), cpo_beta=0.7, cpo_alpha=0.0),
    cfg(("cpo",), beta=0.3, label_smoothing=0.15, cpo_alpha=2.5),
    cfg(("cpo",), alphapo_alpha=0.5, cpo_beta=0.2),
    cfg(("cpo",), alphapo_alpha=-0.7),
    cfg(("simpo",), cpo_beta=2.5, simpo_gamma=1.2, cpo_alpha=0.0),
    cfg(("simpo",), beta=0.7, simpo_gamma=-0.3, label_smoothing=0.2),
    cfg(("simpo",), cpo_beta=4.0, alphapo_alpha=0.3),
    cfg(("simpo",), cpo_beta=2.0, alphapo_alpha=-0.4, cpo_alpha=0.0),
    cfg(("orpo",), orpo_lambda=0.7),
    cfg(("orpo",), orpo_lambda=2.0, beta=0.5, cpo_beta=3.0, label_smoothing=0.3),  # orpo reads only λ
    cfg(("sigmoid", "simpo"), loss_weights=(1.0, 0.5), cpo_beta=2.0),
    cfg(("simpo", "sigmoid"), loss_weights=(0.3, 1.0), beta=0.4),
    cfg(("orpo", "sft"), orpo_lambda=0.5),
    cfg(("orpo", "cpo"), loss_weights=(1.0, 0.5), cpo_beta=0.3, alphapo_alpha=0.2),
    cfg(("cpo", "simpo", "orpo"), loss_weights=(0.3, 1.0, -0.2), label_smoothing=0.1),
]


def case_id(c: LossConfig) -> str:
    default = LossConfig(loss_type=c.loss_type)
    keys = ("beta", "cpo_beta", "cpo_alpha", "simpo_gamma", "alphapo_alpha", "orpo_lambda", "label_smoothing")
    return "+".join(c.loss_type) + "".join(f"-{k}{getattr(c, k)}" for k in keys if getattr(c, k) != getattr(default, k))


# --- values, gradients, per-type losses and rewards against the naive formulas ---


@pytest.mark.parametrize("with_full", [False, True], ids=["no_full", "full"])
@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_value_gradient_and_rewards_match_naive(c: LossConfig, with_full: bool):
    t = batch()
    ref = any(name not in FREE for name in c.loss_type)

    def leaves():
        return [t[k].clone().requires_grad_(True) for k in ("pw", "pl", "full_w")]

    pw, pl, full_w = leaves()
    x = PreferenceInputs(
        pw,
        pl,
        t["rw"] if ref else None,
        t["rl"] if ref else None,
        torch.tensor(N_W),
        torch.tensor(N_L),
        policy_chosen_full_logps=full_w if with_full else None,
    )
    out = dpo_loss(c, x)
    grads = torch.autograd.grad(out.loss, (pw, pl, full_w), allow_unused=True, materialize_grads=True)

    pw2, pl2, full_w2 = leaves()
    per_type = naive_losses(c, pw2, pl2, t["rw"], t["rl"], N_W, N_L, full_w2 if with_full else None)
    expected = sum(w * per_type[name] for name, w in zip(c.loss_type, c.weights, strict=True))
    expected_grads = torch.autograd.grad(expected, (pw2, pl2, full_w2), allow_unused=True, materialize_grads=True)

    torch.testing.assert_close(out.loss, expected, atol=1e-12, rtol=1e-10)
    for ours, theirs in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-9)
    assert list(out.losses) == list(c.loss_type)
    for name in c.loss_type:
        torch.testing.assert_close(out.losses[name], per_type[name].detach(), atol=1e-12, rtol=1e-10)

    got = (out.chosen_rewards, out.rejected_rewards, out.chosen_logps, out.rejected_logps)
    for ours, theirs in zip(got, naive_rewards(c, t["pw"], t["pl"], t["rw"], t["rl"], N_W, N_L), strict=True):
        assert not ours.requires_grad
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-10)
    if not ref:  # the reference-free losses ignore reference log-probs when given
        with_ref = PreferenceInputs(t["pw"], t["pl"], t["rw"], t["rl"], x.chosen_tokens, x.rejected_tokens)
        without = PreferenceInputs(t["pw"], t["pl"], None, None, x.chosen_tokens, x.rejected_tokens)
        torch.testing.assert_close(dpo_loss(c, with_ref).loss, dpo_loss(c, without).loss, atol=0, rtol=0)


def test_reference_based_loss_without_reference_is_named():
    t = batch()
    x = PreferenceInputs(t["pw"], t["pl"], None, None, torch.tensor(N_W), torch.tensor(N_L))
    with pytest.raises(ValueError, match=r"\['sigmoid'\]") as err:
        dpo_loss(cfg(("sigmoid", "cpo")), x)
    assert "cpo" not in str(err.value)
    with pytest.raises(ValueError, match=r"\['sft'\]"):
        dpo_loss(cfg(("orpo", "sft")), x)


# --- worked by hand ---


def two_pairs(chosen, rejected, n_w, n_l) -> PreferenceInputs:
    f64 = torch.float64
    t = torch.tensor
    return PreferenceInputs(t(chosen, dtype=f64), t(rejected, dtype=f64), None, None, t(n_w), t(n_l))


def test_cpo_worked_by_hand():
    """β = 0.1 (cpo_beta null), cpo_alpha = 1, ε = 0, α = 0; summed log-probs.

    Pair 1: chosen −4 (2 tokens), rejected −8 (4 tokens): β·(−4 − (−8)) = 0.4
        −log σ(0.4) = log(1 + e^{−0.4}) = 0.5130152523999526
    Pair 2: chosen −6 (4 tokens), rejected −6 (3 tokens): margin 0, −log σ(0) = log 2 = 0.6931471805599453
    NLL = −(−4 − 6) / (2 + 4) = 10/6 = 1.6666666666666667 (a token mean over the batch, in every pair)
    loss = (0.5130152523999526 + 0.6931471805599453)/2 + 1.6666666666666667 = 2.2697478831466156
    rewards β·logps: chosen (−0.4, −0.6), rejected (−0.8, −0.6); logps are the sums
    """
    out = dpo_loss(cfg(("cpo",)), two_pairs([-4.0, -6.0], [-8.0, -6.0], [2, 4], [4, 3]))
    assert out.loss.item() == pytest.approx(2.2697478831466156, abs=1e-14)
    assert out.chosen_rewards.tolist() == pytest.approx([-0.4, -0.6])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.8, -0.6])
    assert out.chosen_logps.tolist() == [-4.0, -6.0]
    assert out.extras["nll_loss"].item() == pytest.approx(10 / 6)


def test_simpo_worked_by_hand():
    """cpo_beta = 2, γ = 0.5, cpo_alpha = 0 (the SimPO paper), ε = 0; per-token means ā.

    Pair 1: ā_w = −4/2 = −2, ā_l = −8/4 = −2: z = 2·0 − 0.5 = −0.5, −log σ(−0.5) = log(1 + e^{0.5}) = 0.9740769841801067
    Pair 2: ā_w = −6/4 = −1.5, ā_l = −6/3 = −2: z = 2·0.5 − 0.5 = 0.5, log(1 + e^{−0.5}) = 0.4740769841801067
    loss = (0.9740769841801067 + 0.4740769841801067)/2 = 0.7240769841801067
    rewards β·ā: chosen (−4, −3), rejected (−4, −4); logps are the means
    """
    c = cfg(("simpo",), cpo_beta=2.0, cpo_alpha=0.0)
    out = dpo_loss(c, two_pairs([-4.0, -6.0], [-8.0, -6.0], [2, 4], [4, 3]))
    assert out.loss.item() == pytest.approx(0.7240769841801067, abs=1e-14)
    assert out.chosen_rewards.tolist() == pytest.approx([-4.0, -3.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-4.0, -4.0])
    assert out.chosen_logps.tolist() == pytest.approx([-2.0, -1.5])


ORPO_PAIRS = ([2 * math.log(0.5), math.log(0.75)], [3 * math.log(0.2), 2 * math.log(0.25)], [2, 1], [3, 2])


def test_orpo_worked_by_hand():
    """λ = 0.1; p̄ = e^{ā} per token.

    Pair 1: p̄_w = 0.5 (2 tokens), p̄_l = 0.2 (3 tokens): odds 1 and 1/4, log odds ratio ln 4
        log σ(ln 4) = log(4/5) = log 0.8
    Pair 2: p̄_w = 0.75 (1 token), p̄_l = 0.25 (2 tokens): odds 3 and 1/3, log odds ratio ln 9, log σ = log 0.9
    NLL = −(2·ln 0.5 + ln 0.75)/(2 + 1) = ln(16/3)/3 = 1.6739764335716716/3 = 0.5579921445238906
    mean log σ = (log 0.8 + log 0.9)/2 = ln(0.72)/2 = −0.3285040669720361/2 = −0.164252033486018
    loss = 0.5579921445238906 − 0.1·(−0.164252033486018) = 0.5744173478724923
    """
    out = dpo_loss(cfg(("orpo",)), two_pairs(*ORPO_PAIRS))
    assert out.loss.item() == pytest.approx(0.5744173478724923, abs=1e-14)
    assert out.extras["log_odds_chosen"].tolist() == pytest.approx([math.log(4), math.log(9)], abs=1e-14)
    assert out.extras["log_odds_ratio"].tolist() == pytest.approx([math.log(0.8), math.log(0.9)], abs=1e-14)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1 * math.log(0.5), 0.1 * math.log(0.75)])
    assert out.rejected_logps.tolist() == pytest.approx([math.log(0.2), math.log(0.25)])


# --- metrics ---


def metrics(c: LossConfig, x: PreferenceInputs) -> dict[str, float]:
    tokens = torch.cat([x.chosen_tokens, x.rejected_tokens])
    logps, zeros = torch.cat([x.policy_chosen_logps, x.policy_rejected_logps]), torch.zeros(len(tokens))
    stats = SequenceStats(logps, tokens, logps, zeros, zeros, zeros, zeros, torch.zeros(len(tokens), dtype=torch.long))
    return finalize(batch_metric_sums(dpo_loss(c, x), stats))


@pytest.mark.parametrize(
    "loss_type,extra",
    [
        (("sigmoid",), set()),
        (("sigmoid", "sft"), set()),
        (("cpo",), {"nll_loss"}),
        (("simpo",), {"nll_loss"}),
        (("sigmoid", "simpo"), {"nll_loss"}),
        (("orpo",), {"nll_loss", "log_odds_ratio", "log_odds_chosen"}),
        (("sigmoid", "orpo"), {"nll_loss", "log_odds_ratio", "log_odds_chosen"}),
    ],
)
def test_metric_names_and_values(loss_type, extra):
    x = two_pairs(*ORPO_PAIRS)
    ref = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    if any(name not in FREE for name in loss_type):
        x = PreferenceInputs(
            x.policy_chosen_logps, x.policy_rejected_logps, ref, ref, x.chosen_tokens, x.rejected_tokens
        )
    m = metrics(cfg(loss_type), x)
    optional = {"nll_loss", "log_odds_ratio", "log_odds_chosen"}
    assert optional & set(m) == extra
    if extra:
        assert m["nll_loss"] == pytest.approx(math.log(16 / 3) / 3)
    if "log_odds_ratio" in extra:
        assert m["log_odds_ratio"] == pytest.approx(math.log(0.72) / 2)
        assert m["log_odds_chosen"] == pytest.approx(math.log(6))  # (ln 4 + ln 9)/2
    if loss_type == ("orpo",):  # per-token means, λ·ā
        assert m["logps/chosen"] == pytest.approx((math.log(0.5) + math.log(0.75)) / 2)
        assert m["rewards/chosen"] == pytest.approx(0.1 * (math.log(0.5) + math.log(0.75)) / 2)
    elif "sigmoid" in loss_type:  # β·ρ and sums
        assert m["logps/chosen"] == pytest.approx((2 * math.log(0.5) + math.log(0.75)) / 2)
        assert m["rewards/chosen"] == pytest.approx(0.1 * (2 * math.log(0.5) + math.log(0.75) + 3) / 2)


# --- config ---


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"loss_type": ("cpo",), "ld_alpha": 0.5}, "ld_alpha"),
        ({"loss_type": ("sigmoid", "orpo"), "ld_alpha": 0.0}, "ld_alpha"),
        ({"loss_type": ("simpo",), "use_weighting": True}, "use_weighting"),
        ({"loss_type": ("sigmoid", "orpo"), "use_weighting": True}, "use_weighting"),
        ({"loss_type": ("simpo",), "cpo_beta": 0.0}, "cpo_beta"),
        ({"loss_type": ("cpo",), "cpo_beta": -1.0}, "cpo_beta"),
        ({"loss_type": ("simpo",), "simpo_gamma": math.nan}, "simpo_gamma"),
    ],
)
def test_config_rejects(kw, match):
    with pytest.raises(ConfigError, match=match):
        LossConfig(**kw)


def test_needs_reference():
    assert not cfg(("cpo",)).needs_reference and not cfg(("orpo", "simpo", "cpo")).needs_reference
    assert cfg(("sigmoid",)).needs_reference and cfg(("sft",)).needs_reference
    assert cfg(("sigmoid", "cpo")).needs_reference and cfg(("orpo", "sft")).needs_reference
    assert LossConfig(ld_alpha=0.5, use_weighting=True).weights == (1.0,)  # allowed for reference-based losses


# --- numerics ---


def finite_loss_and_grads(c: LossConfig, chosen, rejected, n_w, n_l, dtype) -> bool:
    pw = torch.tensor(chosen, dtype=dtype, requires_grad=True)
    pl = torch.tensor(rejected, dtype=dtype, requires_grad=True)
    x = PreferenceInputs(pw, pl, None, None, torch.tensor(n_w), torch.tensor(n_l))
    loss = dpo_loss(c, x).loss
    grads = torch.autograd.grad(loss, (pw, pl))
    return bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("dtype,v", [(torch.float32, -150.0), (torch.float64, -1000.0)])
def test_alphapo_on_sums_is_finite_where_p_to_the_minus_alpha_is_not(dtype, v):
    """e^{−αv} for α = 0.5 is e^{75} (float32) / e^{500} (float64): finite; p = e^v underflows to 0 first, so
    p^{−α} is inf. (At v = −1e4, e^{5000} overflows in any dtype: AlphaPO on sums has no finite value there.)"""
    assert torch.isinf(torch.exp(torch.tensor(v, dtype=dtype)) ** -0.5)
    c = cfg(("cpo",), alphapo_alpha=0.5)
    assert finite_loss_and_grads(c, [v, -3.0, v], [-3.0, v, v + 1], [5, 2, 9], [4, 3, 9], dtype)
    negative = cfg(("cpo", "simpo"), alphapo_alpha=-0.5)  # e^{αv} → 0: r → 1/α
    assert finite_loss_and_grads(negative, [-1e4, -3.0], [-2.0, -1e4], [5, 2], [4, 3], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_log1mexp_both_sides_of_minus_ln2(dtype):
    """ā = −1e-3 (p̄ ≈ 1, log(−expm1) side) and −50 (log1p(−e^ā) side), on chosen and rejected; the log odds
    to float32 precision too (log1p(−e^ā) at ā = −1e-3 would be off by ~6e-5)."""
    tol = {"rtol": 1e-7, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-12}
    for chosen, rejected in [(-1e-3, -50.0), (-50.0, -1e-3), (-1e-3, -0.5), (-0.9, -50.0)]:
        assert finite_loss_and_grads(cfg(("orpo",)), [3 * chosen], [2 * rejected], [3], [2], dtype)
        x = PreferenceInputs(
            torch.tensor([3 * chosen], dtype=dtype),
            torch.tensor([2 * rejected], dtype=dtype),
            None,
            None,
            torch.tensor([3]),
            torch.tensor([2]),
        )
        f64 = torch.float64
        expected = log_odds(torch.tensor(chosen, dtype=f64)) - log_odds(torch.tensor(rejected, dtype=f64))
        got = dpo_loss(cfg(("orpo",)), x).extras["log_odds_chosen"]
        torch.testing.assert_close(got.double(), expected.view(1), **tol)
    big = [-1e4, -1e4 + 5]
    for name in FREE:  # summed log-probs of −1e4 without the AlphaPO transform
        assert finite_loss_and_grads(cfg((name,)), big, big[::-1], [3, 50], [7, 1], dtype)
