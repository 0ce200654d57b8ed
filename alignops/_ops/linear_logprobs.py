"""The fused linear log-probs as custom ops: ``alignops::linear_logprobs_fwd`` (with autograd) and
``alignops::linear_logprobs_bwd``. The engine is chosen per call (``alignops/_dispatch.py``)."""

from __future__ import annotations

import torch

from .._dispatch import engine
from ..kernels._common import check_targets_in_range
from ._common import fake_stats, options, pack, pack_stats, unpack, unpack_grads


@torch.library.custom_op("alignops::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    logit_scale: float,
    softcap: float | None,
    temperature: float,
    need_entropy: bool,
    need_zmean: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, lse, entropy, zmean)`` per row of ``hidden [N, H]``; 0-element when not asked."""
    opts = options((ignore_index, logit_scale, softcap, temperature))
    # inside the op, so torch.compile never traces the data-dependent check
    check_targets_in_range(targets, weight.shape[0], ignore_index)
    stats = engine("linear_logprobs", hidden).linear_logprobs_fwd(
        hidden, weight, targets, bias, opts, need_entropy=need_entropy, need_zmean=need_zmean
    )
    return pack_stats(stats, stats.logp)


@linear_logprobs_fwd_op.register_fake
def _(hidden, weight, targets, bias, *opts_and_needs):
    *_, need_entropy, need_zmean = opts_and_needs
    return fake_stats(hidden, hidden.shape[0], need_entropy, need_zmean)


@torch.library.custom_op("alignops::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_lse: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    g_zmean: torch.Tensor | None,
    ignore_index: int,
    logit_scale: float,
    softcap: float | None,
    temperature: float,
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dhidden, dweight, dbias)``; 0-element tensors for the ones not needed."""
    n = hidden.shape[0]
    dh, dw, db = engine("linear_logprobs", hidden).linear_logprobs_bwd(
        hidden,
        weight,
        targets,
        bias,
        lse,
        unpack(entropy, n),
        unpack_grads(n, g_logp, g_lse, g_entropy, g_zmean),
        options((ignore_index, logit_scale, softcap, temperature)),
        need_dhidden=need_dhidden,
        need_dweight=need_dweight,
        need_dbias=need_dbias,
    )
    return pack(dh, hidden), pack(dw, hidden), pack(db, hidden)


@linear_logprobs_bwd_op.register_fake
def _(hidden, weight, targets, bias, *rest):
    *_, need_dhidden, need_dweight, need_dbias = rest
    return (
        torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_dweight else hidden.new_empty(0),
        torch.empty_like(bias) if (need_dbias and bias is not None) else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, *opts_and_needs = inputs
    _, lse, entropy, _ = output
    ctx.opts = tuple(opts_and_needs[:4])
    ctx.n_options = len(opts_and_needs)
    ctx.save_for_backward(hidden, weight, targets, bias, lse, entropy)


def _backward(ctx, g_logp, g_lse, g_entropy, g_zmean):
    hidden, weight, targets, bias, lse, entropy = ctx.saved_tensors
    need_dh, need_dw, _, need_db = ctx.needs_input_grad[:4]
    need_db = bool(need_db and bias is not None)
    dh = dw = db = None
    if need_dh or need_dw or need_db:
        dh, dw, db = linear_logprobs_bwd_op(
            hidden,
            weight,
            targets,
            bias,
            lse,
            entropy,
            g_logp,
            g_lse,
            g_entropy,
            g_zmean,
            *ctx.opts,
            need_dh,
            need_dw,
            need_db,
        )
    return (dh if need_dh else None, dw if need_dw else None, None, db if need_db else None) + (
        None,
    ) * ctx.n_options


linear_logprobs_fwd_op.register_autograd(_backward, setup_context=_setup_context)
