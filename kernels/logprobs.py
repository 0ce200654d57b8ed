r"""Log-probs on logits the caller already holds: per-token log-probs, log-sum-exp, entropy and
mean logit, and their gradient, reading the ``[N, V]`` logits once per pass without a float32
copy of them. Cross-entropy (label smoothing, z-loss, reductions) is composed on these
statistics in ``alignops/logprobs.py``, exactly as on the fused linear family.

Math (per row ``n`` with target ``y``; ``x`` the given logits; ``a`` logit scale, ``c``
soft-cap, ``T`` temperature: ``kernels/_common.py::LogitOptions``)::

    z     = c * tanh(a x / c) / T        (z = a x / T without a soft-cap)
    lse   = log sum_v exp(z_v)            online over vocab blocks of BV in fp32
    logp  = z_y - lse
    ent   = lse - sum_v p_v z_v,          p = softmax(z)
    zmean = (1 / V) sum_v z_v

The online log-sum-exp keeps ``m``, ``s = sum exp(z - m)``, ``t = sum exp(z - m) (z - m)`` and
rescales them when the max moves (``kernels/_jit.py::online_update``); ``ent = log s - t / s``.

Backward, given per-row upstream gradients of the four statistics (``None`` means 0)::

    dz = g_logp (onehot(y) - p) + g_lse p - g_ent p (z - E_p z) + g_zmean / V,   E_p z = lse - ent
    dx = dz a / T * (1 - tanh(a x / c)^2)        (dz a / T without a soft-cap)

stored in the logits dtype. ``dx`` may alias ``x`` (in-place backward): every program reads its
block of ``x`` before writing the same block of ``dx``.

PyTorch equivalent, which makes a float32 copy of the logits::

    z = c * torch.tanh(a * x.float() / c) / T
    logp = torch.log_softmax(z, -1).gather(-1, y[:, None])[:, 0]

Rows with ``y == ignore_index`` give exactly 0 in every output and in ``dx``; their logits are
never read. Row addressing: the logits are ``[B, T, V]`` with strides ``(stride_xb, stride_xt,
1)`` and row ``n = b * T + t`` (``T = T_inner``), so views such as ``logits[:, :-1]`` of a
``[B, L, V]`` tensor need no copy (``kernels/_common.py::rows_3d``).

Launch layout: forward one program per ``BN`` rows, looping over vocabulary blocks; backward a
``(row blocks, vocab blocks)`` grid, no loop, every element written once. Deterministic: no
atomics. Block sizes and their reasons: ``kernels/constants.py`` (``LP_*``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from . import constants as C
from ._aot import FEATURES, INDEX_POINTERS, TRITON_TYPE, AotSpec, aot_spec, grad_constexprs, stat_constexprs
from ._common import (
    NOTHING_EXTRA,
    LogitOptions,
    StatRequest,
    TokenStats,
    autocast_off,
    check_logits_inputs,
    empty,
    rows_3d,
    rows_3d_like,
)
from ._jit import (
    NEG_BIG,
    block_range,
    flags_from_none,
    for_store,
    logit_grad,
    online_update,
    store_stats,
    topk_init,
    topk_merge,
    topk_store,
    transform,
    transform_grad,
)

__all__ = ["AOT_SPECS", "logprobs_bwd", "logprobs_fwd"]


@triton.jit
def _row_pointers(p_x, o_n, T_inner, stride_xb, stride_xt):
    """Start of row ``n = b * T + t`` of a ``[B, T, V]`` view, per row of the block."""
    return p_x + (o_n // T_inner) * stride_xb + (o_n % T_inner) * stride_xt


@flags_from_none(HAS_SOFTCAP="softcap")
@triton.jit(do_not_specialize=["N", "T_inner"])
def _logprobs_fwd_kernel(
    p_x,
    p_y,
    p_logp,
    p_lse,
    p_ent,
    p_zmean,
    p_lsp2,
    p_tkid,
    p_tklp,
    N,
    T_inner,
    V,
    stride_xb,
    stride_xt,
    ignore_index,
    scale,
    softcap,
    inv_temp,
    NEED_ENT: tl.constexpr,
    NEED_ZMEAN: tl.constexpr,
    NEED_S2: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
):
    """``BN`` rows: logp, lse (and entropy, zmean, log sum p^2) [N] fp32 and the sorted top-k
    [N, K]; exact zeros (ids -1) at ignored rows."""
    # int64: row offsets reach N * V > 2**31 for long batches with 150k vocabularies
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    b_y = tl.load(p_y + o_n, mask=m_n, other=ignore_index).to(tl.int64)
    m_valid = m_n & (b_y != ignore_index)
    p_row = _row_pointers(p_x, o_n, T_inner, stride_xb, stride_xt)
    v_stop = tl.where(tl.sum(m_valid.to(tl.int32)) > 0, V, 0)  # all rows ignored: no read

    zero = tl.zeros([BN], dtype=tl.float32)
    acc = (zero + NEG_BIG, zero, zero, zero)  # (m, s, t, s2)
    b_zsum = zero
    b_tv, b_ti = topk_init(BN, KP, K)
    for v0 in range(0, v_stop, BV):
        o_v = v0 + tl.arange(0, BV)
        m_tile = m_valid[:, None] & (o_v < V)[None, :]
        b_x = tl.load(p_row[:, None] + o_v[None, :], mask=m_tile, other=0.0).to(tl.float32)
        b_z, _ = transform(b_x, scale, softcap, inv_temp, HAS_SOFTCAP)
        acc = online_update(acc, b_z, m_tile, NEED_ENT, NEED_S2)
        if NEED_ZMEAN:
            b_zsum += tl.sum(tl.where(m_tile, b_z, 0.0), axis=1)
        if K > 0:
            b_cv = tl.where(m_tile, b_z, float("-inf"))
            b_tv, b_ti = topk_merge(b_tv, b_ti, b_cv, o_v.to(tl.int32)[None, :])
    # target logit: one element per row (index 0 for ignored rows, result discarded)
    b_xy = tl.load(p_row + tl.where(m_valid, b_y, 0), mask=m_valid, other=0.0).to(tl.float32)
    b_zy, _ = transform(b_xy, scale, softcap, inv_temp, HAS_SOFTCAP)

    p_out = (p_logp, p_lse, p_ent, p_zmean, p_lsp2)
    b_lse = store_stats(acc, b_zy, b_zsum, m_valid, o_n, m_n, V, p_out, NEED_ENT, NEED_ZMEAN, NEED_S2)
    if K > 0:
        topk_store(b_tv, b_ti, b_lse, m_valid, o_n, m_n, p_tkid, p_tklp, K)


@flags_from_none(HAS_SOFTCAP="softcap")
@triton.jit(do_not_specialize=["N", "T_inner"])
def _logprobs_bwd_kernel(
    p_x,
    p_dx,
    p_y,
    p_lse,
    p_ent,
    p_lsp2,
    p_glogp,
    p_glse,
    p_gent,
    p_gzmean,
    p_glsp2,
    N,
    T_inner,
    V,
    stride_xb,
    stride_xt,
    stride_dxb,
    stride_dxt,
    ignore_index,
    scale,
    softcap,
    inv_temp,
    HAS_SOFTCAP: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
):
    """One ``[BN, BV]`` block of ``dx`` (logits dtype); zeros at ignored rows (never read)."""
    # int64: row offsets reach N * V > 2**31 for long batches with 150k vocabularies
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1).to(tl.int64)
    o_n, m_n = block_range(i_n, BN, N)
    o_v, m_v = block_range(i_v, BV, V)
    b_y = tl.load(p_y + o_n, mask=m_n, other=ignore_index).to(tl.int64)
    m_valid = m_n & (b_y != ignore_index)
    m_tile = m_valid[:, None] & m_v[None, :]
    p_row = _row_pointers(p_x, o_n, T_inner, stride_xb, stride_xt)
    b_x = tl.load(p_row[:, None] + o_v[None, :], mask=m_tile, other=0.0).to(tl.float32)
    b_z, b_th = transform(b_x, scale, softcap, inv_temp, HAS_SOFTCAP)

    m_hit = o_v[None, :] == b_y[:, None]
    stats, grads = (p_lse, p_ent, p_lsp2), (p_glogp, p_glse, p_gent, p_gzmean, p_glsp2)
    b_dz = logit_grad(b_z, m_tile, m_hit, o_n, m_valid, stats, grads, V)
    b_dx = transform_grad(b_dz, b_th, scale, inv_temp, HAS_SOFTCAP)
    p_drow = _row_pointers(p_dx, o_n, T_inner, stride_dxb, stride_dxt)
    m_out = m_n[:, None] & m_v[None, :]
    tl.store(p_drow[:, None] + o_v[None, :], for_store(b_dx, p_dx, INTERP_BF16), mask=m_out)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _check(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The shared input contract plus the kernels' dtypes and device; the ``[B, T, V]`` view."""
    check_logits_inputs(logits, targets)
    if logits.dtype == torch.float64:
        raise TypeError(
            "the Triton kernels take float16 / bfloat16 / float32 (float64 runs the torch engine)"
        )
    _launch.check_device(logits)
    return rows_3d(logits)


