"""Advantage estimators of alignops.rl with groups of any size (``group_ids``): GRPO, RLOO, ReMax
(Li et al. 2023, arXiv:2310.10505), OPO (Hao et al. 2025, arXiv:2505.23585), pass@k (Tang et al.
2025, arXiv:2503.19595), REINFORCE++ with and without baseline (Hu 2025, arXiv:2501.03262).

References are plain Python over a dict of groups (``statistics`` for the stds), written from the
papers' formulas and verl's documented behaviour. Batches mix group sizes 1..5 in shuffled order,
an all-equal group, unscorable (NaN) completions and a group with one scorable completion.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

import pytest
import torch
from _assert import assert_close
from _inputs import F64, generator

from alignops.rl import (
    group_advantages,
    opo_advantages,
    passk_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    rloo_advantages,
)

NAN = float("nan")
EPS = 1e-4


def uneven_batch(seed: int = 0, dtype=F64):
    """17 completions in 6 groups of sizes 5, 3, 1, 4, 2, 2 with shuffled labels (not 0..5, not
    contiguous); group 7 has equal rewards, group 11 one NaN, group 2 (size 2) one scorable."""
    g = generator(seed)
    labels = [3] * 5 + [7] * 3 + [42] * 1 + [11] * 4 + [2] * 2 + [-5] * 2
    perm = torch.randperm(len(labels), generator=g)
    ids = torch.tensor(labels)[perm]
    r = torch.randn(len(labels), generator=g, dtype=F64)
    r[ids == 7] = 0.25
    r[(ids == 11).nonzero()[0]] = NAN
    r[(ids == 2).nonzero()[0]] = NAN
    lengths = torch.randint(0, 30, (len(labels),), generator=g)
    return ids, r.to(dtype), lengths


def groups_of(ids):
    out = defaultdict(list)
    for i, k in enumerate(ids.tolist()):
        out[k].append(i)
    return out


def scorable(r, idx):
    return [i for i in idx if not math.isnan(float(r[i]))]


def ref_grpo_adv(r, ids, *, scale="group", single="zero", eps=EPS):
    r = [float(v) for v in r]
    allv = [v for v in r if not math.isnan(v)]
    batch_sd = statistics.stdev(allv)
    out = [0.0] * len(r)
    for idx in groups_of(ids).values():
        ok = scorable(r, idx)
        if not ok:
            continue
        vals = [r[i] for i in ok]
        mean, sd = statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else NAN)
        if len(vals) == 1:
            if single == "zero":
                continue
            mean, sd = 0.0, 1.0
        for i in ok:
            a = r[i] - mean
            a = a / (sd + eps) if scale == "group" else (a / (batch_sd + eps) if scale == "batch" else a)
            out[i] = a
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("single", ["zero", "reward"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_with_uneven_group_ids(scale, single):
    ids, r, _ = uneven_batch(seed=1)
    out = group_advantages(r, group_ids=ids, scale_rewards=scale, single_completion=single)
    assert_close(
        f"grpo ids {scale}/{single}", ref_grpo_adv(r, ids, scale=scale, single=single), out, atol=1e-12
    )
    assert (out[ids == 7] == 0).all()  # equal rewards: no signal
    # contiguous equal groups through group_ids equal num_generations, float32 in
    r2 = torch.randn(12, generator=generator(2))
    a = group_advantages(r2, num_generations=4, scale_rewards=scale)
    b = group_advantages(r2, group_ids=torch.arange(12) // 4, scale_rewards=scale)
    assert a.dtype == torch.float32 and torch.equal(a, b)


def ref_rloo_adv(r, ids, *, single="zero"):
    r = [float(v) for v in r]
    out = [0.0] * len(r)
    for idx in groups_of(ids).values():
        ok = scorable(r, idx)
        for i in ok:
            others = [r[j] for j in ok if j != i]
            if others:
                out[i] = r[i] - sum(others) / len(others)
            elif single == "reward":
                out[i] = r[i]
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("single", ["zero", "reward"])
def test_rloo_advantages_with_uneven_group_ids(single):
    ids, r, _ = uneven_batch(seed=3)
    out = rloo_advantages(r, group_ids=ids, single_completion=single)
    assert_close(f"rloo ids {single}", ref_rloo_adv(r, ids, single=single), out, atol=1e-12)


def test_remax_advantages():
    g = generator(4)
    r = torch.randn(9, generator=g, dtype=F64)
    greedy = torch.randn(3, generator=g, dtype=F64).repeat_interleave(3)  # one greedy rollout per prompt
    r[4] = NAN
    expect = [0.0 if math.isnan(a) else a - b for a, b in zip(r.tolist(), greedy.tolist())]
    assert_close("remax", torch.tensor(expect, dtype=F64), remax_advantages(r, greedy), atol=1e-15)


def ref_opo_adv(r, ids, n, *, single="zero"):
    r = [float(v) for v in r]
    out = [0.0] * len(r)
    for idx in groups_of(ids).values():
        ok = scorable(r, idx)
        if not ok:
            continue
        tot = sum(float(n[i]) for i in ok)
        b = sum(float(n[i]) * r[i] for i in ok) / tot if tot > 0 else statistics.fmean(r[i] for i in ok)
        if len(ok) == 1 and single == "reward":
            b = 0.0
        for i in ok:
            out[i] = r[i] - b
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("single", ["zero", "reward"])
def test_opo_advantages_length_weighted_baseline(single):
    ids, r, n = uneven_batch(seed=5)
    n[ids == 3] = 0  # a group whose completions are all empty: plain mean
    out = opo_advantages(r, n, group_ids=ids, single_completion=single)
    assert_close(f"opo {single}", ref_opo_adv(r, ids, n, single=single), out, atol=1e-12)
    assert (out[ids == 7] == 0).all()
    assert out[ids == 42].item() == (0.0 if single == "zero" else r[ids == 42].item())


def ref_passk_adv(r, ids, *, scale="group", single="zero", eps=EPS):
    """Leave-one-out pass@n: A_i = max_j r_j - max_{j != i} r_j (0 for all but the best)."""
    r = [float(v) for v in r]
    out = [0.0] * len(r)
    for idx in groups_of(ids).values():
        ok = scorable(r, idx)
        if len(ok) == 1:
            out[ok[0]] = (
                (r[ok[0]] / (1 + eps) if scale == "group" else r[ok[0]]) if single == "reward" else 0.0
            )
            continue
        for i in ok:
            a = max(r[j] for j in ok) - max(r[j] for j in ok if j != i)
            out[i] = a / (statistics.stdev([r[j] for j in ok]) + eps) if scale == "group" and a else a
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("single", ["zero", "reward"])
@pytest.mark.parametrize("scale", ["group", "none"])
def test_passk_advantages(scale, single):
    ids, r, _ = uneven_batch(seed=6)
    r[(ids == 11).nonzero()[1]] = r[(ids == 11).nonzero()[2]]  # a tie below the best
    out = passk_advantages(r, group_ids=ids, scale_rewards=scale, single_completion=single)
    assert_close(
        f"pass@k {scale}/{single}", ref_passk_adv(r, ids, scale=scale, single=single), out, atol=1e-12
    )
    tied = torch.tensor([1.0, 3.0, 3.0, 0.5], dtype=F64)  # a tie at the top: every advantage is 0
    assert (passk_advantages(tied, num_generations=4) == 0).all()


def ref_reinforce_pp(rewards, mask, gamma):
    b, t = rewards.shape
    ret = torch.zeros(b, t, dtype=F64)
    for i in range(b):
        g_next = 0.0
        for s in reversed(range(t)):
            if mask[i, s]:
                g_next = float(rewards[i, s]) + gamma * g_next
                ret[i, s] = g_next
    vals = ret[mask]
    return torch.where(mask, (ret - vals.mean()) / torch.sqrt(vals.var() + 1e-8), torch.zeros_like(ret))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_advantages(gamma):
    g = generator(7)
    b, t = 5, 11
    mask = torch.rand(b, t, generator=g) > 0.25  # holes: the return carries across them
    mask[0] = False  # an empty row
    rewards = 0.1 * torch.randn(b, t, generator=g, dtype=F64)
    rewards[~mask] = NAN  # never read
    out = reinforce_pp_advantages(rewards, mask, gamma=gamma)
    assert_close(f"reinforce++ gamma={gamma}", ref_reinforce_pp(rewards, mask, gamma), out, atol=1e-12)


def test_reinforce_pp_baseline_advantages():
    ids, r, _ = uneven_batch(seed=8)
    g = generator(9)
    mask = torch.rand(len(r), 9, generator=g) > 0.3
    mask[0] = False
    out = reinforce_pp_baseline_advantages(r, mask, group_ids=ids)
    centred = ref_rloo_adv(torch.zeros_like(r), ids)  # zeros: only to get the shape
    for idx in groups_of(ids).values():
        ok = scorable([float(v) for v in r], idx)
        for i in ok:
            centred[i] = float(r[i]) - statistics.fmean(float(r[j]) for j in ok)
    keep = mask & ~torch.isnan(r)[:, None]
    tok = centred[:, None].expand_as(mask)
    vals = tok[keep]
    expect = torch.where(keep, (tok - vals.mean()) / torch.sqrt(vals.var() + 1e-8), torch.zeros_like(tok))
    assert_close("reinforce++ baseline", expect, out, atol=1e-12)


def test_advantage_bad_input_raises():
    r = torch.randn(6, dtype=F64)
    with pytest.raises(ValueError, match="exactly one of num_generations"):
        group_advantages(r)
    with pytest.raises(ValueError, match="exactly one of num_generations"):
        rloo_advantages(r, num_generations=2, group_ids=torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        passk_advantages(r, group_ids=torch.zeros(6))
    with pytest.raises(ValueError, match=r"group_ids must have shape \(6,\)"):
        opo_advantages(r, torch.ones(6), group_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        opo_advantages(r, -torch.ones(6), num_generations=3)
    with pytest.raises(ValueError, match="'zero', 'reward'"):
        group_advantages(r, num_generations=3, single_completion="mean")
    with pytest.raises(ValueError, match="shape"):
        remax_advantages(r, r[:-1])
    with pytest.raises(ValueError, match=r"\[N\]"):
        passk_advantages(r.view(3, 2), num_generations=3)
    with pytest.raises(ValueError, match="mask must be"):
        reinforce_pp_baseline_advantages(r, torch.ones(5, 4, dtype=torch.bool), num_generations=3)
