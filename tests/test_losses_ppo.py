"""PPO / PPO-ptx (Schulman et al. 2017, arXiv:1707.06347; InstructGPT, Ouyang et al. 2022,
arXiv:2203.02155, Eq. 2) against a float64 reference written here on the flattened valid tokens.
The pretraining term enters ``ppo_loss`` as a NLL only (``ptx_nll``); the fused path from hidden
states is tested in test_fused.py.
"""

from __future__ import annotations

import pytest
import torch
from _assert import assert_close
from _inputs import with_garbage
from test_losses_grpo import B, T, make_batch

from alignops.losses import ppo_loss
from alignops.sequence import reduce_padded


def ref_ppo(
    lp,
    old,
    adv,
    m,
    *,
    values,
    old_values,
    returns,
    vm,
    clip=0.2,
    clip_v=0.2,
    vf_coef=0.1,
    ref=None,
    beta=0.0,
    kind="k1",
    ent=None,
    ent_coef=0.0,
    ptx=None,
    ptx_coef=0.0,
):
    """Flattened valid tokens, the PPO formulas of TRL ``PPOTrainer`` (loss step)."""
    a = (adv[:, None].expand_as(lp) if adv.dim() == 1 else adv)[m]
    l, o = lp[m], old[m]
    rho = torch.exp(l - o)
    pg = torch.maximum(-a * rho, -a * rho.clamp(1 - clip, 1 + clip))
    loss = pg.mean() if pg.numel() else pg.sum()
    v, vo, r = values[vm], old_values[vm], returns[vm]
    vc = torch.maximum(torch.minimum(v, vo + clip_v), vo - clip_v)
    vf = 0.5 * torch.maximum((v - r) ** 2, (vc - r) ** 2).mean()
    loss = loss + vf_coef * vf
    if beta:
        logr = ref[m] - l
        k = {"k1": -logr, "k2": 0.5 * logr**2, "k3": torch.exp(logr) - 1 - logr}[kind]
        loss = loss + beta * k.mean()
    if ent_coef:
        loss = loss - ent_coef * ent[m].mean()
    if ptx_coef:
        loss = loss + ptx_coef * ptx
    tok = pg + beta * k if beta else pg
    return loss, dict(
        pg=pg, rho=rho, a=a, tok=tok, vf_clipfrac=((vc - r) ** 2 > (v - r) ** 2).double().mean()
    )


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_ppo_vs_spec_reference(kind):
    batch = make_batch(seed=61, spread=0.4)
    m, g = batch["mask"], batch["g"]
    vm = m.clone()
    lengths = m.sum(-1)
    for i in range(B):  # TRL's value mask covers one position past the response (padding_mask_p1)
        if 0 < lengths[i] < T:
            vm[i, lengths[i]] = True
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    old_values = values + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    returns = torch.randn(B, T, generator=g, dtype=torch.float64)
    x = batch["logps"].clone().requires_grad_()
    v = values.clone().requires_grad_()
    out = ppo_loss(
        with_garbage(x, m),
        batch["old"],
        adv,
        m,
        values=with_garbage(v, vm),
        old_values=old_values,
        returns=returns,
        value_mask=vm,
        ref_logps=batch["ref"],
        beta=0.03,
        kl_estimator=kind,
        entropy=batch["ent"],
        entropy_coef=0.01,
    )
    xr = batch["logps"].clone().requires_grad_()
    vr = values.clone().requires_grad_()
    ref_loss, parts = ref_ppo(
        xr,
        batch["old"],
        adv,
        m,
        values=vr,
        old_values=old_values,
        returns=returns,
        vm=vm,
        ref=batch["ref"],
        beta=0.03,
        kind=kind,
        ent=batch["ent"],
        ent_coef=0.01,
    )
    gu = torch.randn((), generator=g, dtype=torch.float64)
    (out.loss * gu).backward()
    (ref_loss * gu).backward()
    assert_close("ppo loss", ref_loss, out.loss, atol=1e-12)
    assert_close("ppo dlogps", xr.grad, x.grad, atol=1e-12)
    assert_close("ppo dvalues", vr.grad, v.grad, atol=1e-12)
    pg, rho, a = parts["pg"], parts["rho"], parts["a"]
    clipfrac = ((-a * rho.clamp(0.8, 1.2)) > (-a * rho)).double().mean()
    assert_close("policy/clipfrac_avg", clipfrac, out.metrics["policy/clipfrac_avg"], atol=1e-12)
    assert_close("val/clipfrac_avg", parts["vf_clipfrac"], out.metrics["val/clipfrac_avg"], atol=1e-12)
    approx = 0.5 * ((batch["logps"] - batch["old"])[m] ** 2).mean()
    assert_close("policy/approxkl_avg", approx, out.metrics["policy/approxkl_avg"], atol=1e-12)
    assert_close("val/ratio", rho.detach().mean(), out.metrics["val/ratio"], atol=1e-12)
    assert_close("loss/policy_avg", pg.detach().mean(), out.metrics["loss/policy_avg"], atol=1e-12)
    assert_close("per-token pg + beta kl", parts["tok"].detach(), out.losses.detach()[m], atol=1e-12)
    assert (out.losses[~m] == 0).all()


