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


#: The flags of the four upstream gradients of a backward kernel, from its pointer arguments.
GRAD_FLAGS = {
    "HAS_G_LOGP": "p_glogp",
    "HAS_G_LSE": "p_glse",
    "HAS_G_ENT": "p_gent",
    "HAS_G_ZMEAN": "p_gzmean",
}

# Running max before the first logits tile: finite, so `exp(m - m')` and `(m - m') * s` stay
# 0 instead of becoming NaN (-inf * 0); far below any finite logit a matmul can produce.
NEG_BIG: tl.constexpr = tl.constexpr(-1.0e38)

# Below |x| < TANH_TAYLOR_MAX, tanh(x) = x (1 - x^2 / 3 (1 - 0.4 x^2)): the exp form
# (1 - e) / (1 + e), e = exp(-2|x|), cancels there. The series' first dropped term is
# 17 x^7 / 315, a relative error below 5.4e-8 at |x| = 0.1, under fp32's 6e-8 half-ulp.
TANH_TAYLOR_MAX: tl.constexpr = tl.constexpr(0.1)


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
def online_update(b_m, b_s, b_t, b_z, m_col, NEED_T: tl.constexpr):
    """Fold the tile ``z [BN, BV]`` (columns outside ``m_col`` ignored) into the running
    ``(m, s, t)`` of each row. When the max moves from ``m`` to ``m'`` the old sums rescale by
    ``a = exp(m - m')``: ``s' = a s``, ``t' = a (t + (m - m') s)``. Returns ``(m', s', t')``."""
    b_zm = tl.where(m_col, b_z, float("-inf"))
    b_mnew = tl.maximum(b_m, tl.max(b_zm, axis=1))
    b_a = tl.exp(b_m - b_mnew)
    b_zc = tl.where(m_col, b_z - b_mnew[:, None], float("-inf"))
    b_e = tl.exp(b_zc)  # 0 at masked columns
    if NEED_T:
        # e = 0 (masked column, -inf logit, underflow): the term is 0, never 0 * -inf
        b_t = b_a * (b_t + (b_m - b_mnew) * b_s) + tl.sum(b_e * tl.where(b_e > 0.0, b_zc, 0.0), axis=1)
    b_s = b_a * b_s + tl.sum(b_e, axis=1)
    return b_mnew, b_s, b_t


@triton.jit
def merge_partials(b_m, b_s, b_t, b_mk, b_sk, b_tk, NEED_T: tl.constexpr):
    """Merge two partial ``(m, s, t)`` of the same rows (disjoint vocabulary parts)."""
    b_mnew = tl.maximum(b_m, b_mk)
    b_a = tl.exp(b_m - b_mnew)
    b_ak = tl.exp(b_mk - b_mnew)
    if NEED_T:
        b_t = b_a * (b_t + (b_m - b_mnew) * b_s) + b_ak * (b_tk + (b_mk - b_mnew) * b_sk)
    b_s = b_a * b_s + b_ak * b_sk
    return b_mnew, b_s, b_t


@triton.jit
def store_stats(stats, m_valid, o_n, m_n, V, p_out, HAS_ENT: tl.constexpr, HAS_ZMEAN: tl.constexpr):
    """Write ``(logp, lse, entropy, zmean)`` of each row from its merged ``stats = (m, s, t, z_y,
    sum z)`` to ``p_out = (p_logp, p_lse, p_ent, p_zmean)``: ``lse = m + log s``, ``entropy =
    log s - t / s`` (no difference of two numbers of size ``|z|``). Exact zeros at rows outside
    ``m_valid`` (ignored or past the end), never NaN."""
    b_m, b_s, b_t, b_zy, b_zsum = stats
    p_logp, p_lse, p_ent, p_zmean = p_out
    b_s = tl.where(m_valid, b_s, 1.0)  # ignored rows may have s = 0: keep log / divide finite
    b_logs = tl.log(b_s)
    b_lse = b_m + b_logs
    tl.store(p_logp + o_n, tl.where(m_valid, b_zy - b_lse, 0.0), mask=m_n)
    tl.store(p_lse + o_n, tl.where(m_valid, b_lse, 0.0), mask=m_n)
    if HAS_ENT:
        tl.store(p_ent + o_n, tl.where(m_valid, b_logs - b_t / b_s, 0.0), mask=m_n)
    if HAS_ZMEAN:
        tl.store(p_zmean + o_n, tl.where(m_valid, b_zsum / V, 0.0), mask=m_n)


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
    HAS_G_LOGP: tl.constexpr,
    HAS_G_LSE: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
    HAS_G_ZMEAN: tl.constexpr,
):
    """``dz [BN, BV]`` from per-row upstream gradients of (logp, lse, entropy, zmean)::

        dz = g_logp (onehot - p) + g_lse p - g_ent p (z - E_p z) + g_zmean / V,  E_p z = lse - ent

    ``m_tile`` masks valid (row, column) pairs (0 elsewhere), ``m_hit`` marks each row's target
    column; ``p_stats = (p_lse, p_ent)`` point at the forward's statistics, ``p_grads`` at the four
    upstream gradients ``[N]`` and ``HAS_G_*`` say which are given (a missing one is zero).
    (Flags stay separate arguments: a tuple of constexprs built in a kernel loses its constexpr
    status in compiled Triton 3.9, though not under the interpreter.)"""
    p_lse, p_ent = p_stats
    p_glogp, p_glse, p_gent, p_gzmean = p_grads
    b_lse = tl.load(p_lse + o_n, mask=m_valid, other=0.0)
    b_p = tl.exp(tl.where(m_tile, b_z - b_lse[:, None], float("-inf")))  # 0 off the tile
    b_coef = tl.zeros_like(b_lse)
    if HAS_G_LOGP:
        b_glogp = tl.load(p_glogp + o_n, mask=m_valid, other=0.0)
        b_coef -= b_glogp
    if HAS_G_LSE:
        b_coef += tl.load(p_glse + o_n, mask=m_valid, other=0.0)
    b_dz = b_p * b_coef[:, None]
    if HAS_G_ENT:
        b_gent = tl.load(p_gent + o_n, mask=m_valid, other=0.0)
        b_ez = b_lse - tl.load(p_ent + o_n, mask=m_valid, other=0.0)  # E_p z = lse - ent
        # p = 0 (off the tile, -inf logit): the term is 0, never 0 * -inf
        b_dz -= (b_gent[:, None] * b_p) * (tl.where(b_p > 0.0, b_z, 0.0) - b_ez[:, None])
    if HAS_G_LOGP:
        b_dz += tl.where(m_hit, b_glogp[:, None], 0.0)
    if HAS_G_ZMEAN:
        b_dz += tl.load(p_gzmean + o_n, mask=m_valid, other=0.0)[:, None] / V
    return tl.where(m_tile, b_dz, 0.0)
