"""Cross-entropy on given logits: fused forward statistics and in-place-capable backward.

Computes ``F.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=eps)``
(+ z-loss, soft-cap, temperature) reading the ``[N, V]`` logits once in forward and once
in backward, without a float32 copy of them. SPEC §1.1 (transform order, online LSE),
§3.1 (per-token loss). Reductions live in ``alignops/cross_entropy.py``.

Math (symbols as in the code; per row ``n`` with target ``y``, vocabulary ``V``)::

    s_v   = c * tanh(x_v / c)                 soft-cap (optional, HAS_SOFTCAP)
    z_v   = s_v / T                           temperature (inv_temperature = 1 / T)
    lse   = log sum_v exp(z_v)                online over vocab blocks of BV in fp32:
                                              m <- max(m, max_v z_v),
                                              acc <- acc * 2^(m_old - m) + sum 2^(z_v - m)
                                              (base 2: z scaled by RCP_LN2)
    zmean = (1 / V) sum_v z_v
    loss  = (1 - eps) (lse - z_y) + eps (lse - zmean) + c_z lse^2

Backward, with ``p_v = exp(z_v - lse)`` and per-row upstream gradient ``g``::

    dz_v = g * ((1 + 2 c_z lse) p_v - (1 - eps) [v == y] - eps / V)
    dx_v = dz_v / T * (1 - tanh(x_v / c)^2)      (the last factor only with soft-cap)

stored in the logits dtype. ``dx`` may alias ``x`` (``inplace_backward``): every program
reads its block of ``x`` before writing the same block of ``dx``.

Rows with ``y == ignore_index`` give ``loss = lse = 0`` and ``dx = 0`` exactly; their
logits are never read in forward. Row addressing: the logits are ``[B, T, V]`` with
strides ``(stride_xo, stride_xi, 1)`` and row ``n = b * T + t`` (``T = T_inner``), so
views such as ``logits[:, :-1]`` of a ``[B, L, V]`` tensor need no copy.

Layout of the launch: forward one program per row (loop over vocab blocks); backward a
``(N, cdiv(V, BV))`` grid (no loop, every element written once). Deterministic: no atomics.
Reference: ``alignops.reference.cross_entropy_ref``; z-loss: arXiv 2204.02311 (PaLM);
soft-cap: arXiv 2408.00118 (Gemma 2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import empty

from ._aot import AotSpec

#: ``1 / ln 2``: exp(z) = 2^(z * RCP_LN2), the form the exp2 instruction takes.
RCP_LN2 = tl.constexpr(1.4426950408889634)
#: ``ln 2``: converts the base-2 log-sum-exp back to natural log.
LN2 = tl.constexpr(0.6931471805599453)

#: Forward vocab block. 4096 fp32 values over 8 warps = 16 per thread (four 128-bit loads
#: for fp32, two for bf16): enough bytes in flight per row to stay memory-bound while the
#: row loop's two block reductions per 4096 elements stay cheap. Real vocabularies
#: (32k-256k) take 8-63 iterations; small V just masks the tail.
FWD_BV = 4096
FWD_WARPS = 8
#: No software pipelining: the loop holds no ``tl.dot``, so Triton would not pipeline its
#: loads through shared memory anyway; several resident rows per SM hide the latency.
FWD_STAGES = 1
#: Backward vocab block. The backward is a pure elementwise map over a 2-D grid; 2048
#: elements over 4 warps (16 per thread) keeps the grid's V axis at <= 75 blocks for
#: V = 152k and enough independent programs for small N.
BWD_BV = 2048
BWD_WARPS = 4
BWD_STAGES = 1
#: Below |u| < TANH_TAYLOR_MAX, tanh(u) = u (1 - u^2/3 (1 - 0.4 u^2)) (relative error
#: < 17 u^6 / 315 = 5.4e-8): the exp form (1 - e^-2u) / (1 + e^-2u) cancels there.
TANH_TAYLOR_MAX = tl.constexpr(0.1)

_TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@triton.jit
def _tanh(u):
    """tanh in fp32 without libdevice (so it also runs under TRITON_INTERPRET=1)."""
    a = tl.abs(u)
    # Tensor on the left of every op with a constexpr global: under TRITON_INTERPRET=1
    # (triton 3.9) ``constexpr * tensor`` raises a TypeError, ``tensor * constexpr`` works.
    e = tl.exp2(a * (-2.0 * RCP_LN2))  # in (0, 1]: never overflows
    t = (1.0 - e) / (1.0 + e)
    u2 = a * a
    t = tl.where(a < TANH_TAYLOR_MAX, a * (1.0 - u2 / 3.0 * (1.0 - 0.4 * u2)), t)
    return tl.where(u < 0, -t, t)


@triton.jit
def _cross_entropy_fwd_kernel(
    x_ptr,
    y_ptr,
    loss_ptr,
    lse_ptr,
    T_inner,
    stride_xo,
    stride_xi,
    V,
    ignore_index,
    inv_temperature,
    softcap,
    label_smoothing,
    z_loss,
    HAS_SOFTCAP: tl.constexpr,
    BV: tl.constexpr,
):
    # int64: row offsets reach N * V > 2**31 for long batches with 150k vocabularies.
    i_n = tl.program_id(0).to(tl.int64)
    b_y = tl.load(y_ptr + i_n).to(tl.int64)
    valid = b_y != ignore_index
    p_x = x_ptr + (i_n // T_inner) * stride_xo + (i_n % T_inner) * stride_xi
    o_v = tl.arange(0, BV)

    # Online log-sum-exp in base 2; an ignored row runs zero iterations.
    V_eff = tl.where(valid, V, 0)
    b_m = -float("inf")
    b_acc = 0.0
    b_zsum = 0.0
    for i_v in range(0, V_eff, BV):
        m_v = i_v + o_v < V
        b_x = tl.load(p_x + i_v + o_v, mask=m_v, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            b_x = softcap * _tanh(b_x / softcap)
        b_z = b_x * inv_temperature
        b_zsum += tl.sum(tl.where(m_v, b_z, 0.0), axis=0)
        b_z2 = tl.where(m_v, b_z * RCP_LN2, -float("inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_z2, axis=0))
        # A block of only -inf logits keeps b_m_new = -inf: shift by 0 instead (no NaN).
        b_shift = tl.where(b_m_new == -float("inf"), 0.0, b_m_new)
        b_acc = b_acc * tl.exp2(b_m - b_shift) + tl.sum(tl.exp2(b_z2 - b_shift), axis=0)
        b_m = b_m_new
    b_lse = (b_m + tl.log2(b_acc)) * LN2

    # Target logit: one scalar load (index 0 for ignored rows, result discarded).
    b_x_y = tl.load(p_x + tl.where(valid, b_y, 0)).to(tl.float32)
    if HAS_SOFTCAP:
        b_x_y = softcap * _tanh(b_x_y / softcap)
    b_z_y = b_x_y * inv_temperature

    b_loss = (1.0 - label_smoothing) * (b_lse - b_z_y) + z_loss * b_lse * b_lse
    if label_smoothing > 0:  # kept out when eps = 0 so -inf logits give no 0 * inf
        b_loss += label_smoothing * (b_lse - b_zsum / V)
    tl.store(loss_ptr + i_n, tl.where(valid, b_loss, 0.0))
    tl.store(lse_ptr + i_n, tl.where(valid, b_lse, 0.0))


@triton.jit
def _cross_entropy_bwd_kernel(
    x_ptr,
    dx_ptr,
    y_ptr,
    lse_ptr,
    g_ptr,
    T_inner,
    stride_xo,
    stride_xi,
    stride_dxo,
    stride_dxi,
    stride_g,
    V,
    ignore_index,
    inv_temperature,
    softcap,
    label_smoothing,
    z_loss,
    HAS_SOFTCAP: tl.constexpr,
    BV: tl.constexpr,
):
    # int64: row offsets reach N * V > 2**31 for long batches with 150k vocabularies.
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    b_y = tl.load(y_ptr + i_n).to(tl.int64)
    valid = b_y != ignore_index
    b_lse = tl.load(lse_ptr + i_n)
    b_g = tl.load(g_ptr + i_n * stride_g).to(tl.float32)
    b_g = tl.where(valid, b_g, 0.0)
    i_b = i_n // T_inner
    i_t = i_n % T_inner
    p_x = x_ptr + i_b * stride_xo + i_t * stride_xi
    p_dx = dx_ptr + i_b * stride_dxo + i_t * stride_dxi

    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_ld = o_v < tl.where(valid, V, 0)  # ignored rows: no read, write zeros
    b_x = tl.load(p_x + o_v, mask=m_ld, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        b_t = _tanh(b_x / softcap)
        b_z = softcap * b_t * inv_temperature
    else:
        b_z = b_x * inv_temperature
    b_p = tl.exp2((b_z - b_lse) * RCP_LN2)
    b_dz = b_p * (1.0 + 2.0 * z_loss * b_lse) - label_smoothing / V
    b_dz = b_dz - tl.where(o_v == b_y, 1.0 - label_smoothing, 0.0)
    b_dx = b_dz * (b_g * inv_temperature)
    if HAS_SOFTCAP:
        b_dx = b_dx * (1.0 - b_t * b_t)
    b_dx = tl.where(m_ld, b_dx, 0.0)
    tl.store(p_dx + o_v, b_dx.to(dx_ptr.dtype.element_ty), mask=m_v)


def _rows_3d(x: torch.Tensor, T_inner: int) -> tuple[int, int]:
    """``(stride_xo, stride_xi)`` of ``x`` seen as ``[B, T_inner, V]``; 0 for a unit axis."""
    if x.dim() != 3 or x.shape[1] != T_inner:
        raise ValueError(f"expected a [B, {T_inner}, V] view, got {tuple(x.shape)}")
    return (x.stride(0) if x.shape[0] > 1 else 0), (x.stride(1) if x.shape[1] > 1 else 0)


def _check(x: torch.Tensor, targets: torch.Tensor) -> tuple[int, int, int]:
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16 or float32 for the Triton path, got {x.dtype}")
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(f"logits must be a [B, T, V] view with unit vocab stride, got {tuple(x.shape)}")
    B, T, V = x.shape
    if targets.shape != (B * T,) or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int [N] = [{B * T}], got {tuple(targets.shape)} {targets.dtype}")
    if V == 0:
        raise ValueError("logits have an empty vocabulary (V = 0)")
    return B * T, T, V


def cross_entropy_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    label_smoothing: float,
    z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and log-sum-exp.

    logits ``[B, T, V]`` (any strides, unit vocab stride; fp16 / bf16 / fp32), targets ``[N]``
    int with ``N = B * T``. Returns ``(loss [N] fp32, lse [N] fp32)``, zeros at ignored rows.
    """
    N, T, V = _check(logits, targets)
    loss = empty((N,), dtype=torch.float32, device=logits.device)
    lse = empty((N,), dtype=torch.float32, device=logits.device)
    if N == 0:
        return loss, lse
    s_o, s_i = _rows_3d(logits, T)
    _cross_entropy_fwd_kernel[(N,)](
        x_ptr=logits,
        y_ptr=targets,
        loss_ptr=loss,
        lse_ptr=lse,
        T_inner=T,
        stride_xo=s_o,
        stride_xi=s_i,
        V=V,
        ignore_index=ignore_index,
        inv_temperature=1.0 / temperature,
        softcap=1.0 if softcap is None else float(softcap),
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        HAS_SOFTCAP=softcap is not None,
        BV=FWD_BV,
        num_warps=FWD_WARPS,
        num_stages=FWD_STAGES,
    )
    return loss, lse


