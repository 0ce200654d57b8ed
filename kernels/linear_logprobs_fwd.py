"""Forward kernels of the fused linear log-probs; the math, the tiling and the naming grammar
are in the docstring of ``kernels/linear_logprobs.py``, which holds the launchers.

* `_logits_tile`: one ``[BN, BV]`` tile of transformed logits, ``tl.dot`` over ``H`` in ``BD``
  chunks with an fp32 accumulator (shared with the backward).
* `_linear_logprobs_fwd_kernel`: grid (token blocks, vocab splits); online max / sum-exp /
  ``t`` / target logit / sum of logits over the split's vocab blocks -> fp32 partials.
* `_linear_logprobs_combine_kernel`: grid (row blocks); merges the partials of all splits in
  split order (deterministic) into logp, lse, entropy, zmean.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import (
    NEG_BIG,
    dot_operands,
    flags_from_none,
    merge_partials,
    online_update,
    store_stats,
    topk_init,
    topk_merge,
    topk_store,
    transform,
)

# Planes of the forward partials [6, splits, N] fp32: max, sum-exp, t, sum-exp^2, target logit, sum z.
_P_MAX: tl.constexpr = tl.constexpr(0)
_P_SUMEXP: tl.constexpr = tl.constexpr(1)
_P_T: tl.constexpr = tl.constexpr(2)
_P_S2: tl.constexpr = tl.constexpr(3)
_P_ZY: tl.constexpr = tl.constexpr(4)
_P_ZSUM: tl.constexpr = tl.constexpr(5)
N_PLANES = 6


@triton.jit
def _logits_tile(
    src,
    tf,
    rows,
    cols,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    CAST_H: tl.constexpr,
    CAST_W: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BD: tl.constexpr,
):
    """Transformed logits ``z`` [BN, BV] (fp32) of rows ``o_n`` and vocab rows ``o_v``, and
    ``tanh(scale * r / c)`` [BN, BV] for the soft-cap's derivative (``r`` without a soft-cap).

    ``src = (p_h, p_w, p_b, H, stride_hn, stride_wv, d_stop)``, ``tf = (scale, softcap, inv_temp)``,
    ``rows = (o_n, m_n)``, ``cols = (o_v, m_v)``, as the kernels name them. ``d_stop`` is ``H``, or
    0 to skip the matmul for a block of ignored rows."""
    p_h, p_w, p_b, H, stride_hn, stride_wv, d_stop = src
    scale, softcap, inv_temp = tf
    o_n, m_n = rows
    o_v, m_v = cols
    b_acc = tl.zeros([o_n.shape[0], o_v.shape[0]], dtype=tl.float32)
    for d0 in range(0, d_stop, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < H
        p_hd = p_h + o_n[:, None] * stride_hn + o_d[None, :]
        b_h = tl.load(p_hd, mask=m_n[:, None] & m_d[None, :], other=0.0)
        # W tile loaded transposed, [BD, BV]: no tl.trans needed before the dot
        p_wd = p_w + o_v[None, :] * stride_wv + o_d[:, None]
        b_w = tl.load(p_wd, mask=m_d[:, None] & m_v[None, :], other=0.0)
        b_h, b_w = dot_operands(b_h, b_w, CAST_H, CAST_W, INTERP_BF16)
        # [BN, BD] @ [BD, BV] -> [BN, BV], fp32 accumulator
        b_acc = tl.dot(b_h, b_w, b_acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        b_acc += tl.load(p_b + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    return transform(b_acc, scale, softcap, inv_temp, HAS_SOFTCAP)


@flags_from_none(HAS_BIAS="p_b", HAS_SOFTCAP="softcap")
@triton.jit(do_not_specialize=["N", "blocks_per_split"])
def _linear_logprobs_fwd_kernel(
    p_h,
    p_w,
    p_b,
    p_y,
    p_part,
    p_topv,
    p_topi,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    blocks_per_split,
    ignore_index,
    scale,
    softcap,
    inv_temp,
    NEED_ENT: tl.constexpr,
    NEED_ZMEAN: tl.constexpr,
    NEED_S2: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    CAST_H: tl.constexpr,
    CAST_W: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
):
    """One (token block, vocab split): partial (max, sum-exp, t, sum-exp^2, z_y, sum z) per row into
    ``p_part`` [6, splits, N] fp32, and with ``K > 0`` the split's running top-k (``KP`` slots,
    unsorted) into ``p_topv`` [splits, N, KP] fp32 / ``p_topi`` int32."""
    # program ids multiply row lengths (N * V, V * H can pass 2**31): int64 from here on
    i_n = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(1).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    b_y = tl.load(p_y + o_n, mask=m_n, other=ignore_index)
    m_valid = m_n & (b_y != ignore_index)
    d_stop = tl.where(tl.sum(m_valid.to(tl.int32)) > 0, H, 0)

    v_lo = i_s * blocks_per_split * BV
    v_hi = tl.minimum(v_lo + blocks_per_split * BV, V)
    v_stop = tl.where(d_stop > 0, v_hi, v_lo)  # all rows ignored: no vocab block at all

    zero = tl.zeros([BN], dtype=tl.float32)
    acc = (zero + NEG_BIG, zero, zero, zero)  # (m, s, t, s2)
    b_zy = zero
    b_zsum = zero
    b_tv, b_ti = topk_init(BN, KP, K)
    src = (p_h, p_w, p_b, H, stride_hn, stride_wv, d_stop)
    tf = (scale, softcap, inv_temp)
    rows = (o_n, m_n)
    for v0 in range(v_lo, v_stop, BV):
        # int64 again: the interpreter's loop variable is a plain int (o_v * stride_wv > 2**31)
        o_v = (v0 + tl.arange(0, BV)).to(tl.int64)
        m_v = o_v < v_hi
        cols = (o_v, m_v)
        b_z, _ = _logits_tile(
            src, tf, rows, cols, HAS_BIAS, HAS_SOFTCAP, CAST_H, CAST_W, INTERP_BF16, INPUT_PRECISION, BD
        )
        acc = online_update(acc, b_z, m_v[None, :], NEED_ENT, NEED_S2)
        b_zy += tl.sum(tl.where(o_v[None, :] == b_y[:, None], b_z, 0.0), axis=1)
        if NEED_ZMEAN:
            b_zsum += tl.sum(tl.where(m_v[None, :], b_z, 0.0), axis=1)
        if K > 0:
            b_cv = tl.where(m_v[None, :], b_z, float("-inf"))
            b_tv, b_ti = topk_merge(b_tv, b_ti, b_cv, o_v.to(tl.int32)[None, :])

    o_p = i_s * N + o_n
    plane = n_splits * N
    tl.store(p_part + _P_MAX * plane + o_p, acc[0], mask=m_n)
    tl.store(p_part + _P_SUMEXP * plane + o_p, acc[1], mask=m_n)
    tl.store(p_part + _P_ZY * plane + o_p, b_zy, mask=m_n)
    if NEED_ENT:
        tl.store(p_part + _P_T * plane + o_p, acc[2], mask=m_n)
    if NEED_S2:
        tl.store(p_part + _P_S2 * plane + o_p, acc[3], mask=m_n)
    if NEED_ZMEAN:
        tl.store(p_part + _P_ZSUM * plane + o_p, b_zsum, mask=m_n)
    if K > 0:
        o_t = o_p[:, None] * KP + tl.arange(0, KP)[None, :]
        tl.store(p_topv + o_t, b_tv, mask=m_n[:, None])
        tl.store(p_topi + o_t, b_ti, mask=m_n[:, None])


@flags_from_none(HAS_ENT="p_ent", HAS_ZMEAN="p_zmean", HAS_S2="p_lsp2")
@triton.jit(do_not_specialize=["N", "n_splits"])
def _linear_logprobs_combine_kernel(
    p_part,
    p_topv,
    p_topi,
    p_y,
    p_logp,
    p_lse,
    p_ent,
    p_zmean,
    p_lsp2,
    p_tkid,
    p_tklp,
    N,
    V,
    n_splits,
    ignore_index,
    HAS_ENT: tl.constexpr,
    HAS_ZMEAN: tl.constexpr,
    HAS_S2: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    BN: tl.constexpr,
):
    """Merge the ``n_splits`` partials of ``BN`` rows (in split order, so deterministic) and write
    logp, lse (and entropy, zmean, log sum p^2) [N] fp32 and the sorted top-k ``p_tkid`` [N, K]
    int64 / ``p_tklp`` [N, K] fp32; exact zeros (ids -1) at ignored rows."""
    # row indices times split counts can pass 2**31 with the plane offsets: int64
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    b_y = tl.load(p_y + o_n, mask=m_n, other=ignore_index)
    m_valid = m_n & (b_y != ignore_index)
    n_64 = N.to(tl.int64)  # k * N below must not wrap (the loop variable is int32)
    plane = n_splits * n_64

    zero = tl.zeros([BN], dtype=tl.float32)
    acc = (zero + NEG_BIG, zero, zero, zero)
    b_zy = zero
    b_zsum = zero
    b_tv, b_ti = topk_init(BN, KP, K)
    o_k = tl.arange(0, KP)
    for k in range(0, n_splits):
        o_p = k * n_64 + o_n
        b_tk = zero
        b_s2k = zero
        if HAS_ENT:
            b_tk = tl.load(p_part + _P_T * plane + o_p, mask=m_n, other=0.0)
        if HAS_S2:
            b_s2k = tl.load(p_part + _P_S2 * plane + o_p, mask=m_n, other=0.0)
        b_mk = tl.load(p_part + _P_MAX * plane + o_p, mask=m_n, other=NEG_BIG)
        b_sk = tl.load(p_part + _P_SUMEXP * plane + o_p, mask=m_n, other=0.0)
        acc = merge_partials(acc, (b_mk, b_sk, b_tk, b_s2k), HAS_ENT, HAS_S2)
        b_zy += tl.load(p_part + _P_ZY * plane + o_p, mask=m_n, other=0.0)
        if HAS_ZMEAN:
            b_zsum += tl.load(p_part + _P_ZSUM * plane + o_p, mask=m_n, other=0.0)
        if K > 0:
            o_t = o_p[:, None] * KP + o_k[None, :]
            m_t = m_n[:, None] & (o_k < K)[None, :]
            b_cv = tl.load(p_topv + o_t, mask=m_t, other=float("-inf"))
            b_ci = tl.load(p_topi + o_t, mask=m_t, other=-1)
            b_tv, b_ti = topk_merge(b_tv, b_ti, b_cv, b_ci)

    p_out = (p_logp, p_lse, p_ent, p_zmean, p_lsp2)
    b_lse = store_stats(acc, b_zy, b_zsum, m_valid, o_n, m_n, V, p_out, HAS_ENT, HAS_ZMEAN, HAS_S2)
    if K > 0:
        topk_store(b_tv, b_ti, b_lse, m_valid, o_n, m_n, p_tkid, p_tklp, K)
