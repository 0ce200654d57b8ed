r"""Fused two-head divergences: per-token divergences between the next-token distributions of a
student / policy ``p`` and a teacher / reference ``q`` straight from both models' hidden states
and LM heads, never building either ``[N, V]`` logits.

Math (per head as in ``kernels/linear_logprobs.py``: ``z = c tanh(a r / c) / T``, each head with
its own ``LogitOptions``; ``lp = z_p - lse_p``, ``lq = z_q - lse_q``, ``p = exp(lp)``, ``q = exp(lq)``)::

    forward_kl   KL(q||p) = sum_v q (lq - lp)
    reverse_kl   KL(p||q) = sum_v p (lp - lq)
    jsd(beta)    beta KL(q||m) + (1 - beta) KL(p||m),   m = (1 - beta) p + beta q
                 (beta = 0 is exactly KL(q||p) and beta = 1 exactly KL(p||q), as TRL defines it)
    tv           (1/2) sum_v |p - q|
    alpha(a)     sum_v [a p + (1 - a) q - p^a q^(1-a)] / (a (1 - a))
                 (Amari, 1985; Cichocki and Amari, 2010, doi:10.3390/e12061532); a -> 1 gives
                 KL(p||q) and a -> 0 KL(q||p), which a = 1 and a = 0 compute exactly
    f(gen)       sum_v q f(p / q) with f (Nowozin et al., 2016, arXiv:1606.00709; Csiszar, 1967):
                 kl t log t = KL(p||q); reverse_kl -log t = KL(q||p); hellinger (sqrt t - 1)^2
                 = sum (sqrt p - sqrt q)^2; chi2 (t - 1)^2 = sum (p - q)^2 / q (Pearson);
                 js = jsd(1/2); tv |t - 1| / 2 = tv
    entropy_p    -sum_v p lp     (optional, same pass)

Rows with ``valid = False`` give exactly 0 in every output and get zero gradient. Every
elementwise term is written so that it is >= 0 (or a convex combination of such) and the row sum
does not cancel: the alpha term adds the linear part ``a p + (1 - a) q`` (which sums to 1), the
chi^2 term is ``q (p / q - 1)^2`` (finite where ``q`` underflows).

Passes (each pass recomputes both heads' logits tiles: two ``tl.dot`` loops per ``[BN, BV]``):

* one pass for forward_kl / reverse_kl (and the student's entropy): the online log-sum-exp of
  both heads and, in the same loop, ``w = sum_v e_w ((z_w - m_w) - (z_o - m_o))`` with ``w`` the
  weighting head (``q`` for KL(q||p)), ``e_w = exp(z_w - m_w)`` and ``m`` the running maxes.
  When the maxes move, ``w' = a (w + ((m_w - m_w') - (m_o - m_o')) s_w)``, ``a = exp(m_w - m_w')``
  (`_kl_rescale`), and then ``KL = w / s_w - log s_w + log s_o``: no difference of two
  numbers of the size of the logits. Vocab splits combine with the same rescaling.
* two passes for jsd, tv, alpha and the hellinger / chi2 / js / tv generators: their terms are
  not a sum of ``exp(z - lse)`` times something linear in ``z`` (``log m`` of the JSD mixture,
  ``|p - q|``, ``p^a q^(1 - a)`` written without cancellation need ``p`` and ``q`` themselves),
  so the first pass finds ``lse_p`` and ``lse_q`` and the second sums the terms with both known.

Backward, with ``phi(p, q)`` the elementwise term, ``g_div`` and ``g_ent`` the upstream
gradients (``p``'s softmax Jacobian, ``dp_u / dz_v = p_u (delta_uv - p_v)``)::

    dz_p = g_div (p dphi/dp - p c_p) - g_ent p (lp + entropy_p),   c_p = sum_v p dphi/dp
    dz_q = g_div (q dphi/dq - q c_q),                              c_q = sum_v q dphi/dq
    dr   = dz a / T (1 - tanh(a r / c)^2)     dh = dr @ W     dW = dr.T @ h     db = sum_n dr

Every divergence here is 1-homogeneous in ``(p, q)``, so ``c_p + c_q = div`` (Euler) and the
row sums come without another pass for most kinds: forward_kl ``c_p = -1``; reverse_kl
``c_p = div + 1``; alpha ``c_p = a div``; hellinger ``c_p = div / 2``; chi2 ``c_p = 2 div``. jsd
and tv need ``c_p = sum_v (1 - beta) p log(p / m)`` resp. ``(1/2) sum_v p sign(p - q)``: one
reduction pass more (`_linear_divergence_sum_kernel` with ``GRAD_P``) before the gradient pass.
The gradient pass is chunked over the vocabulary exactly as ``kernels/linear_logprobs.py``'s
backward: each head's ``dr`` chunk goes to a bounded workspace in its matmul dtype, cuBLAS
writes ``dW[chunk]`` once and accumulates ``dh`` in fp32; no float atomics (deterministic).
The teacher's gradient (``need_*_q``) shares the recomputed tiles and adds its own workspace
(each head's workspace then gets half of the bound).

Naming, dtypes, strides and the interpreter's bf16 work-around: as in
``kernels/linear_logprobs.py`` (each head has its own matmul dtype, ``CAST_*`` and
``INTERP_BF16_*`` flags; the hidden sizes ``HP`` and ``HQ`` may differ). ``valid`` is read as
bytes (a bool tensor's storage).
"""

