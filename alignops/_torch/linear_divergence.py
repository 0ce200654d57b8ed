r"""PyTorch engine of the fused two-head divergences (every device the Triton kernels do not cover).

Two heads per token ``n``: the student ``z^p = T_p(h_p @ W_p.T + b_p)`` (trained) and the teacher
``z^q = T_q(h_q @ W_q.T + b_q)`` (frozen unless its gradients are asked for), each with its own
:class:`LogitOptions` transform ``T``; ``p = softmax(z^p)``, ``q = softmax(z^q)``,
``lp = z^p - lse_p``, ``lq = z^q - lse_q``, ``delta = lq - lp``. The definitions of every
divergence are in ``alignops/reference/linear_divergence.py``; here is how each is streamed over
vocabulary tiles without the ``[N, V]`` logits (the same bound as the log-prob engine: tiles of
``[C, VB]`` inside the workspace of ``_tiles.workspace_bytes``).

Passes (one pass = one sweep over the vocabulary, both heads' matmuls per tile):

* ``forward_kl`` / ``reverse_kl``: **one** pass. Besides each head's online log-sum-exp it keeps
  ``A = sum_v exp(z^q_v - m_q) (z^q_v - z^p_v)``, rescaled by ``exp(m_old - m_new)`` whenever the
  teacher's running max ``m_q`` moves; then ``KL(q || p) = A / s_q - (lse_q - lse_p)``. The
  reverse KL is the same with the heads swapped.
* ``alpha``: **one** pass. ``log sum_v p^a q^(1 - a) = lse_y - lse_p - (1 - a)(lse_q - lse_p)`` with
  ``y = z^p + (1 - a)(z^q - z^p)``, a third online log-sum-exp; then
  ``D = -expm1(log S) / (a (1 - a))``. Written with differences so that identical heads give
  exactly 0.
* ``jsd`` (0 < beta < 1) and ``tv``: **two** passes. Their summands, ``log m_v`` of the mixture
  ``m = (1 - beta) p + beta q`` and ``|p_v - q_v|``, are not sums of exponentials of one linear
  form in ``z``: they need ``p_v`` and ``q_v`` themselves, hence both normalizers, before the
  first term can be added. Pass 1 finds ``lse_p``, ``lse_q``; pass 2 sums
  ``K_q = sum q (delta - u)`` and ``K_p = -sum p u`` (``u = log(m / p)``, computed as
  ``max(delta, 0) + log1p(w expm1(-|delta|))``, ``w = beta`` for ``delta <= 0`` else
  ``1 - beta``: exact 0 for identical heads, no overflow), ``JSD = beta K_q + (1 - beta) K_p``;
  or ``E_p[s]``, ``E_q[s]`` with ``s = sign(p - q)`` and ``TV = (E_p[s] - E_q[s]) / 2``.
* ``f``: each named generator is one of the kinds above times a constant (``kl`` = reverse KL,
  ``reverse_kl`` = forward KL, ``hellinger`` = alpha(1/2) / 2, ``chi2`` = 2 alpha(2), ``js`` =
  jsd(1/2), ``tv`` = tv), so it takes that kind's passes.

Backward (``g`` the upstream gradient of the divergence), per tile, then ``dr = dz f T'(r)``,
``dh = dr @ W``, ``dW = dr.T @ h`` as in the log-prob family::

    forward_kl   dz^p = p - q                      dz^q = q (lq - lp - D)
    reverse_kl   dz^p = p (lp - lq - D)            dz^q = q - p
    alpha        dz^p = (p S - r) / (1 - a)        dz^q = (q S - r) / a,   r = p^a q^(1-a), S = sum r
    jsd          dz^p = -(1 - b) p (u + K_p)       dz^q = b q (delta - u - K_q)
    tv           dz^p = p (s - E_p s) / 2          dz^q = -q (s - E_q s) / 2
    entropy      dz^p += -g_H p (lp + H)

one pass for the KLs and alpha (``S = 1 - a (1 - a) D`` comes from the saved value), and one for
jsd and tv when the forward's row constants ``K_p, K_q`` / ``E_p s, E_q s`` are handed over
(``row_sums_out`` / ``row_sums``: the custom ops do); without them (``DivStats`` carries only
``div``, the two ``lse`` and the entropy) a first pass recomputes them: two.

Zero probabilities: a ``-inf`` transformed logit (no soft-cap) is replaced by ``-1e30`` after a
check, so every tile term is finite; an entry where both ``p_v`` and ``q_v`` are 0 contributes 0.
A row where the divergence is infinite in exact arithmetic (the kinds and cases listed in the
reference module: student mass where the teacher has none for ``reverse_kl``, ``alpha > 1`` and
``chi2``, the converse for ``forward_kl`` and ``alpha < 0``) returns ``+inf``, and its gradient is
defined as 0 (never NaN). jsd, tv, hellinger and alpha in (0, 1) are always finite.

Precision: float32 accumulation for bf16 / fp16 / fp32 inputs, float64 for float64 inputs.
Deterministic: no atomics, a fixed order.
"""

