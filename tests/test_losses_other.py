"""Negative-only (SPEC §10), online / self-play (SPEC §11) and reward-model (SPEC §2) losses.

float64 references are written from the SPEC formulas below. TRL 1.16 comparisons, on the same
random inputs: ``RewardTrainer.compute_loss`` (Bradley–Terry, margin, centering) and
``OnlineDPOTrainer.training_step`` (pairing by reward, DPO / IPO, metrics), each on an instance built
without ``__init__`` whose generation / forward / reward seams are stubs returning fixed tensors.
XPO and Nash-MD are not in the TRL 1.16 wheel (SPEC §0): float64 references only.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from itertools import combinations
from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn.functional as F

from alignops.losses import (
    bradley_terry_loss,
    d2o_loss,
    nash_md_loss,
    npo_loss,
    online_dpo_loss,
    plackett_luce_loss,
    simnpo_loss,
    xpo_loss,
)
from tests._assert import assert_close

F64 = torch.float64


def _check(
    name, fn_ours, fn_ref, floats, *, atol=1e-5, rtol=1e-5, dtype=torch.float32, gatol=None, grtol=None
):
    """Values of ``losses``/``loss`` and gradients (random upstream) w.r.t. every float input."""
    xo = [t.detach().to(dtype).requires_grad_(True) for t in floats]
    xr = [t.detach().to(dtype).to(F64).requires_grad_(True) for t in floats]
    out = fn_ours(*xo)
    want = fn_ref(*xr)
    assert_close(f"{name}/losses", want, out.losses, atol=atol, rtol=rtol)
    assert_close(f"{name}/loss", want.mean(), out.loss, atol=atol, rtol=rtol)
    g = torch.randn(want.shape, dtype=F64)
    got = torch.autograd.grad((out.losses * g.to(out.losses.dtype)).sum(), xo, allow_unused=True)
    exp = torch.autograd.grad((want * g).sum(), xr, allow_unused=True)
    for i, (a, e) in enumerate(zip(got, exp)):
        a = torch.zeros_like(xo[i]) if a is None else a
        e = torch.zeros_like(xr[i]) if e is None else e
        assert a.dtype == dtype
        assert_close(f"{name}/grad{i}", e, a, atol=gatol or atol, rtol=grtol or rtol)
    return out


def _rand(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------
# negative-only (SPEC §10)


def test_npo_matches_reference():
    p = -40 * torch.rand(11, dtype=F64)
    r = (p + _rand(11, seed=1, scale=5)).detach()
    retain = torch.tensor(2.3, dtype=F64)
    out = _check(
        "npo",
        lambda a, c: npo_loss(a, r, beta=0.1, retain_loss=c, retain_weight=0.5),
        lambda a, c: -(2 / 0.1) * F.logsigmoid(-0.1 * (a - r)) + 0.5 * c,
        [p, retain],
    )
    assert_close("npo/rewards", (0.1 * (p - r)).mean(), out.metrics["rewards/rejected"], atol=1e-5, rtol=1e-5)


def test_npo_small_beta_is_gradient_ascent():
    """SPEC §10.1: ℓ - (2/β) ln 2 → u and ∇ℓ → ∇S_θ (GA) as β → 0 (float64 inputs stay float64)."""
    p = (-20 * torch.rand(9, dtype=F64)).requires_grad_(True)
    r = p.detach() + _rand(9, seed=2)
    beta = 1e-6
    out = npo_loss(p, r, beta=beta)
    u = (p - r).detach()
    assert_close("npo-ga/value", u, out.losses - (2 / beta) * math.log(2), atol=1e-4)
    (g,) = torch.autograd.grad(out.losses.sum(), p)
    assert_close("npo-ga/grad", torch.ones(9, dtype=F64), g, atol=1e-4)


def test_simnpo_matches_reference():
    n = torch.randint(0, 30, (12,))
    s = -(0.1 + torch.rand(12, dtype=F64)) * n
    _check(
        "simnpo",
        lambda a: simnpo_loss(a, rejected_lengths=n, beta=2.5, gamma=0.3),
        lambda a: -(2 / 2.5) * F.logsigmoid(-2.5 * a / n.clamp_min(1) - 0.3),
        [s],
    )


def test_d2o_matches_reference():
    b, k = 6, 4
    ps = -30 * torch.rand(b, k, dtype=F64)
    rs = ps + _rand(b, k, seed=3, scale=3)
    pl = -30 * torch.rand(b, dtype=F64)
    rl = pl + _rand(b, seed=4, scale=3)
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

    _check("d2o", lambda a, c: d2o_loss(a, rs, c, rl, beta=0.2, alpha=0.3, mask=mask), ref, [ps, pl])


# ---------------------------------------------------------------------------------------------
# online (SPEC §11)


def ref_online(p, r, sc, beta, kind):
    first = sc[:, 0] >= sc[:, 1]
    u = p - r.detach()
    uw = torch.where(first, u[:, 0], u[:, 1])
    ul = torch.where(first, u[:, 1], u[:, 0])
    d = uw - ul
    return -F.logsigmoid(beta * d) if kind == "sigmoid" else (d - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_online_dpo_matches_reference(kind):
    p = -50 * torch.rand(10, 2, dtype=F64)
    r = p + _rand(10, 2, seed=5, scale=4)
    sc = _rand(10, 2, seed=6)
    sc[3, 1] = sc[3, 0]  # tie -> first completion is chosen
    _check(
        f"online[{kind}]",
        lambda a: online_dpo_loss(a, r, sc, beta=0.2, loss_type=kind),
        lambda a: ref_online(a, r, sc, 0.2, kind),
        [p],
    )


def test_online_dpo_matches_trl():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.online_dpo import OnlineDPOTrainer
    g = torch.Generator().manual_seed(7)
    b, t, eos = 5, 6, 2
    comp_ids = torch.randint(3, 20, (2 * b, t), generator=g)
    comp_mask = torch.ones(2 * b, t, dtype=torch.long)
    for i in range(2 * b):
        end = int(torch.randint(2, t + 1, (), generator=g))
        if i % 3:
            comp_ids[i, end - 1] = eos
        comp_mask[i, end:] = 0
    tok = (-3 * torch.rand(2 * b, t, generator=g)).requires_grad_(True)
    ref_tok = -3 * torch.rand(2 * b, t, generator=g)
    rewards = torch.randn(2 * b, generator=g)
    rewards[b + 1] = rewards[1]  # a tie
    policy, ref_model = NS(train=lambda: None), object()

    for kind, penalty in [("sigmoid", None), ("ipo", 0.7)]:
        trainer = object.__new__(OnlineDPOTrainer)
        captured = {}
        acc = NS(
            device=torch.device("cpu"),
            gather_for_metrics=lambda x: x,
            backward=lambda loss, c=captured: c.update(loss=loss),
        )
        fields = dict(
            args=NS(
                use_vllm=False,
                loss_type=kind,
                missing_eos_penalty=penalty,
                torch_empty_cache_steps=None,
                optim="adamw_torch",
                n_gpu=1,
                gradient_accumulation_steps=1,
            ),
            accelerator=acc,
            _beta=0.3,
            eos_token_ids=[eos],
            ref_model=ref_model,
            reward_funcs=[object()],
            stats=defaultdict(list),
            state=NS(global_step=0, epoch=0),
            processing_class=NS(batch_decode=lambda ids, **k: ["x"] * len(ids)),
            _generate=lambda model, prompts, images=None: (
                torch.zeros(2 * b, 1, dtype=torch.long),
                torch.ones(2 * b, 1, dtype=torch.long),
                comp_ids,
                comp_mask,
                None,
            ),
            _forward=lambda model, pi, pm, ci, cm, vi=None: (tok if model is policy else ref_tok) * cm,
            _calculate_rewards_from_functions=lambda **kw: rewards.clone(),
        )
        for k, v in fields.items():
            setattr(trainer, k, v)
        trainer.training_step(policy, {"prompt": ["p"] * b})
        trl_loss = captured["loss"]

        s = (tok * comp_mask).sum(-1)
        s_ref = (ref_tok * comp_mask).sum(-1)
        eos_in = (comp_ids == eos).any(-1)
        pair = lambda x: torch.stack((x[:b], x[b:]), 1)  # noqa: E731
        out = online_dpo_loss(
            pair(s),
            pair(s_ref),
            pair(rewards),
            beta=0.3,
            loss_type=kind,
            contain_eos=pair(eos_in),
            missing_eos_penalty=penalty,
        )
        assert_close(f"online-vs-trl[{kind}]/loss", trl_loss.detach(), out.loss, atol=1e-6, rtol=1e-6)
        for key in (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
            "objective/kl",
            "objective/entropy",
            "objective/non_score_reward",
            "objective/rlhf_reward",
            "objective/scores",
            "objective/scores_margin",
            "val/contain_eos_token",
        ):
            assert_close(
                f"online-vs-trl[{kind}]/{key}",
                torch.tensor(trainer.stats[key][-1]),
                out.metrics[key],
                atol=1e-5,
                rtol=1e-5,
            )
        up = torch.randn(())
        (g_trl,) = torch.autograd.grad(trl_loss * up, tok)
        (g_ours,) = torch.autograd.grad(out.loss * up, tok)
        assert_close(f"online-vs-trl[{kind}]/grad", g_trl, g_ours, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_xpo_matches_reference(kind):
    b = 9
    mm, mr = -40 * torch.rand(b, dtype=F64), -40 * torch.rand(b, dtype=F64)
    rm, rr = mm + _rand(b, seed=8, scale=3), mr + _rand(b, seed=9, scale=3)
    ms, rs = _rand(b, seed=10), _rand(b, seed=11)
    rs[2] = ms[2]  # tie -> the policy sample is chosen

    def ref(a, c):
        chosen = ms >= rs
        um, ur = a - rm, c - rr
        d = torch.where(chosen, um - ur, ur - um)
        pair = -F.logsigmoid(0.1 * d) if kind == "sigmoid" else (d - 1 / (2 * 0.1)) ** 2
        return pair + 1e-3 * c

    out = _check(
        f"xpo[{kind}]",
        lambda a, c: xpo_loss(
            a, c, rm, rr, model_scores=ms, ref_scores=rs, beta=0.1, alpha=1e-3, loss_type=kind
        ),
        ref,
        [mm, mr],
    )
    assert_close("xpo/loss/xpo", (1e-3 * mr).mean(), out.metrics["loss/xpo"], atol=1e-7)
    same = xpo_loss(mm, mr, rm, rr, chosen_mask=ms >= rs, beta=0.1, alpha=1e-3, loss_type=kind)
    assert_close("xpo/chosen_mask", same.losses, out.losses, atol=1e-6, rtol=1e-6)


def test_nash_md_matches_reference():
    b, t = 6, 9
    lp = -3 * torch.rand(b, t, dtype=F64)
    lr = lp + 0.5 * _rand(b, t, seed=12)
    mask = torch.rand(b, t, generator=torch.Generator().manual_seed(13)) > 0.25
    mask[2] = False  # empty completion
    ms, xs = _rand(b, seed=14), _rand(b, seed=15)

    def ref(a):
        m = mask.to(F64)
        prob = torch.sigmoid(ms - xs)
        score = (prob - 0.5) * (a * m).sum(1)
        kl = ((a - lr).detach() * a * m).sum(1)
        return 0.1 * kl - score

    out = _check(
        "nash_md",
        lambda a: nash_md_loss(a, lr, mask=mask, model_scores=ms, mixture_scores=xs, beta=0.1),
        ref,
        [lp],
    )
    kl = ((lp - lr) * mask).sum(1).mean()
    assert_close("nash_md/loss/kl", kl, out.metrics["loss/kl"], atol=1e-5, rtol=1e-5)
    prob = torch.sigmoid(ms - xs)
    same = nash_md_loss(lp, lr, mask=mask, probability=prob, beta=0.1)
    assert_close("nash_md/probability", same.losses, out.losses, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# reward modelling (SPEC §2)


@pytest.mark.parametrize("variant", ["plain", "margin", "soft", "center"])
def test_bradley_terry_pairs_match_reference(variant):
    b = 13
    rc, rr = _rand(b, seed=16, scale=2), _rand(b, seed=17, scale=2)
    margin = torch.randint(0, 4, (b,)).to(F64) / 3
    p = torch.rand(b, dtype=F64)
    kw = {
        "margin": {"margin": margin},
        "soft": {"soft_labels": p},
        "center": {"center_rewards_coefficient": 0.01},
    }

    def ref(c, r):
        d = c - r
        if variant == "margin":
            return -F.logsigmoid(d - margin)
        if variant == "soft":
            return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))
        base = -F.logsigmoid(d)
        return base + 0.01 * (c + r) ** 2 if variant == "center" else base

    out = _check(
        f"bt[{variant}]", lambda c, r: bradley_terry_loss(c, r, **kw.get(variant, {})), ref, [rc, rr]
    )
    assert_close("bt/accuracy", (rc > rr).double().mean(), out.metrics["accuracy"], atol=1e-7)
    assert_close("bt/margin", (rc - rr).mean(), out.metrics["margin"], atol=1e-6)
    assert_close("bt/max_reward", torch.cat((rc, rr)).max(), out.metrics["max_reward"], atol=1e-6)


def test_bradley_terry_rankings_use_all_pairs():
    """InstructGPT: K ranked responses per prompt, mean over the C(K,2) pairs, mean over prompts."""
    b, k = 5, 6
    r = _rand(b, k, seed=18, scale=2)
    rank = torch.stack([torch.randperm(k, generator=torch.Generator().manual_seed(i)) for i in range(b)]).to(
        F64
    )
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False

    def ref(x):
        out = []
        for i in range(b):
            idx = torch.nonzero(mask[i]).flatten().tolist()
            pairs = [(a, c) if rank[i, a] > rank[i, c] else (c, a) for a, c in combinations(idx, 2)]
            assert len(pairs) == math.comb(len(idx), 2)
            out.append(
                torch.stack(
                    [-F.logsigmoid(x[i, w] - x[i, l]) + 0.01 * (x[i, w] + x[i, l]) ** 2 for w, l in pairs]
                ).mean()
            )
        return torch.stack(out)

    _check(
        "bt-ranking",
        lambda x: bradley_terry_loss(rewards=x, labels=rank, mask=mask, center_rewards_coefficient=0.01),
        ref,
        [r],
    )


def test_plackett_luce_matches_reference_and_k2_is_bradley_terry():
    b, k = 6, 5
    r = _rand(b, k, seed=19, scale=3)
    labels = torch.randint(0, 3, (b, k), generator=torch.Generator().manual_seed(20)).to(F64)
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[2, 3:] = False

    def ref(x):
        out = []
        for i in range(b):
            idx = sorted(torch.nonzero(mask[i]).flatten().tolist(), key=lambda j: -float(labels[i, j]))
            out.append(-sum(x[i, idx[q]] - torch.logsumexp(x[i, idx[q:]], 0) for q in range(len(idx))))
        return torch.stack(out)

    _check("pl", lambda x: plackett_luce_loss(x, labels, mask=mask), ref, [r])
    pair = _rand(8, 2, seed=21)
    two = plackett_luce_loss(pair, torch.tensor([[1, 0]]).expand(8, 2))
    assert_close("pl-k2", bradley_terry_loss(pair[:, 0], pair[:, 1]).losses, two.losses, atol=1e-6)


def test_bradley_terry_matches_trl_reward_trainer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import RewardTrainer
    g = torch.Generator().manual_seed(22)
    b = 7
    logits = (2 * torch.randn(2 * b, 1, generator=g)).requires_grad_(True)
    margin = torch.randint(0, 4, (b,), generator=g).float() / 3
    for use_margin, eta in [(False, None), (True, 0.01)]:
        trainer = object.__new__(RewardTrainer)
        acc = NS(gather_for_metrics=lambda x: x, gather=lambda x: x)
        for k, v in dict(
            model=NS(training=True),
            args=NS(center_rewards_coefficient=eta),
            accelerator=acc,
            _metrics={"train": defaultdict(list)},
            _total_train_tokens=0,
            _tp_size=1,
        ).items():
            setattr(trainer, k, v)
        inputs = {"attention_mask": torch.ones(2 * b, 3, dtype=torch.long)}
        if use_margin:
            inputs["margin"] = margin
        trl_loss = trainer.compute_loss(lambda **kw: NS(logits=logits), inputs)
        out = bradley_terry_loss(
            logits[:b, 0],
            logits[b:, 0],
            margin=margin if use_margin else None,
            center_rewards_coefficient=eta,
        )
        assert_close("bt-vs-trl/loss", trl_loss.detach(), out.loss, atol=1e-6, rtol=1e-6)
        m = trainer._metrics["train"]
        for key in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
            assert_close(f"bt-vs-trl/{key}", torch.tensor(m[key][-1]), out.metrics[key], atol=1e-6, rtol=1e-6)
        up = torch.randn(())
        (g_trl,) = torch.autograd.grad(trl_loss * up, logits)
        (g_ours,) = torch.autograd.grad(out.loss * up, logits)
        assert_close("bt-vs-trl/grad", g_trl, g_ours, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# numerics and validation


def test_extreme_values_and_bf16():
    big = torch.tensor([-1e4, -1.0, -5e3, -3.0], requires_grad=True)
    zero = torch.zeros(4)
    outs = [
        npo_loss(big, zero, beta=0.1),
        simnpo_loss(big, rejected_lengths=torch.ones(4, dtype=torch.long), beta=0.1),
        online_dpo_loss(torch.stack((big, big.flip(0)), 1), torch.zeros(4, 2), torch.randn(4, 2)),
        xpo_loss(big, big.flip(0), zero, zero, chosen_mask=torch.tensor([True, False, True, False])),
        bradley_terry_loss(big, big.flip(0)),
        bradley_terry_loss(big, big.flip(0), soft_labels=torch.full((4,), 0.3)),
        plackett_luce_loss(torch.stack((big, big.flip(0)), 1), torch.tensor([[1, 0]]).expand(4, 2)),
        d2o_loss(
            torch.stack((big, big.flip(0)), 1), torch.zeros(4, 2), big.flip(0), zero, beta=0.1, alpha=0.1
        ),
        nash_md_loss(
            torch.stack((big, big.flip(0)), 1),
            torch.zeros(4, 2),
            mask=torch.ones(4, 2),
            probability=torch.rand(4),
        ),
    ]
    for out in outs:
        (gr,) = torch.autograd.grad((out.losses * torch.randn(out.losses.shape)).sum(), big)
        assert torch.isfinite(out.losses).all() and torch.isfinite(gr).all()
    rc, rr = _rand(9, seed=23), _rand(9, seed=24)
    out = _check(
        "bt-bf16",
        lambda c, r: bradley_terry_loss(c, r),
        lambda c, r: -F.logsigmoid(c - r),
        [rc, rr],
        dtype=torch.bfloat16,
        atol=1e-5,
        rtol=1e-5,
        gatol=1e-4,
        grtol=8e-3,
    )
    assert out.loss.dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(5)
    with pytest.raises(ValueError, match="batch size"):
        npo_loss(x, x[:3])
    with pytest.raises(ValueError, match="NaN"):
        npo_loss(x * float("nan"), x)
    with pytest.raises(ValueError, match="rejected_lengths"):
        simnpo_loss(x, rejected_lengths=None)
    with pytest.raises(ValueError, match="valid choices: sigmoid, ipo"):
        online_dpo_loss(torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2), loss_type="hinge")
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        online_dpo_loss(torch.randn(3), torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="chosen_mask, or model_scores"):
        xpo_loss(x, x, x, x)
    with pytest.raises(ValueError, match="probability, or model_scores"):
        nash_md_loss(torch.randn(2, 3), torch.randn(2, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="must match"):
        nash_md_loss(torch.randn(2, 3), torch.randn(2, 4), mask=torch.ones(2, 3), probability=torch.rand(2))
    with pytest.raises(ValueError, match="rewards_chosen and rewards_rejected"):
        bradley_terry_loss(x, x, rewards=torch.randn(2, 3))
    with pytest.raises(ValueError, match="cannot be combined"):
        bradley_terry_loss(x, x, margin=x, soft_labels=torch.rand(5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bradley_terry_loss(x, x, soft_labels=x + 2)
    with pytest.raises(ValueError, match="unequal K"):
        plackett_luce_loss([torch.randn(3), torch.randn(2)], [torch.arange(3), torch.arange(2)])
    with pytest.raises(ValueError, match="batch size"):
        d2o_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(5), torch.randn(5))
