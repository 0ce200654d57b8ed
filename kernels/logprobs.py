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
from ._aot import TRITON_TYPE, AotSpec, aot_spec
from ._common import LogitOptions, TokenStats, check_logits_inputs, empty, rows_3d, rows_3d_like
from ._jit import (
    GRAD_FLAGS,
    NEG_BIG,
    flags_from_none,
    for_store,
    logit_grad,
    online_update,
    store_stats,
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
    HAS_SOFTCAP: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
):
    """``BN`` rows: logp, lse (and entropy, zmean) [N] fp32, exact zeros at ignored rows."""
    # int64: row offsets reach N * V > 2**31 for long batches with 150k vocabularies
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    b_y = tl.load(p_y + o_n, mask=m_n, other=ignore_index).to(tl.int64)
    m_valid = m_n & (b_y != ignore_index)
    p_row = _row_pointers(p_x, o_n, T_inner, stride_xb, stride_xt)
    v_stop = tl.where(tl.sum(m_valid.to(tl.int32)) > 0, V, 0)  # all rows ignored: no read

    b_m = tl.full([BN], NEG_BIG, dtype=tl.float32)
    b_s = tl.zeros([BN], dtype=tl.float32)
    b_t = tl.zeros([BN], dtype=tl.float32)
    b_zsum = tl.zeros([BN], dtype=tl.float32)
    for v0 in range(0, v_stop, BV):
        o_v = v0 + tl.arange(0, BV)
        m_tile = m_valid[:, None] & (o_v < V)[None, :]
        b_x = tl.load(p_row[:, None] + o_v[None, :], mask=m_tile, other=0.0).to(tl.float32)
        b_z, _ = transform(b_x, scale, softcap, inv_temp, HAS_SOFTCAP)
        b_m, b_s, b_t = online_update(b_m, b_s, b_t, b_z, m_tile, NEED_ENT)
        if NEED_ZMEAN:
            b_zsum += tl.sum(tl.where(m_tile, b_z, 0.0), axis=1)
    # target logit: one element per row (index 0 for ignored rows, result discarded)
    b_xy = tl.load(p_row + tl.where(m_valid, b_y, 0), mask=m_valid, other=0.0).to(tl.float32)
    b_zy, _ = transform(b_xy, scale, softcap, inv_temp, HAS_SOFTCAP)

    stats, p_out = (b_m, b_s, b_t, b_zy, b_zsum), (p_logp, p_lse, p_ent, p_zmean)
    store_stats(stats, m_valid, o_n, m_n, V, p_out, NEED_ENT, NEED_ZMEAN)


@flags_from_none(HAS_SOFTCAP="softcap", **GRAD_FLAGS)
@triton.jit(do_not_specialize=["N", "T_inner"])
def _logprobs_bwd_kernel(
    p_x,
    p_dx,
    p_y,
    p_lse,
    p_ent,
    p_glogp,
    p_glse,
    p_gent,
    p_gzmean,
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
    HAS_G_LOGP: tl.constexpr,
    HAS_G_LSE: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
    HAS_G_ZMEAN: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
):
    """One ``[BN, BV]`` block of ``dx`` (logits dtype); zeros at ignored rows (never read)."""
    # int64: row offsets reach N * V > 2**31 for long batches with 150k vocabularies
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    o_v = i_v * BV + tl.arange(0, BV)
    m_n = o_n < N
    m_v = o_v < V
    b_y = tl.load(p_y + o_n, mask=m_n, other=ignore_index).to(tl.int64)
    m_valid = m_n & (b_y != ignore_index)
    m_tile = m_valid[:, None] & m_v[None, :]
    p_row = _row_pointers(p_x, o_n, T_inner, stride_xb, stride_xt)
    b_x = tl.load(p_row[:, None] + o_v[None, :], mask=m_tile, other=0.0).to(tl.float32)
    b_z, b_th = transform(b_x, scale, softcap, inv_temp, HAS_SOFTCAP)

    m_hit = o_v[None, :] == b_y[:, None]
    stats, grads = (p_lse, p_ent), (p_glogp, p_glse, p_gent, p_gzmean)
    b_dz = logit_grad(
        b_z, m_tile, m_hit, o_n, m_valid, stats, grads, V, HAS_G_LOGP, HAS_G_LSE, HAS_G_ENT, HAS_G_ZMEAN
    )
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


def _opts_args(opts: LogitOptions) -> dict:
    return dict(
        ignore_index=opts.ignore_index,
        scale=opts.logit_scale,
        softcap=opts.softcap,
        inv_temp=1.0 / opts.temperature,
    )


