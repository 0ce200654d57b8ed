"""The divergence family's PyTorch engine (``alignops/_torch/linear_divergence.py``) against the
float64 reference written from the math (``alignops/reference/linear_divergence.py``).

Shapes: ``N = 13`` tokens (a fifth of them invalid), ``V = 301`` (prime), student hidden size 17,
teacher hidden size 9; the workspace is shrunk so every case spans several vocabulary blocks
and token chunks. Gradients are those of ``sum g * div + g_H * entropy`` with random ``g``.
"""

from __future__ import annotations

import math

import pytest
import torch
from alignops.kernels._common import DivergenceOptions, LogitOptions

from alignops._torch.linear_divergence import linear_divergence_bwd, linear_divergence_fwd
from alignops.reference.linear_divergence import divergence_ref, linear_divergence_ref
from tests._assert import assert_close

KINDS = [
    DivergenceOptions("forward_kl"),
    DivergenceOptions("reverse_kl"),
    DivergenceOptions("jsd", beta=0.3),
    DivergenceOptions("jsd", beta=0.0),
    DivergenceOptions("jsd", beta=1.0),
    DivergenceOptions("tv"),
    DivergenceOptions("alpha", alpha=0.3),
    DivergenceOptions("alpha", alpha=2.0),
    DivergenceOptions("alpha", alpha=-0.5),
    DivergenceOptions("alpha", alpha=1.0),
] + [DivergenceOptions("f", generator=g) for g in ("kl", "reverse_kl", "hellinger", "chi2", "js", "tv")]
IDS = [f"{d.kind}-b{d.beta}-a{d.alpha}-{d.generator}" for d in KINDS]
NEEDS = dict(need_dh_p=True, need_dw_p=True, need_db_p=True, need_dh_q=True, need_dw_q=True, need_db_q=True)
OPTS = {
    "plain": (LogitOptions(), LogitOptions()),
    "transformed": (
        LogitOptions(softcap=3.0, temperature=1.5, logit_scale=0.7),
        LogitOptions(temperature=0.8, softcap=5.0),
    ),
}


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setenv("ALIGNOPS_CPU_WORKSPACE_BYTES", str(8 * 64 * 12))
    monkeypatch.setenv("ALIGNOPS_CPU_MIN_VOCAB_BLOCK", "64")


def _heads(n=13, v=301, hp=17, hq=9, *, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)

    valid = torch.rand(n, generator=g) > 0.2
    return (r(n, hp), r(v, hp, scale=0.5), r(v), r(n, hq), r(v, hq, scale=0.5), r(v)), valid


def _check(heads, valid, div, op, oq, *, atol, rtol, entropy=True, seed=1, ref_heads=None):
    """``ref_heads``: the inputs of the reference when they differ (a finite stand-in for -inf)."""
    stats = linear_divergence_fwd(*heads, valid, op, oq, div, want_entropy=entropy)
    xs = [t.double().clone().requires_grad_() for t in (ref_heads or heads)]
    ref = linear_divergence_ref(
        xs[0], xs[1], xs[3], xs[4], div, b_p=xs[2], b_q=xs[5], valid=valid, opts_p=op, opts_q=oq
    )
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(valid.shape[0], generator=gen, dtype=torch.float64)
    ge = torch.randn(valid.shape[0], generator=gen, dtype=torch.float64) if entropy else None
    loss = (ref[0] * g).sum() + ((ref[3] * ge).sum() if entropy else 0.0)
    loss.backward()
    for name, out, r in zip(("div", "lse_p", "lse_q"), stats, ref):
        assert_close(name, r.detach(), out, atol=atol, rtol=rtol)
    if entropy:
        assert_close("entropy_p", ref[3].detach(), stats.entropy_p, atol=atol, rtol=rtol)
    dt = heads[0].dtype
    grads = linear_divergence_bwd(
        *heads, valid, stats, g.to(stats.div.dtype), None if ge is None else ge.to(dt), op, oq, div, **NEEDS
    )
    for name, out, x in zip(("dh_p", "dw_p", "db_p", "dh_q", "dw_q", "db_q"), grads, xs):
        assert out.dtype == x.dtype or out.dtype == dt, name
        assert_close(name, x.grad, out, atol=atol, rtol=rtol)


# every kind once, alternating plain / transformed logits; the two-pass kinds both ways
CASES = [(d, "transformed" if i % 2 else "plain") for i, d in enumerate(KINDS)]
CASES += [(KINDS[2], "transformed"), (KINDS[5], "plain")]


