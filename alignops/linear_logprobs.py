"""Fused linear log-probs and cross-entropy from hidden states: the public API.

``linear_logprobs(hidden, weight, targets)`` computes, per token,
``log_softmax(hidden @ weight.T + bias)[target]`` (and on request the entropy and the
log-sum-exp) without ever building the ``[N, V]`` logits, forward or backward.
``linear_cross_entropy`` is ``F.cross_entropy((hidden @ weight.T).float(), targets)`` with label
smoothing, z-loss, soft-capping, temperature, a logit scale and a global ``num_items``
normaliser, composed on the same per-token statistics (not a second engine).

Layers of the family (the same for every family): Triton kernels and launchers in
``alignops.kernels.linear_logprobs``, the PyTorch engine in ``alignops._torch.linear_logprobs``,
custom ops with autograd in ``alignops._ops.linear_logprobs``, the float64 reference in
``alignops.reference.linear_logprobs``. CUDA tensors run the Triton kernels; every other device
the PyTorch engine (``ALIGNOPS_BACKEND``, docs/env.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._cross_entropy import Reduction, check_ce_options, reduce_tokens, token_cross_entropy
from ._ops._common import stats_like
from ._ops.linear_logprobs import linear_logprobs_fwd_op
from .kernels._common import (
    NOTHING_EXTRA,
    LogitOptions,
    StatRequest,
    TokenStats,
    check_linear_inputs,
    rows_2d,
)


class LogProbsOutput(NamedTuple):
    """Per-token outputs of :func:`linear_logprobs` and :func:`alignops.logprobs`, float32 (float64
    for float64 inputs) with the targets' shape; exactly 0 at ignored positions.

    logps:      ``log p(target)``.
    entropy:    ``H(p)`` of the full next-token distribution, or ``None`` unless requested.
    lse:        ``log sum_v exp(z_v)``, or ``None`` unless requested.
    log_sum_p2: ``log sum_v p_v^2`` (WPO's per-token weight), or ``None`` unless requested.
    topk_ids / topk_logps: ``[..., K]`` the ``K`` most likely ids (int64, most likely first; -1
        at ignored positions) and their log-probs (no gradient), or ``None`` unless requested.
        ``topk_ids[..., 0] == targets`` is "the target is the top-1 token".
    mean_logit: ``(1 / V) sum_v z_v``, the mean of the transformed logits (differentiable), or
        ``None`` unless requested.
    """

    logps: torch.Tensor
    entropy: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    log_sum_p2: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logps: torch.Tensor | None = None
    mean_logit: torch.Tensor | None = None

    @classmethod
    def of(cls, st: TokenStats, return_lse: bool) -> LogProbsOutput:
        lse = st.lse if return_lse else None
        return cls(st.logp, st.entropy, lse, st.log_sum_p2, st.topk_ids, st.topk_logps, st.zmean)


def linear_token_stats(
    hidden, weight, targets, bias, opts: LogitOptions, want: StatRequest = NOTHING_EXTRA
) -> TokenStats:
    """:class:`TokenStats` with ``targets.shape`` (unrequested fields ``None``), differentiable."""
    check_linear_inputs(hidden, weight, targets, bias)
    want = want.checked(weight.shape[0])
    h, y = rows_2d(hidden), targets.reshape(-1).long()
    return stats_like(linear_logprobs_fwd_op(h, weight, y, bias, *opts.as_args(), *want), targets, want)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_entropy: bool = False,
    return_lse: bool = False,
    return_log_sum_p2: bool = False,
    topk: int = 0,
    return_mean_logit: bool = False,
) -> LogProbsOutput:
    """Per-token log-probabilities of ``targets`` under ``z = softcap(logit_scale * (hidden @
    weight.T + bias)) / temperature``, without the ``[N, V]`` logits.

    Args:
        hidden:  ``[..., H]`` last hidden states (any leading dims; bf16 / fp16 / fp32 / fp64).
        weight:  ``[V, H]`` LM-head weight on the same device. Its dtype may differ from
            ``hidden``'s in mixed precision (a 16-bit ``hidden`` with an fp32 master weight, as
            under ``torch.autocast``): both matmul operands are then rounded to the 16-bit dtype,
            products accumulate in float32, and each gradient comes back in its input's dtype.
        targets: ``[...]`` int64 / int32 token ids (the leading dims of ``hidden``), or
            ``ignore_index``. Out-of-range ids raise ``ValueError`` (CPU) or a device-side
            assert (CUDA, no host sync).
        bias:    optional ``[V]``.
        temperature: divides the (soft-capped) logits; > 0.
        softcap: Gemma-2 style ``c * tanh(x / c)`` applied to the scaled logits, or ``None``.
        logit_scale: multiplies the raw logits first (a model's logit multiplier); > 0.
        return_entropy / return_lse / return_log_sum_p2: also return those per-token values.
        topk: also return the ``topk`` most likely ids and their log-probs per token (``0 <= topk
            <= 64``), computed in the same pass.
        return_mean_logit: also return the mean transformed logit ``(1 / V) sum_v z_v`` (TRL's
            ``mean_logits``), computed in the same pass.

    Returns:
        :class:`LogProbsOutput`, float32 (float64 for float64 inputs) with ``targets.shape``
        (``[..., K]`` for the top-k); exactly 0 at ignored positions. Differentiable with respect
        to ``hidden``, ``weight`` and ``bias`` for any combination of upstream gradients of
        ``logps``, ``entropy``, ``lse``, ``log_sum_p2`` and ``mean_logit``.
    """
    opts = LogitOptions(ignore_index, logit_scale, softcap, temperature)
    want = StatRequest(
        entropy=return_entropy, zmean=return_mean_logit, log_sum_p2=return_log_sum_p2, topk=topk
    )
    return LogProbsOutput.of(linear_token_stats(hidden, weight, targets, bias, opts, want), return_lse)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``targets`` under ``hidden @ weight.T + bias`` without ``[N, V]`` logits.

    Equals ``F.cross_entropy((hidden @ weight.T).float(), targets, ...)`` plus ``label_smoothing``
    (PyTorch semantics: the uniform part includes the target), ``z_loss`` (PaLM's
    ``c_z * lse^2``), ``softcap``, ``temperature`` and ``logit_scale`` (as in
    :func:`linear_logprobs`; mixed ``hidden`` / ``weight`` dtypes as there).

    Reductions: ``"none"`` returns per-token losses with ``targets.shape`` (0 at ignored
    positions); ``"sum"``; ``"mean"`` divides by the number of non-ignored tokens clamped to
    >= 1, so an all-ignored or empty batch gives exactly 0 (finite, with zero gradient).
    ``num_items`` (int, float or 0-d tensor) divides the sum by a global token count instead:
    gradient accumulation over micro-batches and ranks (no further averaging).
    """
    check_ce_options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, num_items=num_items)
    opts = LogitOptions(ignore_index, logit_scale, softcap, temperature)
    st = linear_token_stats(hidden, weight, targets, bias, opts, StatRequest(zmean=label_smoothing != 0.0))
    ce = token_cross_entropy(st, label_smoothing=label_smoothing, z_loss=z_loss)
    return reduce_tokens(ce, targets != ignore_index, reduction, num_items)
