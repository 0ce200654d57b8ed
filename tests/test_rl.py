"""Tests for alignops.rl: KL estimators, group / leave-one-out advantages, PPO rewards, whitening,
GAE, sampler importance ratios, truncation masks (the fused hidden-states -> loss paths:
test_fused.py).

References are written here from the papers' / TRL's formulas in float64 with plain Python loops
(group statistics with the ``statistics`` module), independent of the vectorised library code.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from _assert import assert_close
from _inputs import padded_mask

from alignops.rl import (
    compute_gae,
    group_advantages,
    kl_estimate,
    ppo_rewards,
    rloo_advantages,
    sampling_importance_ratio,
    truncated_mask,
    whiten,
)

NAN = float("nan")


# ------------------------------------------------------------------------------------------
# KL estimators
# ------------------------------------------------------------------------------------------


def test_kl_estimators_expectations_and_signs():
    """Samples from q = policy: E_q[k1] = E_q[k3] = KL(q || p) exactly; E_q[k2] = E_q[(log p/q)^2]/2.
    Checked by weighting the estimator on every outcome with q (no sampling noise), so a swapped
    sign convention (r = q / p) fails."""
    g = torch.Generator().manual_seed(0)
    logq = torch.log_softmax(torch.randn(41, generator=g, dtype=torch.float64), 0)  # 41 outcomes: odd
    logp = torch.log_softmax(torch.randn(41, generator=g, dtype=torch.float64), 0)
    q = logq.exp()
    kl_qp = (q * (logq - logp)).sum()
    for kind in ("k1", "k3"):
        est = kl_estimate(logq, logp, kind=kind)
        assert_close(f"E_q[{kind}] = KL(q||p)", kl_qp, (q * est).sum(), atol=1e-12)
    e_k2 = (q * 0.5 * (logp - logq) ** 2).sum()
    assert_close("E_q[k2]", e_k2, (q * kl_estimate(logq, logp, kind="k2")).sum(), atol=1e-12)
    assert (kl_estimate(logq, logp, kind="k3") >= 0).all() and (kl_estimate(logq, logp, kind="k2") >= 0).all()
    assert (kl_estimate(logq, logp, kind="k1") < 0).any()  # k1 can be negative per token


def test_kl_estimate_per_token_values_grad_mask_clamp_bf16():
    g = torch.Generator().manual_seed(1)
    b, t = 5, 11
    lp = (-3 * torch.rand(b, t, generator=g, dtype=torch.float64)).requires_grad_()
    ref = -3 * torch.rand(b, t, generator=g, dtype=torch.float64)
    m = padded_mask(b, t, g)
    gu = torch.randn(b, t, generator=g, dtype=torch.float64)
    for kind in ("k1", "k2", "k3"):
        lr = ref - lp
        expect = {"k1": -lr, "k2": 0.5 * lr**2, "k3": torch.exp(lr) - 1 - lr}[kind] * m
        (g_ref,) = torch.autograd.grad((expect * gu).sum(), lp)
        bad_lp = torch.where(m, lp, torch.full_like(lp, NAN))
        bad_ref = torch.where(m, ref, torch.full_like(ref, math.inf))
        out = kl_estimate(bad_lp, bad_ref, kind=kind, mask=m)
        (g_out,) = torch.autograd.grad((out * gu).sum(), lp)
        assert_close(f"{kind} values", expect, out, atol=1e-12)
        assert_close(f"{kind} grad", g_ref, g_out, atol=1e-12)
        assert (out[~m] == 0).all() and (g_out[~m] == 0).all()
    # clamp: log r = 30 is evaluated at 5, and the gradient stops there
    x = torch.tensor([0.0, -1.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([30.0, -0.5], dtype=torch.float64)
    k3 = kl_estimate(x, r, kind="k3", clamp=5.0)
    assert_close(
        "clamped k3",
        torch.tensor([math.exp(5) - 6, math.exp(0.5) - 1.5], dtype=torch.float64),
        k3,
        atol=1e-12,
    )
    (gx,) = torch.autograd.grad(k3.sum(), x)
    assert gx[0] == 0 and gx[1] != 0
    # bf16 in -> float32 out, computed from the bf16 values
    k = kl_estimate(lp.detach().bfloat16(), ref.bfloat16(), kind="k3")
    lr16 = ref.bfloat16().double() - lp.detach().bfloat16().double()
    assert k.dtype == torch.float32
    assert_close("bf16 k3", torch.exp(lr16) - 1 - lr16, k, atol=2e-6, rtol=2e-6)
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        kl_estimate(lp, ref, kind="k4")


# ------------------------------------------------------------------------------------------
# GRPO group advantages
# ------------------------------------------------------------------------------------------


def _stdev(vals):
    return statistics.stdev(vals) if len(vals) >= 2 else NAN


def ref_group_adv(rewards, g, *, scale="group", weights=None, agg="sum_then_normalize", eps=1e-4):
    """Plain-Python transcription of TRL GRPOTrainer's advantages (NaN = reward function returned None)."""
    rows = [[float(v) for v in (r if isinstance(r, list) else [r])] for r in rewards.tolist()]
    k = len(rows[0])
    w = weights or [1.0] * k
    n = len(rows)

    def combine(row, vals):
        if all(math.isnan(v) for v in row):
            return NAN
        return sum(wi * v for wi, v in zip(w, vals) if not math.isnan(v))

    if agg == "sum_then_normalize":
        tot = [combine(r, r) for r in rows]
        allv = [v for v in tot if not math.isnan(v)]
        out = []
        for i, r in enumerate(tot):
            grp = [v for v in tot[(i // g) * g : (i // g + 1) * g] if not math.isnan(v)]
            a = r - (sum(grp) / len(grp) if grp else NAN)
            if scale == "group":
                a = a / ((_stdev(grp) if g > 1 else 0.0) + eps)
            elif scale == "batch":
                a = a / ((_stdev(allv) if n > 1 else 0.0) + eps)
            out.append(0.0 if math.isnan(a) else a)
        return torch.tensor(out, dtype=torch.float64)
    z = [[NAN] * k for _ in range(n)]
    for j in range(k):
        for i in range(n):
            grp = [rows[p][j] for p in range((i // g) * g, (i // g + 1) * g) if not math.isnan(rows[p][j])]
            sd = _stdev(grp) if g > 1 else 0.0
            z[i][j] = (rows[i][j] - sum(grp) / len(grp)) / (sd + eps) if grp else NAN
    tot = [combine(rows[i], z[i]) for i in range(n)]
    allv = [v for v in tot if not math.isnan(v)]
    mean, sd = sum(allv) / len(allv), (_stdev(allv) if n > 1 else 0.0)
    return torch.tensor([0.0 if math.isnan(v) else (v - mean) / (sd + eps) for v in tot], dtype=torch.float64)


def _rewards_with_edge_cases(g):
    """15 completions = 5 prompts x 3 generations, 2 reward functions, with: an unscorable row,
    a group whose rewards are all equal, a group with a single scorable completion, a partly
    None row."""
    r = torch.randn(15, 2, generator=g, dtype=torch.float64)
    r[1] = NAN  # unscorable
    r[3:6] = torch.tensor([0.5, -1.0], dtype=torch.float64)  # all-equal group -> std 0 -> advantage 0
    r[6:8] = NAN  # group 2 has one scorable completion (row 8)
    r[10, 0] = NAN  # one reward function returned None
    return r


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("agg", ["sum_then_normalize", "normalize_then_sum"])
def test_group_advantages_vs_reference(scale, agg):
    g = torch.Generator().manual_seed(2)
    r = _rewards_with_edge_cases(g)
    w = [1.0, 0.37]
    out = group_advantages(
        r, num_generations=3, scale_rewards=scale, reward_weights=w, multi_objective_aggregation=agg
    )
    assert_close(f"adv {scale}/{agg}", ref_group_adv(r, 3, scale=scale, weights=w, agg=agg), out, atol=1e-10)
    assert out[1] == 0.0  # unscorable
    if agg == "sum_then_normalize":  # all-equal group and single-scorable group carry no signal
        assert (out[3:9] == 0).all()
    # 1-D combined rewards, float32 in
    r1 = torch.randn(12, generator=g)
    out1 = group_advantages(r1, num_generations=4, scale_rewards=scale)
    assert out1.dtype == torch.float32
    assert_close(f"adv 1-D {scale}", ref_group_adv(r1.double(), 4, scale=scale), out1, atol=1e-5, rtol=1e-5)


def test_group_advantages_single_generation_and_errors():
    r = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    assert (group_advantages(r, num_generations=1) == 0).all()  # G = 1 (eval): no signal
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(r, num_generations=2)
    with pytest.raises(ValueError, match="'group', 'batch', 'none'"):
        group_advantages(r, num_generations=1, scale_rewards="global")


# ------------------------------------------------------------------------------------------
# RLOO advantages
# ------------------------------------------------------------------------------------------


def ref_rloo_adv(rewards, g, *, kl=None, beta=0.05, normalize=False, clip=None, eps=1e-4):
    r = [float(v) for v in rewards.tolist()]
    if clip is not None:
        r = [v if math.isnan(v) else min(max(v, clip[0]), clip[1]) for v in r]
    if kl is not None:
        r = [v - beta * float(k) for v, k in zip(r, kl.tolist())]
    adv = []
    for i, v in enumerate(r):
        others = [r[j] for j in range((i // g) * g, (i // g + 1) * g) if j != i and not math.isnan(r[j])]
        adv.append(v - sum(others) / len(others) if others and g > 1 else (NAN if g > 1 else 0.0))
    if normalize:
        vals = [a for a in adv if not math.isnan(a)]
        mean, sd = sum(vals) / len(vals), _stdev(vals)
        adv = [(a - mean) / (sd + eps) for a in adv]
    return torch.tensor([0.0 if math.isnan(a) else a for a in adv], dtype=torch.float64)


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_vs_reference(normalize):
    g = torch.Generator().manual_seed(3)
    r = torch.randn(12, generator=g, dtype=torch.float64) * 2
    r[2] = NAN  # unscorable
    r[6] = NAN  # leaves row 7 alone in its group of 2 (G = 2, TRL's default)
    kl = torch.randn(12, generator=g, dtype=torch.float64).abs()
    out = rloo_advantages(
        r,
        num_generations=2,
        sequence_kl=kl,
        beta=0.05,
        normalize_advantages=normalize,
        reward_clip_range=(-2.5, 2.5),
    )
    ref = ref_rloo_adv(r, 2, kl=kl, beta=0.05, normalize=normalize, clip=(-2.5, 2.5))
    assert_close("rloo adv G=2", ref, out, atol=1e-12)
    assert out[2] == 0 and out[7] == 0
    r3 = torch.randn(12, generator=g, dtype=torch.float64)
    out3 = rloo_advantages(r3, num_generations=4, normalize_advantages=normalize)
    assert_close("rloo adv G=4", ref_rloo_adv(r3, 4, normalize=normalize), out3, atol=1e-12)
    # multi-function rewards: weighted NaN-skipping sum, as for GRPO
    rk = torch.randn(12, 3, generator=g, dtype=torch.float64)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    assert_close(
        "rloo [N, K]",
        rloo_advantages((rk * w).sum(-1), num_generations=3),
        rloo_advantages(rk, num_generations=3, reward_weights=w),
        atol=1e-12,
    )


# ------------------------------------------------------------------------------------------
# PPO rollout pipeline: rewards, whitening, GAE (TRL PPOTrainer's rollout)
# ------------------------------------------------------------------------------------------


def trl_style_rollout(old, ref, values, scores, seq_len, *, kl_coef, kind, gamma, lam, whiten_rewards):
    """TRL PPOTrainer's rollout (rewards, whitening, GAE) transcribed on full-length arrays: padding
    log-probs set to INVALID_LOGPROB = 1.0 (log r = 0), values zeroed past seq_len + 1, score at
    seq_len + 1."""
    b, t = old.shape
    idx = torch.arange(t)[None, :]
    pad = idx > seq_len[:, None]
    pad_p1 = idx > (seq_len + 1)[:, None]
    old = old.masked_fill(pad, 1.0)
    ref = ref.masked_fill(pad, 1.0)
    values = values.masked_fill(pad_p1, 0.0)
    logr = ref - old
    kl = -logr if kind == "k1" else torch.expm1(logr) - logr
    rewards = -kl_coef * kl
    end = torch.where(seq_len + 1 < t, seq_len + 1, seq_len)
    rewards[torch.arange(b), end] += scores

    def masked_whiten(x, valid, shift_mean=True):
        vals = x[valid]
        mean, var = vals.mean(), vals.var(unbiased=True)
        out = (x - mean) / torch.sqrt(var + 1e-8)
        return out + mean if not shift_mean else out

    if whiten_rewards:
        rewards = masked_whiten(rewards, ~pad_p1, shift_mean=False).masked_fill(pad_p1, 0.0)
    adv_rev, last = [], torch.zeros(b, dtype=old.dtype)
    for s in reversed(range(t)):
        nxt = values[:, s + 1] if s < t - 1 else torch.zeros(b, dtype=old.dtype)
        last = rewards[:, s] + gamma * nxt - values[:, s] + gamma * lam * last
        adv_rev.append(last)
    adv = torch.stack(adv_rev[::-1], 1)
    returns = adv + values
    adv = masked_whiten(adv, ~pad).masked_fill(pad, 0.0)
    return adv, returns, ~pad, ~pad_p1


@pytest.mark.parametrize("kind,whiten_rewards", [("k1", False), ("k3", True)])
def test_ppo_rollout_pipeline_matches_trl_transcription(kind, whiten_rewards):
    g = torch.Generator().manual_seed(4)
    b, t = 6, 9
    seq_len = torch.tensor([8, 3, 0, 7, 5, 2])  # index of the last response token; 8 = full length
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    ref = old + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    scores = torch.randn(b, generator=g, dtype=torch.float64)
    exp_adv, exp_ret, mask, vmask = trl_style_rollout(
        old,
        ref,
        values,
        scores,
        seq_len,
        kl_coef=0.05,
        kind=kind,
        gamma=0.97,
        lam=0.9,
        whiten_rewards=whiten_rewards,
    )
    score_index = torch.where(seq_len + 1 < t, seq_len + 1, seq_len)
    rw = ppo_rewards(scores, old, ref, mask, kl_coef=0.05, kl_estimator=kind, score_index=score_index)
    rewards = whiten(rw.rewards, vmask, shift_mean=False) if whiten_rewards else rw.rewards
    gae = compute_gae(rewards, values, vmask, gamma=0.97, lam=0.9)
    adv = whiten(gae.advantages, mask)
    assert_close("advantages", exp_adv, adv, atol=1e-10)
    assert_close("returns", exp_ret * vmask, gae.returns, atol=1e-10)


def test_ppo_rewards_default_index_and_kl():
    g = torch.Generator().manual_seed(5)
    b, t = 5, 7
    m = padded_mask(b, t, g)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64)
    ref = -torch.rand(b, t, generator=g, dtype=torch.float64)
    scores = torch.randn(b, generator=g, dtype=torch.float64)
    out = ppo_rewards(scores, old, ref, m, kl_coef=0.1)
    expect = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        n = int(m[i].sum())
        for s in range(n):
            expect[i, s] = -0.1 * (old[i, s] - ref[i, s])
        if n:
            expect[i, n - 1] += scores[i]  # last response token
    assert_close("ppo rewards", expect, out.rewards, atol=1e-12)
    assert_close("non-score", -0.1 * (old - ref) * m, out.non_score_reward, atol=1e-12)
    assert (out.kl[~m] == 0).all()


def test_whiten_vs_formula():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64) * 3 + 2
    m = padded_mask(4, 9, g)
    vals = x[m]
    mean, var = vals.mean(), vals.var(unbiased=True)
    for shift in (True, False):
        expect = ((x - mean) / torch.sqrt(var + 1e-8) + (0 if shift else mean)) * m
        assert_close(f"whiten shift={shift}", expect, whiten(x, m, shift_mean=shift), atol=1e-12)
    one = torch.zeros_like(m)
    one[2, 3] = True
    with pytest.raises(ValueError, match="at least 2"):
        whiten(x, one)


def test_gae_with_holes_equals_gae_on_compacted_sequence():
    """A masked position is skipped: GAE equals the plain scan over the valid positions only."""
    g = torch.Generator().manual_seed(7)
    b, t = 4, 10
    m = torch.rand(b, t, generator=g) > 0.35
    m[0] = False
    r = torch.randn(b, t, generator=g, dtype=torch.float64)
    v = torch.randn(b, t, generator=g, dtype=torch.float64)
    out = compute_gae(r, v, m, gamma=0.9, lam=0.8)
    for i in range(b):
        idx = m[i].nonzero().squeeze(-1).tolist()
        a_next, v_next = 0.0, 0.0
        for s in reversed(idx):
            a = r[i, s].item() + 0.9 * v_next - v[i, s].item() + 0.9 * 0.8 * a_next
            assert abs(out.advantages[i, s].item() - a) < 1e-12
            assert abs(out.returns[i, s].item() - (a + v[i, s].item())) < 1e-12
            a_next, v_next = a, v[i, s].item()
    assert (out.advantages[~m] == 0).all() and (out.returns[~m] == 0).all()
    full = compute_gae(r, v, gamma=1.0, lam=1.0)  # gamma = lam = 1: A_t = sum_{s>=t} r_s - V_t
    assert_close("gae lam=1", r.flip(1).cumsum(1).flip(1) - v, full.advantages, atol=1e-12)


# ------------------------------------------------------------------------------------------
# sampler importance ratio, truncation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_sampling_importance_ratio(mode):
    g = torch.Generator().manual_seed(8)
    b, t = 5, 8
    m = padded_mask(b, t, g)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64)
    samp = old + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)
    samp[3, 1] = NAN  # the sampler could not score this token
    out = sampling_importance_ratio(old, samp, m, mode=mode, clip_min=0.5, clip_max=1.5)
    rows = []
    for i in range(b):
        d = [
            0.0 if (not m[i, s] or math.isnan(samp[i, s])) else (old[i, s] - samp[i, s]).item()
            for s in range(t)
        ]
        ratios = [math.exp(sum(d))] if mode.startswith("sequence") else [math.exp(x) for x in d]
        if mode.endswith("truncate"):
            ratios = [min(max(x, 0.5), 1.5) for x in ratios]
        else:
            ratios = [x if 0.5 <= x <= 1.5 else 0.0 for x in ratios]
        rows.append(ratios)
    assert_close(mode, torch.tensor(rows, dtype=torch.float64), out, atol=1e-12)


def test_truncated_mask():
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [1, 1, 1, 1, 3], [4, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    # row 0 ends on EOS 2, row 1 runs out of budget, row 2 ends on EOS 3, row 3 ends on 4, row 4 empty
    expect = torch.tensor([False, True, False, True, False])
    assert torch.equal(truncated_mask(ids, m, eos_token_ids=[2, 3]), expect)
    assert torch.equal(
        truncated_mask(ids, m, eos_token_ids=2, pad_token_id=4),
        torch.tensor([False, True, True, False, False]),
    )
