"""Fused linear log-probs / cross-entropy (CPU engine) against the float64 reference.

Shapes (reason for each):
  (257, 96, 1031)  no dimension a multiple of any block or tile
  (7, 16, 32000)   a real vocabulary (Llama-2) with few tokens
  (3, 8, 128256)   Llama-3's vocabulary, tiny N and H
  (1, 5, 3)        degenerate: one token, tiny vocabulary
The workspace is shrunk so a case spans many token chunks and vocabulary blocks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import alignops
from alignops.reference import (
    linear_cross_entropy_ref,
    linear_logprobs_ref,
    logits_ref,
)
from tests._assert import assert_close, assert_close_lowp, assert_topk

SHAPES = [
    pytest.param(257, 96, 1031, id="N257-H96-V1031"),
    pytest.param(7, 16, 32000, id="N7-H16-V32000"),
    pytest.param(3, 8, 128256, id="N3-H8-V128256"),
    pytest.param(1, 5, 3, id="N1-H5-V3"),
]


@pytest.fixture(params=["one-tile", "many-tiles"])
def workspace(request, monkeypatch):
    if request.param == "many-tiles":
        # 3 KiB per tile, vocab blocks of >= 16 rows: forces token chunks and vocab blocks
        monkeypatch.setenv("ALIGNOPS_CPU_WORKSPACE_BYTES", str(3 * 1024 * 3))
        monkeypatch.setenv("ALIGNOPS_CPU_MIN_VOCAB_BLOCK", "16")
    return request.param


def _inputs(n, h, v, *, dtype=torch.float64, bias=False, ignore_frac=0.2, scale=1.0):
    hid = (torch.randn(n, h, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    w = (torch.randn(v, h, dtype=torch.float64) / math.sqrt(h)).to(dtype).requires_grad_()
    b = (torch.randn(v, dtype=torch.float64) * 0.5).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (n,))
    y[torch.rand(n) < ignore_frac] = -100
    return hid, w, b, y


def _leaves(h, w, b):
    return [h, w] + ([b] if b is not None else [])


@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize(
    "bias,softcap,temperature,scale",
    [(False, None, 1.0, 1.0), (True, None, 0.7, 1.0), (False, 2.5, 1.0, 1.0), (True, 3.0, 1.6, 0.45)],
    ids=["plain", "bias-T0.7", "softcap2.5", "bias-scale0.45-softcap3-T1.6"],
)
def test_logprobs_float64_values_and_grads(n, h, v, bias, softcap, temperature, scale, workspace):
    hid, w, b, y = _inputs(n, h, v, bias=bias)
    kw = dict(bias=b, softcap=softcap, temperature=temperature, logit_scale=scale)
    out = alignops.linear_logprobs(hid, w, y, return_entropy=True, return_lse=True, **kw)
    ref = linear_logprobs_ref(hid, w, y, **kw)
    for name, o, r in zip(("logps", "entropy", "lse"), out, ref):
        assert o.dtype == torch.float64 and o.shape == y.shape
        assert_close(name, r, o, atol=1e-10, rtol=1e-10)
        assert (o[y == -100] == 0).all(), f"{name} not exactly 0 at ignored rows"
    gs = [torch.randn(n, dtype=torch.float64) for _ in range(3)]
    leaves = _leaves(hid, w, b)
    got = torch.autograd.grad(sum((o * g).sum() for o, g in zip(out, gs)), leaves)
    want = torch.autograd.grad(sum((r * g).sum() for r, g in zip(ref, gs)), leaves)
    for name, g1, g2 in zip(("dhidden", "dweight", "dbias"), got, want):
        assert_close(name, g2, g1, atol=1e-10, rtol=1e-9)
    assert (got[0][y == -100] == 0).all()


@pytest.mark.parametrize("which", ["logps", "entropy", "lse", "logps+entropy"])
def test_each_upstream_gradient_alone(which):
    hid, w, b, y = _inputs(41, 12, 77, bias=True)
    out = alignops.linear_logprobs(hid, w, y, bias=b, softcap=4.0, return_entropy=True, return_lse=True)
    ref = linear_logprobs_ref(hid, w, y, bias=b, softcap=4.0)
    g = torch.randn(41, dtype=torch.float64)
    idx = {"logps": [0], "entropy": [1], "lse": [2], "logps+entropy": [0, 1]}[which]
    leaves = _leaves(hid, w, b)
    got = torch.autograd.grad(sum((out[i] * g).sum() for i in idx), leaves)
    want = torch.autograd.grad(sum((ref[i] * g).sum() for i in idx), leaves)
    for name, g1, g2 in zip(("dhidden", "dweight", "dbias"), got, want):
        assert_close(name, g2, g1, atol=1e-10, rtol=1e-9)


def test_gradcheck_float64():
    hid, w, b, y = _inputs(6, 5, 11, bias=True)

    def f(h_, w_, b_):
        o = alignops.linear_logprobs(
            h_, w_, y, bias=b_, softcap=2.0, temperature=0.9, return_entropy=True, return_lse=True
        )
        return o.logps, o.entropy, o.lse

    assert torch.autograd.gradcheck(f, (hid, w, b))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-4), (0.2, 1e-2)])
@pytest.mark.parametrize("n,h,v", SHAPES[:2])
def test_cross_entropy_options(n, h, v, reduction, label_smoothing, z_loss, workspace):
    hid, w, b, y = _inputs(n, h, v, bias=True)
    kw = dict(
        bias=b,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=5.0,
        temperature=1.2,
    )
    out = alignops.linear_cross_entropy(hid, w, y, **kw)
    ref = linear_cross_entropy_ref(hid, w, y, **kw)
    assert_close("loss", ref, out, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out)
    leaves = _leaves(hid, w, b)
    got = torch.autograd.grad((out * g).sum(), leaves)
    want = torch.autograd.grad((ref * g).sum(), leaves)
    for name, g1, g2 in zip(("dhidden", "dweight", "dbias"), got, want):
        assert_close(name, g2, g1, atol=1e-10, rtol=1e-9)


def test_cross_entropy_matches_torch_without_extras():
    hid, w, b, y = _inputs(90, 20, 300, bias=True)
    out = alignops.linear_cross_entropy(hid, w, y, bias=b, label_smoothing=0.15)
    ref = F.cross_entropy(hid @ w.T + b, y, label_smoothing=0.15)
    assert_close("loss vs F.cross_entropy", ref, out, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("num_items", [37, 37.5, "tensor"])
def test_num_items_global_normaliser(num_items):
    """Two micro-batches normalised by the global count == one big batch."""
    hid, w, _, y = _inputs(60, 10, 50)
    total = int((y != -100).sum())
    ni = torch.tensor(float(total), dtype=torch.float64) if num_items == "tensor" else total
    parts = [
        alignops.linear_cross_entropy(hid[s], w, y[s], num_items=ni) for s in (slice(0, 13), slice(13, 60))
    ]
    full = linear_cross_entropy_ref(hid, w, y, reduction="mean")
    assert_close("sum of micro-batches", full, parts[0] + parts[1], atol=1e-12, rtol=1e-12)
    if num_items != "tensor":
        single = alignops.linear_cross_entropy(hid, w, y, num_items=num_items)
        ref = linear_cross_entropy_ref(hid, w, y, reduction="sum") / num_items
        assert_close("num_items", ref, single, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_within_torch_error(dtype):
    """Three-way rule: our error vs float64 truth <= the ordinary PyTorch path's error."""
    n, h, v = 97, 64, 1500
    hid64, w64, b64, y = _inputs(n, h, v, bias=True)
    hid = hid64.detach().to(dtype).requires_grad_()
    w = w64.detach().to(dtype).requires_grad_()
    b = b64.detach().to(dtype).requires_grad_()
    # truth: float64 math on the low-precision-rounded inputs
    h_t, w_t, b_t = (t.detach().double().requires_grad_() for t in (hid, w, b))
    truth = linear_logprobs_ref(h_t, w_t, y, bias=b_t, softcap=8.0)[0]
    # ordinary PyTorch in that dtype: logits materialized in `dtype`
    h_b, w_b, b_b = (t.detach().clone().requires_grad_() for t in (hid, w, b))
    z = 8.0 * torch.tanh((h_b @ w_b.T + b_b) / 8.0)
    base = torch.log_softmax(z.float(), -1).gather(-1, y.clamp(min=0)[:, None])[:, 0]
    base = torch.where(y != -100, base, torch.zeros_like(base))
    out = alignops.linear_logprobs(hid, w, y, bias=b, softcap=8.0).logps
    assert out.dtype == torch.float32
    assert_close_lowp("logps", truth, out, base)
    g = torch.randn(n, dtype=torch.float64)
    gt = torch.autograd.grad((truth * g).sum(), (h_t, w_t, b_t))
    gb = torch.autograd.grad((base.double() * g).sum(), (h_b, w_b, b_b))
    go = torch.autograd.grad((out.double() * g).sum(), (hid, w, b))
    for name, a, bb, o in zip(("dhidden", "dweight", "dbias"), gt, gb, go):
        assert o.dtype == dtype, f"{name} dtype {o.dtype}"
        assert_close_lowp(name, a, o.float(), bb.float())


