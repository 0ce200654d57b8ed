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
from ._vocab_parallel import is_dtensor, linear_token_stats_parallel
from .kernels._common import (
    GRAD_FILTER_AUTO,
    NOTHING_EXTRA,
    LogitOptions,
    StatRequest,
    TokenStats,
    check_linear_inputs,
    grad_filter_threshold,
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


class VocabParallel(NamedTuple):
    """Vocabulary-parallel options of the public functions (docs/distributed.md)."""

    process_group: object = None
    vocab_size: int | None = None
    reduce_hidden_grad: bool = True


def linear_token_stats(
    hidden,
    weight,
    targets,
    bias,
    opts: LogitOptions,
    want: StatRequest = NOTHING_EXTRA,
    parallel: VocabParallel | None = None,
    grad_filter: float | str | None = GRAD_FILTER_AUTO,
) -> TokenStats:
    """:class:`TokenStats` with ``targets.shape`` (unrequested fields ``None``), differentiable;
    ``grad_filter`` as in :func:`linear_logprobs`. With ``parallel.process_group`` set, or a
    DTensor ``weight``, ``weight`` / ``bias`` are this rank's vocabulary slice and the statistics
    cover the full vocabulary (``alignops._vocab_parallel``; no gradient filtering there)."""
    par = VocabParallel() if parallel is None else parallel
    if par.process_group is not None or is_dtensor(weight) or is_dtensor(bias):
        return linear_token_stats_parallel(hidden, weight, targets, bias, opts, want, *par)
    dot = check_linear_inputs(hidden, weight, targets, bias)
    want = want.checked(weight.shape[0])
    eps = grad_filter_threshold(grad_filter, dot)
    h, y = rows_2d(hidden), targets.reshape(-1).long()
    return stats_like(linear_logprobs_fwd_op(h, weight, y, bias, *opts.as_args(), *want, eps), targets, want)


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
    process_group=None,
    vocab_size: int | None = None,
    reduce_hidden_grad: bool = True,
    grad_filter: float | str | None = GRAD_FILTER_AUTO,
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
        process_group: vocabulary parallelism (docs/distributed.md): ``weight`` / ``bias`` are
            this rank's rows ``[V_r, H]`` / ``[V_r]`` of the head (rank ``r`` holds global ids
            ``V_0 + ... + V_{r-1}`` on; uneven slices are fine); ``hidden`` and ``targets`` are the
            same on every rank, and so are the outputs, over the full vocabulary. A DTensor
            ``weight`` sharded ``Shard(0)`` on a 1-D mesh needs no group (its mesh's is used).
        vocab_size: with a process group, the true vocabulary size when the last slices hold
            padding rows (global ids ``>= vocab_size`` are left out); default: all rows.
        reduce_hidden_grad: with a process group, all-reduce (sum) the gradient of ``hidden``
            over the group (default); ``False`` returns this rank's partial sum, for a caller
            whose layer reduces it already.
        grad_filter: gradient filtering in the backward (Cut Cross-Entropy, Wijmans et al., 2024,
            arXiv 2411.09009). With a threshold ``t > 0``, a tile of the ``[N, V]`` softmax whose
            probabilities are all below ``t`` and that holds no target of its rows adds nothing
            to the gradients of hidden, weight and bias, and its share of the two backward
            products is skipped. ``"auto"`` (default): ``t = finfo(dtype).eps / 32`` for a 16-bit
            matmul dtype (bf16 2^-12, fp16 2^-15), off for fp32 / fp64; ``None`` or ``0``: off;
            a float in ``(0, 1)``: that ``t``. Each dropped entry of the raw-logit gradient is at
            most ``t`` times its row's coefficient (``|g_lse - g_logp|`` for log-prob / lse
            gradients; with an entropy or ``log_sum_p2`` gradient the coefficient also carries
            ``|z - E_p z|`` / ``2``). Never applied when the mean logit is computed (label
            smoothing, ``return_mean_logit``).
            Tiles: ``[BN, BV]`` blocks on the Triton path (64 x 128 by default), one
            vocabulary column of a token chunk on the torch engine. Deterministic: the same
            inputs skip the same tiles and sum in the same order. Not applied with a process group.

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
    par = VocabParallel(process_group, vocab_size, reduce_hidden_grad)
    st = linear_token_stats(hidden, weight, targets, bias, opts, want, par, grad_filter)
    return LogProbsOutput.of(st, return_lse)


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
    process_group=None,
    vocab_size: int | None = None,
    reduce_hidden_grad: bool = True,
    grad_filter: float | str | None = GRAD_FILTER_AUTO,
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

    ``process_group`` / ``vocab_size`` / ``reduce_hidden_grad``: a vocabulary-parallel head, as in
    :func:`linear_logprobs` (every rank returns the same loss). ``grad_filter``: gradient
    filtering, as in :func:`linear_logprobs` (not applied with ``label_smoothing`` or a process
    group).
    """
    check_ce_options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, num_items=num_items)
    opts = LogitOptions(ignore_index, logit_scale, softcap, temperature)
    par = VocabParallel(process_group, vocab_size, reduce_hidden_grad)
    want = StatRequest(zmean=label_smoothing != 0.0)
    st = linear_token_stats(hidden, weight, targets, bias, opts, want, par, grad_filter)
    ce = token_cross_entropy(st, label_smoothing=label_smoothing, z_loss=z_loss)
    return reduce_tokens(ce, targets != ignore_index, reduction, num_items)
