r"""Fused linear log-probs: per-token log-probs, log-sum-exp, entropy and mean logit straight
from hidden states and the LM-head weight, never building the ``[N, V]`` logits.

Math (symbols as in the code; ``a`` logit scale, ``c`` soft-cap, ``T`` temperature, ``y``
targets; the options object is ``kernels/_common.py::LogitOptions``)::

    r      = h @ W.T + b                                   raw logits        [N, V]
    z      = c * tanh(a r / c) / T   (z = a r / T without a soft-cap)
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
    dr     = dz a / T * (1 - tanh(a r / c)^2)      (dz a / T without a soft-cap)
    dh = dr @ W        dW = dr.T @ h        db = sum_n dr

PyTorch equivalent, which builds the ``[N, V]`` logits this module avoids::

    z = softcap * torch.tanh(a * (h @ W.T + b).float() / softcap) / T
    logp = torch.log_softmax(z, -1).gather(-1, y[:, None])[:, 0]

Tiling idea (logits tile in SRAM, online log-sum-exp): Cut Cross-Entropy, arXiv 2411.09009.

How the work is tiled (block sizes and their reasons in ``kernels/constants.py``):

* forward ``_linear_logprobs_fwd_kernel``: grid (token blocks of ``BN``, vocab splits); each
  program loops over its vocab blocks of ``BV``, builds the ``[BN, BV]`` logits tile with
  ``tl.dot`` over the hidden axis in chunks of ``BD`` (fp32 accumulation whatever the input
  dtype) and folds it into the online statistics. It writes O(N * splits) fp32 partials;
  ``_linear_logprobs_combine_kernel`` turns them into the outputs. A token block whose rows
  are all ignored skips its matmuls.
* backward ``_linear_logprobs_bwd_kernel``: the (token block, vocab block) tiles of one chunk,
  in grouped order (``GROUP_N`` token blocks x all vocab blocks, then the next group);
  each program recomputes its logits tile, forms ``dr`` and stores it in the matmul dtype (fp32
  for fp16 inputs: ``workspace_dtype``) into a bounded workspace of one vocabulary chunk
  ``[N, vc]`` (plus fp32 column sums for ``db``).
  cuBLAS then contracts the chunk: ``dW[chunk] = dr.T @ h`` (each dW row written once, in the
  weight's dtype) and ``dh += dr @ W[chunk]`` (an fp32 ``[N, H]`` accumulator, O(N)). Nothing
  uses float atomics, so the backward is deterministic. The workspace holds
  ``max(N * H, 2**26)`` elements (at least ``N x BV``) and never spans the whole vocabulary,
  so no ``[N, V]``-shaped tensor exists on any path. One recomputation of the logits feeds all
  contractions: 6 N V H flops for the backward. A Triton-only backward keeping its
  accumulators on chip would recompute the logits once per hidden chunk of the accumulator
  (about ``H / 256`` times), and one with atomics (as in Cut Cross-Entropy) would not be
  deterministic.

Naming (FLA grammar): ``i_`` program ids, ``o_`` offsets, ``m_`` masks, ``p_`` pointers,
``b_`` on-chip tiles; ``N, V, H`` sizes; ``BN, BV, BD`` block sizes; ``HAS_*`` flags derived
from ``None``-ness by ``@triton.heuristics`` (launchers pass ``None``, never booleans).

Dtype and stride policy (``kernels/_common.py``): ``hidden`` and ``weight`` are bf16, fp16 or
fp32, any row stride, last dimension contiguous (asserted, never copied). They may differ (a
16-bit ``hidden`` with an fp32 master ``weight``, as under ``torch.autocast``): each tile of the
wider operand is rounded to the narrower dtype before the dot (``CAST_H`` / ``CAST_W``), the
workspace ``dr`` is in that matmul dtype, and each gradient is returned in its input's dtype.
Per-token vectors (``targets``, ``lse``, upstream gradients) are O(N) and are made contiguous
(fp32 for the float ones) when they are not. fp32 inputs use IEEE fp32 dots unless
``torch.get_float32_matmul_precision()`` allows TF32. Offsets are int64 wherever a program id
or row index multiplies a row length.

Interpreter note: under ``TRITON_INTERPRET=1`` (triton 3.9) ``tl.dot`` on bf16 operands is wrong
(triton issue 11584) and an fp32 -> bf16 cast truncates instead of rounding to nearest. With a
bf16 matmul dtype the launchers then set the constexpr ``INTERP_BF16``: dot operands are upcast
to fp32 and bf16 roundings are done by hand (``kernels/_jit.py``). It is never on for a GPU.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import torch
import triton

from . import _launch
from . import constants as C
from ._aot import (
    FEATURES,
    INDEX_POINTERS,
    OPTIONAL_OUTPUTS,
    TRITON_TYPE,
    AotSpec,
    aot_spec,
    grad_constexprs,
    stat_constexprs,
)
from ._common import (
    NOTHING_EXTRA,
    LogitOptions,
    StatRequest,
    TokenStats,
    autocast_off,
    check_linear_inputs,
    empty,
)
from .linear_logprobs_bwd import _linear_logprobs_bwd_kernel
from .linear_logprobs_fwd import N_PLANES, _linear_logprobs_combine_kernel, _linear_logprobs_fwd_kernel
from .linear_logprobs_sparse import (
    _linear_logprobs_dh_kernel,
    _linear_logprobs_dw_kernel,
    count_tiles,
    sparse_products,
)

__all__ = [
    "AOT_SPECS",
    "BwdConfig",
    "FwdConfig",
    "bwd_config",
    "fwd_config",
    "workspace_dtype",
    "linear_logprobs_bwd",
    "linear_logprobs_fwd",
]


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


def _bn_for(n: int, dtype: torch.dtype) -> int:
    if n <= C.LLP_SMALL_N_MAX:
        return C.LLP_BN_SMALL
    return C.LLP_BN_FP32 if dtype == torch.float32 else C.LLP_BN


@functools.lru_cache(maxsize=256)
def fwd_config(n: int, v: int, h: int, dtype: torch.dtype, topk: int = 0, plain: bool = False) -> FwdConfig:
    """Default forward config for matmul dtype ``dtype``: ``BN`` 16 for tiny batches, else 64
    (32 for fp32), ``BV`` 128, ``BD`` 64 for 16-bit / 32 for fp32 (same bytes per row). With a
    top-k the running list takes registers: ``BN`` at most ``LLP_BN_TOPK`` and 4 warps for a
    16-row tile. ``plain`` (bf16 operands of one dtype, no bias, soft-cap, extra statistic or
    top-k) from ``LLP_LARGE_N_MIN`` tokens on: 128-row tiles (the cost model in
    ``kernels/constants.py``). A pure function of its arguments, cached: a shape always gets the
    same config (no timing-based autotuning, so runs are reproducible). ``v``, ``h`` are accepted
    so the model can grow without changing callers."""
    del v, h
    if plain and dtype == torch.bfloat16 and n >= C.LLP_LARGE_N_MIN and not topk:
        return FwdConfig(C.LLP_BN_LARGE, C.LLP_BV, _bd_for(dtype), C.LLP_NUM_WARPS, C.LLP_NUM_STAGES)
    bn = _bn_for(n, dtype)
    warps = C.LLP_NUM_WARPS
    if topk:
        bn = min(bn, C.LLP_BN_TOPK)
        warps = C.LLP_NUM_WARPS_TOPK_SMALL if bn == C.LLP_BN_SMALL else warps
    return FwdConfig(bn, C.LLP_BV, _bd_for(dtype), warps, C.LLP_NUM_STAGES)


def fwd_candidates() -> list[tuple[torch.dtype, FwdConfig]]:
    """Every ``(matmul dtype, config)`` that :func:`fwd_config` can return (tests run each one;
    ``alignops kernels`` builds each one)."""
    out = []
    for dtype, n, topk, plain in itertools.product(
        (torch.bfloat16, torch.float16, torch.float32),
        (C.LLP_SMALL_N_MAX, C.LLP_SMALL_N_MAX + 1, C.LLP_LARGE_N_MIN),
        (0, 1),
        (False, True),
    ):
        cand = (dtype, fwd_config(n, 0, 0, dtype, topk, plain))
        if cand not in out:
            out.append(cand)
    return out


def combine_bn(topk: int) -> int:
    """Rows per program of the split-combine kernel (fewer with a top-k: its running list)."""
    return C.LLP_COMBINE_BN_TOPK if topk else C.LLP_COMBINE_BN


def bwd_config(n: int, v: int, h: int, dtype: torch.dtype) -> BwdConfig:
    """Default backward config: the forward's tile, workspace ``max(N * H, floor)`` elements."""
    del v
    ws = max(n * h, C.LLP_WORKSPACE_FLOOR_ELEMS)
    return BwdConfig(_bn_for(n, dtype), C.LLP_BV, _bd_for(dtype), C.LLP_NUM_WARPS, C.LLP_NUM_STAGES, ws)


