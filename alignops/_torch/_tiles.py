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

from ..kernels._common import LogitOptions, TokenStats, env_int

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
    returns the :class:`TokenStats` with exact zeros at ignored rows."""

    def __init__(self, targets, valid, cdt, *, need_entropy: bool, need_zmean: bool):
        n, dev = targets.shape[0], targets.device
        self.valid = valid
        self.safe_t = torch.where(valid, targets, torch.zeros_like(targets))
        self.m = torch.full((n,), -math.inf, dtype=cdt, device=dev)
        self.s = torch.zeros(n, dtype=cdt, device=dev)
        self.t = torch.zeros(n, dtype=cdt, device=dev) if need_entropy else None
        self.zy = torch.zeros(n, dtype=cdt, device=dev)
        self.zsum = torch.zeros(n, dtype=cdt, device=dev) if need_zmean else None

    def update(self, z: torch.Tensor, c0: int, c1: int, v0: int, v1: int, e_buf: torch.Tensor | None):
        """Fold ``z [c1 - c0, v1 - v0]``; ``z`` is overwritten. ``e_buf`` (same shape) is needed
        only when the entropy is tracked."""
        hit, col = target_columns(self.safe_t[c0:c1], v0, v1)
        self.zy[c0:c1] += torch.where(hit, z.gather(1, col).squeeze(1), 0.0)
        if self.zsum is not None:
            self.zsum[c0:c1] += z.sum(1)
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
        self.s[c0:c1] = self.s[c0:c1] * scale + e.sum(1)
        self.m[c0:c1] = m_new

    def finish(self, v: int) -> TokenStats:
        zero = torch.zeros((), dtype=self.m.dtype, device=self.m.device)
        logs = torch.log(self.s)
        lse = self.m + logs
        ent = None if self.t is None else torch.where(self.valid, logs - self.t / self.s, zero)
        zmean = None if self.zsum is None else torch.where(self.valid, self.zsum / v, zero)
        return TokenStats(
            torch.where(self.valid, self.zy - lse, zero), torch.where(self.valid, lse, zero), ent, zmean
        )


class GradCoefs(NamedTuple):
    """Per-row coefficients of the logit gradient, with the transform's ``a / T`` folded in::

    dr = (p * (a_row - ge * z) + gl * onehot + gz) * f'(r)

    where ``a_row = f (g_lse - g_logp + g_ent E_p z)``, ``ge = f g_ent``, ``gl = f g_logp``,
    ``gz = f g_zmean / V``, ``f = logit_scale / temperature`` and ``f'(r) = 1 - tanh^2`` with a
    soft-cap (1 without). Ignored rows have all-zero coefficients and ``lse = +inf``, so their
    ``p`` is exactly 0."""

    lse: torch.Tensor
    a: torch.Tensor
    ge: torch.Tensor | None
    gl: torch.Tensor | None
    gz: torch.Tensor | None


def grad_coefs(valid, lse, entropy, grads: TokenStats, opts: LogitOptions, v: int, cdt) -> GradCoefs:
    zero = torch.zeros(valid.shape, dtype=cdt, device=valid.device)
    f = opts.logit_scale / opts.temperature

    def coef(g):
        return None if g is None else torch.where(valid, g.to(cdt), zero) * f

    gl, gs, ge, gm = coef(grads.logp), coef(grads.lse), coef(grads.entropy), coef(grads.zmean)
    a = zero.clone()
    if gs is not None:
        a += gs
    if gl is not None:
        a -= gl
    if ge is not None:
        a += ge * (lse.to(cdt) - entropy.to(cdt))  # g_ent * E_p z
    lse_c = torch.where(valid, lse.to(cdt), torch.full_like(zero, math.inf))
    return GradCoefs(lse_c, a, ge, gl, None if gm is None else gm / v)


def logit_grad_(z, th, p_buf, co: GradCoefs, targets, c0: int, c1: int, v0: int, v1: int) -> torch.Tensor:
    """``dr`` of the tile (rows ``[c0, c1)``, columns ``[v0, v1)``) in ``p_buf``'s storage or
    ``z``'s (``z`` is overwritten). ``th``: the soft-cap's tanh tile, or None."""
    p = torch.sub(z, co.lse[c0:c1].unsqueeze(1), out=p_buf).exp_()
    if co.ge is not None:
        z.nan_to_num_(neginf=0.0)  # a -inf logit has p = 0: its p (a - ge z) term is 0, not NaN
        dz = z.mul_(-co.ge[c0:c1].unsqueeze(1)).add_(co.a[c0:c1].unsqueeze(1)).mul_(p)
    else:
        dz = p.mul_(co.a[c0:c1].unsqueeze(1))
    if co.gl is not None:
        hit, col = target_columns(targets[c0:c1], v0, v1)  # gl is already 0 on ignored rows
        dz.scatter_add_(1, col, torch.where(hit, co.gl[c0:c1], 0.0).unsqueeze(1))
    if co.gz is not None:
        dz.add_(co.gz[c0:c1].unsqueeze(1))
    if th is not None:
        dz.mul_(th.mul_(th).neg_().add_(1.0))  # 1 - tanh^2
    return dz
