"""Interpreted cases of the fused linear log-probs Triton kernels (``kernels/linear_logprobs.py``).

Run by ``tests/test_linear_logprobs_interpret.py`` through the harness ``tests/_interpret.py``
(a subprocess with ``TRITON_INTERPRET=1``); by hand:
``TRITON_INTERPRET=1 python -m pytest tests/interpreted/linear_logprobs.py -q``.

Every value and gradient is checked against a float64 reference written from the math
(autograd through full logits, independent of the kernels' gradient formula), with random
upstream gradients for all four statistics. fp16 / bf16 (and mixed 16-bit / fp32 operands)
use the three-way rule of ``assert_close_lowp`` against the ordinary PyTorch path in the same
precision (for mixed operands: both rounded to the 16-bit dtype, as ``torch.autocast`` does).

Sizes (reason for each): N = 37, H = 40, V = 203 are multiples of no block size (BN 16 / 64,
BD 16 / 32 / 64, BV 32 / 128), so every tile has masked rows, hidden columns and vocab rows.
Small-block configs (BN = 16, BV = 32, BD = 16) make the same shapes span several token
blocks, hidden chunks and vocab blocks; the default configs are what runs on a GPU.
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
from alignops.kernels import linear_logprobs as K  # noqa: E402
from alignops.kernels._common import (  # noqa: E402  # noqa: E402
    GRAD_FIELDS,
    LogitOptions,
    StatRequest,
    TokenStats,
    matmul_dtype,
    poison_enabled,
)

from alignops.reference import logits_ref  # noqa: E402
from tests._assert import assert_close, assert_close_lowp, assert_topk  # noqa: E402

IGNORE = -100
STATS = GRAD_FIELDS  # ("logp", "lse", "entropy", "zmean", "log_sum_p2")
ALL = StatRequest(entropy=True, zmean=True, log_sum_p2=True)

# (BN, BV, BD, num_warps, num_stages[, num_splits]) and a workspace size for the backward
SMALL_FWD = K.FwdConfig(16, 32, 16, 4, 1, 1)  # one split, 3 token blocks, 7 vocab blocks, 3 chunks
SPLIT3_FWD = K.FwdConfig(16, 32, 16, 4, 1, 3)  # 7 vocab blocks over 3 splits: 3 + 3 + 1
# 37 * 64 elements: the backward takes vocab chunks of 64 rows (3 of 64, one of 11)
SMALL_BWD = K.BwdConfig(16, 32, 16, 4, 1, 37 * 64)


@dataclass(frozen=True)
class Case:
    N: int = 37
    H: int = 40
    V: int = 203
    dtype: torch.dtype = torch.float32
    weight_dtype: torch.dtype | None = None  # None: hidden's dtype (else mixed precision)
    bias: bool = True
    softcap: float | None = None
    temperature: float = 1.0
    logit_scale: float = 1.0
    ignore: str = "some"  # "none" | "some" | "all" | "one" (only the last row valid)
    fwd: K.FwdConfig | None = None  # None: the launcher's heuristic (what a GPU runs)
    bwd: K.BwdConfig | None = None
    grads: tuple[str, ...] = STATS  # upstream gradients given (others None)
    need: tuple[str, ...] = ("dh", "dw", "db")
    magnitude: float = 1.0  # std of the raw logits is about 3 * magnitude
    topk: int = 0  # also check the top-k side output
    strided: bool = False  # hidden as a row-strided view of a wider buffer
    val_tol: float = 2e-5
    grad_tol: float = 5e-5

    @property
    def opts(self) -> LogitOptions:
        return LogitOptions(IGNORE, self.logit_scale, self.softcap, self.temperature)


CASES = [
    # default configs: BN 64 > N, BV 128 (2 vocab blocks, one per split), BD 64 > H
    pytest.param(Case(softcap=5.0, temperature=0.7, topk=5), id="fp32-default-split-softcap-top5"),
    # several token blocks / hidden chunks / vocab blocks, no split; backward in vocab chunks
    pytest.param(
        Case(bias=False, temperature=1.3, fwd=SMALL_FWD, bwd=SMALL_BWD), id="fp32-small-blocks-chunked"
    ),
    pytest.param(
        Case(softcap=3.0, fwd=SPLIT3_FWD, bwd=SMALL_BWD, grads=("entropy", "zmean", "log_sum_p2"), topk=37),
        id="fp32-split3-uneven-top37",
    ),
    # a model's logit multiplier, with and without a soft-cap after it
    pytest.param(Case(logit_scale=0.37, softcap=4.0, fwd=SMALL_FWD, bwd=SMALL_BWD), id="fp32-scale-softcap"),
    pytest.param(Case(logit_scale=2.5, temperature=0.8), id="fp32-scale-temperature"),
    pytest.param(Case(dtype=torch.float16, softcap=20.0, temperature=0.9), id="fp16-default"),
    pytest.param(Case(dtype=torch.float16, fwd=SMALL_FWD, bwd=SMALL_BWD), id="fp16-small-blocks"),
    # bf16 through the INTERP_BF16 switch (the interpreter's bf16 tl.dot is wrong)
    pytest.param(Case(dtype=torch.bfloat16, softcap=10.0, temperature=1.5, topk=8), id="bf16-default-top8"),
    pytest.param(
        Case(dtype=torch.bfloat16, bias=False, fwd=SPLIT3_FWD, bwd=SMALL_BWD), id="bf16-small-blocks"
    ),
    # mixed precision: 16-bit activations with an fp32 master weight (autocast), and the reverse
    pytest.param(
        Case(dtype=torch.bfloat16, weight_dtype=torch.float32, softcap=6.0, fwd=SMALL_FWD, bwd=SMALL_BWD),
        id="mixed-bf16-hidden-fp32-weight",
    ),
    pytest.param(Case(dtype=torch.float16, weight_dtype=torch.float32), id="mixed-fp16-hidden-fp32-weight"),
    pytest.param(
        Case(dtype=torch.float32, weight_dtype=torch.bfloat16, bias=False, bwd=SMALL_BWD),
        id="mixed-fp32-hidden-bf16-weight",
    ),
    # every row ignored: all outputs and gradients exactly 0, no NaN from empty rows
    pytest.param(Case(ignore="all", softcap=5.0, fwd=SPLIT3_FWD, bwd=SMALL_BWD), id="fp32-all-ignored"),
    # a single valid row: its token block must not be skipped as "all ignored"
    pytest.param(Case(ignore="one", fwd=SMALL_FWD, bwd=SMALL_BWD, topk=64), id="fp32-one-valid-row-top64"),
    pytest.param(Case(ignore="none", N=16, fwd=None), id="fp32-tiny-batch-BN16"),
    # |z| ~ 1e4 in fp32: online rescaling must not overflow or lose the entropy. An ulp of 1e4
    # is 1e-3 and the 40-term dot rounds at that level, so absolute tolerances scale with |z|.
    pytest.param(
        Case(magnitude=3000.0, bias=False, fwd=SMALL_FWD, bwd=SMALL_BWD, val_tol=2e-2, grad_tol=5e-3),
        id="fp32-extreme-logits",
    ),
    # hidden rows 2 H + 3 apart (a [B, T, H] slice), vocab chunks in the backward
    pytest.param(Case(strided=True, softcap=4.0, fwd=SMALL_FWD, bwd=SMALL_BWD), id="fp32-strided-hidden"),
    # missing upstream gradients and partial needs
    pytest.param(Case(grads=("logp",), need=("dh",), bwd=SMALL_BWD), id="fp32-glogp-dh-only"),
    pytest.param(Case(grads=("lse", "entropy"), need=("dw", "db")), id="fp32-glse-gent-dw-db"),
    pytest.param(Case(grads=("zmean",), need=("db",), bias=True), id="fp32-gzmean-db-only"),
    pytest.param(Case(grads=("log_sum_p2",), need=("dh", "dw"), softcap=4.0), id="fp32-glsp2-only"),
    # dh and db without dW: the vocab chunks still fill the workspace for the dh GEMM
    pytest.param(Case(grads=("logp", "lse"), need=("dh", "db"), softcap=2.0), id="fp32-dh-db-no-dw"),
]


def _inputs(c: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hs = c.magnitude**0.5
    if c.strided:
        wide = torch.randn(c.N, 2 * c.H + 3, generator=g)
        hidden = wide.to(c.dtype)[:, 3 : 3 + c.H]
        assert hidden.stride() == (2 * c.H + 3, 1)
    else:
        hidden = (torch.randn(c.N, c.H, generator=g) * hs).to(c.dtype)
    weight = (torch.randn(c.V, c.H, generator=g) * (3.0 * hs / c.H**0.5)).to(c.weight_dtype or c.dtype)
    bias = (torch.randn(c.V, generator=g) * 0.5).to(c.dtype) if c.bias else None
    targets = torch.randint(0, c.V, (c.N,), generator=g)
    if c.ignore == "some":
        targets[torch.randperm(c.N, generator=g)[: c.N // 4]] = IGNORE
        targets[0] = IGNORE  # the first row of the first token block
    elif c.ignore == "all":
        targets[:] = IGNORE
    elif c.ignore == "one":
        targets[:-1] = IGNORE
    ups = {k: (torch.randn(c.N, generator=g) if k in c.grads else None) for k in STATS}
    return hidden, weight, bias, targets, ups


def _math(hidden, weight, bias, targets, ups, opts: LogitOptions, *, lowp: bool = False):
    """The four statistics and the gradients of ``sum(g * stat)`` by autograd through full
    logits. float64 leaves holding the operands rounded to the matmul dtype (the defined
    semantics of mixed precision), or (lowp) the ordinary PyTorch path: logits computed in the
    matmul dtype, as under ``torch.autocast``."""
    dot = matmul_dtype(hidden.dtype, weight.dtype)
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    if lowp:
        r = F.linear(h.to(dot), w.to(dot), None if b is None else b.to(dot)).float() * opts.logit_scale
        if opts.softcap is not None:
            r = opts.softcap * torch.tanh(r / opts.softcap)
        z = r / opts.temperature
    else:
        h64 = h.to(dot).double()
        w64 = w.to(dot).double()
        z = logits_ref(
            h64,
            w64,
            None if b is None else b.double(),
            temperature=opts.temperature,
            softcap=opts.softcap,
            logit_scale=opts.logit_scale,
        )
    valid = targets != IGNORE
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.clamp(min=0)[:, None])[:, 0] - lse
    ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    zmean = z.mean(-1)
    lsp2 = torch.logsumexp(2.0 * z, dim=-1) - 2.0 * lse  # log sum p^2
    stats = (logp, lse, ent, zmean, lsp2)
    outs = {k: torch.where(valid, x, torch.zeros_like(x)) for k, x in zip(STATS, stats)}
    loss = sum((outs[k] * ups[k].to(z.dtype)).sum() for k in STATS if ups[k] is not None)
    loss.backward()
    grads = {"dh": h.grad, "dw": w.grad, "db": None if b is None else b.grad}
    outs = {k: v.detach() for k, v in outs.items()}
    outs["logprobs"] = (z - lse[:, None]).detach()
    return outs, grads


def _lowp(c: Case) -> bool:
    return c.dtype != torch.float32 or (c.weight_dtype not in (None, torch.float32))


def _check(name, ref, out, base, *, tol):
    if base is None:
        assert_close(name, ref, out, atol=tol * max(1.0, ref.abs().max().item()), rtol=tol)
    else:
        assert_close_lowp(name, ref, out, base)


def _grads(ups) -> TokenStats:
    return TokenStats(*(ups[k] for k in STATS))


@pytest.mark.parametrize("c", CASES)
def test_fwd_bwd_against_reference(c: Case):
    hidden, weight, bias, targets, ups = _inputs(c)
    stats = K.linear_logprobs_fwd(
        hidden, weight, targets, bias, c.opts, ALL._replace(topk=c.topk), config=c.fwd
    )
    ref, ref_g = _math(hidden, weight, bias, targets, ups, c.opts)
    base, base_g = _math(hidden, weight, bias, targets, ups, c.opts, lowp=True) if _lowp(c) else ({}, {})
    ignored = targets == IGNORE
    for k in STATS:
        out = getattr(stats, k)
        assert out.dtype == torch.float32 and out.shape == (c.N,), k
        assert bool((out[ignored] == 0).all()), f"{k}: ignored rows not exactly 0"
        _check(k, ref[k], out, base.get(k), tol=c.val_tol)
    if c.topk:
        atol = 2e-2 if _lowp(c) else 1e-4 * max(1.0, c.magnitude)
        assert_topk("topk", ref["logprobs"], stats.topk_ids, stats.topk_logps, ~ignored, atol=atol)
    else:
        assert stats.topk_ids is None and stats.topk_logps is None

    need = {k: k in c.need and (k != "db" or c.bias) for k in ("dh", "dw", "db")}
    dh, dw, db = K.linear_logprobs_bwd(
        hidden,
        weight,
        targets,
        bias,
        stats,
        _grads(ups),
        c.opts,
        need_dhidden=need["dh"],
        need_dweight=need["dw"],
        need_dbias=need["db"],
        config=c.bwd,
    )
    for k, out, src in (("dh", dh, hidden), ("dw", dw, weight), ("db", db, bias)):
        if not need[k]:
            assert out is None, f"{k} returned though not needed"
            continue
        assert out.dtype == src.dtype and out.shape == src.shape, k
        if c.ignore == "all":
            assert bool((out == 0).all()), f"{k}: all rows ignored, gradient not exactly 0"
        if k == "dh":
            assert bool((out[ignored] == 0).all()), "dh: ignored rows not exactly 0"
        _check(k, ref_g[k], out, base_g.get(k), tol=c.grad_tol)


def test_vocab_split_matches_no_split():
    """The split combine is exact up to rounding: 1, 2 and 7 splits agree to fp32 accuracy."""
    c = Case(softcap=5.0)
    hidden, weight, bias, targets, _ = _inputs(c, seed=1)
    outs = [
        K.linear_logprobs_fwd(
            hidden,
            weight,
            targets,
            bias,
            c.opts,
            ALL._replace(topk=9),
            config=SMALL_FWD._replace(num_splits=s),
        )
        for s in (1, 2, 7)
    ]
    for s, o in zip((2, 7), outs[1:]):
        for k in STATS + ("topk_logps",):
            assert_close(f"{k} splits={s}", getattr(outs[0], k), getattr(o, k), atol=3e-6, rtol=3e-6)
        assert torch.equal(outs[0].topk_ids, o.topk_ids), f"top-k ids differ with {s} splits"


def test_int64_offsets():
    """Rows of hidden and weight more than 2**31 elements from the base pointer (virtual memory
    only: the untouched pages of the 4 GiB buffer are never committed). int32 offsets would
    wrap and read the wrong rows."""
    n, h, v = 3, 16, 40
    big = torch.empty(2**31 + 2**20, dtype=torch.float16)
    hidden = big.as_strided((n, h), (2**30, 1))  # last row starts at exactly 2**31
    w_stride = 2**31 // (v - 1) + 8
    weight = big.as_strided((v, h), (w_stride, 1), 64)  # last row past 2**31
    h_rows = {(i * 2**30) // 64 for i in range(n)}
    assert not h_rows & {(64 + j * w_stride) // 64 for j in range(v)}, "views overlap"
    g = torch.Generator().manual_seed(2)
    hidden.copy_(torch.randn(n, h, generator=g))
    weight.copy_(torch.randn(v, h, generator=g) * 0.5)
    targets = torch.tensor([5, IGNORE, v - 1])
    ups = {k: torch.randn(n, generator=g) for k in STATS}
    opts = LogitOptions(IGNORE)
    stats = K.linear_logprobs_fwd(hidden, weight, targets, None, opts, ALL)
    dh, dw, _ = K.linear_logprobs_bwd(
        hidden,
        weight,
        targets,
        None,
        stats,
        _grads(ups),
        opts,
        need_dhidden=True,
        need_dweight=True,
        need_dbias=False,
    )
    ref, ref_g = _math(hidden.clone(), weight.clone(), None, targets, ups, opts)
    base, base_g = _math(hidden.clone(), weight.clone(), None, targets, ups, opts, lowp=True)
    for k in STATS:
        assert_close_lowp(k, ref[k], getattr(stats, k), base[k])
    assert_close_lowp("dh", ref_g["dh"], dh, base_g["dh"])
    assert_close_lowp("dw", ref_g["dw"], dw, base_g["dw"])


def test_poison_catches_unwritten_outputs(monkeypatch):
    """With ALIGNOPS_POISON=1 (the harness) outputs start as NaN; a launch that misses its last
    token block leaves NaN that the checks reject."""
    assert poison_enabled()
    c = Case()
    hidden, weight, bias, targets, ups = _inputs(c)
    ref, ref_g = _math(hidden, weight, bias, targets, ups, c.opts)
    launch = _launch.launch

    def short_launch(kernel, grid, **kwargs):
        if grid[0] > 1:
            launch(kernel, (grid[0] - 1, *grid[1:]), **kwargs)

    monkeypatch.setattr(_launch, "launch", short_launch)
    stats = K.linear_logprobs_fwd(hidden, weight, targets, bias, c.opts, ALL, config=SMALL_FWD)
    assert torch.isnan(stats.logp).any()
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close("logp", ref["logp"], stats.logp, atol=1.0)
    monkeypatch.setattr(_launch, "launch", launch)
    stats = K.linear_logprobs_fwd(hidden, weight, targets, bias, c.opts, ALL, config=SMALL_FWD)
    monkeypatch.setattr(_launch, "launch", short_launch)
    dh, dw, db = K.linear_logprobs_bwd(
        hidden,
        weight,
        targets,
        bias,
        stats,
        _grads({**ups, "zmean": None}),
        c.opts,
        need_dhidden=True,
        need_dweight=True,
        need_dbias=True,
        config=SMALL_BWD,
    )
    for k, out in (("dh", dh), ("dw", dw), ("db", db)):
        assert torch.isnan(out).any(), f"{k}: a short launch left no NaN"
        with pytest.raises(AssertionError, match="non-finite"):
            assert_close(k, ref_g[k], out, atol=1.0)


def test_public_api_reaches_triton(monkeypatch):
    """alignops.linear_logprobs with ALIGNOPS_BACKEND=triton runs these launchers (counted) and
    its autograd matches the reference for random upstream gradients of logps, entropy, lse."""
    import alignops

    monkeypatch.setenv("ALIGNOPS_BACKEND", "triton")
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = K.linear_logprobs_fwd, K.linear_logprobs_bwd

    def count(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)

        return wrapped

    monkeypatch.setattr(K, "linear_logprobs_fwd", count("fwd", fwd))
    monkeypatch.setattr(K, "linear_logprobs_bwd", count("bwd", bwd))
    c = Case(N=2 * 19, softcap=7.0, temperature=0.8, logit_scale=1.3)
    hidden, weight, bias, targets, ups = _inputs(c, seed=3)
    ups["zmean"] = ups["log_sum_p2"] = None
    h = hidden.view(2, 19, c.H).clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    out = alignops.linear_logprobs(
        h,
        w,
        targets.view(2, 19),
        bias=b,
        temperature=0.8,
        softcap=7.0,
        logit_scale=1.3,
        return_entropy=True,
        return_lse=True,
    )
    loss = sum(
        (x.reshape(-1) * ups[k]).sum()
        for k, x in (("logp", out.logps), ("entropy", out.entropy), ("lse", out.lse))
    )
    loss.backward()
    assert calls == {"fwd": 1, "bwd": 1}, calls
    ref, ref_g = _math(hidden, weight, bias, targets, ups, c.opts)
    for k, x in (("logp", out.logps), ("entropy", out.entropy), ("lse", out.lse)):
        assert_close(k, ref[k], x.detach().reshape(-1), atol=2e-5, rtol=2e-5)
    for k, x in (("dh", h.grad.reshape(c.N, c.H)), ("dw", w.grad), ("db", b.grad)):
        assert_close(k, ref_g[k], x, atol=5e-5 * max(1.0, ref_g[k].abs().max().item()), rtol=5e-5)


def test_bad_inputs_raise():
    c = Case(N=5, V=7, H=8)
    hidden, weight, bias, targets, _ = _inputs(c)
    opts = c.opts
    with pytest.raises(ValueError, match="contiguous in their last dimension"):
        K.linear_logprobs_fwd(hidden.T.contiguous().T, weight, targets, bias, opts)
    with pytest.raises(TypeError, match="cannot be mixed"):
        K.linear_logprobs_fwd(hidden.half(), weight.bfloat16(), targets, bias, opts)
    with pytest.raises(TypeError, match="float64 runs the torch engine"):
        K.linear_logprobs_fwd(hidden.double(), weight.double(), targets, bias, opts)
    with pytest.raises(ValueError, match="int64 targets"):
        K.linear_logprobs_fwd(hidden, weight, targets.int(), bias, opts)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        K.linear_logprobs_fwd(hidden[:, :4], weight, targets, bias, opts)
    with pytest.raises(ValueError, match="bias"):
        K.linear_logprobs_fwd(hidden, weight, targets, bias[:3], opts)
    with pytest.raises(ValueError, match="temperature"):
        LogitOptions(IGNORE, temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        LogitOptions(IGNORE, softcap=-1.0)
    lse = torch.zeros(c.N)
    kw = dict(need_dhidden=True, need_dweight=False, need_dbias=False)
    with pytest.raises(ValueError, match="topk"):
        K.linear_logprobs_fwd(hidden, weight, targets, bias, opts, StatRequest(topk=65))
    saved = TokenStats(None, lse)
    with pytest.raises(ValueError, match="entropy"):
        K.linear_logprobs_bwd(hidden, weight, targets, bias, saved, TokenStats(None, None, lse), opts, **kw)
    with pytest.raises(ValueError, match="without a bias"):
        K.linear_logprobs_bwd(
            hidden, weight, targets, None, saved, TokenStats(lse, None), opts, **kw | {"need_dbias": True}
        )
