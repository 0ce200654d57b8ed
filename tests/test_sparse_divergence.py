"""The divergence family against a sparse (top-k) teacher (``alignops.sparse_divergence`` and
``alignops/_torch/sparse_divergence.py``) versus the float64 reference's coarse-grained
definition (``K`` listed ids plus one tail outcome).

Shapes: ``N = 11`` tokens (some masked), ``V = 203`` (prime), ``H = 13``, ``K = 7``; the workspace
is shrunk so the vocabulary spans several blocks and token chunks.
"""

from __future__ import annotations

import math

import pytest
import torch
from alignops.kernels._common import DivergenceOptions, LogitOptions

import alignops
from alignops._torch.sparse_divergence import sparse_divergence_bwd, sparse_divergence_fwd
from alignops.reference import logits_ref
from alignops.reference.linear_divergence import divergence_ref, sparse_divergence_ref
from tests._assert import assert_close

KINDS = [
    DivergenceOptions("forward_kl"),
    DivergenceOptions("reverse_kl"),
    DivergenceOptions("jsd", beta=0.3),
    DivergenceOptions("tv"),
    DivergenceOptions("alpha", alpha=0.4),
    DivergenceOptions("f", generator="hellinger"),
]


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setenv("ALIGNOPS_CPU_WORKSPACE_BYTES", str(8 * 64 * 10))
    monkeypatch.setenv("ALIGNOPS_CPU_MIN_VOCAB_BLOCK", "64")


