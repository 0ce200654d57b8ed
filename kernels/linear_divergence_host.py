"""Host-side helpers of the two-head divergence launchers (``kernels/linear_divergence.py``,
whose docstring has the math, the passes and the tiling): the kind codes, configs, input
checks, the kernels' shared arguments, the passes common to the linear and the logits
launchers, the backward's row coefficients and the per-chunk GEMMs.
"""

from __future__ import annotations

import torch
import triton

from . import _launch
from . import constants as C
from ._common import (
    DivergenceOptions,
    DivStats,
    LogitOptions,
    check_divergence_inputs,
    check_logits_pair,
    empty,
)
from .linear_divergence_fwd import (
    ALPHA,
    CHI2,
    FKL,
    HELLINGER,
    JSD,
    N_PLANES,
    RKL,
    TV,
    _linear_divergence_combine_kernel,
    _linear_divergence_stats_kernel,
    _linear_divergence_sum_kernel,
)
from .linear_logprobs import BwdConfig, FwdConfig

# f-divergence generators as (kind code, parameter): see the module docstring
_GENERATORS = {
    "kl": (RKL.value, 0.0),
    "reverse_kl": (FKL.value, 0.0),
    "hellinger": (HELLINGER.value, 0.0),
    "chi2": (CHI2.value, 0.0),
    "js": (JSD.value, 0.5),
    "tv": (TV.value, 0.0),
}
#: Kinds whose backward takes a reduction pass for ``c_p`` (the others have it in closed form).
_NEEDS_CP_PASS = (JSD.value, TV.value)


def kind_code(div: DivergenceOptions) -> tuple[int, float]:
    """``(KIND, param)`` of the kernels for ``div``: beta 0 / 1 and alpha 0 / 1 are the two KLs."""
    k = div.kind
    if k == "forward_kl":
        return FKL.value, 0.0
    if k == "reverse_kl":
        return RKL.value, 0.0
    if k == "jsd":
        return _mixture_code(JSD.value, div.beta)
    if k == "tv":
        return TV.value, 0.0
    if k == "alpha":
        return _mixture_code(ALPHA.value, div.alpha)
    return _GENERATORS[div.generator]


def _mixture_code(kind: int, param: float) -> tuple[int, float]:
    """``(KIND, param)`` of a family whose parameter 0 / 1 is KL(q||p) / KL(p||q) (JSD's beta,
    the alpha divergence's alpha)."""
    if param == 0.0:
        return FKL.value, 0.0
    if param == 1.0:
        return RKL.value, 0.0
    return kind, param


def _zero_side(kind: int, param: float) -> int:
    """Which head's zero probabilities make the divergence infinite where the other head has mass:
    1 ``p`` (KL(q||p), alpha < 0), 2 ``q`` (KL(p||q), alpha > 1, chi2), 0 neither (always finite)."""
    if kind == FKL.value or (kind == ALPHA.value and param < 0.0):
        return 1
    if kind in (RKL.value, CHI2.value) or (kind == ALPHA.value and param > 1.0):
        return 2
    return 0


def _kl_mode(kind: int) -> int:
    """Pass-1 KL accumulator: 1 weighted by ``q`` (KL(q||p)), 2 by ``p`` (KL(p||q)), 0 none."""
    return {FKL.value: 1, RKL.value: 2}.get(kind, 0)


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------


def _tile(n: int, dot_p: torch.dtype, dot_q: torch.dtype) -> tuple[int, int, int]:
    """``(BN, BD, stages)``: 64-row token blocks of 16-bit matmuls, 16 rows for tiny batches and
    fp32 matmuls (fp32 hidden chunks ``BD`` if either head's matmul is fp32)."""
    fp32 = torch.float32 in (dot_p, dot_q)
    bd = C.LLP_BD_FP32 if fp32 else C.LLP_BD_16BIT
    if n <= C.LLP_SMALL_N_MAX or fp32:
        return C.LDIV_BN_FP32 if fp32 else C.LLP_BN_SMALL, bd, C.LDIV_NUM_STAGES_SMALL
    return C.LLP_BN, bd, C.LDIV_NUM_STAGES


def fwd_config(n: int, dot_p: torch.dtype, dot_q: torch.dtype) -> FwdConfig:
    """Default config of the forward passes (``_tile``), vocab block ``LDIV_BV``, 8 warps."""
    bn, bd, stages = _tile(n, dot_p, dot_q)
    return FwdConfig(bn, C.LDIV_BV, bd, C.LDIV_NUM_WARPS, stages)


