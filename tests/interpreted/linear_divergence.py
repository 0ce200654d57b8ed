"""Interpreted cases of the fused two-head divergence Triton kernels (``kernels/linear_divergence.py``).

Run by ``tests/test_linear_divergence_interpret.py`` through the harness ``tests/_interpret.py``
(a subprocess with ``TRITON_INTERPRET=1``, outputs poisoned with NaN); by hand:
``TRITON_INTERPRET=1 ALIGNOPS_POISON=1 python -m pytest tests/interpreted/linear_divergence.py -q``.

Every divergence, the student's entropy and the gradients of both heads are checked against a
float64 reference written here from the definitions (full logits, the f-divergences literally as
``sum_v q f(p / q)``, gradients by autograd, so independent of the kernels' closed-form row
coefficients), with random upstream gradients for the divergence and the entropy. 16-bit inputs
use the three-way rule of ``assert_close_lowp`` against the ordinary PyTorch path in the same
precision.

Sizes (reason): N = 19, Hp = 24, Hq = 40, V = 203 are multiples of no block size (BN 16, BD 16 /
32 / 64, BV 32 / 64) and the two heads' hidden sizes differ. Small-block configs (BN 16, BV 32,
BD 16, 2 or 3 vocab splits, backward chunks of 64 vocab rows) make these shapes span several
token blocks, hidden chunks, vocab blocks, splits and backward chunks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before import (see module docstring)", allow_module_level=True)

from alignops.kernels import _launch  # noqa: E402
from alignops.kernels import linear_divergence as K  # noqa: E402
from alignops.kernels._common import DivergenceOptions, LogitOptions, matmul_dtype  # noqa: E402
from alignops.kernels.linear_logprobs import BwdConfig, FwdConfig  # noqa: E402

from tests._assert import assert_close, assert_close_lowp  # noqa: E402

SMALL_FWD = FwdConfig(16, 32, 16, 4, 1, 2)  # 2 token blocks, 7 vocab blocks over 2 splits (4 + 3)
SPLIT3_FWD = FwdConfig(16, 32, 16, 4, 1, 3)  # 3 + 3 + 1 vocab blocks
SMALL_BWD = BwdConfig(16, 32, 16, 4, 1, 19 * 64)  # vocab chunks of 64 rows (3 of 64, one of 11)
P_GRADS = ("dh_p", "dw_p", "db_p")
Q_GRADS = ("dh_q", "dw_q", "db_q")

# f generators literally (Nowozin et al., 2016, arXiv:1606.00709), js normalized to jsd(1/2)
F_GEN = {
    "kl": lambda t: t * torch.log(t),
    "reverse_kl": lambda t: -torch.log(t),
    "hellinger": lambda t: (t.sqrt() - 1.0) ** 2,
    "chi2": lambda t: (t - 1.0) ** 2,
    "js": lambda t: 0.5 * (t * torch.log(t) - (1.0 + t) * torch.log((1.0 + t) / 2.0)),
    "tv": lambda t: 0.5 * (t - 1.0).abs(),
}


def divergence_ref(zp: torch.Tensor, zq: torch.Tensor, div: DivergenceOptions) -> torch.Tensor:
    """Per-row divergence of ``softmax(zp)`` and ``softmax(zq)`` [N, V] from the definitions."""
    lp, lq = zp.log_softmax(-1), zq.log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    fkl, rkl = (q * (lq - lp)).sum(-1), (p * (lp - lq)).sum(-1)
    if div.kind == "forward_kl":
        return fkl
    if div.kind == "reverse_kl":
        return rkl
    if div.kind == "jsd":
        b = div.beta
        if b in (0.0, 1.0):  # TRL's endpoints: the two KLs
            return fkl if b == 0.0 else rkl
        lm = torch.log((1.0 - b) * p + b * q)
        return b * (q * (lq - lm)).sum(-1) + (1.0 - b) * (p * (lp - lm)).sum(-1)
    if div.kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if div.kind == "alpha":
        a = div.alpha
        if a in (0.0, 1.0):  # the limits
            return fkl if a == 0.0 else rkl
        return (1.0 - (p**a * q ** (1.0 - a)).sum(-1)) / (a * (1.0 - a))
    return (q * F_GEN[div.generator](p / q)).sum(-1)


@dataclass(frozen=True)
class Case:
    div: DivergenceOptions
    N: int = 19
    HP: int = 24
    HQ: int = 40
    V: int = 203
    dtype: torch.dtype = torch.float32
    weight_dtype: torch.dtype | None = None  # None: hidden's dtype (else mixed precision)
    bias_p: bool = True
    bias_q: bool = False
    softcap_p: float | None = 5.0
    softcap_q: float | None = None
    temp_p: float = 0.8
    temp_q: float = 1.3
    scale_q: float = 1.2
    valid: str = "some"  # "all" | "some" | "none" | "one" (only the last row)
    entropy: bool = True
    grads: tuple[str, ...] = ("div", "entropy")
    need: tuple[str, ...] = P_GRADS + Q_GRADS
    fwd: FwdConfig | None = SMALL_FWD  # None: the launcher's heuristic (what a GPU runs)
    bwd: BwdConfig | None = SMALL_BWD
    magnitude: float = 1.0
    tol: float = 2e-5

    @property
    def opts(self) -> tuple[LogitOptions, LogitOptions]:
        return (
            LogitOptions(softcap=self.softcap_p, temperature=self.temp_p),
            LogitOptions(logit_scale=self.scale_q, softcap=self.softcap_q, temperature=self.temp_q),
        )


def D(kind, **kw) -> DivergenceOptions:
    return DivergenceOptions(kind, **kw)


CASES = [
    # one-pass kinds; the default configs (BN 64 > N: one token block, BV 64, BD 64 / 32)
    pytest.param(Case(D("forward_kl"), fwd=None, bwd=None), id="fkl-default-config"),
    pytest.param(Case(D("reverse_kl"), bias_q=True, softcap_q=7.0), id="rkl-both-bias-softcap"),
    # TRL's endpoints and an interior beta; three splits
    pytest.param(Case(D("jsd", beta=0.0)), id="jsd-beta0"),
    pytest.param(Case(D("jsd", beta=1.0), fwd=SPLIT3_FWD), id="jsd-beta1-split3"),
    pytest.param(Case(D("jsd", beta=0.3), fwd=SPLIT3_FWD, bias_q=True), id="jsd-beta0.3"),
    pytest.param(Case(D("jsd", beta=0.5), fwd=None, bwd=None), id="jsd-beta0.5-default-config"),
    pytest.param(Case(D("tv")), id="tv"),
    pytest.param(Case(D("alpha", alpha=0.3)), id="alpha0.3"),
    pytest.param(Case(D("alpha", alpha=1.5), softcap_p=None), id="alpha1.5"),
    pytest.param(Case(D("alpha", alpha=1.0)), id="alpha1-limit"),
    *[pytest.param(Case(D("f", generator=g)), id=f"f-{g}") for g in F_GEN],
    # 16-bit heads (bf16 through the INTERP_BF16 switch), mixed precision
    pytest.param(Case(D("jsd", beta=0.3), dtype=torch.bfloat16), id="bf16-jsd"),
    pytest.param(Case(D("forward_kl"), dtype=torch.float16, fwd=None, bwd=None), id="fp16-fkl-default"),
    pytest.param(
        Case(D("tv"), dtype=torch.bfloat16, weight_dtype=torch.float32, bias_q=True), id="mixed-bf16-fp32-tv"
    ),
    # validity patterns
    pytest.param(Case(D("jsd", beta=0.3), valid="none", fwd=SPLIT3_FWD), id="all-invalid"),
    pytest.param(Case(D("reverse_kl"), valid="one"), id="one-valid-row"),
    # partial upstream gradients and partial needs
    pytest.param(Case(D("tv"), grads=("div",), need=("dh_p", "dw_q"), entropy=False), id="gdiv-dh_p-dw_q"),
    pytest.param(Case(D("alpha", alpha=0.7), grads=("entropy",)), id="gent-only"),
    pytest.param(Case(D("f", generator="hellinger"), need=P_GRADS), id="student-only"),
    # the entropy is the student's: teacher gradients from an entropy gradient alone are exactly 0
    pytest.param(Case(D("tv"), grads=("entropy",), need=Q_GRADS), id="gent-teacher-only"),
    # |z| ~ 1e3 in fp32: online rescaling of both heads and the KL accumulator
    pytest.param(Case(D("forward_kl"), magnitude=300.0, softcap_p=None, tol=2e-3), id="fkl-extreme-logits"),
    pytest.param(Case(D("reverse_kl"), magnitude=300.0, softcap_p=None, tol=2e-3), id="rkl-extreme-logits"),
]


def _inputs(c: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hs = c.magnitude**0.5
    wdt = c.weight_dtype or c.dtype
    hp = (torch.randn(c.N, c.HP, generator=g) * hs).to(c.dtype)
    wp = (torch.randn(c.V, c.HP, generator=g) * (2.0 * hs / c.HP**0.5)).to(wdt)
    hq = (torch.randn(c.N, c.HQ, generator=g) * hs).to(c.dtype)
    wq = (torch.randn(c.V, c.HQ, generator=g) * (2.0 * hs / c.HQ**0.5)).to(wdt)
    bp = (torch.randn(c.V, generator=g) * 0.5).to(c.dtype) if c.bias_p else None
    bq = (torch.randn(c.V, generator=g) * 0.5).to(c.dtype) if c.bias_q else None
    valid = torch.ones(c.N, dtype=torch.bool)
    if c.valid == "some":
        valid[torch.randperm(c.N, generator=g)[: c.N // 4]] = False
        valid[0] = False  # the first row of the first token block
    elif c.valid == "none":
        valid[:] = False
    elif c.valid == "one":
        valid[:-1] = False
    ups = {k: torch.randn(c.N, generator=g) if k in c.grads else None for k in ("div", "entropy")}
    return (hp, wp, bp, hq, wq, bq), valid, ups


def _logits(h, w, b, o: LogitOptions, lowp: bool):
    dot = matmul_dtype(h.dtype, w.dtype)
    if lowp:  # the ordinary PyTorch path: logits in the matmul dtype
        r = F.linear(h.to(dot), w.to(dot), None if b is None else b.to(dot)).float()
    else:  # float64 of the operands rounded to the matmul dtype
        r = h.to(dot).double() @ w.to(dot).double().T + (0.0 if b is None else b.double())
    r = r * o.logit_scale
    if o.softcap is not None:
        r = o.softcap * torch.tanh(r / o.softcap)
    return r / o.temperature


def _math(c: Case, tensors, valid, ups, *, lowp: bool = False):
    """(div, entropy) and the gradients of ``sum(g_div div + g_ent ent)`` w.r.t. all six inputs."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    hp, wp, bp, hq, wq, bq = leaves
    op, oq = c.opts
    zp, zq = _logits(hp, wp, bp, op, lowp), _logits(hq, wq, bq, oq, lowp)
    div = torch.where(valid, divergence_ref(zp, zq, c.div), 0.0)
    ent = torch.where(valid, -(zp.softmax(-1) * zp.log_softmax(-1)).sum(-1), 0.0)
    loss = sum(
        (x * ups[k].to(x.dtype)).sum() for k, x in (("div", div), ("entropy", ent)) if ups[k] is not None
    )
    if torch.is_tensor(loss) and loss.requires_grad:
        loss.backward()
    names = ("dh_p", "dw_p", "db_p", "dh_q", "dw_q", "db_q")
    grads = {k: (None if t is None else t.grad) for k, t in zip(names, leaves)}
    return {"div": div.detach(), "entropy": ent.detach()}, grads


