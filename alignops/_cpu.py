"""Chunked PyTorch engine of the fused linear log-probs family (any non-CUDA device).

Same contract as the Triton launchers in ``kernels/linear_logprobs.py`` (see
``docs/interfaces.md``), same math, same memory bound: the ``[N, V]`` logits never exist.
The logits live only as ``[C, VB]`` tiles (``C`` tokens x ``VB`` vocabulary rows) inside
a workspace of at most ``ALIGNOPS_CPU_WORKSPACE_BYTES`` (default 32 MiB).

Math (SPEC §1.1; symbols as in the code):

    raw  = h @ W.T + b                     [C, VB] tile
    zs   = c * tanh(raw / c)               (soft-cap, optional)
    z    = zs / T                          (temperature)
    lse  = log sum_v exp(z_v)              online over vocab blocks: (m, s) pairs
    logp = z[y] - lse
    ent  = lse - sum_v p_v z_v             p = exp(z - lse); online sum_v e^(z_v - m) z_v
    zbar = mean_v z_v

Backward, given per-row upstream gradients (g_logp, g_ent, g_lse, g_zbar) and the saved
``lse`` and ``Ez = lse - ent``:

    dz     = p * (g_lse - g_logp + g_ent * Ez - g_ent * z) + g_logp * onehot(y) + g_zbar / V
    draw   = dz * (1 - tanh(raw / c)^2) / T
    dh     = draw @ W          dW = draw.T @ h          db = draw.sum(0)

Loop order: vocab blocks outer, token chunks inner. With ``C = N`` (the common case: the
workspace holds ``N x VB``) every ``dW`` block is written exactly once, straight into the
returned gradient, so no float32 copy of ``[V, H]`` is ever kept; ``dh`` is accumulated in
a ``[N, H]`` buffer (the gradient itself for float32 / float64 inputs).

Precision: float32 accumulation for bf16 / fp16 / fp32 inputs, float64 for float64 inputs
(so ``torch.autograd.gradcheck`` works). Deterministic: no atomics, a fixed order.
"""

from __future__ import annotations

import math

import torch

from .kernels._common import empty, env_int

#: Workspace cap for logit tiles, per engine call. 32 MiB keeps the peak extra memory of a
#: float32 fwd+bwd at N=4096, H=1024, V=65536 within 1.12x of the returned gradients
#: while each matmul tile stays large enough (>= 4096 x 1024) for BLAS to run at speed.
DEFAULT_WORKSPACE_BYTES = 32 * 2**20
#: Without an explicit ``ALIGNOPS_CPU_WORKSPACE_BYTES`` the workspace is also held to a
#: quarter of the gradients' size (``(N + V) * H`` elements), so small problems never pay
#: for tiles they do not need: extra memory <= 1.25x the gradients plus O(N). ...
WORKSPACE_FRACTION_OF_GRADS = 0.25
#: ... but never below 4 MiB, where per-tile overheads would dominate the time.
MIN_WORKSPACE_BYTES = 4 * 2**20
#: Smallest vocabulary block worth a separate matmul call; below it we chunk tokens.
#: (``ALIGNOPS_CPU_MIN_VOCAB_BLOCK`` overrides it; tests use tiny values.)
MIN_VOCAB_BLOCK = 256


