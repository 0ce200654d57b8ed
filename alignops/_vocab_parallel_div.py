"""Vocabulary-parallel full-distribution divergences (``linear_divergence(..., process_group=)``):
each rank of a process group holds the same vocabulary slice ``[start_r, start_r + V_r)`` of
both heads (``W_p[V_r, Hp]``, ``W_q[V_r, Hq]``, their biases) and every rank gets the exact
full-vocabulary divergence (and student entropy). Slices, padding (``vocab_size``), DTensor
``Shard(0)`` and the input check (one small all-gather, errors on every rank, no hang) are those
of the log-prob family, ``alignops._vocab_parallel``.

Each rank runs the PyTorch engine (``alignops._torch.linear_divergence``) on its slice: the local
``lse_p_r``, ``lse_q_r`` and the local divergence ``D_r`` of the slice-normalized distributions
``p^r``, ``q^r``. With ``M_x = max_r lse_x_r`` (one all-reduce MAX of 2 floats per token),
``e^x_r = exp(lse_x_r - M_x)``, ``S_x = sum_r e^x_r`` and ``lse_x = M_x + log S_x``, one
all-reduce SUM gives, per token (``w^x_r = e^x_r / S_x``, the slice's share of each head's mass)::

    forward_kl  KL(q || p) = sum_r w^q_r (D_r + lse_q_r - lse_p_r) - (lse_q - lse_p)
    reverse_kl  KL(p || q) = sum_r w^p_r (D_r + lse_p_r - lse_q_r) - (lse_p - lse_q)
    alpha       D = sum_r c_r D_r + (1 - sum_r c_r) / (a (1 - a)),  c_r = (w^p_r)^a (w^q_r)^(1 - a)
    entropy     H_p = lse_p - sum_r w^p_r (lse_p_r - H_r)

(3 or 4 floats per token, 5 with the entropy). The f-generators take the kind they map to.
``jsd`` and ``tv`` are not functions of per-slice sums of a normalized distribution: their
summands need ``p_v`` and ``q_v`` themselves. They take two rounds: pass 1 computes the local
``lse``, combined as above; pass 2 sums the row constants (``K_q, K_p`` or ``E_p s, E_q s``) of
the engine's second pass over the local slice with the *global* normalizers
(:func:`~alignops._torch.linear_divergence.linear_divergence_row_sums`), then one more
all-reduce SUM of 2 floats per token.

Backward: the engine's backward on each rank's slice with the global saved divergence,
normalizers, entropy and (jsd / tv) row sums: its ``p`` / ``q`` tiles are then the global
probabilities, so the weight / bias gradients are exactly this rank's shard of the full
gradients; the hidden-state gradients (both heads) are sums over ranks, all-reduced unless
``reduce_hidden_grad=False``. The upstream gradients must be the same on every rank.

Engine: the PyTorch engine on every device, CUDA included: the Triton launchers do not take the
global statistics / row sums, so a process group never uses them.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ._torch import linear_divergence as eng
from ._vocab_parallel import Shard, _check, _float_bits, is_dtensor, local_shard, plan
from .kernels._common import (
    F_GENERATORS,
    DivergenceOptions,
    DivStats,
    LogitOptions,
    StatRequest,
    check_divergence_inputs,
    compute_dtype,
)

_KINDS = ("forward_kl", "reverse_kl", "jsd", "tv", "alpha", "f")
_NEEDS = ("need_dh_p", "need_dw_p", "need_db_p", "need_dh_q", "need_dw_q", "need_db_q")
_BASE_KIND = {"fkl": "forward_kl", "rkl": "reverse_kl", "jsd": "jsd", "tv": "tv", "alpha": "alpha"}


def _base_options(base: str, prm: float) -> DivergenceOptions:
    if base == "jsd":
        return DivergenceOptions("jsd", beta=prm)
    if base == "alpha":
        return DivergenceOptions("alpha", alpha=prm)
    return DivergenceOptions(_BASE_KIND[base])


def _local_forward(heads, valid, sh: Shard, opts_p, opts_q, base_div, base, want_entropy):
    """This rank's :class:`DivStats` (``lse = -inf`` for a slice of padding only)."""
    h_p = heads[0]
    if sh.valid == 0:
        z = torch.zeros(h_p.shape[0], dtype=compute_dtype(*heads), device=h_p.device)
        return DivStats(z, torch.full_like(z, -math.inf), torch.full_like(z, -math.inf), z)
    # jsd / tv: pass 1 needs only the normalizers (and the entropy): the one-pass forward_kl gives them
    kind = DivergenceOptions("forward_kl") if base in ("jsd", "tv") else base_div
    return eng.linear_divergence_fwd(*heads, valid, opts_p, opts_q, kind, want_entropy=want_entropy)