def _check(name, ref, out, base, tol):
    if base is None:
        assert_close(name, ref, out, atol=tol * max(1.0, ref.abs().max().item()), rtol=tol)
    else:
        assert_close_lowp(name, ref, out, base)


@pytest.mark.parametrize("c", CASES)
def test_fwd_bwd_against_reference(c: Case):
    tensors, valid, ups = _inputs(c)
    op, oq = c.opts
    stats = K.linear_divergence_fwd(*tensors, valid, op, oq, c.div, want_entropy=c.entropy, config=c.fwd)
    lowp = c.dtype != torch.float32 or c.weight_dtype not in (None, torch.float32)
    ref, ref_g = _math(c, tensors, valid, ups)
    base, base_g = _math(c, tensors, valid, ups, lowp=True) if lowp else ({}, {})
    outs = {"div": stats.div, "entropy": stats.entropy_p}
    if not c.entropy:
        assert stats.entropy_p is None
        del outs["entropy"]
    for k, out in outs.items():
        assert out.dtype == torch.float32 and out.shape == (c.N,), k
        assert bool((out[~valid] == 0).all()), f"{k}: invalid rows not exactly 0"
        _check(k, ref[k], out, base.get(k), c.tol)
    hp, wp, bp, hq, wq, bq = tensors
    for k, out, h, w, b in (("lse_p", stats.lse_p, hp, wp, bp), ("lse_q", stats.lse_q, hq, wq, bq)):
        o = op if k == "lse_p" else oq
        want = torch.where(valid, torch.logsumexp(_logits(h, w, b, o, False), -1), 0.0)
        assert bool((out[~valid] == 0).all()), f"{k}: invalid rows not exactly 0"
        tol = c.tol if not lowp else 2e-2
        assert_close(k, want, out, atol=tol * max(1.0, want.abs().max().item()), rtol=tol)

    names = P_GRADS + Q_GRADS
    need = {k: k in c.need and tensors[i] is not None for i, k in enumerate(names)}
    g = K.linear_divergence_bwd(
        *tensors,
        valid,
        stats,
        ups["div"],
        ups["entropy"],
        op,
        oq,
        c.div,
        **{f"need_{k}": need[k] for k in names},
        config=c.bwd,
    )
    for i, (k, out) in enumerate(zip(names, g)):
        if not need[k]:
            assert out is None, f"{k} returned though not needed"
            continue
        src = tensors[i]
        assert out.dtype == src.dtype and out.shape == src.shape, k
        if k.startswith("dh"):
            assert bool((out[~valid] == 0).all()), f"{k}: invalid rows not exactly 0"
        r = ref_g[k] if ref_g[k] is not None else torch.zeros(src.shape, dtype=torch.float64)
        if c.valid == "none" or (ups["div"] is None and k in Q_GRADS):
            assert bool((out == 0).all()), f"{k}: gradient must be exactly 0"
        bg = base_g.get(k)
        _check(k, r, out, None if bg is None else bg, c.tol * 2.5)