def workspace_dtype(dot: torch.dtype) -> torch.dtype:
    """Dtype of the backward's raw-logit gradient workspace for matmul dtype ``dot``.

    fp16 gets an fp32 workspace. With a mean reduction the upstream gradient is ~1/N and ``dr``
    is ~p/N: stored in fp16 (smallest normal 6.1e-5, subnormals to 6e-8) most of it flushed to
    zero (98% of the values at N=8192, V=32000; dh relative error 6e-3 against 1.5e-4 for bf16).
    The two GEMMs then run on fp32 operands: fp16 hidden / weight widen exactly, and on CUDA they
    use TF32 tensor cores for that call (``_launch.tf32_products``), whose 10-bit mantissa is
    fp16's, so ``dr`` keeps fp16's precision with fp32's exponent range. bf16 has fp32's
    exponent range and keeps a bf16 workspace; fp32 keeps fp32."""
    return torch.float32 if dot == torch.float16 else dot


def programs_per_sm(cfg: FwdConfig, plain: bool) -> int:
    """Forward programs resident per SM (the occupancy the split count aims at): two for the
    plain forward at BN <= 64, one for the feature-rich builds and the 128-row tile (their
    register counts in the kernel report; ``kernels/constants.py``)."""
    return C.LLP_PROGRAMS_PER_SM if plain and cfg.BN <= C.LLP_BN else C.LLP_PROGRAMS_PER_SM_LARGE