def _combine(st: DivStats, valid, sh: Shard, base: str, prm: float, want_entropy: bool):
    """``(div, lse_p, lse_q, entropy)`` over the full vocabulary (module docstring); ``div`` is
    None for jsd / tv (their second pass follows)."""
    lp_r, lq_r = st.lse_p, st.lse_q
    m = torch.stack([lp_r, lq_r], 1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=sh.group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    xp, xq = lp_r - m[:, 0], lq_r - m[:, 1]
    ep, eq = torch.exp(xp), torch.exp(xq)
    cols = [ep, eq]
    if base == "fkl":
        cols.append(torch.where(eq > 0, eq * (st.div + lq_r - lp_r), 0.0))
    elif base == "rkl":
        cols.append(torch.where(ep > 0, ep * (st.div + lp_r - lq_r), 0.0))
    elif base == "alpha":
        # 0 for an empty slice (both heads -inf: -inf + inf for alpha outside [0, 1])
        t = torch.where((ep > 0) | (eq > 0), torch.exp(prm * xp + (1.0 - prm) * xq), 0.0)
        cols += [t, torch.where(t > 0, t * st.div, 0.0)]
    if want_entropy:
        cols.append(torch.where(ep > 0, ep * (lp_r - st.entropy_p), 0.0))
    packed = torch.stack(cols, 1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=sh.group)
    one = torch.ones((), dtype=packed.dtype, device=packed.device)
    sp, sq = torch.where(valid, packed[:, 0], one), torch.where(valid, packed[:, 1], one)
    log_sp, log_sq = torch.log(sp), torch.log(sq)
    lse_p, lse_q = m[:, 0] + log_sp, m[:, 1] + log_sq
    d = None
    if base == "fkl":
        d = packed[:, 2] / sq - (lse_q - lse_p)
    elif base == "rkl":
        d = packed[:, 2] / sp - (lse_p - lse_q)
    elif base == "alpha":
        norm = prm * log_sp + (1.0 - prm) * log_sq
        log_c = torch.log(packed[:, 2]) - norm  # log sum_r c_r
        d = packed[:, 3] * torch.exp(-norm) - torch.expm1(log_c) / (prm * (1.0 - prm))
    ent = lse_p - packed[:, -1] / sp if want_entropy else None
    return d, lse_p, lse_q, ent


class LinearDivergenceParallelFunction(torch.autograd.Function):
    """``(div [N], entropy [N] or 0 elements)`` over the full vocabulary from this rank's slices
    ``w_p [V_r', Hp]``, ``w_q [V_r', Hq]``, ``b_p`` / ``b_q [V_r']`` (padding rows cut off)."""

    @staticmethod
    def forward(ctx, h_p, w_p, b_p, h_q, w_q, b_q, valid, sh, opts_p, opts_q, div, want_entropy, reduce_dh):
        base, prm, scale = eng.resolve(div)
        base_div = _base_options(base, prm)
        heads = (h_p, w_p, b_p, h_q, w_q, b_q)
        st = _local_forward(heads, valid, sh, opts_p, opts_q, base_div, base, want_entropy)
        d, lse_p, lse_q, ent = _combine(st, valid, sh, base, prm, want_entropy)
        zero = torch.zeros((), dtype=st.lse_p.dtype, device=valid.device)
        lse_p, lse_q = torch.where(valid, lse_p, zero), torch.where(valid, lse_q, zero)
        rows = None
        if base in ("jsd", "tv"):
            if sh.valid > 0:
                rows = eng.linear_divergence_row_sums(*heads, valid, opts_p, opts_q, base_div, lse_p, lse_q)
            else:
                rows = torch.zeros(2, valid.shape[0], dtype=zero.dtype, device=valid.device)
            dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=sh.group)
            d = prm * rows[0] + (1.0 - prm) * rows[1] if base == "jsd" else 0.5 * (rows[0] - rows[1])
        d = torch.where(valid, d, zero)
        ent = torch.where(valid, ent, zero) if want_entropy else None
        ctx.save_for_backward(*heads, valid, d, lse_p, lse_q, ent, rows)
        ctx.sh, ctx.opts, ctx.div, ctx.scale, ctx.reduce_dh = sh, (opts_p, opts_q), base_div, scale, reduce_dh
        ctx.set_materialize_grads(False)
        return d * scale if scale != 1.0 else d, (ent if want_entropy else d.new_empty(0))

    @staticmethod
    def backward(ctx, g_div, g_ent):
        h_p, w_p, b_p, h_q, w_q, b_q, valid, d, lse_p, lse_q, ent, rows = ctx.saved_tensors
        sh = ctx.sh
        heads = (h_p, w_p, b_p, h_q, w_q, b_q)
        needs = tuple(bool(n and t is not None) for n, t in zip(ctx.needs_input_grad[:6], heads))
        grads = [None] * 6
        if any(needs) and sh.valid > 0:
            g = None if g_div is None else g_div * ctx.scale
            ge = g_ent if (g_ent is not None and ent is not None) else None
            grads = list(
                eng.linear_divergence_bwd(
                    *heads, valid, DivStats(d, lse_p, lse_q, ent), g, ge, *ctx.opts, ctx.div,
                    **dict(zip(_NEEDS, needs)),
                    row_sums=rows,
                )
            )  # fmt: skip
        elif any(needs):
            grads = [torch.zeros_like(t) if n else None for t, n in zip(heads, needs)]
        if ctx.reduce_dh and sh.world > 1:
            for i in (0, 3):
                if needs[i]:
                    dist.all_reduce(grads[i], op=dist.ReduceOp.SUM, group=sh.group)
        return (*[x if n else None for x, n in zip(grads, needs)],) + (None,) * 7