def test_vocab_split_matches_no_split():
    """The split combine (both heads' rescaling and the KL accumulator's) and the split row sums
    of the second pass agree with one split to fp32 accuracy, for a one- and a two-pass kind."""
    for div in (D("forward_kl"), D("jsd", beta=0.3)):
        c = Case(div, magnitude=4.0)
        tensors, valid, _ = _inputs(c, seed=1)
        outs = [
            K.linear_divergence_fwd(
                *tensors, valid, *c.opts, div, want_entropy=True, config=SMALL_FWD._replace(num_splits=s)
            )
            for s in (1, 2, 7)
        ]
        for s, o in zip((2, 7), outs[1:]):
            for k in ("div", "lse_p", "lse_q", "entropy_p"):
                a, b = getattr(outs[0], k), getattr(o, k)
                assert_close(f"{div.kind} {k} splits={s}", a, b, atol=3e-6 * max(1.0, a.abs().max().item()))


def test_bad_inputs_raise():
    """Clear errors, never wrong numbers: vocabulary / token / valid mismatches, dtypes, ranks."""
    c = Case(D("tv"))
    (hp, wp, bp, hq, wq, bq), valid, _ = _inputs(c)
    op, oq = c.opts
    fwd = K.linear_divergence_fwd
    with pytest.raises(ValueError, match="vocabulary"):
        fwd(hp, wp, bp, hq, wq[:-1], bq, valid, op, oq, c.div)
    with pytest.raises(ValueError, match="token count"):
        fwd(hp, wp, bp, hq[:-1], wq, bq, valid, op, oq, c.div)
    with pytest.raises(ValueError, match="valid"):
        fwd(hp, wp, bp, hq, wq, bq, valid[:-1], op, oq, c.div)
    with pytest.raises(TypeError, match="valid"):
        fwd(hp, wp, bp, hq, wq, bq, valid.int(), op, oq, c.div)
    with pytest.raises(ValueError, match="hidden size"):
        fwd(hp, wp, bp, hq[:, :-1], wq, bq, valid, op, oq, c.div)
    with pytest.raises(ValueError, match="b_p"):
        fwd(hp, wp, bp[:-1], hq, wq, bq, valid, op, oq, c.div)
    with pytest.raises(TypeError, match="float64"):
        fwd(hp.double(), wp.double(), None, hq, wq, bq, valid, op, oq, c.div)
    with pytest.raises(ValueError, match="kind"):
        D("kl")
    with pytest.raises(ValueError, match="generator"):
        D("f", generator="wasserstein")
    with pytest.raises(ValueError, match="beta"):
        D("jsd", beta=1.5)
    stats = fwd(hp, wp, bp, hq, wq, bq, valid, op, oq, c.div)
    with pytest.raises(ValueError, match="entropy_p"):
        K.linear_divergence_bwd(
            hp, wp, bp, hq, wq, bq, valid, stats, None, torch.ones(c.N), op, oq, c.div,
            need_dh_p=True, need_dw_p=False, need_db_p=False,
        )  # fmt: skip