def cross_entropy_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    label_smoothing: float,
    z_loss: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the per-row losses with respect to the logits, in the logits dtype.

    logits ``[B, T, V]``; lse ``[N]`` fp32 from :func:`cross_entropy_fwd`; grad_rows ``[N]``
    (per-row upstream gradient) or a 0-d tensor broadcast to every row. ``out`` (``[B, T, V]``,
    logits dtype, unit vocab stride) receives the gradient; it may be ``logits`` itself
    (in-place backward). Otherwise a new contiguous ``[B, T, V]`` tensor is returned.
    """
    N, T, V = _check(logits, targets)
    if lse.shape != (N,) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 [{N}], got {tuple(lse.shape)} {lse.dtype}")
    if grad_rows.dim() == 0:
        stride_g = 0
    elif grad_rows.shape == (N,):
        stride_g = grad_rows.stride(0)
    else:
        raise ValueError(f"grad_rows must be [{N}] or 0-d, got {tuple(grad_rows.shape)}")
    if out is None:
        out = empty(tuple(logits.shape), dtype=logits.dtype, device=logits.device)
    elif out.shape != logits.shape or out.dtype != logits.dtype or out.stride(-1) != 1:
        raise ValueError("out must have the logits' shape and dtype and a unit vocab stride")
    if N == 0:
        return out
    s_o, s_i = _rows_3d(logits, T)
    d_o, d_i = _rows_3d(out, T)
    grid = (N, triton.cdiv(V, BWD_BV))
    _cross_entropy_bwd_kernel[grid](
        x_ptr=logits,
        dx_ptr=out,
        y_ptr=targets,
        lse_ptr=lse,
        g_ptr=grad_rows,
        T_inner=T,
        stride_xo=s_o,
        stride_xi=s_i,
        stride_dxo=d_o,
        stride_dxi=d_i,
        stride_g=stride_g,
        V=V,
        ignore_index=ignore_index,
        inv_temperature=1.0 / temperature,
        softcap=1.0 if softcap is None else float(softcap),
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        HAS_SOFTCAP=softcap is not None,
        BV=BWD_BV,
        num_warps=BWD_WARPS,
        num_stages=BWD_STAGES,
    )
    return out


# --------------------------------------------------------------------------------------
# Ahead-of-time build configurations (``alignops kernels --arch ...``).
#
# The launchers above use exactly one tile config per kernel; what varies is the logits
# dtype and the soft-cap flag. Listed: bf16 and fp32, without soft-cap (the common case),
# plus bf16 with soft-cap (Gemma 2). fp16 compiles to the same code as bf16 apart from
# the conversion instruction. Pointers are assumed 16-byte aligned (torch allocations);
# row strides carry the ``:16`` divisibility hint that the runtime gives vocabularies that
# are multiples of 16 (32000, 128256, 151936, ...).
# --------------------------------------------------------------------------------------


def _fwd_spec(dt: str, has_softcap: bool) -> AotSpec:
    sig = {
        "x_ptr": f"*{dt}",
        "y_ptr": "*i64",
        "loss_ptr": "*fp32",
        "lse_ptr": "*fp32",
        "T_inner": "i32",
        "stride_xo": "i32:16",
        "stride_xi": "i32:16",
        "V": "i32",
        "ignore_index": "i32",
        "inv_temperature": "fp32",
        "softcap": "fp32",
        "label_smoothing": "fp32",
        "z_loss": "fp32",
        "HAS_SOFTCAP": "constexpr",
        "BV": "constexpr",
    }
    cap = " softcap" if has_softcap else ""
    return AotSpec(
        name="_cross_entropy_fwd_kernel",
        kernel=_cross_entropy_fwd_kernel,
        signature=sig,
        constexprs={"HAS_SOFTCAP": has_softcap, "BV": FWD_BV},
        num_warps=FWD_WARPS,
        num_stages=FWD_STAGES,
        label=f"{dt} BV={FWD_BV} w{FWD_WARPS}{cap}",
    )


def _bwd_spec(dt: str, has_softcap: bool) -> AotSpec:
    sig = {
        "x_ptr": f"*{dt}",
        "dx_ptr": f"*{dt}",
        "y_ptr": "*i64",
        "lse_ptr": "*fp32",
        "g_ptr": "*fp32",
        "T_inner": "i32",
        "stride_xo": "i32:16",
        "stride_xi": "i32:16",
        "stride_dxo": "i32:16",
        "stride_dxi": "i32:16",
        "stride_g": "i32",
        "V": "i32",
        "ignore_index": "i32",
        "inv_temperature": "fp32",
        "softcap": "fp32",
        "label_smoothing": "fp32",
        "z_loss": "fp32",
        "HAS_SOFTCAP": "constexpr",
        "BV": "constexpr",
    }
    cap = " softcap" if has_softcap else ""
    return AotSpec(
        name="_cross_entropy_bwd_kernel",
        kernel=_cross_entropy_bwd_kernel,
        signature=sig,
        constexprs={"HAS_SOFTCAP": has_softcap, "BV": BWD_BV},
        num_warps=BWD_WARPS,
        num_stages=BWD_STAGES,
        label=f"{dt} BV={BWD_BV} w{BWD_WARPS}{cap}",
    )


AOT_SPECS: list[AotSpec] = [
    _fwd_spec("bf16", False),
    _fwd_spec("fp32", False),
    _fwd_spec("bf16", True),
    _bwd_spec("bf16", False),
    _bwd_spec("fp32", False),
    _bwd_spec("bf16", True),
]
