"""Distillation / full-distribution KL losses (``alignops.losses.distill``) against float64
formulas written here from the papers, on hidden states of odd sizes (``[2, 7]`` tokens,
``V = 211``, student / teacher hidden sizes 12 / 9), with random upstream gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignops import losses
from tests._assert import assert_close


def _heads(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hp = torch.randn(2, 7, 12, generator=g).to(dtype).requires_grad_()
    wp = (torch.randn(211, 12, generator=g) * 0.4).to(dtype).requires_grad_()
    hq = torch.randn(2, 7, 9, generator=g).to(dtype)
    wq = (torch.randn(211, 9, generator=g) * 0.4).to(dtype)
    mask = torch.rand(2, 7, generator=g) > 0.3
    return hp, wp, hq, wq, mask


def _logps64(h, w, t=1.0):
    return torch.log_softmax((h.double() @ w.double().T) / t, -1)


def _kl64(la, lb):
    return (la.exp() * (la - lb)).sum(-1)


def test_gkd_loss():
    hp, wp, hq, wq, mask = _heads()
    beta, t = 0.3, 1.7
    out = losses.gkd_loss(hp, wp, hq, wq, beta=beta, temperature=t, mask=mask)
    x = [hp.detach().double().requires_grad_(), wp.detach().double().requires_grad_()]
    lp, lq = _logps64(x[0], x[1], t), _logps64(hq, wq, t)
    lm = torch.logaddexp(lp + math.log(1 - beta), lq + math.log(beta))
    per = (beta * _kl64(lq, lm) + (1 - beta) * _kl64(lp, lm)) * mask
    want = per.sum() / mask.sum()
    assert_close("loss", want.detach(), out.loss.detach(), atol=1e-6, rtol=1e-5)
    assert_close("losses", per.detach(), out.losses.detach(), atol=1e-6, rtol=1e-5)
    for name, a, b in zip(
        ("dh", "dw"), torch.autograd.grad(want, x), torch.autograd.grad(out.loss, (hp, wp))
    ):
        assert_close(name, a, b, atol=1e-7 + 1e-4 * a.abs().max().item())
    g = torch.Generator().manual_seed(0)
    draws = [losses.gkd_on_policy(0.25, g) for _ in range(400)]
    assert 60 < sum(draws) < 140
    with pytest.raises(ValueError, match="lmbda"):
        losses.gkd_on_policy(1.5)


def test_kd_loss_t_squared():
    hp, wp, hq, wq, mask = _heads(1)
    out = losses.kd_loss(hp, wp, hq, wq, temperature=2.5, mask=mask)
    lp, lq = _logps64(hp.detach(), wp.detach(), 2.5), _logps64(hq, wq, 2.5)
    want = (6.25 * _kl64(lq, lp) * mask).sum() / mask.sum()
    assert_close("loss", want, out.loss.detach(), atol=1e-6, rtol=1e-5)


def test_sequence_kd_loss():
    hp, wp, _, _, mask = _heads(2)
    tokens = torch.randint(0, 211, (2, 7))
    tokens[~mask] = -100
    out = losses.sequence_kd_loss(hp, wp, tokens)
    want = F.cross_entropy((hp.detach().double() @ wp.detach().double().T).view(14, 211), tokens.view(-1))
    assert_close("loss", want, out.loss.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo(variant):
    """TDPO with SeqKL from the fused heads: value, metrics, the policy's gradients, and TDPO2's
    stop-gradient on the chosen sequence's KL."""
    g = torch.Generator().manual_seed(3)
    hc, wp, hq_c, wq, mc = _heads(3)
    hr = torch.randn(2, 7, 12, generator=g).requires_grad_()
    hq_r = torch.randn(2, 7, 9, generator=g)
    mr = torch.rand(2, 7, generator=g) > 0.2
    pc, pr = torch.randn(2, generator=g, requires_grad=True), torch.randn(2, generator=g, requires_grad=True)
    rc, rr = torch.randn(2, generator=g), torch.randn(2, generator=g)
    beta, alpha = 0.1, 0.5
    kl_c = losses.sequence_kl(hc, wp, hq_c, wq, mc)
    kl_r = losses.sequence_kl(hr, wp, hq_r, wq, mr)
    out = losses.tdpo_loss(pc, pr, rc, rr, kl_c, kl_r, beta=beta, alpha=alpha, variant=variant)

    leaves = (hc, hr, wp, pc, pr)
    x = [t.detach().double().requires_grad_() for t in leaves]
    skl_c = (_kl64(_logps64(hq_c, wq), _logps64(x[0], x[2])) * mc).sum(-1)
    skl_r = (_kl64(_logps64(hq_r, wq), _logps64(x[1], x[2])) * mr).sum(-1)
    u_w, u_l = x[3] - rc.double(), x[4] - rr.double()
    if variant == "tdpo1":
        z = (u_w - u_l) - (skl_r - skl_c)
    else:
        z = (u_w - u_l) - alpha * (skl_r - skl_c.detach())
    want = -F.logsigmoid(beta * z)
    assert_close("seq_kl", skl_c.detach(), kl_c.detach(), atol=1e-5, rtol=1e-5)
    assert_close("losses", want.detach(), out.losses.detach(), atol=1e-6, rtol=1e-5)
    assert_close(
        "rewards/chosen", (beta * (u_w + skl_c)).mean().detach(), out.metrics["rewards/chosen"], atol=1e-6
    )
    gw = torch.randn(2, dtype=torch.float64)
    got = torch.autograd.grad((out.losses * gw.float()).sum(), leaves, allow_unused=True)
    ref = torch.autograd.grad((want * gw).sum(), x, allow_unused=True)
    if variant == "tdpo2":  # sg(SeqKL(y_w)): the chosen hidden states get no gradient at all
        assert got[0] is None and ref[0] is None
        got, ref = got[1:], ref[1:]
    names = ("dh_chosen", "dh_rejected", "dw", "d_chosen", "d_rejected")[5 - len(got) :]
    for name, a, b in zip(names, ref, got):
        assert_close(name, a, b, atol=1e-7 + 1e-4 * a.abs().max().item())


def test_exact_kl_penalty():
    hp, wp, hq, wq, mask = _heads(4)
    kl = losses.exact_kl_penalty(hp, wp, hq, wq, mask=mask, temperature=0.9)
    x = [hp.detach().double().requires_grad_(), wp.detach().double().requires_grad_()]
    want = _kl64(_logps64(x[0], x[1], 0.9), _logps64(hq, wq, 0.9)) * mask
    assert_close("kl", want.detach(), kl.detach(), atol=1e-6, rtol=1e-5)
    gw = torch.randn(2, 7, dtype=torch.float64)
    for name, a, b in zip(
        ("dh", "dw"),
        torch.autograd.grad((want * gw).sum(), x),
        torch.autograd.grad((kl * gw.float()).sum(), (hp, wp)),
    ):
        assert_close(name, a, b, atol=1e-7 + 1e-4 * a.abs().max().item())
