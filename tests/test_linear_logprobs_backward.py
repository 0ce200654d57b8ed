"""Backward precision and no-silent-slow-path checks of the linear log-probs (torch engine and
the host-side GEMM helper of the Triton launchers), against float64. The Triton kernels' side of
the same cases runs under the interpreter: ``tests/interpreted/linear_logprobs_backward.py``."""

from __future__ import annotations

import warnings

import pytest
import torch
from _backward_cases import mean_ce_case, ref_mean_ce_grads, rel_rms
from alignops.kernels import _launch
from alignops.kernels._common import NOTHING_EXTRA, LogitOptions, TokenStats

from alignops._torch import linear_logprobs as E

OPTS = LogitOptions(-100, 1.0, None, 1.0)


def _engine_grads(hidden, weight, targets, g_logp, **kw):
    st = E.linear_logprobs_fwd(hidden, weight, targets, None, OPTS, NOTHING_EXTRA)
    saved = TokenStats(st.logp, st.lse, None, None, None, None, None)
    grads = TokenStats(g_logp, None, None, None, None, None, None)
    dh, dw, _ = E.linear_logprobs_bwd(
        hidden,
        weight,
        targets,
        None,
        saved,
        grads,
        OPTS,
        need_dhidden=True,
        need_dweight=True,
        need_dbias=False,
        **kw,
    )
    return dh, dw


@pytest.mark.parametrize("num_items", [None, 8192])
def test_engine_fp16_mean_reduction(num_items):
    """fp16 inputs, mean reduction (upstream gradient -1/N, or -1/8192 for a global count): the
    engine forms dr in fp32, so dh and dW match float64 within fp16's output rounding
    (rel. RMS <= 1e-3). N = 1000, V = 4100: dr ~ 2e-7, below fp16's smallest normal."""
    hidden, weight, targets, g = mean_ce_case(
        N=1000, H=24, V=4100, dtype=torch.float16, seed=5, num_items=num_items
    )
    ref_dh, ref_dw = ref_mean_ce_grads(hidden, weight, targets, g)
    dh, dw = _engine_grads(hidden, weight, targets, g)
    assert dh.dtype == torch.float16 and dw.dtype == torch.float16
    assert rel_rms(ref_dh, dh) <= 1e-3 and rel_rms(ref_dw, dw) <= 1e-3, (
        rel_rms(ref_dh, dh),
        rel_rms(ref_dw, dw),
    )


def _operands(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(37, 29, generator=g).to(torch.bfloat16)
    b = torch.randn(29, 23, generator=g).to(torch.bfloat16)
    acc = torch.randn(37, 23, generator=g)
    return acc, a, b, acc.double() + a.double() @ b.double()


def _fresh_warning_state(monkeypatch):
    monkeypatch.setattr(_launch, "_slow_path_warned", False)
    monkeypatch.setattr(_launch, "_tensor_core_device", lambda t: True)  # as if on CUDA


def test_mm_accumulate_warns_once_when_fp32_output_fails(monkeypatch):
    """On a tensor-core device, a failing ``torch.mm(..., out_dtype=float32)`` (here: the CPU,
    which has no such kernel) falls back to the fp32 upcast with a one-time SlowPathWarning,
    and the numbers stay right."""
    _fresh_warning_state(monkeypatch)
    monkeypatch.setattr(_launch, "_HAS_MM_OUT_DTYPE", True)
    acc, a, b, ref = _operands()
    with pytest.warns(_launch.SlowPathWarning, match="out_dtype"):
        _launch.mm_accumulate_fp32(acc, a, b)
    torch.testing.assert_close(acc.double(), ref, atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        _launch.mm_accumulate_fp32(acc, a, b)


def test_mm_accumulate_warns_on_old_torch(monkeypatch):
    """A torch without ``aten::mm.dtype`` (older than MM_OUT_DTYPE_MIN_TORCH): a warning naming
    the minimum version, and the right numbers."""
    _fresh_warning_state(monkeypatch)
    monkeypatch.setattr(_launch, "_HAS_MM_OUT_DTYPE", False)
    acc, a, b, ref = _operands(1)
    with pytest.warns(_launch.SlowPathWarning, match=_launch.MM_OUT_DTYPE_MIN_TORCH):
        _launch.mm_accumulate_fp32(acc, a, b)
    torch.testing.assert_close(acc.double(), ref, atol=1e-5, rtol=1e-5)


def test_mm_accumulate_cpu_is_quiet(monkeypatch):
    """On the CPU the upcast is the ordinary path: no warning; fp32 operands: one addmm."""
    monkeypatch.setattr(_launch, "_slow_path_warned", False)
    acc, a, b, ref = _operands(2)
    acc32 = acc.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _launch.mm_accumulate_fp32(acc, a, b)
        _launch.mm_accumulate_fp32(acc32, a.float(), b.float())
    torch.testing.assert_close(acc.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acc32.double(), ref, atol=1e-5, rtol=1e-5)


def test_mm_out_dtype_detection_matches_torch():
    """The version gate reads the operator table: it must agree with torch's version."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    want = tuple(int(x) for x in _launch.MM_OUT_DTYPE_MIN_TORCH.split("."))
    assert _launch._HAS_MM_OUT_DTYPE == ((major, minor) >= want)
