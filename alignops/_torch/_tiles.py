"""Tile math shared by the PyTorch engines: the workspace bound, the logit transform, the
online log-sum-exp statistics and the logit gradient. One definition each, used by every
family (the Triton counterparts are in ``kernels/_jit.py``).

Symbols: ``z`` transformed logits of a tile ``[rows, cols]``; per row ``m`` running max,
``s = sum exp(z - m)``, ``t = sum exp(z - m) (z - m)``; ``lse = m + log s``;
``entropy = log s - t / s``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..kernels._common import GRAD_FIELDS, LogitOptions, StatRequest, TokenStats, empty, env_int

#: Upper bound of the tile workspace per engine call. 32 MiB keeps the peak extra memory of a
#: float32 fwd+bwd at N=4096, H=1024, V=65536 within 1.12x of the returned gradients while each
#: matmul tile stays large enough (>= 4096 x 1024) for BLAS to run at speed.
MAX_WORKSPACE_BYTES = 32 * 2**20
#: Without ``ALIGNOPS_CPU_WORKSPACE_BYTES`` the workspace is also held to a quarter of the size of
#: the gradients the call returns, so small problems never pay for tiles they do not need:
#: extra memory <= 1.25x the gradients plus O(N) ...
WORKSPACE_FRACTION_OF_GRADS = 0.25
#: ... but never below 4 MiB, where per-tile overheads would dominate the time.
MIN_WORKSPACE_BYTES = 4 * 2**20


def workspace_bytes(grad_bytes: int) -> int:
    """Bytes of tiles an engine call may keep alive: ``ALIGNOPS_CPU_WORKSPACE_BYTES`` when set,
    else a quarter of ``grad_bytes`` clamped to ``[4 MiB, 32 MiB]`` (docs/env.md)."""
    budget = env_int("ALIGNOPS_CPU_WORKSPACE_BYTES", 0)
    if budget > 0:
        return budget
    return min(MAX_WORKSPACE_BYTES, max(MIN_WORKSPACE_BYTES, int(grad_bytes * WORKSPACE_FRACTION_OF_GRADS)))


def transform_(r: torch.Tensor, opts: LogitOptions, out: torch.Tensor | None = None):
    """Raw logits ``r`` -> ``z`` (``LogitOptions``), in place in ``r``'s buffer. With a soft-cap
    and ``out`` given, ``z`` goes to ``out`` and ``r``'s buffer keeps ``th = tanh(a r / c)``
    for the derivative. Returns ``(z, th | None)``."""
    if opts.softcap is None:
        f = opts.logit_scale / opts.temperature
        return (r if f == 1.0 else r.mul_(f)), None
    th = r.mul_(opts.logit_scale / opts.softcap).tanh_()
    k = opts.softcap / opts.temperature
    if out is None:
        return th.mul_(k), None
    return torch.mul(th, k, out=out), th


def target_columns(targets: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hit [C], col [C, 1])``: which targets fall in vocab block ``[v0, v1)`` and their column
    there (clamped into the block for the rows that miss, whose values are masked). No sync."""
    return (targets >= v0) & (targets < v1), (targets - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(1)`` without a temporary of the tiles' size."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class OnlineStats:
    """Running per-row statistics over vocabulary tiles, in the compute dtype ``cdt``.

    ``update`` folds one tile of logits (rows ``[c0, c1)``, columns ``[v0, v1)``); ``finish``
    returns the requested :class:`TokenStats` with exact zeros at ignored rows. Besides ``m``,
    ``s`` and ``t`` it keeps ``s2 = sum exp(2 (z - m))`` (so ``log sum p^2 = log s2 - 2 log s``)
    and a running top-k of ``z`` (merged tile by tile with ``torch.topk``)."""

    def __init__(self, targets, valid, cdt, want: StatRequest):
        n, dev = targets.shape[0], targets.device
        self.valid, self.want = valid, want
        self.safe_t = torch.where(valid, targets, torch.zeros_like(targets))
        self.m = torch.full((n,), -math.inf, dtype=cdt, device=dev)
        self.s = torch.zeros(n, dtype=cdt, device=dev)
        self.t = torch.zeros(n, dtype=cdt, device=dev) if want.entropy else None
        self.s2 = torch.zeros(n, dtype=cdt, device=dev) if want.log_sum_p2 else None
        self.zy = torch.zeros(n, dtype=cdt, device=dev)
        self.zsum = torch.zeros(n, dtype=cdt, device=dev) if want.zmean else None
        self.tv = torch.full((n, want.topk), -math.inf, dtype=cdt, device=dev) if want.topk else None
        self.ti = torch.full((n, want.topk), -1, dtype=torch.int64, device=dev) if want.topk else None

    def _topk_update(self, z: torch.Tensor, c0: int, c1: int, v0: int) -> None:
        v, i = torch.topk(z, min(self.want.topk, z.shape[1]), dim=1)
        cand_v, cand_i = torch.cat([self.tv[c0:c1], v], 1), torch.cat([self.ti[c0:c1], i + v0], 1)
        self.tv[c0:c1], pick = cand_v.topk(self.want.topk, dim=1)
        self.ti[c0:c1] = cand_i.gather(1, pick)

    def update(self, z: torch.Tensor, c0: int, c1: int, v0: int, v1: int, e_buf: torch.Tensor | None):
        """Fold ``z [c1 - c0, v1 - v0]``; ``z`` is overwritten. ``e_buf`` (same shape) is needed
        only when the entropy is tracked. Returns ``e = exp(z - m_new)`` (in ``e_buf`` or ``z``'s
        storage) and the rescale factor ``exp(m_old - m_new) [c1 - c0]`` of the running sums."""
        hit, col = target_columns(self.safe_t[c0:c1], v0, v1)
        self.zy[c0:c1] += torch.where(hit, z.gather(1, col).squeeze(1), 0.0)
        if self.zsum is not None:
            self.zsum[c0:c1] += z.sum(1)
        if self.tv is not None:
            self._topk_update(z, c0, c1, v0)
        m_old = self.m[c0:c1]
        m_new = torch.maximum(m_old, z.amax(1))
        scale = torch.exp(m_old - m_new)  # exp(-inf) = 0 on the first tile
        z.sub_(m_new.unsqueeze(1))  # z - m_new
        e = torch.exp(z, out=e_buf) if self.t is not None else z.exp_()
        if self.t is not None:
            z.nan_to_num_(neginf=0.0)  # a -inf logit has e = 0: its e (z - m) term is 0, not NaN
            # t_old' = scale * (t_old + (m_old - m_new) s_old), then + sum e (z - m_new)
            shift = torch.where(torch.isfinite(m_old), m_old - m_new, torch.zeros_like(m_old))
            self.t[c0:c1] = scale * (self.t[c0:c1] + shift * self.s[c0:c1]) + _rowdot(e, z)
        if self.s2 is not None:
            self.s2[c0:c1] = self.s2[c0:c1] * scale * scale + _rowdot(e, e)
        self.s[c0:c1] = self.s[c0:c1] * scale + e.sum(1)
        self.m[c0:c1] = m_new
        return e, scale

    def finish(self, v: int) -> TokenStats:
        zero = torch.zeros((), dtype=self.m.dtype, device=self.m.device)
        valid = self.valid

        def masked(x):
            return None if x is None else torch.where(valid if x.dim() == 1 else valid[:, None], x, zero)

        logs = torch.log(self.s)
        lse = self.m + logs
        return TokenStats(
            masked(self.zy - lse),
            masked(lse),
            None if self.t is None else masked(logs - self.t / self.s),
            None if self.zsum is None else masked(self.zsum / v),
            None if self.s2 is None else masked(torch.log(self.s2) - 2.0 * logs),
            None if self.ti is None else torch.where(valid[:, None], self.ti, -1),
            None if self.tv is None else masked(self.tv - lse[:, None]),
        )


class GradCoefs(NamedTuple):
    """Per-row coefficients of the logit gradient, with the transform's ``f = a / T`` folded in::

    dr = (p * (a_row - ge * z + c2 * p) + gl * onehot + gz) * f'(r)

    where ``a_row = f (g_lse - g_logp + g_ent E_p z - 2 g_lsp2)``, ``ge = f g_ent``,
    ``gl = f g_logp``, ``gz = f g_zmean / V``, ``c2 = 2 f g_lsp2 / sum p^2`` (the derivative of
    ``log sum p^2`` is ``2 (p^2 / sum p^2 - p)``), ``f = logit_scale / temperature`` and
    ``f'(r) = 1 - tanh^2`` with a soft-cap (1 without). Ignored rows have all-zero coefficients and
    ``lse = +inf``, so their ``p`` is exactly 0."""

    lse: torch.Tensor
    a: torch.Tensor
    ge: torch.Tensor | None
    gl: torch.Tensor | None
    gz: torch.Tensor | None
    c2: torch.Tensor | None


def grad_coefs(valid, saved: TokenStats, grads: TokenStats, opts: LogitOptions, v: int, cdt) -> GradCoefs:
    """The per-row coefficients from the forward's ``saved`` statistics (``lse``, and ``entropy`` /
    ``log_sum_p2`` where their gradient is given) and the upstream ``grads``."""
    zero = torch.zeros(valid.shape, dtype=cdt, device=valid.device)
    f = opts.logit_scale / opts.temperature

    def coef(g):
        return None if g is None else torch.where(valid, g.to(cdt), zero) * f

    gl, gs, ge, gm, g2 = (coef(getattr(grads, k)) for k in GRAD_FIELDS)
    a = zero.clone()
    if gs is not None:
        a += gs
    if gl is not None:
        a -= gl
    if ge is not None:
        a += ge * (saved.lse.to(cdt) - saved.entropy.to(cdt))  # g_ent * E_p z
    c2 = None
    if g2 is not None:
        a -= 2.0 * g2
        c2 = 2.0 * g2 * torch.exp(-torch.where(valid, saved.log_sum_p2.to(cdt), zero))
    lse_c = torch.where(valid, saved.lse.to(cdt), torch.full_like(zero, math.inf))
    return GradCoefs(lse_c, a, ge, gl, None if gm is None else gm / v, c2)


def logit_grad_(z, th, p_buf, co: GradCoefs, targets, c0: int, c1: int, v0: int, v1: int) -> torch.Tensor:
    """``dr`` of the tile (rows ``[c0, c1)``, columns ``[v0, v1)``) in ``p_buf``'s storage or
    ``z``'s (``z`` is overwritten). ``th``: the soft-cap's tanh tile, or None."""
    p = torch.sub(z, co.lse[c0:c1].unsqueeze(1), out=p_buf).exp_()
    rows = slice(c0, c1)
    if co.ge is None and co.c2 is None:
        dz = p.mul_(co.a[rows].unsqueeze(1))
    else:
        if co.ge is not None:
            z.nan_to_num_(neginf=0.0)  # a -inf logit has p = 0: its p (a - ge z) term is 0, not NaN
            z.mul_(-co.ge[rows].unsqueeze(1))
            if co.c2 is not None:
                z.addcmul_(p, co.c2[rows].unsqueeze(1))
        else:
            torch.mul(p, co.c2[rows].unsqueeze(1), out=z)
        dz = z.add_(co.a[rows].unsqueeze(1)).mul_(p)
    if co.gl is not None:
        hit, col = target_columns(targets[c0:c1], v0, v1)  # gl is already 0 on ignored rows
        dz.scatter_add_(1, col, torch.where(hit, co.gl[c0:c1], 0.0).unsqueeze(1))
    if co.gz is not None:
        dz.add_(co.gz[c0:c1].unsqueeze(1))
    if th is not None:
        dz.mul_(th.mul_(th).neg_().add_(1.0))  # 1 - tanh^2
    return dz


class GradSink:
    """Where the logit-gradient tiles ``dr [rows, nv]`` of one head go: ``dh += dr @ W_block``
    (an ``[N, H]`` accumulator in the compute dtype: the gradient itself for float32 / float64),
    ``dW[v0:v1] = dr.T @ h`` written once per vocabulary block (straight into the returned gradient
    when one token chunk covers all rows, else through a ``[VB, H]`` accumulator), ``db += sum dr``.
    Deterministic: a fixed order, no atomics."""

    def __init__(self, hidden, weight, bias, *, need_dh, need_dw, need_db, one_chunk: bool, vb: int, cdt):
        n, hdim = hidden.shape
        dev = hidden.device
        self.hidden, self.bias, self.cdt, self.one_chunk = hidden, bias, cdt, one_chunk
        self.dh = None
        if need_dh:
            self.dh = (
                torch.zeros(n, hdim, dtype=cdt, device=dev)
                if hidden.dtype != cdt
                else torch.zeros_like(hidden)
            )
        self.dw = empty(weight.shape, dtype=weight.dtype, device=dev) if need_dw else None
        if self.dw is not None and n == 0:
            self.dw.zero_()  # no token: nothing is written below
        self.db = (
            torch.zeros(weight.shape[0], dtype=cdt, device=dev) if need_db and bias is not None else None
        )
        self.acc = torch.empty(vb, hdim, dtype=cdt, device=dev) if need_dw and not one_chunk else None

    @property
    def active(self) -> bool:
        return self.dh is not None or self.dw is not None or self.db is not None

    def begin(self, nv: int) -> None:
        if self.acc is not None:
            self.acc[:nv].zero_()

    def add(self, dr, h_rows, wb, c0: int, c1: int, v0: int, v1: int) -> None:
        """Fold the tile ``dr`` of rows ``[c0, c1)``, columns ``[v0, v1)``; ``h_rows`` and ``wb`` are
        the matmul operands in the compute dtype."""
        if self.dh is not None:
            self.dh[c0:c1].addmm_(dr, wb)
        if self.dw is not None:
            if self.acc is not None:
                self.acc[: v1 - v0].addmm_(dr.T, h_rows)
            elif self.dw.dtype == self.cdt:
                torch.mm(dr.T, h_rows, out=self.dw[v0:v1])
            else:
                self.dw[v0:v1].copy_(dr.T @ h_rows)
        if self.db is not None:
            self.db[v0:v1] += dr.sum(0)

    def end(self, v0: int, v1: int) -> None:
        if self.acc is not None:
            self.dw[v0:v1].copy_(self.acc[: v1 - v0])

    def result(self):
        """``(dh, dW, db)`` in the input dtypes (None where not asked)."""
        dh, db = self.dh, self.db
        if dh is not None and dh.dtype != self.hidden.dtype:
            dh = dh.to(self.hidden.dtype)
        if db is not None and db.dtype != self.bias.dtype:
            db = db.to(self.bias.dtype)
        return dh, self.dw, db