@pytest.mark.parametrize("div,opts", CASES, ids=[f"{IDS[KINDS.index(d)]}-{o}" for d, o in CASES])
def test_every_divergence_float64(div, opts):
    heads, valid = _heads()
    _check(heads, valid, div, *OPTS[opts], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("div", [KINDS[i] for i in (0, 1, 2, 5, 7)], ids=[IDS[i] for i in (0, 1, 2, 5, 7)])
def test_every_divergence_float32(div):
    heads, valid = _heads(dtype=torch.float32, seed=3)
    _check(heads, valid, div, *OPTS["transformed"], atol=2e-5, rtol=2e-4)


# every streamed form once: one-pass KLs, alpha inside / outside [0, 1], two-pass jsd / tv, a scaled f
EXACT = [KINDS[i] for i in (0, 1, 2, 5, 6, 7, 13)]


@pytest.mark.parametrize("div", EXACT, ids=[IDS[i] for i in (0, 1, 2, 5, 6, 7, 13)])
def test_identical_heads_give_exact_zero(div):
    (hp, wp, bp, *_), valid = _heads()
    stats = linear_divergence_fwd(hp, wp, bp, hp.clone(), wp.clone(), bp.clone(), valid, *OPTS["plain"], div)
    assert torch.equal(stats.div, torch.zeros_like(stats.div))
    g = torch.randn(valid.shape[0], dtype=torch.float64)
    grads = linear_divergence_bwd(
        hp, wp, bp, hp.clone(), wp.clone(), bp.clone(), valid, stats, g, None, *OPTS["plain"], div, **NEEDS
    )
    for t in grads:
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("div", KINDS[:7], ids=IDS[:7])
def test_extreme_logits_float32(div):
    """|z| ~ 1e4: every exp / log stays finite and matches the float64 reference."""
    (hp, wp, bp, hq, wq, bq), valid = _heads(dtype=torch.float32, seed=5)
    heads = (hp * 1000, wp, None, hq * 1000, wq, None)
    zmax = (heads[0] @ wp.T).abs().max().item()
    assert zmax > 5e3
    stats = linear_divergence_fwd(*heads, valid, *OPTS["plain"], div)
    ref = linear_divergence_ref(*(t.double() for t in heads if t is not None), div, valid=valid)
    assert torch.isfinite(stats.div).all()
    assert_close("div", ref[0], stats.div, atol=2e-2, rtol=1e-4)
    g = torch.randn(valid.shape[0])
    grads = linear_divergence_bwd(*heads, valid, stats, g, None, *OPTS["plain"], div, **NEEDS)
    for t in grads:
        assert t is None or torch.isfinite(t).all()


def test_jsd_ends_equal_the_kls():
    heads, valid = _heads()
    fkl = linear_divergence_fwd(*heads, valid, *OPTS["plain"], DivergenceOptions("forward_kl")).div
    rkl = linear_divergence_fwd(*heads, valid, *OPTS["plain"], DivergenceOptions("reverse_kl")).div
    j0 = linear_divergence_fwd(*heads, valid, *OPTS["plain"], DivergenceOptions("jsd", beta=0.0)).div
    j1 = linear_divergence_fwd(*heads, valid, *OPTS["plain"], DivergenceOptions("jsd", beta=1.0)).div
    assert torch.equal(j0, fkl) and torch.equal(j1, rkl)
    zp = heads[0] @ heads[1].T + heads[2]
    zq = heads[3] @ heads[4].T + heads[5]
    ref = divergence_ref(zp, zq, DivergenceOptions("forward_kl"), valid)[0]
    assert_close("fkl", ref, fkl, atol=1e-10)
    assert not torch.allclose(fkl, rkl)


def _logits(heads):
    hp, wp, bp, hq, wq, bq = heads
    return hp @ wp.T + bp, hq @ wq.T + bq


def _teacher_with_zeros(div, seed=7):
    """A teacher bias of -inf on a fifth of the vocabulary: q_v = 0 exactly there."""
    heads, valid = _heads(seed=seed)
    hp, wp, bp, hq, wq, bq = heads
    bq = bq.clone()
    bq[torch.arange(bq.shape[0]) % 5 == 0] = -math.inf
    return (hp, wp, bp, hq, wq, bq), valid


FINITE_WITH_ZEROS = [
    DivergenceOptions("forward_kl"),
    DivergenceOptions("jsd", beta=0.3),
    DivergenceOptions("tv"),
    DivergenceOptions("alpha", alpha=0.3),
    DivergenceOptions("alpha", alpha=-0.5),
]


@pytest.mark.parametrize("div", FINITE_WITH_ZEROS, ids=lambda d: f"{d.kind}-{d.alpha}-{d.generator}")
def test_teacher_zeros_finite_kinds(div):
    """Where the teacher has zeros and the divergence stays finite: exact values and gradients."""
    heads, valid = _teacher_with_zeros(div)
    ref = divergence_ref(*_logits(heads), div, valid)[0]
    assert torch.isfinite(ref).all()
    # autograd of the reference has 0 * inf = NaN at exact zeros: its gradients are taken at a
    # bias of -1e4 instead, whose probabilities are exactly 0 in float64 too, with finite logs
    stand_in = (*heads[:5], heads[5].clamp(min=-1e4))
    assert torch.equal(divergence_ref(*_logits(stand_in), div, valid)[0], ref)
    _check(heads, valid, div, *OPTS["plain"], atol=1e-10, rtol=1e-9, ref_heads=stand_in)


@pytest.mark.parametrize(
    "div",
    [
        DivergenceOptions("reverse_kl"),
        DivergenceOptions("alpha", alpha=2.0),
        DivergenceOptions("f", generator="chi2"),
    ],
    ids=["reverse_kl", "alpha2", "chi2"],
)
def test_teacher_zeros_singular_kinds_are_inf_with_zero_grad(div):
    """Student mass where the teacher has none: the documented +inf value, zero gradient, no NaN;
    the valid rows' value is +inf exactly as the float64 reference says."""
    heads, valid = _teacher_with_zeros(div)
    stats = linear_divergence_fwd(*heads, valid, *OPTS["plain"], div)
    ref = linear_divergence_ref(
        heads[0], heads[1], heads[3], heads[4], div, b_p=heads[2], b_q=heads[5], valid=valid
    )
    assert torch.equal(torch.isinf(ref[0]), valid)
    assert torch.equal(stats.div, ref[0])  # +inf on valid rows, 0 elsewhere
    g = torch.randn(valid.shape[0], dtype=torch.float64)
    grads = linear_divergence_bwd(*heads, valid, stats, g, None, *OPTS["plain"], div, **NEEDS)
    for t in grads:
        assert torch.equal(t, torch.zeros_like(t))


def test_student_zeros_make_forward_kl_inf():
    heads, valid = _heads(seed=9)
    bp = heads[2].clone()
    bp[3] = -math.inf
    heads = (heads[0], heads[1], bp, *heads[3:])
    div = DivergenceOptions("forward_kl")
    stats = linear_divergence_fwd(*heads, valid, *OPTS["plain"], div)
    assert torch.equal(stats.div, torch.where(valid, math.inf, 0.0).double())
    # its mirror, KL(p || q), is finite and exact (reference gradients at a -1e4 stand-in)
    stand_in = (heads[0], heads[1], bp.clamp(min=-1e4), *heads[3:])
    _check(
        heads,
        valid,
        DivergenceOptions("reverse_kl"),
        *OPTS["plain"],
        atol=1e-10,
        rtol=1e-9,
        ref_heads=stand_in,
    )


@pytest.mark.parametrize("beta", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("kind", ["jsd", "tv"])
def test_student_zeros_finite_kinds(kind, beta):
    """Student zeros (a -inf student bias) where the teacher has mass: jsd and tv stay finite and
    exact, both heads' gradients too. jsd's ``log(q / m)`` there is ``-log beta``; it once came out
    as 0 (``1e30 - (1e30 + log beta)``), an error of ~5e-2 in the value and the teacher's grads."""
    heads, valid = _heads(seed=11)
    bp = heads[2].clone()
    bp[torch.arange(bp.shape[0]) % 4 == 1] = -math.inf
    heads = (heads[0], heads[1], bp, *heads[3:])
    stand_in = (heads[0], heads[1], bp.clamp(min=-1e4), *heads[3:])
    div = DivergenceOptions(kind, beta=beta) if kind == "jsd" else DivergenceOptions(kind)
    _check(heads, valid, div, *OPTS["plain"], atol=1e-10, rtol=1e-9, ref_heads=stand_in)


def test_bad_inputs():
    heads, valid = _heads()
    hp, wp, bp, hq, wq, bq = heads
    plain = OPTS["plain"]
    kl = DivergenceOptions("forward_kl")
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        linear_divergence_fwd(hp, wp, bp, hq, wq[:-1], None, valid, *plain, kl)
    with pytest.raises(ValueError, match="token count mismatch"):
        linear_divergence_fwd(hp, wp, bp, hq[:-1], wq, bq, valid, *plain, kl)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        linear_divergence_fwd(hp, wp, bp, hq, wq[:, :-1], bq, valid, *plain, kl)
    with pytest.raises(ValueError, match="valid must be"):
        linear_divergence_fwd(hp, wp, bp, hq, wq, bq, valid[:-1], *plain, kl)
    with pytest.raises(ValueError, match="unknown divergence kind"):
        DivergenceOptions("kl")
    with pytest.raises(ValueError, match="generator"):
        DivergenceOptions("f", generator="renyi")
    with pytest.raises(ValueError, match="beta"):
        DivergenceOptions("jsd", beta=1.5)


@pytest.mark.parametrize("div", [KINDS[2], KINDS[5]], ids=["jsd", "tv"])
def test_handed_over_row_sums_equal_the_recomputed_ones(div):
    """jsd / tv: the backward given the forward's row constants (one pass) equals the backward
    that recomputes them (two passes), for both heads."""
    heads, valid = _heads(seed=11)
    rs = []
    stats = linear_divergence_fwd(*heads, valid, *OPTS["transformed"], div, row_sums_out=rs)
    assert len(rs) == 1 and rs[0].shape == (2, valid.shape[0])
    g = torch.randn(valid.shape[0], dtype=torch.float64)
    args = (*heads, valid, stats, g, None, *OPTS["transformed"], div)
    one = linear_divergence_bwd(*args, **NEEDS, row_sums=rs[0])
    two = linear_divergence_bwd(*args, **NEEDS)
    for a, b in zip(one, two):
        assert_close("grad", b, a, atol=1e-13, rtol=1e-12)
