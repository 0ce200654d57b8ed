"""Forward kernels of the fused two-head divergences; the math, the passes and the tiling are in
the docstring of ``kernels/linear_divergence.py``, which holds the launchers.

* `_two_tiles`: the ``[BN, BV]`` transformed logits of both heads (two ``tl.dot`` loops).
* `_div_terms` / `_div_grad_terms`: the per-element divergence term and its two
  ``p dphi/dp``, ``q dphi/dq`` terms of every kind, from both log-probabilities.
* `_linear_divergence_stats_kernel` (pass 1): grid (token blocks, vocab splits); online
  log-sum-exp of both heads, the student's entropy term and the KL accumulator -> partials.
* `_linear_divergence_combine_kernel`: merges the partials of all splits in split order
  (deterministic) into lse_p, lse_q, entropy_p and, for the two KLs, the divergence.
* `_linear_divergence_sum_kernel` (pass 2, and the backward's coefficient pass): grid (token
  blocks, vocab splits); with both normalizers known, the per-row sum of one elementwise term.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import NEG_BIG, flags_from_none, merge_partials, online_update, transform
from .linear_logprobs_fwd import _logits_tile

# Kind codes (constexpr KIND); the launcher maps DivergenceOptions onto them.
FKL: tl.constexpr = tl.constexpr(0)  # KL(q || p)
RKL: tl.constexpr = tl.constexpr(1)  # KL(p || q)
JSD: tl.constexpr = tl.constexpr(2)  # generalized JSD, param = beta in (0, 1)
TV: tl.constexpr = tl.constexpr(3)  # total variation
ALPHA: tl.constexpr = tl.constexpr(4)  # Amari alpha, param = alpha not in {0, 1}
HELLINGER: tl.constexpr = tl.constexpr(5)  # sum (sqrt p - sqrt q)^2
CHI2: tl.constexpr = tl.constexpr(6)  # Pearson chi^2, sum (p - q)^2 / q

# Planes of the pass-1 partials [6, splits, N] fp32.
_P_MP: tl.constexpr = tl.constexpr(0)  # running max of z_p
_P_SP: tl.constexpr = tl.constexpr(1)  # sum exp(z_p - m_p)
_P_TP: tl.constexpr = tl.constexpr(2)  # sum exp(z_p - m_p) (z_p - m_p)  (entropy)
_P_MQ: tl.constexpr = tl.constexpr(3)
_P_SQ: tl.constexpr = tl.constexpr(4)
_P_W: tl.constexpr = tl.constexpr(5)  # KL accumulator (see _kl_rescale)
_P_BAD: tl.constexpr = tl.constexpr(6)  # 1 where the divergence is infinite (see ZERO_SIDE)
N_PLANES = 7

# A -inf transformed logit (a -inf bias entry, no soft-cap) is floored here after the infinite
# rows are flagged, so that every term stays finite: exp(FLOOR - lse) is exactly 0 in fp32.
FLOOR: tl.constexpr = tl.constexpr(-1.0e30)


@triton.jit
def _two_tiles(
    src_p,
    tf_p,
    src_q,
    tf_q,
    rows,
    cols,
    FLAGS_P,
    FLAGS_Q,
    BD: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
):
    """Transformed logits of both heads, ``(z_p, th_p, z_q, th_q)`` each ``[BN, BV]`` fp32
    (``kernels/linear_logprobs_fwd.py::_logits_tile`` once per head, each with its own flags).
    ``FROM_LOGITS``: the raw logits are read from ``src[0]`` ``[N, V]`` (row stride ``src[4]``)
    instead of computed. ``FLAGS_*``: one head's ``(HAS_BIAS, HAS_SOFTCAP, CAST_H, CAST_W,
    INTERP_BF16, INPUT_PRECISION)`` constexprs."""
    if FROM_LOGITS:
        b_zp, b_thp = _read_tile(src_p, tf_p, rows, cols, FLAGS_P[1])
        b_zq, b_thq = _read_tile(src_q, tf_q, rows, cols, FLAGS_Q[1])
    else:
        b_zp, b_thp = _head_tile(src_p, tf_p, rows, cols, FLAGS_P, BD)
        b_zq, b_thq = _head_tile(src_q, tf_q, rows, cols, FLAGS_Q, BD)
    # -inf logits floored (module docstring of kernels/linear_divergence.py); a soft-capped
    # logit is finite anyway
    if not FLAGS_P[1]:
        b_zp = tl.maximum(b_zp, FLOOR)
    if not FLAGS_Q[1]:
        b_zq = tl.maximum(b_zq, FLOOR)
    return b_zp, b_thp, b_zq, b_thq


@triton.jit
def _read_tile(src, tf, rows, cols, HAS_SOFTCAP: tl.constexpr):
    """One head's transformed logits tile read from the caller's logits ``[N, V]``."""
    p_x = src[0]
    stride_xn = src[4]
    o_n, m_n = rows
    o_v, m_v = cols
    b_r = tl.load(p_x + o_n[:, None] * stride_xn + o_v[None, :], mask=m_n[:, None] & m_v[None, :], other=0.0)
    return transform(b_r.to(tl.float32), tf[0], tf[1], tf[2], HAS_SOFTCAP)


@triton.jit
def _head_tile(src, tf, rows, cols, FLAGS, BD: tl.constexpr):
    """One head's transformed logits tile (``_logits_tile`` with the head's ``FLAGS`` tuple)."""
    return _logits_tile(src, tf, rows, cols, FLAGS[0], FLAGS[1], FLAGS[2], FLAGS[3], FLAGS[4], FLAGS[5], BD)


@triton.jit
def _kl_rescale(b_w, b_sw, b_mw, b_mw_new, b_mo, b_mo_new):
    """The KL accumulator ``w = sum e_w ((z_w - m_w) - (z_o - m_o))`` (``e_w = exp(z_w - m_w)``,
    ``w`` the weighting head, ``o`` the other) re-expressed for new maxes ``m_w'``, ``m_o'``:
    ``w' = a (w + ((m_w - m_w') - (m_o - m_o')) s_w)``, ``a = exp(m_w - m_w')``."""
    b_dw = b_mw - b_mw_new
    return tl.exp(b_dw) * (b_w + (b_dw - (b_mo - b_mo_new)) * b_sw)


@triton.jit
def _kl_tile(b_zw, b_zo, b_mw, b_mo, m_col):
    """``sum_v e_w ((z_w - m_w) - (z_o - m_o))`` of one tile at the current maxes (0 off the tile)."""
    b_zc = tl.where(m_col, b_zw - b_mw[:, None], float("-inf"))
    b_e = tl.exp(b_zc)
    b_d = tl.where(b_e > 0.0, b_zc - (b_zo - b_mo[:, None]), 0.0)
    return tl.sum(b_e * b_d, axis=1)


@triton.jit
def _flag_zeros(b_z0, b_z1, m_col):
    """Per row, 1 where some column has ``z0`` floored (zero probability) and ``z1`` not."""
    m_hit = m_col & (b_z0 <= FLOOR) & (b_z1 > FLOOR)
    return tl.max(m_hit.to(tl.int32), axis=1)


@triton.jit
def _log_mix(b_lp, b_lq, beta):
    """``log m``, ``m = (1 - beta) p + beta q`` (a two-term log-sum-exp)."""
    b_a = b_lp + tl.log(1.0 - beta)
    b_b = b_lq + tl.log(beta)
    b_mx = tl.maximum(b_a, b_b)
    return b_mx + tl.log(tl.exp(b_a - b_mx) + tl.exp(b_b - b_mx))


@triton.jit
def _div_terms(b_lp, b_lq, param, KIND: tl.constexpr):
    """The elementwise term ``phi(p, q)`` whose row sum is the divergence (every term >= 0 up to
    rounding, so the row sum does not cancel), from ``lp = log p``, ``lq = log q``."""
    b_p = tl.exp(b_lp)
    b_q = tl.exp(b_lq)
    if KIND == FKL:
        b_t = b_q * (b_lq - b_lp)
    elif KIND == RKL:
        b_t = b_p * (b_lp - b_lq)
    elif KIND == JSD:
        b_lm = _log_mix(b_lp, b_lq, param)
        b_t = param * b_q * (b_lq - b_lm) + (1.0 - param) * b_p * (b_lp - b_lm)
    elif KIND == TV:
        b_t = 0.5 * tl.abs(b_p - b_q)
    elif KIND == ALPHA:
        b_g = tl.exp(param * b_lp + (1.0 - param) * b_lq)  # p^alpha q^(1 - alpha)
        b_t = (param * b_p + (1.0 - param) * b_q - b_g) / (param * (1.0 - param))
    elif KIND == HELLINGER:
        b_d = tl.exp(0.5 * b_lp) - tl.exp(0.5 * b_lq)
        b_t = b_d * b_d
    else:  # CHI2: q (p / q - 1)^2, finite where q underflows
        b_r = tl.exp(b_lp - b_lq) - 1.0
        b_t = b_q * b_r * b_r
    return b_t


@triton.jit
def _div_grad_terms(b_lp, b_lq, param, KIND: tl.constexpr):
    """``(p dphi/dp, q dphi/dq)``: the logit gradients are ``dz_p = p dphi/dp - p c_p`` and
    ``dz_q = q dphi/dq - q c_q`` with ``c_p``, ``c_q`` their row sums."""
    b_p = tl.exp(b_lp)
    b_q = tl.exp(b_lq)
    if KIND == FKL:
        b_gp = -b_q
        b_gq = b_q * (b_lq - b_lp + 1.0)
    elif KIND == RKL:
        b_gp = b_p * (b_lp - b_lq + 1.0)
        b_gq = -b_p
    elif KIND == JSD:
        b_lm = _log_mix(b_lp, b_lq, param)
        b_gp = (1.0 - param) * b_p * (b_lp - b_lm)
        b_gq = param * b_q * (b_lq - b_lm)
    elif KIND == TV:
        b_sg = tl.where(b_lp > b_lq, 0.5, tl.where(b_lp < b_lq, -0.5, 0.0))
        b_gp = b_sg * b_p
        b_gq = -b_sg * b_q
    elif KIND == ALPHA:
        b_g = tl.exp(param * b_lp + (1.0 - param) * b_lq)
        b_gp = (b_p - b_g) / (1.0 - param)
        b_gq = (b_q - b_g) / param
    elif KIND == HELLINGER:
        b_g = tl.exp(0.5 * (b_lp + b_lq))
        b_gp = b_p - b_g
        b_gq = b_q - b_g
    else:  # CHI2
        b_r = tl.exp(b_lp - b_lq)
        b_gp = 2.0 * b_p * (b_r - 1.0)
        b_gq = b_q - b_p * b_r
    return b_gp, b_gq


@triton.jit
def _split_block(p_valid, N, V, blocks_per_split, BN: tl.constexpr, BV: tl.constexpr):
    """The rows and vocabulary range of program (token block, vocab split): ``(o_n, m_n, m_valid)``
    [BN] (int64 rows, in range, in range and valid), ``v_lo``, ``v_hi`` (the split's columns) and
    ``v_stop`` (``v_lo`` when every row is invalid: no vocab block at all)."""
    # program ids multiply row lengths (N * V, V * H can pass 2**31): int64 from here on
    i_n = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    m_valid = m_n & (tl.load(p_valid + o_n, mask=m_n, other=0) != 0)
    any_valid = tl.sum(m_valid.to(tl.int32)) > 0
    v_lo = i_s * blocks_per_split * BV
    v_hi = tl.minimum(v_lo + blocks_per_split * BV, V)
    v_stop = tl.where(any_valid, v_hi, v_lo)
    return o_n, m_n, m_valid, v_lo, v_hi, v_stop


@flags_from_none(HAS_BIAS_P="p_bp", HAS_BIAS_Q="p_bq", HAS_SOFTCAP_P="softcap_p", HAS_SOFTCAP_Q="softcap_q")
@triton.jit(do_not_specialize=["N", "blocks_per_split"])
def _linear_divergence_stats_kernel(
    p_hp,
    p_wp,
    p_bp,
    p_hq,
    p_wq,
    p_bq,
    p_valid,
    p_part,
    N,
    V,
    HP,
    HQ,
    stride_hpn,
    stride_wpv,
    stride_hqn,
    stride_wqv,
    blocks_per_split,
    scale_p,
    softcap_p,
    inv_temp_p,
    scale_q,
    softcap_q,
    inv_temp_q,
    NEED_ENT: tl.constexpr,
    KL_MODE: tl.constexpr,
    ZERO_SIDE: tl.constexpr,
    HAS_BIAS_P: tl.constexpr,
    HAS_BIAS_Q: tl.constexpr,
    HAS_SOFTCAP_P: tl.constexpr,
    HAS_SOFTCAP_Q: tl.constexpr,
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
    """Pass 1, one (token block, vocab split): partial ``(m_p, s_p, t_p, m_q, s_q, w)`` per row into
    ``p_part`` [7, splits, N] fp32. ``KL_MODE``: 0 no KL accumulator, 1 weighted by ``q``
    (KL(q||p)), 2 weighted by ``p`` (KL(p||q)). ``ZERO_SIDE``: 1 (2) flags rows where ``p`` (``q``)
    has a zero probability where the other head has mass (an infinite divergence), 0 none."""
    # program ids multiply row lengths (N * V, V * H can pass 2**31): int64 from here on
    i_s = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(1).to(tl.int64)
    o_n, m_n, m_valid, v_lo, v_hi, v_stop = _split_block(p_valid, N, V, blocks_per_split, BN, BV)

    zero = tl.zeros([BN], dtype=tl.float32)
    acc_p = (zero + NEG_BIG, zero, zero, zero)  # (m, s, t, s2) of p
    acc_q = (zero + NEG_BIG, zero, zero, zero)
    b_w = zero
    b_bad = tl.zeros([BN], dtype=tl.int32)
    src_p = (p_hp, p_wp, p_bp, HP, stride_hpn, stride_wpv, HP)
    src_q = (p_hq, p_wq, p_bq, HQ, stride_hqn, stride_wqv, HQ)
    tf_p = (scale_p, softcap_p, inv_temp_p)
    tf_q = (scale_q, softcap_q, inv_temp_q)
    rows = (o_n, m_n)
    for v0 in range(v_lo, v_stop, BV):
        # int64 again: the interpreter's loop variable is a plain int (o_v * stride > 2**31)
        o_v = (v0 + tl.arange(0, BV)).to(tl.int64)
        m_v = o_v < v_hi
        b_zp, _, b_zq, _ = _two_tiles(
            src_p,
            tf_p,
            src_q,
            tf_q,
            rows,
            (o_v, m_v),
            (HAS_BIAS_P, HAS_SOFTCAP_P, CAST_HP, CAST_WP, INTERP_BF16_P, INPUT_PRECISION_P),
            (HAS_BIAS_Q, HAS_SOFTCAP_Q, CAST_HQ, CAST_WQ, INTERP_BF16_Q, INPUT_PRECISION_Q),
            BD,
            FROM_LOGITS,
        )
        b_mp0, b_sp0 = acc_p[0], acc_p[1]
        b_mq0, b_sq0 = acc_q[0], acc_q[1]
        acc_p = online_update(acc_p, b_zp, m_v[None, :], NEED_ENT, False)
        acc_q = online_update(acc_q, b_zq, m_v[None, :], False, False)
        if ZERO_SIDE == 1:  # p has no mass where q has some
            b_bad |= _flag_zeros(b_zp, b_zq, m_v[None, :])
        if ZERO_SIDE == 2:
            b_bad |= _flag_zeros(b_zq, b_zp, m_v[None, :])
        if KL_MODE == 1:
            b_w = _kl_rescale(b_w, b_sq0, b_mq0, acc_q[0], b_mp0, acc_p[0])
            b_w += _kl_tile(b_zq, b_zp, acc_q[0], acc_p[0], m_v[None, :])
        if KL_MODE == 2:
            b_w = _kl_rescale(b_w, b_sp0, b_mp0, acc_p[0], b_mq0, acc_q[0])
            b_w += _kl_tile(b_zp, b_zq, acc_p[0], acc_q[0], m_v[None, :])

    o_p = i_s * N + o_n
    plane = n_splits * N
    tl.store(p_part + _P_MP * plane + o_p, acc_p[0], mask=m_n)
    tl.store(p_part + _P_SP * plane + o_p, acc_p[1], mask=m_n)
    tl.store(p_part + _P_MQ * plane + o_p, acc_q[0], mask=m_n)
    tl.store(p_part + _P_SQ * plane + o_p, acc_q[1], mask=m_n)
    if NEED_ENT:
        tl.store(p_part + _P_TP * plane + o_p, acc_p[2], mask=m_n)
    if KL_MODE != 0:
        tl.store(p_part + _P_W * plane + o_p, b_w, mask=m_n)
    if ZERO_SIDE != 0:
        tl.store(p_part + _P_BAD * plane + o_p, b_bad.to(tl.float32), mask=m_n)


@flags_from_none(HAS_ENT="p_ent", HAS_DIV="p_div", HAS_BAD="p_bad")
@triton.jit(do_not_specialize=["N", "n_splits"])
def _linear_divergence_combine_kernel(
    p_part,
    p_valid,
    p_lsep,
    p_lseq,
    p_ent,
    p_div,
    p_bad,
    N,
    n_splits,
    KL_MODE: tl.constexpr,
    ZERO_SIDE: tl.constexpr,
    HAS_ENT: tl.constexpr,
    HAS_DIV: tl.constexpr,
    HAS_BAD: tl.constexpr,
    BN: tl.constexpr,
):
    """Merge the ``n_splits`` partials of ``BN`` rows in split order (deterministic) and write
    ``lse_p``, ``lse_q`` (and ``entropy_p``; with ``HAS_DIV`` the KL of ``KL_MODE``, +inf at
    flagged rows; with ``HAS_BAD`` the flags as 0 / 1) [N] fp32; exact zeros at invalid rows.
    ``KL = w / s_w - log s_w + log s_o``."""
    # row indices times split counts can pass 2**31 with the plane offsets: int64
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    m_valid = m_n & (tl.load(p_valid + o_n, mask=m_n, other=0) != 0)
    n_64 = N.to(tl.int64)  # k * N below must not wrap (the loop variable is int32)
    plane = n_splits * n_64

    zero = tl.zeros([BN], dtype=tl.float32)
    acc_p = (zero + NEG_BIG, zero, zero, zero)
    acc_q = (zero + NEG_BIG, zero, zero, zero)
    b_w = zero
    b_bad = zero
    for k in range(0, n_splits):
        o_p = k * n_64 + o_n
        b_tk = zero
        if HAS_ENT:
            b_tk = tl.load(p_part + _P_TP * plane + o_p, mask=m_n, other=0.0)
        b_mpk = tl.load(p_part + _P_MP * plane + o_p, mask=m_n, other=NEG_BIG)
        b_spk = tl.load(p_part + _P_SP * plane + o_p, mask=m_n, other=0.0)
        b_mqk = tl.load(p_part + _P_MQ * plane + o_p, mask=m_n, other=NEG_BIG)
        b_sqk = tl.load(p_part + _P_SQ * plane + o_p, mask=m_n, other=0.0)
        b_mp0, b_sp0 = acc_p[0], acc_p[1]
        b_mq0, b_sq0 = acc_q[0], acc_q[1]
        acc_p = merge_partials(acc_p, (b_mpk, b_spk, b_tk, zero), HAS_ENT, False)
        acc_q = merge_partials(acc_q, (b_mqk, b_sqk, zero, zero), False, False)
        if ZERO_SIDE != 0:
            b_bad = tl.maximum(b_bad, tl.load(p_part + _P_BAD * plane + o_p, mask=m_n, other=0.0))
        if KL_MODE != 0:
            b_wk = tl.load(p_part + _P_W * plane + o_p, mask=m_n, other=0.0)
            if KL_MODE == 1:
                b_w = _kl_rescale(b_w, b_sq0, b_mq0, acc_q[0], b_mp0, acc_p[0])
                b_w += _kl_rescale(b_wk, b_sqk, b_mqk, acc_q[0], b_mpk, acc_p[0])
            else:
                b_w = _kl_rescale(b_w, b_sp0, b_mp0, acc_p[0], b_mq0, acc_q[0])
                b_w += _kl_rescale(b_wk, b_spk, b_mpk, acc_p[0], b_mqk, acc_q[0])

    b_sp = tl.where(m_valid, acc_p[1], 1.0)  # invalid rows may have s = 0: keep logs finite
    b_sq = tl.where(m_valid, acc_q[1], 1.0)
    b_logsp = tl.log(b_sp)
    b_logsq = tl.log(b_sq)
    tl.store(p_lsep + o_n, tl.where(m_valid, acc_p[0] + b_logsp, 0.0), mask=m_n)
    tl.store(p_lseq + o_n, tl.where(m_valid, acc_q[0] + b_logsq, 0.0), mask=m_n)
    if HAS_ENT:
        tl.store(p_ent + o_n, tl.where(m_valid, b_logsp - acc_p[2] / b_sp, 0.0), mask=m_n)
    if HAS_DIV:
        if KL_MODE == 1:
            b_kl = b_w / b_sq - b_logsq + b_logsp
        else:
            b_kl = b_w / b_sp - b_logsp + b_logsq
        # KL >= 0: a negative value is rounding of a zero divergence
        b_kl = tl.where(b_bad > 0.0, float("inf"), tl.maximum(b_kl, 0.0))
        tl.store(p_div + o_n, tl.where(m_valid, b_kl, 0.0), mask=m_n)
    if HAS_BAD:
        tl.store(p_bad + o_n, tl.where(m_valid, b_bad, 0.0), mask=m_n)


@flags_from_none(HAS_BIAS_P="p_bp", HAS_BIAS_Q="p_bq", HAS_SOFTCAP_P="softcap_p", HAS_SOFTCAP_Q="softcap_q")
@triton.jit(do_not_specialize=["N", "blocks_per_split"])
def _linear_divergence_sum_kernel(
    p_hp,
    p_wp,
    p_bp,
    p_hq,
    p_wq,
    p_bq,
    p_valid,
    p_lsep,
    p_lseq,
    p_out,
    N,
    V,
    HP,
    HQ,
    stride_hpn,
    stride_wpv,
    stride_hqn,
    stride_wqv,
    blocks_per_split,
    scale_p,
    softcap_p,
    inv_temp_p,
    scale_q,
    softcap_q,
    inv_temp_q,
    param,
    KIND: tl.constexpr,
    GRAD_P: tl.constexpr,
    HAS_BIAS_P: tl.constexpr,
    HAS_BIAS_Q: tl.constexpr,
    HAS_SOFTCAP_P: tl.constexpr,
    HAS_SOFTCAP_Q: tl.constexpr,
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
    """Pass 2, one (token block, vocab split), both normalizers known (``p_lsep``, ``p_lseq`` [N]):
    the split's row sums of ``phi`` (``GRAD_P`` false: the divergence) or of ``p dphi/dp``
    (``GRAD_P``: the backward's ``c_p``) into ``p_out`` [splits, N] fp32; 0 at invalid rows."""
    # program ids multiply row lengths (N * V, V * H can pass 2**31): int64 from here on
    i_s = tl.program_id(1).to(tl.int64)
    o_n, m_n, m_valid, v_lo, v_hi, v_stop = _split_block(p_valid, N, V, blocks_per_split, BN, BV)
    b_lsep = tl.load(p_lsep + o_n, mask=m_valid, other=0.0)
    b_lseq = tl.load(p_lseq + o_n, mask=m_valid, other=0.0)

    b_acc = tl.zeros([BN], dtype=tl.float32)
    src_p = (p_hp, p_wp, p_bp, HP, stride_hpn, stride_wpv, HP)
    src_q = (p_hq, p_wq, p_bq, HQ, stride_hqn, stride_wqv, HQ)
    tf_p = (scale_p, softcap_p, inv_temp_p)
    tf_q = (scale_q, softcap_q, inv_temp_q)
    rows = (o_n, m_n)
    for v0 in range(v_lo, v_stop, BV):
        o_v = (v0 + tl.arange(0, BV)).to(tl.int64)
        m_v = o_v < v_hi
        b_zp, _, b_zq, _ = _two_tiles(
            src_p,
            tf_p,
            src_q,
            tf_q,
            rows,
            (o_v, m_v),
            (HAS_BIAS_P, HAS_SOFTCAP_P, CAST_HP, CAST_WP, INTERP_BF16_P, INPUT_PRECISION_P),
            (HAS_BIAS_Q, HAS_SOFTCAP_Q, CAST_HQ, CAST_WQ, INTERP_BF16_Q, INPUT_PRECISION_Q),
            BD,
            FROM_LOGITS,
        )
        m_tile = m_valid[:, None] & m_v[None, :]
        # off the tile both log-probs are 0 (finite terms), then the term is masked to 0
        b_lp = tl.where(m_tile, b_zp - b_lsep[:, None], 0.0)
        b_lq = tl.where(m_tile, b_zq - b_lseq[:, None], 0.0)
        if GRAD_P:
            b_t, _ = _div_grad_terms(b_lp, b_lq, param, KIND)
        else:
            b_t = _div_terms(b_lp, b_lq, param, KIND)
        b_acc += tl.sum(tl.where(m_tile, b_t, 0.0), axis=1)

    tl.store(p_out + i_s * N + o_n, tl.where(m_valid, b_acc, 0.0), mask=m_n)
