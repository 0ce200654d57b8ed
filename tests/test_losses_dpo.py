"""DPO family (SPEC §6) against (1) a reference written from SPEC's formulas in this file, literally
(``-log(sigmoid(x))``, ``exp``, ``max``; no stable rewrites), evaluated with torch float64 autograd at
moderate margins and with mpmath at extreme ones, and (2) TRL 1.16 ``DPOTrainer._compute_loss`` itself,
run on the same random per-token log-probs through a stub model (no download). Gradients use random upstream
gradients; sizes are awkward (B = 7, odd T)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import mpmath
import pytest
import torch
from _assert import assert_close

from alignops.losses import DPO_LOSS_TYPES, BetaDPOState, dpo_loss
from alignops.sequence import (
    ld_dpo_logps,
    reduce_padded,
    sequence_logprobs,
    split_pair,
    wpo_log_weights,
)

B = 7  # odd batch of pairs

# ================================================================ float64 reference from SPEC §6


class _Torch64:
    """Number system for the reference: float64 torch tensors (elementwise over the batch)."""

    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)

    @staticmethod
    def sig(x):
        return 1.0 / (1.0 + torch.exp(-x))

    @staticmethod
    def relu(x):
        return torch.clamp(x, min=0.0)

    @staticmethod
    def at_least_1(n):
        return torch.clamp(n, min=1.0)


class _MP:
    """The same formulas in mpmath scalars (for margins where float64 over/underflows)."""

    exp = staticmethod(mpmath.exp)
    log = staticmethod(mpmath.log)

    @staticmethod
    def sig(x):
        return 1 / (1 + mpmath.exp(-x))

    @staticmethod
    def relu(x):
        return max(mpmath.mpf(0), x)

    @staticmethod
    def at_least_1(n):
        return max(mpmath.mpf(1), n)


def _score(m, u, p):
    """f-DPO score s(u) = f'(e^u) (SPEC §6.12)."""
    f = p["f_divergence_type"]
    if f == "reverse_kl":
        return u
    if f == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - m.exp(-u)
    if f == "js_divergence":  # f'(t) = log(2t / (1 + t))
        t = m.exp(u)
        return m.log(2 * t / (1 + t))
    a = p["f_alpha_divergence_coef"]  # TRL 1.16 convention (t^(α-1) - 1) / (α - 1)
    if a == 1.0:
        return u
    return (m.exp((a - 1) * u) - 1) / (a - 1)


def _gpo_f(m, name, x):
    """SPEC §6.6 convex functions."""
    return {
        "logistic": lambda: m.log(1 + m.exp(-x)),
        "hinge": lambda: m.relu(1 - x),
        "squared": lambda: (x - 1) ** 2,
        "exponential": lambda: m.exp(-x),
        "truncated_quadratic": lambda: m.relu(1 - x) ** 2,
        "savage": lambda: 1 / (1 + m.exp(x)) ** 2,
    }[name]()


def _ref_pair(m, t, pc, pr, rc, rr, nw, nl, ex, p):
    """ℓ for one pair type (SPEC §6), elementwise. `ex` holds per-pair extras."""
    beta, eps = p["beta"], p["label_smoothing"]
    uw, ul = pc - rc, pr - rr
    sw, sl = _score(m, uw, p), _score(m, ul, p)
    x = beta * (sw - sl)
    nll = lambda z: -m.log(m.sig(z))  # noqa: E731  -log σ(z)
    if t == "sigmoid":
        return nll(x)
    if t == "cdpo":
        return (1 - eps) * nll(x) + eps * nll(-x)
    if t == "robust":
        return ((1 - eps) * nll(x) - eps * nll(-x)) / (1 - 2 * eps)
    if t == "ipo":
        return (sw / m.at_least_1(nw) - sl / m.at_least_1(nl) - 1 / (2 * beta)) ** 2
    if t == "hinge":
        return m.relu(1 - x)
    if t == "slic":
        return m.relu(p["slic_delta"] - pc + pr) - p["slic_lambda"] * ex["sft_target_logps"]
    if t == "gpo":
        return _gpo_f(m, p["gpo_function"], x)
    if t == "dpop":
        return nll(beta * ((uw - ul) - p["dpop_lambda"] * m.relu(rc - pc)))
    if t == "rdpo":
        return nll(x + p["rdpo_alpha"] * (nw - nl))
    if t == "sigmoid_norm":
        return nll(beta * (sw / m.at_least_1(nw) - sl / m.at_least_1(nl)))
    if t == "exo_pair":
        q = m.sig(x)
        return q * (m.log(q) - math.log(1 - eps)) + (1 - q) * (m.log(1 - q) - math.log(eps))
    if t == "nca_pair":
        return nll(beta * uw) - 0.5 * m.log(m.sig(-beta * uw)) - 0.5 * m.log(m.sig(-beta * ul))
    if t == "bco_pair":
        return nll(beta * uw) + nll(-beta * ul)
    if t == "apo_zero":
        return m.sig(-beta * uw) + m.sig(beta * ul)
    if t == "apo_down":
        return m.sig(beta * uw) + m.sig(-beta * (uw - ul))
    if t == "sppo_hard":
        return (uw - 1 / (2 * beta)) ** 2 + (ul + 1 / (2 * beta)) ** 2
    if t == "sppo_soft":
        return (uw - (ex["chosen_win_prob"] - 0.5) / beta) ** 2 + (
            ul - (ex["rejected_win_prob"] - 0.5) / beta
        ) ** 2
    if t == "discopop":
        w = m.sig(x / p["discopop_tau"])
        return (1 - w) * m.log(1 + m.exp(-x)) + w * m.exp(-x)
    raise KeyError(t)


