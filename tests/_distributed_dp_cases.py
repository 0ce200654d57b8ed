"""Per-process bodies of ``tests/test_distributed_losses.py``: the batch is split unevenly over the
ranks (the last rank's tokens all ignored / masked where that matters); every rank's loss is its
share with the normaliser over all ranks, so the sum of the shares and the sum of the gradients
must equal the single-process run of the whole batch (float64)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from _distributed import max_err

import alignops
from alignops.distributed import global_count, global_loss, global_mean, global_sum
from alignops.losses import RewardRunningMean, bco_loss, grpo_loss, kto_loss
from alignops.reference.logprobs import cross_entropy_ref

TOL = 1e-12


def _rows(world: int, rank: int, n: int) -> slice:
    """Uneven row split: rank 0 gets the most; the last rank exactly one row."""
    if world == 1:
        return slice(0, n)
    cuts = [0] + [round((n - 1) * (r + 1) / (world - 1)) for r in range(world - 1)] + [n]
    cuts[-2] = n - 1
    return slice(cuts[rank], cuts[rank + 1])


def _summed(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def check_cross_entropy(rank, world):
    """Token-mean ``linear_cross_entropy`` / ``cross_entropy`` with ``num_items`` gathered; the
    last rank's tokens are all ignored."""
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 5, 6, 12, 23
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[B - 1] = -100
    targets[0, 2] = -100
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3}
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = cross_entropy_ref(hr @ wr.T, targets, **opts)
    ref.backward()
    rows = _rows(world, rank, B)
    h, w, t = hidden[rows].clone().requires_grad_(), weight.clone().requires_grad_(), targets[rows]
    n = global_count(t != -100)
    loss = alignops.linear_cross_entropy(h, w, t, num_items=n, **opts)
    loss.backward()
    errs = [
        max_err(global_loss(loss), ref),
        max_err(_summed(w.grad), wr.grad),
        max_err(h.grad, hr.grad[rows]),
    ]
    # the same on the logits
    x = (hidden[rows] @ weight.T).requires_grad_()
    loss2 = alignops.cross_entropy(x, t, num_items=n, **opts)
    loss2.backward()
    xr = (hidden @ weight.T).requires_grad_()
    cross_entropy_ref(xr, targets, **opts).backward()
    errs += [max_err(global_loss(loss2), ref), max_err(x.grad, xr.grad[rows])]
    assert n.dtype == torch.int64 and int(n) == int((targets != -100).sum())
    assert max(errs) < TOL, errs


def check_grpo(rank, world):
    """GRPO token-mean (``dapo``: ``num_items``) and sequence-mean (``grpo``: ``num_sequences``)
    with an uneven completion mask; the last rank's row fully masked."""
    g = torch.Generator().manual_seed(4)
    B, T = 7, 9
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref_lp = logps + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) < 0.7).to(torch.float64)
    mask[B - 1] = 0
    rows = _rows(world, rank, B)
    for loss_type, key in (("dapo", "num_items"), ("grpo", "num_sequences"), ("bnpo", "num_items")):
        full = logps.clone().requires_grad_()
        ref = grpo_loss(full, old, adv, mask, ref_logps=ref_lp, beta=0.04, loss_type=loss_type).loss
        ref.backward()
        part = logps[rows].clone().requires_grad_()
        m = mask[rows]
        count = global_count(m) if key == "num_items" else global_count(m.shape[0])
        out = grpo_loss(
            part,
            old[rows],
            adv[rows],
            m,
            ref_logps=ref_lp[rows],
            beta=0.04,
            loss_type=loss_type,
            **{key: count},
        )
        out.loss.backward()
        errs = [max_err(global_loss(out.loss), ref), max_err(part.grad, full.grad[rows])]
        assert max(errs) < TOL, (loss_type, errs)