def logprobs_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    opts: LogitOptions,
    *,
    need_entropy: bool = False,
    need_zmean: bool = False,
) -> TokenStats:
    """``TokenStats(logp, lse, entropy | None, zmean | None)``, each ``[N]`` fp32.

    logits ``[..., V]`` (fp16 / bf16 / fp32, unit vocab stride, any other strides), targets
    ``[...]`` int (its leading dims). Targets must lie in ``[0, V)`` or equal
    ``opts.ignore_index`` (not checked here: it would need a device sync; the caller checks).
    """
    x3 = _check(logits, targets)
    n, v, dev = targets.numel(), x3.shape[-1], logits.device
    lay = _layout(x3)
    logp = empty((n,), dtype=torch.float32, device=dev)
    lse = empty((n,), dtype=torch.float32, device=dev)
    ent = empty((n,), dtype=torch.float32, device=dev) if need_entropy else None
    zmean = empty((n,), dtype=torch.float32, device=dev) if need_zmean else None
    if n:
        _launch.launch(
            _logprobs_fwd_kernel,
            (triton.cdiv(n, C.LP_FWD_BN),),
            p_x=x3,
            p_y=targets.reshape(-1),
            p_logp=logp,
            p_lse=lse,
            p_ent=ent,
            p_zmean=zmean,
            N=n,
            T_inner=lay["T_inner"],
            V=v,
            stride_xb=lay["stride_b"],
            stride_xt=lay["stride_t"],
            **_opts_args(opts),
            NEED_ENT=need_entropy,
            NEED_ZMEAN=need_zmean,
            BN=C.LP_FWD_BN,
            BV=C.LP_FWD_BV,
            num_warps=C.LP_FWD_NUM_WARPS,
            num_stages=C.LP_NUM_STAGES,
        )
    return TokenStats(logp, lse, ent, zmean)


def logprobs_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grads: TokenStats,
    opts: LogitOptions,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient with respect to the logits (their shape and dtype) of ``sum_n g_k[n] stat_k[n]``
    over the statistics of :func:`logprobs_fwd`. ``out`` (the logits' shape and dtype, unit
    vocab stride) receives it and may be ``logits`` itself (in-place backward); otherwise a new
    tensor is returned."""
    x3 = _check(logits, targets)
    n, v = targets.numel(), x3.shape[-1]
    if grads.entropy is not None and entropy is None:
        raise ValueError("an entropy gradient needs the forward's entropy")
    if out is None:
        out = empty(tuple(logits.shape), dtype=logits.dtype, device=logits.device)
    elif out.shape != logits.shape or out.dtype != logits.dtype or (v > 1 and out.stride(-1) != 1):
        raise ValueError("out must have the logits' shape and dtype and a unit vocab stride")
    g = TokenStats(*(_launch.vec(x, n, f"grad of {k}") for k, x in zip(TokenStats._fields, grads)))
    if n == 0:
        return out
    d3, lay = rows_3d_like(out, x3), _layout(x3)
    dlay = _layout(d3)
    _launch.launch(
        _logprobs_bwd_kernel,
        (triton.cdiv(n, C.LP_BWD_BN), triton.cdiv(v, C.LP_BWD_BV)),
        p_x=x3,
        p_dx=d3,
        p_y=targets.reshape(-1),
        p_lse=_launch.vec(lse, n, "lse"),
        p_ent=_launch.vec(entropy, n, "entropy") if g.entropy is not None else None,
        p_glogp=g.logp,
        p_glse=g.lse,
        p_gent=g.entropy,
        p_gzmean=g.zmean,
        N=n,
        T_inner=lay["T_inner"],
        V=v,
        stride_xb=lay["stride_b"],
        stride_xt=lay["stride_t"],
        stride_dxb=dlay["stride_b"],
        stride_dxt=dlay["stride_t"],
        **_opts_args(opts),
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
    """bf16 and fp32 logits, ``plain`` (log-probs and lse only, no soft-cap; the cross-entropy
    case) and ``full`` (soft-cap, entropy, zmean and every upstream gradient: the most
    registers). fp16 compiles to the same code as bf16 but for the conversion instruction."""
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        ty = TRITON_TYPE[dtype]
        ptrs = {"p_x": ty, "p_dx": ty, "p_y": "i64"}
        for full in (False, True):
            feat = "full" if full else "plain"
            cap = {} if full else {"softcap": None}
            fwd = {**cap, "HAS_SOFTCAP": full, "NEED_ENT": full, "NEED_ZMEAN": full}
            fwd |= {"BN": C.LP_FWD_BN, "BV": C.LP_FWD_BV}
            bwd = {**cap, "HAS_SOFTCAP": full, "HAS_G_LOGP": True, "INTERP_BF16": False}
            bwd |= {"BN": C.LP_BWD_BN, "BV": C.LP_BWD_BV}
            bwd |= dict.fromkeys(("HAS_G_LSE", "HAS_G_ENT", "HAS_G_ZMEAN"), full)
            if not full:
                bwd |= dict.fromkeys(("p_ent", "p_glse", "p_gent", "p_gzmean"))
            for kernel, cx, warps, bv in (
                (_logprobs_fwd_kernel, fwd, C.LP_FWD_NUM_WARPS, C.LP_FWD_BV),
                (_logprobs_bwd_kernel, bwd, C.LP_BWD_NUM_WARPS, C.LP_BWD_BV),
            ):
                label = f"{ty} {feat} BV={bv} w{warps}"
                specs.append(
                    aot_spec(kernel, cx, pointer_types=ptrs, warps=warps, stages=C.LP_NUM_STAGES, label=label)
                )
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()
