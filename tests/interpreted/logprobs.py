"""Interpreted cases of the log-probs-on-logits Triton kernels (``kernels/logprobs.py``).

Run by ``tests/test_logprobs_interpret.py`` through the harness ``tests/_interpret.py`` (a
subprocess with ``TRITON_INTERPRET=1``); by hand:
``TRITON_INTERPRET=1 python -m pytest tests/interpreted/logprobs.py -q``.

Values and gradients against float64 references from the math (``alignops.reference``) with
random upstream gradients. Tiny shapes (the interpreter runs every program in Python); V = 4500
and 4200 give 2 forward blocks of 4096 and 3 backward blocks of 2048 with ragged tails.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before import (see module docstring)", allow_module_level=True)

from alignops.kernels import _launch  # noqa: E402
from alignops.kernels import logprobs as K  # noqa: E402
from alignops.kernels._common import GRAD_FIELDS, LogitOptions, StatRequest, TokenStats  # noqa: E402

import alignops  # noqa: E402
from alignops.reference import cross_entropy_ref, logprobs_ref  # noqa: E402
from tests._assert import assert_close, assert_topk  # noqa: E402

IGNORE = -100
ALL = {"label_smoothing": 0.2, "z_loss": 1e-4, "softcap": 5.0, "temperature": 1.3, "logit_scale": 0.8}

# name -> (shape, sliced, dtype, scale, options)
CE_CASES = {
    "fp32-3d-sliced-V4500-all-none": ((2, 3, 4500), True, torch.float32, 8.0, {**ALL, "reduction": "none"}),
    "fp32-V257-plain-sum": ((13, 257), False, torch.float32, 3.0, {"reduction": "sum"}),
    "bf16-V300-softcap-mean": ((11, 300), False, torch.bfloat16, 8.0, {"softcap": 5.0, "temperature": 0.7}),
    "fp16-V129-smooth-none-inplace": (
        (9, 129),
        False,
        torch.float16,
        3.0,
        {"label_smoothing": 0.1, "z_loss": 1e-3, "reduction": "none", "inplace_backward": True},
    ),
    "bf16-4d-V2100-all-num_items-inplace": (
        (2, 2, 2, 2100),
        False,
        torch.bfloat16,
        8.0,
        {**ALL, "num_items": 7.0, "inplace_backward": True},
    ),
    "fp32-all-ignored-mean": ((5, 100), False, torch.float32, 3.0, {"reduction": "mean"}),
}


def _inputs(shape, *, dtype, scale, sliced=False, seed=0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    full = list(shape)
    if sliced:
        full[1] += 1
    x = (torch.randn(full, generator=g, dtype=torch.float64) * scale).to(dtype)
    if sliced:
        x = x[:, :-1]
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    y[torch.rand(shape[:-1], generator=g) < ignore_frac] = IGNORE
    return x, y


def _grad_check(name, ref, out):
    """fp32: float tolerances. bf16 / fp16: one rounding of the true value (half an ulp, relative
    2^-9 resp. 2^-12, doubled) plus fp32-level slack."""
    scale = ref.abs().max().item()
    if out.dtype == torch.float32:
        assert_close(name, ref, out, atol=2e-6 * max(scale, 1.0), rtol=1e-5)
    else:
        rel = 2.0**-8 if out.dtype == torch.bfloat16 else 2.0**-11
        assert_close(name, ref, out, atol=1e-6 * scale + 1e-7, rtol=rel)


@pytest.mark.parametrize("name", list(CE_CASES))
def test_cross_entropy_public_api(monkeypatch, name):
    """alignops.cross_entropy on the Triton kernels: loss and gradient against float64."""
    monkeypatch.setenv("ALIGNOPS_BACKEND", "triton")
    shape, sliced, dtype, scale, kw = CE_CASES[name]
    x, y = _inputs(shape, dtype=dtype, scale=scale, sliced=sliced, seed=list(CE_CASES).index(name))
    if "all-ignored" in name:
        y.fill_(IGNORE)
    work = x.clone().requires_grad_() * 1.0  # non-leaf: an in-place gradient lands in its storage
    loss = alignops.cross_entropy(work, y, **kw)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, work, g.to(loss.dtype))
    ref_kw = {k: v for k, v in kw.items() if k != "inplace_backward"}
    x64 = x.detach().double().requires_grad_()
    ref = cross_entropy_ref(x64, y, **ref_kw)
    (ref_grad,) = torch.autograd.grad(ref, x64, g)
    assert loss.dtype == torch.float32
    assert_close("loss", ref.detach(), loss.detach(), atol=1e-5, rtol=1e-5)
    assert grad.dtype == x.dtype
    _grad_check("grad", ref_grad, grad)
    assert (grad[y == IGNORE] == 0).all()
    assert (grad.data_ptr() == work.data_ptr()) == bool(kw.get("inplace_backward", False))


@pytest.mark.parametrize(
    "dtype,opts",
    [
        (torch.float32, LogitOptions(IGNORE)),
        (torch.float32, LogitOptions(IGNORE, 1.7, 4.0, 0.9)),
        (torch.bfloat16, LogitOptions(IGNORE, 0.6, None, 1.2)),
    ],
    ids=["fp32-plain", "fp32-scale-softcap-T", "bf16-scale-T"],
)
def test_launchers_all_statistics(dtype, opts):
    """Every statistic (entropy included) and every upstream gradient at once, a -inf logit
    (masked vocabulary) in one row, against float64 autograd through full logits."""
    x, y = _inputs((3, 5, 4200), dtype=dtype, scale=6.0, sliced=True, seed=7)
    x[0, 1, :700] = -math.inf  # flat row 1, kept valid with a target outside the masked part
    y[0, 1] = 2000
    masked_row = 1
    n = y.numel()
    stats = K.logprobs_fwd(x, y, opts, StatRequest(entropy=True, zmean=True, log_sum_p2=True, topk=11))
    g = torch.Generator().manual_seed(8)
    ups = TokenStats(*(torch.randn(n, generator=g) for _ in GRAD_FIELDS))
    # the reference sees -1e4 for -inf: the same statistics (exp underflows to exactly 0 in
    # float64) without the 0 * inf of autograd through p log p at p = 0
    x64 = x.detach().double().nan_to_num(neginf=-1e4).requires_grad_()
    z = alignops.reference.transform_ref(
        x64, logit_scale=opts.logit_scale, softcap=opts.softcap, temperature=opts.temperature
    )
    logp, ent, lse, zmean, valid = alignops.reference.stats_ref(z, y, IGNORE)
    lsp2 = torch.where(valid, torch.logsumexp(2.0 * z, -1) - 2.0 * lse, 0.0)  # log sum p^2
    ref = TokenStats(*(t.reshape(-1) for t in (logp, lse, ent, zmean, lsp2)))
    for k in GRAD_FIELDS:
        a, b = getattr(ref, k), getattr(stats, k)
        if k == "zmean" and opts.softcap is None:  # -inf (kernel) vs ~-1e4 (reference)
            assert b[masked_row] == -math.inf
            a, b = a.clone(), b.clone()
            a[masked_row] = b[masked_row] = 0.0
        assert_close(k, a, b, atol=3e-5 * max(1.0, a.abs().max().item()), rtol=3e-5)
    logprobs = (z - torch.logsumexp(z, -1, keepdim=True)).detach().reshape(n, -1)
    assert_topk("topk", logprobs, stats.topk_ids, stats.topk_logps, valid.reshape(-1), atol=1e-4)
    ups_nozmean = ups._replace(zmean=None)  # zmean of a -inf row is -inf: no gradient through it
    loss = sum((s.reshape(-1) * u.double()).sum() for s, u in zip(ref, ups_nozmean) if u is not None)
    (ref_grad,) = torch.autograd.grad(loss, x64)
    grad = K.logprobs_bwd(x, y, stats, ups_nozmean, opts)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert torch.isfinite(grad).all()
    _grad_check("grad", ref_grad, grad)


def test_public_logprobs_entropy(monkeypatch):
    monkeypatch.setenv("ALIGNOPS_BACKEND", "triton")
    x, y = _inputs((4, 301), dtype=torch.float32, scale=4.0, seed=9)
    xr = x.clone().requires_grad_()
    out = alignops.logprobs(xr, y, softcap=3.0, return_entropy=True, return_lse=True)
    g = torch.Generator().manual_seed(10)
    gl, ge = torch.randn(4, generator=g), torch.randn(4, generator=g)
    ((out.logps * gl).sum() + (out.entropy * ge).sum()).backward()
    x64 = x.double().requires_grad_()
    logp, ent, lse = logprobs_ref(x64, y, softcap=3.0)
    ((logp * gl.double()).sum() + (ent * ge.double()).sum()).backward()
    assert_close("logps", logp.detach(), out.logps.detach(), atol=2e-5)
    assert_close("entropy", ent.detach(), out.entropy.detach(), atol=2e-5)
    assert_close("lse", lse.detach(), out.lse.detach(), atol=2e-5)
    _grad_check("grad", x64.grad, xr.grad)


def test_poison_catches_unwritten_outputs(monkeypatch):
    """A launch one block short leaves NaN (outputs are poisoned) that the checks reject."""
    x, y = _inputs((9, 300), dtype=torch.float32, scale=3.0, seed=11, ignore_frac=0.0)
    launch = _launch.launch

    def short_launch(kernel, grid, **kwargs):
        launch(kernel, (grid[0] - 1, *grid[1:]), **kwargs)

    monkeypatch.setattr(_launch, "launch", short_launch)
    opts = LogitOptions(IGNORE)
    stats = K.logprobs_fwd(x, y, opts)
    assert torch.isnan(stats.logp[-1]) and not torch.isnan(stats.logp[:-1]).any()
    grad = K.logprobs_bwd(x, y, TokenStats(None, torch.zeros(9)), TokenStats(torch.ones(9), None), opts)
    assert torch.isnan(grad[-1]).all() and not torch.isnan(grad[:-1]).any()


def test_bad_inputs_raise():
    x, y = _inputs((5, 40), dtype=torch.float32, scale=1.0, seed=12)
    opts = LogitOptions(IGNORE)
    with pytest.raises(ValueError, match="contiguous last"):
        K.logprobs_fwd(x.t().contiguous().t(), y, opts)
    with pytest.raises(TypeError, match="float64 runs the torch engine"):
        K.logprobs_fwd(x.double(), y, opts)
    with pytest.raises(ValueError, match="leading dims"):
        K.logprobs_fwd(x, y[:-1], opts)
    with pytest.raises(ValueError, match="entropy"):
        K.logprobs_bwd(x, y, TokenStats(None, torch.zeros(5)), TokenStats(None, None, torch.ones(5)), opts)
    with pytest.raises(ValueError, match="out must"):
        K.logprobs_bwd(x, y, TokenStats(None, torch.zeros(5)), TokenStats(torch.ones(5)), opts, out=x.half())
    with pytest.raises(ValueError, match="topk"):
        K.logprobs_fwd(x, y, opts, StatRequest(topk=41))