def _num_splits(n_token_blocks: int, n_vocab_blocks: int, device: torch.device, per_sm: int = 2) -> int:
    """Vocab splits so that token blocks x splits reaches ~``per_sm`` programs per SM."""
    target = per_sm * _launch.sm_count(device)
    splits = triton.cdiv(target, n_token_blocks)
    return max(1, min(splits, n_vocab_blocks, C.LLP_MAX_SPLITS))


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _check(hidden, weight, targets, bias) -> tuple[int, int, int, torch.dtype]:
    """The shared input contract, plus what the kernels add: 2-D ``hidden``, int64 targets,
    16- or 32-bit floats, a CUDA device (or the interpreter)."""
    dot = check_linear_inputs(hidden, weight, targets, bias)
    if hidden.dim() != 2 or targets.dtype != torch.int64:
        raise ValueError(
            f"the launchers take hidden [N, H] and int64 targets [N], "
            f"got {tuple(hidden.shape)}, {targets.dtype}"
        )
    if dot == torch.float64:
        raise TypeError(
            "the Triton kernels take float16 / bfloat16 / float32 (float64 runs the torch engine)"
        )
    _launch.check_device(hidden)
    return hidden.shape[0], weight.shape[0], hidden.shape[1], dot


def _head_args(hidden, weight, bias, targets, opts: LogitOptions, dot: torch.dtype) -> dict:
    """The arguments the forward and backward kernels share: ``hidden [N, H]``, ``weight [V, H]``,
    ``bias [V]`` or None, ``targets [N]`` (contiguous), the logit options and the dot flags."""
    return dict(
        p_h=hidden,
        p_w=weight,
        p_b=bias,
        p_y=targets,
        V=weight.shape[0],
        H=weight.shape[1],
        stride_hn=hidden.stride(0),
        stride_wv=weight.stride(0),
        **_launch.option_args(opts),
        **_launch.dot_flags(hidden.dtype, weight.dtype, dot),
    )


