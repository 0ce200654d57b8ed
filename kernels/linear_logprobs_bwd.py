"""Backward kernel of the fused linear log-probs (SPEC §1.1); the math, the tiling and the naming
grammar are in the docstring of ``kernels/linear_logprobs.py``, which holds the launchers.

`_linear_logprobs_bwd_kernel`: grid (token blocks, vocab blocks) of one chunk; recomputes the
logits tile, forms the raw-logit gradient ``dr`` and stores it in the input dtype into the
launcher's workspace (the GEMMs ``dr @ W`` and ``dr.T @ h`` follow in the launcher), plus fp32
column sums of ``dr`` for the bias gradient. No atomics: every element is written once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .linear_logprobs_fwd import _logits_tile


@triton.jit
def _to_bf16_rne(x):
    """fp32 -> bf16 rounded to nearest even, by hand: the interpreter truncates a plain cast.
    Only used under the interpreter (``INTERP_BF16``); finite inputs."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["p_b"] is not None,
        "HAS_SOFTCAP": lambda args: args["softcap"] is not None,
        "HAS_G_LOGP": lambda args: args["p_glogp"] is not None,
        "HAS_G_ENT": lambda args: args["p_gent"] is not None,
        "HAS_G_LSE": lambda args: args["p_glse"] is not None,
        "HAS_G_ZMEAN": lambda args: args["p_gzmean"] is not None,
        "HAS_DZ": lambda args: args["p_dz"] is not None,
        "HAS_DB": lambda args: args["p_db"] is not None,
    }
)
@triton.jit(do_not_specialize=["n_lo", "n_count", "v_lo", "v_count"])
def _linear_logprobs_bwd_kernel(
    p_h,
    p_w,
    p_b,
    p_y,
    p_lse,
    p_ent,
    p_glogp,
    p_gent,
    p_glse,
    p_gzmean,
    p_dz,
    p_db,
    n_lo,
    n_count,
    v_lo,
    v_count,
    V,
    H,
    stride_hn,
    stride_wv,
    stride_dz,
    stride_db,
    ignore_index,
    inv_temp,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_G_LOGP: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
    HAS_G_LSE: tl.constexpr,
    HAS_G_ZMEAN: tl.constexpr,
    HAS_DZ: tl.constexpr,
    HAS_DB: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
):
    """One [BN, BV] tile of the chunk (rows ``n_lo + [0, n_count)``, vocab rows
    ``v_lo + [0, v_count)``): the raw-logit gradient ``dr`` into ``p_dz`` [n_count, v_count]
    (input dtype, row stride ``stride_dz``) and its column sums into ``p_db``
    [token blocks, v_count] fp32 (row stride ``stride_db``)."""
    # program ids multiply row lengths (N * V, V * H can pass 2**31): int64 from here on
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1).to(tl.int64)
    o_r = i_n * BN + tl.arange(0, BN)  # row within the chunk
    o_c = i_v * BV + tl.arange(0, BV)  # vocab row within the chunk
    m_r = o_r < n_count
    m_c = o_c < v_count
    o_n = n_lo + o_r
    o_v = v_lo + o_c
    b_y = tl.load(p_y + o_n, mask=m_r, other=ignore_index)
    m_valid = m_r & (b_y != ignore_index)
    d_stop = tl.where(tl.sum(m_valid.to(tl.int32)) > 0, H, 0)  # all ignored: dr = 0, no matmul

    b_z, b_th = _logits_tile(
        p_h,
        p_w,
        p_b,
        o_n,
        m_r,
        o_v,
        m_c,
        d_stop,
        H,
        stride_hn,
        stride_wv,
        inv_temp,
        softcap,
        HAS_BIAS,
        HAS_SOFTCAP,
        INTERP_BF16,
        INPUT_PRECISION,
        BN,
        BV,
        BD,
    )
    m_tile = m_valid[:, None] & m_c[None, :]
    b_lse = tl.load(p_lse + o_n, mask=m_valid, other=0.0)
    b_p = tl.exp(tl.where(m_tile, b_z - b_lse[:, None], float("-inf")))  # 0 off the tile / ignored

    b_coef = tl.zeros([BN], dtype=tl.float32)
    if HAS_G_LOGP:
        b_glogp = tl.load(p_glogp + o_n, mask=m_valid, other=0.0)
        b_coef -= b_glogp
    if HAS_G_LSE:
        b_coef += tl.load(p_glse + o_n, mask=m_valid, other=0.0)
    b_dz = b_p * b_coef[:, None]
    if HAS_G_ENT:
        b_ez = b_lse - tl.load(p_ent + o_n, mask=m_valid, other=0.0)  # E_p z = lse - ent
        b_gent = tl.load(p_gent + o_n, mask=m_valid, other=0.0)
        b_dz -= (b_gent[:, None] * b_p) * (tl.where(m_tile, b_z, 0.0) - b_ez[:, None])
    if HAS_G_LOGP:
        b_dz += tl.where(o_v[None, :] == b_y[:, None], b_glogp[:, None], 0.0)
    if HAS_G_ZMEAN:
        b_dz += tl.load(p_gzmean + o_n, mask=m_valid, other=0.0)[:, None] / V
    b_dz = tl.where(m_tile, b_dz, 0.0) * inv_temp
    if HAS_SOFTCAP:
        b_dz = b_dz * (1.0 - b_th * b_th)

    if HAS_DZ:
        p_out = p_dz + o_r[:, None] * stride_dz + o_c[None, :]
        if INTERP_BF16:
            b_out = _to_bf16_rne(b_dz)
        else:
            b_out = b_dz.to(p_dz.dtype.element_ty)
        tl.store(p_out, b_out, mask=m_r[:, None] & m_c[None, :])
    if HAS_DB:
        tl.store(p_db + i_n * stride_db + o_c, tl.sum(b_dz, axis=0), mask=m_c)
