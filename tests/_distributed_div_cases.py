"""Per-process bodies of ``tests/test_distributed_divergence.py`` (run by ``tests/_distributed.run``):
every rank builds the same two-head problem from a fixed seed, keeps its vocabulary slice of both
heads and checks ``linear_divergence(..., process_group=)`` (value, student entropy, gradients of
both heads) against the float64 single-process reference built from the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _distributed import cut, even_sizes, max_err, padded_sizes
from alignops.kernels._common import DivergenceOptions, LogitOptions

import alignops
from alignops.reference.linear_divergence import linear_divergence_ref

N_SHAPE, HP, HQ, V = (3, 5), 12, 9, 37  # V = 37: no world size divides it; N = 15
TF_P = {"softcap_p": 7.0, "temperature_p": 0.9}
TF_Q = {"logit_scale_q": 1.2}
OPTS_P = LogitOptions(-100, 1.0, 7.0, 0.9)
OPTS_Q = LogitOptions(-100, 1.2, None, 1.0)
KINDS = (
    {"kind": "forward_kl"},
    {"kind": "reverse_kl"},
    {"kind": "jsd", "beta": 0.3},
    {"kind": "tv"},
    {"kind": "alpha", "alpha": 0.6},
    {"kind": "alpha", "alpha": 1.7},
    {"kind": "f", "generator": "hellinger"},
    {"kind": "f", "generator": "chi2"},
    {"kind": "f", "generator": "js"},
    {"kind": "f", "generator": "kl"},
)


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return scale * torch.randn(*s, generator=g, dtype=torch.float64)

    heads = (
        r(*N_SHAPE, HP),
        r(V, HP, scale=0.7),
        r(V, scale=0.5),
        r(*N_SHAPE, HQ),
        r(V, HQ, scale=0.9),
        r(V),
    )
    mask = torch.rand(N_SHAPE, generator=g) > 0.2
    ups = (r(*N_SHAPE), r(*N_SHAPE))
    return heads, mask, ups


def _reference(heads, mask, ups, kw):
    x = [t.clone().requires_grad_() for t in heads]
    h_p, w_p, b_p, h_q, w_q, b_q = x
    div = DivergenceOptions(kw["kind"], kw.get("beta", 0.5), kw.get("alpha", 0.5), kw.get("generator"))
    d, _, _, ent = linear_divergence_ref(
        h_p.reshape(-1, HP), w_p, h_q.reshape(-1, HQ), w_q, div, b_p=b_p, b_q=b_q,
        valid=mask.reshape(-1), opts_p=OPTS_P, opts_q=OPTS_Q,
    )  # fmt: skip
    d, ent = d.view(N_SHAPE), ent.view(N_SHAPE)
    (d * ups[0] + ent * ups[1]).sum().backward()
    return d.detach(), ent.detach(), [t.grad for t in x]


def rel_err(a, b) -> float:
    """The largest error relative to the reference's scale (alpha > 1 and chi2 reach ~1e8 here)."""
    return max_err(a, b) / max(1.0, b.abs().max().item() if b.numel() else 0.0)


def check_kind(rank, world, sizes, kw, vocab_size=None, atol=1e-11):
    heads, mask, ups = problem()
    d_ref, ent_ref, g_ref = _reference(heads, mask, ups, kw)
    h_p, w_p, b_p, h_q, w_q, b_q = heads
    x = [h_p.clone(), cut(w_p, sizes, rank), cut(b_p, sizes, rank)]
    x += [h_q.clone(), cut(w_q, sizes, rank), cut(b_q, sizes, rank)]
    x = [t.requires_grad_() for t in x]
    out = alignops.linear_divergence(
        x[0], x[1], x[3], x[4], b_p=x[2], b_q=x[5], mask=mask, reduction="none", return_entropy=True,
        process_group=dist.group.WORLD, vocab_size=vocab_size, **TF_P, **TF_Q, **kw,
    )  # fmt: skip
    (out.loss * ups[0] + out.entropy * ups[1]).sum().backward()
    start, real = sum(sizes[:rank]), max(0, min(sizes[rank], V - sum(sizes[:rank])))
    errs = [rel_err(out.loss, d_ref), rel_err(out.entropy, ent_ref)]
    for i in (0, 3):  # hidden states: the full gradient on every rank
        errs.append(rel_err(x[i].grad, g_ref[i]))
    for i in (1, 2, 4, 5):  # this rank's rows of the heads; padding rows get exactly 0
        errs.append(rel_err(x[i].grad[:real], g_ref[i][start : start + real]))
        assert torch.all(x[i].grad[real:] == 0), "padding rows got a gradient"
    assert max(errs) <= atol, f"rank {rank} sizes {sizes} {kw}: errors {errs}"
    parts = [torch.empty_like(out.loss) for _ in range(world)]
    dist.all_gather(parts, out.loss.contiguous())
    assert all(torch.equal(p, parts[0]) for p in parts), "ranks disagree"
    return max(errs)