def test_extreme_logits_fp32_no_nan():
    n, h, v = 33, 8, 500
    hid = torch.randn(n, h) * 100.0
    w = torch.randn(v, h) * 30.0  # |z| ~ 1e4
    hid.requires_grad_()
    w.requires_grad_()
    y = torch.randint(0, v, (n,))
    out = alignops.linear_logprobs(hid, w, y, return_entropy=True, return_lse=True)
    ref = linear_logprobs_ref(hid.double(), w.double(), y)
    assert (ref[2].abs() > 1e3).any()
    for name, o, r in zip(("logps", "entropy", "lse"), out, ref):
        assert torch.isfinite(o).all(), name
        assert_close(name, r, o, atol=2e-2, rtol=1e-5)
    loss = alignops.linear_cross_entropy(hid, w, y, z_loss=1e-4)
    loss.backward()
    assert torch.isfinite(hid.grad).all() and torch.isfinite(w.grad).all()


def test_all_ignored_and_empty_are_finite_zero():
    hid, w, b, y = _inputs(9, 6, 20, bias=True)
    y_all = torch.full_like(y, -100)
    for red in ("mean", "sum"):
        loss = alignops.linear_cross_entropy(
            hid, w, y_all, bias=b, reduction=red, z_loss=1e-3, label_smoothing=0.1
        )
        assert loss.item() == 0.0
        gh, gw, gb = torch.autograd.grad(loss * 3.0, (hid, w, b))
        assert gh.abs().max() == 0 and gw.abs().max() == 0 and gb.abs().max() == 0
    out = alignops.linear_logprobs(hid, w, y_all, return_entropy=True, return_lse=True)
    assert all((t == 0).all() for t in out if t is not None)
    empty_h = torch.randn(0, 6, dtype=torch.float64, requires_grad=True)
    empty_y = torch.zeros(0, dtype=torch.long)
    loss = alignops.linear_cross_entropy(empty_h, w, empty_y)
    assert loss.item() == 0.0
    loss.backward()
    assert w.grad is not None and w.grad.abs().max() == 0
    assert alignops.linear_cross_entropy(empty_h, w, empty_y, reduction="none").shape == (0,)


