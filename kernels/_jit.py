r"""``@triton.jit`` helpers shared by the kernel families: one definition of each piece of tile
math (the logit transform, the online log-sum-exp, the logit gradient) so that every family
computes it the same way.

Symbols (as in the family docstrings): ``r`` raw logits, ``z`` transformed logits, ``m`` a
running max, ``s = sum exp(z - m)``, ``t = sum exp(z - m) (z - m)`` (for the entropy).
Tiles are ``[BN, BV]`` (token rows x vocabulary columns); per-row vectors ``[BN]``.
"""

from __future__ import annotations

import triton
import triton.language as tl


def flags_from_none(**flags: str):
    """``@triton.heuristics`` deriving each ``HAS_*`` constexpr from whether the argument it names
    is ``None`` (launchers pass ``bias=None``, never booleans)."""
    return triton.heuristics({flag: (lambda args, a=arg: args[a] is not None) for flag, arg in flags.items()})


# Running max before the first logits tile: finite, so `exp(m - m')` and `(m - m') * s` stay
# 0 instead of becoming NaN (-inf * 0); far below any finite logit a matmul can produce.
NEG_BIG: tl.constexpr = tl.constexpr(-1.0e38)

# Below |x| < TANH_TAYLOR_MAX, tanh(x) = x (1 - x^2 / 3 (1 - 0.4 x^2)): the exp form
# (1 - e) / (1 + e), e = exp(-2|x|), cancels there. The series' first dropped term is
# 17 x^7 / 315, a relative error below 5.4e-8 at |x| = 0.1, under fp32's 6e-8 half-ulp.
TANH_TAYLOR_MAX: tl.constexpr = tl.constexpr(0.1)


@triton.jit
def block_range(i, B: tl.constexpr, n):
    """Offsets ``i * B + [0, B)`` of block ``i`` (int64 when ``i`` is) and their mask ``< n``."""
    o = i * B + tl.arange(0, B)
    return o, o < n


