"""Backward precision and no-silent-slow-path checks of the linear log-probs (torch engine and
the host-side GEMM helper of the Triton launchers), against float64. The Triton kernels' side of
the same cases runs under the interpreter: ``tests/interpreted/linear_logprobs_backward.py``."""

from __future__ import annotations

import warnings

import pytest
import torch
from _backward_cases import filter_bound, mean_ce_case, peaked_case, ref_grads, ref_mean_ce_grads, rel_rms
from alignops.kernels import _launch
from alignops.kernels._common import NOTHING_EXTRA, LogitOptions, StatRequest, TokenStats

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


def _engine_filtered(hidden, weight, targets, g_logp, g_lse, threshold, bias=None):
    st = E.linear_logprobs_fwd(hidden, weight, targets, bias, OPTS, NOTHING_EXTRA)
    saved = TokenStats(st.logp, st.lse, None, None, None, None, None)
    grads = TokenStats(g_logp, g_lse, None, None, None, None, None)
    tiles = {}
    out = E.linear_logprobs_bwd(
        hidden,
        weight,
        targets,
        bias,
        saved,
        grads,
        OPTS,
        need_dhidden=True,
        need_dweight=True,
        need_dbias=bias is not None,
        grad_filter=threshold,
        tile_stats=tiles,
    )
    return (*out, tiles["live"].item(), tiles["tiles"].item())


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_grad_filter_bound(dtype, chunked, monkeypatch):
    """Torch engine, filtering at 2^-12 on peaked distributions (``peaked_case``): some vocabulary
    columns are skipped, not all, and dh / dW / db differ from float64 by at most the tiling-free
    bound of what filtering may drop (``filter_bound``) plus the dtype's rounding (fp32 1e-5,
    bf16 2e-2 of the largest entry). ``chunked``: a workspace too small for all rows, so the
    engine takes token chunks and accumulates dW in a buffer. N = 301, H = 48, V = 1031."""
    if chunked:
        monkeypatch.setenv("ALIGNOPS_CPU_WORKSPACE_BYTES", str(4 * 100 * 256 * 2))
        monkeypatch.setenv("ALIGNOPS_CPU_MIN_VOCAB_BLOCK", "256")
    hidden, weight, targets = peaked_case(N=301, H=48, V=1031, dtype=dtype, seed=21, sharp=8.0)
    g = torch.Generator().manual_seed(22)
    g_logp, g_lse = torch.randn(301, generator=g), torch.randn(301, generator=g) * 0.3
    bias = torch.zeros(1031, dtype=dtype)
    ref_dh, ref_dw = ref_grads(hidden, weight, targets, g_logp, g_lse)
    bound_dh, bound_dw, bound_db = filter_bound(hidden, weight, targets, g_lse - g_logp, 2.0**-12)
    dh, dw, db, live, tiles = _engine_filtered(hidden, weight, targets, g_logp, g_lse, 2.0**-12, bias)
    assert 0 < live < tiles, (live, tiles)
    rt = 1e-5 if dtype == torch.float32 else 2e-2
    # d/db of the same loss: the column sums of dz = (g_lse - g_logp) p + g_logp onehot
    z = hidden.double() @ weight.double().T
    p = torch.softmax(z, -1)
    valid = targets != -100
    dz = (g_lse - g_logp).double()[:, None] * p
    dz[torch.arange(301)[valid], targets[valid]] += g_logp.double()[valid]
    ref_db = (dz * valid[:, None]).sum(0)
    for name, ref, out, bound in (
        ("dh", ref_dh, dh, bound_dh),
        ("dw", ref_dw, dw, bound_dw),
        ("db", ref_db, db, bound_db),
    ):
        err = (out.double() - ref).abs()
        ok = err <= bound * 1.001 + rt * ref.abs().max()
        assert bool(ok.all()), f"{name}: worst excess {(err - bound).max().item():.3e}"
    again = _engine_filtered(hidden, weight, targets, g_logp, g_lse, 2.0**-12, bias)
    assert all(torch.equal(a, b) for a, b in zip((dh, dw, db), again[:3]))  # deterministic


def test_grad_filter_option_values():
    """The public option: "auto" is CCE's eps / 32 for 16-bit, off for fp32 / fp64; None / 0
    off; other strings and values outside [0, 1) raise."""
    from alignops.kernels._common import grad_filter_threshold as t

    assert t("auto", torch.bfloat16) == 2.0**-12 and t("auto", torch.float16) == 2.0**-15
    assert t("auto", torch.float32) == 0.0 and t("auto", torch.float64) == 0.0
    assert t(None, torch.bfloat16) == 0.0 and t(0, torch.bfloat16) == 0.0 and t(1e-3, torch.float32) == 1e-3
    for bad in ("high", 1.0, -0.1):
        with pytest.raises(ValueError, match="grad_filter"):
            t(bad, torch.bfloat16)