def _case(n=11, v=203, h=13, k=7, *, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hp = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    wp = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    bp = torch.randn(v, generator=g, dtype=torch.float64).to(dtype)
    teacher = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
    q_logps, q_ids = teacher.topk(k, -1)
    valid = torch.rand(n, generator=g) > 0.2
    return (hp, wp, bp), q_ids, q_logps, valid, teacher


@pytest.mark.parametrize("div", KINDS, ids=lambda d: f"{d.kind}-{d.generator}")
def test_engine_float64(div):
    (hp, wp, bp), q_ids, q_logps, valid, _ = _case()
    op = LogitOptions(softcap=4.0, temperature=1.3)
    st = sparse_divergence_fwd(hp, wp, bp, q_ids, q_logps, valid, op, div, want_entropy=True)
    assert st.lse_q is None
    xs = [t.clone().requires_grad_() for t in (hp, wp, bp)]
    zp = logits_ref(xs[0], xs[1], xs[2], softcap=4.0, temperature=1.3)
    ref = sparse_divergence_ref(zp, q_ids, q_logps, div, valid)
    g, ge = torch.randn(11, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    ((ref[0] * g).sum() + (ref[2] * ge).sum()).backward()
    for name, r, out in zip(("div", "lse_p", "entropy"), ref, (st.div, st.lse_p, st.entropy_p)):
        assert_close(name, r.detach(), out, atol=1e-12, rtol=1e-10)
    grads = sparse_divergence_bwd(
        hp, wp, bp, q_ids, q_logps, valid, st, g, ge, op, div, need_dh_p=True, need_dw_p=True, need_db_p=True
    )
    for name, x, out in zip(("dh", "dw", "db"), xs, grads):
        assert_close(name, x.grad, out, atol=1e-12, rtol=1e-10)


def test_full_topk_equals_full_divergence():
    """K = V: the coarse-graining is the identity (tail 0) and the value is the full divergence."""
    (hp, wp, bp), _, _, valid, teacher = _case(v=31, k=5)
    q_logps, q_ids = teacher.topk(31, -1)
    div = DivergenceOptions("jsd", beta=0.4)
    st = sparse_divergence_fwd(hp, wp, bp, q_ids, q_logps, valid, LogitOptions(), div)
    full = divergence_ref(hp @ wp.T + bp, teacher, div, valid)[0]
    assert_close("div", full, st.div, atol=1e-12)


def test_api_float32_with_cache_padding_and_mask():
    """The public function in float32 on ``[B, T]`` tokens, with -inf padding slots in the cache
    (teacher zeros: KL(q || p) stays finite, while KL(p || q) is +inf, as the reference says)."""
    (hp, wp, bp), q_ids, q_logps, valid, _ = _case(n=12, dtype=torch.float32, seed=2)
    q_logps = q_logps.clone()
    q_logps[:, -2:] = -math.inf  # fewer than K known ids
    hp3, wp = hp.view(3, 4, 13).clone().requires_grad_(), wp.clone().requires_grad_()
    mask = valid.view(3, 4)
    out = alignops.sparse_divergence(
        hp3, wp, q_ids.view(3, 4, 7), q_logps.view(3, 4, 7), kind="forward_kl", b_p=bp, mask=mask,
        reduction="sum", return_entropy=True,
    )  # fmt: skip
    x = [hp3.detach().double().view(12, 13).requires_grad_(), wp.detach().double().requires_grad_()]
    fkl = DivergenceOptions("forward_kl")
    # autograd of the reference gives 0 * inf = NaN at exact zeros: a -1e4 stand-in (exp = 0 in
    # float64 too) for its gradients, checked to give the same value
    ref = sparse_divergence_ref(
        x[0] @ x[1].T + bp.double(), q_ids, q_logps.double().clamp(min=-1e4), fkl, valid
    )
    exact = sparse_divergence_ref(
        x[0].detach() @ x[1].detach().T + bp.double(), q_ids, q_logps.double(), fkl, valid
    )
    assert torch.equal(exact[0], ref[0].detach())
    assert_close("loss", ref[0].sum().detach(), out.loss.detach(), atol=1e-5, rtol=1e-5)
    assert_close("entropy", ref[2].detach().view(3, 4), out.entropy.detach(), atol=1e-5)
    rev = alignops.sparse_divergence(
        hp3, wp, q_ids.view(3, 4, 7), q_logps.view(3, 4, 7), kind="reverse_kl", mask=mask
    )
    assert rev.loss.item() == math.inf
    (g_rev,) = torch.autograd.grad(rev.loss, hp3)
    assert torch.equal(g_rev, torch.zeros_like(g_rev))  # infinite rows: zero gradient, no NaN
    got = torch.autograd.grad(out.loss + out.entropy.sum(), (hp3, wp))
    want = torch.autograd.grad(ref[0].sum() + ref[2].sum(), x)
    for name, w, gt in zip(("dh", "dw"), want, got):
        assert_close(name, w.view_as(gt), gt, atol=1e-5 + 1e-4 * w.abs().max().item())


def test_compiles_fullgraph():
    (hp, wp, bp), q_ids, q_logps, valid, _ = _case(dtype=torch.float32, seed=3)
    hp = hp.requires_grad_()

    def step(h):
        return alignops.sparse_divergence(h, wp, q_ids, q_logps, kind="jsd", beta=0.5, mask=valid).loss

    out_c = torch.compile(step, backend="aot_eager", fullgraph=True)(hp)
    (g_c,) = torch.autograd.grad(out_c, hp)
    out_e = step(hp)
    (g_e,) = torch.autograd.grad(out_e, hp)
    assert_close("loss", out_e.detach(), out_c.detach(), atol=1e-6)
    assert_close("dh", g_e, g_c, atol=1e-6)


def test_bad_teacher_ids():
    (hp, wp, bp), q_ids, q_logps, valid, _ = _case()
    bad = q_ids.clone()
    bad[2, 3] = 203
    with pytest.raises(ValueError, match=r"q_ids must lie in \[0, 203\)"):
        alignops.sparse_divergence(hp, wp, bad, q_logps)
    bad[2, 3] = -1
    with pytest.raises(ValueError, match="q_ids must lie"):
        alignops.sparse_divergence(hp, wp, bad, q_logps)
    dup = q_ids.clone()
    dup[0, 1] = dup[0, 0]
    with pytest.raises(ValueError, match="distinct"):
        alignops.sparse_divergence(hp, wp, dup, q_logps)
    with pytest.raises(ValueError, match="token count mismatch"):
        alignops.sparse_divergence(hp, wp, q_ids[:-1], q_logps[:-1])
    with pytest.raises(ValueError, match="q_logps"):
        alignops.sparse_divergence(hp, wp, q_ids, q_logps[:, :-1])
    with pytest.raises(ValueError, match="unknown divergence kind"):
        alignops.sparse_divergence(hp, wp, q_ids, q_logps, kind="wasserstein")