def test_dispatch_and_torch_engine_agree():
    """``alignops._dispatch`` routes the family to these launchers (``ALIGNOPS_BACKEND=triton``
    here; CUDA tensors under ``auto``), and the Triton kernels agree with the independent torch
    engine (``alignops._torch.linear_divergence``) on a one-pass, a two-pass and two kinds with
    closed-form backward coefficients: values and all six gradients."""
    from alignops import _dispatch
    from alignops._torch import linear_divergence as T

    os.environ["ALIGNOPS_BACKEND"] = "triton"
    try:
        assert _dispatch.engine("linear_divergence", torch.zeros(1)) is K
    finally:
        del os.environ["ALIGNOPS_BACKEND"]
    assert _dispatch.engine("linear_divergence", torch.zeros(1, dtype=torch.float64)) is T
    names = P_GRADS + Q_GRADS
    for i, div in enumerate(
        (D("reverse_kl"), D("jsd", beta=0.7), D("alpha", alpha=2.0), D("f", generator="hellinger"))
    ):
        c = Case(div, N=11, V=97, bias_q=True, softcap_q=9.0)
        tensors, valid, ups = _inputs(c, seed=10 + i)
        outs, grads = [], []
        for eng in (K, T):
            st = eng.linear_divergence_fwd(*tensors, valid, *c.opts, div, want_entropy=True)
            g = eng.linear_divergence_bwd(
                *tensors,
                valid,
                st,
                ups["div"],
                ups["entropy"],
                *c.opts,
                div,
                **{f"need_{k}": True for k in names},
            )
            outs.append(st)
            grads.append(g)
        for k in ("div", "lse_p", "lse_q", "entropy_p"):
            a, b = getattr(outs[1], k), getattr(outs[0], k)
            assert_close(f"{div.kind} {div.generator} {k}", a, b, atol=2e-5 * max(1.0, a.abs().max().item()))
        for k, a, b in zip(names, grads[1], grads[0]):
            assert_close(f"{div.kind} {div.generator} {k}", a, b, atol=5e-5 * max(1.0, a.abs().max().item()))