@triton.jit
def tanh(x):
    """tanh in fp32 from ``exp`` (the interpreter has no libdevice; the exp form never
    overflows because its argument is ``-2|x| <= 0``)."""
    a = tl.abs(x)
    e = tl.exp(a * -2.0)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 - a2 / 3.0 * (1.0 - 0.4 * a2))
    t = tl.where(a < TANH_TAYLOR_MAX, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def to_bf16_rne(x):
    """fp32 -> bf16 rounded to nearest even, by hand: the interpreter (triton 3.9) truncates a
    plain cast. Only used under the interpreter (``INTERP_BF16``); finite inputs."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def for_store(x, p_out, INTERP_BF16: tl.constexpr):
    """fp32 ``x`` in the element dtype of pointer ``p_out``, rounded to nearest even (by hand for
    bf16 under the interpreter: ``INTERP_BF16``)."""
    if INTERP_BF16:
        return to_bf16_rne(x)
    return x.to(p_out.dtype.element_ty)


@triton.jit
def round_like(x, like, INTERP_BF16: tl.constexpr):
    """``x`` rounded to ``like``'s dtype (round to nearest even, as a GPU cast does)."""
    if INTERP_BF16:
        return to_bf16_rne(x.to(tl.float32))
    return x.to(like.dtype)


@triton.jit
def dot_operands(b_a, b_b, CAST_A: tl.constexpr, CAST_B: tl.constexpr, INTERP_BF16: tl.constexpr):
    """Both matmul operands in the narrower of their dtypes (mixed precision: the wider one is
    rounded, as ``torch.autocast`` rounds an fp32 weight). ``INTERP_BF16``: the dot dtype is bf16
    under the interpreter, whose bf16 ``tl.dot`` is wrong (triton issue 11584): the already
    rounded operands go to the dot as fp32, which gives the exact bf16 products."""
    if CAST_A:
        b_a = round_like(b_a, b_b, INTERP_BF16)
    if CAST_B:
        b_b = round_like(b_b, b_a, INTERP_BF16)
    if INTERP_BF16:
        b_a = b_a.to(tl.float32)
        b_b = b_b.to(tl.float32)
    return b_a, b_b


@triton.jit
def transform(b_r, scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """``z = softcap * tanh(scale * r / softcap) * inv_temp`` (``scale * r * inv_temp`` without a
    soft-cap) and ``th = tanh(scale * r / softcap)`` for the derivative (``r`` without one)."""
    if HAS_SOFTCAP:
        b_th = tanh(b_r * (scale / softcap))
        return b_th * (softcap * inv_temp), b_th
    return b_r * (scale * inv_temp), b_r


@triton.jit
def transform_grad(b_dz, b_th, scale, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """``dr = dz * dz/dr``: ``scale * inv_temp * (1 - th^2)`` (``scale * inv_temp`` without a
    soft-cap)."""
    b_dr = b_dz * (scale * inv_temp)
    if HAS_SOFTCAP:
        b_dr = b_dr * (1.0 - b_th * b_th)
    return b_dr


@triton.jit
def online_update(acc, b_z, m_col, NEED_T: tl.constexpr, NEED_S2: tl.constexpr):
    """Fold the tile ``z [BN, BV]`` (columns outside ``m_col`` ignored) into the running
    ``acc = (m, s, t, s2)`` of each row: ``s = sum e``, ``t = sum e (z - m)``, ``s2 = sum e^2`` with
    ``e = exp(z - m)``. When the max moves from ``m`` to ``m'`` the old sums rescale by
    ``a = exp(m - m')``: ``s' = a s``, ``t' = a (t + (m - m') s)``, ``s2' = a^2 s2``."""
    b_m, b_s, b_t, b_s2 = acc
    b_zm = tl.where(m_col, b_z, float("-inf"))
    b_mnew = tl.maximum(b_m, tl.max(b_zm, axis=1))
    b_a = tl.exp(b_m - b_mnew)
    b_zc = tl.where(m_col, b_z - b_mnew[:, None], float("-inf"))
    b_e = tl.exp(b_zc)  # 0 at masked columns
    if NEED_T:
        # e = 0 (masked column, -inf logit, underflow): the term is 0, never 0 * -inf
        b_t = b_a * (b_t + (b_m - b_mnew) * b_s) + tl.sum(b_e * tl.where(b_e > 0.0, b_zc, 0.0), axis=1)
    if NEED_S2:
        b_s2 = b_a * b_a * b_s2 + tl.sum(b_e * b_e, axis=1)
    b_s = b_a * b_s + tl.sum(b_e, axis=1)
    return b_mnew, b_s, b_t, b_s2


@triton.jit
def merge_partials(acc, part, NEED_T: tl.constexpr, NEED_S2: tl.constexpr):
    """Merge two partial ``(m, s, t, s2)`` of the same rows (disjoint vocabulary parts)."""
    b_m, b_s, b_t, b_s2 = acc
    b_mk, b_sk, b_tk, b_s2k = part
    b_mnew = tl.maximum(b_m, b_mk)
    b_a = tl.exp(b_m - b_mnew)
    b_ak = tl.exp(b_mk - b_mnew)
    if NEED_T:
        b_t = b_a * (b_t + (b_m - b_mnew) * b_s) + b_ak * (b_tk + (b_mk - b_mnew) * b_sk)
    if NEED_S2:
        b_s2 = b_a * b_a * b_s2 + b_ak * b_ak * b_s2k
    b_s = b_a * b_s + b_ak * b_sk
    return b_mnew, b_s, b_t, b_s2


@triton.jit
def store_stats(
    acc,
    b_zy,
    b_zsum,
    m_valid,
    o_n,
    m_n,
    V,
    p_out,
    HAS_ENT: tl.constexpr,
    HAS_ZMEAN: tl.constexpr,
    HAS_S2: tl.constexpr,
):
    """Write ``(logp, lse, entropy, zmean, log_sum_p2)`` of each row from its merged ``acc = (m, s,
    t, s2)``, target logit and logit sum to ``p_out = (p_logp, p_lse, p_ent, p_zmean, p_lsp2)``:
    ``lse = m + log s``, ``entropy = log s - t / s`` (no difference of two numbers of size
    ``|z|``), ``log sum p^2 = log s2 - 2 log s``. Exact zeros at rows outside ``m_valid``
    (ignored or past the end), never NaN. Returns ``lse``."""
    b_m, b_s, b_t, b_s2 = acc
    p_logp, p_lse, p_ent, p_zmean, p_lsp2 = p_out
    b_s = tl.where(m_valid, b_s, 1.0)  # ignored rows may have s = 0: keep log / divide finite
    b_logs = tl.log(b_s)
    b_lse = b_m + b_logs
    tl.store(p_logp + o_n, tl.where(m_valid, b_zy - b_lse, 0.0), mask=m_n)
    tl.store(p_lse + o_n, tl.where(m_valid, b_lse, 0.0), mask=m_n)
    if HAS_ENT:
        tl.store(p_ent + o_n, tl.where(m_valid, b_logs - b_t / b_s, 0.0), mask=m_n)
    if HAS_ZMEAN:
        tl.store(p_zmean + o_n, tl.where(m_valid, b_zsum / V, 0.0), mask=m_n)
    if HAS_S2:
        b_s2 = tl.where(m_valid, b_s2, 1.0)
        tl.store(p_lsp2 + o_n, tl.where(m_valid, tl.log(b_s2) - 2.0 * b_logs, 0.0), mask=m_n)
    return b_lse


@triton.jit
def topk_init(BN: tl.constexpr, KP: tl.constexpr, K: tl.constexpr):
    """An empty running top-k ``(values [BN, KP] fp32, ids [BN, KP] int32)``: the ``K`` real slots
    hold -inf (any candidate replaces them), the padding slots up to the power of two ``KP`` hold
    +inf (never the smallest, so never replaced); ids -1."""
    o_k = tl.arange(0, KP)
    b_tv = tl.where(o_k[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BN, KP], dtype=tl.float32)
    return b_tv, tl.full([BN, KP], -1, dtype=tl.int32)


@triton.jit
def topk_merge(b_tv, b_ti, b_cv, b_ci):
    """Merge candidates ``(b_cv, b_ci) [BN, C]`` (values, int32 ids; -inf for none) into the running
    top-k of each row (:func:`topk_init`). Each round moves every row's largest remaining
    candidate into its smallest slot when it is strictly larger; the loop stops as soon as no row
    has such a candidate, so a tile that cannot change any row's top-k costs one round.
    Ties keep the earlier entry (deterministic)."""
    o_c = tl.arange(0, b_cv.shape[1])
    o_k = tl.arange(0, b_tv.shape[1])
    b_cmax = tl.max(b_cv, axis=1)
    b_tmin = tl.min(b_tv, axis=1)
    go = tl.max((b_cmax > b_tmin).to(tl.int32), axis=0) > 0
    while go:
        b_carg = tl.argmax(b_cv, axis=1)
        b_targ = tl.argmin(b_tv, axis=1)
        m_pick = o_c[None, :] == b_carg[:, None]
        b_cid = tl.sum(tl.where(m_pick, b_ci, 0), axis=1)
        m_slot = (o_k[None, :] == b_targ[:, None]) & (b_cmax > b_tmin)[:, None]
        b_tv = tl.where(m_slot, b_cmax[:, None], b_tv)
        b_ti = tl.where(m_slot, b_cid[:, None], b_ti)
        b_cv = tl.where(m_pick, float("-inf"), b_cv)
        b_cmax = tl.max(b_cv, axis=1)
        b_tmin = tl.min(b_tv, axis=1)
        go = tl.max((b_cmax > b_tmin).to(tl.int32), axis=0) > 0
    return b_tv, b_ti


@triton.jit
def topk_store(b_tv, b_ti, b_lse, m_valid, o_n, m_n, p_ids, p_logps, K: tl.constexpr):
    """Store the running top-k sorted, most likely first: ``p_ids [N, K]`` int64 and ``p_logps
    [N, K] = z - lse``; ids -1 and log-probs 0 at rows outside ``m_valid``."""
    o_k = tl.arange(0, b_tv.shape[1])
    b_v = tl.where(o_k[None, :] < K, b_tv, float("-inf"))  # padding slots out
    o_out = o_n.to(tl.int64) * K
    for r in tl.static_range(K):
        b_max = tl.max(b_v, axis=1)
        m_pick = o_k[None, :] == tl.argmax(b_v, axis=1)[:, None]
        b_id = tl.sum(tl.where(m_pick, b_ti, 0), axis=1)
        tl.store(p_ids + o_out + r, tl.where(m_valid, b_id, -1).to(tl.int64), mask=m_n)
        tl.store(p_logps + o_out + r, tl.where(m_valid, b_max - b_lse, 0.0), mask=m_n)
        b_v = tl.where(m_pick, float("-inf"), b_v)


@triton.jit
def logit_grad(
    b_z,
    m_tile,
    m_hit,
    o_n,
    m_valid,
    p_stats,
    p_grads,
    V,
):
    """``dz [BN, BV]`` from per-row upstream gradients of (logp, lse, entropy, zmean, log_sum_p2)::

        dz = g_logp (onehot - p) + g_lse p - g_ent p (z - E_p z) + g_zmean / V
             + 2 g_lsp2 (p^2 / sum p^2 - p),                         E_p z = lse - ent

    ``m_tile`` masks valid (row, column) pairs (0 elsewhere), ``m_hit`` marks each row's target
    column; ``p_stats = (p_lse, p_ent, p_lsp2)`` point at the forward's statistics, ``p_grads`` at
    the five upstream gradients ``[N]``; a ``None`` pointer (a constexpr, so its branch is not
    compiled) means that gradient is zero."""
    p_lse, p_ent, p_lsp2 = p_stats
    p_glogp, p_glse, p_gent, p_gzmean, p_glsp2 = p_grads
    b_lse = tl.load(p_lse + o_n, mask=m_valid, other=0.0)
    b_p = tl.exp(tl.where(m_tile, b_z - b_lse[:, None], float("-inf")))  # 0 off the tile
    b_coef = tl.zeros_like(b_lse)
    if p_glogp is not None:
        b_glogp = tl.load(p_glogp + o_n, mask=m_valid, other=0.0)
        b_coef -= b_glogp
    if p_glse is not None:
        b_coef += tl.load(p_glse + o_n, mask=m_valid, other=0.0)
    b_dz = b_p * b_coef[:, None]
    if p_gent is not None:
        b_gent = tl.load(p_gent + o_n, mask=m_valid, other=0.0)
        b_ez = b_lse - tl.load(p_ent + o_n, mask=m_valid, other=0.0)  # E_p z = lse - ent
        # p = 0 (off the tile, -inf logit): the term is 0, never 0 * -inf
        b_dz -= (b_gent[:, None] * b_p) * (tl.where(b_p > 0.0, b_z, 0.0) - b_ez[:, None])
    if p_glogp is not None:
        b_dz += tl.where(m_hit, b_glogp[:, None], 0.0)
    if p_gzmean is not None:
        b_dz += tl.load(p_gzmean + o_n, mask=m_valid, other=0.0)[:, None] / V
    if p_glsp2 is not None:
        b_g2 = 2.0 * tl.load(p_glsp2 + o_n, mask=m_valid, other=0.0)
        b_inv = tl.exp(-tl.load(p_lsp2 + o_n, mask=m_valid, other=0.0))  # 1 / sum p^2
        b_dz += (b_g2[:, None] * b_p) * (b_p * b_inv[:, None] - 1.0)
    return tl.where(m_tile, b_dz, 0.0)