def _ref_losses_torch(types, weights, pc, pr, rc, rr, nw, nl, ex, p):
    """Per-pair Σ_k w_k ℓ_k (times the WPO weight) and the loss Σ_k w_k mean_b ℓ_k, float64 torch."""
    m = _Torch64
    total = None
    loss = 0.0
    for t, w in zip(types, weights):
        if t == "sft":
            ell = ex["chosen_nll"].expand(pc.shape[0]) if ex["chosen_nll"].dim() == 0 else ex["chosen_nll"]
        elif t in ("aot", "aot_unpaired"):
            if t == "aot":
                d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
            else:
                d = torch.sort(pc - rc).values - torch.sort(pr - rr).values
            z = p["beta"] * d
            ell = -(1 - p["label_smoothing"]) * m.log(m.sig(z)) - p["label_smoothing"] * m.log(m.sig(-z))
        else:
            ell = _ref_pair(m, t, pc, pr, rc, rr, nw, nl, ex, p)
        if "wpo_w" in ex:  # SPEC §6.13, TRL 1.16: exp(w̄_w) · exp(w̄_l), no clamp
            ell = ell * torch.exp(ex["wpo_w"]) * torch.exp(ex["wpo_l"])
        total = w * ell if total is None else total + w * ell
        loss = loss + w * ell.mean()
    return total, loss


_DEFAULTS = dict(
    beta=0.1,
    label_smoothing=0.0,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
    dpop_lambda=50.0,
    rdpo_alpha=0.01,
    slic_delta=1.0,
    slic_lambda=0.1,
    gpo_function="logistic",
)


def _pairs(scale=8.0, *, dtype=torch.float32, b=B):
    """Random summed log-probs: policy leaves (float32) and reference values, u's of a few units."""
    pc = -torch.rand(b) * 40 - 5
    pr = -torch.rand(b) * 40 - 5
    rc = pc + torch.randn(b) * scale
    rr = pr + torch.randn(b) * scale
    return [x.to(dtype) for x in (pc, pr, rc, rr)]


def _extras(b=B):
    return {
        "chosen_lengths": torch.randint(0, 25, (b,)),  # includes 0 (empty completion) sometimes
        "rejected_lengths": torch.randint(0, 25, (b,)),
        "chosen_nll": torch.rand(()) * 3,
        "sft_target_logps": -torch.rand(b) * 30,
        "chosen_win_prob": torch.rand(b),
        "rejected_win_prob": torch.rand(b),
    }


def _run_both(types, weights, opts, *, pc, pr, rc, rr, extras, use_weighting=False, wpo=None):
    """Our loss (float32 leaves) and the float64 reference; returns values and grads of Σ g·losses."""
    leaves = [pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)]
    ex_t = {
        k: v.clone().float().requires_grad_(k in ("chosen_nll", "sft_target_logps"))
        for k, v in extras.items()
    }
    ex_t["chosen_lengths"] = extras["chosen_lengths"]
    ex_t["rejected_lengths"] = extras["rejected_lengths"]
    kw = dict(opts)
    if use_weighting:
        kw.update(use_weighting=True, chosen_wpo_logw=wpo[0], rejected_wpo_logw=wpo[1])
    out = dpo_loss(leaves[0], leaves[1], rc, rr, loss_type=types, loss_weights=weights, **kw, **ex_t)

    p = {**_DEFAULTS, **opts}
    ref_leaves = [x.detach().double().requires_grad_(True) for x in leaves]
    ex_r = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in ex_t.items()}
    if use_weighting:
        ex_r["wpo_w"], ex_r["wpo_l"] = wpo[0].double(), wpo[1].double()
    ref_losses, ref_loss = _ref_losses_torch(
        types,
        weights or [1.0] * len(types),
        ref_leaves[0],
        ref_leaves[1],
        rc.double(),
        rr.double(),
        ex_r["chosen_lengths"],
        ex_r["rejected_lengths"],
        ex_r,
        p,
    )
    g = torch.randn(pc.shape[0])
    wrt = leaves + [ex_t[k] for k in ("chosen_nll", "sft_target_logps")]
    wrt_ref = ref_leaves + [ex_r[k] for k in ("chosen_nll", "sft_target_logps")]
    grads = torch.autograd.grad((out.losses * g).sum(), wrt, allow_unused=True)
    grads_ref = torch.autograd.grad((ref_losses * g.double()).sum(), wrt_ref, allow_unused=True)
    return out, ref_losses, ref_loss, grads, grads_ref