def test_leading_dims_and_strided_hidden():
    """HF-style ``hidden[:, :-1]`` views: [B, T, H] leading dims, non-uniform row strides."""
    B, T, H, V = 3, 11, 16, 90
    full = torch.randn(B, T + 1, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    hid = full[:, :-1]
    y = torch.randint(0, V, (B, T))
    y[0, :4] = -100
    out = alignops.linear_logprobs(hid, w, y, return_entropy=True)
    ref = linear_logprobs_ref(hid, w, y)
    assert out.logps.shape == (B, T)
    assert_close("logps", ref[0], out.logps, atol=1e-10)
    assert_close("entropy", ref[1], out.entropy, atol=1e-10)
    g = torch.randn(B, T, dtype=torch.float64)
    assert_close(
        "dfull",
        torch.autograd.grad((ref[0] * g).sum(), full)[0],
        torch.autograd.grad((out.logps * g).sum(), full)[0],
        atol=1e-10,
    )
    # rows of a 2-D view with a row stride != H go through without a copy
    base = torch.randn(20, 2 * H, dtype=torch.float64)
    rows = base[:, :H]
    yy = torch.randint(0, V, (20,))
    assert_close(
        "strided",
        linear_logprobs_ref(rows, w, yy)[0],
        alignops.linear_logprobs(rows, w, yy).logps,
        atol=1e-10,
    )


def test_outputs_are_float32_for_float32_inputs_and_unrequested_are_none():
    hid, w, _, y = _inputs(10, 4, 12, dtype=torch.float32)
    out = alignops.linear_logprobs(hid, w, y)
    assert out.logps.dtype == torch.float32 and out.entropy is None and out.lse is None


@pytest.mark.parametrize(
    "make,err,match",
    [
        (lambda h, w, y: (h, w[:, :-1], y), ValueError, "hidden size mismatch"),
        (lambda h, w, y: (h, w, y[:-1]), ValueError, "targets shape"),
        (lambda h, w, y: (h, w, y.float()), TypeError, "targets must be one of int64, int32"),
        (lambda h, w, y: (h.long(), w, y), TypeError, "hidden must be"),
        (lambda h, w, y: (h.double(), w, y), TypeError, "float64 works only with float64"),
        (lambda h, w, y: (h.half(), w.bfloat16(), y), TypeError, "cannot be mixed"),
        (lambda h, w, y: (h, w, y.clone().fill_(12)), ValueError, r"in \[0, 12\)"),
        (lambda h, w, y: (h, w, y.clone().fill_(-5)), ValueError, r"in \[0, 12\)"),
        (lambda h, w, y: (h, w.unsqueeze(0), y), ValueError, "weight must be"),
        (lambda h, w, y: (h, w.to("meta"), y), ValueError, "one device"),
    ],
    ids=[
        "H-mismatch",
        "target-shape",
        "float-targets",
        "int-hidden",
        "mixed-float64",
        "mixed-fp16-bf16",
        "target-too-big",
        "target-negative",
        "3d-weight",
        "mixed-devices",
    ],
)
def test_bad_input_raises_clear_errors(make, err, match):
    hid, w, _, y = _inputs(10, 4, 12, dtype=torch.float32, ignore_frac=0.0)
    h2, w2, y2 = make(hid, w, y)
    with pytest.raises(err, match=match):
        alignops.linear_logprobs(h2, w2, y2)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(softcap=0.0), "softcap"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(num_items=0), "num_items"),
        (dict(num_items=5, reduction="none"), "num_items"),
    ],
)
def test_bad_options_raise(kw, match):
    hid, w, _, y = _inputs(10, 4, 12, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        alignops.linear_cross_entropy(hid, w, y, **kw)


def test_poisoned_weight_gradient_is_fully_written(monkeypatch):
    """ALIGNOPS_POISON fills outputs with NaN before the engine writes them (conftest)."""
    monkeypatch.setenv("ALIGNOPS_CPU_WORKSPACE_BYTES", "2048")
    monkeypatch.setenv("ALIGNOPS_CPU_MIN_VOCAB_BLOCK", "8")
    hid, w, _, y = _inputs(30, 6, 101, dtype=torch.float32)
    alignops.linear_cross_entropy(hid, w, y).backward()
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize(
    "hdt,wdt",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
)
def test_mixed_precision_rounds_to_the_narrower_dtype(hdt, wdt, workspace):
    """A 16-bit hidden with an fp32 master weight (and the reverse): both operands are rounded
    to the 16-bit dtype, as torch.autocast rounds a linear layer's weight, then accumulated in
    float32; each gradient comes back in its input's dtype. Truth: float64 on the rounded
    operands; the ordinary PyTorch path under autocast semantics is the three-way baseline."""
    n, h, v = 57, 24, 700
    hid64, w64, b64, y = _inputs(n, h, v, bias=True, scale=2.0)
    hid = hid64.detach().to(hdt).requires_grad_()
    w = w64.detach().to(wdt).requires_grad_()
    dot = torch.bfloat16 if torch.bfloat16 in (hdt, wdt) else torch.float16
    kw = dict(softcap=6.0, temperature=0.9, logit_scale=1.3)
    out = alignops.linear_logprobs(hid, w, y, return_entropy=True, **kw)
    h_t, w_t = (t.detach().to(dot).double().requires_grad_() for t in (hid, w))
    truth = linear_logprobs_ref(h_t, w_t, y, **kw)
    h_b, w_b = (t.detach().clone().requires_grad_() for t in (hid, w))
    z = 6.0 * torch.tanh(1.3 * (h_b.to(dot) @ w_b.to(dot).T).float() / 6.0) / 0.9
    lse = torch.logsumexp(z, -1)
    base_lp = torch.where(y != -100, z.gather(-1, y.clamp(min=0)[:, None])[:, 0] - lse, 0.0)
    base_ent = torch.where(y != -100, lse - (torch.softmax(z, -1) * z).sum(-1), 0.0)
    assert_close_lowp("logps", truth[0], out.logps, base_lp)
    assert_close_lowp("entropy", truth[1], out.entropy, base_ent)
    g1, g2 = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    gt = torch.autograd.grad((truth[0] * g1 + truth[1] * g2).sum(), (h_t, w_t))
    gb = torch.autograd.grad((base_lp.double() * g1 + base_ent.double() * g2).sum(), (h_b, w_b))
    go = torch.autograd.grad((out.logps.double() * g1 + out.entropy.double() * g2).sum(), (hid, w))
    for name, a, bb, o, src in zip(("dhidden", "dweight"), gt, gb, go, (hid, w)):
        assert o.dtype == src.dtype, f"{name} dtype {o.dtype} != {src.dtype}"
        assert_close_lowp(name, a, o.float(), bb.float())


def test_autocast_bf16_activations_with_fp32_master_weight():
    """The usual mixed-precision step: under torch.autocast the decoder emits bf16 hidden states
    while the LM head's weight stays fp32; alignops takes both as they are (no error, no copy of
    the weight) and gives the fp32 weight an fp32 gradient."""
    n, h, v = 40, 16, 333
    lin = torch.nn.Linear(h, h)
    w = torch.nn.Parameter(torch.randn(v, h) / h**0.5)
    x = torch.randn(n, h)
    y = torch.randint(0, v, (n,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = lin(x)
        assert hidden.dtype == torch.bfloat16 and w.dtype == torch.float32
        loss = alignops.linear_cross_entropy(hidden, w, y)
    loss.backward()
    assert w.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    ref = linear_cross_entropy_ref(hidden.detach().double(), w.detach().bfloat16().double(), y)
    assert_close("loss", ref, loss.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["linear_logprobs", "logprobs"])
def test_autocast_keeps_the_engine_statistics_in_float32(family):
    """Inside an active bf16 autocast region the engine's float32 tiles and accumulators stay
    float32 (only the matmul operands are 16-bit): entropy and log sum p^2 match float64 on the
    bf16-rounded operands. Before the fix autocast rounded the tiles, an entropy error of ~1e-2."""
    torch.manual_seed(3)
    n, h, v = 37, 48, 1001
    hidden = torch.randn(n, h).bfloat16()
    w = torch.randn(v, h) / h**0.5
    y = torch.randint(0, v, (n,))
    logits64 = hidden.double() @ w.bfloat16().double().T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if family == "linear_logprobs":
            out = alignops.linear_logprobs(hidden, w, y, return_entropy=True, return_log_sum_p2=True)
        else:
            out = alignops.logprobs(logits64.float(), y, return_entropy=True, return_log_sum_p2=True)
    logp, ent, lse = linear_logprobs_ref(hidden.double(), w.bfloat16().double(), y)
    s2 = torch.logsumexp(2 * logits64, -1) - 2 * lse
    for name, ref, got in (
        ("logp", logp, out.logps),
        ("entropy", ent, out.entropy),
        ("s2", s2, out.log_sum_p2),
    ):
        assert_close(name, ref, got, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_n_times_v_above_2_pow_31_cpu():
    """N * V > 2**31: offsets must not wrap. Reference computed row-block by row-block."""
    n, h, v = 33_000, 4, 65_536
    assert n * v > 2**31
    hid = torch.randn(n, h, requires_grad=True)
    w = torch.randn(v, h, requires_grad=True)
    y = torch.randint(0, v, (n,))
    y[-1] = v - 1
    out = alignops.linear_logprobs(hid, w, y).logps
    g = torch.randn(n)
    gh, gw = torch.autograd.grad((out * g).sum(), (hid, w))
    ref_lp = torch.empty(n, dtype=torch.float64)
    ref_gw = torch.zeros(v, h, dtype=torch.float64)
    for s in range(0, n, 2048):
        hs = hid[s : s + 2048].detach().double().requires_grad_()
        z = logits_ref(hs, w.detach().double())
        lp = torch.log_softmax(z, -1).gather(-1, y[s : s + 2048, None])[:, 0]
        ref_lp[s : s + 2048] = lp.detach()
        gz = torch.softmax(z, -1).neg_() * g[s : s + 2048, None].double()
        gz[torch.arange(hs.shape[0]), y[s : s + 2048]] += g[s : s + 2048].double()
        ref_gw += gz.T @ hs.detach()
        assert_close("dh block", gz @ w.detach().double(), gh[s : s + 2048], atol=1e-3, rtol=1e-4)
    assert_close("logps", ref_lp, out, atol=1e-3, rtol=1e-5)
    assert_close("dweight", ref_gw, gw, atol=1e-2, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 7, 64])
def test_side_outputs_log_sum_p2_and_topk(k, workspace):
    """``log sum p^2`` (value and gradient, with a random upstream gradient) and the top-k ids and
    log-probs against float64 full logits; ``topk_ids[:, 0] == targets`` is TRL's is-top-1."""
    n, h, v = 41, 12, 301
    hid, w, b, y = _inputs(n, h, v, bias=True, scale=3.0)
    kw = dict(bias=b, softcap=4.0, temperature=0.8, logit_scale=1.2)
    out = alignops.linear_logprobs(hid, w, y, return_log_sum_p2=True, topk=k, **kw)
    z = logits_ref(hid, w, b, softcap=4.0, temperature=0.8, logit_scale=1.2)
    valid = y != -100
    ref = torch.where(valid, torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1), 0.0)
    assert_close("log_sum_p2", ref, out.log_sum_p2, atol=1e-10)
    logprobs = torch.log_softmax(z, -1).detach()
    assert_topk("topk", logprobs, out.topk_ids, out.topk_logps, valid, atol=1e-10)
    assert not out.topk_logps.requires_grad
    g = torch.randn(n, dtype=torch.float64)
    got = torch.autograd.grad((out.log_sum_p2 * g).sum(), (hid, w, b))
    want = torch.autograd.grad((ref * g).sum(), (hid, w, b))
    for name, a, c in zip(("dhidden", "dweight", "dbias"), want, got):
        assert_close(name, a, c, atol=1e-10, rtol=1e-9)
    top1 = out.topk_ids[:, 0] == y
    assert torch.equal(top1[valid], (logprobs.argmax(-1) == y)[valid])


def test_topk_bad_values_raise():
    hid, w, _, y = _inputs(5, 4, 12, dtype=torch.float32)
    for k in (-1, 13, 65, 2.0, True):
        with pytest.raises(ValueError, match="topk"):
            alignops.linear_logprobs(hid, w, y, topk=k)


@pytest.mark.parametrize("family", ["linear", "logits"])
def test_mean_logit_side_output(family, workspace):
    """``return_mean_logit``: ``(1 / V) sum_v z_v`` of the transformed logits (TRL's
    ``mean_logits``), value and gradient with a random upstream gradient, against float64."""
    n, h, v = 37, 9, 203
    hid, w, b, y = _inputs(n, h, v, bias=True, scale=2.0)
    kw = dict(softcap=5.0, temperature=0.7, logit_scale=1.3)
    z = logits_ref(hid, w, b, **kw)
    if family == "linear":
        out = alignops.linear_logprobs(hid, w, y, bias=b, return_mean_logit=True, **kw)
    else:
        out = alignops.logprobs(hid @ w.T + b, y, return_mean_logit=True, **kw)
    valid = y != -100
    ref = torch.where(valid, z.mean(-1), 0.0)
    assert_close("mean_logit", ref, out.mean_logit, atol=1e-10)
    g = torch.randn(n, dtype=torch.float64)
    got = torch.autograd.grad((out.mean_logit * g + out.logps).sum(), (hid, w, b))
    want = torch.autograd.grad((ref * g).sum() + _logp_ref_sum(z, y), (hid, w, b))
    for name, a, c in zip(("dhidden", "dweight", "dbias"), want, got):
        assert_close(name, a, c, atol=1e-10, rtol=1e-9)
    assert alignops.linear_logprobs(hid, w, y, bias=b).mean_logit is None


def _logp_ref_sum(z, y):
    valid = y != -100
    lp = torch.log_softmax(z, -1).gather(-1, torch.where(valid, y, 0)[:, None])[:, 0]
    return torch.where(valid, lp, 0.0).sum()
