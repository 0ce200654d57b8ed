r"""Fused linear log-probs: per-token log-probs, log-sum-exp, entropy and mean logit straight
from hidden states and the LM-head weight (SPEC §1.1, §3.1), never building ``[N, V]`` logits.

Math (symbols as in the code; ``T`` temperature, ``c`` soft-cap, ``y`` targets)::

    r      = h @ W.T + b                                   raw logits        [N, V]
    z      = c * tanh(r / c) / T     (z = r / T without a soft-cap; SPEC §1.1 order)
    lse_n  = log sum_v exp(z_nv)
    logp_n = z_n[y_n] - lse_n
    ent_n  = lse_n - sum_v p_nv z_nv,      p = softmax(z)
    zmean_n = (1 / V) sum_v z_nv

Rows with ``y_n == ignore_index`` give exactly 0 in every output and get zero gradient.

Stabilisation: one online pass over vocab blocks keeps, per row, the running max ``m``,
``s = sum exp(z - m)`` and ``t = sum exp(z - m) (z - m)``. When the max moves from ``m`` to
``m'`` both are rescaled by ``a = exp(m - m')``: ``s' = a s``, ``t' = a (t + (m - m') s)``.
Then ``lse = m + log s`` and ``ent = log s - t / s``: the entropy never subtracts two numbers of
size ``|z|`` (with ``|z| ~ 1e4`` in fp32 that difference would lose every digit). The vocab
axis may be split over programs; the partial ``(m, s, t, z_y, sum z)`` combine with the same
rescaling (`_linear_logprobs_combine_kernel`).

Backward, given upstream ``g_logp, g_ent, g_lse, g_zmean`` (``None`` means 0)::

    dz     = g_logp (onehot(y) - p) - g_ent p (z - E_p z) + g_lse p + g_zmean / V,
             E_p z = lse - ent
    dr     = dz / T * (1 - tanh(r / c)^2)      (dz / T without a soft-cap)
    dh = dr @ W        dW = dr.T @ h        db = sum_n dr

PyTorch equivalent (with full logits)::

    z = (softcap * torch.tanh((h @ W.T + b).float() / softcap)) / T
    logp = torch.log_softmax(z, -1).gather(-1, y[:, None])[:, 0]

How the work is tiled (block sizes and their reasons in ``kernels/constants.py``):

* forward ``_linear_logprobs_fwd_kernel``: grid (token blocks of ``BN``, vocab splits); each
  program loops over its vocab blocks of ``BV``, builds the ``[BN, BV]`` logits tile with
  ``tl.dot`` over the hidden axis in chunks of ``BD`` (fp32 accumulation whatever the input
  dtype) and folds it into the online statistics. It writes O(N * splits) fp32 partials;
  ``_linear_logprobs_combine_kernel`` turns them into the outputs. A token block whose rows
  are all ignored skips its matmuls.
* backward ``_linear_logprobs_bwd_kernel``: grid (token blocks, vocab blocks) of one chunk;
  each program recomputes its logits tile, forms ``dr`` and stores it in the input dtype into
  a bounded workspace (plus fp32 column sums for ``db``). Two cuBLAS GEMMs then contract the
  chunk: ``dW[chunk] = dr.T @ h`` (vocab chunks over all tokens) and ``dh[chunk] = dr @ W``
  (token chunks over the whole vocab). Every gradient row is written once, in its output
  dtype; nothing uses float atomics, so the backward is deterministic. The workspace holds at
  most ``max(N * H, 2**26)`` elements. When it holds the whole ``dr`` (small problems) one
  recomputation feeds both GEMMs; otherwise the logits are recomputed once per GEMM
  (8 N V H flops instead of 6). A backward written only in Triton with the accumulators
  on-chip would have to recompute the logits once per hidden chunk of the accumulator
  (about ``H / 256`` times), and an atomic one would not be deterministic.

Naming (FLA grammar): ``i_`` program ids, ``o_`` offsets, ``m_`` masks, ``p_`` pointers,
``b_`` on-chip tiles; ``N, V, H`` sizes; ``BN, BV, BD`` block sizes; ``HAS_*`` flags derived
from ``None``-ness by ``@triton.heuristics`` (launchers pass ``None``, never booleans).

Dtype and stride policy: ``hidden`` and ``weight`` are bf16, fp16 or fp32 (the same dtype),
any row stride, last dimension contiguous (asserted, never copied). Per-token vectors
(``targets``, ``lse``, upstream gradients) are O(N) and are made contiguous (fp32 for the
float ones) when they are not. fp32 inputs use IEEE fp32 dots unless
``torch.get_float32_matmul_precision()`` allows TF32. Offsets are int64 wherever a program id
or row index multiplies a row length.

Interpreter note: under ``TRITON_INTERPRET=1`` (triton 3.9) ``tl.dot`` on bf16 operands is wrong
(triton issue 11584) and an fp32 -> bf16 cast truncates instead of rounding to nearest. With
bf16 inputs the launchers then set the constexpr ``INTERP_BF16``: dot operands are upcast to
fp32 and the backward's bf16 stores round by hand (`_to_bf16_rne`). It is never on for a GPU.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from alignops._utils import empty

from . import constants as C
from ._aot import AotSpec

__all__ = [
    "AOT_SPECS",
    "BwdConfig",
    "FwdConfig",
    "bwd_config",
    "fwd_config",
    "linear_logprobs_bwd",
    "linear_logprobs_fwd",
]

# Running max before the first logits tile: finite, so `exp(m - m')` and `(m - m') * s` stay
# 0 instead of becoming NaN (-inf * 0); far below any finite logit a matmul can produce.
NEG_BIG: tl.constexpr = tl.constexpr(-1.0e38)

# Planes of the forward partials [5, splits, N] fp32: max, sum-exp, target logit, t, sum z.
_P_MAX: tl.constexpr = tl.constexpr(0)
_P_SUMEXP: tl.constexpr = tl.constexpr(1)
_P_ZY: tl.constexpr = tl.constexpr(2)
_P_T: tl.constexpr = tl.constexpr(3)
_P_ZSUM: tl.constexpr = tl.constexpr(4)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp (the interpreter has no libdevice): (1 - e) / (1 + e) with
    e = exp(-2|x|), and the odd Taylor series below |x| = 1/16 where 1 - e would cancel
    (its first dropped term is 17 |x|^7 / 315, < 4e-9 relative there)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 - a2 * (0.3333333333333333 - a2 * 0.13333333333333333))
    t = tl.where(a < 0.0625, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _to_bf16_rne(x):
    """fp32 -> bf16 rounded to nearest even, by hand: the interpreter truncates a plain cast.
    Only used under the interpreter (``INTERP_BF16``); finite inputs."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _logits_tile(
    p_h, p_w, p_b, o_n, m_n, o_v, m_v, d_stop, H, stride_hn, stride_wv, inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INTERP_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
):
    """Transformed logits ``z`` [BN, BV] (fp32) of rows ``o_n`` and vocab rows ``o_v``, and
    ``tanh(r / c)`` (the soft-cap's derivative needs it; equals ``z`` without a soft-cap).
    ``d_stop`` is ``H``, or 0 to skip the matmul for a block of ignored rows."""
    b_acc = tl.zeros([BN, BV], dtype=tl.float32)
    for d0 in range(0, d_stop, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < H
        p_hd = p_h + o_n[:, None] * stride_hn + o_d[None, :]
        b_h = tl.load(p_hd, mask=m_n[:, None] & m_d[None, :], other=0.0)
        # W tile loaded transposed, [BD, BV]: no tl.trans needed before the dot
        p_wd = p_w + o_v[None, :] * stride_wv + o_d[:, None]
        b_w = tl.load(p_wd, mask=m_d[:, None] & m_v[None, :], other=0.0)
        if INTERP_BF16:
            b_h = b_h.to(tl.float32)
            b_w = b_w.to(tl.float32)
        # [BN, BD] @ [BD, BV] -> [BN, BV], fp32 accumulator
        b_acc = tl.dot(b_h, b_w, b_acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        b_acc += tl.load(p_b + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    b_th = b_acc
    if HAS_SOFTCAP:
        b_th = _tanh(b_acc * (1.0 / softcap))
        b_acc = softcap * b_th
    return b_acc * inv_temp, b_th


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["p_b"] is not None,
        "HAS_SOFTCAP": lambda args: args["softcap"] is not None,
    }
)
@triton.jit(do_not_specialize=["N", "blocks_per_split"])
def _linear_logprobs_fwd_kernel(
    p_h, p_w, p_b, p_y, p_part,
    N, V, H, stride_hn, stride_wv, blocks_per_split, ignore_index, inv_temp, softcap,
    NEED_ENT: tl.constexpr, NEED_ZMEAN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INTERP_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
):
    """One (token block, vocab split): partial (max, sum-exp, z_y, t, sum z) per row into
    ``p_part`` [5, splits, N] fp32."""
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

    b_m = tl.full([BN], NEG_BIG, dtype=tl.float32)
    b_s = tl.zeros([BN], dtype=tl.float32)
    b_t = tl.zeros([BN], dtype=tl.float32)
    b_zy = tl.zeros([BN], dtype=tl.float32)
    b_zsum = tl.zeros([BN], dtype=tl.float32)
    for v0 in range(v_lo, v_stop, BV):
        # int64 again: the interpreter's loop variable is a plain int (o_v * stride_wv > 2**31)
        o_v = (v0 + tl.arange(0, BV)).to(tl.int64)
        m_v = o_v < v_hi
        b_z, _ = _logits_tile(
            p_h, p_w, p_b, o_n, m_n, o_v, m_v, d_stop, H, stride_hn, stride_wv, inv_temp, softcap,
            HAS_BIAS, HAS_SOFTCAP, INTERP_BF16, INPUT_PRECISION, BN, BV, BD,
        )
        b_z = tl.where(m_v[None, :], b_z, float("-inf"))
        b_mnew = tl.maximum(b_m, tl.max(b_z, axis=1))
        b_alpha = tl.exp(b_m - b_mnew)
        b_zc = tl.where(m_v[None, :], b_z - b_mnew[:, None], float("-inf"))
        b_e = tl.exp(b_zc)  # 0 at masked columns
        if NEED_ENT:
            b_et = tl.sum(b_e * tl.where(m_v[None, :], b_zc, 0.0), axis=1)
            b_t = b_alpha * (b_t + (b_m - b_mnew) * b_s) + b_et
        b_s = b_alpha * b_s + tl.sum(b_e, axis=1)
        b_m = b_mnew
        b_zy += tl.sum(tl.where(o_v[None, :] == b_y[:, None], b_z, 0.0), axis=1)
        if NEED_ZMEAN:
            b_zsum += tl.sum(tl.where(m_v[None, :], b_z, 0.0), axis=1)

    o_p = i_s * N + o_n
    plane = n_splits * N
    tl.store(p_part + _P_MAX * plane + o_p, b_m, mask=m_n)
    tl.store(p_part + _P_SUMEXP * plane + o_p, b_s, mask=m_n)
    tl.store(p_part + _P_ZY * plane + o_p, b_zy, mask=m_n)
    if NEED_ENT:
        tl.store(p_part + _P_T * plane + o_p, b_t, mask=m_n)
    if NEED_ZMEAN:
        tl.store(p_part + _P_ZSUM * plane + o_p, b_zsum, mask=m_n)


@triton.heuristics(
    {
        "HAS_ENT": lambda args: args["p_ent"] is not None,
        "HAS_ZMEAN": lambda args: args["p_zmean"] is not None,
    }
)
@triton.jit(do_not_specialize=["N", "n_splits"])
def _linear_logprobs_combine_kernel(
    p_part, p_y, p_logp, p_lse, p_ent, p_zmean, N, V, n_splits, ignore_index,
    HAS_ENT: tl.constexpr, HAS_ZMEAN: tl.constexpr, BN: tl.constexpr,
):
    """Merge the ``n_splits`` partials of ``BN`` rows (in split order, so deterministic) and
    write logp, lse (and entropy, zmean) [N] fp32, exact zeros at ignored rows."""
    # row indices times split counts can pass 2**31 with the plane offsets: int64
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    b_y = tl.load(p_y + o_n, mask=m_n, other=ignore_index)
    m_valid = m_n & (b_y != ignore_index)
    n_64 = N.to(tl.int64)  # k * N below must not wrap (the loop variable is int32)
    plane = n_splits * n_64

    b_m = tl.full([BN], NEG_BIG, dtype=tl.float32)
    b_s = tl.zeros([BN], dtype=tl.float32)
    b_t = tl.zeros([BN], dtype=tl.float32)
    b_zy = tl.zeros([BN], dtype=tl.float32)
    b_zsum = tl.zeros([BN], dtype=tl.float32)
    for k in range(0, n_splits):
        o_p = k * n_64 + o_n
        b_mk = tl.load(p_part + _P_MAX * plane + o_p, mask=m_n, other=NEG_BIG)
        b_sk = tl.load(p_part + _P_SUMEXP * plane + o_p, mask=m_n, other=0.0)
        b_mnew = tl.maximum(b_m, b_mk)
        b_a = tl.exp(b_m - b_mnew)
        b_ak = tl.exp(b_mk - b_mnew)
        if HAS_ENT:
            b_tk = tl.load(p_part + _P_T * plane + o_p, mask=m_n, other=0.0)
            b_t = b_a * (b_t + (b_m - b_mnew) * b_s) + b_ak * (b_tk + (b_mk - b_mnew) * b_sk)
        b_s = b_a * b_s + b_ak * b_sk
        b_m = b_mnew
        b_zy += tl.load(p_part + _P_ZY * plane + o_p, mask=m_n, other=0.0)
        if HAS_ZMEAN:
            b_zsum += tl.load(p_part + _P_ZSUM * plane + o_p, mask=m_n, other=0.0)

    b_s = tl.where(m_valid, b_s, 1.0)  # ignored rows may have s = 0: keep log / divide finite
    b_logs = tl.log(b_s)
    b_lse = b_m + b_logs
    tl.store(p_logp + o_n, tl.where(m_valid, b_zy - b_lse, 0.0), mask=m_n)
    tl.store(p_lse + o_n, tl.where(m_valid, b_lse, 0.0), mask=m_n)
    if HAS_ENT:
        tl.store(p_ent + o_n, tl.where(m_valid, b_logs - b_t / b_s, 0.0), mask=m_n)
    if HAS_ZMEAN:
        tl.store(p_zmean + o_n, tl.where(m_valid, b_zsum / V, 0.0), mask=m_n)


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
    p_h, p_w, p_b, p_y, p_lse, p_ent, p_glogp, p_gent, p_glse, p_gzmean, p_dz, p_db,
    n_lo, n_count, v_lo, v_count, V, H, stride_hn, stride_wv, stride_dz, stride_db,
    ignore_index, inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_G_LOGP: tl.constexpr,
    HAS_G_ENT: tl.constexpr, HAS_G_LSE: tl.constexpr, HAS_G_ZMEAN: tl.constexpr,
    HAS_DZ: tl.constexpr, HAS_DB: tl.constexpr, INTERP_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
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
        p_h, p_w, p_b, o_n, m_r, o_v, m_c, d_stop, H, stride_hn, stride_wv, inv_temp, softcap,
        HAS_BIAS, HAS_SOFTCAP, INTERP_BF16, INPUT_PRECISION, BN, BV, BD,
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


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------


class FwdConfig(NamedTuple):
    """Launch configuration of the forward; ``num_splits`` None lets the launcher choose."""

    BN: int
    BV: int
    BD: int
    num_warps: int
    num_stages: int
    num_splits: int | None = None


class BwdConfig(NamedTuple):
    """Launch configuration of the backward; ``workspace_elems`` bounds the ``dr`` chunk."""

    BN: int
    BV: int
    BD: int
    num_warps: int
    num_stages: int
    workspace_elems: int


def _bd_for(dtype: torch.dtype) -> int:
    return C.LLP_BD_FP32 if dtype == torch.float32 else C.LLP_BD_16BIT


def _bn_for(n: int) -> int:
    return C.LLP_BN_SMALL if n <= C.LLP_SMALL_N_MAX else C.LLP_BN


def fwd_config(n: int, v: int, h: int, dtype: torch.dtype) -> FwdConfig:
    """Default forward config: ``BN`` 16 for tiny batches else 64, ``BV`` 128, ``BD`` 64 for
    16-bit inputs / 32 for fp32 (same shared memory per stage). ``v``, ``h`` are accepted so
    the heuristic can grow without changing callers."""
    del v, h
    return FwdConfig(_bn_for(n), C.LLP_BV, _bd_for(dtype), C.LLP_NUM_WARPS, C.LLP_NUM_STAGES)


def bwd_config(n: int, v: int, h: int, dtype: torch.dtype) -> BwdConfig:
    """Default backward config: the forward's tile, workspace ``max(N * H, floor)`` elements."""
    del v
    ws = max(n * h, C.LLP_WORKSPACE_FLOOR_ELEMS)
    return BwdConfig(_bn_for(n), C.LLP_BV, _bd_for(dtype), C.LLP_NUM_WARPS, C.LLP_NUM_STAGES, ws)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return C.LLP_DEFAULT_SM_COUNT


def _num_splits(n_token_blocks: int, n_vocab_blocks: int, device: torch.device) -> int:
    """Vocab splits so that token blocks x splits reaches ~LLP_PROGRAMS_PER_SM per SM."""
    target = C.LLP_PROGRAMS_PER_SM * _sm_count(device)
    splits = triton.cdiv(target, n_token_blocks)
    return max(1, min(splits, n_vocab_blocks, C.LLP_MAX_SPLITS))


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _launch(kernel, grid: tuple[int, ...], **kwargs) -> None:
    """Single launch seam (tests shrink the grid here to prove unwritten outputs are caught)."""
    kernel[grid](**kwargs)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_flags(dtype: torch.dtype) -> dict:
    interp_bf16 = _interpreting() and dtype == torch.bfloat16
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return {"INTERP_BF16": interp_bf16, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}


def _dot_flags_default(dtype: torch.dtype) -> dict:
    """INPUT_PRECISION under torch's default float32 matmul precision ("highest")."""
    del dtype
    return {"INPUT_PRECISION": "ieee"}


def _check_inputs(hidden, weight, targets, bias, temperature, softcap) -> tuple[int, int, int]:
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("hidden and weight must be tensors")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"hidden size mismatch: hidden [{n}, {h}] vs weight {tuple(weight.shape)}")
    if v == 0 or h == 0:
        raise ValueError(f"empty vocab or hidden size: V={v}, H={h}")
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one dtype of {_DTYPES}, got {hidden.dtype}, "
                        f"{weight.dtype}")
    if targets.dtype != torch.int64 or targets.shape != (n,):
        raise TypeError(f"targets must be int64 [{n}], got {targets.dtype} {tuple(targets.shape)}")
    if bias is not None and (bias.shape != (v,) or not bias.dtype.is_floating_point):
        raise ValueError(f"bias must be a float [{v}] tensor, got {bias.dtype} {tuple(bias.shape)}")
    if (n > 0 and hidden.stride(1) != 1) or weight.stride(1) != 1:
        raise ValueError("hidden and weight need a contiguous last dimension (any row stride)")
    devices = {t.device for t in (hidden, weight, targets, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if hidden.device.type != "cuda" and not _interpreting():
        raise ValueError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    return n, v, h


def _vec(x: torch.Tensor | None, n: int, name: str) -> torch.Tensor | None:
    """An O(N) per-token vector as contiguous fp32 (a copy of at most N floats)."""
    if x is None:
        return None
    if x.shape != (n,):
        raise ValueError(f"{name} must be [{n}], got {tuple(x.shape)}")
    return x.to(torch.float32).contiguous()


def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    need_entropy: bool,
    need_zmean: bool,
    config: FwdConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Forward of SPEC §1.1: ``(logp, lse, entropy | None, zmean | None)``, each [N] fp32.

    hidden [N, H], weight [V, H] (bf16 / fp16 / fp32, same dtype), targets [N] int64, bias [V]
    or None. ``config`` overrides the heuristic (benchmarks, tests).
    """
    n, v, h = _check_inputs(hidden, weight, targets, bias, temperature, softcap)
    dev = hidden.device
    logp = empty((n,), dtype=torch.float32, device=dev)
    lse = empty((n,), dtype=torch.float32, device=dev)
    ent = empty((n,), dtype=torch.float32, device=dev) if need_entropy else None
    zmean = empty((n,), dtype=torch.float32, device=dev) if need_zmean else None
    if n == 0:
        return logp, lse, ent, zmean
    cfg = config or fwd_config(n, v, h, hidden.dtype)
    targets = targets.contiguous()
    n_tb = triton.cdiv(n, cfg.BN)
    n_vb = triton.cdiv(v, cfg.BV)
    splits = cfg.num_splits or _num_splits(n_tb, n_vb, dev)
    blocks_per_split = triton.cdiv(n_vb, max(1, min(splits, n_vb)))
    splits = triton.cdiv(n_vb, blocks_per_split)  # no empty split
    part = empty((5, splits, n), dtype=torch.float32, device=dev)
    _launch(
        _linear_logprobs_fwd_kernel, (n_tb, splits),
        p_h=hidden, p_w=weight, p_b=bias, p_y=targets, p_part=part,
        N=n, V=v, H=h, stride_hn=hidden.stride(0), stride_wv=weight.stride(0),
        blocks_per_split=blocks_per_split, ignore_index=ignore_index,
        inv_temp=1.0 / temperature, softcap=softcap,
        NEED_ENT=need_entropy, NEED_ZMEAN=need_zmean, **_dot_flags(hidden.dtype),
        BN=cfg.BN, BV=cfg.BV, BD=cfg.BD, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _launch(
        _linear_logprobs_combine_kernel, (triton.cdiv(n, C.LLP_COMBINE_BN),),
        p_part=part, p_y=targets, p_logp=logp, p_lse=lse, p_ent=ent, p_zmean=zmean,
        N=n, V=v, n_splits=splits, ignore_index=ignore_index,
        BN=C.LLP_COMBINE_BN, num_warps=C.LLP_COMBINE_NUM_WARPS,
    )
    return logp, lse, ent, zmean


def linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    *,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    g_lse: torch.Tensor | None,
    g_zmean: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
    config: BwdConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward of SPEC §1.1: ``(dhidden [N, H] | None, dweight [V, H] | None, dbias [V] | None)``
    in the dtypes of hidden, weight and bias. ``lse`` (and ``entropy`` when ``g_ent`` is given)
    are the forward's outputs; a ``None`` upstream gradient means zero.
    """
    n, v, h = _check_inputs(hidden, weight, targets, bias, temperature, softcap)
    if need_dbias and bias is None:
        raise ValueError("need_dbias=True without a bias")
    if g_ent is not None and entropy is None:
        raise ValueError("g_ent needs the forward's entropy")
    dev = hidden.device
    lse, entropy = _vec(lse, n, "lse"), _vec(entropy, n, "entropy")
    g_logp, g_ent = _vec(g_logp, n, "g_logp"), _vec(g_ent, n, "g_ent")
    g_lse, g_zmean = _vec(g_lse, n, "g_lse"), _vec(g_zmean, n, "g_zmean")
    dh = empty((n, h), dtype=hidden.dtype, device=dev) if need_dhidden else None
    dw = empty((v, h), dtype=weight.dtype, device=dev) if need_dweight else None
    db = empty((v,), dtype=bias.dtype, device=dev) if need_dbias else None
    if n == 0 or all(g is None for g in (g_logp, g_ent, g_lse, g_zmean)):
        for t in (dh, dw, db):
            if t is not None:
                t.zero_()
        return dh, dw, db

    cfg = config or bwd_config(n, v, h, hidden.dtype)
    targets = targets.contiguous()
    common = dict(
        p_h=hidden, p_w=weight, p_b=bias, p_y=targets, p_lse=lse, p_ent=entropy if g_ent is not None else None,
        p_glogp=g_logp, p_gent=g_ent, p_glse=g_lse, p_gzmean=g_zmean,
        V=v, H=h, stride_hn=hidden.stride(0), stride_wv=weight.stride(0),
        ignore_index=ignore_index, inv_temp=1.0 / temperature, softcap=softcap,
        **_dot_flags(hidden.dtype),
        BN=cfg.BN, BV=cfg.BV, BD=cfg.BD, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    n_tb = triton.cdiv(n, cfg.BN)
    ws_elems = max(cfg.workspace_elems, cfg.BN * cfg.BV)
    dh_done = not need_dhidden

    if need_dweight or need_dbias:
        # vocab chunks over all tokens: dW[chunk] = dr.T @ h, db[chunk] = column sums of dr
        vc = v if not need_dweight else min(v, max(cfg.BV, ws_elems // n // cfg.BV * cfg.BV))
        single = vc == v
        ws = empty((n, vc), dtype=hidden.dtype, device=dev) if need_dweight else None
        dbp = empty((n_tb, vc), dtype=torch.float32, device=dev) if need_dbias else None
        for v0 in range(0, v, vc):
            cnt = min(vc, v - v0)
            _launch(
                _linear_logprobs_bwd_kernel, (n_tb, triton.cdiv(cnt, cfg.BV)),
                p_dz=ws, p_db=dbp, n_lo=0, n_count=n, v_lo=v0, v_count=cnt,
                stride_dz=vc, stride_db=vc, **common,
            )
            if need_dweight:
                torch.mm(ws[:, :cnt].T, hidden, out=dw[v0 : v0 + cnt])
            if need_dbias:
                db[v0 : v0 + cnt] = dbp[:, :cnt].sum(dim=0)
            if need_dhidden and single:
                torch.mm(ws, weight, out=dh)  # the whole dr is in the workspace: reuse it
                dh_done = True
        del ws, dbp

    if not dh_done:
        # token chunks over the whole vocab: dh[chunk] = dr @ W
        nc = min(n, max(cfg.BN, ws_elems // v // cfg.BN * cfg.BN))
        ws = empty((nc, v), dtype=hidden.dtype, device=dev)
        for n0 in range(0, n, nc):
            cnt = min(nc, n - n0)
            _launch(
                _linear_logprobs_bwd_kernel, (triton.cdiv(cnt, cfg.BN), triton.cdiv(v, cfg.BV)),
                p_dz=ws, p_db=None, n_lo=n0, n_count=cnt, v_lo=0, v_count=v,
                stride_dz=v, stride_db=0, **common,
            )
            torch.mm(ws[:cnt], weight, out=dh[n0 : n0 + cnt])
    return dh, dw, db


# ----------------------------------------------------------------------------------------------
# ahead-of-time build descriptions
# ----------------------------------------------------------------------------------------------

_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# Integer arguments that real models make multiples of 16 (hidden size, vocab, row strides,
# workspace strides), so the JIT specializes them as such at run time. Their AOT type carries
# Triton's ":16" divisibility hint (the notation of triton/tools/compile.py), as do all
# pointers (torch allocations are 16-byte aligned): without it the compiler cannot vectorize
# the tile loads or pipeline them through shared memory, and the report would describe a kernel
# that never runs. Token counts and chunk offsets are `do_not_specialize`: no hint.
_ALIGNED_INTS = frozenset({"H", "V", "stride_hn", "stride_wv", "stride_dz", "stride_db"})


def _aot_spec(kernel, types: dict[str, str], constexprs: dict, *, num_warps: int, num_stages: int,
              label: str) -> AotSpec:
    """Build an AotSpec: every argument of ``kernel`` is typed in ``types`` or valued in
    ``constexprs`` (a ``None`` pointer is a constexpr, as at run time)."""
    fn = kernel.fn  # the JITFunction under @triton.heuristics
    signature = {}
    for a in fn.arg_names:
        if a in constexprs:
            signature[a] = "constexpr"
        elif a in types:
            aligned = types[a].startswith("*") or a in _ALIGNED_INTS
            signature[a] = types[a] + (":16" if aligned else "")
        else:
            raise KeyError(f"{fn.__name__}: no AOT type for argument {a!r}")
    return AotSpec(name=fn.__name__, kernel=fn, signature=signature, constexprs=dict(constexprs),
                   num_warps=num_warps, num_stages=num_stages, label=label)


def _aot_specs() -> list[AotSpec]:
    """Every kernel at each config the launchers use by default, bf16 and fp32 inputs, in two
    feature sets: ``plain`` (log-probs only: no bias / soft-cap / entropy / zmean; backward
    with ``g_logp`` only) and ``full`` (everything on: the most registers)."""
    specs = []
    ints = dict.fromkeys(
        ["N", "V", "H", "stride_hn", "stride_wv", "blocks_per_split", "ignore_index", "n_splits",
         "n_lo", "n_count", "v_lo", "v_count", "stride_dz", "stride_db"], "i32")
    for dtype in (torch.bfloat16, torch.float32):
        ty = "*" + _TY[dtype]
        flags = {"INTERP_BF16": False, **_dot_flags_default(dtype)}
        for n in (C.LLP_SMALL_N_MAX, C.LLP_SMALL_N_MAX + 1):
            fc = fwd_config(n, 0, 0, dtype)
            bc = bwd_config(n, 0, 0, dtype)
            for full in (False, True):
                feat = "full" if full else "plain"
                opt = {} if full else {"p_b": None, "softcap": None}
                has = {"HAS_BIAS": full, "HAS_SOFTCAP": full}
                tiles = {"BN": fc.BN, "BV": fc.BV, "BD": fc.BD}
                label = f"{_TY[dtype]} {feat} BN={fc.BN} BV={fc.BV} BD={fc.BD} w{fc.num_warps} s{fc.num_stages}"
                specs.append(_aot_spec(
                    _linear_logprobs_fwd_kernel,
                    {**ints, "p_h": ty, "p_w": ty, "p_b": ty, "p_y": "*i64", "p_part": "*fp32",
                     "inv_temp": "fp32", "softcap": "fp32"},
                    {**opt, **has, **flags, **tiles, "NEED_ENT": full, "NEED_ZMEAN": full},
                    num_warps=fc.num_warps, num_stages=fc.num_stages, label=label,
                ))
                g_opt = {} if full else {"p_ent": None, "p_gent": None, "p_glse": None,
                                         "p_gzmean": None, "p_db": None}
                g_has = {"HAS_G_LOGP": True, "HAS_G_ENT": full, "HAS_G_LSE": full, "HAS_G_ZMEAN": full,
                         "HAS_DZ": True, "HAS_DB": full}
                tiles = {"BN": bc.BN, "BV": bc.BV, "BD": bc.BD}
                label = f"{_TY[dtype]} {feat} BN={bc.BN} BV={bc.BV} BD={bc.BD} w{bc.num_warps} s{bc.num_stages}"
                specs.append(_aot_spec(
                    _linear_logprobs_bwd_kernel,
                    {**ints, "p_h": ty, "p_w": ty, "p_b": ty, "p_y": "*i64", "p_lse": "*fp32",
                     "p_ent": "*fp32", "p_glogp": "*fp32", "p_gent": "*fp32", "p_glse": "*fp32",
                     "p_gzmean": "*fp32", "p_dz": ty, "p_db": "*fp32", "inv_temp": "fp32",
                     "softcap": "fp32"},
                    {**opt, **g_opt, **has, **g_has, **flags, **tiles},
                    num_warps=bc.num_warps, num_stages=bc.num_stages, label=label,
                ))
    for full in (False, True):
        opt = {} if full else {"p_ent": None, "p_zmean": None}
        specs.append(_aot_spec(
            _linear_logprobs_combine_kernel,
            {**ints, "p_part": "*fp32", "p_y": "*i64", "p_logp": "*fp32", "p_lse": "*fp32",
             "p_ent": "*fp32", "p_zmean": "*fp32"},
            {**opt, "HAS_ENT": full, "HAS_ZMEAN": full, "BN": C.LLP_COMBINE_BN},
            num_warps=C.LLP_COMBINE_NUM_WARPS, num_stages=1,
            label=f"fp32 {'full' if full else 'plain'} BN={C.LLP_COMBINE_BN} w{C.LLP_COMBINE_NUM_WARPS}",
        ))
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()