def _check(out, ref_losses, ref_loss, grads, grads_ref, *, rtol=2e-6):
    scale = max(1.0, ref_losses.abs().max().item())
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert_close("loss", ref_loss, out.loss, atol=1e-6 * scale, rtol=rtol)
    assert_close("losses", ref_losses, out.losses, atol=1e-6 * scale, rtol=rtol)
    assert_close("loss == mean(losses)", out.losses.double().mean(), out.loss, atol=1e-6 * scale)
    for name, gr, go in zip(
        ("d policy_chosen", "d policy_rejected", "d chosen_nll", "d sft_target"), grads_ref, grads
    ):
        if gr is None:
            assert go is None or bool((go == 0).all()), name
            continue
        gscale = max(1.0, gr.abs().max().item())
        assert_close(name, gr, go, atol=2e-6 * gscale, rtol=5e-5)


# every single type of SPEC §6 (beta_dpo has its own tests); options chosen so each term is non-trivial
_SINGLE = [
    ("sigmoid", {}),
    ("cdpo", {"label_smoothing": 0.2}),
    ("robust", {"label_smoothing": 0.15}),
    ("ipo", {}),
    ("hinge", {"beta": 0.3}),
    ("slic", {"slic_delta": 4.0, "slic_lambda": 0.3}),
    ("dpop", {"dpop_lambda": 5.0}),
    ("rdpo", {"rdpo_alpha": 0.05}),
    ("sigmoid_norm", {"beta": 2.0}),
    ("sft", {}),
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("nca_pair", {}),
    ("bco_pair", {}),
    ("aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", {"label_smoothing": 0.0}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("sppo_hard", {}),
    ("sppo_soft", {}),
    ("discopop", {"beta": 0.2}),
] + [
    ("gpo", {"gpo_function": f, "beta": 0.2})
    for f in ("logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage")
]


def test_every_type_is_covered():
    covered = {t for t, _ in _SINGLE} | {"beta_dpo"}
    assert covered == set(DPO_LOSS_TYPES)


@pytest.mark.parametrize(
    "loss_type, opts", _SINGLE, ids=[t + (f"-{o['gpo_function']}" if t == "gpo" else "") for t, o in _SINGLE]
)
def test_single_type_vs_spec_float64(loss_type, opts):
    pc, pr, rc, rr = _pairs()
    _check(*_run_both([loss_type], None, opts, pc=pc, pr=pr, rc=rc, rr=rr, extras=_extras()))


# f-DPO (SPEC §6.12) with every divergence on the types that allow it
_F_CASES = [
    ("sigmoid", "forward_kl", 0.5),
    ("sigmoid", "js_divergence", 0.5),
    ("sigmoid", "alpha_divergence", 0.5),
    ("sigmoid", "alpha_divergence", 0.3),
    ("sigmoid", "alpha_divergence", 1.0),  # α → 1 is reverse KL
    ("ipo", "forward_kl", 0.5),
    ("sigmoid_norm", "js_divergence", 0.5),
    ("hinge", "alpha_divergence", 0.7),
    ("robust", "js_divergence", 0.5),
    ("exo_pair", "forward_kl", 0.5),
    ("discopop", "alpha_divergence", 0.5),
    ("cdpo", "forward_kl", 0.5),
    ("rdpo", "js_divergence", 0.5),
    ("gpo", "alpha_divergence", 0.25),
]


@pytest.mark.parametrize("loss_type, f, alpha", _F_CASES, ids=[f"{t}-{f}-{a}" for t, f, a in _F_CASES])
def test_f_divergence_vs_spec_float64(loss_type, f, alpha):
    opts = {"f_divergence_type": f, "f_alpha_divergence_coef": alpha, "beta": 0.5}
    if loss_type in ("robust", "exo_pair", "cdpo"):
        opts["label_smoothing"] = 0.05
    if loss_type == "gpo":
        opts["gpo_function"] = "savage"
    pc, pr, rc, rr = _pairs(scale=2.0)  # keeps e^{±u} moderate
    _check(*_run_both([loss_type], None, opts, pc=pc, pr=pr, rc=rc, rr=rr, extras=_extras()))


@pytest.mark.parametrize(
    "types, weights, use_weighting",
    [
        pytest.param(["sigmoid", "sft"], [1.0, 0.7], False, id="rpo"),
        pytest.param(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], False, id="mpo"),
        pytest.param(["ipo", "nca_pair", "apo_down"], None, False, id="three-default-weights"),
        pytest.param(["sigmoid"], None, True, id="wpo-sigmoid"),
        pytest.param(["robust", "sft"], [1.0, 0.5], True, id="wpo-robust-sft"),
    ],
)
def test_combinations_and_wpo_vs_spec_float64(types, weights, use_weighting):
    pc, pr, rc, rr = _pairs()
    wpo = (-torch.rand(B) * 2, -torch.rand(B) * 2) if use_weighting else None
    opts = {"label_smoothing": 0.1} if "robust" in types else {}
    _check(
        *_run_both(
            types,
            weights,
            opts,
            pc=pc,
            pr=pr,
            rc=rc,
            rr=rr,
            extras=_extras(),
            use_weighting=use_weighting,
            wpo=wpo,
        )
    )