def bwd_config(n: int, h: int, dot_p: torch.dtype, dot_q: torch.dtype) -> BwdConfig:
    """Default backward config: the forward's tile, workspace ``max(N * H, floor)`` elements in
    all (split between the heads when both get a gradient)."""
    bn, bd, stages = _tile(n, dot_p, dot_q)
    ws = max(n * h, C.LLP_WORKSPACE_FLOOR_ELEMS)
    return BwdConfig(bn, C.LDIV_BV, bd, C.LDIV_NUM_WARPS, stages, ws)


def logits_config() -> FwdConfig:
    """Config of the logits launchers' passes (no matmul: ``BD`` unused)."""
    return FwdConfig(C.LDIV_LOGITS_BN, C.LDIV_LOGITS_BV, 16, C.LDIV_NUM_WARPS, C.LDIV_LOGITS_NUM_STAGES)


def _num_splits(n_token_blocks: int, n_vocab_blocks: int, device: torch.device) -> int:
    target = C.LLP_PROGRAMS_PER_SM * _launch.sm_count(device)
    return max(1, min(triton.cdiv(target, n_token_blocks), n_vocab_blocks, C.LLP_MAX_SPLITS))


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _check(h_p, w_p, b_p, h_q, w_q, b_q, valid):
    """The family's contract (``kernels/_common.py::check_divergence_inputs``: both heads, one
    vocabulary, one token count, ``valid [N]`` bool, one device), plus what the kernels add:
    16- or 32-bit floats and a CUDA device (or the interpreter)."""
    if w_q is None:
        raise ValueError("the dense launchers need the teacher head h_q, w_q")
    dot_p, dot_q = check_divergence_inputs(h_p, w_p, b_p, h_q, w_q, b_q, valid)
    if torch.float64 in (dot_p, dot_q):
        raise TypeError("the Triton kernels take float16 / bfloat16 / float32 (float64: the torch engine)")
    _launch.check_device(h_p)
    return h_p.shape[0], w_p.shape[0], dot_p, dot_q


def _head_args(h_p, w_p, b_p, h_q, w_q, b_q, valid, opts_p: LogitOptions, opts_q: LogitOptions, dots):
    """Kernel arguments shared by every pass: both heads' pointers, sizes, strides, transforms and
    dot flags (``_launch.dot_flags`` per head, suffixed ``P`` / ``Q``)."""
    args = dict(
        p_hp=h_p,
        p_wp=w_p,
        p_bp=b_p,
        p_hq=h_q,
        p_wq=w_q,
        p_bq=b_q,
        p_valid=valid.contiguous().view(torch.uint8),
        HP=h_p.shape[1],
        HQ=h_q.shape[1],
        stride_hpn=h_p.stride(0),
        stride_wpv=w_p.stride(0),
        stride_hqn=h_q.stride(0),
        stride_wqv=w_q.stride(0),
    )
    for tag, h, w, o, dot in (("p", h_p, w_p, opts_p, dots[0]), ("q", h_q, w_q, opts_q, dots[1])):
        args |= {
            f"scale_{tag}": o.logit_scale,
            f"softcap_{tag}": o.softcap,
            f"inv_temp_{tag}": 1.0 / o.temperature,
        }
        flags = _launch.dot_flags(h.dtype, w.dtype, dot)
        t = tag.upper()
        args |= {
            f"CAST_H{t}": flags["CAST_H"],
            f"CAST_W{t}": flags["CAST_W"],
            f"INTERP_BF16_{t}": flags["INTERP_BF16"],
            f"INPUT_PRECISION_{t}": flags["INPUT_PRECISION"],
        }
    return args | {"FROM_LOGITS": False}


def _check_logits(logits_p, logits_q, valid):
    """``check_logits_pair`` plus the kernels' dtypes and device; returns ``(N, V)``."""
    check_logits_pair(logits_p, logits_q, valid)
    if torch.float64 in (logits_p.dtype, logits_q.dtype):
        raise TypeError("the Triton kernels take float16 / bfloat16 / float32 (float64: the torch engine)")
    _launch.check_device(logits_p)
    return logits_p.shape


