"""Negative-only / unlearning losses: NPO (Zhang et al. 2024, arXiv:2404.05868), SimNPO (Fan et
al. 2024, arXiv:2410.07163), D2O (Duan et al. 2024, arXiv:2403.03419), against float64 references
written from the papers' formulas below."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _assert import assert_close
from _inputs import F64, check_losses, normal

from alignops.losses import d2o_loss, npo_loss, simnpo_loss


def test_npo_matches_reference():
    p = -40 * torch.rand(11, dtype=F64)
    r = (p + normal(11, seed=1, scale=5)).detach()
    retain = torch.tensor(2.3, dtype=F64)
    out = check_losses(
        "npo",
        lambda a, c: npo_loss(a, r, beta=0.1, retain_loss=c, retain_weight=0.5),
        lambda a, c: -(2 / 0.1) * F.logsigmoid(-0.1 * (a - r)) + 0.5 * c,
        [p, retain],
    )
    assert_close("npo/rewards", (0.1 * (p - r)).mean(), out.metrics["rewards/rejected"], atol=1e-5, rtol=1e-5)


def test_npo_small_beta_is_gradient_ascent():
    """NPO (Zhang et al. 2024, Prop. 1): ℓ - (2/β) ln 2 → u and ∇ℓ → ∇S_θ (GA) as β → 0 (float64
    inputs stay float64)."""
    p = (-20 * torch.rand(9, dtype=F64)).requires_grad_(True)
    r = p.detach() + normal(9, seed=2)
    beta = 1e-6
    out = npo_loss(p, r, beta=beta)
    u = (p - r).detach()
    assert_close("npo-ga/value", u, out.losses - (2 / beta) * math.log(2), atol=1e-4)
    (g,) = torch.autograd.grad(out.losses.sum(), p)
    assert_close("npo-ga/grad", torch.ones(9, dtype=F64), g, atol=1e-4)


def test_simnpo_matches_reference():
    n = torch.randint(0, 30, (12,))
    s = -(0.1 + torch.rand(12, dtype=F64)) * n
    check_losses(
        "simnpo",
        lambda a: simnpo_loss(a, rejected_lengths=n, beta=2.5, gamma=0.3),
        lambda a: -(2 / 2.5) * F.logsigmoid(-2.5 * a / n.clamp_min(1) - 0.3),
        [s],
    )


def test_d2o_matches_reference():
    b, k = 6, 4
    ps = -30 * torch.rand(b, k, dtype=F64)
    rs = ps + normal(b, k, seed=3, scale=3)
    pl = -30 * torch.rand(b, dtype=F64)
    rl = pl + normal(b, seed=4, scale=3)
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[1, 2:] = False
    mask[4, 3:] = False

    def ref(a, c):
        out = []
        for i in range(b):
            idx = mask[i]
            pos = 0.2 / int(idx.sum()) * (a[i, idx] - rs[i, idx]).sum()
            out.append(-F.logsigmoid(pos - 0.3 * (c[i] - rl[i])))
        return torch.stack(out)

    check_losses("d2o", lambda a, c: d2o_loss(a, rs, c, rl, beta=0.2, alpha=0.3, mask=mask), ref, [ps, pl])


def test_negative_extreme_values_are_finite():
    """|log-probs| ~ 1e4: finite values and gradients."""
    big = torch.tensor([-1e4, -1.0, -5e3, -3.0], requires_grad=True)
    zero = torch.zeros(4)
    outs = [
        npo_loss(big, zero, beta=0.1),
        simnpo_loss(big, rejected_lengths=torch.ones(4, dtype=torch.long), beta=0.1),
        d2o_loss(
            torch.stack((big, big.flip(0)), 1), torch.zeros(4, 2), big.flip(0), zero, beta=0.1, alpha=0.1
        ),
    ]
    for out in outs:
        (gr,) = torch.autograd.grad((out.losses * torch.randn(out.losses.shape)).sum(), big)
        assert torch.isfinite(out.losses).all() and torch.isfinite(gr).all()


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(5)
    with pytest.raises(ValueError, match="batch size"):
        npo_loss(x, x[:3])
    with pytest.raises(ValueError, match="NaN"):
        npo_loss(x * float("nan"), x)
    with pytest.raises(ValueError, match="rejected_lengths"):
        simnpo_loss(x, rejected_lengths=None)
    with pytest.raises(ValueError, match="batch size"):
        d2o_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match="beta"):
        npo_loss(x, x, beta=0.0)


def test_python_float_retain_loss_is_exact_in_float64():
    """A Python-float retain loss next to float64 log-probs is taken in float64 (no float32 step)."""
    p, r = -40 * torch.rand(6, dtype=F64), -40 * torch.rand(6, dtype=F64)
    retain = 1.2345678901234567  # not a float32 number
    out = npo_loss(p, r, beta=0.1, retain_loss=retain)
    want = -(2 / 0.1) * F.logsigmoid(-0.1 * (p - r)) + retain
    assert_close("npo-rt float", want, out.losses, atol=1e-14, rtol=1e-14)