def _layout(x3: torch.Tensor) -> dict:
    """Row count and strides of a ``[B, T, V]`` view (0 for a unit axis)."""
    b, t, _ = x3.shape
    return dict(T_inner=t, stride_b=x3.stride(0) if b > 1 else 0, stride_t=x3.stride(1) if t > 1 else 0)


def _input_args(x3: torch.Tensor, targets: torch.Tensor, opts: LogitOptions) -> dict:
    """The arguments both kernels take for logits viewed as ``[B, T, V]`` (``x3``), ``targets``
    (``B * T`` ids) and the logit options."""
    lay = _layout(x3)
    return dict(
        p_x=x3,
        p_y=targets.reshape(-1),
        N=targets.numel(),
        T_inner=lay["T_inner"],
        V=x3.shape[-1],
        stride_xb=lay["stride_b"],
        stride_xt=lay["stride_t"],
        **_launch.option_args(opts),
    )


@autocast_off
def logprobs_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    opts: LogitOptions,
    want: StatRequest = NOTHING_EXTRA,
) -> TokenStats:
    """The :class:`TokenStats` that ``want`` asks for: ``[N]`` fp32 (top-k ``[N, K]``).

    logits ``[..., V]`` (fp16 / bf16 / fp32, unit vocab stride, any other strides), targets
    ``[...]`` int (its leading dims). Targets must lie in ``[0, V)`` or equal
    ``opts.ignore_index`` (not checked here: it would need a device sync; the caller checks).
    """
    x3 = _check(logits, targets)
    n, v = targets.numel(), x3.shape[-1]
    want = want.checked(v)
    stats = _launch.stat_outputs(n, want, logits.device)
    if n:
        _launch.launch(
            _logprobs_fwd_kernel,
            (triton.cdiv(n, C.LP_FWD_BN),),
            **_input_args(x3, targets, opts),
            **_launch.stat_args(stats, want),
            BN=C.LP_FWD_BN,
            BV=C.LP_FWD_BV,
            num_warps=C.LP_FWD_NUM_WARPS,
            num_stages=C.LP_NUM_STAGES,
        )
    return stats


