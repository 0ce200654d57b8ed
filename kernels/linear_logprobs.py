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

PyTorch equivalent, which builds the ``[N, V]`` logits this module avoids::

    z = (softcap * torch.tanh((h @ W.T + b).float() / softcap)) / T
    logp = torch.log_softmax(z, -1).gather(-1, y[:, None])[:, 0]

Tiling idea (logits tile in SRAM, online log-sum-exp): Cut Cross-Entropy, arXiv 2411.09009.

How the work is tiled (block sizes and their reasons in ``kernels/constants.py``):

* forward ``_linear_logprobs_fwd_kernel``: grid (token blocks of ``BN``, vocab splits); each
  program loops over its vocab blocks of ``BV``, builds the ``[BN, BV]`` logits tile with
  ``tl.dot`` over the hidden axis in chunks of ``BD`` (fp32 accumulation whatever the input
  dtype) and folds it into the online statistics. It writes O(N * splits) fp32 partials;
  ``_linear_logprobs_combine_kernel`` turns them into the outputs. A token block whose rows
  are all ignored skips its matmuls.
* backward ``_linear_logprobs_bwd_kernel``: grid (token blocks, vocab blocks) of one chunk;
  each program recomputes its logits tile, forms ``dr`` and stores it in the input dtype into
  a bounded workspace of one vocabulary chunk ``[N, vc]`` (plus fp32 column sums for ``db``).
  cuBLAS then contracts the chunk: ``dW[chunk] = dr.T @ h`` (each dW row written once, in the
  weight's dtype) and ``dh += dr @ W[chunk]`` (an fp32 ``[N, H]`` accumulator, O(N)). Nothing
  uses float atomics, so the backward is deterministic. The workspace holds
  ``max(N * H, 2**26)`` elements (at least ``N x BV``) and never spans the whole vocabulary,
  so no ``[N, V]``-shaped tensor exists on any path. One recomputation of the logits feeds all
  contractions: 6 N V H flops for the backward. A Triton-only backward keeping its accumulators on chip
  would recompute the logits once per hidden chunk of the accumulator (about ``H / 256``
  times), and one with atomics (as in Cut Cross-Entropy) would not be deterministic.

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

import functools
import os
from typing import NamedTuple

import torch
import triton

from ._common import empty

from . import constants as C
from ._aot import AotSpec
from .linear_logprobs_bwd import _linear_logprobs_bwd_kernel
from .linear_logprobs_fwd import _linear_logprobs_combine_kernel, _linear_logprobs_fwd_kernel

__all__ = [
    "AOT_SPECS",
    "BwdConfig",
    "FwdConfig",
    "bwd_config",
    "fwd_config",
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


def fwd_config(n: int, v: int, h: int, dtype: torch.dtype) -> FwdConfig:
    """Default forward config: ``BN`` 16 for tiny batches, else 64 (32 for fp32), ``BV`` 128,
    ``BD`` 64 for 16-bit inputs / 32 for fp32 (same bytes per row). ``v``, ``h`` are accepted
    so the heuristic can grow without changing callers."""
    del v, h
    return FwdConfig(_bn_for(n, dtype), C.LLP_BV, _bd_for(dtype), C.LLP_NUM_WARPS, C.LLP_NUM_STAGES)


def bwd_config(n: int, v: int, h: int, dtype: torch.dtype) -> BwdConfig:
    """Default backward config: the forward's tile, workspace ``max(N * H, floor)`` elements."""
    del v
    ws = max(n * h, C.LLP_WORKSPACE_FLOOR_ELEMS)
    return BwdConfig(_bn_for(n, dtype), C.LLP_BV, _bd_for(dtype), C.LLP_NUM_WARPS, C.LLP_NUM_STAGES, ws)


def _mm_accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with an fp32 accumulator ``acc`` and fp32 products.

    16-bit operands: cuBLAS with an fp32 output where torch offers it (``out_dtype``),
    else the operands are upcast (bounded: one workspace chunk and one weight chunk).
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (TypeError, RuntimeError):
            pass
    acc.addmm_(a.float(), b.float())


@functools.lru_cache(maxsize=16)
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
    """``INTERP_BF16`` (interpreter workarounds, module docstring) and the fp32 dot precision:
    TF32 only where torch's float32 matmul precision allows it (default "highest": IEEE)."""
    interp_bf16 = _interpreting() and dtype == torch.bfloat16
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return {"INTERP_BF16": interp_bf16, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}


def _check_inputs(hidden, weight, targets, bias, temperature, softcap) -> tuple[int, int, int]:
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("hidden and weight must be tensors")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"hidden size mismatch: hidden [{n}, {h}] vs weight {tuple(weight.shape)}")
    if v == 0 or h == 0:
        raise ValueError(f"empty vocab or hidden size: V={v}, H={h}")
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(
            f"hidden and weight must share one dtype of {_DTYPES}, got {hidden.dtype}, {weight.dtype}"
        )
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
    or None. Targets must lie in ``[0, V)`` or equal ``ignore_index``; that is not checked here
    (it would need a device sync; the caller checks). ``config`` overrides the heuristic
    (benchmarks, tests).
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
        _linear_logprobs_fwd_kernel,
        (n_tb, splits),
        p_h=hidden,
        p_w=weight,
        p_b=bias,
        p_y=targets,
        p_part=part,
        N=n,
        V=v,
        H=h,
        stride_hn=hidden.stride(0),
        stride_wv=weight.stride(0),
        blocks_per_split=blocks_per_split,
        ignore_index=ignore_index,
        inv_temp=1.0 / temperature,
        softcap=softcap,
        NEED_ENT=need_entropy,
        NEED_ZMEAN=need_zmean,
        **_dot_flags(hidden.dtype),
        BN=cfg.BN,
        BV=cfg.BV,
        BD=cfg.BD,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    _launch(
        _linear_logprobs_combine_kernel,
        (triton.cdiv(n, C.LLP_COMBINE_BN),),
        p_part=part,
        p_y=targets,
        p_logp=logp,
        p_lse=lse,
        p_ent=ent,
        p_zmean=zmean,
        N=n,
        V=v,
        n_splits=splits,
        ignore_index=ignore_index,
        BN=C.LLP_COMBINE_BN,
        num_warps=C.LLP_COMBINE_NUM_WARPS,
        num_stages=C.LLP_COMBINE_NUM_STAGES,
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
        p_h=hidden,
        p_w=weight,
        p_b=bias,
        p_y=targets,
        p_lse=lse,
        p_ent=entropy if g_ent is not None else None,
        p_glogp=g_logp,
        p_gent=g_ent,
        p_glse=g_lse,
        p_gzmean=g_zmean,
        V=v,
        H=h,
        stride_hn=hidden.stride(0),
        stride_wv=weight.stride(0),
        ignore_index=ignore_index,
        inv_temp=1.0 / temperature,
        softcap=softcap,
        **_dot_flags(hidden.dtype),
        BN=cfg.BN,
        BV=cfg.BV,
        BD=cfg.BD,
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
    ws = empty((n, vc), dtype=hidden.dtype, device=dev)
    dbp = empty((n_tb, vc), dtype=torch.float32, device=dev) if need_dbias else None
    dh_acc = None
    if need_dhidden:
        dh_acc = dh if dh.dtype == torch.float32 else torch.zeros((n, h), dtype=torch.float32, device=dev)
        if dh_acc is dh:
            dh.zero_()
    for v0 in range(0, v, vc):
        cnt = min(vc, v - v0)
        _launch(
            _linear_logprobs_bwd_kernel,
            (n_tb, triton.cdiv(cnt, cfg.BV)),
            p_dz=ws,
            p_db=dbp,
            n_lo=0,
            n_count=n,
            v_lo=v0,
            v_count=cnt,
            stride_dz=vc,
            stride_db=vc,
            **common,
        )
        dr = ws[:, :cnt]
        if need_dweight:
            torch.mm(dr.T, hidden, out=dw[v0 : v0 + cnt])  # [cnt, N] @ [N, H]
        if need_dbias:
            db[v0 : v0 + cnt] = dbp[:, :cnt].sum(dim=0)
        if dh_acc is not None:
            _mm_accumulate_fp32(dh_acc, dr, weight[v0 : v0 + cnt])  # [N, cnt] @ [cnt, H]
    if dh_acc is not None and dh_acc is not dh:
        dh.copy_(dh_acc)
    return dh, dw, db


# ----------------------------------------------------------------------------------------------
# ahead-of-time build descriptions
# ----------------------------------------------------------------------------------------------

_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_INPUT_DTYPE_PTRS = frozenset({"p_h", "p_w", "p_b", "p_dz"})  # pointers in the input dtype
_FLOAT_ARGS = frozenset({"inv_temp", "softcap"})

# Integer arguments that real models make multiples of 16 (hidden size, vocab, row strides,
# workspace strides), so the JIT specializes them as such at run time. Their AOT type carries
# Triton's ":16" divisibility hint (the notation of triton/tools/compile.py), as do all
# pointers (torch allocations are 16-byte aligned): without it the compiler cannot vectorize
# the tile loads or pipeline them through shared memory, and the report would describe a kernel
# that never runs. Token counts and chunk offsets are `do_not_specialize`: no hint.
_ALIGNED_INTS = frozenset({"H", "V", "stride_hn", "stride_wv", "stride_dz", "stride_db"})


def _aot_spec(
    kernel, dtype: torch.dtype, constexprs: dict, *, warps: int, stages: int, label: str
) -> AotSpec:
    """An AotSpec from argument names: ``p_y`` is ``*i64``; ``p_h, p_w, p_b, p_dz`` are in the
    input dtype, other pointers fp32; ``inv_temp, softcap`` fp32; other arguments i32. A ``None``
    pointer or soft-cap is a constexpr, as at run time."""
    fn = kernel.fn  # the JITFunction under @triton.heuristics
    signature = {}
    for a in fn.arg_names:
        if a in constexprs:
            signature[a] = "constexpr"
        elif a.startswith("p_"):
            ty = "i64" if a == "p_y" else _TY[dtype] if a in _INPUT_DTYPE_PTRS else "fp32"
            signature[a] = f"*{ty}:16"
        elif a in _FLOAT_ARGS:
            signature[a] = "fp32"
        else:
            signature[a] = "i32:16" if a in _ALIGNED_INTS else "i32"
    return AotSpec(
        name=fn.__name__,
        kernel=fn,
        signature=signature,
        constexprs=dict(constexprs),
        num_warps=warps,
        num_stages=stages,
        label=label,
    )


def _aot_specs() -> list[AotSpec]:
    """Every kernel at each config the default heuristics pick (BN 16 and 64), bf16 and fp32
    inputs (IEEE fp32 dots: torch's default matmul precision), in two feature sets: ``plain``
    (log-probs only: no bias / soft-cap / entropy / zmean; backward with ``g_logp`` only) and
    ``full`` (everything on: the most registers)."""
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        for n in (C.LLP_SMALL_N_MAX, C.LLP_SMALL_N_MAX + 1):
            for full in (False, True):
                feat = "full" if full else "plain"
                common = {
                    "HAS_BIAS": full,
                    "HAS_SOFTCAP": full,
                    "INTERP_BF16": False,
                    "INPUT_PRECISION": "ieee",
                }
                if not full:
                    common |= {"p_b": None, "softcap": None}
                fc = fwd_config(n, 0, 0, dtype)
                cx = {**common, "NEED_ENT": full, "NEED_ZMEAN": full, "BN": fc.BN, "BV": fc.BV, "BD": fc.BD}
                label = (
                    f"{_TY[dtype]} {feat} BN={fc.BN} BV={fc.BV} BD={fc.BD} w{fc.num_warps} s{fc.num_stages}"
                )
                specs.append(
                    _aot_spec(
                        _linear_logprobs_fwd_kernel,
                        dtype,
                        cx,
                        warps=fc.num_warps,
                        stages=fc.num_stages,
                        label=label,
                    )
                )
                bc = bwd_config(n, 0, 0, dtype)
                cx = {**common, "BN": bc.BN, "BV": bc.BV, "BD": bc.BD, "HAS_G_LOGP": True, "HAS_DZ": True}
                cx |= dict.fromkeys(("HAS_G_ENT", "HAS_G_LSE", "HAS_G_ZMEAN", "HAS_DB"), full)
                if not full:
                    cx |= dict.fromkeys(("p_ent", "p_gent", "p_glse", "p_gzmean", "p_db"))
                label = (
                    f"{_TY[dtype]} {feat} BN={bc.BN} BV={bc.BV} BD={bc.BD} w{bc.num_warps} s{bc.num_stages}"
                )
                specs.append(
                    _aot_spec(
                        _linear_logprobs_bwd_kernel,
                        dtype,
                        cx,
                        warps=bc.num_warps,
                        stages=bc.num_stages,
                        label=label,
                    )
                )
    for full in (False, True):
        cx = {"HAS_ENT": full, "HAS_ZMEAN": full, "BN": C.LLP_COMBINE_BN}
        if not full:
            cx |= {"p_ent": None, "p_zmean": None}
        label = f"fp32 {'full' if full else 'plain'} BN={C.LLP_COMBINE_BN} w{C.LLP_COMBINE_NUM_WARPS} s1"
        specs.append(
            _aot_spec(
                _linear_logprobs_combine_kernel,
                torch.float32,
                cx,
                warps=C.LLP_COMBINE_NUM_WARPS,
                stages=C.LLP_COMBINE_NUM_STAGES,
                label=label,
            )
        )
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()