def uneven_sizes(world: int) -> list[int]:
    return {2: [29, 8], 4: [6, 19, 0, 12]}[world]


def check_errors(rank, world):
    """A mismatch raises on every rank (no hang) and the group stays usable."""
    heads, mask, _ = problem()
    sizes = even_sizes(V, world)
    h_p, w_p, _, h_q, w_q, _ = heads
    wp, wq = cut(w_p, sizes, rank), cut(w_q, sizes, rank)
    kind = "tv" if rank == world - 1 else "jsd"
    with pytest.raises(ValueError, match="disagree on divergence kind"):
        alignops.linear_divergence(h_p, wp, h_q, wq, kind=kind, process_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="disagree on teacher temperature"):
        alignops.linear_divergence(h_p, wp, h_q, wq, temperature_q=1.0 + rank, process_group=dist.group.WORLD)
    bad_wq = wq[:-1] if rank == 0 else wq  # the teacher's slice one row short on rank 0
    msg = "vocabulary size mismatch" if rank == 0 else r"rank\(s\) \[0\]"
    with pytest.raises(ValueError, match=msg):
        alignops.linear_divergence(h_p, wp, h_q, bad_wq, process_group=dist.group.WORLD)
    m = mask.clone()
    m[0, 0] = rank % 2 == 0
    with pytest.raises(ValueError, match="disagree on token mask checksum"):
        alignops.linear_divergence(h_p, wp, h_q, wq, mask=m, process_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="vocab_size"):
        alignops.linear_divergence(h_p, wp, h_q, wq, vocab_size=V + 1, process_group=dist.group.WORLD)
    # still usable: a good call after the errors
    out = alignops.linear_divergence(h_p, wp, h_q, wq, mask=mask, process_group=dist.group.WORLD)
    assert torch.isfinite(out.loss)


