"""Cross-entropy on logits the caller already has (SPEC §3.1-§3.3).

``alignops.cross_entropy(logits [..., V], targets [...])`` is ``F.cross_entropy`` with the
options of SPEC §3 (label smoothing, z-loss, soft-cap, temperature, ``num_items``) that
never makes a second ``[N, V]`` tensor:

* forward reads the logits once and keeps only ``O(N)`` statistics (per-row ``lse``);
  autograd keeps a reference to the logits themselves (no copy);
* backward allocates the returned gradient ``[..., V]`` in the logits dtype (it has to
  exist) and fills it from ``logits`` and ``lse``; with ``inplace_backward=True`` the
  gradient is written into the logits' own storage instead, so no ``N x V`` allocation
  happens at all.

CUDA (fp16 / bf16 / fp32) runs the Triton kernels of ``kernels/cross_entropy.py``; every
other case runs a chunked PyTorch engine (:func:`cross_entropy_torch_fwd` /
:func:`cross_entropy_torch_bwd`) that upcasts blocks of rows to float32 (float64 for
float64 logits, so ``torch.autograd.gradcheck`` works), never the whole ``[N, V]`` tensor.
The math is in the module docstring of ``kernels/cross_entropy.py``.

Environment: ``ALIGNOPS_CPU_WORKSPACE_BYTES`` (row-block workspace of the CPU engine,
default 32 MiB); ``ALIGNOPS_CHECK_TARGETS=0`` skips the device-side target range assert on
CUDA; ``ALIGNOPS_BACKEND=triton`` sends CPU tensors to the Triton kernels, which only works
under ``TRITON_INTERPRET=1`` (tests), and ``ALIGNOPS_BACKEND=torch`` keeps CUDA tensors on the
PyTorch engine (docs/env.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

from ._ops import backend_is_triton
from .kernels._common import empty, env_int
from ._validate import FLOAT_DTYPES, check_loss_options, check_targets_in_range, check_transform

Reduction = Literal["none", "sum", "mean"]
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Bytes of float32 row blocks the CPU engine materializes at once (about three
#: ``[rows, V]`` temporaries live together). Shared knob with the linear log-probs engine;
#: 32 MiB keeps BLAS-free elementwise passes at full speed while the extra memory stays a
#: fixed, small workspace instead of a float32 copy of the logits.
DEFAULT_WORKSPACE_BYTES = 32 * 2**20
_LIVE_TEMPORARIES = 3


@dataclass(frozen=True)
class CrossEntropyParams:
    """Non-tensor options of :class:`CrossEntropyFunction` (SPEC §3.1)."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    temperature: float = 1.0
    softcap: float | None = None
    #: ``"none"`` (per-row losses) or ``"sum"``; ``mean`` / ``num_items`` divide outside.
    reduction: Literal["none", "sum"] = "sum"
    inplace_backward: bool = False
    use_triton: bool = False


# --------------------------------------------------------------------------------------
# Row layout: logits [..., V] as a [B, T, V] view without copying when possible.
# --------------------------------------------------------------------------------------


def _as_rows3d(x: torch.Tensor) -> torch.Tensor:
    """``x [..., V]`` as a ``[B, T, V]`` view (row ``n = b * T + t``).

    Any layout where the leading dims flatten to one strided axis gives ``[1, N, V]``; a
    slice such as ``logits[:, :-1]`` of ``[B, L, V]`` gives ``[B, L - 1, V]``. Only layouts
    that are neither (e.g. a 4-D tensor sliced on two axes) are copied.
    """
    V = x.shape[-1]
    try:
        return x.view(1, -1, V)
    except RuntimeError:
        pass
    if x.dim() >= 3:
        try:
            return x.view(-1, x.shape[-2], V)
        except RuntimeError:
            pass
    return x.reshape(1, -1, V)  # copy: exotic layouts only (documented)