def test_sft_term_per_pair_nll():
    """A [B] chosen_nll is used per pair (e.g. Pang et al.'s length-normalised NLL)."""
    pc, pr, rc, rr = _pairs()
    ex = _extras()
    ex["chosen_nll"] = torch.rand(B) * 2
    _check(*_run_both(["sigmoid", "sft"], [1.0, 1.0], {}, pc=pc, pr=pr, rc=rc, rr=rr, extras=ex))


def test_metrics_follow_trl_names():
    pc, pr, rc, rr = _pairs()
    beta = 0.25
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="dpop")
    rw, rl = beta * (pc.double() - rc.double()), beta * (pr.double() - rr.double())
    expect = {
        "rewards/chosen": rw.mean(),
        "rewards/rejected": rl.mean(),
        "rewards/margins": (rw - rl).mean(),
        "rewards/accuracies": (rw > rl).double().mean(),
        "logps/chosen": pc.double().mean(),
        "logps/rejected": pr.double().mean(),
    }
    assert set(out.metrics) == set(expect)
    for k, v in expect.items():
        assert_close(k, v, out.metrics[k], atol=1e-5)
        assert not out.metrics[k].requires_grad


def test_reference_logps_are_constants():
    """S_ref is detached (SPEC §6: no grad through the reference), even if the caller's tensor has a graph."""
    pc, pr, rc, rr = _pairs()
    rc, rr = rc.clone().requires_grad_(True), rr.clone().requires_grad_(True)
    leaf = pc.clone().requires_grad_(True)
    dpo_loss(
        leaf,
        pr,
        rc,
        rr,
        loss_type=["sigmoid", "ipo"],
        chosen_lengths=torch.ones(B),
        rejected_lengths=torch.ones(B),
    ).loss.backward()
    assert rc.grad is None and rr.grad is None and leaf.grad is not None


def test_reference_free_slic():
    """SLiC-HF uses no reference model: refs may be None (S_ref ≡ 0)."""
    pc, pr, _, _ = _pairs()
    sft = -torch.rand(B) * 20
    out = dpo_loss(
        pc, pr, None, None, loss_type="slic", slic_delta=5.0, slic_lambda=0.2, sft_target_logps=sft
    )
    ref = torch.clamp(5.0 - pc.double() + pr.double(), min=0) - 0.2 * sft.double()
    assert_close("slic", ref.mean(), out.loss, atol=1e-5)
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        dpo_loss(pc, pr, None, None, loss_type="sigmoid")


# ================================================================ extreme margins, empty completions, bf16


def _mp_loss(types, pc, pr, rc, rr, nw, nl, ex, p):
    """mpmath value of mean_b Σ_k ℓ_k for per-pair types."""
    total = mpmath.mpf(0)
    for b in range(len(pc)):
        exb = {k: mpmath.mpf(float(v[b])) for k, v in ex.items()}
        for t in types:
            total += _ref_pair(_MP, t, *(mpmath.mpf(float(v[b])) for v in (pc, pr, rc, rr, nw, nl)), exb, p)
    return total / len(pc)


_EXTREME_TYPES = [t for t, _ in _SINGLE if t not in ("sft", "aot", "aot_unpaired", "gpo")] + ["gpo"]


@pytest.mark.parametrize("loss_type", _EXTREME_TYPES)
def test_extreme_margins_finite_and_exact(loss_type):
    """|β·Δ| ~ 1e3 both ways (and |β·u| ~ 500): finite values and gradients that match 600-digit mpmath
    (enough to resolve 1 − σ(1e3) ~ e^-1000 in the literal formulas): the value, and the derivative of the
    mean loss w.r.t. each policy log-prob by mpmath.diff."""
    with mpmath.workdps(600):
        _extreme_case(loss_type)


def _extreme_case(loss_type):
    beta = 0.1
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
    opts = {"beta": beta, "label_smoothing": 0.1 if loss_type in ("robust", "cdpo") else 0.0}
    if loss_type == "exo_pair":
        opts["label_smoothing"] = 1e-3
    if loss_type == "gpo":
        opts["gpo_function"] = "truncated_quadratic"
    leaves = [pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)]
    out = dpo_loss(
        leaves[0],
        leaves[1],
        rc,
        rr,
        loss_type=loss_type,
        chosen_lengths=nw,
        rejected_lengths=nl,
        **opts,
        **ex,
    )
    grads = torch.autograd.grad(out.loss, leaves)
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
    p = {**_DEFAULTS, **opts}
    vals = [pc, pr, rc, rr, nw.double(), nl.double()]
    ref = _mp_loss([loss_type], *vals, ex, p)
    assert_close(
        "loss",
        torch.tensor(float(ref), dtype=torch.float64),
        out.loss,
        atol=1e-6 * max(1.0, abs(float(ref))),
        rtol=1e-6,
    )
    for which in (0, 1):
        ref_g = []
        for b in range(len(pc)):

            def f(v, b=b, which=which):
                vv = [x.double().clone() for x in vals]
                shifted = [mpmath.mpf(float(x)) for x in vv[which]]
                shifted[b] = v
                tot = mpmath.mpf(0)
                for i in range(len(pc)):
                    args = [mpmath.mpf(float(x[i])) for x in vv]
                    args[which] = shifted[i]
                    exb = {k: mpmath.mpf(float(t[i])) for k, t in ex.items()}
                    tot += _ref_pair(_MP, loss_type, *args, exb, p)
                return tot / len(pc)

            ref_g.append(float(mpmath.diff(f, mpmath.mpf(float(vals[which][b])))))
        ref_g = torch.tensor(ref_g, dtype=torch.float64)
        assert_close(
            f"d input {which}", ref_g, grads[which], atol=1e-6 * max(1.0, ref_g.abs().max().item()), rtol=1e-5
        )