def _logits_args(logits_p, logits_q, valid, opts_p: LogitOptions, opts_q: LogitOptions) -> dict:
    """The kernels' shared arguments when the raw logits ``[N, V]`` of both heads are given
    (``FROM_LOGITS``: each tile is read, not computed; the weight / bias slots are unused)."""
    v = logits_p.shape[1]
    args = dict(
        p_hp=logits_p,
        p_wp=logits_p,
        p_bp=None,
        p_hq=logits_q,
        p_wq=logits_q,
        p_bq=None,
        p_valid=valid.contiguous().view(torch.uint8),
        HP=v,
        HQ=v,
        stride_hpn=logits_p.stride(0),
        stride_wpv=logits_p.stride(0),
        stride_hqn=logits_q.stride(0),
        stride_wqv=logits_q.stride(0),
        FROM_LOGITS=True,
    )
    for tag, x, o in (("p", logits_p, opts_p), ("q", logits_q, opts_q)):
        args |= {
            f"scale_{tag}": o.logit_scale,
            f"softcap_{tag}": o.softcap,
            f"inv_temp_{tag}": 1.0 / o.temperature,
        }
        t = tag.upper()
        args |= {f"CAST_H{t}": False, f"CAST_W{t}": False, f"INPUT_PRECISION_{t}": "ieee"}
        # the gradient is stored in the logits' dtype (bf16 rounded by hand under the interpreter)
        args[f"INTERP_BF16_{t}"] = _launch.interpreting() and x.dtype == torch.bfloat16
    return args


