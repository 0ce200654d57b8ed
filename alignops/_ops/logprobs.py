"""Log-probs on given logits as custom ops: ``alignops::logprobs_fwd`` (with autograd) and
``alignops::logprobs_bwd``, which writes the gradient into ``out``: a new tensor, or the logits'
own storage for the in-place backward (no ``[N, V]`` allocation)."""

from __future__ import annotations

import torch

from .._dispatch import engine
from ..kernels._common import StatRequest, check_targets_in_range
from . import _common as c


def _fwd(logits, targets, *args):
    """The seven :class:`TokenStats` tensors per row of ``logits [..., V]`` (N = targets.numel());
    0-element when not asked. ``inplace_backward`` only selects what the backward writes to."""
    opts, want = args[:4], StatRequest(*args[4:8])
    check_targets_in_range(targets, logits.shape[-1], opts[0])
    stats = engine("logprobs", logits).logprobs_fwd(logits, targets, c.options(opts), want)
    return c.pack_stats(stats)


def _bwd(logits, targets, lse, entropy, log_sum_p2, *args):
    """``d(sum_k g_k . stat_k) / d logits`` written into ``out`` (the last argument)."""
    n, k = targets.numel(), len(c.GRAD_FIELDS)
    grads, opts, out = args[:k], args[k : k + 4], args[k + 4]
    saved = c.unpack_saved(n, lse, entropy, log_sum_p2)
    engine("logprobs", logits).logprobs_bwd(
        logits, targets, saved, c.unpack_grads(n, grads), c.options(opts), out=out
    )


logprobs_fwd_op = c.custom_op(
    "logprobs_fwd",
    _fwd,
    f"Tensor logits, Tensor targets, {c.OPTIONS}, {c.REQUEST}, bool inplace_backward",
    c.STATS,
)
logprobs_bwd_op = c.custom_op(
    "logprobs_bwd",
    _bwd,
    f"Tensor logits, Tensor targets, {c.SAVED}, {c.GRADS}, {c.OPTIONS}, Tensor(a!) out",
    "()",
    mutates=("out",),
)


@logprobs_fwd_op.register_fake
def _(logits, targets, *args):
    return c.fake_stats(logits, targets.numel(), StatRequest(*args[4:8]))


def _setup_context(ctx, inputs, output):
    logits, targets, *args = inputs
    ctx.opts, ctx.inplace, ctx.n_options = tuple(args[:4]), args[-1], len(args)
    ctx.save_for_backward(logits, targets, output[1], output[2], output[4])
    c.setup_stats_context(ctx, output)


def _backward(ctx, *grads):
    logits, targets, *saved = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        # in place: the logits hold their gradient afterwards, and an autograd node that saved
        # them fails loudly ("modified by an inplace operation") instead of reading it
        grad = logits if ctx.inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
        g = grads[: len(c.GRAD_FIELDS)]
        logprobs_bwd_op(logits, targets, *saved, *g, *ctx.opts, grad)
    return (grad, None) + c.no_grads(ctx)


logprobs_fwd_op.register_autograd(_backward, setup_context=_setup_context)