from __future__ import annotations

import math

import torch

from ..kernels._common import (
    NOTHING_EXTRA,
    DivergenceOptions,
    DivStats,
    LogitOptions,
    StatRequest,
    autocast_off,
    check_divergence_inputs,
    check_logits_pair,
    compute_dtype,
    empty,
)
from ._tiles import GradSink, OnlineStats, _rowdot, transform_
from .linear_logprobs import _Operands, _plan

#: A ``-inf`` transformed logit is replaced by this finite floor (after the check for infinite rows).
NEG = -1e30
#: The ``lse`` used for ignored rows in the backward: their ``p`` is exactly 0.
_BIG = 1e30


def resolve(div: DivergenceOptions) -> tuple[str, float, float]:
    """``(base, parameter, scale)``: the streamed kind (``fkl``, ``rkl``, ``jsd``, ``tv``,
    ``alpha``), its parameter and the constant the value is multiplied by."""
    kind = div.kind
    if kind == "f":
        scale = {"hellinger": 0.5, "chi2": 2.0}.get(div.generator, 1.0)
        kind, div = {
            "kl": ("reverse_kl", div),
            "reverse_kl": ("forward_kl", div),
            "hellinger": ("alpha", DivergenceOptions("alpha", alpha=0.5)),
            "chi2": ("alpha", DivergenceOptions("alpha", alpha=2.0)),
            "js": ("jsd", DivergenceOptions("jsd", beta=0.5)),
            "tv": ("tv", div),
        }[div.generator]
    else:
        scale = 1.0
    if kind == "forward_kl" or (kind == "jsd" and div.beta == 0.0) or (kind == "alpha" and div.alpha == 0.0):
        return "fkl", 0.0, scale
    if kind == "reverse_kl" or (kind == "jsd" and div.beta == 1.0) or (kind == "alpha" and div.alpha == 1.0):
        return "rkl", 0.0, scale
    if kind == "jsd":
        return "jsd", div.beta, scale
    if kind == "alpha":
        return "alpha", div.alpha, scale
    return "tv", 0.0, scale


def _zero_side(base: str, prm: float) -> str | None:
    """Which head's zeros make the divergence infinite (where the other has mass), or None."""
    if base == "fkl" or (base == "alpha" and prm < 0.0):
        return "p"
    if base == "rkl" or (base == "alpha" and prm > 1.0):
        return "q"
    return None


class _Tile:
    __slots__ = ("c0", "c1", "v0", "v1", "zp", "thp", "zq", "thq", "wbp", "wbq", "s")