def _tile_args(cfg: FwdConfig | BwdConfig) -> dict:
    """The block sizes and launch options every kernel of the family takes from ``cfg``."""
    return dict(BN=cfg.BN, BV=cfg.BV, BD=cfg.BD, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _fwd_outputs(n: int, want_entropy: bool, device: torch.device) -> DivStats:
    """Empty ``DivStats(div, lse_p, lse_q, entropy_p)`` [n] fp32 (``entropy_p`` None unless
    ``want_entropy``) for the forward launchers."""

    def vec_out(need=True):
        return empty((n,), dtype=torch.float32, device=device) if need else None

    return DivStats(vec_out(), vec_out(), vec_out(), vec_out(want_entropy))


def _row_sums(
    heads: dict, n: int, v: int, cfg: FwdConfig, splits: int, lse_p, lse_q, kind, param, grad_p, out
):
    """Pass 2 (``grad_p`` False: the divergence) or the backward's ``c_p`` pass into ``out [N]``:
    per-split row sums, then their sum over splits in split order (deterministic)."""
    n_vb = triton.cdiv(v, cfg.BV)
    blocks_per_split = triton.cdiv(n_vb, splits)
    splits = triton.cdiv(n_vb, blocks_per_split)
    part = empty((splits, n), dtype=torch.float32, device=out.device)
    _launch.launch(
        _linear_divergence_sum_kernel,
        (triton.cdiv(n, cfg.BN), splits),
        **heads,
        p_lsep=lse_p,
        p_lseq=lse_q,
        p_out=part,
        N=n,
        V=v,
        blocks_per_split=blocks_per_split,
        param=param,
        KIND=kind,
        GRAD_P=grad_p,
        **_tile_args(cfg),
    )
    torch.sum(part, dim=0, out=out)


def _forward(heads: dict, n: int, v: int, kind: int, param: float, cfg: FwdConfig, out: DivStats) -> DivStats:
    """Pass 1 and its combine (and pass 2 for the two-pass kinds) into ``out``."""
    dev = out.div.device
    want_entropy = out.entropy_p is not None
    n_tb, n_vb = triton.cdiv(n, cfg.BN), triton.cdiv(v, cfg.BV)
    splits = cfg.num_splits or _num_splits(n_tb, n_vb, dev)
    blocks_per_split = triton.cdiv(n_vb, max(1, min(splits, n_vb)))
    splits = triton.cdiv(n_vb, blocks_per_split)  # no empty split
    part = empty((N_PLANES, splits, n), dtype=torch.float32, device=dev)
    kl_mode, zero_side = _kl_mode(kind), _zero_side(kind, param)
    # infinite-divergence flags of a two-pass kind (the combine kernel applies a KL's itself)
    bad = empty((n,), dtype=torch.float32, device=dev) if zero_side and not kl_mode else None
    _launch.launch(
        _linear_divergence_stats_kernel,
        (n_tb, splits),
        **heads,
        p_part=part,
        N=n,
        V=v,
        blocks_per_split=blocks_per_split,
        NEED_ENT=want_entropy,
        KL_MODE=kl_mode,
        ZERO_SIDE=zero_side,
        **_tile_args(cfg),
    )
    _launch.launch(
        _linear_divergence_combine_kernel,
        (triton.cdiv(n, C.LDIV_COMBINE_BN),),
        p_part=part,
        p_valid=heads["p_valid"],
        p_lsep=out.lse_p,
        p_lseq=out.lse_q,
        p_ent=out.entropy_p,
        p_div=out.div if kl_mode else None,
        p_bad=bad,
        N=n,
        n_splits=splits,
        KL_MODE=kl_mode,
        ZERO_SIDE=zero_side,
        BN=C.LDIV_COMBINE_BN,
        num_warps=C.LLP_COMBINE_NUM_WARPS,
        num_stages=C.LLP_COMBINE_NUM_STAGES,
    )
    if not kl_mode:  # second pass, both normalizers known
        _row_sums(heads, n, v, cfg, splits, out.lse_p, out.lse_q, kind, param, False, out.div)
        if bad is not None:
            out.div.masked_fill_(bad > 0, float("inf"))
    return out


def _coefficients(heads, n, v, cfg, saved: DivStats, kind, param, dev):
    """The row sums ``c_p``, ``c_q`` [N] fp32 of the backward (module docstring): closed forms
    from ``div``, or for jsd / tv one reduction pass for ``c_p`` and ``c_q = div - c_p``."""
    d = _launch.vec(saved.div, n, "div")
    d = torch.where(torch.isfinite(d), d, 0.0)  # infinite rows get no gradient
    if kind in _NEEDS_CP_PASS:
        c_p = empty((n,), dtype=torch.float32, device=dev)
        n_vb = triton.cdiv(v, cfg.BV)
        splits = cfg.num_splits or _num_splits(triton.cdiv(n, cfg.BN), n_vb, dev)
        lse_p, lse_q = _launch.vec(saved.lse_p, n, "lse_p"), _launch.vec(saved.lse_q, n, "lse_q")
        _row_sums(heads, n, v, cfg, splits, lse_p, lse_q, kind, param, True, c_p)
        return c_p, d - c_p
    if kind == FKL.value:
        return torch.full_like(d, -1.0), d + 1.0
    if kind == RKL.value:
        return d + 1.0, torch.full_like(d, -1.0)
    if kind == ALPHA.value:
        return param * d, (1.0 - param) * d
    if kind == HELLINGER.value:
        return 0.5 * d, 0.5 * d
    return 2.0 * d, -d  # CHI2


def _grad_coefficients(heads, n, v, cfg, saved: DivStats, g_div, kind, param, dev):
    """``(g_div, c_p, c_q)`` of the backward kernel: ``g_div`` as fp32 with the rows whose
    divergence is infinite zeroed (they get no gradient), the row coefficients of
    :func:`_coefficients`; all None without ``g_div``."""
    if g_div is None:
        return None, None, None
    g = torch.where(torch.isfinite(_launch.vec(saved.div, n, "div")), _launch.vec(g_div, n, "g_div"), 0.0)
    return (g, *_coefficients(heads, n, v, cfg, saved, kind, param, dev))


def _saved_args(saved: DivStats, g_div, g_entropy, c_p, c_q, n: int) -> dict:
    """The backward kernel's per-row inputs as contiguous fp32 ``[N]`` (``None``: not needed)."""
    if saved.lse_q is None:
        raise ValueError("the backward needs the forward's lse_p and lse_q")
    vec = _launch.vec
    return dict(
        p_lsep=vec(saved.lse_p, n, "lse_p"),
        p_lseq=vec(saved.lse_q, n, "lse_q"),
        p_ent=vec(saved.entropy_p, n, "entropy_p") if g_entropy is not None else None,
        p_cp=c_p,
        p_cq=c_q,
        p_gdiv=g_div,
        p_gent=vec(g_entropy, n, "g_entropy"),
    )


def _contract(dr, h_dot, w, v0, cnt, dot, dw, db, dbp, dh_acc):
    """One vocabulary chunk's GEMMs of one head: ``dW[chunk] = dr.T @ h`` (written once),
    ``db[chunk]`` = column sums, ``dh += dr @ W[chunk]`` (fp32 accumulator)."""
    if dw is not None:
        if dw.dtype == dot:
            torch.mm(dr.T, h_dot, out=dw[v0 : v0 + cnt])  # [cnt, N] @ [N, H]
        else:  # fp32 master weight: its gradient is the matmul-dtype product, widened
            dw[v0 : v0 + cnt].copy_(dr.T @ h_dot)
    if db is not None:
        db[v0 : v0 + cnt] = dbp[:, :cnt].sum(dim=0)
    if dh_acc is not None:
        w_chunk = w[v0 : v0 + cnt]
        _launch.mm_accumulate_fp32(dh_acc, dr, w_chunk if w_chunk.dtype == dot else w_chunk.to(dot))
