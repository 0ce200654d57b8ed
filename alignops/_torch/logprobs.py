"""PyTorch engine of the log-probs on given logits (every device the Triton kernels do not cover).

Same signatures, contract and math as the launchers of ``kernels/logprobs.py`` (whose module
docstring has the formulas). The logits are read in blocks of whole rows whose compute-dtype
copies fit the workspace of ``_tiles.workspace_bytes`` (float32, or float64 for float64 logits
so that ``gradcheck`` works); never a float32 copy of the whole ``[N, V]`` tensor.
"""

from __future__ import annotations

import torch

from ..kernels._common import (
    NOTHING_EXTRA,
    LogitOptions,
    StatRequest,
    TokenStats,
    autocast_off,
    check_logits_inputs,
    check_saved,
    compute_dtype,
    empty,
    rows_3d,
    rows_3d_like,
)
from ._tiles import OnlineStats, grad_coefs, logit_grad_, transform_, workspace_bytes

#: Row-block tiles alive at once: the upcast logits, the exp / probability tile, and the
#: soft-cap's tanh in the backward.
_LIVE_TILES = 3


def _row_blocks(x3: torch.Tensor, cdt: torch.dtype):
    """Yield ``(b, t0, t1, r0)`` blocks of rows of the ``[B, T, V]`` view (``r0`` the flat index
    of row ``(b, t0)``) whose compute-dtype tiles fit the workspace."""
    B, T, V = x3.shape
    elem = torch.finfo(cdt).bits // 8
    rows = max(1, workspace_bytes(B * T * V * x3.element_size()) // (_LIVE_TILES * elem * max(V, 1)))
    for b in range(B):
        for t0 in range(0, T, rows):
            yield b, t0, min(T, t0 + rows), b * T + t0


@autocast_off
def logprobs_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    opts: LogitOptions,
    want: StatRequest = NOTHING_EXTRA,
) -> TokenStats:
    """The :class:`TokenStats` that ``want`` asks for, ``[N]`` in the compute dtype."""
    check_logits_inputs(logits, targets)
    x3, y = rows_3d(logits), targets.reshape(-1)
    V = x3.shape[-1]
    want = want.checked(V)
    cdt = compute_dtype(logits)
    stats = OnlineStats(y, y != opts.ignore_index, cdt, want)
    for b, t0, t1, r0 in _row_blocks(x3, cdt):
        z, _ = transform_(x3[b, t0:t1].to(cdt, copy=True), opts)
        e_buf = torch.empty_like(z) if want.entropy or want.log_sum_p2 else None
        stats.update(z, r0, r0 + t1 - t0, 0, V, e_buf)
    return stats.finish(V)


@autocast_off
def logprobs_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    saved: TokenStats,
    grads: TokenStats,
    opts: LogitOptions,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient with respect to the logits, in their shape and dtype; into ``out`` when given
    (it may be ``logits`` itself: each row block is read before it is written)."""
    check_logits_inputs(logits, targets)
    check_saved(saved, grads)
    x3, y = rows_3d(logits), targets.reshape(-1)
    if out is None:
        out = empty(tuple(logits.shape), dtype=logits.dtype, device=logits.device)
    d3 = rows_3d_like(out, x3)
    cdt = compute_dtype(logits)
    V = x3.shape[-1]
    valid = y != opts.ignore_index
    co = grad_coefs(valid, saved, grads, opts, V, cdt)
    safe_y = torch.where(valid, y, torch.zeros_like(y))
    for b, t0, t1, r0 in _row_blocks(x3, cdt):
        r1 = r0 + t1 - t0
        raw = x3[b, t0:t1].to(cdt, copy=True)
        z, th = transform_(raw, opts, out=torch.empty_like(raw) if opts.softcap is not None else None)
        dz = logit_grad_(z, th, torch.empty_like(raw), co, safe_y, r0, r1, 0, V)
        d3[b, t0:t1].copy_(dz)
    return out
