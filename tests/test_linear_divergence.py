"""The public divergence API (``alignops.linear_divergence``, ``alignops.divergence``) against the
float64 reference and TRL's ``ChunkedDivergenceFunction``; masks, reductions, ``num_items``, the
teacher's gradients, ``torch.compile(fullgraph=True)`` and clear errors.

Shapes: ``[2, 9]`` tokens x vocabulary 1031 (prime) with student / teacher hidden sizes 24 / 12;
one case at a real vocabulary (32000, Llama-2) with few tokens.
"""

from __future__ import annotations

import pytest
import torch
from alignops.kernels._common import DivergenceOptions, LogitOptions

import alignops
from alignops.reference.linear_divergence import divergence_ref, linear_divergence_ref
from tests._assert import assert_close


def _heads(b=2, t=9, v=1031, hp=24, hq=12, *, dtype=torch.float32, seed=0, teacher_grad=False):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, grad=True):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(grad)

    return (
        r(b, t, hp),
        r(v, hp, scale=hp**-0.5 * 2),
        r(v, scale=0.3),
        r(b, t, hq, grad=teacher_grad),
        r(v, hq, scale=hq**-0.5 * 2, grad=teacher_grad),
        r(v, scale=0.3, grad=teacher_grad),
    )


def _ref(heads, div, valid, op=None, oq=None):
    x = [t.detach().double().requires_grad_(t.requires_grad) for t in heads]
    hp, wp, bp, hq, wq, bq = x
    out = linear_divergence_ref(
        hp.reshape(-1, hp.shape[-1]), wp, hq.reshape(-1, hq.shape[-1]), wq, div,
        b_p=bp, b_q=bq, valid=valid.reshape(-1), opts_p=op, opts_q=oq,
    )  # fmt: skip
    return x, out


