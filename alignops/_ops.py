"""The fused linear log-probs engine registered as PyTorch custom ops (with autograd).

Two ops, ``alignops::linear_logprobs_fwd`` and ``alignops::linear_logprobs_bwd``; the
forward's autograd formula calls the backward op. Being custom ops, ``torch.compile``
(even ``fullgraph=True``) keeps each as one opaque node instead of tracing into the
chunk loops or the Triton launch, and compiled backward graphs work too.

Dispatch: CUDA tensors run ``alignops.kernels.linear_logprobs`` (Triton); every other
device runs ``alignops._cpu``. ``ALIGNOPS_BACKEND=triton|torch`` forces one.

Custom ops cannot return ``None``: unrequested outputs travel as 0-element tensors.
"""

from __future__ import annotations

import os

import torch

from . import _cpu
from ._validate import check_targets_in_range


def backend_is_triton(t: torch.Tensor) -> bool:
    """``ALIGNOPS_BACKEND``: ``auto`` (Triton on CUDA), ``triton`` or ``torch`` (docs/env.md)."""
    backend = os.environ.get("ALIGNOPS_BACKEND", "auto").lower()
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    return t.is_cuda


def engine(t: torch.Tensor):
    """The module implementing ``linear_logprobs_fwd`` / ``_bwd`` for ``t``'s device.

    float64 always runs the PyTorch engine (the kernels take 16- and 32-bit floats)."""
    if backend_is_triton(t) and t.dtype != torch.float64:
        from .kernels import linear_logprobs as triton_engine

        return triton_engine
    return _cpu


def _stat_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _none_if_empty(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if t is None or (t.numel() == 0 and n != 0) else t


@torch.library.custom_op("alignops::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    need_entropy: bool,
    need_zmean: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, lse, entropy, zmean)`` per row of ``hidden [N, H]``; see docs/interfaces.md."""
    # inside the op, so torch.compile never traces the data-dependent check
    check_targets_in_range(targets, weight.shape[0], ignore_index)
    logp, lse, ent, zmean = engine(hidden).linear_logprobs_fwd(
        hidden,
        weight,
        targets,
        bias,
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        need_entropy=need_entropy,
        need_zmean=need_zmean,
    )
    return (
        logp,
        lse,
        logp.new_empty(0) if ent is None else ent,
        logp.new_empty(0) if zmean is None else zmean,
    )


@linear_logprobs_fwd_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, temperature, softcap, need_entropy, need_zmean):
    n, dt = hidden.shape[0], _stat_dtype(hidden)
    out = hidden.new_empty(n, dtype=dt)
    return (
        out,
        torch.empty_like(out),
        hidden.new_empty(n if need_entropy else 0, dtype=dt),
        hidden.new_empty(n if need_zmean else 0, dtype=dt),
    )


@torch.library.custom_op("alignops::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dhidden, dweight, dbias)``; 0-element tensors for the ones not needed."""
    n = hidden.shape[0]
    dh, dw, db = engine(hidden).linear_logprobs_bwd(
        hidden,
        weight,
        targets,
        bias,
        lse,
        _none_if_empty(entropy, n),
        g_logp=_none_if_empty(g_logp, n),
        g_ent=_none_if_empty(g_ent, n),
        g_lse=_none_if_empty(g_lse, n),
        g_zmean=_none_if_empty(g_zmean, n),
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        need_dhidden=need_dhidden,
        need_dweight=need_dweight,
        need_dbias=need_dbias,
    )
    return (
        hidden.new_empty(0) if dh is None else dh,
        hidden.new_empty(0) if dw is None else dw,
        hidden.new_empty(0) if db is None else db,
    )


@linear_logprobs_bwd_op.register_fake
def _(
    hidden,
    weight,
    bias,
    targets,
    lse,
    entropy,
    g_logp,
    g_ent,
    g_lse,
    g_zmean,
    ignore_index,
    temperature,
    softcap,
    need_dhidden,
    need_dweight,
    need_dbias,
):
    return (
        torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_dweight else hidden.new_empty(0),
        torch.empty_like(bias) if (need_dbias and bias is not None) else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, temperature, softcap, _, _ = inputs
    _, lse, ent, _ = output
    ctx.opts = (ignore_index, temperature, softcap)
    ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)


def _backward(ctx, g_logp, g_lse, g_ent, g_zmean):
    hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = bool(need_db and bias is not None)
    nones = (None,) * 6
    if not (need_dh or need_dw or need_db):
        return (None, None, None) + nones
    ignore_index, temperature, softcap = ctx.opts
    dh, dw, db = linear_logprobs_bwd_op(
        hidden,
        weight,
        bias,
        targets,
        lse,
        ent,
        g_logp,
        g_ent,
        g_lse,
        g_zmean,
        ignore_index,
        temperature,
        softcap,
        need_dh,
        need_dw,
        need_db,
    )
    return (dh if need_dh else None, dw if need_dw else None, db if need_db else None) + nones


linear_logprobs_fwd_op.register_autograd(_backward, setup_context=_setup_context)
