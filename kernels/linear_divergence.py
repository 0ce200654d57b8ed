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

Zero probabilities: a ``-inf`` transformed logit (a ``-inf`` bias entry, no soft-cap) is
floored at ``-1e30`` in every tile (``exp(-1e30 - lse)`` is exactly 0, and every term stays
finite), after pass 1 has flagged the rows whose divergence is infinite in exact arithmetic:
mass of the other head where ``p`` has none (KL(q||p), alpha < 0) or where ``q`` has none
(KL(p||q), alpha > 1, chi2). Those rows hold ``+inf`` and get no gradient; an entry where both
heads have no mass contributes 0 (the conventions of ``alignops/reference/linear_divergence.py``).

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
from ._common import DivergenceOptions, DivStats, LogitOptions, autocast_off, empty
from .linear_divergence_bwd import _linear_divergence_bwd_kernel
from .linear_divergence_fwd import (
    FKL,
    JSD,
    _linear_divergence_combine_kernel,
    _linear_divergence_stats_kernel,
    _linear_divergence_sum_kernel,
)
from .linear_divergence_host import (
    _check,
    _check_logits,
    _contract,
    _forward,
    _fwd_outputs,
    _grad_coefficients,
    _head_args,
    _kl_mode,
    _logits_args,
    _saved_args,
    _tile_args,
    bwd_config,
    fwd_config,
    kind_code,
    logits_config,
)
from .linear_logprobs import BwdConfig, FwdConfig

__all__ = [
    "AOT_SPECS",
    "bwd_config",
    "fwd_config",
    "kind_code",
    "linear_divergence_bwd",
    "linear_divergence_fwd",
    "logits_config",
    "logits_divergence_bwd",
    "logits_divergence_fwd",
]


@autocast_off
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
    out = _fwd_outputs(n, want_entropy, h_p.device)
    if n == 0:
        return out
    cfg = config or fwd_config(n, dot_p, dot_q)
    heads = _head_args(h_p, w_p, b_p, h_q, w_q, b_q, valid, opts_p, opts_q, (dot_p, dot_q))
    return _forward(heads, n, v, kind, param, cfg, out)


@autocast_off
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
        if all(t is None for t in grads[:3]):
            return grads

    cfg = config or bwd_config(n, max(h_p.shape[1], h_q.shape[1]), dot_p, dot_q)
    heads = _head_args(h_p, w_p, b_p, h_q, w_q, b_q, valid, opts_p, opts_q, (dot_p, dot_q))
    g_div, c_p, c_q = _grad_coefficients(heads, n, v, FwdConfig(*cfg[:5]), saved, g_div, kind, param, dev)
    saved_args = _saved_args(saved, g_div, g_entropy, c_p, c_q, n)
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
    for v0 in range(0, v, vc):
        cnt = min(vc, v - v0)
        _launch.launch(
            _linear_divergence_bwd_kernel,
            (n_tb, triton.cdiv(cnt, cfg.BV)),
            **heads,
            **saved_args,
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
            **_tile_args(cfg),
        )
        _contract(ws_p[:, :cnt], hp_dot, w_p, v0, cnt, dot_p, dw_p, db_p, dbp_p, dhp_acc)
        if want_q:
            _contract(ws_q[:, :cnt], hq_dot, w_q, v0, cnt, dot_q, dw_q, db_q, dbp_q, dhq_acc)
    for dh, acc in ((dh_p, dhp_acc), (dh_q, dhq_acc)):
        if acc is not None and acc is not dh:
            dh.copy_(acc)
    return grads


@autocast_off
def logits_divergence_fwd(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    valid: torch.Tensor,
    opts_p: LogitOptions,
    opts_q: LogitOptions,
    div: DivergenceOptions,
    *,
    want_entropy: bool = False,
    config: FwdConfig | None = None,
) -> DivStats:
    """:func:`linear_divergence_fwd` for callers holding both heads' raw logits ``[N, V]`` (bf16 /
    fp16 / fp32, any row stride, contiguous vocabulary): the same passes, each tile read instead
    of computed, no ``[N, V]`` temporary."""
    n, v = _check_logits(logits_p, logits_q, valid)
    kind, param = kind_code(div)
    out = _fwd_outputs(n, want_entropy, logits_p.device)
    if n == 0:
        return out
    cfg = config or logits_config()
    return _forward(_logits_args(logits_p, logits_q, valid, opts_p, opts_q), n, v, kind, param, cfg, out)


