"""Backward kernel of the fused linear log-probs; the math, the tiling and the naming grammar
are in the docstring of ``kernels/linear_logprobs.py``, which holds the launchers.

`_linear_logprobs_bwd_kernel`: a 1-D grid over the (token block, vocab block) tiles of one
vocabulary chunk in grouped order (``GROUP_N`` token blocks at a time);
recomputes the logits tile, forms the raw-logit gradient ``dr`` and stores it in the
workspace's dtype (the matmul dtype; fp32 for fp16) into the launcher's workspace (the GEMMs
``dr @ W`` and ``dr.T @ h`` follow in the launcher), plus fp32 column sums of ``dr`` for the
bias gradient. No atomics: every element is written once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import flags_from_none, for_store, logit_grad, transform_grad
from .linear_logprobs_fwd import _logits_tile


@flags_from_none(HAS_BIAS="p_b", HAS_SOFTCAP="softcap", HAS_DB="p_db", HAS_FILTER="p_live")
@triton.jit(do_not_specialize=["n_count", "v_lo", "v_count"])
def _linear_logprobs_bwd_kernel(
    p_h,
    p_w,
    p_b,
    p_y,
    p_lse,
    p_ent,
    p_lsp2,
    p_glogp,
    p_glse,
    p_gent,
    p_gzmean,
    p_glsp2,
    p_dr,
    p_db,
    p_live,
    n_count,
    v_lo,
    v_count,
    V,
    H,
    stride_hn,
    stride_wv,
    stride_dr,
    stride_db,
    stride_live,
    log_eps,
    ignore_index,
    scale,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_FILTER: tl.constexpr,
    CAST_H: tl.constexpr,
    CAST_W: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """One [BN, BV] tile of the chunk (rows ``[0, n_count)``, vocab rows ``v_lo + [0, v_count)``):
    the raw-logit gradient ``dr`` into ``p_dr`` [n_count, v_count] (workspace dtype, row stride
    ``stride_dr``) and its column sums into ``p_db`` [token blocks, v_count] fp32 (row stride
    ``stride_db``). With ``p_live`` [token blocks, vocab blocks] int8 (row stride ``stride_live``):
    gradient filtering at ``p >= exp(log_eps)``; a dead tile writes only its flag 0 and zero
    column sums (its ``dr`` entries stay unwritten: the products never read them)."""
    # grouped tile order (L2-friendly): a 1-D grid walks GROUP_N token blocks x all vocab blocks
    # of the chunk before the next group, so a wave of programs shares a few h blocks and the
    # W blocks it streams, instead of streaming all of h once per vocabulary block
    # program ids multiply row lengths (N * V, V * H can pass 2**31): int64 from here on
    pid = tl.program_id(0).to(tl.int64)
    n_tb = tl.cdiv(n_count, BN)
    n_vb = tl.cdiv(v_count, BV)
    per_group = GROUP_N * n_vb
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_tb - first_n, GROUP_N)
    i_n = first_n + (pid % per_group) % group_size
    i_v = (pid % per_group) // group_size
    o_n = i_n * BN + tl.arange(0, BN)
    o_c = i_v * BV + tl.arange(0, BV)  # vocab row within the chunk
    m_n = o_n < n_count
    m_c = o_c < v_count
    o_v = v_lo + o_c
    b_y = tl.load(p_y + o_n, mask=m_n, other=ignore_index)
    m_valid = m_n & (b_y != ignore_index)
    d_stop = tl.where(tl.sum(m_valid.to(tl.int32)) > 0, H, 0)  # all ignored: dr = 0, no matmul

    src = (p_h, p_w, p_b, H, stride_hn, stride_wv, d_stop)
    tf = (scale, softcap, inv_temp)
    rows, cols = (o_n, m_n), (o_v, m_c)
    b_z, b_th = _logits_tile(
        src, tf, rows, cols, HAS_BIAS, HAS_SOFTCAP, CAST_H, CAST_W, INTERP_BF16, INPUT_PRECISION, BD
    )
    m_tile = m_valid[:, None] & m_c[None, :]
    m_hit = o_v[None, :] == b_y[:, None]
    stats, grads = (p_lse, p_ent, p_lsp2), (p_glogp, p_glse, p_gent, p_gzmean, p_glsp2)
    b_dz = logit_grad(b_z, m_tile, m_hit, o_n, m_valid, stats, grads, V)
    b_dr = transform_grad(b_dz, b_th, scale, inv_temp, HAS_SOFTCAP)

    m_out = m_n[:, None] & m_c[None, :]
    if HAS_FILTER:
        # gradient filtering: the tile is live when one of its p = exp(z - lse) reaches the
        # threshold (log p >= log_eps, no extra exp) or it holds a valid row's target; a dead
        # tile stores nothing and its flag 0 makes the block-sparse products skip it (and db).
        b_lse = tl.load(p_lse + o_n, mask=m_valid, other=0.0)
        b_lp = tl.where(m_tile, b_z - b_lse[:, None], float("-inf"))
        # (log_eps = -inf: only the tiles with no valid row are dead, as all-ignored blocks are)
        n_in = tl.sum(m_tile.to(tl.int32))
        b_top = tl.max(tl.max(b_lp, axis=1), axis=0)
        m_live = (n_in > 0) & ((b_top >= log_eps) | (tl.sum((m_hit & m_tile).to(tl.int32)) > 0))
        if p_gzmean is not None:  # the uniform term g_zmean / V is in every entry: never filtered
            m_live = n_in > 0
        tl.store(p_live + i_n * stride_live + i_v, m_live.to(tl.int8))
        b_dr = tl.where(m_live, b_dr, 0.0)
        if m_live:
            p_out = p_dr + o_n[:, None] * stride_dr + o_c[None, :]
            tl.store(p_out, for_store(b_dr, p_dr, INTERP_BF16), mask=m_out)
    else:
        p_out = p_dr + o_n[:, None] * stride_dr + o_c[None, :]
        tl.store(p_out, for_store(b_dr, p_dr, INTERP_BF16), mask=m_out)
    if HAS_DB:
        tl.store(p_db + i_n * stride_db + o_c, tl.sum(b_dr, axis=0), mask=m_c)
