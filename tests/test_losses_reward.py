"""Reward-model losses: Bradley–Terry (InstructGPT, Ouyang et al. 2022, arXiv:2203.02155; margins,
Touvron et al. 2023, arXiv:2307.09288; centering, Eisenstein et al. 2023, arXiv:2312.09244; soft
labels, Lee et al. 2023, arXiv:2309.00267) and Plackett–Luce, against float64 references written
from the formulas below and against TRL 1.16's ``RewardTrainer.compute_loss`` on the same inputs.
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
from _assert import assert_close
from _inputs import F64, check_losses, normal

from alignops.losses import bradley_terry_loss, plackett_luce_loss


@pytest.mark.parametrize("variant", ["plain", "margin", "soft", "center"])
def test_bradley_terry_pairs_match_reference(variant):
    b = 13
    rc, rr = normal(b, seed=16, scale=2), normal(b, seed=17, scale=2)
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

    out = check_losses(
        f"bt[{variant}]", lambda c, r: bradley_terry_loss(c, r, **kw.get(variant, {})), ref, [rc, rr]
    )
    assert_close("bt/accuracy", (rc > rr).double().mean(), out.metrics["accuracy"], atol=1e-7)
    assert_close("bt/margin", (rc - rr).mean(), out.metrics["margin"], atol=1e-6)
    assert_close("bt/max_reward", torch.cat((rc, rr)).max(), out.metrics["max_reward"], atol=1e-6)


def test_bradley_terry_rankings_use_all_pairs():
    """InstructGPT: K ranked responses per prompt, mean over the C(K,2) pairs, mean over prompts."""
    b, k = 5, 6
    r = normal(b, k, seed=18, scale=2)
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

    check_losses(
        "bt-ranking",
        lambda x: bradley_terry_loss(rewards=x, labels=rank, mask=mask, center_rewards_coefficient=0.01),
        ref,
        [r],
    )


def test_plackett_luce_matches_reference_and_k2_is_bradley_terry():
    b, k = 6, 5
    r = normal(b, k, seed=19, scale=3)
    labels = torch.randint(0, 3, (b, k), generator=torch.Generator().manual_seed(20)).to(F64)
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[2, 3:] = False

    def ref(x):
        out = []
        for i in range(b):
            idx = sorted(torch.nonzero(mask[i]).flatten().tolist(), key=lambda j: -float(labels[i, j]))
            out.append(-sum(x[i, idx[q]] - torch.logsumexp(x[i, idx[q:]], 0) for q in range(len(idx))))
        return torch.stack(out)

    check_losses("pl", lambda x: plackett_luce_loss(x, labels, mask=mask), ref, [r])
    pair = normal(8, 2, seed=21)
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


def test_reward_extreme_values_are_finite():
    """|log-probs| ~ 1e4: finite values and gradients."""
    big = torch.tensor([-1e4, -1.0, -5e3, -3.0], requires_grad=True)
    outs = [
        bradley_terry_loss(big, big.flip(0)),
        bradley_terry_loss(big, big.flip(0), soft_labels=torch.full((4,), 0.3)),
        plackett_luce_loss(torch.stack((big, big.flip(0)), 1), torch.tensor([[1, 0]]).expand(4, 2)),
    ]
    for out in outs:
        (gr,) = torch.autograd.grad((out.losses * torch.randn(out.losses.shape)).sum(), big)
        assert torch.isfinite(out.losses).all() and torch.isfinite(gr).all()


def test_bf16_inputs():
    rc, rr = normal(9, seed=23), normal(9, seed=24)
    out = check_losses(
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
    with pytest.raises(ValueError, match="rewards_chosen and rewards_rejected"):
        bradley_terry_loss(x, x, rewards=torch.randn(2, 3))
    with pytest.raises(ValueError, match="cannot be combined"):
        bradley_terry_loss(x, x, margin=x, soft_labels=torch.rand(5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bradley_terry_loss(x, x, soft_labels=x + 2)
    with pytest.raises(ValueError, match="unequal K"):
        plackett_luce_loss([torch.randn(3), torch.randn(2)], [torch.arange(3), torch.arange(2)])