@autocast_off
def logits_divergence_bwd(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    valid: torch.Tensor,
    saved: DivStats,
    g_div: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    opts_p: LogitOptions,
    opts_q: LogitOptions,
    div: DivergenceOptions,
    *,
    need_dp: bool,
    need_dq: bool,
    config: BwdConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dlogits_p, dlogits_q)`` ``[N, V]`` in the logits' dtypes (None unless asked) for
    :func:`logits_divergence_fwd`: one pass writes each gradient element once (two for jsd / tv,
    whose row coefficient takes a reduction pass first); rows outside ``valid`` get 0."""
    n, v = _check_logits(logits_p, logits_q, valid)
    kind, param = kind_code(div)
    if g_entropy is not None and saved.entropy_p is None:
        raise ValueError("a gradient of entropy_p needs the forward's entropy_p")
    dev = logits_p.device
    d_p = empty((n, v), dtype=logits_p.dtype, device=dev) if need_dp else None
    d_q = empty((n, v), dtype=logits_q.dtype, device=dev) if need_dq else None
    if n == 0 or (g_div is None and g_entropy is None):
        for t in (d_p, d_q):
            if t is not None:
                t.zero_()
        return d_p, d_q
    q_out = d_q
    if d_q is not None and g_div is None:  # the entropy is the student's: no teacher gradient
        d_q.zero_()
        q_out = None
    if d_p is None and q_out is None:
        return d_p, d_q
    heads = _logits_args(logits_p, logits_q, valid, opts_p, opts_q)
    cfg = config or BwdConfig(*logits_config()[:5], workspace_elems=0)
    g_div, c_p, c_q = _grad_coefficients(heads, n, v, FwdConfig(*cfg[:5]), saved, g_div, kind, param, dev)
    _launch.launch(
        _linear_divergence_bwd_kernel,
        (triton.cdiv(n, cfg.BN), triton.cdiv(v, cfg.BV)),
        **heads,
        **_saved_args(saved, g_div, g_entropy, c_p, c_q, n),
        p_drp=d_p,
        p_dbp=None,
        p_drq=q_out,
        p_dbq=None,
        n_count=n,
        v_lo=0,
        v_count=v,
        stride_dr=v,
        stride_db=0,
        param=param,
        KIND=kind,
        **_tile_args(cfg),
    )
    return d_p, d_q


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
                common |= {"INPUT_PRECISION_P": "ieee", "INPUT_PRECISION_Q": "ieee", "FROM_LOGITS": False}
                common |= {} if full else dict.fromkeys(("p_bp", "p_bq", "softcap_p", "softcap_q"))
                kind = JSD.value if full else FKL.value
                # the full pass 1 is chi2's (no KL accumulator, infinite rows flagged)
                stats = {"NEED_ENT": full, "KL_MODE": _kl_mode(kind), "ZERO_SIDE": 2 if full else 1}
                sums = {"KIND": kind, "GRAD_P": full}
                bwd = {"KIND": kind, "HAS_GDIV": True, "HAS_GENT": full, "HAS_DRP": True, "HAS_DBP": full}
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
    for dtype in (torch.bfloat16, torch.float32):  # the logits launchers: tiles read, not computed
        ty = TRITON_TYPE[dtype]
        cfg = logits_config()
        ptrs = {"p_valid": "u8", "p_hp": ty, "p_wp": ty, "p_hq": ty, "p_wq": ty, "p_drp": ty, "p_drq": ty}
        common = {f"HAS_BIAS_{t}": False for t in "PQ"} | {f"HAS_SOFTCAP_{t}": True for t in "PQ"}
        common |= {f"{f}{t}": False for f in ("CAST_H", "CAST_W", "INTERP_BF16_") for t in "PQ"}
        common |= {"INPUT_PRECISION_P": "ieee", "INPUT_PRECISION_Q": "ieee", "FROM_LOGITS": True}
        common |= {"p_bp": None, "p_bq": None, "BN": cfg.BN, "BV": cfg.BV, "BD": cfg.BD}
        bwd = {"KIND": JSD.value, "HAS_GDIV": True, "HAS_GENT": True, "HAS_DRP": True, "HAS_DRQ": True}
        bwd |= {"HAS_DBP": False, "HAS_DBQ": False, "p_dbp": None, "p_dbq": None}
        for kernel, extra in (
            (_linear_divergence_stats_kernel, {"NEED_ENT": True, "KL_MODE": 0, "ZERO_SIDE": 2}),
            (_linear_divergence_sum_kernel, {"KIND": JSD.value, "GRAD_P": True}),
            (_linear_divergence_bwd_kernel, bwd),
        ):
            label = f"{ty} logits full BN={cfg.BN} BV={cfg.BV} w{cfg.num_warps} s{cfg.num_stages}"
            warps, stages = cfg.num_warps, cfg.num_stages
            cx = common | extra
            specs.append(aot_spec(kernel, cx, pointer_types=ptrs, warps=warps, stages=stages, label=label))
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
