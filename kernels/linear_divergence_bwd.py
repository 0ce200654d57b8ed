"""Backward kernel of the fused two-head divergences; the math, the passes and the tiling are in
the docstring of ``kernels/linear_divergence.py``, which holds the launchers.

`_linear_divergence_bwd_kernel`: grid (token blocks, vocab blocks) of one vocabulary chunk;
recomputes both heads' logits tiles, forms the raw-logit gradient of the student ``dr_p`` (and
of the teacher ``dr_q`` on request) and stores them in each head's matmul dtype into the
launcher's workspaces (the GEMMs follow in the launcher), plus fp32 column sums for the
biases. No atomics: every element is written once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import flags_from_none, for_store, transform_grad
from .linear_divergence_fwd import _div_grad_terms, _two_tiles


@flags_from_none(
    HAS_BIAS_P="p_bp",
    HAS_BIAS_Q="p_bq",
    HAS_SOFTCAP_P="softcap_p",
    HAS_SOFTCAP_Q="softcap_q",
    HAS_DRP="p_drp",
    HAS_DBP="p_dbp",
    HAS_DRQ="p_drq",
    HAS_DBQ="p_dbq",
    HAS_GDIV="p_gdiv",
    HAS_GENT="p_gent",
)
@triton.jit(do_not_specialize=["n_count", "v_lo", "v_count"])
def _linear_divergence_bwd_kernel(
    p_hp,
    p_wp,
    p_bp,
    p_hq,
    p_wq,
    p_bq,
    p_valid,
    p_lsep,
    p_lseq,
    p_ent,
    p_cp,
    p_cq,
    p_gdiv,
    p_gent,
    p_drp,
    p_dbp,
    p_drq,
    p_dbq,
    n_count,
    v_lo,
    v_count,
    HP,
    HQ,
    stride_hpn,
    stride_wpv,
    stride_hqn,
    stride_wqv,
    stride_dr,
    stride_db,
    scale_p,
    softcap_p,
    inv_temp_p,
    scale_q,
    softcap_q,
    inv_temp_q,
    param,
    KIND: tl.constexpr,
    HAS_BIAS_P: tl.constexpr,
    HAS_BIAS_Q: tl.constexpr,
    HAS_SOFTCAP_P: tl.constexpr,
    HAS_SOFTCAP_Q: tl.constexpr,
    HAS_DRP: tl.constexpr,
    HAS_DBP: tl.constexpr,
    HAS_DRQ: tl.constexpr,
    HAS_DBQ: tl.constexpr,
    HAS_GDIV: tl.constexpr,
    HAS_GENT: tl.constexpr,
    CAST_HP: tl.constexpr,
    CAST_WP: tl.constexpr,
    CAST_HQ: tl.constexpr,
    CAST_WQ: tl.constexpr,
    INTERP_BF16_P: tl.constexpr,
    INTERP_BF16_Q: tl.constexpr,
    INPUT_PRECISION_P: tl.constexpr,
    INPUT_PRECISION_Q: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
):
    """One [BN, BV] tile of the chunk (rows ``[0, n_count)``, vocab rows ``v_lo + [0, v_count)``)::

        dz_p = g_div (p dphi/dp - p c_p) - g_ent p (log p + ent_p)
        dz_q = g_div (q dphi/dq - q c_q)

    then ``dr = dz dz/dr`` per head into ``p_drp`` / ``p_drq`` [n_count, v_count] (each head's
    matmul dtype, row stride ``stride_dr``) and their column sums into ``p_dbp`` / ``p_dbq``
    [token blocks, v_count] fp32 (row stride ``stride_db``). ``p_cp``, ``p_cq`` [N] are the row
    sums ``c_p``, ``c_q`` (the launcher's coefficients)."""
    # program ids multiply row lengths (N * V, V * H can pass 2**31): int64 from here on
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    o_c = i_v * BV + tl.arange(0, BV)  # vocab row within the chunk
    m_n = o_n < n_count
    m_c = o_c < v_count
    o_v = v_lo + o_c
    m_valid = m_n & (tl.load(p_valid + o_n, mask=m_n, other=0) != 0)
    d_stop_p = tl.where(tl.sum(m_valid.to(tl.int32)) > 0, HP, 0)  # all invalid: dr = 0, no matmul
    d_stop_q = tl.where(d_stop_p > 0, HQ, 0)

    src_p = (p_hp, p_wp, p_bp, HP, stride_hpn, stride_wpv, d_stop_p)
    src_q = (p_hq, p_wq, p_bq, HQ, stride_hqn, stride_wqv, d_stop_q)
    tf_p = (scale_p, softcap_p, inv_temp_p)
    tf_q = (scale_q, softcap_q, inv_temp_q)
    b_zp, b_thp, b_zq, b_thq = _two_tiles(
        src_p,
        tf_p,
        src_q,
        tf_q,
        (o_n, m_n),
        (o_v, m_c),
        (HAS_BIAS_P, HAS_SOFTCAP_P, CAST_HP, CAST_WP, INTERP_BF16_P, INPUT_PRECISION_P),
        (HAS_BIAS_Q, HAS_SOFTCAP_Q, CAST_HQ, CAST_WQ, INTERP_BF16_Q, INPUT_PRECISION_Q),
        BD,
        FROM_LOGITS,
    )
    m_tile = m_valid[:, None] & m_c[None, :]
    b_lp = tl.where(m_tile, b_zp - tl.load(p_lsep + o_n, mask=m_valid, other=0.0)[:, None], 0.0)
    b_lq = tl.where(m_tile, b_zq - tl.load(p_lseq + o_n, mask=m_valid, other=0.0)[:, None], 0.0)
    b_p = tl.exp(b_lp)
    b_dzp = tl.zeros_like(b_lp)
    b_dzq = tl.zeros_like(b_lp)
    if HAS_GDIV:
        b_g = tl.load(p_gdiv + o_n, mask=m_valid, other=0.0)[:, None]
        b_gp, b_gq = _div_grad_terms(b_lp, b_lq, param, KIND)
        b_cp = tl.load(p_cp + o_n, mask=m_valid, other=0.0)[:, None]
        # a row whose divergence is infinite gets g_div = 0 from the launcher and no gradient
        # (its terms may be inf / NaN): 0, never 0 * inf
        m_g = b_g != 0.0
        b_dzp += tl.where(m_g, b_g * (b_gp - b_p * b_cp), 0.0)
        if HAS_DRQ:
            b_cq = tl.load(p_cq + o_n, mask=m_valid, other=0.0)[:, None]
            b_dzq += tl.where(m_g, b_g * (b_gq - tl.exp(b_lq) * b_cq), 0.0)
    if HAS_GENT:
        b_ge = tl.load(p_gent + o_n, mask=m_valid, other=0.0)[:, None]
        b_ent = tl.load(p_ent + o_n, mask=m_valid, other=0.0)[:, None]
        b_dzp -= b_ge * b_p * (b_lp + b_ent)
    b_dzp = tl.where(m_tile, b_dzp, 0.0)
    b_drp = transform_grad(b_dzp, b_thp, scale_p, inv_temp_p, HAS_SOFTCAP_P)

    m_out = m_n[:, None] & m_c[None, :]
    o_out = o_n[:, None] * stride_dr + o_c[None, :]
    if HAS_DRP:
        tl.store(p_drp + o_out, for_store(b_drp, p_drp, INTERP_BF16_P), mask=m_out)
        if HAS_DBP:
            tl.store(p_dbp + i_n * stride_db + o_c, tl.sum(b_drp, axis=0), mask=m_c)
    if HAS_DRQ:
        b_dzq = tl.where(m_tile, b_dzq, 0.0)
        b_drq = transform_grad(b_dzq, b_thq, scale_q, inv_temp_q, HAS_SOFTCAP_Q)
        tl.store(p_drq + o_out, for_store(b_drq, p_drq, INTERP_BF16_Q), mask=m_out)
        if HAS_DBQ:
            tl.store(p_dbq + i_n * stride_db + o_c, tl.sum(b_drq, axis=0), mask=m_c)