@autocast_off
def logprobs_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    saved: TokenStats,
    grads: TokenStats,
    opts: LogitOptions,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient with respect to the logits (their shape and dtype) of ``sum_k grads.k . stat_k``
    over the statistics of :func:`logprobs_fwd`; ``saved`` holds the forward's ``lse`` (and
    ``entropy`` / ``log_sum_p2`` where those get a gradient). ``out`` (the logits' shape and dtype,
    unit vocab stride) receives it and may be ``logits`` itself (in-place backward); otherwise a
    new tensor is returned."""
    x3 = _check(logits, targets)
    n, v = targets.numel(), x3.shape[-1]
    if out is None:
        out = empty(tuple(logits.shape), dtype=logits.dtype, device=logits.device)
    elif out.shape != logits.shape or out.dtype != logits.dtype or (v > 1 and out.stride(-1) != 1):
        raise ValueError("out must have the logits' shape and dtype and a unit vocab stride")
    ptrs = _launch.backward_args(saved, grads, n)
    if n == 0:
        return out
    d3 = rows_3d_like(out, x3)
    dlay = _layout(d3)
    _launch.launch(
        _logprobs_bwd_kernel,
        (triton.cdiv(n, C.LP_BWD_BN), triton.cdiv(v, C.LP_BWD_BV)),
        **_input_args(x3, targets, opts),
        p_dx=d3,
        **ptrs,
        stride_dxb=dlay["stride_b"],
        stride_dxt=dlay["stride_t"],
        INTERP_BF16=_launch.interpreting() and logits.dtype == torch.bfloat16,
        BN=C.LP_BWD_BN,
        BV=C.LP_BWD_BV,
        num_warps=C.LP_BWD_NUM_WARPS,
        num_stages=C.LP_NUM_STAGES,
    )
    return out


# ----------------------------------------------------------------------------------------------
# ahead-of-time build descriptions
# ----------------------------------------------------------------------------------------------


def _aot_specs() -> list[AotSpec]:
    """bf16 and fp32 logits for the feature sets of ``_aot.FEATURES`` (``full``: soft-cap, every
    statistic and upstream gradient). fp16 compiles to the same code as bf16 but for the
    conversion instruction."""
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        ty = TRITON_TYPE[dtype]
        ptrs = {**INDEX_POINTERS, "p_x": ty, "p_dx": ty}
        for feat, full, topk in FEATURES:
            cap = {"HAS_SOFTCAP": full} | ({} if full else {"softcap": None})
            fwd = cap | stat_constexprs(full, topk) | {"BN": C.LP_FWD_BN, "BV": C.LP_FWD_BV}
            builds = [(_logprobs_fwd_kernel, fwd, C.LP_FWD_NUM_WARPS, C.LP_FWD_BV)]
            if not topk:  # the backward does not depend on the top-k
                bwd = (
                    cap | grad_constexprs(full) | {"INTERP_BF16": False, "BN": C.LP_BWD_BN, "BV": C.LP_BWD_BV}
                )
                builds.append((_logprobs_bwd_kernel, bwd, C.LP_BWD_NUM_WARPS, C.LP_BWD_BV))
            for kernel, cx, warps, bv in builds:
                label = f"{ty} {feat} BV={bv} w{warps}"
                specs.append(
                    aot_spec(kernel, cx, pointer_types=ptrs, warps=warps, stages=C.LP_NUM_STAGES, label=label)
                )
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()