def test_ppo_ptx_nll_from_per_token_logps():
    """PPO-ptx on log-probs only: ``ptx_coef * ptx_nll`` with the NLL taken from per-token
    pretraining log-probs (``reduce_padded``); value and gradient w.r.t. those log-probs against the
    float64 formula. (Hidden states + LM head: ``ppo_loss_from_hidden`` in test_fused.py.)"""
    batch = make_batch(seed=71)
    m, g = batch["mask"], batch["g"]
    ptx_tok = (-3 * torch.rand(4, 9, generator=g, dtype=torch.float64)).requires_grad_()
    ptx_mask = torch.rand(4, 9, generator=g) > 0.3
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    nll = -(reduce_padded(ptx_tok, ptx_mask).sums.sum() / ptx_mask.sum())
    out = ppo_loss(batch["logps"], batch["old"], adv, m, ptx_nll=nll, ptx_coef=0.7)
    ptx_r = ptx_tok.detach().clone().requires_grad_()
    nll_r = -ptx_r[ptx_mask].mean()
    kw = dict(values=batch["old"], old_values=batch["old"], returns=batch["old"], vm=m, vf_coef=0.0)
    ref_loss, _ = ref_ppo(batch["logps"], batch["old"], adv, m, ptx=nll_r, ptx_coef=0.7, **kw)
    gu = torch.randn((), generator=g, dtype=torch.float64)
    (out.loss * gu).backward()
    (ref_loss * gu).backward()
    assert_close("ptx loss", ref_loss, out.loss, atol=1e-12)
    assert_close("ptx metric", nll_r.detach(), out.metrics["loss/ptx"], atol=1e-12)
    assert_close("ptx dlogps", ptx_r.grad, ptx_tok.grad, atol=1e-12)
    # a Python float NLL (e.g. logged elsewhere) is taken in float64 next to float64 log-probs
    as_float = ppo_loss(batch["logps"], batch["old"], adv, m, ptx_nll=nll.item(), ptx_coef=0.7)
    assert_close("ptx float", ref_loss.detach(), as_float.loss, atol=1e-12)


def test_ppo_num_items_accumulation_and_on_policy():
    batch = make_batch(seed=81, b=9)
    m, g = batch["mask"], batch["g"]
    adv = torch.randn(9, T, generator=g, dtype=torch.float64)
    values = torch.randn(9, T, generator=g, dtype=torch.float64)
    kw = dict(
        values=values,
        old_values=values + 0.5,
        returns=values - 0.2,
        ref_logps=batch["ref"],
        beta=0.1,
        entropy=batch["ent"],
        entropy_coef=0.02,
    )
    full = ppo_loss(batch["logps"], batch["old"], adv, m, **kw).loss
    acc = 0.0
    for s in (slice(0, 4), slice(4, 9)):
        part = {k: (v[s] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        acc = acc + ppo_loss(batch["logps"][s], batch["old"][s], adv[s], m[s], num_items=m.sum(), **part).loss
    assert_close("ppo accumulated", full, acc, atol=1e-12)
    on = ppo_loss(batch["logps"], None, adv, m)
    assert_close(
        "ppo on-policy ratio", torch.tensor(1.0, dtype=torch.float64), on.metrics["val/ratio"], atol=0
    )
    assert_close("ppo on-policy loss", -(adv * m).sum() / m.sum(), on.loss, atol=1e-12)


def test_ppo_bad_input_raises():
    batch = make_batch()
    lp, old, m = batch["logps"], batch["old"], batch["mask"]
    adv = torch.randn(B, dtype=torch.float64)
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        ppo_loss(lp, old, adv, m, kl_estimator="k4")
    with pytest.raises(ValueError, match="ptx_coef"):
        ppo_loss(lp, old, adv, m, ptx_nll=torch.tensor(1.0))
    with pytest.raises(ValueError, match="value loss"):
        ppo_loss(lp, old, adv, m, values=lp)
    with pytest.raises(ValueError, match="ref_logps"):
        ppo_loss(lp, old, adv, m, beta=0.1)
    with pytest.raises(TypeError, match="ptx_hidden"):  # the loss layer takes log-probs only
        ppo_loss(lp, old, adv, m, ptx_hidden=torch.zeros(3, 4), ptx_coef=1.0)