CASES = [
    dict(kind="forward_kl"),
    dict(kind="reverse_kl"),
    dict(kind="jsd", beta=0.5),
    dict(kind="jsd", beta=0.1),
    dict(kind="tv"),
    dict(kind="alpha", alpha=0.5),
    dict(kind="alpha", alpha=1.5),
    dict(kind="f", generator="hellinger"),
    dict(kind="f", generator="chi2"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_linear_divergence_float32_both_heads(case):
    """Values, the student entropy and every gradient of both heads (teacher with requires_grad),
    random upstream gradient, a mask with holes, different transforms per head."""
    heads = _heads(teacher_grad=True)
    mask = torch.rand(2, 9, generator=torch.Generator().manual_seed(1)) > 0.25
    kw = dict(temperature_p=1.3, softcap_p=4.0, logit_scale_q=0.8, temperature_q=0.9)
    out = alignops.linear_divergence(
        heads[0], heads[1], heads[3], heads[4], b_p=heads[2], b_q=heads[5], mask=mask,
        reduction="none", return_entropy=True, **case, **kw,
    )  # fmt: skip
    op, oq = LogitOptions(temperature=1.3, softcap=4.0), LogitOptions(logit_scale=0.8, temperature=0.9)
    x, ref = _ref(heads, DivergenceOptions(**case), mask, op, oq)
    assert out.loss.shape == (2, 9) and out.entropy.shape == (2, 9)
    assert_close("div", ref[0].detach().view(2, 9), out.loss, atol=3e-5, rtol=3e-4)
    assert_close("entropy", ref[3].detach().view(2, 9), out.entropy, atol=3e-5, rtol=3e-5)
    g1, g2 = torch.randn(2, 9, dtype=torch.float64), torch.randn(2, 9, dtype=torch.float64)
    got = torch.autograd.grad((out.loss * g1.float()).sum() + (out.entropy * g2.float()).sum(), heads)
    want = torch.autograd.grad((ref[0] * g1.view(-1)).sum() + (ref[3] * g2.view(-1)).sum(), x)
    for name, w, gt in zip(("dh_p", "dw_p", "db_p", "dh_q", "dw_q", "db_q"), want, got):
        scale = w.abs().max().item()
        assert_close(name, w, gt, atol=2e-5 * max(scale, 1.0), rtol=1e-3)


def test_real_vocabulary_float32():
    """V = 32000 with few tokens: JSD and forward KL, student gradients only."""
    heads = _heads(b=1, t=5, v=32000, hp=16, hq=8, seed=2)
    mask = torch.ones(1, 5, dtype=torch.bool)
    for case in (dict(kind="jsd", beta=0.5), dict(kind="forward_kl")):
        out = alignops.linear_divergence(heads[0], heads[1], heads[3], heads[4], reduction="sum", **case)
        x, ref = _ref_nobias(heads, DivergenceOptions(**case), mask)
        assert_close("div", ref[0].sum().detach(), out.loss.detach(), atol=1e-5, rtol=1e-5)
        got = torch.autograd.grad(out.loss, (heads[0], heads[1]))
        want = torch.autograd.grad(ref[0].sum(), (x[0], x[1]))
        for name, w, gt in zip(("dh_p", "dw_p"), want, got):
            assert_close(name, w, gt, atol=1e-6 + 1e-4 * w.abs().max().item())


def _ref_nobias(heads, div, valid):
    hp, wp, _, hq, wq, _ = (t.detach().double().requires_grad_() for t in heads)
    out = linear_divergence_ref(hp.reshape(-1, hp.shape[-1]), wp, hq.reshape(-1, hq.shape[-1]), wq, div,
                                valid=valid.reshape(-1))  # fmt: skip
    return (hp, wp), out


def test_reductions_masks_and_num_items():
    heads = _heads(dtype=torch.float64, seed=3)
    labels = torch.randint(0, 1031, (2, 9))
    labels[0, :3] = -100
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, -2:] = False
    valid = (labels != -100) & mask
    args = (heads[0], heads[1], heads[3], heads[4])
    kw = dict(kind="jsd", beta=0.4, b_p=heads[2], b_q=heads[5], labels=labels, mask=mask)
    per = alignops.linear_divergence(*args, reduction="none", **kw).loss
    _, ref = _ref(heads, DivergenceOptions("jsd", beta=0.4), valid)
    ref = ref[0].detach().view(2, 9)
    assert_close("none", ref, per.detach(), atol=1e-12)
    assert torch.equal(per[~valid], torch.zeros_like(per[~valid]))
    for red, want in (
        ("sum", ref.sum()),
        ("mean", ref.sum() / valid.sum()),
        ("batchmean", ref.sum() / 2),
    ):
        got = alignops.linear_divergence(*args, reduction=red, **kw).loss
        assert_close(red, want, got.detach(), atol=1e-12)
    got = alignops.linear_divergence(*args, reduction="sum", num_items=40, **kw).loss
    assert_close("num_items", ref.sum() / 40, got.detach(), atol=1e-12)
    empty = torch.zeros(2, 9, dtype=torch.bool)
    z = alignops.linear_divergence(*args, kind="tv", mask=empty)
    assert z.loss.item() == 0.0
    (gh,) = torch.autograd.grad(z.loss, heads[0])
    assert torch.equal(gh, torch.zeros_like(gh))


@pytest.mark.parametrize(
    "case", [dict(kind="jsd", beta=0.3), dict(kind="reverse_kl"), dict(kind="alpha", alpha=-1.0)]
)
def test_divergence_from_logits(case):
    """``alignops.divergence`` on caller-held logits: values, entropy and both logits' gradients."""
    g = torch.Generator().manual_seed(4)
    zp = (torch.randn(3, 7, 523, generator=g) * 3).requires_grad_()
    zq = (torch.randn(3, 7, 523, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, 523, (3, 7), generator=g)
    labels[2, 4:] = -100
    out = alignops.divergence(
        zp, zq, labels=labels, reduction="none", return_entropy=True, temperature_q=2.0, **case
    )
    zp64, zq64 = zp.detach().double().requires_grad_(), zq.detach().double().requires_grad_()
    ref = divergence_ref(
        zp64.view(-1, 523), zq64.view(-1, 523) / 2.0, DivergenceOptions(**case), (labels != -100).view(-1)
    )
    assert_close("div", ref[0].detach().view(3, 7), out.loss, atol=3e-5, rtol=3e-5)
    assert_close("entropy", ref[3].detach().view(3, 7), out.entropy, atol=3e-5, rtol=3e-5)
    gw = torch.randn(3, 7, dtype=torch.float64)
    got = torch.autograd.grad((out.loss * gw.float()).sum() + out.entropy.sum(), (zp, zq))
    want = torch.autograd.grad((ref[0] * gw.view(-1)).sum() + ref[3].sum(), (zp64, zq64))
    for name, w, gt in zip(("dlogits_p", "dlogits_q"), want, got):
        assert_close(name, w, gt, atol=1e-6 + 3e-5 * w.abs().max().item())


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_agrees_with_trl_chunked_divergence(beta):
    """TRL 1.16's ``ChunkedDivergenceFunction`` (its CPU path): per-token divergence, entropy and
    the student's gradients, with a soft-cap on the student and a shared temperature."""
    mod = pytest.importorskip("trl.kernels.chunked_divergence")
    heads = _heads(b=1, t=11, v=777, hp=16, hq=10, seed=5)
    hp, wp, bp, hq, wq, bq = heads
    h2p, w2p = hp.detach().view(11, 16).clone().requires_grad_(), wp.detach().clone().requires_grad_()
    d_trl, ent_trl = mod.ChunkedDivergenceFunction.apply(
        h2p, w2p, None, hq.detach().view(11, 10), wq.detach(), None, beta, 1.5, 1.0, 6.0, 1.0, None
    )
    kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")
    out = alignops.linear_divergence(
        hp, wp, hq.detach(), wq.detach(), kind=kind, beta=beta, temperature_p=1.5, temperature_q=1.5,
        softcap_p=6.0, reduction="none", return_entropy=True,
    )  # fmt: skip
    assert_close("div", d_trl.detach(), out.loss.view(-1).detach(), atol=2e-5, rtol=1e-4)
    assert_close("entropy", ent_trl.detach(), out.entropy.view(-1).detach(), atol=2e-5, rtol=1e-5)
    g = torch.randn(11)
    a = torch.autograd.grad((d_trl * g).sum(), (h2p, w2p))
    b = torch.autograd.grad((out.loss.view(-1) * g).sum(), (hp, wp))
    for name, x, y in zip(("dh_p", "dw_p"), a, b):
        assert_close(name, x, y.view_as(x), atol=1e-6 + 1e-4 * x.abs().max().item())


def test_fullgraph_compile():
    heads = _heads(b=1, t=6, v=97, hp=8, hq=5, seed=6)

    def step(hp, wp, bp, hq, wq):
        out = alignops.linear_divergence(hp, wp, hq, wq, kind="jsd", beta=0.3, b_p=bp, return_entropy=True)
        logits = alignops.divergence(hp @ wp.T, hq @ wq.T, kind="forward_kl", reduction="sum")
        return out.loss + 0.1 * out.entropy.mean() + logits.loss

    args = (heads[0], heads[1], heads[2], heads[3], heads[4])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out_c = compiled(*args)
    g_c = torch.autograd.grad(out_c, args[:3])
    out_e = step(*args)
    g_e = torch.autograd.grad(out_e, args[:3])
    assert_close("loss", out_e.detach(), out_c.detach(), atol=1e-6)
    for name, a, c in zip(("dh", "dw", "db"), g_e, g_c):
        assert_close(name, a, c, atol=1e-6)


def test_api_errors():
    hp, wp, bp, hq, wq, bq = _heads(b=1, t=4, v=50, hp=6, hq=5)
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        alignops.linear_divergence(hp, wp, hq, wq[:-1])
    with pytest.raises(ValueError, match="token count mismatch"):
        alignops.linear_divergence(hp, wp, hq[:, :-1], wq)
    with pytest.raises(ValueError, match="unknown divergence kind"):
        alignops.linear_divergence(hp, wp, hq, wq, kind="kullback")
    with pytest.raises(ValueError, match="generator"):
        alignops.linear_divergence(hp, wp, hq, wq, kind="f", generator="bogus")
    with pytest.raises(ValueError, match="reduction"):
        alignops.linear_divergence(hp, wp, hq, wq, reduction="avg")
    with pytest.raises(ValueError, match="num_items"):
        alignops.linear_divergence(hp, wp, hq, wq, reduction="none", num_items=3)
    with pytest.raises(ValueError, match="mask"):
        alignops.linear_divergence(hp, wp, hq, wq, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        alignops.divergence(torch.randn(3, 10), torch.randn(3, 11))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_and_mixed_precision(dtype):
    """16-bit heads compute in float32: the values match the float64 reference on the same
    (rounded) inputs; each gradient comes back in its input's dtype; a 16-bit hidden with a float32
    weight rounds the weight to 16 bits for the matmul, as torch.autocast does."""
    hp, wp, bp, hq, wq, bq = _heads(b=1, t=6, v=257, hp=16, hq=8, dtype=dtype, seed=8, teacher_grad=True)
    out = alignops.linear_divergence(hp, wp, hq, wq, b_p=bp, b_q=bq, kind="jsd", beta=0.3, reduction="sum")
    _, ref = _ref(
        (hp, wp, bp, hq, wq, bq), DivergenceOptions("jsd", beta=0.3), torch.ones(1, 6, dtype=torch.bool)
    )
    assert out.loss.dtype == torch.float32
    assert_close("div", ref[0].sum().detach(), out.loss.detach(), atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.loss, (hp, wp, bp, hq, wq, bq))
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    w32 = wp.detach().float().requires_grad_()
    mixed = alignops.linear_divergence(hp, w32, hq, wq, kind="reverse_kl", reduction="sum")
    rounded = alignops.linear_divergence(
        hp, w32.detach().to(dtype), hq, wq, kind="reverse_kl", reduction="sum"
    )
    assert torch.equal(mixed.loss, rounded.loss)
    (gw,) = torch.autograd.grad(mixed.loss, w32)
    assert gw.dtype == torch.float32