from __future__ import annotations

import torch
import triton

from . import _launch
from . import constants as C
from ._aot import TRITON_TYPE, AotSpec, aot_spec
from ._common import DivergenceOptions, DivStats, LogitOptions, check_divergence_inputs, empty
from .linear_divergence_bwd import _linear_divergence_bwd_kernel
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

__all__ = [
    "AOT_SPECS",
    "bwd_config",
    "fwd_config",
    "kind_code",
    "linear_divergence_bwd",
    "linear_divergence_fwd",
]

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
        if div.beta == 0.0:
            return FKL.value, 0.0
        if div.beta == 1.0:
            return RKL.value, 0.0
        return JSD.value, div.beta
    if k == "tv":
        return TV.value, 0.0
    if k == "alpha":
        if div.alpha == 0.0:
            return FKL.value, 0.0
        if div.alpha == 1.0:
            return RKL.value, 0.0
        return ALPHA.value, div.alpha
    return _GENERATORS[div.generator]


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
    return args


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
        BN=cfg.BN,
        BV=cfg.BV,
        BD=cfg.BD,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    torch.sum(part, dim=0, out=out)


def linear_divergence_fwd(
    h_p: torch.Tensor,
    w_p: torch.Tensor,
    b_p: torch.Tensor | None,
    h_q: torch.Tensor,
    w_q: torch.Tensor,
    b_q: torch.Tensor | None,
    valid: torch.Tensor,
    opts_p: LogitOptions,
    opts_q: LogitOptions,
    div: DivergenceOptions,
    *,
    want_entropy: bool = False,
    config: FwdConfig | None = None,
) -> DivStats:
    """Per-token ``DivStats(div, lse_p, lse_q, entropy_p)``, each ``[N]`` fp32 (``entropy_p``
    None unless ``want_entropy``); 0 at rows where ``valid`` is False.

    h_p [N, Hp], w_p [V, Hp], h_q [N, Hq], w_q [V, Hq] (bf16 / fp16 / fp32; each head may mix a
    16-bit dtype with fp32), b_p / b_q [V] or None, valid [N] bool. ``opts_*.ignore_index`` is
    unused. ``config`` overrides the heuristic (benchmarks, tests)."""
    n, v, dot_p, dot_q = _check(h_p, w_p, b_p, h_q, w_q, b_q, valid)
    kind, param = kind_code(div)
    dev = h_p.device

    def vec_out(need=True):
        return empty((n,), dtype=torch.float32, device=dev) if need else None

    out = DivStats(vec_out(), vec_out(), vec_out(), vec_out(want_entropy))
    if n == 0:
        return out
    cfg = config or fwd_config(n, dot_p, dot_q)
    heads = _head_args(h_p, w_p, b_p, h_q, w_q, b_q, valid, opts_p, opts_q, (dot_p, dot_q))
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
        BN=cfg.BN,
        BV=cfg.BV,
        BD=cfg.BD,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
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