def test_minus_inf_logits():
    """-inf logits (a -inf bias entry bans a token, no soft-cap): entries where both heads have
    no mass contribute 0, a divergence that is infinite in exact arithmetic (mass where the other
    head has none, for the kinds that are infinite there) is +inf, and its row gets no gradient.
    Values against the family's float64 reference; gradients by float64 autograd through logits
    floored at -1e30 (exactly zero probabilities, finite terms) on the finite rows."""
    from alignops.reference.linear_divergence import divergence_ref as family_ref

    names = P_GRADS + Q_GRADS
    kinds = (D("forward_kl"), D("reverse_kl"), D("jsd", beta=0.4), D("alpha", alpha=-0.5))
    kinds += (D("alpha", alpha=1.5), D("f", generator="chi2"))
    for i, div in enumerate(kinds):
        c = Case(div, N=9, V=70, bias_q=True, softcap_p=None, valid="some")
        tensors, valid, ups = _inputs(c, seed=20 + i)
        hp, wp, bp, hq, wq, bq = tensors
        bp[[3, 50]] = float("-inf")  # banned by the student only (3), by both (50)
        bq[[50, 61]] = float("-inf")  # banned by the teacher only (61)
        op, oq = c.opts
        st = K.linear_divergence_fwd(*tensors, valid, op, oq, div, want_entropy=True, config=SMALL_FWD)
        ref = family_ref(_logits(hp, wp, bp, op, False), _logits(hq, wq, bq, oq, False), div, valid)
        fin = torch.isfinite(ref[0])
        assert torch.equal(torch.isfinite(st.div), fin), f"{div}: infinite rows differ"
        assert bool((st.div[~fin] == float("inf")).all()), f"{div}: infinite rows must be +inf"
        for k, r, o in zip(("div", "lse_p", "lse_q", "entropy_p"), ref, st):
            assert_close(f"{div} {k}", r[fin], o[fin], atol=2e-5 * max(1.0, r[fin].abs().max().item()))
        g = K.linear_divergence_bwd(
            *tensors, valid, st, ups["div"], ups["entropy"], op, oq, div, **{f"need_{k}": True for k in names}
        )
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        zp = _logits(*leaves[:3], op, False).clamp(min=-1e30)
        zq = _logits(*leaves[3:], oq, False).clamp(min=-1e30)
        keep = valid & fin
        d64, _, _, _ = family_ref(zp[keep], zq[keep], div)
        ent = family_ref(zp[valid], zq[valid], div)[3]
        ((d64 * ups["div"][keep]).sum() + (ent * ups["entropy"][valid]).sum()).backward()
        for k, out, leaf in zip(names, g, leaves):
            r = leaf.grad
            assert_close(f"{div} {k}", r, out, atol=5e-5 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize(
    "div,dtype,need",
    [
        pytest.param(D("forward_kl"), torch.float32, (True, True), id="fkl-fp32"),
        pytest.param(D("jsd", beta=0.3), torch.float32, (True, True), id="jsd-fp32"),
        pytest.param(D("tv"), torch.float32, (False, True), id="tv-dq-only"),
        pytest.param(D("alpha", alpha=1.5), torch.float32, (True, False), id="alpha1.5-dp-only"),
        pytest.param(D("f", generator="chi2"), torch.bfloat16, (True, True), id="chi2-bf16"),
        pytest.param(D("reverse_kl"), torch.float16, (True, True), id="rkl-fp16"),
    ],
)
def test_logits_launchers(div, dtype, need):
    """``logits_divergence_fwd`` / ``_bwd`` (both heads' logits given) against float64 autograd
    through the same logits and transforms: rows 3 elements wider than V (a row-strided view),
    invalid rows, each head's own temperature / soft-cap, one or both gradients; poisoned
    outputs catch an unwritten gradient element."""
    n, v = 19, 203
    g = torch.Generator().manual_seed(7)
    wide = (torch.randn(2, n, v + 3, generator=g) * 3.0).to(dtype)
    lp_, lq_ = wide[0, :, :v], wide[1, :, 3:]
    assert lp_.stride(0) == v + 3
    valid = torch.rand(n, generator=g) > 0.3
    op = LogitOptions(softcap=8.0, temperature=0.9)
    oq = LogitOptions(temperature=1.4, logit_scale=0.8)
    ups = {k: torch.randn(n, generator=g) for k in ("div", "entropy")}
    st = K.logits_divergence_fwd(lp_, lq_, valid, op, oq, div, want_entropy=True, config=SMALL_FWD)
    dp, dq = K.logits_divergence_bwd(
        lp_, lq_, valid, st, ups["div"], ups["entropy"], op, oq, div, need_dp=need[0], need_dq=need[1]
    )
    leaves = [x.detach().double().requires_grad_() for x in (lp_, lq_)]

    def tf(r, o):
        r = r * o.logit_scale
        return (r if o.softcap is None else o.softcap * torch.tanh(r / o.softcap)) / o.temperature

    zp, zq = tf(leaves[0], op), tf(leaves[1], oq)
    d = torch.where(valid, divergence_ref(zp, zq, div), 0.0)
    ent = torch.where(valid, -(zp.softmax(-1) * zp.log_softmax(-1)).sum(-1), 0.0)
    ((d * ups["div"]).sum() + (ent * ups["entropy"]).sum()).backward()
    lowp = dtype != torch.float32
    for k, ref, out in (("div", d, st.div), ("entropy", ent, st.entropy_p)):
        tol = 2e-5 if not lowp else 1e-3
        assert_close(k, ref.detach(), out, atol=tol * max(1.0, ref.abs().max().item()), rtol=tol)
    for k, want, out, leaf in (("dlogits_p", need[0], dp, leaves[0]), ("dlogits_q", need[1], dq, leaves[1])):
        if not want:
            assert out is None, f"{k} returned though not needed"
            continue
        assert out.dtype == dtype and out.shape == (n, v), k
        assert bool((out[~valid] == 0).all()), f"{k}: invalid rows not exactly 0"
        r = leaf.grad
        # 16-bit gradients: one rounding of each element to the logits' dtype
        tol = 5e-5 if not lowp else 2 * torch.finfo(dtype).eps
        assert_close(k, r, out, atol=tol * max(1.0, r.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("variant", ["linear", "logits"])
def test_public_api_routes_to_kernels(variant):
    """``alignops.linear_divergence`` / ``alignops.divergence`` (custom ops, autograd, masks,
    reductions) with ``ALIGNOPS_BACKEND=triton`` run these launchers and match the same calls on
    the torch engine (``ALIGNOPS_BACKEND=torch``, tested against float64 in its own suite):
    loss, entropy and the gradients of every input, for a one- and a two-pass kind."""
    g = torch.Generator().manual_seed(3)
    b, t, hp_, hq_, v = 2, 7, 24, 40, 203
    base = {
        "h_p": torch.randn(b, t, hp_, generator=g),
        "w_p": torch.randn(v, hp_, generator=g) * 0.4,
        "h_q": torch.randn(b, t, hq_, generator=g),
        "w_q": torch.randn(v, hq_, generator=g) * 0.3,
    }
    mask = torch.rand(b, t, generator=g) > 0.2
    up = torch.randn(b, t, generator=g)
    launched = []
    real_launch = _launch.launch
    _launch.launch = lambda kernel, grid, **kw: launched.append(kernel) or real_launch(kernel, grid, **kw)
    try:
        _check_api(variant, base, mask, up)
    finally:
        _launch.launch = real_launch
    names = {getattr(k, "fn", k).__name__ for k in launched}  # under @triton.heuristics
    assert {"_linear_divergence_stats_kernel", "_linear_divergence_bwd_kernel"} <= names, names


def _check_api(variant, base, mask, up):
    import alignops

    for kind, kw in (("reverse_kl", {}), ("jsd", {"beta": 0.3})):
        runs = []
        for backend in ("triton", "torch"):
            os.environ["ALIGNOPS_BACKEND"] = backend
            try:
                x = {k: v_.clone().requires_grad_() for k, v_ in base.items()}
                opts = dict(kind=kind, mask=mask, temperature_p=0.9, softcap_q=6.0, return_entropy=True, **kw)
                if variant == "linear":
                    out = alignops.linear_divergence(x["h_p"], x["w_p"], x["h_q"], x["w_q"], **opts)
                else:
                    lp_, lq_ = x["h_p"] @ x["w_p"].T, x["h_q"] @ x["w_q"].T
                    out = alignops.divergence(lp_, lq_, **opts)
                (out.loss * 3.0 + (out.entropy * up).sum()).backward()
                runs.append((out.loss.detach(), out.entropy.detach(), {k: x[k].grad for k in x}))
            finally:
                del os.environ["ALIGNOPS_BACKEND"]
        (l_t, e_t, g_t), (l_r, e_r, g_r) = runs
        assert_close(f"{variant} {kind} loss", l_r, l_t, atol=2e-5 * max(1.0, l_r.abs().item()))
        assert_close(f"{variant} {kind} entropy", e_r, e_t, atol=2e-5 * max(1.0, e_r.abs().max().item()))
        for k in base:
            r = g_r[k]
            assert_close(f"{variant} {kind} d{k}", r, g_t[k], atol=5e-5 * max(1.0, r.abs().max().item()))


def test_agrees_with_trl():
    """TRL 1.16's ``ChunkedDivergenceFunction`` (its CPU path; the peer library this family
    replaces): per-token generalized JSD at beta 0.5 and the forward KL (TRL's beta = 0), the
    student's entropy and gradients, soft-capped student, shared temperature."""
    mod = pytest.importorskip("trl.kernels.chunked_divergence")
    g = torch.Generator().manual_seed(11)
    n, hp_, hq_, v = 13, 24, 40, 203
    hp, wp = torch.randn(n, hp_, generator=g), torch.randn(v, hp_, generator=g) * 0.4
    hq, wq = torch.randn(n, hq_, generator=g), torch.randn(v, hq_, generator=g) * 0.3
    valid = torch.ones(n, dtype=torch.bool)
    op, oq = LogitOptions(softcap=6.0, temperature=1.5), LogitOptions(temperature=1.5)
    up = torch.randn(n, generator=g)
    for beta, div in ((0.5, D("jsd", beta=0.5)), (0.0, D("forward_kl"))):
        h2, w2 = hp.clone().requires_grad_(), wp.clone().requires_grad_()
        d_trl, ent_trl = mod.ChunkedDivergenceFunction.apply(
            h2, w2, None, hq, wq, None, beta, 1.5, 1.0, 6.0, 1.0, None
        )
        dh_trl, dw_trl = torch.autograd.grad((d_trl * up).sum(), (h2, w2))
        st = K.linear_divergence_fwd(hp, wp, None, hq, wq, None, valid, op, oq, div, want_entropy=True)
        dh, dw, *_ = K.linear_divergence_bwd(
            hp, wp, None, hq, wq, None, valid, st, up, None, op, oq, div,
            need_dh_p=True, need_dw_p=True, need_db_p=False,
        )  # fmt: skip
        assert_close(f"div beta={beta}", d_trl.detach(), st.div, atol=2e-5, rtol=1e-4)
        assert_close(f"entropy beta={beta}", ent_trl.detach(), st.entropy_p, atol=2e-5, rtol=1e-5)
        for name, x, y in (("dh_p", dh_trl, dh), ("dw_p", dw_trl, dw)):
            assert_close(f"{name} beta={beta}", x, y, atol=1e-6 + 1e-4 * x.abs().max().item())
