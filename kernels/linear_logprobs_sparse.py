"""Block-sparse products of the linear log-prob backward (gradient filtering); the math, the
tiling and the naming grammar are in the docstring of ``kernels/linear_logprobs.py``.

With filtering on, the backward kernel marks each ``[BN, BV]`` tile of a vocabulary chunk live
or dead (``p_live`` [token blocks, vocab blocks] int8) and leaves dead tiles of the workspace
unwritten. These two kernels contract the chunk over the live tiles only:

* `_linear_logprobs_dh_kernel`: grid (token blocks, hidden blocks); each program owns one
  ``[BN, BH]`` tile of the fp32 accumulator ``dh`` and adds ``dr[rows, tile] @ W[tile]`` for the
  live vocabulary tiles of its token block, in vocabulary order.
* `_linear_logprobs_dw_kernel`: grid (vocab blocks, hidden blocks); each program owns one
  ``[BV, BH]`` tile of ``dW`` (written once, in the weight's dtype) and sums
  ``dr[tile].T @ h[tile]`` over the live token blocks of its vocabulary block, in token order.

Every output tile has one owner and a fixed summation order: no atomics, deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from . import constants as C
from ._jit import block_range, dot_operands, for_store


@triton.jit
def _operands(b_dr, b_x, CAST_X: tl.constexpr, WIDE_DR: tl.constexpr, INTERP_BF16: tl.constexpr):
    """The two dot operands: ``WIDE_DR`` (fp16 inputs, fp32 workspace): ``x`` rounded to fp16
    (a wider master copy) and widened to fp32; else both in the matmul dtype (``dot_operands``)."""
    if WIDE_DR:
        return b_dr, b_x.to(tl.float16).to(tl.float32)
    return dot_operands(b_dr, b_x, False, CAST_X, INTERP_BF16)


@triton.jit(do_not_specialize=["n_count", "v_lo", "v_count", "n_vb"])
def _linear_logprobs_dh_kernel(
    p_dr,
    p_w,
    p_live,
    p_acc,
    n_count,
    v_lo,
    v_count,
    n_vb,
    H,
    stride_dr,
    stride_wv,
    stride_live,
    CAST_W: tl.constexpr,
    WIDE_DR: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BH: tl.constexpr,
):
    """``acc[rows, cols] += sum over live tiles of dr[rows, tile] @ W[v_lo + tile, cols]``;
    ``acc`` [n_count, H] fp32 contiguous, ``dr`` [n_count, v_count] (row stride ``stride_dr``)."""
    # program ids multiply row lengths: int64 from here on
    i_n = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    o_n, m_n = block_range(i_n, BN, n_count)
    o_h, m_h = block_range(i_h, BH, H)
    p_out = p_acc + o_n[:, None] * H + o_h[None, :]
    m_out = m_n[:, None] & m_h[None, :]
    b_acc = tl.load(p_out, mask=m_out, other=0.0)
    for i_v in range(0, n_vb):
        if tl.load(p_live + i_n * stride_live + i_v) != 0:
            o_c, m_c = block_range(i_v, BV, v_count)
            b_dr = tl.load(
                p_dr + o_n[:, None] * stride_dr + o_c[None, :], mask=m_n[:, None] & m_c[None, :], other=0.0
            )
            p_wt = p_w + (v_lo + o_c)[:, None] * stride_wv + o_h[None, :]
            b_w = tl.load(p_wt, mask=m_c[:, None] & m_h[None, :], other=0.0)
            b_dr, b_w = _operands(b_dr, b_w, CAST_W, WIDE_DR, INTERP_BF16)
            # [BN, BV] @ [BV, BH] -> [BN, BH]
            b_acc = tl.dot(b_dr, b_w, b_acc, input_precision=INPUT_PRECISION)
    tl.store(p_out, b_acc, mask=m_out)


@triton.jit(do_not_specialize=["n_count", "v_lo", "v_count", "n_tb"])
def _linear_logprobs_dw_kernel(
    p_dr,
    p_h,
    p_live,
    p_dw,
    n_count,
    v_lo,
    v_count,
    n_tb,
    H,
    stride_dr,
    stride_hn,
    stride_live,
    CAST_H: tl.constexpr,
    WIDE_DR: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    OUT_BF16_INTERP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BH: tl.constexpr,
):
    """``dW[v_lo + tile, cols] = sum over live token blocks of dr[rows, tile].T @ h[rows, cols]``
    (0 where no block is live), stored in ``p_dw``'s dtype; ``dW`` rows contiguous, length H.
    ``OUT_BF16_INTERP``: a bf16 ``dW`` under the interpreter (rounded by hand, ``for_store``)."""
    # program ids multiply row lengths: int64 from here on
    i_v = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    o_c, m_c = block_range(i_v, BV, v_count)
    o_h, m_h = block_range(i_h, BH, H)
    b_acc = tl.zeros((BV, BH), dtype=tl.float32)
    for i_n in range(0, n_tb):
        if tl.load(p_live + i_n * stride_live + i_v) != 0:
            o_n, m_n = block_range(i_n, BN, n_count)
            b_dr = tl.load(
                p_dr + o_n[:, None] * stride_dr + o_c[None, :], mask=m_n[:, None] & m_c[None, :], other=0.0
            )
            b_h = tl.load(
                p_h + o_n[:, None] * stride_hn + o_h[None, :], mask=m_n[:, None] & m_h[None, :], other=0.0
            )
            b_dr, b_h = _operands(b_dr, b_h, CAST_H, WIDE_DR, INTERP_BF16)
            # [BV, BN] @ [BN, BH] -> [BV, BH]
            b_acc = tl.dot(tl.trans(b_dr), b_h, b_acc, input_precision=INPUT_PRECISION)
    p_out = p_dw + (v_lo + o_c)[:, None] * H + o_h[None, :]
    tl.store(p_out, for_store(b_acc, p_dw, OUT_BF16_INTERP), mask=m_c[:, None] & m_h[None, :])


# ----------------------------------------------------------------------------------------------
# launchers (called by kernels/linear_logprobs.py::linear_logprobs_bwd)
# ----------------------------------------------------------------------------------------------


def count_tiles(tile_stats: dict, live: torch.Tensor) -> None:
    for key, x in (
        ("live", live.sum(dtype=torch.int64)),
        ("tiles", live.new_tensor(live.numel(), dtype=torch.int64)),
    ):
        tile_stats[key] = tile_stats[key] + x if key in tile_stats else x


def sparse_products(hidden, weight, ws, live, dh_acc, dw, v0: int, cnt: int, cfg, dot) -> None:
    """``dh_acc += dr @ W[chunk]`` and ``dW[chunk] = dr.T @ h`` over the live tiles of the chunk
    (``kernels/linear_logprobs_sparse.py``); fp16 inputs run fp32 (TF32 on a GPU) dots on the
    fp32 workspace, exactly as the dense path does."""
    n, h = hidden.shape
    wide = ws.dtype != dot
    flags = dict(
        WIDE_DR=wide,
        INTERP_BF16=_launch.interpreting() and ws.dtype == torch.bfloat16,
        INPUT_PRECISION="tf32"
        if wide and not _launch.interpreting()
        else _launch.dot_flags(dot, dot, dot)["INPUT_PRECISION"],
        BN=cfg.BN,
        BV=cfg.BV,
        BH=C.LLP_SPARSE_BH_FP32 if ws.dtype == torch.float32 else C.LLP_SPARSE_BH,
        num_warps=C.LLP_NUM_WARPS,
        num_stages=C.LLP_SPARSE_NUM_STAGES,
    )
    n_tb, n_vb, n_hb = live.shape[0], triton.cdiv(cnt, cfg.BV), triton.cdiv(h, flags["BH"])
    common = dict(p_dr=ws, p_live=live, n_count=n, v_lo=v0, v_count=cnt, H=h, stride_dr=ws.stride(0))
    common |= dict(stride_live=live.stride(0), **flags)
    if dh_acc is not None:
        _launch.launch(
            _linear_logprobs_dh_kernel,
            (n_tb, n_hb),
            p_w=weight,
            p_acc=dh_acc,
            n_vb=n_vb,
            stride_wv=weight.stride(0),
            CAST_W=weight.dtype != ws.dtype,
            **common,
        )
    if dw is not None:
        _launch.launch(
            _linear_logprobs_dw_kernel,
            (n_vb, n_hb),
            p_h=hidden,
            p_dw=dw,
            n_tb=n_tb,
            stride_hn=hidden.stride(0),
            CAST_H=hidden.dtype != ws.dtype,
            OUT_BF16_INTERP=_launch.interpreting() and dw.dtype == torch.bfloat16,
            **common,
        )