def check_kto(rank, world):
    """KTO with the batch KL of the mismatched pairs over every rank (and vanilla KTO's reference
    points); ranks hold different numbers of desirable / undesirable samples and pairs (2 ranks)."""
    assert world == 2
    g = torch.Generator().manual_seed(5)
    nd, nu, nk = 6, 5, 7

    def draw(n):
        return -torch.rand(n, generator=g, dtype=torch.float64) * 20

    pw, pl, rw, rl, pk, rk = (draw(n) for n in (nd, nu, nd, nu, nk, nk))
    # 2 ranks: rank 0 has most desirable samples, no undesirable one and no mismatched pair
    sl = [
        {"d": slice(0, 4), "u": slice(0, 0), "k": slice(0, 0)},
        {"d": slice(4, nd), "u": slice(0, nu), "k": slice(0, nk)},
    ][rank]
    for loss_type in ("kto", "vanilla"):
        a, b = pw.clone().requires_grad_(), pl.clone().requires_grad_()
        kw = {"policy_kl_logps": pk, "ref_kl_logps": rk} if loss_type == "kto" else {}
        ref = kto_loss(a, b, rw, rl, loss_type=loss_type, **kw)
        ref.loss.backward()
        a2, b2 = pw[sl["d"]].clone().requires_grad_(), pl[sl["u"]].clone().requires_grad_()
        kw2 = {"policy_kl_logps": pk[sl["k"]], "ref_kl_logps": rk[sl["k"]]} if loss_type == "kto" else {}
        out = kto_loss(
            a2, b2, rw[sl["d"]], rl[sl["u"]], loss_type=loss_type, process_group=dist.group.WORLD, **kw2
        )
        out.loss.backward()
        errs = [max_err(global_loss(out.loss), ref.loss), max_err(a2.grad, a.grad[sl["d"]])]
        errs.append(max_err(b2.grad, b.grad[sl["u"]]))
        if loss_type == "kto":
            errs.append(max_err(out.metrics["kl"], ref.metrics["kl"]))
        assert max(errs) < TOL, (loss_type, errs)


def check_bco(rank, world):
    """BCO with a running reward mean fed by every rank, over two steps."""
    g = torch.Generator().manual_seed(6)
    mean_ref, mean_dp = RewardRunningMean(), RewardRunningMean()
    for step, (nd, nu) in enumerate(((5, 3), (2, 6))):
        pw, pl = (-torch.rand(n, generator=g, dtype=torch.float64) * 10 for n in (nd, nu))
        rw, rl = (-torch.rand(n, generator=g, dtype=torch.float64) * 10 for n in (nd, nu))
        a, b = pw.clone().requires_grad_(), pl.clone().requires_grad_()
        ref = bco_loss(a, b, rw, rl, delta=mean_ref)
        ref.loss.backward()
        d, u = _rows(world, rank, nd), _rows(world, world - 1 - rank, nu)
        a2, b2 = pw[d].clone().requires_grad_(), pl[u].clone().requires_grad_()
        out = bco_loss(a2, b2, rw[d], rl[u], delta=mean_dp, process_group=dist.group.WORLD)
        out.loss.backward()
        errs = [
            max_err(global_loss(out.loss), ref.loss),
            max_err(a2.grad, a.grad[d]),
            max_err(b2.grad, b.grad[u]),
        ]
        errs.append(abs(mean_dp.mean - mean_ref.mean))
        assert max(errs) < TOL, (step, errs)


def check_helpers(rank, world):
    x = torch.arange(rank + 1, dtype=torch.float64)  # rank r holds 0..r
    every = torch.cat([torch.arange(r + 1, dtype=torch.float64) for r in range(world)])
    assert max_err(global_mean(x), every.mean()) < TOL
    assert max_err(global_sum(x), every.sum()) < TOL
    assert int(global_count(torch.zeros(3))) == 1  # clamped: an all-masked batch gives a 0 loss
    assert int(global_count(rank)) == sum(range(world)) or sum(range(world)) == 0


def dp_cases(rank: int, world: int) -> None:
    check_helpers(rank, world)
    check_cross_entropy(rank, world)
    check_grpo(rank, world)
    check_kto(rank, world)
    check_bco(rank, world)