def _view_like(t3: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    try:
        return t3.view(like.shape)
    except RuntimeError:
        return t3.reshape(like.shape)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_blocks(x3: torch.Tensor):
    """Yield ``(b, t0, t1)`` blocks of rows whose compute-dtype copies fit the workspace."""
    B, T, V = x3.shape
    elem = torch.finfo(_compute_dtype(x3)).bits // 8
    budget = env_int("ALIGNOPS_CPU_WORKSPACE_BYTES", DEFAULT_WORKSPACE_BYTES)
    rows = max(1, budget // (_LIVE_TEMPORARIES * elem * max(V, 1)))
    for b in range(B):
        for t0 in range(0, T, rows):
            yield b, t0, min(T, t0 + rows)


def _transform(xc: torch.Tensor, cdt: torch.dtype, p: CrossEntropyParams):
    """``z = softcap(x) / T`` in ``cdt`` (out of place) and ``tanh(x / c)`` (or None)."""
    z = xc.to(cdt)
    t = None
    if p.softcap is not None:
        t = torch.tanh(z / p.softcap)
        z = t * (p.softcap / p.temperature)
    elif p.temperature != 1.0:
        z = z * (1.0 / p.temperature)
    return z, t


# --------------------------------------------------------------------------------------
# Chunked PyTorch engine (same contract as the Triton launchers).
# --------------------------------------------------------------------------------------


def cross_entropy_torch_fwd(
    logits: torch.Tensor, targets: torch.Tensor, params: CrossEntropyParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(loss [N], lse [N])`` in float32 (float64 for float64 logits).

    logits ``[B, T, V]`` (any strides), targets ``[N]`` with ``N = B * T``; zeros at ignored
    rows. Works on any device.
    """
    B, T, V = logits.shape
    cdt = _compute_dtype(logits)
    loss = empty((B * T,), dtype=cdt, device=logits.device)
    lse = empty((B * T,), dtype=cdt, device=logits.device)
    eps = params.label_smoothing
    for b, t0, t1 in _row_blocks(logits):
        r0, r1 = b * T + t0, b * T + t1
        y = targets[r0:r1]
        valid = y != params.ignore_index
        z, _ = _transform(logits[b, t0:t1], cdt, params)
        b_lse = torch.logsumexp(z, dim=-1)
        z_y = z.gather(1, torch.where(valid, y, 0).long().unsqueeze(1)).squeeze(1)
        b_loss = (1.0 - eps) * (b_lse - z_y) + params.z_loss * b_lse * b_lse
        if eps > 0:  # kept out when eps = 0 so -inf logits give no 0 * inf
            b_loss = b_loss + eps * (b_lse - z.mean(dim=-1))
        loss[r0:r1] = torch.where(valid, b_loss, 0.0)
        lse[r0:r1] = torch.where(valid, b_lse, 0.0)
    return loss, lse


def cross_entropy_torch_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    params: CrossEntropyParams,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``d loss_rows / d logits`` times ``grad_rows`` (``[N]`` or 0-d), in the logits dtype.

    ``out`` ``[B, T, V]`` receives it (may be ``logits`` itself: each row block is read
    before it is written); otherwise a new ``[B, T, V]`` tensor is returned.
    """
    B, T, V = logits.shape
    cdt = _compute_dtype(logits)
    if out is None:
        out = empty((B, T, V), dtype=logits.dtype, device=logits.device)
    eps = params.label_smoothing
    g_all = grad_rows.to(cdt)
    for b, t0, t1 in _row_blocks(logits):
        r0, r1 = b * T + t0, b * T + t1
        y = targets[r0:r1]
        valid = y != params.ignore_index
        z, t = _transform(logits[b, t0:t1], cdt, params)
        b_lse = lse[r0:r1].to(cdt).unsqueeze(1)
        # d is a fresh block (z - lse allocates): in-place from here on, so at most z, t
        # and d are alive at once (_LIVE_TEMPORARIES).
        d = torch.sub(z, b_lse).exp_()
        if params.z_loss != 0.0:
            d.mul_(1.0 + 2.0 * params.z_loss * b_lse)
        if eps > 0:
            d.sub_(eps / V)
        rows = torch.arange(r1 - r0, device=d.device)
        d[rows, torch.where(valid, y, 0).long()] -= 1.0 - eps
        g = g_all if g_all.dim() == 0 else g_all[r0:r1].unsqueeze(1)
        d.mul_(g / params.temperature)
        if t is not None:
            d.mul_(t.square_().neg_().add_(1.0))  # 1 - tanh^2; t is not used again
        d.masked_fill_(~valid.unsqueeze(1), 0.0)
        out[b, t0:t1].copy_(d)
    return out


# --------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------


class CrossEntropyFunction(torch.autograd.Function):
    """Per-row (``reduction="none"``) or summed cross-entropy on logits (SPEC §3.1).

    ``forward(ctx, logits [..., V], targets [...], params)``; saves the logits (a
    reference, no copy) and ``lse [N]``. Backward returns ``dlogits [..., V]`` in the
    logits dtype, written into the logits' storage when ``params.inplace_backward``.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, params: CrossEntropyParams):
        x3 = _as_rows3d(logits)
        y = targets.reshape(-1)
        if params.use_triton:
            from alignops.kernels.cross_entropy import cross_entropy_fwd

            loss, lse = cross_entropy_fwd(
                x3,
                y,
                ignore_index=params.ignore_index,
                temperature=params.temperature,
                softcap=params.softcap,
                label_smoothing=params.label_smoothing,
                z_loss=params.z_loss,
            )
        else:
            loss, lse = cross_entropy_torch_fwd(x3, y, params)
        ctx.save_for_backward(logits, y, lse)
        ctx.params = params
        if params.reduction == "none":
            return loss.view(targets.shape)
        return loss.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, y, lse = ctx.saved_tensors
        p: CrossEntropyParams = ctx.params
        x3 = _as_rows3d(logits)
        grad_rows = grad_out.reshape(-1) if p.reduction == "none" else grad_out.reshape(())
        out = x3 if p.inplace_backward else None
        if p.use_triton:
            from alignops.kernels.cross_entropy import cross_entropy_bwd

            d3 = cross_entropy_bwd(
                x3,
                y,
                lse,
                grad_rows.float(),
                ignore_index=p.ignore_index,
                temperature=p.temperature,
                softcap=p.softcap,
                label_smoothing=p.label_smoothing,
                z_loss=p.z_loss,
                out=out,
            )
            if p.inplace_backward:
                # The kernel wrote through a raw pointer: record the in-place change so any
                # other autograd node that saved these logits fails loudly, not silently.
                torch.autograd.graph.increment_version(logits)
        else:
            d3 = cross_entropy_torch_bwd(x3, y, lse, grad_rows, p, out=out)
        return _view_like(d3, logits), None, None


# --------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------


def _use_triton(logits: torch.Tensor) -> bool:
    """Triton for fp16 / bf16 / fp32 where ``ALIGNOPS_BACKEND`` says so (default: on CUDA)."""
    if logits.dtype not in _TRITON_DTYPES:
        return False
    return backend_is_triton(logits)


def _validate(logits, targets, *, ignore_index) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("logits and targets must be torch.Tensor")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32) token ids, got {targets.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V > 0, got shape {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits' leading dims {tuple(logits.shape[:-1])}"
        )
    if logits.device != targets.device:
        raise ValueError(f"logits ({logits.device}) and targets ({targets.device}) must be on one device")
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError("logits must have a contiguous last (vocab) dimension; call .contiguous() first")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    num_items: int | float | torch.Tensor | None = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Cross-entropy of SPEC §3.1 on logits ``[..., V]`` without a second ``[N, V]`` tensor.

    Per token: ``ce = (1 - label_smoothing) (lse - z_y) + label_smoothing (lse - mean_v z)
    + z_loss * lse**2`` with ``z = softcap * tanh(logits / softcap) / temperature``
    (soft-cap optional), computed in float32 (float64 for float64 logits).

    Args:
        logits: ``[..., V]`` float16 / bfloat16 / float32 / float64, contiguous last dim;
            any other strides (e.g. ``logits[:, :-1]``) are used without a copy.
        targets: ``[...]`` (= ``logits.shape[:-1]``) int64 / int32 in ``[0, V)`` or
            ``ignore_index``. Out-of-range targets raise ValueError on the CPU; on CUDA a
            device-side assert fires without a host sync (``ALIGNOPS_CHECK_TARGETS=0`` to skip).
        ignore_index: targets equal to it contribute exactly 0 and are not counted.
        reduction: ``"none"`` -> ``[...]`` per-token losses (0 at ignored positions);
            ``"sum"``; ``"mean"`` -> sum / number of non-ignored tokens, clamped to >= 1, so
            an all-ignored batch gives 0 (SPEC §3.2 (a)).
        label_smoothing: ``eps`` in ``[0, 1]``; uniform part over all ``V`` classes.
        z_loss: ``c_z >= 0`` (PaLM uses 1e-4).
        temperature: ``T > 0``; logits are divided by it after the soft-cap (SPEC §1.1).
        softcap: ``c > 0`` or None (Gemma 2: 30.0).
        num_items: when given (``reduction`` ``"sum"`` or ``"mean"``), returns
            ``sum / num_items`` (SPEC §3.3, gradient accumulation); a tensor stays on device.
        inplace_backward: write the gradient into the logits' storage (no new ``[N, V]``
            allocation). The logits hold the gradient afterwards: only use it when nothing
            else reads them later (no second backward, no other op that saved them; one that
            did raises PyTorch's "modified by an inplace operation" error).

    Returns:
        float32 (float64 for float64 logits) loss: a scalar, or ``targets.shape``.
    """
    _validate(logits, targets, ignore_index=ignore_index)
    check_loss_options(
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, num_items=num_items
    )
    check_transform(temperature, softcap)
    params = CrossEntropyParams(
        ignore_index=ignore_index,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        temperature=float(temperature),
        softcap=None if softcap is None else float(softcap),
        reduction="none" if reduction == "none" else "sum",
        inplace_backward=bool(inplace_backward),
        use_triton=_use_triton(logits),
    )
    check_targets_in_range(targets, logits.shape[-1], ignore_index)
    loss = CrossEntropyFunction.apply(logits, targets, params)
    if num_items is not None:
        return loss / num_items
    if reduction == "mean":
        return loss / (targets != ignore_index).sum().clamp(min=1)
    return loss


__all__ = ["CrossEntropyFunction", "CrossEntropyParams", "cross_entropy"]