def linear_divergence_bwd(
    h_p: torch.Tensor,
    w_p: torch.Tensor,
    b_p: torch.Tensor | None,
    h_q: torch.Tensor,
    w_q: torch.Tensor,
    b_q: torch.Tensor | None,
    valid: torch.Tensor,
    saved: DivStats,
    g_div: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    opts_p: LogitOptions,
    opts_q: LogitOptions,
    div: DivergenceOptions,
    *,
    need_dh_p: bool,
    need_dw_p: bool,
    need_db_p: bool,
    need_dh_q: bool = False,
    need_dw_q: bool = False,
    need_db_q: bool = False,
    config: BwdConfig | None = None,
):
    """``(dh_p, dw_p, db_p, dh_q, dw_q, db_q)`` of ``sum_n g_div[n] div[n] + g_entropy[n]
    entropy_p[n]``, each in its input's dtype and None unless asked. ``saved`` is the forward's
    ``DivStats`` (``entropy_p`` needed when ``g_entropy`` is given); ``None`` upstream gradients
    are zero. The entropy is the student's, so the teacher's gradient comes from ``g_div`` only."""
    n, v, dot_p, dot_q = _check(h_p, w_p, b_p, h_q, w_q, b_q, valid)
    kind, param = kind_code(div)
    if (need_db_p and b_p is None) or (need_db_q and b_q is None):
        raise ValueError("need_db_p / need_db_q without that bias")
    if saved.lse_q is None:
        raise ValueError("the backward needs the forward's lse_p and lse_q")
    if g_entropy is not None and saved.entropy_p is None:
        raise ValueError("a gradient of entropy_p needs the forward's entropy_p")
    dev = h_p.device

    def out(need, like, shape):
        return empty(shape, dtype=like.dtype, device=dev) if need else None

    dh_p, dw_p, db_p = (
        out(need_dh_p, h_p, h_p.shape),
        out(need_dw_p, w_p, w_p.shape),
        out(need_db_p, b_p, (v,)),
    )
    dh_q, dw_q, db_q = (
        out(need_dh_q, h_q, h_q.shape),
        out(need_dw_q, w_q, w_q.shape),
        out(need_db_q, b_q, (v,)),
    )
    grads = (dh_p, dw_p, db_p, dh_q, dw_q, db_q)
    want_q = g_div is not None and any(t is not None for t in grads[3:])
    if n == 0 or (g_div is None and g_entropy is None):
        for t in grads:
            if t is not None:
                t.zero_()
        return grads
    if not want_q:  # no teacher gradient asked, or it is zero (the entropy is the student's)
        for t in grads[3:]:
            if t is not None:
                t.zero_()

    cfg = config or bwd_config(n, max(h_p.shape[1], h_q.shape[1]), dot_p, dot_q)
    heads = _head_args(h_p, w_p, b_p, h_q, w_q, b_q, valid, opts_p, opts_q, (dot_p, dot_q))
    c_p = c_q = None
    if g_div is not None:
        # rows whose divergence is infinite get no gradient (their g_div is 0 in the kernel)
        g_div = torch.where(
            torch.isfinite(_launch.vec(saved.div, n, "div")), _launch.vec(g_div, n, "g_div"), 0.0
        )
        c_p, c_q = _coefficients(heads, n, v, FwdConfig(*cfg[:5]), saved, kind, param, dev)
    n_tb = triton.cdiv(n, cfg.BN)
    ws_elems = max(cfg.workspace_elems // (2 if want_q else 1), cfg.BN * cfg.BV)
    # vocab chunks over all tokens, never the whole vocabulary when V > BV (no [N, V] tensor)
    vc = min(v, max(cfg.BV, ws_elems // n // cfg.BV * cfg.BV))
    if vc >= v and v > cfg.BV:
        vc = triton.cdiv(triton.cdiv(v, 2), cfg.BV) * cfg.BV
    ws_p = empty((n, vc), dtype=dot_p, device=dev)
    ws_q = empty((n, vc), dtype=dot_q, device=dev) if want_q else None
    dbp_p = empty((n_tb, vc), dtype=torch.float32, device=dev) if need_db_p else None
    dbp_q = empty((n_tb, vc), dtype=torch.float32, device=dev) if want_q and need_db_q else None

    def head_state(h, dh, need_dh, dot):
        h_dot = h if h.dtype == dot else h.to(dot)  # a wider hidden is rounded once (O(N H))
        acc = None
        if need_dh:
            acc = dh if dh.dtype == torch.float32 else torch.zeros(dh.shape, dtype=torch.float32, device=dev)
            if acc is dh:
                dh.zero_()
        return h_dot, acc

    hp_dot, dhp_acc = head_state(h_p, dh_p, need_dh_p, dot_p)
    hq_dot, dhq_acc = head_state(h_q, dh_q, need_dh_q and want_q, dot_q) if want_q else (None, None)
    vec = _launch.vec
    for v0 in range(0, v, vc):
        cnt = min(vc, v - v0)
        _launch.launch(
            _linear_divergence_bwd_kernel,
            (n_tb, triton.cdiv(cnt, cfg.BV)),
            **heads,
            p_lsep=vec(saved.lse_p, n, "lse_p"),
            p_lseq=vec(saved.lse_q, n, "lse_q"),
            p_ent=vec(saved.entropy_p, n, "entropy_p") if g_entropy is not None else None,
            p_cp=c_p,
            p_cq=c_q,
            p_gdiv=g_div,
            p_gent=vec(g_entropy, n, "g_entropy"),
            p_drp=ws_p,
            p_dbp=dbp_p,
            p_drq=ws_q,
            p_dbq=dbp_q,
            n_count=n,
            v_lo=v0,
            v_count=cnt,
            stride_dr=vc,
            stride_db=vc,
            param=param,
            KIND=kind,
            BN=cfg.BN,
            BV=cfg.BV,
            BD=cfg.BD,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        _contract(ws_p[:, :cnt], hp_dot, w_p, v0, cnt, dot_p, dw_p, db_p, dbp_p, dhp_acc)
        if want_q:
            _contract(ws_q[:, :cnt], hq_dot, w_q, v0, cnt, dot_q, dw_q, db_q, dbp_q, dhq_acc)
    for dh, acc in ((dh_p, dhp_acc), (dh_q, dhq_acc)):
        if acc is not None and acc is not dh:
            dh.copy_(acc)
    return grads


# ----------------------------------------------------------------------------------------------
# ahead-of-time build descriptions
# ----------------------------------------------------------------------------------------------


def _aot_specs() -> list[AotSpec]:
    """Every kernel at the configs the default heuristics pick (BN 16 and 64; fp32 BN 16), bf16 and fp32
    matmul dtypes (IEEE fp32 dots), in two feature sets: ``plain`` (forward KL(q||p), no bias,
    soft-cap or entropy; student gradient only) and ``full`` (generalized JSD, both biases and
    soft-caps, the student's entropy, a bf16 hidden with an fp32 master weight for 16-bit builds,
    the teacher's gradient and both bias gradients: the most registers)."""
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        ty = TRITON_TYPE[dtype]
        # fp32 matmuls take 16-row token blocks at every N: one config
        for n in (C.LLP_SMALL_N_MAX,) + ((C.LLP_SMALL_N_MAX + 1,) if dtype != torch.float32 else ()):
            for full in (False, True):
                feat = "full" if full else "plain"
                mixed = full and dtype != torch.float32
                wty = "fp32" if mixed else ty
                ptrs = {"p_valid": "u8", "p_hp": ty, "p_wp": wty, "p_bp": ty, "p_hq": ty, "p_wq": wty}
                ptrs |= {"p_bq": ty, "p_drp": ty, "p_drq": ty}
                common = {
                    "HAS_BIAS_P": full,
                    "HAS_BIAS_Q": full,
                    "HAS_SOFTCAP_P": full,
                    "HAS_SOFTCAP_Q": full,
                }
                common |= {"CAST_HP": False, "CAST_WP": mixed, "CAST_HQ": False, "CAST_WQ": mixed}
                common |= {"INTERP_BF16_P": False, "INTERP_BF16_Q": False}
                common |= {"INPUT_PRECISION_P": "ieee", "INPUT_PRECISION_Q": "ieee"}
                common |= {} if full else dict.fromkeys(("p_bp", "p_bq", "softcap_p", "softcap_q"))
                kind = JSD.value if full else FKL.value
                # the full pass 1 is chi2's (no KL accumulator, infinite rows flagged)
                stats = {"NEED_ENT": full, "KL_MODE": _kl_mode(kind), "ZERO_SIDE": 2 if full else 1}
                sums = {"KIND": kind, "GRAD_P": full}
                bwd = {"KIND": kind, "HAS_GDIV": True, "HAS_GENT": full, "HAS_DBP": full}
                bwd |= {"HAS_DRQ": full, "HAS_DBQ": full}
                bwd |= {} if full else dict.fromkeys(("p_ent", "p_gent", "p_dbp", "p_drq", "p_dbq", "p_cq"))
                builds = [(_linear_divergence_stats_kernel, stats), (_linear_divergence_bwd_kernel, bwd)]
                if full:  # the second pass runs for the two-pass kinds only
                    builds.append((_linear_divergence_sum_kernel, sums))
                cfg = fwd_config(n, dtype, dtype)
                for kernel, extra in builds:
                    cx = {**common, **extra, "BN": cfg.BN, "BV": cfg.BV, "BD": cfg.BD}
                    label = f"{ty} {feat}{' mixed' if mixed else ''} BN={cfg.BN} BV={cfg.BV} BD={cfg.BD}"
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
    for full in (False, True):
        cx = {"KL_MODE": 0 if full else 1, "ZERO_SIDE": 2 if full else 1, "BN": C.LDIV_COMBINE_BN}
        cx |= {"HAS_ENT": full, "HAS_DIV": not full, "HAS_BAD": full}
        cx |= {"p_div": None} if full else {"p_ent": None, "p_bad": None}
        label = f"fp32 {'full' if full else 'plain'} BN={C.LDIV_COMBINE_BN} w{C.LLP_COMBINE_NUM_WARPS} s1"
        specs.append(
            aot_spec(
                _linear_divergence_combine_kernel,
                cx,
                pointer_types={"p_valid": "u8"},
                warps=C.LLP_COMBINE_NUM_WARPS,
                stages=C.LLP_COMBINE_NUM_STAGES,
                label=label,
            )
        )
    return specs


AOT_SPECS: list[AotSpec] = _aot_specs()
