"""Every reference-based loss type and option against formulas written out here, on float64 scalars, one pair
at a time (the reference-free ones: tests/test_reference_free_losses.py)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from pipeline.config import F_DIVERGENCE_LOSS_TYPES, LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, LossConfig
from pipeline.core.logprobs import ld_logps
from pipeline.core.losses import (
    LOSSES,
    REFERENCE_FREE_LOSSES,
    PreferenceInputs,
    Scores,
    dpo_loss,
    f_divergence_score,
    wpo_weights,
)
from pipeline.errors import ConfigError

REFERENCE_BASED = tuple(name for name in LOSS_TYPES if name not in REFERENCE_FREE_LOSS_TYPES)

# --- an independent naive implementation: python loops over pairs, 0-dim float64 tensors ---


def sig(z: Tensor) -> Tensor:
    return 1 / (1 + torch.exp(-z))


def logsig(z: Tensor) -> Tensor:
    return torch.log(sig(z))


def naive_score(rho: Tensor, kind: str, alpha: float) -> Tensor:
    t = torch.exp(rho)  # the density ratio π/π_ref
    if kind == "reverse_kl":
        return torch.log(t)
    if kind == "forward_kl":
        return 1 - 1 / t
    if kind == "js_divergence":
        return torch.log(2 * t / (t + 1))
    assert kind == "alpha_divergence"
    return torch.log(t) if alpha == 1.0 else (t ** (alpha - 1) - 1) / (alpha - 1)


def naive_pair_loss(name: str, c: LossConfig, rho_w: Tensor, rho_l: Tensor, n_w: int, n_l: int) -> Tensor:
    b, eps, tau = c.beta, c.label_smoothing, c.discopop_tau
    s_w = naive_score(rho_w, c.f_divergence_type, c.f_alpha_divergence_coef)
    s_l = naive_score(rho_l, c.f_divergence_type, c.f_alpha_divergence_coef)
    d = s_w - s_l
    if name == "sigmoid":
        return -logsig(b * d)
    if name == "hinge":
        return torch.clamp(1 - b * d, min=0)
    if name == "ipo":
        return (s_w / max(n_w, 1) - s_l / max(n_l, 1) - 1 / (2 * b)) ** 2
    if name == "exo_pair":  # KL([q, 1−q] ‖ [1−ε, ε])
        q = sig(b * d)
        return q * torch.log(q / (1 - eps)) + (1 - q) * torch.log((1 - q) / eps)
    if name == "nca_pair":
        return -logsig(b * rho_w) - 0.5 * logsig(-b * rho_w) - 0.5 * logsig(-b * rho_l)
    if name == "robust":
        return ((1 - eps) * -logsig(b * d) - eps * -logsig(-b * d)) / (1 - 2 * eps)
    if name == "bco_pair":
        return -logsig(b * rho_w) - logsig(-b * rho_l)
    if name == "sppo_hard":
        return (rho_w - 1 / (2 * b)) ** 2 + (rho_l + 1 / (2 * b)) ** 2
    if name == "apo_zero":
        return (1 - sig(b * rho_w)) + sig(b * rho_l)
    if name == "apo_down":
        return sig(b * rho_w) + (1 - sig(b * (rho_w - rho_l)))
    if name == "discopop":
        z = b * d
        m = sig(z / tau)
        return (1 - m) * -logsig(z) + m * torch.exp(-z)
    assert name == "sigmoid_norm"
    return -logsig(b * (s_w / max(n_w, 1) - s_l / max(n_l, 1)))


def naive_loss(
    c: LossConfig,
    pw: Tensor,
    pl: Tensor,
    rw: Tensor,
    rl: Tensor,
    n_w: list[int],
    n_l: list[int],
    full_w: Tensor | None = None,
    wpo_w: Tensor | None = None,
    wpo_l: Tensor | None = None,
) -> Tensor:
    """Σ_k w_k · mean_b(ω_b · loss_k,b), with the batch-level losses (aot, sft) written out too."""
    batch = len(n_w)
    omega = [1.0] * batch
    if c.use_weighting:
        omega = [
            math.exp(wpo_w[i].item() / max(n_w[i], 1)) * math.exp(wpo_l[i].item() / max(n_l[i], 1))
            for i in range(batch)
        ]
    total = torch.zeros((), dtype=torch.float64)
    for name, weight in zip(c.loss_type, c.weights, strict=True):
        if name == "sft":
            full = pw if full_w is None else full_w
            nll = -sum(full[i] for i in range(batch)) / sum(n_w)
            per = [nll] * batch
        elif name in ("aot", "aot_unpaired"):
            if name == "aot":
                a = sorted((pw[i] - pl[i] for i in range(batch)), key=lambda v: v.item())
                r = sorted((rw[i] - rl[i] for i in range(batch)), key=lambda v: v.item())
            else:
                a = sorted((pw[i] - rw[i] for i in range(batch)), key=lambda v: v.item())
                r = sorted((pl[i] - rl[i] for i in range(batch)), key=lambda v: v.item())
            eps = c.label_smoothing
            per = [
                -(1 - eps) * logsig(c.beta * (a[i] - r[i])) - eps * logsig(-c.beta * (a[i] - r[i]))
                for i in range(batch)
            ]
        else:
            per = [naive_pair_loss(name, c, pw[i] - rw[i], pl[i] - rl[i], n_w[i], n_l[i]) for i in range(batch)]
        total = total + weight * sum(omega[i] * per[i] for i in range(batch)) / batch
    return total


# --- fixtures ---

N_W = [3, 7, 1, 5, 2]
N_L = [4, 2, 6, 5, 1]


def batch(seed: int = 0, spread: float = 3.0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = -10 * torch.rand(4, 5, generator=g, dtype=torch.float64)
    pw, pl = base[0], base[1]
    return {
        "pw": pw,
        "pl": pl,
        "rw": pw + spread * (torch.rand(5, generator=g, dtype=torch.float64) - 0.5),
        "rl": pl + spread * (torch.rand(5, generator=g, dtype=torch.float64) - 0.5),
        "full_w": base[2] - 5,
        "wpo_w": base[3] * 0.3,
        "wpo_l": base[2] * 0.2,
    }


def inputs(t: dict[str, Tensor], **over) -> PreferenceInputs:
    kw = {
        "policy_chosen_logps": t["pw"],
        "policy_rejected_logps": t["pl"],
        "ref_chosen_logps": t["rw"],
        "ref_rejected_logps": t["rl"],
        "chosen_tokens": torch.tensor(N_W),
        "rejected_tokens": torch.tensor(N_L),
        "wpo_chosen_logps": t["wpo_w"],
        "wpo_rejected_logps": t["wpo_l"],
    }
    return PreferenceInputs(**{**kw, **over})


def cfg(loss_type=("sigmoid",), **kw) -> LossConfig:
    if "exo_pair" in loss_type:
        kw.setdefault("label_smoothing", 1e-3)
    return LossConfig(loss_type=tuple(loss_type), **kw)


CASES = (
    [cfg((name,)) for name in REFERENCE_BASED]
    + [cfg((name,), beta=0.5) for name in REFERENCE_BASED]
    + [
        cfg((name,), f_divergence_type=kind, f_alpha_divergence_coef=alpha)
        for name in sorted(F_DIVERGENCE_LOSS_TYPES)
        for kind, alpha in [
            ("forward_kl", 0.5),
            ("js_divergence", 0.5),
            ("alpha_divergence", 0.3),
            ("alpha_divergence", 2.0),
            ("alpha_divergence", 1.0),
        ]
    ]
    + [
        cfg(("robust",), label_smoothing=0.2),
        cfg(("exo_pair",), label_smoothing=0.1),
        cfg(("aot",), label_smoothing=0.1),
        cfg(("aot_unpaired",), label_smoothing=0.25),
        cfg(("discopop",), discopop_tau=0.5),
    ]
    + [cfg((name,), use_weighting=True) for name in REFERENCE_BASED if name not in ("aot", "aot_unpaired")]
    + [
        cfg(("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0)),
        cfg(("sigmoid", "sft"), loss_weights=(1.0, 0.5), use_weighting=True),
        cfg(("ipo", "hinge", "aot"), loss_weights=(0.3, -0.1, 2.0)),
        cfg(("sigmoid_norm", "sft"), f_divergence_type="js_divergence", use_weighting=True),
    ]
)


def case_id(c: LossConfig) -> str:
    parts = ["+".join(c.loss_type)]
    if c.f_divergence_type != "reverse_kl":
        parts.append(f"{c.f_divergence_type}{c.f_alpha_divergence_coef}")
    if c.use_weighting:
        parts.append("wpo")
    if c.beta != 0.1:
        parts.append(f"beta{c.beta}")
    if c.label_smoothing and "exo_pair" not in c.loss_type:
        parts.append(f"eps{c.label_smoothing}")
    return "-".join(parts)


# --- the loss against the naive formulas: value and gradient ---


def test_registry_is_trl_loss_types():
    assert set(LOSSES) == set(REFERENCE_BASED) and len(LOSSES) == 15  # DPOTrainer's
    assert set(REFERENCE_FREE_LOSSES) == REFERENCE_FREE_LOSS_TYPES == {"cpo", "simpo", "orpo"}  # CPO/ORPO trainers'
    assert len(LOSS_TYPES) == len(set(LOSS_TYPES)) == 18


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_value_and_gradient_match_naive(c: LossConfig):
    t = batch()
    pw, pl = t["pw"].clone().requires_grad_(True), t["pl"].clone().requires_grad_(True)
    full_w = t["full_w"].clone().requires_grad_(True)
    x = inputs(t, policy_chosen_logps=pw, policy_rejected_logps=pl, policy_chosen_full_logps=full_w)
    out = dpo_loss(c, x)
    grads = torch.autograd.grad(out.loss, (pw, pl, full_w), allow_unused=True, materialize_grads=True)

    pw2, pl2 = t["pw"].clone().requires_grad_(True), t["pl"].clone().requires_grad_(True)
    full_w2 = t["full_w"].clone().requires_grad_(True)
    expected = naive_loss(c, pw2, pl2, t["rw"], t["rl"], N_W, N_L, full_w2, t["wpo_w"], t["wpo_l"])
    expected_grads = torch.autograd.grad(expected, (pw2, pl2, full_w2), allow_unused=True, materialize_grads=True)

    torch.testing.assert_close(out.loss, expected, atol=1e-12, rtol=1e-10)
    for ours, theirs in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(out.chosen_rewards, c.beta * (t["pw"] - t["rw"]))
    torch.testing.assert_close(out.rejected_rewards, c.beta * (t["pl"] - t["rl"]))
    assert not out.chosen_rewards.requires_grad
    assert list(out.losses) == list(c.loss_type)
    torch.testing.assert_close(sum(out.losses[n] * w for n, w in zip(c.loss_type, c.weights, strict=True)), out.loss)


def test_float32_matches_float64():
    t = batch()
    c = cfg(("sigmoid", "ipo", "discopop", "sft"))
    x64 = inputs(t)
    x32 = PreferenceInputs(
        **{k: (v.float() if v.is_floating_point() else v) for k, v in vars(x64).items() if v is not None}
    )
    torch.testing.assert_close(dpo_loss(c, x32).loss.double(), dpo_loss(c, x64).loss, atol=1e-5, rtol=1e-6)


def test_sigmoid_worked_by_hand():
    """β = 0.1, two pairs.

    Pair 1: policy (chosen, rejected) = (−5, −9), reference = (−6, −8):
        ρ_w = −5 − (−6) = 1, ρ_l = −9 − (−8) = −1, Δ = 2, β·Δ = 0.2
        loss = −log σ(0.2) = log(1 + e^{−0.2}) = log(1.8187307531) = 0.5981388693815918
    Pair 2: policy = reference = (−3, −4): Δ = 0, loss = log 2 = 0.6931471805599453
    mean = (0.5981388693815918 + 0.6931471805599453) / 2 = 0.6456430249707685
    rewards: chosen β·ρ_w = (0.1, 0), rejected β·ρ_l = (−0.1, 0)
    """
    x = PreferenceInputs(
        policy_chosen_logps=torch.tensor([-5.0, -3.0], dtype=torch.float64),
        policy_rejected_logps=torch.tensor([-9.0, -4.0], dtype=torch.float64),
        ref_chosen_logps=torch.tensor([-6.0, -3.0], dtype=torch.float64),
        ref_rejected_logps=torch.tensor([-8.0, -4.0], dtype=torch.float64),
        chosen_tokens=torch.tensor([2, 2]),
        rejected_tokens=torch.tensor([2, 2]),
    )
    out = dpo_loss(LossConfig(beta=0.1), x)
    assert out.loss.item() == pytest.approx(0.6456430249707685, abs=1e-15)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.0])


# --- options ---


def test_ld_alpha_weights_the_tail_and_sft_uses_the_full_sum():
    shared_w, tail_w = torch.tensor([-2.0, -3.0]), torch.tensor([-4.0, 0.0])
    shared_l, tail_l = torch.tensor([-2.5, -1.0]), torch.tensor([0.0, -6.0])
    ref = torch.tensor([-5.0, -6.0])
    c = LossConfig(loss_type=("sigmoid", "sft"), ld_alpha=0.25)
    x = PreferenceInputs(
        policy_chosen_logps=ld_logps(shared_w, tail_w, c.ld_alpha),
        policy_rejected_logps=ld_logps(shared_l, tail_l, c.ld_alpha),
        ref_chosen_logps=ref,
        ref_rejected_logps=ref,
        chosen_tokens=torch.tensor([5, 3]),
        rejected_tokens=torch.tensor([3, 7]),
        policy_chosen_full_logps=shared_w + tail_w,
    )
    out = dpo_loss(c, x)
    # chosen (−3, −3) and rejected (−2.5, −2.5) after LD weighting: Δ = −0.5 for both pairs.
    sigmoid = math.log1p(math.exp(0.1 * 0.5))
    sft = (6.0 + 3.0) / (5 + 3)  # −Σ full chosen log-probs / Σ chosen tokens (a token mean)
    assert out.losses["sigmoid"].item() == pytest.approx(sigmoid, rel=1e-6)
    assert out.losses["sft"].item() == pytest.approx(sft, rel=1e-6)
    assert out.loss.item() == pytest.approx(sigmoid + sft, rel=1e-6)


def test_sft_is_a_token_mean_not_a_sequence_mean():
    x = PreferenceInputs(
        *(torch.tensor([-1.0, -9.0]),) * 4, chosen_tokens=torch.tensor([1, 3]), rejected_tokens=torch.tensor([1, 1])
    )
    assert dpo_loss(LossConfig(loss_type=("sft",)), x).loss.item() == pytest.approx(10 / 4)  # not (1 + 3) / 2


def test_wpo_weights_carry_no_gradient():
    t = batch()
    wpo_w, wpo_l = t["wpo_w"].clone().requires_grad_(True), t["wpo_l"].clone().requires_grad_(True)
    x = inputs(t, wpo_chosen_logps=wpo_w, wpo_rejected_logps=wpo_l)
    weights = wpo_weights(x)
    assert not weights.requires_grad
    expected = torch.exp(t["wpo_w"] / torch.tensor(N_W)) * torch.exp(t["wpo_l"] / torch.tensor(N_L))
    torch.testing.assert_close(weights, expected)
    with pytest.raises(ValueError, match="wpo_chosen_logps"):
        dpo_loss(cfg(use_weighting=True), inputs(t, wpo_chosen_logps=None))


def test_aot_sorts_within_the_batch():
    t = batch()
    perm = torch.tensor([3, 0, 4, 1, 2])
    for name in ("aot", "aot_unpaired"):
        c = cfg((name,))
        shuffled = {k: v[perm] for k, v in t.items()}
        n_w, n_l = [N_W[i] for i in perm], [N_L[i] for i in perm]
        x = PreferenceInputs(
            shuffled["pw"], shuffled["pl"], shuffled["rw"], shuffled["rl"], torch.tensor(n_w), torch.tensor(n_l)
        )
        torch.testing.assert_close(dpo_loss(c, x).loss, dpo_loss(c, inputs(t)).loss)


def test_f_divergence_scores():
    rho = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0], dtype=torch.float64)
    for kind, alpha in [
        ("reverse_kl", 0.5),
        ("forward_kl", 0.5),
        ("js_divergence", 0.5),
        ("alpha_divergence", 0.5),
        ("alpha_divergence", 1.5),
        ("alpha_divergence", 1.0),
    ]:
        expected = torch.stack([naive_score(r, kind, alpha) for r in rho])
        torch.testing.assert_close(f_divergence_score(rho, kind, alpha), expected)
    # α → 1 is reverse KL; within 1e-6 of 1 TRL takes the limit.
    torch.testing.assert_close(f_divergence_score(rho, "alpha_divergence", 1.0 + 1e-7), rho)
    # the clamp: (α−1)ρ is capped at 80 (11 for float16), so e^{(α−1)ρ} stays finite
    big = torch.tensor([500.0])
    assert f_divergence_score(big, "alpha_divergence", 2.0).item() == pytest.approx(math.expm1(80.0))
    assert f_divergence_score(big.half(), "alpha_divergence", 2.0).item() == pytest.approx(math.expm1(11.0), rel=1e-3)
    # forward_kl = alpha_divergence at α = 0; the clamp option only matters past the cap
    torch.testing.assert_close(
        f_divergence_score(rho, "forward_kl", clamp=True), f_divergence_score(rho, "alpha_divergence", 0.0)
    )
    torch.testing.assert_close(f_divergence_score(rho, "forward_kl", clamp=True), f_divergence_score(rho, "forward_kl"))
    with pytest.raises(ValueError, match="unknown"):
        f_divergence_score(rho, "hellinger")


# --- numerics at extreme margins ---


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin", [1e4, -1e4])
@pytest.mark.parametrize("name", REFERENCE_BASED)
def test_finite_at_extreme_margins(name, margin, dtype):
    pw = torch.tensor([margin / 2, 0.0, -margin], dtype=dtype, requires_grad=True)
    pl = torch.tensor([-margin / 2, margin, 0.0], dtype=dtype, requires_grad=True)
    zero = torch.zeros(3, dtype=dtype)
    x = PreferenceInputs(
        pw,
        pl,
        zero - 1.0,
        zero - 1.0,
        torch.tensor([3, 1, 2]),
        torch.tensor([2, 5, 1]),
        wpo_chosen_logps=zero - 2,
        wpo_rejected_logps=zero - 3,
    )
    configs = [cfg((name,))]
    if name not in ("aot", "aot_unpaired"):
        configs.append(cfg((name,), use_weighting=True))
    for c in configs:
        loss = dpo_loss(c, x).loss
        grads = torch.autograd.grad(loss, (pw, pl), allow_unused=True, materialize_grads=True)
        assert torch.isfinite(loss), (c, loss)
        assert all(torch.isfinite(g).all() for g in grads), (c, grads)


def test_forward_kl_overflows_like_trl_unless_clamped():
    pw = torch.tensor([-1.0], requires_grad=True)
    pl = torch.tensor([-200.0], requires_grad=True)  # ρ_l = −199: e^{199} overflows float32
    ref = torch.tensor([-1.0])
    x = PreferenceInputs(pw, pl, ref, ref, torch.tensor([4]), torch.tensor([4]))
    trl_like = cfg(f_divergence_type="forward_kl")
    loss = dpo_loss(trl_like, x).loss
    (grad,) = torch.autograd.grad(loss, (pl,))
    assert not torch.isfinite(grad).all()  # TRL 1.16's NaN gradient
    fixed = replace(trl_like, f_divergence_clamp=True)
    loss = dpo_loss(fixed, x).loss
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, (pw, pl)))


def test_discopop_is_finite_where_trl_is_nan():
    z = torch.tensor([-2000.0, -3.0, 0.5, 40.0])  # β·Δ
    c = cfg(("discopop",), beta=1.0)
    mod = torch.sigmoid(z / c.discopop_tau)
    trl_form = -torch.nn.functional.logsigmoid(z) * (1 - mod) + torch.exp(-z) * mod
    assert torch.isnan(trl_form[0])
    zero = torch.zeros(4)
    x = PreferenceInputs(z, zero, zero, zero, torch.ones(4), torch.ones(4))
    ours = LOSSES["discopop"](x, Scores(z, zero, z, zero), c)
    torch.testing.assert_close(ours[1:], trl_form[1:])
    assert ours[0].item() == pytest.approx(2000.0)  # the logistic part; the exponential part → 0


# --- properties ---


@pytest.mark.parametrize("batch_size", [1, 4, 33])
def test_sigmoid_is_ln2_when_policy_is_reference(batch_size):
    logps = -20 * torch.rand(2, batch_size)
    x = PreferenceInputs(
        logps[0],
        logps[1],
        logps[0].clone(),
        logps[1].clone(),
        torch.full((batch_size,), 3),
        torch.full((batch_size,), 4),
    )
    out = dpo_loss(LossConfig(), x)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0


@pytest.mark.parametrize(
    "name,strict", [("sigmoid", True), ("robust", True), ("sigmoid_norm", True), ("aot", True), ("hinge", False)]
)
def test_monotone_in_the_margin(name, strict):
    margins = torch.linspace(-30, 30, 121, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    losses = []
    for m in margins:
        x = PreferenceInputs(m.view(1), zero, zero, zero, torch.tensor([1]), torch.tensor([1]))
        losses.append(dpo_loss(cfg((name,), label_smoothing=0.1 if name == "robust" else 0.0), x).loss.item())
    steps = torch.diff(torch.tensor(losses))
    assert (steps < 0).all() if strict else (steps <= 0).all()


# --- config validation (TRL's rules) ---


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"loss_type": ("exo_pair",), "label_smoothing": 0.0}, "exo_pair"),
        ({"loss_type": ("robust",), "label_smoothing": 0.5}, "robust"),
        ({"loss_type": ("aot",), "use_weighting": True}, "use_weighting"),
        ({"loss_type": ("aot_unpaired", "sigmoid"), "use_weighting": True}, "use_weighting"),
        ({"loss_type": ("nca_pair",), "f_divergence_type": "js_divergence"}, "f_divergence_type"),
        ({"loss_type": ("sigmoid", "apo_zero"), "f_divergence_type": "forward_kl"}, "f_divergence_type"),
        ({"loss_type": ("sigmoid", "sft"), "loss_weights": (1.0,)}, "loss_weights"),
        ({"loss_type": ("kto",)}, "loss_type"),
        ({"f_divergence_type": "hellinger"}, "f_divergence_type"),
    ],
)
def test_config_rejects_what_trl_rejects(kw, match):
    with pytest.raises(ConfigError, match=match):
        LossConfig(**kw)
