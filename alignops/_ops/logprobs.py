"""Log-probs on given logits as custom ops: ``alignops::logprobs_fwd`` (with autograd),
``alignops::logprobs_bwd`` (returns a new gradient tensor) and ``alignops::logprobs_bwd_``
(writes the gradient into the logits' own storage: the in-place backward)."""

from __future__ import annotations

import torch

from .._dispatch import engine
from ..kernels._common import check_targets_in_range
from ._common import fake_stats, options, pack_stats, unpack, unpack_grads


@torch.library.custom_op("alignops::logprobs_fwd", mutates_args=())
def logprobs_fwd_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    logit_scale: float,
    softcap: float | None,
    temperature: float,
    need_entropy: bool,
    need_zmean: bool,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, lse, entropy, zmean)`` ``[N]`` per row of ``logits [..., V]`` (N = targets.numel());
    0-element when not asked. ``inplace_backward`` only selects the backward op."""
    opts = options((ignore_index, logit_scale, softcap, temperature))
    check_targets_in_range(targets, logits.shape[-1], ignore_index)
    stats = engine("logprobs", logits).logprobs_fwd(
        logits, targets, opts, need_entropy=need_entropy, need_zmean=need_zmean
    )
    return pack_stats(stats, stats.logp)


@logprobs_fwd_op.register_fake
def _(logits, targets, *opts_and_flags):
    *_, need_entropy, need_zmean, _ = opts_and_flags
    return fake_stats(logits, targets.numel(), need_entropy, need_zmean)


def _run_bwd(logits, targets, lse, entropy, grads, opts, out):
    n = targets.numel()
    return engine("logprobs", logits).logprobs_bwd(
        logits, targets, lse, unpack(entropy, n), unpack_grads(n, *grads), options(opts), out=out
    )


@torch.library.custom_op("alignops::logprobs_bwd", mutates_args=())
def logprobs_bwd_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
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
) -> torch.Tensor:
    """``d(sum_k g_k . stat_k) / d logits``, a new tensor of the logits' shape and dtype."""
    grads = (g_logp, g_lse, g_entropy, g_zmean)
    return _run_bwd(
        logits, targets, lse, entropy, grads, (ignore_index, logit_scale, softcap, temperature), None
    )


@logprobs_bwd_op.register_fake
def _(logits, *rest):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("alignops::logprobs_bwd_", mutates_args=("logits",))
def logprobs_bwd_inplace_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
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
) -> None:
    """As :func:`logprobs_bwd_op`, written into ``logits`` (no ``[N, V]`` allocation)."""
    grads = (g_logp, g_lse, g_entropy, g_zmean)
    _run_bwd(logits, targets, lse, entropy, grads, (ignore_index, logit_scale, softcap, temperature), logits)


def _setup_context(ctx, inputs, output):
    logits, targets, *opts_and_flags = inputs
    _, lse, entropy, _ = output
    ctx.opts = tuple(opts_and_flags[:4])
    ctx.inplace = opts_and_flags[-1]
    ctx.n_options = len(opts_and_flags)
    ctx.save_for_backward(logits, targets, lse, entropy)


def _backward(ctx, g_logp, g_lse, g_entropy, g_zmean):
    logits, targets, lse, entropy = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        args = (logits, targets, lse, entropy, g_logp, g_lse, g_entropy, g_zmean, *ctx.opts)
        if ctx.inplace:
            # the logits now hold their gradient; any other node that saved them fails loudly
            logprobs_bwd_inplace_op(*args)
            grad = logits
        else:
            grad = logprobs_bwd_op(*args)
    return (grad, None) + (None,) * ctx.n_options


logprobs_fwd_op.register_autograd(_backward, setup_context=_setup_context)