def _compute_dtype(*ts: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _plan(n: int, v: int, h: int, elem: int, nbuf: int) -> tuple[int, int]:
    """Token chunk ``C`` and vocab block ``VB`` so that ``nbuf`` tiles fit the workspace."""
    budget = env_int("ALIGNOPS_CPU_WORKSPACE_BYTES", 0)
    if budget <= 0:
        grads = (n + v) * h * elem
        budget = int(grads * WORKSPACE_FRACTION_OF_GRADS)
        budget = min(DEFAULT_WORKSPACE_BYTES, max(MIN_WORKSPACE_BYTES, budget))
    min_vb = env_int("ALIGNOPS_CPU_MIN_VOCAB_BLOCK", MIN_VOCAB_BLOCK)
    per_tile = max(budget // nbuf, elem)
    if n == 0:
        return 1, max(1, min(v, min_vb))
    vb = per_tile // (elem * n)
    if vb >= min(v, min_vb):
        return n, max(1, min(v, vb))
    vb = max(1, min(v, min_vb))
    return max(1, per_tile // (elem * vb)), vb


class _Tiles:
    """Computes transformed logit tiles ``z[c0:c1, v0:v1]`` into preallocated buffers."""

    def __init__(self, hidden, weight, bias, temperature, softcap, cdt):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.inv_t = 1.0 / temperature
        self.softcap = softcap
        self.cdt = cdt
        # Hidden in compute dtype: a no-op view for float32/float64 inputs, an [N, H]
        # upcast (O(N), never O(V)) for bf16 / fp16.
        self.h = hidden if hidden.dtype == cdt else hidden.to(cdt)

    def weight_block(self, v0: int, v1: int) -> torch.Tensor:
        wb = self.weight[v0:v1]
        return wb if wb.dtype == self.cdt else wb.to(self.cdt)

    def raw(self, c0, c1, v0, v1, wb, out):
        """``out[:] = h[c0:c1] @ W[v0:v1].T + b[v0:v1]`` (the pre-transform logits)."""
        torch.mm(self.h[c0:c1], wb.T, out=out)
        if self.bias is not None:
            out.add_(self.bias[v0:v1].to(self.cdt))
        return out

    def transform_(self, raw):
        """In place: ``raw -> z`` (soft-cap then temperature). Returns ``z``."""
        if self.softcap is not None:
            raw.mul_(1.0 / self.softcap).tanh_().mul_(self.softcap * self.inv_t)
        elif self.inv_t != 1.0:
            raw.mul_(self.inv_t)
        return raw


def _target_cols(t: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hit [C], col [C, 1])``: which targets fall in vocab block ``[v0, v1)`` and their
    column there (clamped into the block for the rows that miss, whose values are masked)."""
    return (t >= v0) & (t < v1), (t - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(1)`` without a temporary of the tiles' size."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


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
):
    """Forward statistics. Returns ``(logp, lse, entropy | None, zmean | None)`` in the
    compute dtype (float32, or float64 for float64 inputs), zero at ignored rows."""
    n, _ = hidden.shape
    v = weight.shape[0]
    cdt = _compute_dtype(hidden, weight, bias)
    dev = hidden.device
    elem = torch.finfo(cdt).bits // 8
    nbuf = 2 if need_entropy else 1  # entropy needs z - m and exp(z - m) side by side
    C, VB = _plan(n, v, hidden.shape[1], elem, nbuf)
    tiles = _Tiles(hidden, weight, bias, temperature, softcap, cdt)

    m = torch.full((n,), -math.inf, dtype=cdt, device=dev)  # running max
    s = torch.zeros(n, dtype=cdt, device=dev)  # running sum of exp(z - m)
    se = torch.zeros(n, dtype=cdt, device=dev) if need_entropy else None  # sum exp(z - m) * (z - m)
    zsum = torch.zeros(n, dtype=cdt, device=dev) if need_zmean else None
    zy = torch.zeros(n, dtype=cdt, device=dev)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))

    buf_z = torch.empty(C * VB, dtype=cdt, device=dev)
    buf_e = torch.empty(C * VB, dtype=cdt, device=dev) if need_entropy else None
    for v0 in range(0, v, VB):
        v1 = min(v, v0 + VB)
        wb = tiles.weight_block(v0, v1)
        for c0 in range(0, n, C):
            c1 = min(n, c0 + C)
            rows = c1 - c0
            z = tiles.transform_(tiles.raw(c0, c1, v0, v1, wb, buf_z[: rows * (v1 - v0)].view(rows, v1 - v0)))
            # target logit of the rows whose target falls in this block (no host sync)
            hit, col = _target_cols(safe_t[c0:c1], v0, v1)
            zy[c0:c1] += torch.where(hit, z.gather(1, col).squeeze(1), 0.0)
            if zsum is not None:
                zsum[c0:c1] += z.sum(1)
            m_old = m[c0:c1]
            m_new = torch.maximum(m_old, z.amax(1))
            scale = torch.exp(m_old - m_new)  # exp(-inf) = 0 on the first block
            z.sub_(m_new.unsqueeze(1))  # z - m_new
            if se is not None:
                e = torch.exp(z, out=buf_e[: rows * (v1 - v0)].view(rows, v1 - v0))
            else:
                e = z.exp_()
            if se is not None:
                # sum e^(z-m_new) (z - m_new), carried from the old shift:
                # se_old' = scale * (se_old + (m_old - m_new) * s_old)
                shift = torch.where(torch.isfinite(m_old), m_old - m_new, torch.zeros_like(m_old))
                se[c0:c1] = scale * (se[c0:c1] + shift * s[c0:c1]) + _rowdot(e, z)
            s[c0:c1] = s[c0:c1] * scale + e.sum(1)
            m[c0:c1] = m_new

    lse = m + torch.log(s)
    zero = torch.zeros((), dtype=cdt, device=dev)
    logp = torch.where(valid, zy - lse, zero)
    entropy = None
    if se is not None:
        # H = lse - E_p[z] = log s - se / s   (both relative to the same shift m)
        entropy = torch.where(valid, torch.log(s) - se / s, zero)
    zmean = torch.where(valid, zsum / v, zero) if zsum is not None else None
    return logp, torch.where(valid, lse, zero), entropy, zmean


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
):
    """Gradients ``(dh, dW, db)`` (each ``None`` unless requested), in the input dtypes."""
    n, hdim = hidden.shape
    v = weight.shape[0]
    cdt = _compute_dtype(hidden, weight, bias)
    dev = hidden.device
    elem = torch.finfo(cdt).bits // 8
    valid = targets != ignore_index
    zero = torch.zeros(n, dtype=cdt, device=dev)

    def coef(g):
        return zero if g is None else torch.where(valid, g.to(cdt), zero)

    gl, ge, gs, gm = coef(g_logp), coef(g_ent), coef(g_lse), coef(g_zmean)
    has_ent = g_ent is not None and entropy is not None
    # Ignored rows: lse -> +inf makes p exactly 0 there, so no inf * 0 can appear.
    lse_c = torch.where(valid, lse.to(cdt), torch.full_like(zero, math.inf))
    ez = (lse.to(cdt) - entropy.to(cdt)) if has_ent else zero  # E_p[z]
    a = gs - gl + ge * ez  # dz = p * (a - g_ent * z) + g_logp * onehot + g_zbar / V
    zbar_term = gm / v
    has_zbar = g_zmean is not None
    inv_t = 1.0 / temperature
    if softcap is None:
        # the temperature factor folds into the per-row coefficients
        a, ge_s, gl_s, zbar_term = a * inv_t, ge * inv_t, gl * inv_t, zbar_term * inv_t
    else:
        ge_s, gl_s = ge, gl

    nbuf = 3 if softcap is not None else 2
    C, VB = _plan(n, v, hidden.shape[1], elem, nbuf)
    tiles = _Tiles(hidden, weight, bias, temperature, softcap, cdt)
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))

    dh = None
    if need_dhidden:
        dh = torch.zeros(n, hdim, dtype=cdt, device=dev) if hidden.dtype != cdt else torch.zeros_like(hidden)
    dW = empty(weight.shape, dtype=weight.dtype, device=dev) if need_dweight else None
    if dW is not None and n == 0:
        dW.zero_()  # no token: the loops below write nothing
    db = torch.zeros(v, dtype=cdt, device=dev) if need_dbias else None
    h_c = tiles.h
    one_chunk = C >= n
    dw_acc = None
    if need_dweight and not one_chunk:
        dw_acc = torch.empty(VB, hdim, dtype=cdt, device=dev)

    buf1 = torch.empty(C * VB, dtype=cdt, device=dev)
    buf2 = torch.empty(C * VB, dtype=cdt, device=dev)
    buf3 = torch.empty(C * VB, dtype=cdt, device=dev) if softcap is not None else None
    for v0 in range(0, v, VB):
        v1 = min(v, v0 + VB)
        nv = v1 - v0
        wb = tiles.weight_block(v0, v1)
        if dw_acc is not None:
            dw_acc[:nv].zero_()
        for c0 in range(0, n, C):
            c1 = min(n, c0 + C)
            rows = c1 - c0
            raw = tiles.raw(c0, c1, v0, v1, wb, buf1[: rows * nv].view(rows, nv))
            if softcap is not None:
                tanh = raw.mul_(1.0 / softcap).tanh_()  # buf1 = t = tanh(raw / c)
                z = torch.mul(tanh, softcap * inv_t, out=buf3[: rows * nv].view(rows, nv))
            else:
                z = tiles.transform_(raw)
            p = torch.sub(z, lse_c[c0:c1].unsqueeze(1), out=buf2[: rows * nv].view(rows, nv)).exp_()
            if has_ent:
                # dz = p * (a - g_ent * z), computed in the z buffer
                dz = z.mul_(-ge_s[c0:c1].unsqueeze(1)).add_(a[c0:c1].unsqueeze(1)).mul_(p)
            else:
                dz = p.mul_(a[c0:c1].unsqueeze(1))
            hit, col = _target_cols(safe_t[c0:c1], v0, v1)  # g_logp is already 0 on ignored rows
            dz.scatter_add_(1, col, torch.where(hit, gl_s[c0:c1], 0.0).unsqueeze(1))
            if has_zbar:
                dz.add_(zbar_term[c0:c1].unsqueeze(1))
            if softcap is not None:
                # chain rule through c * tanh(raw / c) / T:  (1 - t^2) / T
                dz.mul_(tanh.mul_(tanh).neg_().add_(1.0)).mul_(inv_t)
            if dh is not None:
                dh[c0:c1].addmm_(dz, wb)  # [rows, nv] @ [nv, H]
            if dW is not None:
                if one_chunk:
                    if dW.dtype == cdt:
                        torch.mm(dz.T, h_c[c0:c1], out=dW[v0:v1])
                    else:
                        dW[v0:v1].copy_(dz.T @ h_c[c0:c1])
                else:
                    dw_acc[:nv].addmm_(dz.T, h_c[c0:c1])
            if db is not None:
                db[v0:v1] += dz.sum(0)
        if dw_acc is not None:
            dW[v0:v1].copy_(dw_acc[:nv])
    if dh is not None and dh.dtype != hidden.dtype:
        dh = dh.to(hidden.dtype)
    if db is not None and bias is not None and db.dtype != bias.dtype:
        db = db.to(bias.dtype)
    return dh, dW, db