def test_public_grad_filter_reaches_backward():
    """``alignops.linear_cross_entropy(..., grad_filter=t)`` (torch engine on the CPU): with
    t = 2^-12 the gradient equals the engine's filtered backward; with None the unfiltered one,
    and the two differ (the option is not dropped on the way)."""
    import alignops

    hidden, weight, targets = peaked_case(N=101, H=48, V=517, dtype=torch.float32, seed=31, sharp=8.0)
    outs = {}
    for opt in (2.0**-12, None):
        h = hidden.clone().requires_grad_()
        alignops.linear_cross_entropy(h, weight, targets, reduction="sum", grad_filter=opt).backward()
        outs[opt] = h.grad
    valid = targets != -100
    g = torch.where(valid, -1.0, 0.0)
    want_f = _engine_filtered(hidden, weight, targets, g, None, 2.0**-12)[0]
    want_0 = _engine_filtered(hidden, weight, targets, g, None, 0.0 + 1e-300)[0]
    torch.testing.assert_close(outs[2.0**-12], want_f, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs[None], want_0, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(outs[2.0**-12], outs[None], atol=0, rtol=0)


def test_engine_skips_ignored_rows(monkeypatch):
    """A DPO-like batch (prompt rows ignored, in blocks): the engine runs its matmuls on the valid
    rows only (the raw-logit product sees only them), and every output and gradient matches
    float64, with exact zeros at ignored rows. N = 301, H = 24, V = 517; top-k ids -1 there."""
    hidden, weight, targets, _ = mean_ce_case(N=301, H=24, V=517, dtype=torch.float32, seed=41, ignored=0.0)
    targets[(torch.arange(301) // 50) % 2 == 0] = -100
    valid = targets != -100
    g = torch.Generator().manual_seed(42)
    g_logp, g_lse = torch.randn(301, generator=g), torch.randn(301, generator=g)
    rows_seen = []
    raw = E._Operands.raw

    def spy(self, c0, c1, v0, v1, wb, out):
        rows_seen.append(self.h.shape[0])
        return raw(self, c0, c1, v0, v1, wb, out)

    monkeypatch.setattr(E._Operands, "raw", spy)
    st = E.linear_logprobs_fwd(hidden, weight, targets, None, OPTS, StatRequest(entropy=True, topk=3))
    saved = TokenStats(st.logp, st.lse, st.entropy, None, None, None, None)
    grads = TokenStats(g_logp, g_lse, None, None, None, None, None)
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
    )
    assert set(rows_seen) == {int(valid.sum())}
    z = hidden.double() @ weight.double().T
    lse = torch.logsumexp(z, -1)
    logp = z.gather(1, targets.clamp(min=0)[:, None])[:, 0] - lse
    torch.testing.assert_close(st.logp.double(), torch.where(valid, logp, 0.0), atol=2e-5, rtol=0)
    torch.testing.assert_close(st.lse.double(), torch.where(valid, lse, 0.0), atol=2e-5, rtol=0)
    assert bool((st.topk_ids[~valid] == -1).all()) and bool((st.entropy[~valid] == 0).all())
    assert torch.equal(st.topk_ids[valid], z.topk(3, -1).indices[valid])
    ref_dh, ref_dw = ref_grads(hidden, weight, targets, g_logp, g_lse)
    torch.testing.assert_close(dh.double(), ref_dh, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dw.double(), ref_dw, atol=2e-5, rtol=1e-4)
    assert bool((dh[~valid] == 0).all())


def test_forward_config_choice_and_report_coverage():
    """The forward's config is a pure, cached function of the shape: 128-row tiles only for the
    plain bf16 forward from LLP_LARGE_N_MIN tokens on; and the kernel report (AOT_SPECS) builds
    every configuration the heuristic can pick for bf16 / fp32 (fp16 compiles as bf16)."""
    pytest.importorskip("triton")
    from alignops.kernels import constants as C
    from alignops.kernels import linear_logprobs as K

    big = C.LLP_LARGE_N_MIN
    assert K.fwd_config(big, 1, 1, torch.bfloat16, 0, True).BN == C.LLP_BN_LARGE
    assert K.fwd_config(big - 1, 1, 1, torch.bfloat16, 0, True).BN == C.LLP_BN
    assert K.fwd_config(big, 1, 1, torch.bfloat16, 0, False).BN == C.LLP_BN
    assert K.fwd_config(big, 1, 1, torch.float32, 0, True).BN == C.LLP_BN_FP32
    assert K.fwd_config(big, 1, 1, torch.bfloat16, 0, True) is K.fwd_config(
        big, 1, 1, torch.bfloat16, 0, True
    )
    built = {
        (
            s.signature["p_h"].split(":")[0].lstrip("*"),
            s.constexprs["BN"],
            s.constexprs["BV"],
            s.constexprs["BD"],
            s.num_warps,
        )
        for s in K.AOT_SPECS
        if s.name == "_linear_logprobs_fwd_kernel"
    }
    for dtype, cfg in K.fwd_candidates():
        if dtype == torch.float16:
            continue
        ty = "bf16" if dtype == torch.bfloat16 else "fp32"
        assert (ty, cfg.BN, cfg.BV, cfg.BD, cfg.num_warps) in built, (dtype, cfg)


def test_forward_splits_follow_occupancy():
    """The vocab split count aims at the programs that fit an SM: two for the plain forward at
    64 rows, one for the 128-row tile and the feature-rich builds (132 SMs without a GPU)."""
    pytest.importorskip("triton")
    from alignops.kernels import linear_logprobs as K

    cpu = torch.device("cpu")
    plain64 = K.fwd_config(4096, 1, 1, torch.bfloat16, 0, True)
    plain128 = K.fwd_config(8192, 1, 1, torch.bfloat16, 0, True)
    assert K.programs_per_sm(plain64, True) == 2 and K.programs_per_sm(plain128, True) == 1
    assert K.programs_per_sm(plain64, False) == 1
    assert K._num_splits(4096 // 64, 2000, cpu, K.programs_per_sm(plain64, True)) == 5  # 64 x 5 >= 264
    assert K._num_splits(8192 // 128, 2000, cpu, K.programs_per_sm(plain128, True)) == 3  # 64 x 3 >= 132
