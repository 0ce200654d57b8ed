"""Listwise losses: listwise DPO (Plackett–Luce; Rafailov et al. 2023, App. A.3), LiPO (λ, softmax,
pair-logistic, pair-hinge, list-MLE; Liu et al. 2024, arXiv:2402.01878), RRHF (Yuan et al. 2023,
arXiv:2304.05302), PRO (Song et al. 2023, arXiv:2306.17492), with masks for unequal list lengths.

The float64 references below loop over prompts and pairs in plain Python, straight from the papers'
formulas (PRO even divides by the temperatures T = 1/(r_k - r_i) literally). TRL has no listwise
trainer, so there is no TRL comparison here; K = 2 listwise DPO is checked against the DPO formula.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _assert import assert_close
from _inputs import F64, check_losses, generator

from alignops.losses import lipo_loss, listwise_dpo_loss, pro_loss, rrhf_loss

B, K = 7, 5  # odd sizes; the mask below gives lists of 5, 4, 3, 2, 1 responses


def _lists(seed=0, distinct=False):
    g = generator(seed)
    n = torch.randint(1, 40, (B, K), generator=g)
    n[0, 1] = 0  # a zero-length completion
    pol = -(0.1 + 2 * torch.rand(B, K, generator=g, dtype=F64)) * n
    ref = pol + 4 * torch.randn(B, K, generator=g, dtype=F64)
    if distinct:
        labels = torch.randn(B, K, generator=g, dtype=F64)  # RM scores, no ties
    else:
        labels = torch.randint(0, 4, (B, K), generator=g).to(F64)  # graded labels with ties
    mask = torch.ones(B, K, dtype=torch.bool)
    for b, k in enumerate([5, 4, 3, 2, 1, 5, 3]):
        mask[b, k:] = False
    return pol, ref, labels, n, mask


def _rows(mask):
    return [torch.nonzero(mask[b]).flatten().tolist() for b in range(mask.shape[0])]


def _ranked(idx, labels_row):
    return sorted(idx, key=lambda i: -float(labels_row[i]))  # stable: ties keep position order


# ---------------------------------------------------------------------------------------------
# float64 references


def ref_pl(s, labels, mask, top_k=None):
    out = []
    for b, idx in enumerate(_rows(mask)):
        order = _ranked(idx, labels[b])
        total = s.new_zeros(())
        for k in range(len(order)):
            if top_k is not None and k >= top_k:
                break
            rest = torch.stack([s[b, j] for j in order[k:]])
            total = total + s[b, order[k]] - torch.logsumexp(rest, 0)
        out.append(-total)
    return torch.stack(out)


def _pair_sum(labels, mask, term):
    out = []
    for b, idx in enumerate(_rows(mask)):
        total = labels.new_zeros(())
        for i in idx:
            for j in idx:
                if labels[b, i] > labels[b, j]:
                    total = total + term(b, i, j)
        out.append(total)
    return torch.stack(out)


def ref_lipo(s, labels, mask, kind):
    if kind == "pair_logistic":
        return _pair_sum(labels, mask, lambda b, i, j: -F.logsigmoid(s[b, i] - s[b, j]))
    if kind == "pair_hinge":
        return _pair_sum(labels, mask, lambda b, i, j: torch.clamp(1 - (s[b, i] - s[b, j]), min=0))
    if kind == "list_mle":
        return ref_pl(s, labels, mask)
    if kind == "softmax":
        out = []
        for b, idx in enumerate(_rows(mask)):
            logp = torch.log_softmax(s[b, idx], 0)
            w = (
                labels[b, idx] / labels[b, idx].sum()
                if labels[b, idx].sum() > 0
                else torch.zeros(len(idx), dtype=F64)
            )
            out.append(-(w * logp).sum())
        return torch.stack(out)
    if kind == "lambda":
        ranks = {}
        for b, idx in enumerate(_rows(mask)):
            by_score = sorted(idx, key=lambda i: -float(s[b, i].detach()))
            for r, i in enumerate(by_score, start=1):
                ranks[b, i] = r

        def term(b, i, j):
            gain = abs(2.0 ** float(labels[b, i]) - 2.0 ** float(labels[b, j]))
            disc = abs(1 / math.log(1 + ranks[b, i]) - 1 / math.log(1 + ranks[b, j]))
            return gain * disc * -F.logsigmoid(s[b, i] - s[b, j])

        return _pair_sum(labels, mask, term)
    raise AssertionError(kind)


def ref_rrhf(pol, labels, n, mask, *, lp, w):
    out = []
    p = pol / n.clamp_min(1).to(F64) ** lp
    rank = _pair_sum(labels, mask, lambda b, i, j: torch.clamp(p[b, j] - p[b, i], min=0))  # ψ_j < ψ_i
    for b, idx in enumerate(_rows(mask)):
        best = _ranked(idx, labels[b])[0]
        out.append(w * rank[b] - pol[b, best] / max(1, int(n[b, best])))
    return torch.stack(out)


def ref_pro(pol, labels, n, mask, *, sft_weight):
    rho = pol / n.clamp_min(1).to(F64)
    out = []
    for b, idx in enumerate(_rows(mask)):
        order = _ranked(idx, labels[b])
        r = [float(labels[b, i]) for i in order]
        total = pol.new_zeros(())
        for k in range(len(order) - 1):
            temps = {i: 1.0 / (r[k] - r[i]) for i in range(k + 1, len(order))}  # T_k^i, i > k
            t_kk = min(temps.values())
            logits = [rho[b, order[k]] / t_kk] + [rho[b, order[i]] / temps[i] for i in temps]
            total = total - (logits[0] - torch.logsumexp(torch.stack(logits), 0))
        sft = sft_weight * (len(order) - 1) ** 2 * -pol[b, order[0]]
        out.append(total + sft)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 2])
def test_listwise_dpo_matches_reference(top_k):
    pol, ref, labels, _, mask = _lists()
    beta = 0.3
    out = check_losses(
        "listwise_dpo",
        lambda p: listwise_dpo_loss(p, ref, labels, beta=beta, mask=mask, top_k=top_k),
        lambda p: ref_pl(beta * (p - ref), labels, mask, top_k),
        [pol],
    )
    # metrics: best / worst-labelled rewards, pairwise accuracy
    s = beta * (pol - ref)
    best, worst, correct, total = [], [], 0, 0
    for b, idx in enumerate(_rows(mask)):
        order = _ranked(idx, labels[b])
        best.append(s[b, order[0]])
        worst.append(s[b, order[-1]])
        for i in idx:
            for j in idx:
                if labels[b, i] > labels[b, j]:
                    total += 1
                    correct += int(s[b, i] > s[b, j])
    m = out.metrics
    assert_close("rewards/chosen", torch.stack(best).mean(), m["rewards/chosen"], atol=1e-5, rtol=1e-5)
    assert_close("rewards/rejected", torch.stack(worst).mean(), m["rewards/rejected"], atol=1e-5, rtol=1e-5)
    assert_close(
        "rewards/accuracies", torch.tensor(correct / total, dtype=F64), m["rewards/accuracies"], atol=1e-6
    )


def test_listwise_dpo_with_two_responses_is_dpo():
    g = generator(1)
    pw, pl = -30 * torch.rand(9, generator=g, dtype=F64), -30 * torch.rand(9, generator=g, dtype=F64)
    rw, rl = pw + torch.randn(9, generator=g, dtype=F64), pl + torch.randn(9, generator=g, dtype=F64)
    labels = torch.tensor([[1.0, 0.0]]).expand(9, 2)
    check_losses(
        "listwise_dpo-k2",
        lambda a, b: listwise_dpo_loss(torch.stack((a, b), 1), torch.stack((rw, rl), 1), labels, beta=0.1),
        lambda a, b: -F.logsigmoid(0.1 * ((a - rw) - (b - rl))),
        [pw, pl],
    )


@pytest.mark.parametrize("kind", ["lambda", "softmax", "pair_logistic", "pair_hinge", "list_mle"])
def test_lipo_matches_reference(kind):
    pol, ref, labels, _, mask = _lists(seed=2)
    beta = 0.05
    check_losses(
        f"lipo[{kind}]",
        lambda p: lipo_loss(p, ref, labels, beta=beta, loss_type=kind, mask=mask),
        lambda p: ref_lipo(beta * (p - ref), labels, mask, kind),
        [pol],
    )


@pytest.mark.parametrize("lp", [1.0, 0.5])
def test_rrhf_matches_reference(lp):
    pol, _, labels, n, mask = _lists(seed=3)
    check_losses(
        "rrhf",
        lambda p: rrhf_loss(p, labels, lengths=n, length_penalty=lp, rrhf_weight=100.0, mask=mask),
        lambda p: ref_rrhf(p, labels, n, mask, lp=lp, w=100.0),
        [pol],
        atol=1e-4,
        rtol=1e-5,
    )


def test_pro_matches_reference():
    pol, _, scores, n, mask = _lists(seed=4, distinct=True)
    check_losses(
        "pro",
        lambda p: pro_loss(p, scores, lengths=n, sft_weight=0.05, mask=mask),
        lambda p: ref_pro(p, scores, n, mask, sft_weight=0.05),
        [pol],
        atol=1e-4,
        rtol=1e-5,
    )


def test_pro_tied_scores_are_finite():
    """Tied RM scores make T = 1/(r_k - r_i) infinite; the product form gives a 0 factor instead."""
    pol = torch.tensor([[-3.0, -5.0, -2.0, -4.0]], requires_grad=True)
    scores = torch.tensor([[1.0, 1.0, 0.5, 0.5]])
    n = torch.tensor([[3, 5, 2, 4]])
    out = pro_loss(pol, scores, lengths=n, sft_weight=0.0)
    (g,) = torch.autograd.grad(out.loss * 1.7, pol)
    assert torch.isfinite(out.loss) and torch.isfinite(g).all()
    # by hand: ρ = (-1, -1, -1, -1); k=0: diffs (0, .5, .5), pos scale .5 -> logits (-.5, 0, -.5, -.5)
    lg = torch.tensor([-0.5, 0.0, -0.5, -0.5], dtype=F64)
    k0 = torch.logsumexp(lg, 0) - lg[0]
    lg1 = torch.tensor([-0.5, -0.5, -0.5], dtype=F64)  # k=1: diffs (.5, .5)
    k1 = torch.logsumexp(lg1, 0) - lg1[0]
    lg2 = torch.tensor([0.0, 0.0], dtype=F64)  # k=2: diff 0
    k2 = torch.logsumexp(lg2, 0) - lg2[0]
    assert_close("pro-ties", (k0 + k1 + k2).reshape(1), out.losses, atol=1e-6)


def test_extreme_scores_are_finite():
    """|β·u| ~ 1e3 inside every listwise loss: finite values and gradients."""
    pol = torch.tensor([[-1.0, -1e4, -5e3, -2.0], [-1e4, -1.0, -3.0, -9e3]], requires_grad=True)
    ref = torch.zeros(2, 4)
    labels = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 3.0, 1.0, 2.0]])
    n = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]])
    outs = [listwise_dpo_loss(pol, ref, labels)]
    outs += [
        lipo_loss(pol, ref, labels, beta=0.1, loss_type=k)
        for k in ("lambda", "softmax", "pair_logistic", "pair_hinge")
    ]
    outs += [rrhf_loss(pol, labels, lengths=n), pro_loss(pol, labels, lengths=n)]
    for out in outs:
        (g,) = torch.autograd.grad((out.losses * torch.randn(2)).sum(), pol)
        assert torch.isfinite(out.losses).all() and torch.isfinite(g).all()
    want = ref_pl(0.1 * pol.detach().double(), labels.double(), torch.ones(2, 4, dtype=torch.bool))
    assert_close("extreme-pl", want, outs[0].losses, atol=1e-2, rtol=1e-6)


def test_bf16_inputs():
    pol, ref, labels, _, mask = _lists(seed=5)
    pol, ref = pol / 10, ref / 10  # keep bf16 rounding of the inputs moderate
    ref_b = ref.to(torch.bfloat16)
    out = check_losses(
        "bf16-lipo",
        lambda p: lipo_loss(p, ref_b, labels, beta=0.5, loss_type="pair_logistic", mask=mask),
        lambda p: ref_lipo(0.5 * (p - ref_b.double()), labels, mask, "pair_logistic"),
        [pol],
        dtype=torch.bfloat16,
        atol=1e-4,
        rtol=1e-5,
        gatol=1e-4,
        grtol=8e-3,
    )
    assert out.loss.dtype == torch.float32


def test_list_inputs_and_validation():
    pol, ref, labels, n, mask = _lists(seed=6)
    rows = _rows(mask)
    as_lists = [[t[b, idx] for b, idx in enumerate(rows)] for t in (pol, ref, labels)]
    padded = listwise_dpo_loss(pol, ref, labels, mask=mask)
    listed = listwise_dpo_loss(*as_lists, mask=mask)
    assert_close("list-input", padded.losses, listed.losses, atol=0)
    with pytest.raises(ValueError, match="unequal K"):
        listwise_dpo_loss(*as_lists)
    equal = [[t[0], t[5]] for t in (pol, ref, labels)]  # two lists of 5: stacked without a mask
    assert_close("list-equal", padded.losses[[0, 5]], listwise_dpo_loss(*equal).losses, atol=1e-6)
    with pytest.raises(ValueError, match="disagree with mask"):
        listwise_dpo_loss(*as_lists, mask=torch.ones(B, K, dtype=torch.bool))
    with pytest.raises(
        ValueError, match="valid choices: 'lambda', 'softmax', 'pair_logistic', 'pair_hinge', 'list_mle'"
    ):
        lipo_loss(pol, ref, labels, loss_type="ndcg")
    with pytest.raises(ValueError, match="shape"):
        lipo_loss(pol, ref[:, :3], labels)
    with pytest.raises(ValueError, match="NaN"):
        rrhf_loss(pol * float("nan"), labels, lengths=n)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        pro_loss(pol[0], labels[0], lengths=n[0])
    with pytest.raises(ValueError, match="labels >= 0"):
        lipo_loss(pol, ref, labels - 5, loss_type="softmax")