@pytest.mark.parametrize("f", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "discopop", "robust"])
def test_extreme_margins_f_divergence_finite(loss_type, f):
    """f-DPO scores grow like e^{|u|}: the exponent is clamped at 80 (SPEC §1.5 / §6.12), so values and
    gradients stay finite; where nothing is clamped the value equals the float64 reference."""
    pc, pr, rc, rr = _pairs(scale=1.0, b=4)
    rc = rc + torch.tensor([3e3, -3e3, 200.0, -200.0])
    rr = rr + torch.tensor([-3e3, 3e3, -200.0, 200.0])
    leaves = [pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)]
    out = dpo_loss(
        leaves[0], leaves[1], rc, rr, loss_type=loss_type, f_divergence_type=f, label_smoothing=0.1
    )
    grads = torch.autograd.grad(out.loss, leaves)
    assert torch.isfinite(out.losses).all() and all(torch.isfinite(g).all() for g in grads)
    # the clamp value itself, on the exponential GPO: exp(min(-x, 80))
    x = torch.tensor([-1e3, 0.5])
    o = dpo_loss(
        x / 0.1, torch.zeros(2), torch.zeros(2), torch.zeros(2), loss_type="gpo", gpo_function="exponential"
    )
    assert_close(
        "gpo exp clamp",
        torch.tensor([math.exp(80.0), math.exp(-0.5)], dtype=torch.float64),
        o.losses,
        atol=0.0,
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "loss_type", ["sigmoid", "ipo", "sigmoid_norm", "rdpo", "apo_zero", "bco_pair", "aot"]
)
def test_zero_length_completions(loss_type):
    """Pairs whose chosen or rejected completion is empty (n = 0, S = 0, e.g. truncated away): finite,
    lengths clamp to 1 (SPEC §1.2 / §3.2), equal to the reference."""
    pc, pr, rc, rr = _pairs()
    ex = _extras()
    for i in (1, 4):
        pc[i] = rc[i] = 0.0
        ex["chosen_lengths"][i] = 0
    pr[5] = rr[5] = 0.0
    ex["rejected_lengths"][5] = 0
    _check(*_run_both([loss_type], None, {}, pc=pc, pr=pr, rc=rc, rr=rr, extras=ex))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "discopop", "aot", "apo_down"])
def test_bf16_inputs(loss_type):
    """bf16 log-probs are upcast: the float32 loss equals the float64 reference on the same bf16 values;
    gradients come back in bf16 (one bf16 rounding of the float32 gradient)."""
    pc, pr, rc, rr = _pairs(dtype=torch.bfloat16)
    ex = _extras()
    lp = [pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)]
    out = dpo_loss(
        lp[0],
        lp[1],
        rc,
        rr,
        loss_type=loss_type,
        chosen_lengths=ex["chosen_lengths"],
        rejected_lengths=ex["rejected_lengths"],
    )
    assert out.loss.dtype == torch.float32
    ref_leaves = [x.detach().double().requires_grad_(True) for x in lp]
    ref_losses, ref_loss = _ref_losses_torch(
        [loss_type],
        [1.0],
        ref_leaves[0],
        ref_leaves[1],
        rc.double(),
        rr.double(),
        ex["chosen_lengths"].double(),
        ex["rejected_lengths"].double(),
        {},
        _DEFAULTS,
    )
    assert_close("loss", ref_loss, out.loss, atol=1e-6 * max(1.0, abs(ref_loss.item())), rtol=1e-6)
    g = torch.randn(B)
    grads = torch.autograd.grad((out.losses * g).sum(), lp)
    grads_ref = torch.autograd.grad((ref_losses * g.double()).sum(), ref_leaves)
    for gr, go in zip(grads_ref, grads):
        assert go.dtype == torch.bfloat16
        assert_close("d bf16", gr, go, atol=1e-6, rtol=2**-8)