@autocast_off
def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogitOptions,
    want: StatRequest = NOTHING_EXTRA,
    *,
    config: FwdConfig | None = None,
) -> TokenStats:
    """The :class:`TokenStats` that ``want`` asks for: ``[N]`` fp32 (top-k ``[N, K]``).

    hidden [N, H], weight [V, H] (bf16 / fp16 / fp32; mixed 16-bit / fp32 allowed), targets [N]
    int64, bias [V] or None. Targets must lie in ``[0, V)`` or equal ``opts.ignore_index``;
    that is not checked here (it would need a device sync; the caller checks). ``config``
    overrides the heuristic (benchmarks, tests).
    """
    n, v, h, dot = _check(hidden, weight, targets, bias)
    want = want.checked(v)
    dev = hidden.device
    stats = _launch.stat_outputs(n, want, dev)
    if n == 0:
        return stats
    plain = want == NOTHING_EXTRA and bias is None and opts.softcap is None and hidden.dtype == weight.dtype
    cfg = config or fwd_config(n, v, h, dot, want.topk, plain)
    targets = targets.contiguous()
    n_tb = triton.cdiv(n, cfg.BN)
    n_vb = triton.cdiv(v, cfg.BV)
    splits = cfg.num_splits or _num_splits(n_tb, n_vb, dev, programs_per_sm(cfg, plain))
    blocks_per_split = triton.cdiv(n_vb, max(1, min(splits, n_vb)))
    splits = triton.cdiv(n_vb, blocks_per_split)  # no empty split
    part = empty((N_PLANES, splits, n), dtype=torch.float32, device=dev)
    topk = _launch.topk_args(want)
    topv = empty((splits, n, topk["KP"]), dtype=torch.float32, device=dev) if want.topk else None
    topi = empty((splits, n, topk["KP"]), dtype=torch.int32, device=dev) if want.topk else None
    _launch.launch(
        _linear_logprobs_fwd_kernel,
        (n_tb, splits),
        **_head_args(hidden, weight, bias, targets, opts, dot),
        p_part=part,
        p_topv=topv,
        p_topi=topi,
        N=n,
        blocks_per_split=blocks_per_split,
        NEED_ENT=want.entropy,
        NEED_ZMEAN=want.zmean,
        NEED_S2=want.log_sum_p2,
        **topk,
        BN=cfg.BN,
        BV=cfg.BV,
        BD=cfg.BD,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    args = _launch.stat_args(stats, want)
    for k in ("NEED_ENT", "NEED_ZMEAN", "NEED_S2"):  # the combine kernel reads its outputs' None-ness
        del args[k]
    _launch.launch(
        _linear_logprobs_combine_kernel,
        (triton.cdiv(n, combine_bn(want.topk)),),
        p_part=part,
        p_topv=topv,
        p_topi=topi,
        p_y=targets,
        N=n,
        V=v,
        n_splits=splits,
        ignore_index=opts.ignore_index,
        **args,
        BN=combine_bn(want.topk),
        num_warps=C.LLP_COMBINE_NUM_WARPS,
        num_stages=C.LLP_COMBINE_NUM_STAGES,
    )
    return stats


@autocast_off
def linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    saved: TokenStats,
    grads: TokenStats,
    opts: LogitOptions,
    *,
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
    config: BwdConfig | None = None,
    grad_filter: float = 0.0,
    tile_stats: dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dhidden [N, H] | None, dweight [V, H] | None, dbias [V] | None)`` in the dtypes of
    hidden, weight and bias, of ``sum_k grads.k . stat_k``; ``saved`` holds the forward's ``lse``
    (and ``entropy`` / ``log_sum_p2`` where those get a gradient).

    ``grad_filter`` > 0: gradient filtering (``alignops.linear_logprobs``'s ``grad_filter``): a
    ``[BN, BV]`` tile whose probabilities are all below it and that holds no target of its rows
    adds nothing to dh, dW and db, and the block-sparse products skip it. ``tile_stats``: a
    dict that receives ``"live"`` and ``"tiles"`` (0-d int64 tensors on the device, no sync),
    added to what it holds.
    """
    n, v, h, dot = _check(hidden, weight, targets, bias)
    if need_dbias and bias is None:
        raise ValueError("need_dbias=True without a bias")
    dev = hidden.device
    ptrs = _launch.backward_args(saved, grads, n)
    dh = empty((n, h), dtype=hidden.dtype, device=dev) if need_dhidden else None
    dw = empty((v, h), dtype=weight.dtype, device=dev) if need_dweight else None
    db = empty((v,), dtype=bias.dtype, device=dev) if need_dbias else None
    if n == 0 or all(x is None for x in grads):
        for t in (dh, dw, db):
            if t is not None:
                t.zero_()
        return dh, dw, db

    cfg = config or bwd_config(n, v, h, dot)
    targets = targets.contiguous()
    common = dict(
        **_head_args(hidden, weight, bias, targets, opts, dot),
        **ptrs,
        BN=cfg.BN,
        BV=cfg.BV,
        BD=cfg.BD,
        GROUP_N=C.LLP_GROUP_N,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    n_tb = triton.cdiv(n, cfg.BN)
    ws_elems = max(cfg.workspace_elems, cfg.BN * cfg.BV)
    # Vocab chunks over all tokens. A chunk never spans the whole vocabulary (when V > BV), so
    # no [N, V]-shaped tensor exists even for small problems; one recomputation of the logits
    # feeds all three contractions: dW[chunk] = dr.T @ h, db[chunk] = column sums of dr and
    # dh += dr @ W[chunk] (accumulated in fp32: 6 N V H flops in all, never 8).
    vc = min(v, max(cfg.BV, ws_elems // n // cfg.BV * cfg.BV))
    if vc >= v and v > cfg.BV:
        vc = triton.cdiv(triton.cdiv(v, 2), cfg.BV) * cfg.BV
    ws_dtype = workspace_dtype(dot)
    ws = empty((n, vc), dtype=ws_dtype, device=dev)
    dbp = empty((n_tb, vc), dtype=torch.float32, device=dev) if need_dbias else None
    # GEMM operands in the workspace dtype: a hidden of another dtype is converted once (O(N H)),
    # a weight chunk by chunk (bounded by the workspace). fp16 operands widen to fp32 exactly.
    h_dot = hidden if hidden.dtype == ws_dtype else hidden.to(dot).to(ws_dtype)
    dh_acc = None
    if need_dhidden:
        dh_acc = dh if dh.dtype == torch.float32 else torch.zeros((n, h), dtype=torch.float32, device=dev)
        if dh_acc is dh:
            dh.zero_()
    live = None
    if grad_filter > 0.0:
        live = empty((n_tb, triton.cdiv(vc, cfg.BV)), dtype=torch.int8, device=dev)
    for v0 in range(0, v, vc):
        cnt = min(vc, v - v0)
        n_vb = triton.cdiv(cnt, cfg.BV)
        _launch.launch(
            _linear_logprobs_bwd_kernel,
            (n_tb * n_vb,),
            p_dr=ws,
            p_db=dbp,
            p_live=live,
            n_count=n,
            v_lo=v0,
            v_count=cnt,
            stride_dr=vc,
            stride_db=vc,
            stride_live=live.stride(0) if live is not None else 0,
            log_eps=math.log(grad_filter) if grad_filter > 0.0 else 0.0,
            **common,
        )
        if need_dbias:
            db[v0 : v0 + cnt] = dbp[:, :cnt].sum(dim=0)
        if live is not None:
            sparse_products(hidden, weight, ws, live, dh_acc, dw if need_dweight else None, v0, cnt, cfg, dot)
            if tile_stats is not None:
                count_tiles(tile_stats, live[:, :n_vb])
            continue
        dr = ws[:, :cnt]
        with _launch.tf32_products(ws_dtype != dot and dr.is_cuda):
            if need_dweight:
                if dw.dtype == ws_dtype:
                    torch.mm(dr.T, h_dot, out=dw[v0 : v0 + cnt])  # [cnt, N] @ [N, H]
                else:  # the product in the workspace dtype, then rounded / widened once
                    dw[v0 : v0 + cnt].copy_(dr.T @ h_dot)
            if dh_acc is not None:
                w_chunk = weight[v0 : v0 + cnt]
                if w_chunk.dtype != ws_dtype:
                    w_chunk = w_chunk.to(dot).to(ws_dtype)
                _launch.mm_accumulate_fp32(dh_acc, dr, w_chunk)
    if dh_acc is not None and dh_acc is not dh:
        dh.copy_(dh_acc)
    return dh, dw, db


# ----------------------------------------------------------------------------------------------
# ahead-of-time build descriptions
# ----------------------------------------------------------------------------------------------


def _aot_specs() -> list[AotSpec]:
    """Every kernel at each config the default heuristics pick (BN 16 and 64; 16 and 32 with a
    top-k), bf16 and fp32 matmul dtypes (IEEE fp32 dots: torch's default matmul precision), for
    the feature sets of ``_aot.FEATURES``; the ``full`` bf16 builds take a bf16 hidden with an
    fp32 master weight (mixed precision: the most registers)."""
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        ty = TRITON_TYPE[dtype]
        for n in (C.LLP_SMALL_N_MAX, C.LLP_SMALL_N_MAX + 1):
            for feat, full, topk in FEATURES:
                mixed = full and dtype != torch.float32
                ptrs = {**INDEX_POINTERS, "p_h": ty, "p_w": "fp32" if mixed else ty, "p_b": ty, "p_dr": ty}
                ptrs["p_live"] = "i8"
                common = {"HAS_BIAS": full, "HAS_SOFTCAP": full, "CAST_H": False, "CAST_W": mixed}
                common |= {"INTERP_BF16": False, "INPUT_PRECISION": "ieee"}
                common |= {} if full else {"p_b": None, "softcap": None}
                fwd = {k: x for k, x in stat_constexprs(full, topk).items() if k not in OPTIONAL_OUTPUTS}
                fwd |= {} if topk else {"p_topv": None, "p_topi": None}
                builds = [(_linear_logprobs_fwd_kernel, fwd_config(n, 0, 0, dtype, topk), fwd)]
                if feat == "plain" and dtype == torch.bfloat16 and n > C.LLP_SMALL_N_MAX:
                    large = fwd_config(C.LLP_LARGE_N_MIN, 0, 0, dtype, 0, plain=True)
                    builds.append((_linear_logprobs_fwd_kernel, large, fwd))
                if not topk:  # the backward does not depend on the top-k
                    bwd = grad_constexprs(full) | {"HAS_DB": full, "GROUP_N": C.LLP_GROUP_N}
                    bwd |= {} if full else {"p_db": None}
                    cfg = bwd_config(n, 0, 0, dtype)
                    builds.append(
                        (_linear_logprobs_bwd_kernel, cfg, bwd | {"HAS_FILTER": False, "p_live": None})
                    )
                    if dtype != torch.float32:  # gradient filtering: on by default for 16-bit
                        builds.append((_linear_logprobs_bwd_kernel, cfg, bwd | {"HAS_FILTER": True}))
                for kernel, cfg, extra in builds:
                    cx = {**common, **extra, "BN": cfg.BN, "BV": cfg.BV, "BD": cfg.BD}
                    label = f"{ty} {feat}{' mixed' if mixed else ''}"
                    label += (
                        f"{' filter' if extra.get('HAS_FILTER') else ''} BN={cfg.BN} BV={cfg.BV} BD={cfg.BD}"
                    )
                    label += f" w{cfg.num_warps} s{cfg.num_stages}"
                    specs.append(
                        aot_spec(
                            kernel,
                            cx,
                            pointer_types=ptrs,
                            warps=cfg.num_warps,
                            stages=cfg.num_stages,
                            label=label,
                        )
                    )
    specs += _sparse_aot_specs()
    for feat, full, topk in FEATURES:
        cx = {k: x for k, x in stat_constexprs(full, topk).items() if not k.startswith("NEED_")}
        cx |= {"BN": combine_bn(topk), "HAS_ENT": full, "HAS_ZMEAN": full, "HAS_S2": full}
        cx |= {} if topk else {"p_topv": None, "p_topi": None}
        label = f"fp32 {feat} BN={cx['BN']} w{C.LLP_COMBINE_NUM_WARPS} s1"
        warps, stages = C.LLP_COMBINE_NUM_WARPS, C.LLP_COMBINE_NUM_STAGES
        kernel = _linear_logprobs_combine_kernel
        specs.append(
            aot_spec(kernel, cx, pointer_types=INDEX_POINTERS, warps=warps, stages=stages, label=label)
        )
    return specs


def _sparse_aot_specs() -> list[AotSpec]:
    """The block-sparse products of gradient filtering at the backward's tiles (BN 16 / 64, 32 for
    fp32, BV 128): a bf16
    workspace with a bf16 and an fp32 master operand, the fp32 workspace of fp16 inputs (TF32
    dots) and fp32 inputs (IEEE dots)."""
    specs = []
    cases = (  # label, workspace, other operand, dW, WIDE_DR, input precision
        ("bf16", "bf16", "bf16", "bf16", False, "ieee"),
        ("bf16 mixed", "bf16", "fp32", "fp32", False, "ieee"),
        ("fp16 fp32-workspace", "fp32", "fp16", "fp16", True, "tf32"),
        ("fp32", "fp32", "fp32", "fp32", False, "ieee"),
    )
    for (label, ws, other, dw, wide, prec), n in itertools.product(
        cases, (C.LLP_SMALL_N_MAX, C.LLP_SMALL_N_MAX + 1)
    ):
        bh = C.LLP_SPARSE_BH_FP32 if ws == "fp32" else C.LLP_SPARSE_BH
        bn = _bn_for(n, torch.float32 if label == "fp32" else torch.bfloat16)
        cx = {
            "WIDE_DR": wide,
            "INTERP_BF16": False,
            "INPUT_PRECISION": prec,
            "BN": bn,
            "BV": C.LLP_BV,
            "BH": bh,
        }
        kernels = (
            (_linear_logprobs_dh_kernel, {"p_w": other}, {"CAST_W": other != ws}),
            (
                _linear_logprobs_dw_kernel,
                {"p_h": other, "p_dw": dw},
                {"CAST_H": other != ws, "OUT_BF16_INTERP": False},
            ),
        )
        for kernel, ptrs, extra in kernels:
            ptrs = {"p_dr": ws, "p_live": "i8", "p_acc": "fp32", **ptrs}
            name = f"{label} BN={bn} BV={C.LLP_BV} BH={bh} w{C.LLP_NUM_WARPS} s{C.LLP_SPARSE_NUM_STAGES}"
            specs.append(
                aot_spec(
                    kernel,
                    cx | extra,
                    pointer_types=ptrs,
                    warps=C.LLP_NUM_WARPS,
                    stages=C.LLP_SPARSE_NUM_STAGES,
                    label=name,
                )
            )
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()
