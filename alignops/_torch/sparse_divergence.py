r"""PyTorch engine of the divergence family against a sparse teacher: the teacher is known only by
its top-``K`` ids ``q_ids [N, K]`` and log-probs ``q_logps [N, K]`` per token (e.g. read from a
cache), the student is a full head ``h_p [N, Hp]``, ``w_p [V, Hp]``, ``b_p``.

Tail mass (the definition; ``alignops/reference/linear_divergence.py`` has it too): both
distributions are coarse-grained onto ``K + 1`` outcomes, the listed ids and one tail outcome::

    P = (p_{i_1}, ..., p_{i_K}, 1 - sum_k p_{i_k}),    Q = (q_1, ..., q_K, max(0, 1 - sum_k q_k))

and the divergence of :class:`DivergenceOptions` is taken between ``P`` and ``Q``. Every kind is
an f-divergence, so ``D(P || Q) <= D(p || q)`` (data processing), with equality when the two tails
are proportional; ``K = V`` is the full divergence. The student's tail is computed as
``log(-expm1(logsumexp_k lp_k))``, exact even when the listed ids carry almost all the mass.
Teacher slots with ``q_logps = -inf`` are allowed (fewer than ``K`` known ids): they are zero
outcomes. Ids must lie in ``[0, V)`` and be distinct within a row.

Passes: forward, **one** vocabulary pass (the student's online log-sum-exp and entropy, and its
logits at the ``K`` ids gathered from the tiles), then the divergence on the ``[N, K + 1]``
coarse log-probabilities through the logits engine of ``linear_divergence`` (it treats
them as logits; they are already normalized). Backward: the ``K`` logits are recomputed directly
(``O(N K H)``), the coarse gradient ``g_k = dD / d lp_k`` comes from the logits engine's backward
(the tail's share enters through ``d log P_tail / d lp_k = -P_k / P_tail``), then **one**
vocabulary pass writes ``dz_v = sum_k g_k [v = i_k] - p_v sum_k g_k`` (plus the entropy term), and
``dh``, ``dW``, ``db`` as in the log-prob family. No ``[N, V]`` tensor; deterministic.
"""

from __future__ import annotations

import math

import torch

from ..kernels._common import (
    DivergenceOptions,
    DivStats,
    LogitOptions,
    StatRequest,
    _check_tensor,
    autocast_off,
    check_divergence_inputs,
    compute_dtype,
    env_flag,
)
from ._tiles import GradSink, OnlineStats, transform_, workspace_bytes
from .linear_divergence import _BIG, _chain_, logits_divergence_bwd, logits_divergence_fwd
from .linear_logprobs import _Operands, _plan

_PLAIN = LogitOptions()


def check_sparse_teacher(q_ids, q_logps, n: int, vocab: int) -> None:
    """``q_ids [N, K]`` int64 in ``[0, V)``, distinct per row; ``q_logps [N, K]`` float; K >= 1."""
    _check_tensor("q_ids", q_ids, dtypes=(torch.int64, torch.int32))
    _check_tensor("q_logps", q_logps)
    if q_ids.dim() != 2 or q_ids.shape[0] != n or q_ids.shape[1] == 0:
        raise ValueError(f"q_ids must be [N, K] = [{n}, K >= 1], got {tuple(q_ids.shape)}")
    if tuple(q_logps.shape) != tuple(q_ids.shape):
        raise ValueError(f"q_logps {tuple(q_logps.shape)} must have q_ids' shape {tuple(q_ids.shape)}")
    if q_ids.shape[1] > vocab:
        raise ValueError(f"K = {q_ids.shape[1]} teacher ids exceed the vocabulary size V = {vocab}")
    if q_ids.numel() == 0:
        return
    bad = (q_ids < 0) | (q_ids >= vocab)
    if q_ids.is_cuda:
        if env_flag("ALIGNOPS_CHECK_TARGETS", True):
            torch._assert_async(~bad.any(), "alignops: a teacher top-k id is outside [0, V)")
        return
    if bool(bad.any()):
        raise ValueError(f"q_ids must lie in [0, {vocab}); found {q_ids[bad][0].item()}")
    s = q_ids.sort(1).values
    if bool((s[:, 1:] == s[:, :-1]).any()):
        raise ValueError("q_ids must be distinct within each row (a repeated id would count twice)")


