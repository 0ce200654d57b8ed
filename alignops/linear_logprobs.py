"""Fused linear log-probs and cross-entropy: the public API (SPEC §1.1, §3).

``linear_logprobs(hidden, weight, targets)`` computes, per token,
``log_softmax(hidden @ weight.T + bias)[target]`` (and on request the entropy and the
log-sum-exp) without ever building the ``[N, V]`` logits, forward or backward.
``linear_cross_entropy`` is ``F.cross_entropy((hidden @ weight.T).float(), targets)`` with
label smoothing, z-loss, soft-capping, temperature and a global ``num_items`` normaliser,
composed from the same per-token outputs (not a second engine).

CUDA tensors run the Triton kernels of ``alignops.kernels.linear_logprobs``; every other
device runs the chunked PyTorch engine of ``alignops._cpu``. Setting
``ALIGNOPS_BACKEND=triton`` forces the Triton path (with ``TRITON_INTERPRET=1`` it runs
on the CPU: that is how the kernels are tested without a GPU); ``ALIGNOPS_BACKEND=torch``
forces the PyTorch engine everywhere.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from ._ops import linear_logprobs_fwd_op
from ._validate import check_common, check_loss_options

Reduction = Literal["none", "sum", "mean"]


class LogProbsOutput(NamedTuple):
    """Per-token outputs of :func:`linear_logprobs`, each float32 with the targets' shape.

    logps:   ``log p(target)``; exactly 0 at ignored positions.
    entropy: ``H(p)`` of the full next-token distribution, or ``None`` unless requested.
    lse:     ``log sum_v exp(z_v)``, or ``None`` unless requested.
    """

    logps: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor | None


def _flatten(hidden: torch.Tensor, targets: torch.Tensor):
    h = hidden.reshape(-1, hidden.shape[-1]) if hidden.dim() != 2 else hidden
    if h.numel() and h.stride(-1) != 1:
        raise ValueError("hidden must be contiguous in its last dimension (row strides may be anything)")
    return h, targets.reshape(-1)


def _stats(hidden, weight, targets, bias, *, ignore_index, temperature, softcap, need_entropy, need_zmean):
    check_common(hidden, weight, targets, bias, temperature=temperature, softcap=softcap)
    h2, t1 = _flatten(hidden, targets)
    logp, lse, ent, zmean = linear_logprobs_fwd_op(
        h2,
        weight,
        bias,
        t1,
        int(ignore_index),
        float(temperature),
        None if softcap is None else float(softcap),
        bool(need_entropy),
        bool(need_zmean),
    )
    shape = targets.shape
    return (
        logp.view(shape),
        ent.view(shape) if need_entropy else None,
        lse.view(shape),
        zmean.view(shape) if need_zmean else None,
    )


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    return_lse: bool = False,
) -> LogProbsOutput:
    """Per-token log-probabilities of ``targets`` under ``softcap(hidden @ weight.T + bias) / T``.

    Args:
        hidden:  ``[..., H]`` last hidden states (any leading dims; bf16 / fp16 / fp32 / fp64).
        weight:  ``[V, H]`` LM-head weight, same dtype family and device as ``hidden``.
        targets: ``[...]`` int64 token ids (the leading dims of ``hidden``), or ``ignore_index``.
        bias:    optional ``[V]``.
        temperature: divides the (soft-capped) logits; must be > 0 (SPEC §1.1 order).
        softcap: Gemma-2 style ``c * tanh(z / c)`` before the temperature, or ``None``.
        return_entropy / return_lse: also return those per-token values.

    Returns:
        ``LogProbsOutput(logps, entropy, lse)``, float32 (float64 for float64 inputs) with
        ``targets.shape``; exactly 0 at ignored positions. Differentiable with respect to
        ``hidden``, ``weight`` and ``bias`` for any combination of upstream gradients.
    """
    logp, ent, lse, _ = _stats(
        hidden,
        weight,
        targets,
        bias,
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        need_entropy=return_entropy,
        need_zmean=False,
    )
    return LogProbsOutput(logp, ent if return_entropy else None, lse if return_lse else None)


def _ce_from_stats(logp, lse, zmean, valid, *, reduction, label_smoothing, z_loss, num_items):
    """SPEC §3.1: ``(1-eps) * (-logp) + eps * (lse - zbar) + c_z * lse^2``, then §3.2 / §3.3."""
    ce = (
        -logp if label_smoothing == 0.0 else -(1.0 - label_smoothing) * logp + label_smoothing * (lse - zmean)
    )
    if z_loss != 0.0:
        ce = ce + z_loss * lse * lse
    # ignored rows are already exactly 0 in logp / lse / zmean
    if reduction == "none":
        return ce
    total = ce.sum()
    if num_items is not None:
        return total / num_items
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


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
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``targets`` under ``hidden @ weight.T + bias`` without ``[N, V]`` logits.

    Equals ``F.cross_entropy((hidden @ weight.T).float(), targets, ...)`` plus the SPEC §3.1
    extras: ``label_smoothing`` (PyTorch / HF semantics, uniform part includes the target),
    ``z_loss`` (PaLM ``c_z * lse^2``), ``softcap`` and ``temperature``.

    Reductions (SPEC §3.2 / §3.3): ``"none"`` returns per-token losses with ``targets.shape``
    (0 at ignored positions); ``"sum"``; ``"mean"`` divides by the number of non-ignored
    tokens clamped to >= 1, so an all-ignored or empty batch gives exactly 0 (finite, with
    zero gradient). ``num_items`` (int, float or 0-d tensor) divides the sum by a global
    token count instead: gradient accumulation over micro-batches and ranks (no further
    averaging; without it the caller must divide by the number of micro-batches).
    """
    check_loss_options(
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, num_items=num_items
    )
    logp, _, lse, zmean = _stats(
        hidden,
        weight,
        targets,
        bias,
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        need_entropy=False,
        need_zmean=label_smoothing != 0.0,
    )
    valid = targets != ignore_index
    return _ce_from_stats(
        logp,
        lse,
        zmean,
        valid,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        num_items=num_items,
    )
