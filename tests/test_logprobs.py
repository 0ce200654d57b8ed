"""alignops.logprobs / alignops.cross_entropy on given logits against float64 references.

CPU tests run the chunked PyTorch engine; the Triton kernels run under the interpreter in
``tests/test_logprobs_interpret.py``; the CUDA tests at the end run on a GPU only.

Sizes are deliberately awkward: V = 257 and 1001 (not multiples of any block), 4500 and
4200 (two forward blocks of 4096 and three backward blocks of 2048, ragged tails),
128256 (Llama-3 vocabulary). Backward always uses a random upstream gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
from _assert import assert_close, assert_topk
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import alignops
from alignops import cross_entropy
from alignops.reference import cross_entropy_ref, logprobs_ref

IGNORE = -100

OPTIONS = {
    "plain": {},
    "smooth_zloss": {"label_smoothing": 0.1, "z_loss": 1e-3},
    # Logits scaled so |x| / softcap reaches ~2: tanh is well inside its nonlinear range.
    "softcap_temp": {"softcap": 5.0, "temperature": 0.7},
    "all": {"label_smoothing": 0.2, "z_loss": 1e-4, "softcap": 5.0, "temperature": 1.3},
    "scale": {"logit_scale": 0.35, "label_smoothing": 0.05},
}
REDUCTIONS = {
    "none": {"reduction": "none"},
    "sum": {"reduction": "sum"},
    "mean": {"reduction": "mean"},
    "num_items": {"reduction": "mean", "num_items": torch.tensor(37)},
}


def _inputs(shape, *, dtype, scale=3.0, ignore_frac=0.25, sliced=False, seed=0):
    """Logits ``shape`` (a ``[:, :-1]`` view of a longer tensor when ``sliced``) and targets."""
    g = torch.Generator().manual_seed(seed)
    full = list(shape)
    if sliced:
        full[1] += 1
    x = (torch.randn(full, generator=g, dtype=torch.float64) * scale).to(dtype)
    if sliced:
        x = x[:, :-1]
    V = shape[-1]
    y = torch.randint(0, V, shape[:-1], generator=g)
    y[torch.rand(shape[:-1], generator=g) < ignore_frac] = IGNORE
    return x, y


def _ref(x, y, g, **kw):
    """float64 loss and gradient from ``alignops.reference.cross_entropy_ref``."""
    x64 = x.detach().double().requires_grad_()
    loss = cross_entropy_ref(x64, y, ignore_index=IGNORE, **kw)
    (grad,) = torch.autograd.grad(loss, x64, g.double())
    return loss.detach(), grad


def _ours(x, y, g, **kw):
    x = x.detach().clone().requires_grad_()
    loss = cross_entropy(x, y, ignore_index=IGNORE, **kw)
    (grad,) = torch.autograd.grad(loss, x, g.to(loss.dtype))
    return loss.detach(), grad


def _grad_out(loss_shape, seed=1):
    return torch.randn(loss_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_grad(name, ref, out, dtype):
    """fp32 / fp64: float tolerances. bf16 / fp16: one rounding of the true value (half an
    ulp, relative 2^-9 resp. 2^-12, doubled for margin) plus fp32-level slack."""
    assert out.dtype == dtype, f"{name}: gradient dtype {out.dtype} != logits dtype {dtype}"
    scale = ref.abs().max().item()
    if dtype == torch.float64:
        assert_close(name, ref, out, atol=1e-12 * max(scale, 1.0), rtol=1e-10)
    elif dtype == torch.float32:
        assert_close(name, ref, out, atol=2e-6 * max(scale, 1.0), rtol=1e-5)
    else:
        rel = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        assert_close(name, ref, out, atol=1e-6 * scale + 1e-7, rtol=rel)


def _check_loss(name, ref, out, dtype):
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == want, f"{name}: loss dtype {out.dtype} != {want}"
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(name, ref, out, atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------
# CPU engine
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("red", list(REDUCTIONS))
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_options_and_reductions(opt, red):
    # [3, 11, 257] view of [3, 12, 257]: B > 1 with a row stride that is not T * V.
    kw = {**OPTIONS[opt], **REDUCTIONS[red]}
    x, y = _inputs((3, 11, 257), dtype=torch.float32, scale=8.0, sliced=True)
    g = _grad_out(y.shape if red == "none" else ())
    ref_loss, ref_grad = _ref(x, y, g, **kw)
    loss, grad = _ours(x, y, g, **kw)
    _check_loss(f"loss[{opt},{red}]", ref_loss, loss, x.dtype)
    _check_grad(f"grad[{opt},{red}]", ref_grad, grad, x.dtype)
    if red == "none":
        assert (loss[y == IGNORE] == 0).all()
    assert (grad[y == IGNORE] == 0).all(), "ignored rows must get exactly zero gradient"


@pytest.mark.parametrize(
    "shape,sliced",
    [
        pytest.param((50, 1001), False, id="2d-50x1001"),
        pytest.param((2, 3, 5, 33), False, id="4d-V33"),
        pytest.param((3, 11, 257), True, id="3d-sliced-V257"),
        pytest.param((3, 128256), False, id="llama3-vocab"),
    ],
)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=["f64", "f32", "bf16", "f16"]
)
def test_dtypes_and_shapes(shape, sliced, dtype):
    x, y = _inputs(shape, dtype=dtype, scale=8.0, sliced=sliced, seed=3)
    kw = {**OPTIONS["all"], "reduction": "none"}
    g = _grad_out(y.shape)
    ref_loss, ref_grad = _ref(x, y, g, **kw)
    loss, grad = _ours(x, y, g, **kw)
    assert loss.shape == y.shape and grad.shape == x.shape
    _check_loss("loss", ref_loss, loss, dtype)
    _check_grad("grad", ref_grad, grad, dtype)


def test_small_workspace_many_chunks(monkeypatch):
    # A 4 KiB workspace forces one or two rows per block: chunk boundaries must not matter.
    monkeypatch.setenv("ALIGNOPS_CPU_WORKSPACE_BYTES", "4096")
    x, y = _inputs((2, 9, 300), dtype=torch.float32, scale=5.0, sliced=True, seed=5)
    kw = {**OPTIONS["all"], "reduction": "none"}
    g = _grad_out(y.shape)
    ref_loss, ref_grad = _ref(x, y, g, **kw)
    loss, grad = _ours(x, y, g, **kw)
    _check_loss("loss", ref_loss, loss, x.dtype)
    _check_grad("grad", ref_grad, grad, x.dtype)


@pytest.mark.parametrize("red", list(REDUCTIONS))
def test_all_ignored(red):
    x, y = _inputs((4, 37), dtype=torch.float32, seed=7)
    y.fill_(IGNORE)
    g = _grad_out(y.shape if red == "none" else ())
    loss, grad = _ours(x, y, g, **{**OPTIONS["all"], **REDUCTIONS[red]})
    assert torch.isfinite(loss).all() and (loss == 0).all()
    assert (grad == 0).all()


def _ce_f64(z, y, z_loss):
    """float64 ``lse - z_y + c_z lse^2`` written directly (no label smoothing): the package
    reference multiplies ``0 * (lse - mean z)`` and so returns NaN for rows with -inf."""
    lse = torch.logsumexp(z, dim=-1)
    return lse - z.gather(-1, y.unsqueeze(-1)).squeeze(-1) + z_loss * lse * lse


def test_extreme_logits():
    # Rows at +-3e4, a row whose first 3000 logits are -inf (masked vocabulary), a row with
    # one dominant logit (p ~ 1): fp32 must stay finite and accurate.
    g0 = torch.Generator().manual_seed(11)
    V = 1500
    x = torch.randn(6, V, generator=g0, dtype=torch.float64)
    x[0] += 3e4
    x[1] -= 3e4
    x[2] *= 1e3
    x[3, :1000] = -math.inf
    x[4, 17] = 80.0
    x = x.float()
    y = torch.tensor([3, 5, 7, 1200, 17, 9])
    g = _grad_out((6,), seed=12)
    z = x.double().requires_grad_()
    ref = _ce_f64(z, y, 1e-4)
    (ref_grad,) = torch.autograd.grad(ref, z, g)
    loss, grad = _ours(x, y, g, reduction="none", z_loss=1e-4)
    # Storing lse ~ 3e4 in fp32 rounds it by up to half an ulp, 2^-24 |lse| (~2e-3), so
    # p = exp(z - lse) is off by that much relatively: the per-row bound below; it is
    # ~1e-6 for the ordinary rows. The loss (z-loss makes it ~9e4) gets relative 1e-6.
    assert_close("loss", ref.detach(), loss, atol=1e-5, rtol=1e-6)
    lse = torch.logsumexp(x.double(), dim=-1)
    for i in range(x.shape[0]):
        atol = 1e-6 + 4 * 2.0**-24 * lse[i].abs().item() * ref_grad[i].abs().max().item()
        assert_close(f"grad[row {i}]", ref_grad[i], grad[i], atol=atol, rtol=1e-5)
    assert (grad[3, :1000] == 0).all()


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_gradcheck_float64(reduction):
    x, y = _inputs((5, 13), dtype=torch.float64, scale=4.0, seed=13)
    y[1] = IGNORE
    kw = dict(reduction=reduction, label_smoothing=0.2, z_loss=0.01, softcap=3.0, temperature=0.8)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: cross_entropy(t, y, **kw), (x,))
    assert torch.autograd.gradcheck(lambda t: alignops.logprobs(t, y, return_entropy=True).entropy, (x,))


@pytest.mark.parametrize(
    "opt", [{}, {"softcap": 3.0, "temperature": 0.6, "logit_scale": 1.4}], ids=["plain", "all"]
)
def test_logprobs_entropy_lse_against_reference(opt):
    """All three per-token outputs and the gradient of a random combination of them."""
    x, y = _inputs((3, 11, 257), dtype=torch.float32, scale=5.0, sliced=True, seed=14)
    x[0, 2, :100] = -math.inf  # a masked vocabulary: entropy and gradient stay finite
    y[0, 2] = 200
    xr = x.detach().clone().requires_grad_()
    out = alignops.logprobs(
        xr, y, return_entropy=True, return_lse=True, return_log_sum_p2=True, topk=6, **opt
    )
    outs = (out.logps, out.entropy, out.lse, out.log_sum_p2)
    g = [_grad_out(y.shape, seed=s) for s in (15, 16, 17, 18)]
    sum((o * gi.float()).sum() for o, gi in zip(outs, g)).backward()
    # the reference sees -1e4 for -inf: identical statistics, no 0 * inf in autograd
    x64 = x.detach().double().nan_to_num(neginf=-1e4).requires_grad_()
    ref = logprobs_ref(x64, y, **opt)
    z = alignops.reference.transform_ref(x64, **opt)
    lsp2 = torch.where(y != IGNORE, torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1), 0.0)
    ref = (*ref, lsp2)
    sum((o * gi).sum() for o, gi in zip(ref, g)).backward()
    for name, a, b in zip(("logps", "entropy", "lse", "log_sum_p2"), ref, outs):
        assert b.dtype == torch.float32 and b.shape == y.shape
        assert_close(name, a.detach(), b.detach(), atol=1e-5, rtol=1e-5)
        assert (b[y == IGNORE] == 0).all()
    _check_grad("grad", x64.grad, xr.grad, torch.float32)
    logprobs = torch.log_softmax(z, -1).detach().reshape(-1, z.shape[-1])
    ids, lps = out.topk_ids.reshape(-1, 6), out.topk_logps.reshape(-1, 6)
    assert_topk("topk", logprobs, ids, lps, (y != IGNORE).reshape(-1), atol=1e-5)


class _NewStorages(TorchDispatchMode):
    """Records the byte size of every storage an op creates (views and in-place ops
    reuse an input's storage and are not counted)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        seen = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.sizes.append((t.untyped_storage().nbytes(), str(func)))
        return out


@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
def test_no_second_nv_tensor(monkeypatch, inplace):
    # bf16 [256, 1000]: the logits are 512 KB, a float32 copy would be 1 MB. With a 128 KiB
    # workspace, nothing but the returned gradient may come near N x V.
    budget = 1 << 17
    monkeypatch.setenv("ALIGNOPS_CPU_WORKSPACE_BYTES", str(budget))
    base, y = _inputs((256, 1000), dtype=torch.bfloat16, seed=17)
    base.requires_grad_()
    x = base * 1.0  # non-leaf logits, as from an LM head
    nv_bytes = x.numel() * x.element_size()
    with _NewStorages() as fwd:
        loss = cross_entropy(x, y, label_smoothing=0.1, inplace_backward=inplace)
    assert max(s for s, _ in fwd.sizes) <= budget, sorted(fwd.sizes)[-3:]
    g = _grad_out((), seed=18).float()
    ref_loss, ref_grad = _ref(x, y, g, label_smoothing=0.1)
    with _NewStorages() as bwd:
        (grad,) = torch.autograd.grad(loss, x, g)
    big = [s for s, _ in bwd.sizes if s > budget]
    if inplace:
        assert big == [], sorted(bwd.sizes)[-3:]
        assert grad.data_ptr() == x.data_ptr(), "in-place gradient must live in the logits' storage"
    else:
        assert big == [nv_bytes], sorted(bwd.sizes)[-3:]
    _check_loss("loss", ref_loss, loss.detach(), x.dtype)
    _check_grad("grad", ref_grad, grad, x.dtype)


def test_logits_untouched_without_inplace():
    x, y = _inputs((7, 300), dtype=torch.float32, seed=19)
    keep = x.clone()
    x.requires_grad_()
    cross_entropy(x, y, reduction="sum").backward(_grad_out((), seed=20).float())
    assert torch.equal(x.detach(), keep)


def test_inplace_refused_when_logits_saved_elsewhere():
    # exp() saves its output; overwriting it in place must fail loudly, not corrupt grads.
    base, y = _inputs((6, 50), dtype=torch.float32, scale=0.5, seed=21)
    base.requires_grad_()
    logits = base.exp()
    loss = cross_entropy(logits, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward(_grad_out((), seed=22).float())


@pytest.mark.parametrize(
    "mutate,kwargs,exc,match",
    [
        pytest.param(lambda x, y: (x, y.float()), {}, TypeError, "int64", id="float-targets"),
        pytest.param(lambda x, y: (x.long(), y), {}, TypeError, "logits must be", id="int-logits"),
        pytest.param(lambda x, y: (x, y[:-1]), {}, ValueError, "leading dims", id="shape"),
        pytest.param(
            lambda x, y: (x, y.index_fill(0, torch.tensor([2]), 40)),
            {},
            ValueError,
            r"\[0, 40\)",
            id="target-too-big",
        ),
        pytest.param(
            lambda x, y: (x, y.index_fill(0, torch.tensor([2]), -1)),
            {},
            ValueError,
            r"\[0, 40\)",
            id="negative-target",
        ),
        pytest.param(
            lambda x, y: (x.t().contiguous().t(), y), {}, ValueError, "contiguous", id="vocab-stride"
        ),
        pytest.param(lambda x, y: (x, y), {"reduction": "avg"}, ValueError, "reduction", id="reduction"),
        pytest.param(lambda x, y: (x, y), {"temperature": 0.0}, ValueError, "temperature", id="temperature"),
        pytest.param(lambda x, y: (x, y), {"softcap": -1.0}, ValueError, "softcap", id="softcap"),
        pytest.param(lambda x, y: (x, y), {"label_smoothing": 1.5}, ValueError, "label_smoothing", id="eps"),
        pytest.param(
            lambda x, y: (x, y),
            {"reduction": "none", "num_items": 4},
            ValueError,
            "num_items",
            id="num_items-none",
        ),
    ],
)
def test_validation(mutate, kwargs, exc, match):
    x, y = _inputs((6, 40), dtype=torch.float32, ignore_frac=0.0, seed=23)
    x, y = mutate(x, y)
    with pytest.raises(exc, match=match):
        cross_entropy(x, y, **kwargs)


# --------------------------------------------------------------------------------------
# CUDA (compiled Triton kernels); skipped without a GPU
# --------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("opt", ["plain", "all"])
def test_cuda_matches_reference(opt, dtype, inplace):
    # Qwen-2 vocabulary (151936): 38 forward blocks with a ragged tail; [4, 33] sliced rows.
    x, y = _inputs((4, 33, 151936), dtype=dtype, scale=8.0, sliced=True, seed=31)
    kw = {**OPTIONS[opt], "reduction": "none"}
    g = _grad_out(y.shape, seed=32)
    ref_loss, ref_grad = _ref(x, y, g, **kw)
    xc = x.cuda().requires_grad_()
    work = xc * 1.0
    loss = cross_entropy(work, y.cuda(), ignore_index=IGNORE, inplace_backward=inplace, **kw)
    (grad,) = torch.autograd.grad(loss, work, g.cuda().float())
    assert (grad.data_ptr() == work.data_ptr()) == inplace
    _check_loss("loss", ref_loss, loss.detach().cpu(), dtype)
    _check_grad("grad", ref_grad, grad.cpu(), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
def test_cuda_memory_and_no_host_sync(inplace):
    # bf16 [4096, 32000] logits: 262 MB. Forward may add O(N) only; backward adds exactly the
    # returned gradient (or nothing in place). No step may synchronize with the host.
    N, V = 4096, 32000
    x, y = _inputs((N, V), dtype=torch.bfloat16, seed=33)
    x, y = x.cuda(), y.cuda()
    nv = x.numel() * x.element_size()
    slack = 1 << 20
    g = torch.tensor(0.5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        x.requires_grad_()
        loss = cross_entropy(
            x, y, label_smoothing=0.1, z_loss=1e-4, reduction="mean", inplace_backward=inplace
        )
        fwd_peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        (grad,) = torch.autograd.grad(loss, x, g)
        bwd_peak = torch.cuda.max_memory_allocated() - base
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert fwd_peak <= 16 * N + slack, fwd_peak
    assert bwd_peak <= (0 if inplace else nv) + 16 * N + slack, bwd_peak
    assert grad.shape == x.shape and grad.dtype == x.dtype