def _check_local(h_p, w_p, b_p, h_q, w_q, b_q, valid) -> None:
    if all(isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == 0 for w in (w_p, w_q)):
        # an empty slice is legal here (more ranks than vocabulary rows): check the rest
        w_p, w_q = w_p.new_empty(1, w_p.shape[1]), w_q.new_empty(1, w_q.shape[1])
        b_p = None if b_p is None or b_p.shape != (0,) else b_p.new_empty(1)
        b_q = None if b_q is None or b_q.shape != (0,) else b_q.new_empty(1)
    check_divergence_inputs(h_p, w_p, b_p, h_q, w_q, b_q, valid)


def _dtype_code(tensors) -> int:
    codes = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
    return sum(5**i * codes.get(None if t is None else t.dtype, 4) for i, t in enumerate(tensors))


def linear_divergence_parallel(
    h_p, w_p, b_p, h_q, w_q, b_q, valid, opts_p: LogitOptions, opts_q: LogitOptions,
    div: DivergenceOptions, want_entropy: bool, group, vocab_size, reduce_dh,
):  # fmt: skip
    """``(div [N], entropy [N] or None)`` over the full vocabulary from this rank's slices of both
    heads (tensors, or DTensors sharded ``Shard(0)``); ``h_p [N, Hp]``, ``h_q [N, Hq]`` and
    ``valid [N]`` the same on every rank (``valid`` is checked across ranks like the targets of
    the log-prob family)."""
    if is_dtensor(h_p) or is_dtensor(h_q):
        raise TypeError("h_p and h_q must be plain tensors (the same on every rank), not DTensors")
    w_p, group = local_shard("w_p", w_p, group, 0)
    w_q, group = local_shard("w_q", w_q, group, 0)
    if b_p is not None:
        b_p, group = local_shard("b_p", b_p, group, 0)
    if b_q is not None:
        b_q, group = local_shard("b_q", b_q, group, 0)
    err = _check(_check_local, h_p, w_p, b_p, h_q, w_q, b_q, valid)
    ok = err is None
    extra = (
        ("teacher hidden size", h_q.shape[-1] if ok else -1),
        ("teacher bias", int(b_q is not None)),
        ("teacher logit_scale", _float_bits(opts_q.logit_scale)),
        ("teacher softcap", _float_bits(opts_q.softcap)),
        ("teacher temperature", _float_bits(opts_q.temperature)),
        ("divergence kind", _KINDS.index(div.kind)),
        ("beta", _float_bits(div.beta)),
        ("alpha", _float_bits(div.alpha)),
        ("generator", -1 if div.generator is None else F_GENERATORS.index(div.generator)),
    )
    sh = plan(
        group,
        linear=True,
        v_local=w_p.shape[0] if ok else -1,
        hidden_size=h_p.shape[-1] if ok else -1,
        dtypes=None,
        has_bias=b_p is not None,
        targets=valid.long() if ok else torch.zeros(0, dtype=torch.long),
        opts=opts_p,
        want=StatRequest(entropy=want_entropy),
        vocab_size=vocab_size,
        reduce_hidden_grad=reduce_dh,
        local_error=err,
        targets_name="token mask",
        extra=(("dtypes", _dtype_code((h_p, w_p, b_p, h_q, w_q, b_q)) if ok else -1), *extra),
    )
    cut = slice(0, sh.valid) if sh.valid > 0 else slice(None)
    w_p, w_q = w_p[cut], w_q[cut]
    b_p = None if b_p is None else b_p[cut]
    b_q = None if b_q is None else b_q[cut]
    d, ent = LinearDivergenceParallelFunction.apply(
        h_p, w_p, b_p, h_q, w_q, b_q, valid, sh, opts_p, opts_q, div, want_entropy, reduce_dh
    )
    return d, (ent if want_entropy else None)