def _log_tail(lk: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum_k exp(lk))`` per row, ``-inf`` where the listed mass reaches 1."""
    s = torch.logsumexp(lk, 1)
    return torch.where(s < 0, torch.log(-torch.expm1(s.clamp(max=0.0))), -math.inf)


def _coarse(lp_k: torch.Tensor, lq_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.cat([lp_k, _log_tail(lp_k).unsqueeze(1)], 1),
        torch.cat([lq_k, _log_tail(lq_k).unsqueeze(1)], 1),
    )


def _check(h_p, w_p, b_p, q_ids, q_logps, valid):
    dot = check_divergence_inputs(h_p, w_p, b_p, None, None, None, valid)[0]
    check_sparse_teacher(q_ids, q_logps, h_p.shape[0], w_p.shape[0])
    return dot, compute_dtype(h_p, w_p, b_p)


@autocast_off
def sparse_divergence_fwd(
    h_p, w_p, b_p, q_ids, q_logps, valid, opts_p: LogitOptions, div: DivergenceOptions, *, want_entropy=False
) -> DivStats:
    """:class:`DivStats` (``lse_q`` is None) of the student head against the sparse teacher."""
    dot, cdt = _check(h_p, w_p, b_p, q_ids, q_logps, valid)
    n, hdim = h_p.shape
    v, k = w_p.shape[0], q_ids.shape[1]
    dev = h_p.device
    ids = q_ids.long()
    sp = OnlineStats(
        torch.zeros(n, dtype=torch.int64, device=dev), valid, cdt, StatRequest(entropy=want_entropy)
    )
    zk = torch.zeros(n, k, dtype=cdt, device=dev)
    C, VB = _plan(n, v, hdim, torch.finfo(cdt).bits // 8, 2 if want_entropy else 1)
    ops = _Operands(h_p, w_p, b_p, dot, cdt)
    buf = torch.empty(C * VB, dtype=cdt, device=dev)
    ebuf = torch.empty(C * VB, dtype=cdt, device=dev) if want_entropy else None
    for v0 in range(0, v, VB):
        v1 = min(v, v0 + VB)
        wb = ops.weight_block(v0, v1)
        for c0 in range(0, n, C):
            c1 = min(n, c0 + C)
            size = (c1 - c0) * (v1 - v0)
            z, _ = transform_(ops.raw(c0, c1, v0, v1, wb, buf[:size].view(c1 - c0, v1 - v0)), opts_p)
            rid = ids[c0:c1]
            hit = (rid >= v0) & (rid < v1)
            zk[c0:c1] += torch.where(hit, z.gather(1, (rid - v0).clamp(0, v1 - v0 - 1)), 0.0)
            sp.update(z, c0, c1, v0, v1, None if ebuf is None else ebuf[:size].view(c1 - c0, v1 - v0))
    lse_p = sp.m + torch.log(sp.s)
    xp, xq = _coarse(zk - lse_p.unsqueeze(1), q_logps.to(cdt))
    d = logits_divergence_fwd(xp, xq, valid, _PLAIN, _PLAIN, div).div
    zero = torch.zeros((), dtype=cdt, device=dev)
    ent = sp.finish(v).entropy if want_entropy else None
    return DivStats(d, torch.where(valid, lse_p, zero), None, ent)


def _gathered_logits(ops: _Operands, ids: torch.Tensor, opts: LogitOptions, cdt) -> torch.Tensor:
    """``z`` at ``ids [N, K]`` computed directly, in token chunks of bounded size: ``O(N K H)``."""
    n, k = ids.shape
    hdim = ops.h.shape[1]
    rows = max(1, workspace_bytes(0) // max(1, k * hdim * torch.finfo(cdt).bits // 8))
    out = torch.empty(n, k, dtype=cdt, device=ids.device)
    for c0 in range(0, n, rows):
        c1 = min(n, c0 + rows)
        w = ops._cast(ops.weight[ids[c0:c1].reshape(-1)]).view(c1 - c0, k, hdim)
        r = torch.bmm(w, ops.h[c0:c1].unsqueeze(2)).squeeze(2)
        if ops.bias is not None:
            r = r + ops.bias[ids[c0:c1]].to(cdt)
        out[c0:c1] = transform_(r, opts)[0]
    return out


@autocast_off
def sparse_divergence_bwd(
    h_p, w_p, b_p, q_ids, q_logps, valid, saved: DivStats, g_div, g_entropy, opts_p, div, *,
    need_dh_p: bool, need_dw_p: bool, need_db_p: bool,
):  # fmt: skip
    """``(dh_p, dw_p, db_p)`` (None unless asked) of ``sum g_div div + g_entropy entropy_p``."""
    dot, cdt = _check(h_p, w_p, b_p, q_ids, q_logps, valid)
    if g_entropy is not None and saved.entropy_p is None:
        raise ValueError("a gradient of the entropy needs the forward's entropy_p")
    n, hdim = h_p.shape
    v, dev = w_p.shape[0], h_p.device
    ids = q_ids.long()
    zero = torch.zeros((), dtype=cdt, device=dev)
    ops = _Operands(h_p, w_p, b_p, dot, cdt)
    lse_p = torch.where(valid, saved.lse_p.to(cdt), torch.full((), _BIG, dtype=cdt, device=dev))
    gk = torch.zeros(n, ids.shape[1], dtype=cdt, device=dev)
    if g_div is not None:
        lp_k = _gathered_logits(ops, ids, opts_p, cdt) - lse_p.unsqueeze(1)
        xp, xq = _coarse(lp_k, q_logps.to(cdt))
        coarse = logits_divergence_fwd(xp, xq, valid, _PLAIN, _PLAIN, div)
        (dx,) = logits_divergence_bwd(
            xp, xq, valid, coarse, g_div.to(cdt), None, _PLAIN, _PLAIN, div, need_dp=True, need_dq=False
        )[:1]
        p_k, p_tail = lp_k.exp(), xp[:, -1].exp()
        share = torch.where(p_tail > 0, dx[:, -1] / p_tail, zero)
        gk = torch.where(valid.unsqueeze(1), dx[:, :-1] - share.unsqueeze(1) * p_k, zero)
    gsum = gk.sum(1)
    ge = None if g_entropy is None else torch.where(valid, g_entropy.to(cdt), zero)
    ent = None if ge is None else torch.where(valid, saved.entropy_p.to(cdt), zero)
    soft = opts_p.softcap is not None
    C, VB = _plan(n, v, hdim, torch.finfo(cdt).bits // 8, 3 if soft else 2)
    sink = GradSink(
        h_p,
        w_p,
        b_p,
        need_dh=need_dh_p,
        need_dw=need_dw_p,
        need_db=need_db_p,
        one_chunk=C >= n,
        vb=VB,
        cdt=cdt,
    )
    bufs = [torch.empty(C * VB, dtype=cdt, device=dev) for _ in range(3 if soft else 2)]
    if sink.active:
        for v0 in range(0, v, VB):
            v1 = min(v, v0 + VB)
            nv = v1 - v0
            wb = ops.weight_block(v0, v1)
            sink.begin(nv)
            for c0 in range(0, n, C):
                c1 = min(n, c0 + C)
                tile = [b[: (c1 - c0) * nv].view(c1 - c0, nv) for b in bufs]
                z, th = transform_(
                    ops.raw(c0, c1, v0, v1, wb, tile[0]), opts_p, out=tile[2] if soft else None
                )
                lp = z.sub_(lse_p[c0:c1].unsqueeze(1))
                p = torch.exp(lp, out=tile[1])
                if ge is not None:  # -g_H p (lp + H) - p sum_k g_k, in lp's buffer
                    dz = lp.add_(ent[c0:c1].unsqueeze(1)).mul_(-ge[c0:c1].unsqueeze(1))
                    dz.sub_(gsum[c0:c1].unsqueeze(1)).mul_(p)
                else:
                    dz = p.mul_(-gsum[c0:c1].unsqueeze(1))
                rid = ids[c0:c1]
                hit = (rid >= v0) & (rid < v1)
                dz.scatter_add_(1, (rid - v0).clamp(0, nv - 1), torch.where(hit, gk[c0:c1], zero))
                sink.add(_chain_(dz, th, opts_p), ops.h[c0:c1], wb, c0, c1, v0, v1)
            sink.end(v0, v1)
    return sink.result()
