"""Log-probs and cross-entropy on logits the caller already holds: the public API.

``logprobs(logits, targets)`` is ``log_softmax(logits)[target]`` per token (and on request the
entropy and the log-sum-exp), and ``cross_entropy`` is ``F.cross_entropy`` with label smoothing,
z-loss, soft-cap, temperature, logit scale and ``num_items``, both without a second ``[N, V]``
tensor: the forward reads the logits once and keeps O(N) statistics; autograd keeps a reference
to the logits (no copy); the backward allocates only the returned gradient, or nothing at all
with ``inplace_backward=True`` (the gradient overwrites the logits).

Layers of the family: ``alignops.kernels.logprobs`` (Triton), ``alignops._torch.logprobs``
(PyTorch engine), ``alignops._ops.logprobs`` (custom ops, autograd),
``alignops.reference.logprobs`` (float64 reference).
"""

from __future__ import annotations

import torch

from ._cross_entropy import Reduction, check_ce_options, reduce_tokens, token_cross_entropy
from ._ops._common import stats_like
from ._ops.logprobs import logprobs_fwd_op
from ._vocab_parallel import is_dtensor, token_stats_parallel
from .kernels._common import NOTHING_EXTRA, LogitOptions, StatRequest, TokenStats, check_logits_inputs
from .linear_logprobs import LogProbsOutput


def token_stats(
    logits,
    targets,
    opts: LogitOptions,
    want: StatRequest = NOTHING_EXTRA,
    *,
    inplace_backward: bool = False,
    process_group=None,
    vocab_size: int | None = None,
) -> TokenStats:
    """:class:`TokenStats` of ``logits [..., V]`` with ``targets.shape``, differentiable. With a
    ``process_group`` (or a DTensor sharded on the vocabulary) ``logits`` is this rank's slice
    ``[..., V_r]`` and the statistics cover the full vocabulary (``alignops._vocab_parallel``)."""
    if process_group is not None or is_dtensor(logits):
        if inplace_backward:
            raise ValueError("inplace_backward is not supported with a vocabulary-parallel process_group")
        return token_stats_parallel(logits, targets, opts, want, process_group, vocab_size)
    check_logits_inputs(logits, targets)
    want = want.checked(logits.shape[-1])
    out = logprobs_fwd_op(logits, targets.long(), *opts.as_args(), *want, inplace_backward)
    return stats_like(out, targets, want)


def logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_entropy: bool = False,
    return_lse: bool = False,
    return_log_sum_p2: bool = False,
    topk: int = 0,
    inplace_backward: bool = False,
    return_mean_logit: bool = False,
    process_group=None,
    vocab_size: int | None = None,
) -> LogProbsOutput:
    """Per-token log-probabilities of ``targets`` under ``softcap(logit_scale * logits) /
    temperature`` (TRL's ``selective_log_softmax`` and ``entropy_from_logits`` in one pass).

    Args:
        logits: ``[..., V]`` float16 / bfloat16 / float32 / float64, contiguous last dim; other
            strides (e.g. ``logits[:, :-1]``) are used without a copy.
        targets: ``[...]`` (``= logits.shape[:-1]``) int64 / int32 in ``[0, V)`` or
            ``ignore_index``; out-of-range ids raise (CPU) or assert on the device (CUDA).
        temperature, softcap, logit_scale: as in :func:`alignops.linear_logprobs`.
        return_entropy / return_lse / return_log_sum_p2 / topk / return_mean_logit: as in
            :func:`alignops.linear_logprobs`.
        inplace_backward: the backward writes the gradient into the logits' storage; only when
            nothing reads the logits afterwards (an autograd node that saved them raises
            PyTorch's "modified by an inplace operation" error).
        process_group: vocabulary parallelism (docs/distributed.md): ``logits [..., V_r]`` is this
            rank's slice of a column-parallel head's output (rank ``r`` holds global ids from
            ``V_0 + ... + V_{r-1}``); ``targets`` are the same on every rank, and so are the
            outputs, over the full vocabulary; the gradient is this rank's slice. A DTensor
            sharded on the last dimension needs no group.
        vocab_size: with a process group, the true vocabulary size when the last slices hold
            padding columns (global ids ``>= vocab_size`` are left out).

    Returns:
        :class:`~alignops.LogProbsOutput`, float32 (float64 for float64 logits) with
        ``targets.shape``; exactly 0 at ignored positions.
    """
    opts = LogitOptions(ignore_index, logit_scale, softcap, temperature)
    want = StatRequest(
        entropy=return_entropy, zmean=return_mean_logit, log_sum_p2=return_log_sum_p2, topk=topk
    )
    st = token_stats(
        logits,
        targets,
        opts,
        want,
        inplace_backward=inplace_backward,
        process_group=process_group,
        vocab_size=vocab_size,
    )
    return LogProbsOutput.of(st, return_lse)


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
    logit_scale: float = 1.0,
    num_items: int | float | torch.Tensor | None = None,
    inplace_backward: bool = False,
    process_group=None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy on logits ``[..., V]`` without a second ``[N, V]`` tensor.

    Per token: ``ce = (1 - label_smoothing) (lse - z_y) + label_smoothing (lse - mean_v z)
    + z_loss * lse**2``, ``z = softcap * tanh(logit_scale * logits / softcap) / temperature``,
    in float32 (float64 for float64 logits). Inputs as in :func:`logprobs`.

    Args:
        reduction: ``"none"`` -> ``targets.shape`` per-token losses (0 at ignored positions);
            ``"sum"``; ``"mean"`` -> sum / number of non-ignored tokens, clamped to >= 1, so an
            all-ignored batch gives 0.
        label_smoothing: ``eps`` in ``[0, 1]``; the uniform part covers all ``V`` classes.
        z_loss: ``c_z >= 0`` (PaLM uses 1e-4).
        num_items: with ``"sum"`` / ``"mean"``, returns ``sum / num_items`` (gradient
            accumulation over micro-batches); a tensor stays on its device.
        inplace_backward: as in :func:`logprobs`.
        process_group, vocab_size: a vocabulary-parallel head, as in :func:`logprobs` (every rank
            returns the same loss).

    Returns:
        float32 (float64 for float64 logits) loss: a scalar, or ``targets.shape``.
    """
    check_ce_options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, num_items=num_items)
    opts = LogitOptions(ignore_index, logit_scale, softcap, temperature)
    want = StatRequest(zmean=label_smoothing != 0.0)
    st = token_stats(
        logits,
        targets,
        opts,
        want,
        inplace_backward=inplace_backward,
        process_group=process_group,
        vocab_size=vocab_size,
    )
    ce = token_cross_entropy(st, label_smoothing=label_smoothing, z_loss=z_loss)
    return reduce_tokens(ce, targets != ignore_index, reduction, num_items)
