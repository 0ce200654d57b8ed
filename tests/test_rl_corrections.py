"""KL estimators beyond k1 / k2 / k3 (``abs`` and verl's straight-through ``k1+`` / ``k3+`` /
``abs+``, with the log-ratio and estimate clamps), the rollout corrections (truncated IS, Yao et
al. 2025; masked IS / rejection, Liu, Li et al. 2025) and PPO reward clipping, against float64
formulas written here (``_policy_refs.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from _assert import assert_close
from _inputs import F64, generator, padded_mask
from _policy_refs import check_pairs, leaf, ref_kl, ref_rollout

from alignops.rl import KL_KINDS, RolloutCorrection, kl_estimate, ppo_rewards, rollout_correction

B, T = 6, 11


def kl_batch(seed: int):
    """Log-ratios ``ref - logp`` of a few units, with +-50 on a fifth of the tokens."""
    g = generator(seed)
    lp = -3 * torch.rand(B, T, generator=g, dtype=F64)
    ref = lp + torch.randn(B, T, generator=g, dtype=F64)
    far = torch.rand(B, T, generator=g) < 0.2
    sign = torch.where(torch.rand(B, T, generator=g) < 0.5, 1.0, -1.0).to(F64)
    ref = torch.where(far, lp + 50.0 * sign, ref)
    return lp, ref, padded_mask(B, T, g, holes=True), g


def run_kl(kind: str, clamp=None, estimate_clamp=None):
    """Values and gradients (random upstream) of ``kl_estimate`` against the formula."""

    def run(dtype):
        lp64, ref64, m, g = kl_batch(seed=len(kind))
        x, xr = leaf(lp64, dtype)
        ref = ref64.to(dtype)
        bad = torch.where(m, x, torch.full_like(x, math.nan))
        out = kl_estimate(bad, ref, kind=kind, mask=m, clamp=clamp, estimate_clamp=estimate_clamp)
        want = ref_kl(xr, ref.double(), kind, clamp=clamp, estimate_clamp=estimate_clamp) * m
        up = torch.randn(B, T, generator=g, dtype=F64)
        (got_g,) = torch.autograd.grad((out * up.to(out.dtype)).sum(), x)
        (want_g,) = torch.autograd.grad((want * up).sum(), xr)
        return [(f"kl {kind} value", want.detach(), out.detach()), (f"kl {kind} grad", want_g, got_g)]

    return run


KL_RUNS = {
    "abs": run_kl("abs"),
    "k1+": run_kl("k1+"),
    "k3+": run_kl("k3+"),
    "abs+": run_kl("abs+"),
    "low_var_kl (clamp 20, estimate 10)": run_kl("low_var_kl", clamp=20.0, estimate_clamp=10.0),
    "k3+ (estimate clamp 10)": run_kl("k3+", estimate_clamp=10.0),
    "k2 (estimate clamp 3)": run_kl("mse", estimate_clamp=3.0),
}


@pytest.mark.parametrize("case", list(KL_RUNS))
def test_kl_kinds_vs_float64(case):
    check_pairs(KL_RUNS[case](F64), atol=1e-12, rtol=1e-12)


def test_straight_through_forms_value_and_gradient():
    """``k1+`` / ``k3+`` / ``abs+`` carry the value of k1 / k3 / |log r| and the gradient of k2, which is
    ``logp - ref`` (Tang & Munos 2025); the aliases are verl's names."""
    lp, ref, m, _ = kl_batch(seed=3)
    x = lp.clone().requires_grad_()
    for plus, base in (("k1+", "k1"), ("k3+", "k3"), ("abs+", "abs"), ("kl+", "k1"), ("low_var_kl+", "k3")):
        est = kl_estimate(x, ref, kind=plus, mask=m)
        assert torch.equal(est.detach(), kl_estimate(lp, ref, kind=base, mask=m))
        (gx,) = torch.autograd.grad(est.sum(), x)
        assert_close(f"{plus} grad", (lp - ref) * m, gx, atol=1e-12)
    for alias, name in (("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")):
        assert torch.equal(kl_estimate(lp, ref, kind=alias), kl_estimate(lp, ref, kind=name))
    assert set(KL_KINDS) >= {"k1", "k2", "k3", "abs", "k1+", "k3+", "low_var_kl+"}
    with pytest.raises(ValueError, match="estimate_clamp must be > 0"):
        kl_estimate(lp, ref, kind="k3", estimate_clamp=0.0)


