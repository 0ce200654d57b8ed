"""PyTorch engine of the fused linear log-probs (every device the Triton kernels do not cover).

Same signatures, contract and math as the launchers of ``kernels/linear_logprobs.py`` (whose
module docstring has the formulas), and the same memory bound: the ``[N, V]`` logits never
exist. They live only as ``[C, VB]`` tiles (``C`` tokens x ``VB`` vocabulary rows) inside the
workspace of ``_tiles.workspace_bytes``.

Loop order: vocab blocks outer, token chunks inner. With ``C = N`` (the common case: the
workspace holds ``N x VB``) every ``dW`` block is written exactly once, straight into the
returned gradient, so no float32 copy of ``[V, H]`` is ever kept; ``dh`` is accumulated in an
``[N, H]`` buffer (the gradient itself for float32 / float64 inputs).

Precision: float32 accumulation for bf16 / fp16 / fp32 inputs, float64 for float64 inputs (so
``torch.autograd.gradcheck`` works). Mixed ``hidden`` / ``weight`` dtypes round both operands to
the narrower dtype first, as the Triton kernels do. Deterministic: no atomics, a fixed order.
"""

from __future__ import annotations

import math

import torch

from ..kernels._common import (
    NOTHING_EXTRA,
    LogitOptions,
    StatRequest,
    TokenStats,
    autocast_off,
    check_linear_inputs,
    check_saved,
    compute_dtype,
    empty,
    env_int,
)
from ._tiles import OnlineStats, grad_coefs, logit_grad_, transform_, workspace_bytes

#: Smallest vocabulary block worth a separate matmul call; below it we chunk tokens.
#: (``ALIGNOPS_CPU_MIN_VOCAB_BLOCK`` overrides it; tests use tiny values.)
MIN_VOCAB_BLOCK = 256