# ================================================================ β-DPO (SPEC §6.8)


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
        pc, pr, rc, rr = _pairs()
        leaf = pc.clone().requires_grad_(True)
        out = dpo_loss(
            leaf,
            pr,
            rc,
            rr,
            loss_type="beta_dpo",
            beta=0.2,
            beta_dpo_state=state,
            beta_dpo_alpha=0.6,
            beta_dpo_rho=0.0,
        )
        leaf_ref = pc.double().requires_grad_(True)
        delta = (leaf_ref - rc.double()) - (pr.double() - rr.double())
        keep = torch.ones(B, dtype=torch.bool)
        ref_loss, ref_state, beta_b = _ref_beta_dpo_step(delta, ref_state, 0.2, 0.6, keep)
        assert_close(f"loss step {step}", ref_loss, out.loss, atol=1e-6, rtol=1e-6)
        assert_close(
            "beta", torch.tensor(beta_b, dtype=torch.float64), out.metrics["beta_dpo/beta"], atol=1e-6
        )
        assert_close("gap_mean", ref_state[0], state.gap_mean, atol=1e-5, rtol=1e-6)
        assert_close("gap_std", ref_state[1], state.gap_std, atol=1e-5, rtol=1e-6)
        (g,) = torch.autograd.grad(out.loss, leaf)
        (g_ref,) = torch.autograd.grad(ref_loss, leaf_ref)  # β_batch is a constant (detached)
        assert_close("d policy_chosen", g_ref, g, atol=1e-7, rtol=1e-5)


def test_beta_dpo_filter():
    """ρ = 0.25 of B = 8 keeps ⌊8 · 0.75⌋ = 6 pairs drawn ∝ exp(-z²/2): the loss is the masked mean over the
    returned mask, a far outlier is never kept, and a seeded generator reproduces the draw."""
    b = 8
    pc, pr, rc, rr = _pairs(b=b)
    rc[3] = pc[3] - 400.0  # Δ of pair 3 is ~400 while the others are O(10): z ≈ 1e2 -> weight ~0
    masks = []
    for seed in range(20):
        state = BetaDPOState()
        gen = torch.Generator().manual_seed(seed % 10)
        out = dpo_loss(
            pc,
            pr,
            rc,
            rr,
            loss_type="beta_dpo",
            beta_dpo_state=state,
            beta_dpo_alpha=0.3,
            beta_dpo_rho=0.25,
            generator=gen,
        )
        keep = out.metrics["beta_dpo/mask"]
        assert int(keep.sum()) == 6 and not bool(keep[3])
        delta = (pc.double() - rc.double()) - (pr.double() - rr.double())
        zero = (torch.tensor(0.0, dtype=torch.float64),) * 2
        ref_loss, _, _ = _ref_beta_dpo_step(delta, zero, 0.1, 0.3, keep)
        assert_close("masked loss", ref_loss, out.loss, atol=1e-6, rtol=1e-6)
        masks.append(keep)
    for i in range(10):
        assert torch.equal(masks[i], masks[i + 10])


# ================================================================ input validation


def test_input_errors():
    pc, pr, rc, rr = _pairs()
    with pytest.raises(ValueError, match="NaN"):
        dpo_loss(pc.clone().index_fill_(0, torch.tensor([2]), float("nan")), pr, rc, rr)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        dpo_loss(pc, pr[:-1], rc, rr)
    with pytest.raises(ValueError, match="must be \\[B\\]"):
        dpo_loss(pc[None], pr[None], rc[None], rr[None])
    with pytest.raises(ValueError, match="valid choices.*'sigmoid'"):
        dpo_loss(pc, pr, rc, rr, loss_type="sigmod")
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_loss(
            pc, pr, rc, rr, loss_type=["sigmoid", "sft"], loss_weights=[1.0], chosen_nll=torch.tensor(1.0)
        )
    for t, need in [
        ("ipo", "chosen_lengths"),
        ("sigmoid_norm", "chosen_lengths"),
        ("rdpo", "chosen_lengths"),
        ("sft", "chosen_nll"),
        ("sppo_soft", "chosen_win_prob"),
        ("slic", "sft_target_logps"),
        ("beta_dpo", "beta_dpo_state"),
    ]:
        with pytest.raises(ValueError, match=need):
            dpo_loss(pc, pr, rc, rr, loss_type=t)
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(pc, pr, rc, rr, loss_type="exo_pair")  # TRL 1.16: ε = 0 is an error
    with pytest.raises(ValueError, match="0.5"):
        dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="only valid"):
        dpo_loss(pc, pr, rc, rr, loss_type="nca_pair", f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="valid choices"):
        dpo_loss(pc, pr, rc, rr, f_divergence_type="kl")
    with pytest.raises(ValueError, match="aot"):
        dpo_loss(
            pc, pr, rc, rr, loss_type="aot", use_weighting=True, chosen_wpo_logw=pc, rejected_wpo_logw=pr
        )
    with pytest.raises(ValueError, match="use_weighting=False"):
        dpo_loss(pc, pr, rc, rr, chosen_wpo_logw=pc, rejected_wpo_logw=pr)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="gpo_function"):
        dpo_loss(pc, pr, rc, rr, loss_type="gpo", gpo_function="cubic")


# ================================================================ TRL 1.16 DPOTrainer on the same inputs


