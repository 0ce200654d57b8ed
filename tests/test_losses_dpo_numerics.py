"""DPO family numerics: extreme margins against 600-digit mpmath, clamped f-divergence exponents,
empty completions, bf16 inputs, and β-DPO's carried state and data filter (Wu et al. 2024,
arXiv:2407.08639), all against the float64 reference of test_losses_dpo.py."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from _assert import assert_close
from _inputs import generator, pair_logps
from test_losses_dpo import DEFAULTS, MP, SINGLE, check, dpo_kwargs, extras, ref_losses, ref_pair, run_both

from alignops.losses import BetaDPOOptions, BetaDPOState, GPOOptions, dpo_loss

B = 7

# ================================================================ extreme margins


def _mp_mean_loss(loss_type, vals, ex, p, *, which=None, b=None, v=None):
    """mpmath value of mean_b ℓ_b; with ``which, b, v`` the input ``vals[which][b]`` is replaced by
    the mpmath number ``v`` (for mpmath.diff)."""
    total = mpmath.mpf(0)
    for i in range(len(vals[0])):
        args = [mpmath.mpf(float(x[i])) for x in vals]
        if which is not None and i == b:
            args[which] = v
        exb = {k: mpmath.mpf(float(t[i])) for k, t in ex.items()}
        total += ref_pair(MP, loss_type, *args, exb, p)
    return total / len(vals[0])


_EXTREME_TYPES = [t for t, _ in SINGLE if t not in ("sft", "aot", "aot_unpaired", "gpo")] + ["gpo"]


@pytest.mark.parametrize("loss_type", _EXTREME_TYPES)
def test_extreme_margins_finite_and_exact(loss_type):
    """|β·Δ| ~ 1e3 both ways (and |β·u| ~ 500): finite values and gradients that match 600-digit mpmath
    (enough to resolve 1 − σ(1e3) ~ e^-1000 in the literal formulas): the value, and the derivative of the
    mean loss w.r.t. each policy log-prob by mpmath.diff."""
    with mpmath.workdps(600):
        _extreme_case(loss_type)


def _extreme_case(loss_type):
    u = torch.tensor([5e3, -5e3, 4e3, -6e3])
    pc = torch.tensor([-10.0, -20.0, -3000.0, -15.0])
    pr = torch.tensor([-12.0, -25.0, -11.0, -4000.0])
    rc = pc - u  # u_w = ±5e3
    rr = pr + u  # u_l = ∓5e3  ->  βΔ = ±1e3
    nw = torch.tensor([3, 10, 4000, 5])
    nl = torch.tensor([7, 2, 6, 4000])
    ex = {
        "chosen_win_prob": torch.tensor([0.9, 0.1, 0.5, 0.7]),
        "rejected_win_prob": torch.tensor([0.2, 0.8, 0.5, 0.3]),
        "sft_target_logps": torch.tensor([-10.0, -3.0, -7.0, -1.0]),
    }
    opts = {"beta": 0.1, "label_smoothing": 0.1 if loss_type in ("robust", "cdpo") else 0.0}
    if loss_type == "exo_pair":
        opts["label_smoothing"] = 1e-3
    if loss_type == "gpo":
        opts["gpo_function"] = "truncated_quadratic"
    leaves = [pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)]
    kw = dpo_kwargs(opts, {**ex, "chosen_lengths": nw, "rejected_lengths": nl})
    out = dpo_loss(leaves[0], leaves[1], rc, rr, loss_type=loss_type, **kw)
    grads = torch.autograd.grad(out.loss, leaves)
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
    p = {**DEFAULTS, **opts}
    vals = [pc, pr, rc, rr, nw.double(), nl.double()]
    ref = _mp_mean_loss(loss_type, vals, ex, p)
    ref_t = torch.tensor(float(ref), dtype=torch.float64)
    assert_close("loss", ref_t, out.loss, atol=1e-6 * max(1.0, abs(float(ref))), rtol=1e-6)
    for which in (0, 1):
        ref_g = []
        for b in range(len(pc)):
            at = mpmath.mpf(float(vals[which][b]))
            f = lambda v, b=b, which=which: _mp_mean_loss(loss_type, vals, ex, p, which=which, b=b, v=v)  # noqa: E731
            ref_g.append(float(mpmath.diff(f, at)))
        ref_g = torch.tensor(ref_g, dtype=torch.float64)
        atol = 1e-6 * max(1.0, ref_g.abs().max().item())
        assert_close(f"d input {which}", ref_g, grads[which], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("f", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "discopop", "robust"])
def test_extreme_margins_f_divergence_finite(loss_type, f):
    """f-DPO scores grow like e^{|u|}: the exponent is clamped at 80, so values and gradients stay
    finite."""
    pc, pr, rc, rr = pair_logps(4, seed=20, scale=1.0)
    rc = rc + torch.tensor([3e3, -3e3, 200.0, -200.0])
    rr = rr + torch.tensor([-3e3, 3e3, -200.0, 200.0])
    leaves = [pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)]
    out = dpo_loss(
        leaves[0], leaves[1], rc, rr, loss_type=loss_type, f_divergence_type=f, label_smoothing=0.1
    )
    grads = torch.autograd.grad(out.loss, leaves)
    assert torch.isfinite(out.losses).all() and all(torch.isfinite(g).all() for g in grads)


def test_exponential_gpo_clamp_value():
    """The clamp value itself, on the exponential GPO: exp(min(-x, 80))."""
    x = torch.tensor([-1e3, 0.5])
    z = torch.zeros(2)
    o = dpo_loss(x / 0.1, z, z, z, loss_type="gpo", gpo=GPOOptions("exponential"))
    want = torch.tensor([math.exp(80.0), math.exp(-0.5)], dtype=torch.float64)
    assert_close("gpo exp clamp", want, o.losses, atol=0.0, rtol=1e-6)


@pytest.mark.parametrize(
    "loss_type", ["sigmoid", "ipo", "sigmoid_norm", "rdpo", "apo_zero", "bco_pair", "aot"]
)
def test_zero_length_completions(loss_type):
    """Pairs whose chosen or rejected completion is empty (n = 0, S = 0, e.g. truncated away): finite,
    lengths clamp to 1, equal to the reference."""
    pc, pr, rc, rr = pair_logps(B, seed=21)
    ex = extras()
    for i in (1, 4):
        pc[i] = rc[i] = 0.0
        ex["chosen_lengths"][i] = 0
    pr[5] = rr[5] = 0.0
    ex["rejected_lengths"][5] = 0
    check(*run_both([loss_type], None, {}, pc=pc, pr=pr, rc=rc, rr=rr, extras=ex))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "discopop", "aot", "apo_down"])
def test_bf16_inputs(loss_type):
    """bf16 log-probs are upcast: the float32 loss equals the float64 reference on the same bf16 values;
    gradients come back in bf16 (one bf16 rounding of the float32 gradient)."""
    pc, pr, rc, rr = pair_logps(B, seed=22, dtype=torch.bfloat16)
    ex = extras()
    nw, nl = ex["chosen_lengths"], ex["rejected_lengths"]
    lp = [pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)]
    out = dpo_loss(*lp, rc, rr, loss_type=loss_type, chosen_lengths=nw, rejected_lengths=nl)
    assert out.loss.dtype == torch.float32
    ref_leaves = [x.detach().double().requires_grad_(True) for x in lp]
    ref_l, ref_loss = ref_losses(
        [loss_type], [1.0], *ref_leaves, rc.double(), rr.double(), nw.double(), nl.double(), {}, DEFAULTS
    )
    assert_close("loss", ref_loss, out.loss, atol=1e-6 * max(1.0, abs(ref_loss.item())), rtol=1e-6)
    g = torch.randn(B, generator=generator(23))
    grads = torch.autograd.grad((out.losses * g).sum(), lp)
    grads_ref = torch.autograd.grad((ref_l * g.double()).sum(), ref_leaves)
    for gr, go in zip(grads_ref, grads):
        assert go.dtype == torch.bfloat16
        assert_close("d bf16", gr, go, atol=1e-6, rtol=2**-8)


# ================================================================ β-DPO


def _ref_beta_dpo_step(delta, state, beta, alpha, keep):
    """EMA update (γ = 0.9, Bessel std) before the loss, β_batch from the kept gaps, masked mean."""
    m = delta.detach()
    mean = 0.9 * state[0] + 0.1 * m.mean()
    std = 0.9 * state[1] + 0.1 * m.std()
    beta_b = max(beta * (1 + alpha * (m[keep].mean() - mean)).item(), 1e-3)
    ell = -torch.log(1 / (1 + torch.exp(-beta_b * delta)))  # -log σ(β_b Δ)
    return (ell * keep).sum() / keep.sum(), (mean, std), beta_b


def test_beta_dpo_keep_all_two_steps():
    """ρ = 0 keeps every pair, so the step is deterministic: EMA, dynamic β and loss against the reference,
    over two steps so the carried state matters."""
    state = BetaDPOState()
    ref_state = (torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    for step in range(2):
        pc, pr, rc, rr = pair_logps(B, seed=30 + step)
        leaf = pc.clone().requires_grad_(True)
        opts = BetaDPOOptions(state, alpha=0.6, rho=0.0)
        out = dpo_loss(leaf, pr, rc, rr, loss_type="beta_dpo", beta=0.2, beta_dpo=opts)
        leaf_ref = pc.double().requires_grad_(True)
        delta = (leaf_ref - rc.double()) - (pr.double() - rr.double())
        keep = torch.ones(B, dtype=torch.bool)
        ref_loss, ref_state, beta_b = _ref_beta_dpo_step(delta, ref_state, 0.2, 0.6, keep)
        assert_close(f"loss step {step}", ref_loss, out.loss, atol=1e-6, rtol=1e-6)
        beta_t = torch.tensor(beta_b, dtype=torch.float64)
        assert_close("beta", beta_t, out.metrics["beta_dpo/beta"], atol=1e-6)
        assert_close("gap_mean", ref_state[0], state.gap_mean, atol=1e-5, rtol=1e-6)
        assert_close("gap_std", ref_state[1], state.gap_std, atol=1e-5, rtol=1e-6)
        (g,) = torch.autograd.grad(out.loss, leaf)
        (g_ref,) = torch.autograd.grad(ref_loss, leaf_ref)  # β_batch is a constant (detached)
        assert_close("d policy_chosen", g_ref, g, atol=1e-7, rtol=1e-5)


def test_beta_dpo_filter():
    """ρ = 0.25 of B = 8 keeps ⌊8 · 0.75⌋ = 6 pairs drawn ∝ exp(-z²/2): the loss is the masked mean over the
    returned mask, a far outlier is never kept, and a seeded generator reproduces the draw."""
    b = 8
    pc, pr, rc, rr = pair_logps(b, seed=32)
    rc[3] = pc[3] - 400.0  # Δ of pair 3 is ~400 while the others are O(10): z ≈ 1e2 -> weight ~0
    masks = []
    for seed in range(20):
        opts = BetaDPOOptions(BetaDPOState(), alpha=0.3, rho=0.25, generator=generator(seed % 10))
        out = dpo_loss(pc, pr, rc, rr, loss_type="beta_dpo", beta_dpo=opts)
        keep = out.metrics["beta_dpo/mask"]
        assert int(keep.sum()) == 6 and not bool(keep[3])
        delta = (pc.double() - rc.double()) - (pr.double() - rr.double())
        zero = (torch.tensor(0.0, dtype=torch.float64),) * 2
        ref_loss, _, _ = _ref_beta_dpo_step(delta, zero, 0.1, 0.3, keep)
        assert_close("masked loss", ref_loss, out.loss, atol=1e-6, rtol=1e-6)
        masks.append(keep)
    for i in range(10):
        assert torch.equal(masks[i], masks[i + 10])


def test_beta_dpo_bad_rho():
    pc, pr, rc, rr = pair_logps(B, seed=33)
    with pytest.raises(ValueError, match="rho"):
        dpo_loss(pc, pr, rc, rr, loss_type="beta_dpo", beta_dpo=BetaDPOOptions(BetaDPOState(), rho=1.0))
