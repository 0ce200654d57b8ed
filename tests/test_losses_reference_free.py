"""Reference-free preference losses: SimPO, CPO (+ variants), AlphaPO, ORPO, TPO.

Every case compares values and gradients (random upstream gradients) with a float64 reference
written from the papers' formulas below (TRL 1.16's own loss code on the same random logits:
test_losses_reference_free_trl.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _assert import assert_close
from _inputs import F64, check_losses, summed_logps
from _policy_refs import check_pairs, leaf, value_and_grads

from alignops.losses import alphapo_loss, cpo_loss, orpo_loss, simpo_loss, tpo_loss

B = 13  # odd batch, not a power of two


# ---------------------------------------------------------------------------------------------
# float64 references, from the papers (TRL's forms where TRL has the method)


def _avg(s, n):
    return s / n.clamp_min(1)


def _logsig(x):
    return F.logsigmoid(x)


def ref_pair(x, *, beta, kind, eps=0.0, gamma=0.0):
    """SimPO / CPO / TPO per-pair loss on a policy margin x."""
    if kind == "sigmoid":
        return -(1 - eps) * _logsig(beta * x) - eps * _logsig(-beta * x)
    if kind in ("simpo", "tpo-l"):
        z = beta * (x - gamma / beta)  # TRL writes the margin as γ/β inside β(·)
        return -(1 - eps) * _logsig(z) - eps * _logsig(-z)
    if kind == "hinge":
        return torch.clamp(1 - beta * x, min=0)
    if kind == "ipo":
        return (x - 1 / (2 * beta)) ** 2
    raise AssertionError(kind)


def ref_alpha(x, alpha):
    """AlphaPO reward (1 - p^{-α})/α, p = e^x, literally (fine in float64 at these sizes)."""
    return (1 - torch.exp(x) ** (-alpha)) / alpha


def ref_cpo(sw, sl, nw, nl, *, beta, kind, eps=0.0, cpo_alpha=1.0, gamma=0.5, alpha=0.0):
    avg = kind in ("ipo", "simpo")
    xw, xl = (_avg(sw, nw), _avg(sl, nl)) if avg else (sw, sl)
    if alpha:
        xw, xl = ref_alpha(xw, alpha), ref_alpha(xl, alpha)
    losses = ref_pair(xw - xl, beta=beta, kind=kind, eps=eps, gamma=gamma)
    nll = -sw.sum() / nw.sum() if cpo_alpha else 0.0
    return losses + cpo_alpha * nll


def ref_orpo(sw, sl, nw, nl, *, beta, nll=None):
    aw = _avg(sw, nw).clamp(max=-1e-6)
    al = _avg(sl, nl).clamp(max=-1e-6)
    lo = (aw - torch.log(1 - torch.exp(aw))) - (al - torch.log(1 - torch.exp(al)))
    if nll is None:
        nll = -sw.sum() / nw.sum()
    return nll - beta * _logsig(lo)


# ---------------------------------------------------------------------------------------------
# values + gradients vs the float64 references


CPO_CASES = [
    pytest.param("sigmoid", 0.1, 0.0, 1.0, 0.0, id="cpo-sigmoid"),
    pytest.param("sigmoid", 0.3, 0.2, 0.5, 0.0, id="cpo-sigmoid-ls"),
    pytest.param("hinge", 0.05, 0.0, 1.0, 0.0, id="cpo-hinge"),
    pytest.param("ipo", 0.5, 0.0, 1.0, 0.0, id="cpo-ipo"),
    pytest.param("simpo", 2.0, 0.1, 0.0, 0.0, id="simpo-ls"),
    pytest.param("simpo", 2.5, 0.0, 0.7, 0.0, id="cpo-simpo"),
    pytest.param("sigmoid", 0.1, 0.0, 1.0, 0.02, id="cpo-sigmoid-alpha"),
    pytest.param("simpo", 2.5, 0.0, 0.0, 0.25, id="simpo-alpha"),
    pytest.param("ipo", 0.5, 0.0, 0.0, -0.3, id="ipo-negative-alpha"),
]


@pytest.mark.parametrize("kind,beta,eps,cpo_alpha,alpha", CPO_CASES)
def test_cpo_matches_reference(kind, beta, eps, cpo_alpha, alpha):
    sw, sl, nw, nl = summed_logps(B)
    gamma = 0.8

    def ours(a, b):
        return cpo_loss(
            a,
            b,
            chosen_lengths=nw,
            rejected_lengths=nl,
            beta=beta,
            loss_type=kind,
            label_smoothing=eps,
            cpo_alpha=cpo_alpha,
            simpo_gamma=gamma,
            alpha=alpha,
        )

    def ref(a, b):
        return ref_cpo(
            a, b, nw, nl, beta=beta, kind=kind, eps=eps, cpo_alpha=cpo_alpha, gamma=gamma, alpha=alpha
        )

    out = check_losses(f"cpo[{kind}]", ours, ref, [sw, sl], atol=2e-5, rtol=2e-5)
    # metrics: reward β·r with r = x (or the AlphaPO reward of x), x = A for ipo/simpo else S
    avg = kind in ("ipo", "simpo")
    xw, xl = (_avg(sw, nw), _avg(sl, nl)) if avg else (sw, sl)
    rw, rl = (ref_alpha(xw, alpha), ref_alpha(xl, alpha)) if alpha else (xw, xl)
    m = out.metrics
    assert_close("rewards/chosen", (beta * rw).mean(), m["rewards/chosen"], atol=1e-5, rtol=1e-5)
    assert_close("rewards/rejected", (beta * rl).mean(), m["rewards/rejected"], atol=1e-5, rtol=1e-5)
    assert_close("rewards/margins", (beta * (rw - rl)).mean(), m["rewards/margins"], atol=1e-5, rtol=1e-5)
    assert_close("rewards/accuracies", (rw > rl).double().mean(), m["rewards/accuracies"], atol=1e-6)
    assert_close("logps/chosen", xw.mean(), m["logps/chosen"], atol=1e-4, rtol=1e-5)
    nll = -sw.sum() / nw.sum() if cpo_alpha else torch.zeros((), dtype=F64)
    assert_close("nll_loss", nll, m["nll_loss"], atol=1e-5, rtol=1e-5)


def test_alphapo_loss_is_cpo_simpo_with_alpha():
    sw, sl, nw, nl = summed_logps(B)

    def ours(a, b):
        return alphapo_loss(
            a, b, chosen_lengths=nw, rejected_lengths=nl, alpha=0.25, beta=2.5, simpo_gamma=0.1
        )

    def ref(a, b):
        return ref_cpo(a, b, nw, nl, beta=2.5, kind="simpo", cpo_alpha=0.0, gamma=0.1, alpha=0.25)

    check_losses("alphapo", ours, ref, [sw, sl], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "eps,cpo_alpha", [(0.0, 0.0), (0.15, 0.0), (0.0, 0.4)], ids=["plain", "ls", "cpo-simpo"]
)
def test_simpo_matches_reference(eps, cpo_alpha):
    sw, sl, nw, nl = summed_logps(B, seed=3)

    def ours(a, b):
        return simpo_loss(
            a,
            b,
            chosen_lengths=nw,
            rejected_lengths=nl,
            beta=2.0,
            simpo_gamma=1.0,
            label_smoothing=eps,
            cpo_alpha=cpo_alpha,
        )

    def ref(a, b):
        return ref_cpo(a, b, nw, nl, beta=2.0, kind="simpo", eps=eps, cpo_alpha=cpo_alpha, gamma=1.0)

    check_losses("simpo", ours, ref, [sw, sl])


def run_simpo_hinge(dtype):
    """SimPO's hinge form ``relu(1 - (β ΔA - γ))`` (the SimPO repository's ``loss_type="hinge"``)."""
    sw, sl, nw, nl = summed_logps(B, seed=9)
    x, xr = leaf(torch.cat((sw, sl)), dtype)
    out = simpo_loss(
        x[:B], x[B:], chosen_lengths=nw, rejected_lengths=nl, beta=2.0, simpo_gamma=0.4, loss_type="hinge"
    )
    margin = _avg(xr[:B], nw) - _avg(xr[B:], nl)
    want = torch.clamp(1 - (2.0 * margin - 0.4), min=0)
    assert (want > 0).any() and (want == 0).any()  # both sides of the hinge
    return value_and_grads("simpo hinge", out.loss, out.losses, want.mean(), want, x, xr)


def test_simpo_hinge_vs_float64():
    check_pairs(run_simpo_hinge(F64), atol=1e-12, rtol=1e-12)
    sw, sl, nw, nl = summed_logps(B, seed=9)
    same = cpo_loss(sw, sl, chosen_lengths=nw, rejected_lengths=nl, loss_type="simpo_hinge", cpo_alpha=0.0)
    assert torch.equal(
        same.losses, simpo_loss(sw, sl, chosen_lengths=nw, rejected_lengths=nl, loss_type="hinge").losses
    )
    with pytest.raises(ValueError, match="label_smoothing"):
        simpo_loss(sw, sl, chosen_lengths=nw, rejected_lengths=nl, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="'sigmoid', 'hinge'"):
        simpo_loss(sw, sl, chosen_lengths=nw, rejected_lengths=nl, loss_type="ipo")


@pytest.mark.parametrize("given_nll", [False, True], ids=["completion-nll", "given-nll"])
def test_orpo_matches_reference(given_nll):
    sw, sl, nw, nl = summed_logps(B, seed=5, lo=0.01, hi=1.5)
    nll = torch.tensor(1.7, dtype=F64)

    def ours(a, b, *extra):
        return orpo_loss(
            a, b, chosen_lengths=nw, rejected_lengths=nl, beta=0.2, nll_loss=extra[0] if extra else None
        )

    def ref(a, b, *extra):
        return ref_orpo(a, b, nw, nl, beta=0.2, nll=extra[0] if extra else None)

    floats = [sw, sl, nll] if given_nll else [sw, sl]
    out = check_losses("orpo", ours, ref, floats)
    aw, al = _avg(sw, nw).clamp(max=-1e-6), _avg(sl, nl).clamp(max=-1e-6)
    lo = (aw - torch.log(1 - torch.exp(aw))) - (al - torch.log(1 - torch.exp(al)))
    assert_close("log_odds_chosen", lo.mean(), out.metrics["log_odds_chosen"], atol=1e-4, rtol=1e-5)
    assert_close("log_odds_ratio", _logsig(lo).mean(), out.metrics["log_odds_ratio"], atol=1e-5, rtol=1e-5)
    assert_close("rewards/chosen", (0.2 * aw).mean(), out.metrics["rewards/chosen"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kind,eps,tpo_alpha",
    [
        ("sigmoid", 0.0, 1.0),
        ("sigmoid", 0.1, 0.5),
        ("hinge", 0.0, 1.0),
        ("ipo", 0.0, 1.0),
        ("tpo-l", 0.2, 0.0),
    ],
)
def test_tpo_matches_reference(kind, eps, tpo_alpha):
    sw, sl, nw, nl = summed_logps(B, seed=7)
    sg, _, ng, _ = summed_logps(B, seed=8)
    beta = 0.01 if kind in ("sigmoid", "hinge") else 1.5

    def ours(a, b, c):
        return tpo_loss(
            a,
            b,
            c,
            chosen_lengths=nw,
            rejected_lengths=nl,
            gold_lengths=ng,
            beta=beta,
            loss_type=kind,
            label_smoothing=eps,
            tpo_l_gamma=0.6,
            tpo_alpha=tpo_alpha,
        )

    def ref(a, b, c):
        avg = kind in ("ipo", "tpo-l")
        xw, xl = (_avg(a, nw), _avg(b, nl)) if avg else (a, b)
        nll = -c.sum() / ng.sum()
        return ref_pair(xw - xl, beta=beta, kind=kind, eps=eps, gamma=0.6) + tpo_alpha * nll

    check_losses(f"tpo[{kind}]", ours, ref, [sw, sl, sg])


# ---------------------------------------------------------------------------------------------
# numerics: extreme margins, zero-length completions, bf16


def test_extreme_margins_are_finite():
    """|β·margin| ~ 1e3 in both directions: finite values and gradients, equal to float64 refs."""
    sw = torch.tensor([-1.0, -2e4, -5.0, -1e4], dtype=F64)
    sl = torch.tensor([-2e4, -1.0, -1e4, -5.0], dtype=F64)
    n = torch.tensor([1, 1, 1, 1])
    for kind, beta in [("sigmoid", 0.1), ("hinge", 0.1), ("ipo", 0.1), ("simpo", 0.1)]:
        check_losses(
            f"extreme-cpo[{kind}]",
            lambda a, b, k=kind, bt=beta: cpo_loss(
                a, b, chosen_lengths=n, rejected_lengths=n, beta=bt, loss_type=k
            ),
            lambda a, b, k=kind, bt=beta: ref_cpo(a, b, n, n, beta=bt, kind=k),
            [sw, sl],
            atol=1e-3,
            rtol=1e-5,
        )
    check_losses(
        "extreme-orpo",
        lambda a, b: orpo_loss(a, b, chosen_lengths=n, rejected_lengths=n, beta=1.0),
        lambda a, b: ref_orpo(a, b, n, n, beta=1.0),
        [sw, sl],
        atol=1e-3,
        rtol=1e-5,
    )
    # AlphaPO on summed log-probs: p^{-α} = e^{α·2e4} overflows every float; the reward's
    # exponent is clamped at 80, so value and gradient stay finite.
    a = sw.float().requires_grad_(True)
    b = sl.float().requires_grad_(True)
    out = cpo_loss(a, b, loss_type="sigmoid", alpha=0.25, cpo_alpha=0.0)
    (ga, gb) = torch.autograd.grad((out.losses * torch.randn(4)).sum(), (a, b))
    assert torch.isfinite(out.losses).all() and torch.isfinite(ga).all() and torch.isfinite(gb).all()


def test_orpo_probability_near_one_is_finite():
    """a → 0 (p → 1) makes log1mexp → -inf; the a ≤ -1e-6 clamp keeps everything finite."""
    sw = torch.tensor([0.0, -1e-9, -3.0, -1e-3], dtype=F64)
    sl = torch.tensor([-1e-9, 0.0, -1e-7, -2.0], dtype=F64)
    n = torch.tensor([0, 4, 2, 1])
    check_losses(
        "orpo-p1",
        lambda a, b: orpo_loss(a, b, chosen_lengths=n, rejected_lengths=n),
        lambda a, b: ref_orpo(a, b, n, n, beta=0.1),
        [sw, sl],
        atol=1e-4,
        rtol=1e-4,
    )


def test_zero_length_completions_use_max_one():
    sw = torch.tensor([0.0, -4.0, 0.0], dtype=F64)
    sl = torch.tensor([-3.0, 0.0, 0.0], dtype=F64)
    nw = torch.tensor([0, 2, 0])
    nl = torch.tensor([3, 0, 0])
    for fn, ref in [
        (
            lambda a, b: simpo_loss(a, b, chosen_lengths=nw, rejected_lengths=nl),
            lambda a, b: ref_cpo(a, b, nw, nl, beta=0.1, kind="simpo", cpo_alpha=0.0, gamma=0.5),
        ),
        (
            lambda a, b: cpo_loss(a, b, chosen_lengths=nw, rejected_lengths=nl),
            lambda a, b: ref_cpo(a, b, nw, nl, beta=0.1, kind="sigmoid"),
        ),
    ]:
        check_losses("zero-len", fn, ref, [sw, sl])
    # all chosen completions empty: the NLL token mean is 0/max(1, 0) = 0, not NaN
    out = cpo_loss(sw[[0, 2]], sl[[0, 2]], chosen_lengths=nw[[0, 2]])
    assert out.metrics["nll_loss"].item() == 0.0


@pytest.mark.parametrize("which", ["cpo", "simpo", "orpo", "tpo"])
def test_bf16_inputs_compute_in_fp32(which):
    sw, sl, nw, nl = summed_logps(B, seed=11, lo=0.05, hi=1.0)
    fns = {
        "cpo": (
            lambda a, b: cpo_loss(a, b, chosen_lengths=nw, rejected_lengths=nl),
            lambda a, b: ref_cpo(a, b, nw, nl, beta=0.1, kind="sigmoid"),
        ),
        "simpo": (
            lambda a, b: simpo_loss(a, b, chosen_lengths=nw, rejected_lengths=nl, beta=2.0),
            lambda a, b: ref_cpo(a, b, nw, nl, beta=2.0, kind="simpo", cpo_alpha=0.0, gamma=0.5),
        ),
        "orpo": (
            lambda a, b: orpo_loss(a, b, chosen_lengths=nw, rejected_lengths=nl),
            lambda a, b: ref_orpo(a, b, nw, nl, beta=0.1),
        ),
        "tpo": (
            lambda a, b: tpo_loss(
                a, b, chosen_lengths=nw, rejected_lengths=nl, loss_type="ipo", tpo_alpha=0.0, beta=1.0
            ),
            lambda a, b: ref_pair(_avg(a, nw) - _avg(b, nl), beta=1.0, kind="ipo"),
        ),
    }
    ours, ref = fns[which]
    # values: the reference sees the same bf16-rounded inputs, so only fp32 arithmetic error remains;
    # gradients are stored in bf16, hence the bf16 relative tolerance on them.
    out = check_losses(
        f"bf16-{which}",
        ours,
        ref,
        [sw, sl],
        dtype=torch.bfloat16,
        atol=1e-4,
        rtol=1e-5,
        gatol=1e-4,
        grtol=8e-3,
    )
    assert out.loss.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# input validation


def test_bad_inputs_raise_clear_errors():
    sw, sl, nw, nl = summed_logps(B)
    with pytest.raises(ValueError, match="batch size"):
        cpo_loss(sw, sl[:-1])
    with pytest.raises(ValueError, match="NaN"):
        cpo_loss(torch.full((3,), float("nan")), torch.zeros(3), cpo_alpha=0.0)
    with pytest.raises(ValueError, match="valid choices: 'sigmoid', 'hinge', 'ipo', 'simpo', 'alphapo'"):
        cpo_loss(sw, sl, loss_type="kto_pair")
    with pytest.raises(ValueError, match="valid choices: 'sigmoid', 'hinge', 'ipo', 'tpo-l'"):
        tpo_loss(sw, sl, loss_type="simpo")
    with pytest.raises(ValueError, match="chosen_lengths"):
        cpo_loss(sw, sl, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_lengths"):
        cpo_loss(sw, sl)  # cpo_alpha=1 needs the NLL's token count
    with pytest.raises(ValueError, match=r"shape \[13\]"):
        orpo_loss(sw, sl, chosen_lengths=nw[:-1], rejected_lengths=nl)
    with pytest.raises(ValueError, match="label_smoothing"):
        cpo_loss(sw, sl, loss_type="hinge", label_smoothing=0.1, cpo_alpha=0.0)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        simpo_loss(sw[None], sl[None], chosen_lengths=nw, rejected_lengths=nl)
    with pytest.raises(ValueError, match="policy_gold_logps"):
        tpo_loss(sw, sl)
    with pytest.raises(ValueError, match="alpha != 0"):
        alphapo_loss(sw, sl, chosen_lengths=nw, rejected_lengths=nl, alpha=0.0)
