"""The fused linear log-probs as custom ops: ``alignops::linear_logprobs_fwd`` (with autograd) and
``alignops::linear_logprobs_bwd``. The engine is chosen per call (``alignops/_dispatch.py``)."""

from __future__ import annotations

import torch

from .._dispatch import engine
from ..kernels._common import StatRequest, check_targets_in_range
from . import _common as c

_INPUTS = "Tensor hidden, Tensor weight, Tensor targets, Tensor? bias"
_NEEDS = "bool need_dhidden, bool need_dweight, bool need_dbias"
#: Gradient filtering threshold on p (0.0: off); see ``kernels/_common.py::grad_filter_threshold``.
_FILTER = "float grad_filter=0.0"


def _fwd(hidden, weight, targets, bias, *args):
    """The seven :class:`TokenStats` tensors per row of ``hidden [N, H]``; 0-element when not asked.
    The last argument, ``grad_filter``, is for the backward only (saved by the autograd context)."""
    opts, want = args[:4], StatRequest(*args[4:8])
    # inside the op, so torch.compile never traces the data-dependent check
    check_targets_in_range(targets, weight.shape[0], opts[0])
    stats = engine("linear_logprobs", hidden).linear_logprobs_fwd(
        hidden, weight, targets, bias, c.options(opts), want
    )
    return c.pack_stats(stats)


def _bwd(hidden, weight, targets, bias, lse, entropy, log_sum_p2, *args):
    """``(dhidden, dweight, dbias)``; 0-element tensors for the ones not needed."""
    n, k = hidden.shape[0], len(c.GRAD_FIELDS)
    grads, opts, rest = args[:k], args[k : k + 4], args[k + 4 :]
    (need_dh, need_dw, need_db), grad_filter = rest[:3], (rest[3] if len(rest) > 3 else 0.0)
    dh, dw, db = engine("linear_logprobs", hidden).linear_logprobs_bwd(
        hidden,
        weight,
        targets,
        bias,
        c.unpack_saved(n, lse, entropy, log_sum_p2),
        c.unpack_grads(n, grads),
        c.options(opts),
        need_dhidden=need_dh,
        need_dweight=need_dw,
        need_dbias=need_db,
        grad_filter=grad_filter,
    )
    return c.pack(dh, hidden), c.pack(dw, hidden), c.pack(db, hidden)


linear_logprobs_fwd_op = c.custom_op(
    "linear_logprobs_fwd", _fwd, f"{_INPUTS}, {c.OPTIONS}, {c.REQUEST}, {_FILTER}", c.STATS
)
linear_logprobs_bwd_op = c.custom_op(
    "linear_logprobs_bwd",
    _bwd,
    f"{_INPUTS}, {c.SAVED}, {c.GRADS}, {c.OPTIONS}, {_NEEDS}, {_FILTER}",
    "(Tensor, Tensor, Tensor)",
)


@linear_logprobs_fwd_op.register_fake
def _(hidden, weight, targets, bias, *args):
    return c.fake_stats(hidden, hidden.shape[0], StatRequest(*args[4:8]))


@linear_logprobs_bwd_op.register_fake
def _(hidden, weight, targets, bias, *args):
    k = 3 + len(c.GRAD_FIELDS) + 4  # saved statistics, upstream gradients, options
    need_dh, need_dw, need_db = args[k : k + 3]
    return (
        torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
        torch.empty_like(weight) if need_dw else hidden.new_empty(0),
        torch.empty_like(bias) if (need_db and bias is not None) else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, *args = inputs
    ctx.opts, ctx.n_options = tuple(args[:4]), len(args)
    # a mean-logit gradient reaches every vocabulary entry: no tile may be skipped when it is asked for
    want_zmean = bool(args[5])
    ctx.grad_filter = args[8] if len(args) > 8 and not want_zmean else 0.0
    ctx.save_for_backward(hidden, weight, targets, bias, output[1], output[2], output[4])
    c.setup_stats_context(ctx, output)


def _backward(ctx, *grads):
    hidden, weight, targets, bias, *saved = ctx.saved_tensors
    need_dh, need_dw, _, need_db = ctx.needs_input_grad[:4]
    need_db = bool(need_db and bias is not None)
    dh = dw = db = None
    if need_dh or need_dw or need_db:
        inputs = (hidden, weight, targets, bias, *saved)
        g = grads[: len(c.GRAD_FIELDS)]
        dh, dw, db = linear_logprobs_bwd_op(
            *inputs, *g, *ctx.opts, need_dh, need_dw, need_db, ctx.grad_filter
        )
    return (dh if need_dh else None, dw if need_dw else None, None, db if need_db else None) + c.no_grads(ctx)


linear_logprobs_fwd_op.register_autograd(_backward, setup_context=_setup_context)