class _Pair:
    """Both heads' operands (:class:`_Operands` of hidden states and a weight, or
    :class:`_LogitsOperand`), the tile plan and the tile buffers. :meth:`tiles` yields the two
    transformed logit tiles of every (vocab block, token chunk), floored at :data:`NEG`.
    ``width``: the student's hidden size (logits: ``N V / (N + V)``), so that the workspace is
    bounded by the student's gradients exactly as in the log-prob engine."""

    def __init__(self, p, q, n, v, width, opts_p, opts_q, cdt, nscratch, keep_th, device):
        self.n, self.v, self.cdt = n, v, cdt
        self.opts_p, self.opts_q = opts_p, opts_q
        self.p, self.q = p, q
        self.th_p = keep_th and opts_p.softcap is not None
        self.th_q = keep_th and opts_q.softcap is not None
        nbuf = 2 + int(self.th_p) + int(self.th_q) + nscratch
        self.C, self.VB = _plan(n, v, width, torch.finfo(cdt).bits // 8, nbuf)
        self.bufs = [torch.empty(self.C * self.VB, dtype=cdt, device=device) for _ in range(nbuf)]

    def tiles(self, bad: torch.Tensor | None = None, zero_side: str | None = None, sinks=()):
        for v0 in range(0, self.v, self.VB):
            v1 = min(self.v, v0 + self.VB)
            nv = v1 - v0
            wbp, wbq = self.p.weight_block(v0, v1), self.q.weight_block(v0, v1)
            for s in sinks:
                s.begin(nv)
            for c0 in range(0, self.n, self.C):
                c1 = min(self.n, c0 + self.C)
                views = [b[: (c1 - c0) * nv].view(c1 - c0, nv) for b in self.bufs]
                t = _Tile()
                t.c0, t.c1, t.v0, t.v1, t.wbp, t.wbq = c0, c1, v0, v1, wbp, wbq
                k = 2
                out_p = out_q = None
                if self.th_p:
                    out_p, k = views[k], k + 1
                if self.th_q:
                    out_q, k = views[k], k + 1
                t.zp, t.thp = transform_(self.p.raw(c0, c1, v0, v1, wbp, views[0]), self.opts_p, out=out_p)
                t.zq, t.thq = transform_(self.q.raw(c0, c1, v0, v1, wbq, views[1]), self.opts_q, out=out_q)
                if bad is not None and zero_side is not None:
                    zero, other = (t.zp, t.zq) if zero_side == "p" else (t.zq, t.zp)
                    bad[c0:c1] |= ((zero == -math.inf) & (other > -math.inf)).any(1)
                if self.opts_p.softcap is None:
                    t.zp.clamp_(min=NEG)
                if self.opts_q.softcap is None:
                    t.zq.clamp_(min=NEG)
                t.s = views[k:]
                yield t
            for s in sinks:
                s.end(v0, v1)


class _LogitsOperand:
    """Logits given by the caller ``[N, V]``: a tile is a copy of a block (in the compute dtype)."""

    h = None

    def __init__(self, logits: torch.Tensor):
        self.x = logits

    def weight_block(self, v0: int, v1: int) -> None:
        return None

    def raw(self, c0, c1, v0, v1, wb, out):
        return out.copy_(self.x[c0:c1, v0:v1])


class _LogitsSink:
    """The gradient of caller-given logits: each tile ``dr`` is written once into its block."""

    def __init__(self, logits: torch.Tensor, need: bool):
        self.d = empty(logits.shape, dtype=logits.dtype, device=logits.device) if need else None
        if self.d is not None and logits.shape[0] == 0:
            self.d.zero_()

    @property
    def active(self) -> bool:
        return self.d is not None

    def begin(self, nv: int) -> None:
        pass

    def end(self, v0: int, v1: int) -> None:
        pass

    def add(self, dr, h_rows, wb, c0: int, c1: int, v0: int, v1: int) -> None:
        self.d[c0:c1, v0:v1].copy_(dr)

    def result(self):
        return (self.d,)


def _jsd_u(delta: torch.Tensor, beta: float, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``u = log(m / p) = log((1 - beta) + beta exp(delta))`` into ``u`` (``w`` is scratch), and
    ``delta`` turned in place into ``delta - u = log(q / m)``. With ``L = log1p(w expm1(-|delta|))``
    (``w = 1 - beta`` where ``delta > 0`` else ``beta``): ``u = max(delta, 0) + L`` and
    ``delta - u = min(delta, 0) - L``, each formed without cancelling two large terms (a student
    zero makes ``delta`` ~1e30). Exactly 0 where ``delta = 0``; no overflow for large ``|delta|``."""
    torch.abs(delta, out=u).neg_().expm1_()
    w.copy_(delta > 0).mul_(1.0 - 2.0 * beta).add_(beta)
    u.mul_(w).log1p_()
    torch.clamp(delta, min=0.0, out=w)
    delta.clamp_(max=0.0).sub_(u)
    return u.add_(w)


def _row_sums(pair: _Pair, base: str, prm: float, lse_p, lse_q):
    """The second pass of ``jsd`` / ``tv``: ``(K_q, K_p)`` or ``(E_p s, E_q s)`` per row."""
    a = torch.zeros(pair.n, dtype=pair.cdt, device=lse_p.device)
    b = torch.zeros_like(a)
    for t in pair.tiles():
        rows = slice(t.c0, t.c1)
        lp = t.zp.sub_(lse_p[rows].unsqueeze(1))
        lq = t.zq.sub_(lse_q[rows].unsqueeze(1))
        if base == "jsd":
            delta = torch.sub(lq, lp, out=t.s[0])
            u = _jsd_u(delta, prm, t.s[1], t.s[2])  # delta is now log(q / m)
            p, q = lp.exp_(), lq.exp_()
            a[rows] += _rowdot(q, delta)
            b[rows] -= _rowdot(p, u)
        else:
            p, q = lp.exp_(), lq.exp_()
            sgn = torch.sub(p, q, out=t.s[0]).sign_()
            a[rows] += _rowdot(p, sgn)
            b[rows] += _rowdot(q, sgn)
    return a, b


def _raw_lse(st: OnlineStats) -> torch.Tensor:
    return st.m + torch.log(st.s)


def _forward(pair: _Pair, valid, div: DivergenceOptions, want_entropy: bool, row_sums_out=None) -> DivStats:
    base, prm, scale = resolve(div)
    n, v, cdt = pair.n, pair.v, pair.cdt
    dev = valid.device
    idx = torch.zeros(n, dtype=torch.int64, device=dev)
    sp = OnlineStats(idx, valid, cdt, StatRequest(entropy=want_entropy))
    sq = OnlineStats(idx, valid, cdt, NOTHING_EXTRA)
    sy = OnlineStats(idx, valid, cdt, NOTHING_EXTRA) if base == "alpha" else None
    acc = torch.zeros(n, dtype=cdt, device=dev)
    side = _zero_side(base, prm)
    bad = torch.zeros(n, dtype=torch.bool, device=dev) if side is not None else None
    for t in pair.tiles(bad, side):
        c0, c1, v0, v1, rows = t.c0, t.c1, t.v0, t.v1, slice(t.c0, t.c1)
        e_buf = t.s[1] if want_entropy else None
        if base == "fkl":
            d = torch.sub(t.zq, t.zp, out=t.s[0])
            eq, sc = sq.update(t.zq, c0, c1, v0, v1, None)
            acc[rows] = acc[rows] * sc + _rowdot(eq, d)
            sp.update(t.zp, c0, c1, v0, v1, e_buf)
        elif base == "rkl":
            d = torch.sub(t.zp, t.zq, out=t.s[0])
            sq.update(t.zq, c0, c1, v0, v1, None)
            ep, sc = sp.update(t.zp, c0, c1, v0, v1, e_buf)
            acc[rows] = acc[rows] * sc + _rowdot(ep, d)
        else:
            if sy is not None:
                y = torch.sub(t.zq, t.zp, out=t.s[0]).mul_(1.0 - prm).add_(t.zp)
                sy.update(y, c0, c1, v0, v1, None)
            sq.update(t.zq, c0, c1, v0, v1, None)
            sp.update(t.zp, c0, c1, v0, v1, e_buf)
    lse_p, lse_q = _raw_lse(sp), _raw_lse(sq)
    if base == "fkl":
        d = acc / sq.s - (lse_q - lse_p)
    elif base == "rkl":
        d = acc / sp.s - (lse_p - lse_q)
    elif base == "alpha":
        log_s = (_raw_lse(sy) - lse_p) - (1.0 - prm) * (lse_q - lse_p)
        d = -torch.expm1(log_s) / (prm * (1.0 - prm))
    else:
        a, b = _row_sums(pair, base, prm, lse_p, lse_q)
        if row_sums_out is not None:
            row_sums_out.append(torch.stack([a, b]))
        d = prm * a + (1.0 - prm) * b if base == "jsd" else 0.5 * (a - b)
    if scale != 1.0:
        d = d * scale
    if bad is not None:
        d = torch.where(bad, math.inf, d)
    zero = torch.zeros((), dtype=cdt, device=dev)
    ent = sp.finish(v).entropy if want_entropy else None
    return DivStats(
        torch.where(valid, d, zero), torch.where(valid, lse_p, zero), torch.where(valid, lse_q, zero), ent
    )


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
    config=None,
    row_sums_out: list | None = None,
) -> DivStats:
    """Per-token :class:`DivStats` of ``h_p [N, Hp]``, ``w_p [V, Hp]`` (student) against
    ``h_q [N, Hq]``, ``w_q [V, Hq]`` (teacher), zero where ``valid [N]`` is False. ``config`` is
    accepted for the launchers' signature and unused here. ``row_sums_out`` (this engine only): a
    list that receives the ``[2, N]`` row constants of ``jsd`` / ``tv`` (``K_q, K_p`` or
    ``E_p s, E_q s``) which the backward otherwise recomputes with a vocabulary pass."""
    pair = _linear_pair(h_p, w_p, b_p, h_q, w_q, b_q, valid, opts_p, opts_q, 3, False)
    return _forward(pair, valid, div, want_entropy, row_sums_out)


@autocast_off
def linear_divergence_row_sums(
    h_p, w_p, b_p, h_q, w_q, b_q, valid, opts_p: LogitOptions, opts_q: LogitOptions, div, lse_p, lse_q
) -> torch.Tensor:
    """The second pass of ``jsd`` / ``tv`` alone, with given normalizers ``lse_p``, ``lse_q [N]``
    (e.g. the full-vocabulary ones of a vocabulary-parallel head, ``alignops._vocab_parallel_div``):
    ``[2, N]`` partial row sums ``(K_q, K_p)`` or ``(E_p s, E_q s)`` over this head's vocabulary
    rows, 0 where ``valid`` is False."""
    base, prm, _ = resolve(div)
    if base not in ("jsd", "tv"):
        raise ValueError(f"row sums exist for jsd and tv only, got the kind {base!r}")
    pair = _linear_pair(h_p, w_p, b_p, h_q, w_q, b_q, valid, opts_p, opts_q, 3, False)
    big = torch.full((), _BIG, dtype=pair.cdt, device=valid.device)
    lp, lq = (torch.where(valid, x.to(pair.cdt), big) for x in (lse_p, lse_q))
    return torch.stack(_row_sums(pair, base, prm, lp, lq))


def _linear_pair(h_p, w_p, b_p, h_q, w_q, b_q, valid, opts_p, opts_q, nscratch, keep_th) -> _Pair:
    dots = check_divergence_inputs(h_p, w_p, b_p, h_q, w_q, b_q, valid)
    cdt = compute_dtype(h_p, w_p, b_p, h_q, w_q, b_q)
    p, q = _Operands(h_p, w_p, b_p, dots[0], cdt), _Operands(h_q, w_q, b_q, dots[1], cdt)
    n, hp = h_p.shape
    return _Pair(p, q, n, w_p.shape[0], hp, opts_p, opts_q, cdt, nscratch, keep_th, h_p.device)


def _logits_pair(logits_p, logits_q, valid, opts_p, opts_q, nscratch, keep_th) -> _Pair:
    check_logits_pair(logits_p, logits_q, valid)
    n, v = logits_p.shape
    width = max(1, (n * v) // max(1, n + v))
    cdt = compute_dtype(logits_p, logits_q)
    p, q = _LogitsOperand(logits_p), _LogitsOperand(logits_q)
    return _Pair(p, q, n, v, width, opts_p, opts_q, cdt, nscratch, keep_th, logits_p.device)


@autocast_off
def logits_divergence_fwd(
    logits_p, logits_q, valid, opts_p, opts_q, div, *, want_entropy=False, row_sums_out=None
) -> DivStats:
    """:func:`linear_divergence_fwd` for callers holding the logits ``[N, V]`` of both heads: the
    same tiles, read from the logits instead of computed (no ``[N, V]`` temporary)."""
    pair = _logits_pair(logits_p, logits_q, valid, opts_p, opts_q, 3, False)
    return _forward(pair, valid, div, want_entropy, row_sums_out)


def _tile_grads(t: _Tile, base: str, prm: float, rows, k, need_p: bool, need_q: bool):
    """``(dz^p, dz^q)`` of the tile for ``g = 1`` (None where not needed); ``k`` holds the
    per-row constants. ``t.zp`` / ``t.zq`` hold ``lp`` / ``lq`` on entry; ``lp`` survives."""
    lp, lq = t.zp, t.zq
    s = t.s
    p = torch.exp(lp, out=s[0])
    dzp = dzq = None
    if base in ("fkl", "rkl"):
        dd = k["d"][rows].unsqueeze(1)
        if base == "fkl":
            if need_q:
                dzq = torch.sub(lq, lp, out=s[2]).sub_(dd)
            q = lq.exp_()
            if need_q:
                dzq.mul_(q)
            if need_p:
                dzp = torch.sub(p, q, out=s[1])
        else:
            if need_p:
                dzp = torch.sub(lp, lq, out=s[1]).sub_(dd).mul_(p)
            if need_q:
                dzq = torch.sub(lq.exp_(), p, out=s[2])
    elif base == "alpha":
        # capped below overflow: only an infinite row (zero gradient) can reach the cap
        cap = math.log(torch.finfo(lp.dtype).max) - 1.0
        r = torch.sub(lq, lp, out=s[3]).mul_(1.0 - prm).add_(lp).clamp_(max=cap).exp_()
        ss = k["S"][rows].unsqueeze(1)
        if need_p:
            dzp = torch.mul(p, ss, out=s[1]).sub_(r).div_(1.0 - prm)
        if need_q:
            dzq = lq.exp_().mul_(ss).sub_(r).div_(prm)
    elif base == "jsd":
        delta = torch.sub(lq, lp, out=s[1])
        u = _jsd_u(delta, prm, s[2], s[3])  # delta is now log(q / m)
        if need_q:
            dzq = delta.sub_(k["a"][rows].unsqueeze(1)).mul_(lq.exp_()).mul_(prm)
        if need_p:
            dzp = u.add_(k["b"][rows].unsqueeze(1)).mul_(p).mul_(-(1.0 - prm))
    else:  # tv
        q = lq.exp_()
        sgn = torch.sub(p, q, out=s[1]).sign_()
        if need_p:
            dzp = torch.sub(sgn, k["a"][rows].unsqueeze(1), out=s[2]).mul_(p).mul_(0.5)
        if need_q:
            dzq = sgn.sub_(k["b"][rows].unsqueeze(1)).mul_(q).mul_(-0.5)
    return p, dzp, dzq


def _chain_(dz: torch.Tensor, th, opts: LogitOptions) -> torch.Tensor:
    """``dr = dz f T'(r)``: ``f = logit_scale / temperature``, times ``1 - tanh^2`` with a soft-cap."""
    f = opts.logit_scale / opts.temperature
    if f != 1.0:
        dz.mul_(f)
    if th is not None:
        dz.mul_(th.mul_(th).neg_().add_(1.0))
    return dz


def _backward(
    pair: _Pair, valid, saved: DivStats, g_div, g_entropy, div, sink_p, sink_q, row_sums=None
) -> None:
    if g_entropy is not None and saved.entropy_p is None:
        raise ValueError("a gradient of the entropy needs the forward's entropy_p")
    base, prm, scale = resolve(div)
    n, cdt, dev = pair.n, pair.cdt, valid.device
    zero = torch.zeros((), dtype=cdt, device=dev)
    d_saved = saved.div.to(cdt)
    finite = valid & torch.isfinite(d_saved)
    g = (
        torch.zeros(n, dtype=cdt, device=dev)
        if g_div is None
        else torch.where(finite, g_div.to(cdt) * scale, zero)
    )
    ge = torch.where(valid, g_entropy.to(cdt), zero) if g_entropy is not None else None
    need_p, need_q = sink_p.active, sink_q.active
    if not (need_p or need_q):
        return
    big = torch.full((), _BIG, dtype=cdt, device=dev)
    lse_p = torch.where(valid, saved.lse_p.to(cdt), big)
    lse_q = torch.where(valid, saved.lse_q.to(cdt), big)
    k = {"d": torch.where(finite, d_saved / scale, zero)}
    if base == "alpha":
        k["S"] = 1.0 - prm * (1.0 - prm) * k["d"]
    elif base in ("jsd", "tv"):
        a, b = row_sums.to(cdt) if row_sums is not None else _row_sums(pair, base, prm, lse_p, lse_q)
        k["a"], k["b"] = torch.where(valid, a, zero), torch.where(valid, b, zero)
    ent = None if ge is None else torch.where(valid, saved.entropy_p.to(cdt), zero)
    hp, hq = pair.p.h, pair.q.h
    for t in pair.tiles(sinks=[s for s in (sink_p, sink_q) if s.active]):
        c0, c1, rows = t.c0, t.c1, slice(t.c0, t.c1)
        t.zp.sub_(lse_p[rows].unsqueeze(1))
        t.zq.sub_(lse_q[rows].unsqueeze(1))
        p, dzp, dzq = _tile_grads(t, base, prm, rows, k, need_p, need_q)
        if need_p:
            dzp.mul_(g[rows].unsqueeze(1))
            if ge is not None:  # -g_H p (lp + H), in lp's buffer
                dzp.add_(t.zp.add_(ent[rows].unsqueeze(1)).mul_(p).mul_(-ge[rows].unsqueeze(1)))
            rows_h = None if hp is None else hp[c0:c1]
            sink_p.add(_chain_(dzp, t.thp, pair.opts_p), rows_h, t.wbp, c0, c1, t.v0, t.v1)
        if need_q:
            dzq.mul_(g[rows].unsqueeze(1))
            rows_h = None if hq is None else hq[c0:c1]
            sink_q.add(_chain_(dzq, t.thq, pair.opts_q), rows_h, t.wbq, c0, c1, t.v0, t.v1)


@autocast_off
def linear_divergence_bwd(
    h_p,
    w_p,
    b_p,
    h_q,
    w_q,
    b_q,
    valid,
    saved: DivStats,
    g_div,
    g_entropy,
    opts_p: LogitOptions,
    opts_q: LogitOptions,
    div: DivergenceOptions,
    *,
    need_dh_p: bool,
    need_dw_p: bool,
    need_db_p: bool,
    need_dh_q: bool,
    need_dw_q: bool,
    need_db_q: bool,
    config=None,
    row_sums: torch.Tensor | None = None,
):
    """``(dh_p, dw_p, db_p, dh_q, dw_q, db_q)`` (each None unless asked) of
    ``sum_n g_div[n] div[n] + g_entropy[n] entropy_p[n]``, in the input dtypes. ``row_sums``
    (this engine only): the forward's ``row_sums_out``, which saves ``jsd`` / ``tv`` a pass."""
    pair = _linear_pair(h_p, w_p, b_p, h_q, w_q, b_q, valid, opts_p, opts_q, 4, True)
    one, vb, cdt = pair.C >= pair.n, pair.VB, pair.cdt
    sink_p = GradSink(
        h_p, w_p, b_p, need_dh=need_dh_p, need_dw=need_dw_p, need_db=need_db_p, one_chunk=one, vb=vb, cdt=cdt
    )
    sink_q = GradSink(
        h_q, w_q, b_q, need_dh=need_dh_q, need_dw=need_dw_q, need_db=need_db_q, one_chunk=one, vb=vb, cdt=cdt
    )
    _backward(pair, valid, saved, g_div, g_entropy, div, sink_p, sink_q, row_sums)
    return sink_p.result() + sink_q.result()


@autocast_off
def logits_divergence_bwd(
    logits_p, logits_q, valid, saved: DivStats, g_div, g_entropy, opts_p, opts_q, div, *, need_dp, need_dq,
    row_sums=None,
):  # fmt: skip
    """``(dlogits_p, dlogits_q)`` (None unless asked) for :func:`logits_divergence_fwd`."""
    pair = _logits_pair(logits_p, logits_q, valid, opts_p, opts_q, 4, True)
    sink_p, sink_q = _LogitsSink(logits_p, need_dp), _LogitsSink(logits_q, need_dq)
    _backward(pair, valid, saved, g_div, g_entropy, div, sink_p, sink_q, row_sums)
    return sink_p.result() + sink_q.result()