class _StubLM:
    """Stands in for a TRL-patched causal LM: `model(..., fused_lm_head=True)` returns given per-token
    log-probs ([2B, T-1], zero where the label is -100, as the fused head does)."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, log_probs, log_sum_sq_probs=None):
        self.log_probs = log_probs
        self.log_sum_sq_probs = log_sum_sq_probs

    def __call__(self, **kwargs):
        assert kwargs["fused_lm_head"]
        z = torch.zeros_like(self.log_probs.detach())
        return SimpleNamespace(
            log_probs=self.log_probs,
            entropy=z,
            mean_logits=z,
            is_top1=z.bool(),
            log_sum_sq_probs=self.log_sum_sq_probs,
            aux_loss=None,
        )


class _NoAccelerator:
    device = torch.device("cpu")

    def gather(self, t):
        return t

    def gather_for_metrics(self, t):
        return t

    def unwrap_model(self, m):
        return m


def _trl_dpo(
    per_token,
    ref_per_token,
    completion_mask,
    *,
    loss_types,
    loss_weights=None,
    beta=0.1,
    label_smoothing=0.0,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    ld_alpha=None,
    use_weighting=False,
    log_sum_sq_probs=None,
    discopop_tau=0.05,
):
    """TRL 1.16 `DPOTrainer._compute_loss`, unbound, on a stub `self` holding the config fields."""
    from trl.trainer.dpo_trainer import DPOTrainer

    stub = SimpleNamespace(
        model=_StubLM(per_token, log_sum_sq_probs),
        ref_model=_StubLM(ref_per_token),
        accelerator=_NoAccelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        loss_types=list(loss_types),
        loss_weights=list(loss_weights) if loss_weights else [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        ld_alpha=ld_alpha,
        use_weighting=use_weighting,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    n, t = completion_mask.shape
    inputs = {
        "input_ids": torch.randint(0, 50, (n, t)),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "completion_mask": completion_mask,
    }
    loss = DPOTrainer._compute_loss(stub, stub.model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


_TRL_CASES = [
    pytest.param([t], {"label_smoothing": 0.1 if t in ("robust", "aot", "exo_pair") else 0.0}, id=t)
    for t in (
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sigmoid_norm",
    )
]
_TRL_CASES += [
    pytest.param(["sigmoid", "sft"], {"loss_weights": [1.0, 0.6]}, id="rpo"),
    pytest.param(["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]}, id="mpo"),
    pytest.param(["sigmoid"], {"f_divergence_type": "forward_kl"}, id="fkl-sigmoid"),
    pytest.param(["sigmoid"], {"f_divergence_type": "js_divergence"}, id="js-sigmoid"),
    pytest.param(
        ["ipo"], {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}, id="alpha-ipo"
    ),
    pytest.param(["discopop"], {"f_divergence_type": "alpha_divergence"}, id="alpha-discopop"),
    pytest.param(
        ["sigmoid_norm", "hinge"], {"f_divergence_type": "js_divergence", "beta": 0.5}, id="js-norm-hinge"
    ),
    pytest.param(["sigmoid"], {"ld_alpha": 0.5}, id="ld-sigmoid"),
    pytest.param(["ipo", "apo_zero"], {"ld_alpha": 0.0}, id="ld0-ipo-apo"),
    pytest.param(["sigmoid"], {"use_weighting": True}, id="wpo-sigmoid"),
    pytest.param(
        ["robust", "nca_pair"], {"use_weighting": True, "label_smoothing": 0.2}, id="wpo-robust-nca"
    ),
    pytest.param(["sigmoid"], {"ld_alpha": 0.3, "use_weighting": True, "beta": 0.3}, id="ld-wpo"),
]


@pytest.mark.parametrize("types, opts", _TRL_CASES)
def test_matches_trl_dpo_trainer(types, opts):
    """Same random per-token log-probs into TRL 1.16 and into alignops (sequence reductions, LD-DPO split, WPO
    weights, dpo_loss): equal loss, metrics and gradient w.r.t. the policy per-token log-probs."""
    b, t = 5, 10  # 5 pairs, padded length 10 (9 scored positions)
    cm = torch.zeros(2 * b, t, dtype=torch.long)
    for i in range(2 * b):
        start = int(torch.randint(1, 4, ()))  # prompt of 1..3 tokens
        end = int(torch.randint(start, t + 1, ()))
        cm[i, start:end] = 1
    cm[0, 2:] = 1  # at least one chosen token in the micro-batch (TRL's sft mean needs one)
    cm[b + 1] = 0  # an empty rejected completion
    mask = cm[:, 1:].bool()
    per_token = (torch.randn(2 * b, t - 1) * 2 - 1) * mask
    ref_per_token = per_token + torch.randn(2 * b, t - 1) * 0.7 * mask
    lssp = -torch.rand(2 * b, t - 1) * 2 * mask if opts.get("use_weighting") else None

    p_trl = per_token.clone().requires_grad_(True)
    trl_loss, trl_metrics = _trl_dpo(
        p_trl, ref_per_token, cm, loss_types=types, log_sum_sq_probs=lssp, **opts
    )
    (g_trl,) = torch.autograd.grad(trl_loss, p_trl)

    p = per_token.clone().requires_grad_(True)
    plain = reduce_padded(p, mask)
    ld_alpha = opts.get("ld_alpha")
    mc, mr = split_pair(mask)
    if ld_alpha is None:
        pc, pr = split_pair(plain.sums)
        rc, rr = split_pair(reduce_padded(ref_per_token, mask).sums)
    else:
        pc, pr = ld_dpo_logps(*split_pair(p), chosen_mask=mc, rejected_mask=mr, ld_alpha=ld_alpha)
        rc, rr = ld_dpo_logps(*split_pair(ref_per_token), chosen_mask=mc, rejected_mask=mr, ld_alpha=ld_alpha)
    nw, nl = split_pair(plain.counts)
    sums_c, _ = split_pair(plain.sums)
    kw = {k: v for k, v in opts.items() if k not in ("ld_alpha",)}
    if opts.get("use_weighting"):
        kw["chosen_wpo_logw"], kw["rejected_wpo_logw"] = split_pair(wpo_log_weights(p, lssp, mask))
    out = dpo_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=types,
        chosen_lengths=nw,
        rejected_lengths=nl,
        chosen_nll=-(sums_c.sum() / nw.sum().clamp(min=1)),
        **kw,
    )
    (g,) = torch.autograd.grad(out.loss, p)

    assert_close("loss vs TRL", trl_loss.detach(), out.loss, atol=1e-5, rtol=1e-5)
    # TRL's fused head writes constant zeros at masked positions (masked_scatter), so only the gradient on
    # counted positions is meaningful there; ours must be exactly 0 elsewhere.
    assert_close("grad vs TRL", g_trl * mask, g, atol=1e-6, rtol=1e-4)
    assert bool((g[~mask] == 0).all())
    for k in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert_close(
            k, torch.tensor(trl_metrics[k], dtype=torch.float64), out.metrics[k], atol=1e-5, rtol=1e-5
        )


# ================================================================ end to end: hidden -> loss


@pytest.mark.parametrize(
    "types, weights",
    [
        pytest.param(["sigmoid"], None, id="sigmoid"),
        pytest.param(["ipo"], None, id="ipo"),
        pytest.param(["sigmoid", "sft"], [1.0, 0.5], id="rpo"),
    ],
)
def test_end_to_end_hidden_to_loss(types, weights):
    """hidden -> sequence_logprobs -> split_pair -> dpo_loss equals full-logits float64 PyTorch
    (h @ W.T, log_softmax, gather, masked sums) -> SPEC formula; values and grads w.r.t. hidden and weight."""
    b, t, h_dim, v = 2, 9, 12, 23
    h = torch.randn(2 * b, t, h_dim, requires_grad=True)
    w = (torch.randn(v, h_dim) * 0.4).requires_grad_(True)
    h_ref_model = h.detach() + 0.3 * torch.randn_like(h)  # the reference model's own hidden states / head
    w_ref_model = w.detach() + 0.1 * torch.randn_like(w)
    labels = torch.randint(0, v, (2 * b, t))
    for i in range(2 * b):
        p = int(torch.randint(1, 4, ()))
        e = int(torch.randint(p + 1, t + 1, ()))
        labels[i, :p] = -100
        labels[i, e:] = -100

    out = sequence_logprobs(h, w, labels)
    with torch.no_grad():
        ref_out = sequence_logprobs(h_ref_model, w_ref_model, labels)
    pc, pr = split_pair(out.sums)
    rc, rr = split_pair(ref_out.sums)
    nw, nl = split_pair(out.counts)
    nll = -(pc.sum() / nw.sum().clamp(min=1))
    res = dpo_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=types,
        loss_weights=weights,
        beta=0.5,
        chosen_lengths=nw,
        rejected_lengths=nl,
        chosen_nll=nll,
    )

    def seq_sums_64(hh, ww):
        logp = torch.log_softmax(hh.double() @ ww.double().T, dim=-1)[:, :-1]
        tgt = labels[:, 1:]
        keep = tgt != -100
        tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(keep, tok, torch.zeros((), dtype=tok.dtype)).sum(-1), keep.sum(-1)

    hd, wd = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    s, n = seq_sums_64(hd, wd)
    s_ref, _ = seq_sums_64(h_ref_model, w_ref_model)
    ex = {"chosen_nll": -(s[:b].sum() / n[:b].sum())}
    ref_losses, ref_loss = _ref_losses_torch(
        types,
        weights or [1.0],
        s[:b],
        s[b:],
        s_ref[:b],
        s_ref[b:],
        n[:b].double(),
        n[b:].double(),
        ex,
        {**_DEFAULTS, "beta": 0.5},
    )
    assert_close("loss", ref_loss, res.loss, atol=1e-5, rtol=1e-5)
    g = torch.randn(b)
    grads = torch.autograd.grad((res.losses * g).sum(), (h, w))
    grads_ref = torch.autograd.grad((ref_losses * g.double()).sum(), (hd, wd))
    assert_close("d hidden", grads_ref[0], grads[0], atol=2e-6, rtol=1e-4)
    assert_close("d weight", grads_ref[1], grads[1], atol=2e-6, rtol=1e-4)
