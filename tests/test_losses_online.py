"""Online / self-play preference losses: online DPO / IPO (Guo et al. 2024, arXiv:2402.04792),
XPO (Xie et al. 2024, arXiv:2405.21046), Nash-MD (Munos et al. 2023, arXiv:2312.00886).

float64 references are written from the formulas below; online DPO also against TRL 1.16's
``OnlineDPOTrainer.training_step`` (pairing by reward, DPO / IPO, metrics) on an instance built
without ``__init__`` whose generation / forward / reward seams are stubs returning fixed tensors.
XPO and Nash-MD are not in the TRL 1.16 wheel: float64 references only.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn.functional as F
from _assert import assert_close
from _inputs import F64, check_losses, normal

from alignops.losses import nash_md_loss, online_dpo_loss, xpo_loss


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
    r = p + normal(10, 2, seed=5, scale=4)
    sc = normal(10, 2, seed=6)
    sc[3, 1] = sc[3, 0]  # tie -> first completion is chosen
    check_losses(
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
    rm, rr = mm + normal(b, seed=8, scale=3), mr + normal(b, seed=9, scale=3)
    ms, rs = normal(b, seed=10), normal(b, seed=11)
    rs[2] = ms[2]  # tie -> the policy sample is chosen

    def ref(a, c):
        chosen = ms >= rs
        um, ur = a - rm, c - rr
        d = torch.where(chosen, um - ur, ur - um)
        pair = -F.logsigmoid(0.1 * d) if kind == "sigmoid" else (d - 1 / (2 * 0.1)) ** 2
        return pair + 1e-3 * c

    out = check_losses(
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
    lr = lp + 0.5 * normal(b, t, seed=12)
    mask = torch.rand(b, t, generator=torch.Generator().manual_seed(13)) > 0.25
    mask[2] = False  # empty completion
    ms, xs = normal(b, seed=14), normal(b, seed=15)

    def ref(a):
        m = mask.to(F64)
        prob = torch.sigmoid(ms - xs)
        score = (prob - 0.5) * (a * m).sum(1)
        kl = ((a - lr).detach() * a * m).sum(1)
        return 0.1 * kl - score

    out = check_losses(
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


def test_online_extreme_values_are_finite():
    """|log-probs| ~ 1e4: finite values and gradients."""
    big = torch.tensor([-1e4, -1.0, -5e3, -3.0], requires_grad=True)
    zero = torch.zeros(4)
    outs = [
        online_dpo_loss(torch.stack((big, big.flip(0)), 1), torch.zeros(4, 2), torch.randn(4, 2)),
        xpo_loss(big, big.flip(0), zero, zero, chosen_mask=torch.tensor([True, False, True, False])),
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


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(5)
    with pytest.raises(ValueError, match="valid choices: 'sigmoid', 'ipo'"):
        online_dpo_loss(torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2), loss_type="hinge")
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        online_dpo_loss(torch.randn(3), torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="chosen_mask, or model_scores"):
        xpo_loss(x, x, x, x)
    with pytest.raises(ValueError, match="probability, or model_scores"):
        nash_md_loss(torch.randn(2, 3), torch.randn(2, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="must match"):
        nash_md_loss(torch.randn(2, 3), torch.randn(2, 4), mask=torch.ones(2, 3), probability=torch.rand(2))