def run_rollout(case: str):
    correction, rk = ROLLOUT[case]

    def run(dtype):
        g = generator(11)
        m = padded_mask(B, T, g, holes=True)
        old = (-3 * torch.rand(B, T, generator=g, dtype=F64)).to(dtype)
        samp = (old.double() + 0.35 * torch.randn(B, T, generator=g, dtype=F64)).to(dtype)
        samp = torch.where(m, samp, torch.full_like(samp, math.nan))  # never read
        weights, keep = ref_rollout(old.double(), torch.nan_to_num(samp.double()), m, **rk)
        out = rollout_correction(old, samp, m, correction)
        assert torch.equal(out.mask, keep), case
        got = out.weights.expand(B, T) * m
        return [(f"rollout {case} weights", weights * m, got)]

    return run


ROLLOUT = {
    "tis-token": (RolloutCorrection(), dict()),
    "tis-token [0.8, 1.2]": (
        RolloutCorrection(is_threshold=1.2, is_threshold_lower=0.8),
        dict(is_hi=1.2, is_lo=0.8),
    ),
    "tis-sequence": (
        RolloutCorrection(is_level="sequence", is_threshold=3.0),
        dict(is_level="sequence", is_hi=3.0),
    ),
    "mis-token drop": (
        RolloutCorrection(is_level=None, rs_level="token", rs_threshold=1.3),
        dict(is_level=None, rs_level="token", rs_hi=1.3),
    ),
    "mis-sequence zero": (
        RolloutCorrection(rs_level="sequence", rs_threshold=2.0, drop_rejected=False),
        dict(rs_level="sequence", rs_hi=2.0, drop=False),
    ),
    "mis-geometric [0.9, 1.1]": (
        RolloutCorrection(is_level=None, rs_level="geometric", rs_threshold=1.1, rs_threshold_lower=0.9),
        dict(is_level=None, rs_level="geometric", rs_hi=1.1, rs_lo=0.9),
    ),
}
ROLLOUT_RUNS = {case: run_rollout(case) for case in ROLLOUT}


@pytest.mark.parametrize("case", list(ROLLOUT))
def test_rollout_correction_vs_float64(case):
    check_pairs(ROLLOUT_RUNS[case](F64), atol=1e-12, rtol=1e-12)


def test_rollout_correction_bad_options_raise():
    with pytest.raises(ValueError, match="rs_threshold"):
        RolloutCorrection(rs_level="geometric")
    with pytest.raises(ValueError, match="'token', 'sequence', 'geometric'"):
        RolloutCorrection(rs_level="product", rs_threshold=2.0)
    with pytest.raises(ValueError, match="'token', 'sequence'"):
        RolloutCorrection(is_level="geometric")
    with pytest.raises(ValueError, match="must be <="):
        RolloutCorrection(is_threshold=1.5, is_threshold_lower=2.0)
    with pytest.raises(ValueError, match="> 0"):
        RolloutCorrection(is_threshold=-1.0)
    with pytest.raises(ValueError, match="shape"):
        rollout_correction(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def run_reward_clip(dtype):
    """``reward_clip_range`` clamps the score before it is added at the last token (OpenRLHF)."""
    g = generator(12)
    m = padded_mask(B, T, g)
    old = (-torch.rand(B, T, generator=g, dtype=F64)).to(dtype)
    ref = (-torch.rand(B, T, generator=g, dtype=F64)).to(dtype)
    scores = (4 * torch.randn(B, generator=g, dtype=F64)).to(dtype)
    out = ppo_rewards(scores, old, ref, m, kl_coef=0.1, kl_estimator="abs", reward_clip_range=(-2.0, 3.0))
    expect = torch.zeros(B, T, dtype=F64)
    for i in range(B):
        n = int(m[i].sum())
        for s in range(n):
            expect[i, s] = -0.1 * abs(float(ref[i, s]) - float(old[i, s]))
        if n:
            expect[i, n - 1] += min(max(float(scores[i]), -2.0), 3.0)
    return [("ppo rewards clipped", expect, out.rewards)]


def test_ppo_rewards_reward_clip_vs_float64():
    check_pairs(run_reward_clip(F64), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="lo <= hi"):
        ppo_rewards(
            torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), reward_clip_range=(1, 0)
        )