def _plan(n: int, v: int, h: int, elem: int, nbuf: int) -> tuple[int, int]:
    """Token chunk ``C`` and vocab block ``VB`` so that ``nbuf`` tiles fit the workspace."""
    budget = workspace_bytes((n + v) * h * elem)
    min_vb = env_int("ALIGNOPS_CPU_MIN_VOCAB_BLOCK", MIN_VOCAB_BLOCK)
    per_tile = max(budget // nbuf, elem)
    if n == 0:
        return 1, max(1, min(v, min_vb))
    vb = per_tile // (elem * n)
    if vb >= min(v, min_vb):
        return n, max(1, min(v, vb))
    vb = max(1, min(v, min_vb))
    return max(1, per_tile // (elem * vb)), vb


class _Operands:
    """The matmul operands in the compute dtype, rounded to the matmul dtype first (mixed
    precision); raw logit tiles ``h[c0:c1] @ W[v0:v1].T + b[v0:v1]``."""

    def __init__(self, hidden, weight, bias, dot, cdt):
        self.weight, self.bias, self.dot, self.cdt = weight, bias, dot, cdt
        # [N, H] in the compute dtype: a view for float32 / float64, an O(N) copy otherwise
        self.h = self._cast(hidden)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dot:
            x = x.to(self.dot)
        return x if x.dtype == self.cdt else x.to(self.cdt)

    def weight_block(self, v0: int, v1: int) -> torch.Tensor:
        return self._cast(self.weight[v0:v1])

    def raw(self, c0, c1, v0, v1, wb, out):
        torch.mm(self.h[c0:c1], wb.T, out=out)
        if self.bias is not None:
            out.add_(self.bias[v0:v1].to(self.cdt))
        return out


#: Run the engine on the valid rows only: ignored rows (the prompt half of a DPO batch) get
#: their zero outputs / gradients without a matmul. Only on the CPU, where the boolean index
#: costs no device sync (on a GPU the Triton kernels skip all-ignored token blocks instead).
COMPACT_IGNORED = True


def _valid_index(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the valid rows, or None when there is nothing to compact (or not on the CPU)."""
    if not COMPACT_IGNORED or targets.device.type != "cpu":
        return None
    valid = targets != ignore_index
    return None if bool(valid.all()) else valid.nonzero().squeeze(1)


def _rows(x: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if x is None else x.index_select(0, idx)


def _scatter(x: torch.Tensor | None, idx: torch.Tensor, n: int, fill) -> torch.Tensor | None:
    if x is None:
        return None
    out = torch.full((n, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    return out.index_copy_(0, idx, x)


@autocast_off
def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogitOptions,
    want: StatRequest = NOTHING_EXTRA,
) -> TokenStats:
    """The :class:`TokenStats` that ``want`` asks for, in the compute dtype (float32, or float64
    for float64 inputs), zero at ignored rows (top-k ids -1); ignored rows cost no matmul."""
    idx = _valid_index(targets, opts.ignore_index)
    if idx is None:
        return _fwd_rows(hidden, weight, targets, bias, opts, want)
    check_linear_inputs(hidden, weight, targets, bias)
    st = _fwd_rows(hidden.index_select(0, idx), weight, targets[idx], bias, opts, want)
    n = hidden.shape[0]
    return TokenStats(
        *(_scatter(x, idx, n, -1 if k == "topk_ids" else 0) for k, x in zip(TokenStats._fields, st))
    )


def _fwd_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogitOptions,
    want: StatRequest = NOTHING_EXTRA,
) -> TokenStats:
    """The :class:`TokenStats` that ``want`` asks for, in the compute dtype (float32, or float64
    for float64 inputs), zero at ignored rows."""
    dot = check_linear_inputs(hidden, weight, targets, bias)
    want = want.checked(weight.shape[0])
    n, hdim = hidden.shape
    v = weight.shape[0]
    cdt = compute_dtype(hidden, weight, bias)
    elem = torch.finfo(cdt).bits // 8
    e_needed = want.entropy or want.log_sum_p2  # z - m and e side by side
    C, VB = _plan(n, v, hdim, elem, 2 if e_needed else 1)
    ops = _Operands(hidden, weight, bias, dot, cdt)
    valid = targets != opts.ignore_index
    stats = OnlineStats(targets, valid, cdt, want)
    buf_z = torch.empty(C * VB, dtype=cdt, device=hidden.device)
    buf_e = torch.empty(C * VB, dtype=cdt, device=hidden.device) if e_needed else None
    for v0 in range(0, v, VB):
        v1 = min(v, v0 + VB)
        wb = ops.weight_block(v0, v1)
        for c0 in range(0, n, C):
            c1 = min(n, c0 + C)
            size = (c1 - c0) * (v1 - v0)
            z, _ = transform_(ops.raw(c0, c1, v0, v1, wb, buf_z[:size].view(c1 - c0, v1 - v0)), opts)
            e_buf = None if buf_e is None else buf_e[:size].view(c1 - c0, v1 - v0)
            stats.update(z, c0, c1, v0, v1, e_buf)
    return stats.finish(v)


@autocast_off
def linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    saved: TokenStats,
    grads: TokenStats,
    opts: LogitOptions,
    *,
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
    grad_filter: float = 0.0,
    tile_stats: dict | None = None,
):
    """Gradients ``(dh, dW, db)``: see :func:`_bwd_rows`; ignored rows cost no matmul (their dh
    rows are exact zeros)."""
    kw = dict(need_dhidden=need_dhidden, need_dweight=need_dweight, need_dbias=need_dbias)
    kw |= dict(grad_filter=grad_filter, tile_stats=tile_stats)
    idx = _valid_index(targets, opts.ignore_index)
    if idx is None:
        return _bwd_rows(hidden, weight, targets, bias, saved, grads, opts, **kw)
    check_linear_inputs(hidden, weight, targets, bias)
    check_saved(saved, grads)
    sub = (TokenStats(*(_rows(x, idx) for x in t)) for t in (saved, grads))
    dh, dw, db = _bwd_rows(hidden.index_select(0, idx), weight, targets[idx], bias, *sub, opts, **kw)
    return _scatter(dh, idx, hidden.shape[0], 0), dw, db


def _bwd_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    saved: TokenStats,
    grads: TokenStats,
    opts: LogitOptions,
    *,
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
    grad_filter: float = 0.0,
    tile_stats: dict | None = None,
):
    """Gradients ``(dh, dW, db)`` (each ``None`` unless requested), in the input dtypes, of
    ``sum_k grads.k . stat_k``; ``saved`` holds the forward's statistics that the gradients need
    (``lse`` always, ``entropy`` / ``log_sum_p2`` with their gradients).

    ``grad_filter`` > 0: gradient filtering. Here a tile is one vocabulary column of a token
    chunk (all ``N`` rows in the common case): a column whose probabilities are all below the
    threshold in every valid row of the chunk, and that is no row's target, adds nothing to dh,
    dW or db, and the products run on the live columns only (gathered with ``index_select``; on
    a GPU that gather waits for the device, the Triton path does not). Not with a ``zmean``
    gradient (label smoothing: every entry gets ``g / V``). ``tile_stats`` receives ``"live"`` and
    ``"tiles"`` (0-d int64 tensors), added to what it holds."""
    dot = check_linear_inputs(hidden, weight, targets, bias)
    check_saved(saved, grads)
    n, hdim = hidden.shape
    v = weight.shape[0]
    cdt = compute_dtype(hidden, weight, bias)
    dev = hidden.device
    valid = targets != opts.ignore_index
    co = grad_coefs(valid, saved, grads, opts, v, cdt)
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    C, VB = _plan(n, v, hdim, torch.finfo(cdt).bits // 8, 3 if opts.softcap is not None else 2)
    ops = _Operands(hidden, weight, bias, dot, cdt)

    dh = None
    if need_dhidden:
        dh = torch.zeros(n, hdim, dtype=cdt, device=dev) if hidden.dtype != cdt else torch.zeros_like(hidden)
    dW = empty(weight.shape, dtype=weight.dtype, device=dev) if need_dweight else None
    if dW is not None and n == 0:
        dW.zero_()  # no token: the loops below write nothing
    db = torch.zeros(v, dtype=cdt, device=dev) if need_dbias else None
    one_chunk = C >= n
    filter_log_eps = math.log(grad_filter) if grad_filter > 0.0 and grads.zmean is None else None
    dw_acc = torch.empty(VB, hdim, dtype=cdt, device=dev) if need_dweight and not one_chunk else None
    bufs = [torch.empty(C * VB, dtype=cdt, device=dev) for _ in range(3 if opts.softcap is not None else 2)]
    for v0 in range(0, v, VB):
        v1 = min(v, v0 + VB)
        nv = v1 - v0
        wb = ops.weight_block(v0, v1)
        if dw_acc is not None:
            dw_acc[:nv].zero_()
        for c0 in range(0, n, C):
            c1 = min(n, c0 + C)
            tile = [b[: (c1 - c0) * nv].view(c1 - c0, nv) for b in bufs]
            raw = ops.raw(c0, c1, v0, v1, wb, tile[0])
            z, th = transform_(raw, opts, out=tile[2] if len(tile) == 3 else None)
            live = None
            if filter_log_eps is not None:
                live = _live_columns(z, co, targets[c0:c1], valid[c0:c1], c0, c1, v0, v1, filter_log_eps)
                _count(tile_stats, live)
            dz = logit_grad_(z, th, tile[1], co, safe_t, c0, c1, v0, v1)
            if live is not None and not bool(live.all()):
                _sparse_update(dz, live, wb, ops.h[c0:c1], dh, dW, dw_acc, db, c0, c1, v0, v1, one_chunk)
                continue
            if dh is not None:
                dh[c0:c1].addmm_(dz, wb)  # [rows, nv] @ [nv, H]
            if dW is not None:
                if not one_chunk:
                    dw_acc[:nv].addmm_(dz.T, ops.h[c0:c1])
                elif dW.dtype == cdt:
                    torch.mm(dz.T, ops.h[c0:c1], out=dW[v0:v1])
                else:
                    dW[v0:v1].copy_(dz.T @ ops.h[c0:c1])
            if db is not None:
                db[v0:v1] += dz.sum(0)
        if dw_acc is not None:
            dW[v0:v1].copy_(dw_acc[:nv])
    if dh is not None and dh.dtype != hidden.dtype:
        dh = dh.to(hidden.dtype)
    if db is not None and db.dtype != bias.dtype:
        db = db.to(bias.dtype)
    return dh, dW, db


def _live_columns(z, co, targets, valid, c0: int, c1: int, v0: int, v1: int, log_eps: float) -> torch.Tensor:
    """``[v1 - v0]`` bool: columns where some valid row has ``log p = z - lse >= log_eps``, or
    that are some valid row's target (ignored rows have ``lse = +inf``: never live)."""
    live = (z - co.lse[c0:c1].unsqueeze(1)).amax(0) >= log_eps
    hit = valid & (targets >= v0) & (targets < v1)
    live[(targets - v0).clamp(0, v1 - v0 - 1)[hit]] = True
    return live


def _count(tile_stats: dict | None, live: torch.Tensor) -> None:
    if tile_stats is None:
        return
    n_live, n_all = live.sum(dtype=torch.int64), torch.tensor(live.numel(), dtype=torch.int64)
    tile_stats["live"] = tile_stats.get("live", 0) + n_live
    tile_stats["tiles"] = tile_stats.get("tiles", 0) + n_all


def _sparse_update(dz, live, wb, h, dh, dW, dw_acc, db, c0, c1, v0, v1, one_chunk: bool) -> None:
    """The products of one tile on its live columns only (a fixed order: deterministic)."""
    idx = live.nonzero().squeeze(1)
    dzl = dz.index_select(1, idx)  # [rows, live]
    if dh is not None:
        dh[c0:c1].addmm_(dzl, wb.index_select(0, idx))  # [rows, live] @ [live, H]
    if dW is not None:
        part = dzl.T @ h  # [live, H]
        if one_chunk:
            dW[v0:v1].zero_()
            dW[v0:v1].index_copy_(0, idx, part.to(dW.dtype))
        else:
            dw_acc[: v1 - v0].index_add_(0, idx, part)
    if db is not None:
        db[v0:v1].index_add_(0, idx, dzl.sum(0))