def check_variants(rank, world):
    """float32 inputs, DTensor heads (no group), ``reduce_hidden_grad=False`` and zero
    probabilities on one rank (a ``-inf`` bias entry: finite jsd / tv / alpha(0.6), ``+inf`` forward
    KL with a zero gradient)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    heads, mask, ups = problem(seed=1)
    h_p, w_p, b_p, h_q, w_q, b_q = heads
    sizes = even_sizes(V, world)
    start, n = sum(sizes[:rank]), sizes[rank]
    grp = dist.group.WORLD
    # float32: forward KL and jsd against the float64 reference
    for kw in ({"kind": "forward_kl"}, {"kind": "jsd", "beta": 0.7}):
        d_ref, _, g_ref = _reference(heads, mask, ups, kw)
        hp, wp = h_p.float().requires_grad_(), cut(w_p, sizes, rank).float().requires_grad_()
        out = alignops.linear_divergence(
            hp, wp, h_q.float(), cut(w_q, sizes, rank).float(), b_p=cut(b_p, sizes, rank).float(),
            b_q=cut(b_q, sizes, rank).float(), mask=mask, reduction="none", process_group=grp,
            return_entropy=True, **TF_P, **TF_Q, **kw,
        )  # fmt: skip
        (out.loss * ups[0] + out.entropy * ups[1]).sum().backward()
        assert out.loss.dtype == torch.float32 and hp.grad.dtype == torch.float32
        errs = [
            rel_err(out.loss, d_ref),
            rel_err(hp.grad, g_ref[0]),
            rel_err(wp.grad, g_ref[1][start : start + n]),
        ]
        assert max(errs) < 2e-5, (kw, errs)
    # DTensor Shard(0) heads, no process group; reduce_hidden_grad=False: partial dh sum to the full
    mesh = init_device_mesh("cpu", (world,))
    kw = {"kind": "tv"}
    d_ref, ent_ref, g_ref = _reference(heads, mask, ups, kw)
    x = [t.clone() if i in (0, 3) else distribute_tensor(t, mesh, [Shard(0)]) for i, t in enumerate(heads)]
    x = [t.requires_grad_() for t in x]
    out = alignops.linear_divergence(
        x[0], x[1], x[3], x[4], b_p=x[2], b_q=x[5], mask=mask, reduction="none", return_entropy=True,
        reduce_hidden_grad=False, **TF_P, **TF_Q, **kw,
    )  # fmt: skip
    (out.loss * ups[0] + out.entropy * ups[1]).sum().backward()
    errs = [rel_err(out.loss, d_ref), rel_err(out.entropy, ent_ref)]
    for i in (0, 3):
        part = x[i].grad.clone()
        assert max_err(part, g_ref[i]) > 1e-6, "the hidden gradient was reduced"
        dist.all_reduce(part)
        errs.append(rel_err(part, g_ref[i]))
    for i in (1, 2, 4, 5):
        errs.append(rel_err(x[i].grad.to_local(), g_ref[i][start : start + n]))
    assert max(errs) < 1e-11, errs
    # a rerun gives bitwise the same value and gradients
    y = [t.detach().clone().requires_grad_() for t in x]
    again = alignops.linear_divergence(
        y[0], y[1], y[3], y[4], b_p=y[2], b_q=y[5], mask=mask, reduction="none", return_entropy=True,
        reduce_hidden_grad=False, **TF_P, **TF_Q, **kw,
    )  # fmt: skip
    (again.loss * ups[0] + again.entropy * ups[1]).sum().backward()
    assert torch.equal(again.loss, out.loss) and torch.equal(again.entropy, out.entropy)
    for i, (a, b) in enumerate(zip(x, y)):
        ga, gb = (a.grad.to_local(), b.grad.to_local()) if i % 3 else (a.grad, b.grad)
        assert torch.equal(ga, gb), f"rerun differs in gradient {i}"
    # zero probabilities on rank 0's slice: no soft-cap, a -inf bias entry of the student
    b_p0 = b_p.clone()
    b_p0[1] = -float("inf")
    zheads = (h_p, w_p, b_p0, h_q, w_q, b_q)
    for kw in (
        {"kind": "jsd", "beta": 0.4},
        {"kind": "tv"},
        {"kind": "alpha", "alpha": 0.6},
        {"kind": "forward_kl"},
    ):
        div = DivergenceOptions(kw["kind"], kw.get("beta", 0.5), kw.get("alpha", 0.5))
        xr = [t.clone().requires_grad_() for t in zheads]
        d_ref = linear_divergence_ref(
            xr[0].reshape(-1, HP), xr[1], xr[3].reshape(-1, HQ), xr[4], div, b_p=xr[2], b_q=xr[5]
        )[0].view(N_SHAPE)
        x = [t.clone() if i in (0, 3) else cut(t, sizes, rank) for i, t in enumerate(zheads)]
        x = [t.requires_grad_() for t in x]
        out = alignops.linear_divergence(
            x[0], x[1], x[3], x[4], b_p=x[2], b_q=x[5], reduction="none", process_group=grp, **kw
        )
        (out.loss * torch.where(torch.isinf(d_ref), 0.0, ups[0])).sum().backward()
        if kw["kind"] == "forward_kl":
            assert torch.isinf(d_ref).all() and torch.isinf(out.loss).all() and (out.loss > 0).all()
            assert all(torch.all(t.grad == 0) for t in x), "an infinite row got a gradient"
            continue
        d_ref.mul(ups[0]).sum().backward()
        errs = [rel_err(out.loss, d_ref.detach())]
        errs += [rel_err(x[i].grad, xr[i].grad) for i in (0, 3)]
        errs += [rel_err(x[i].grad, xr[i].grad[start : start + n]) for i in (1, 4)]
        assert max(errs) < 1e-11 and all(torch.isfinite(t.grad).all() for t in x), (kw, errs)


def div_cases(rank: int, world: int) -> None:
    layouts = [(even_sizes(V, world), None), (uneven_sizes(world), None), (padded_sizes(V, world, 8), V)]
    for sizes, vocab_size in layouts:
        for kw in KINDS:
            check_kind(rank, world, sizes, kw, vocab_size)
    check_variants(rank, world)
    check_errors(rank, world)
