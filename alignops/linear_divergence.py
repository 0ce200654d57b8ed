"""Full-distribution divergences between two heads without the ``[N, V]`` logits: the public API.

``linear_divergence(h_p, w_p, h_q, w_q, kind=...)`` computes, per token, a divergence between the
student / policy distribution ``p = softmax(T_p(h_p @ w_p.T + b_p))`` and the teacher / reference
``q = softmax(T_q(h_q @ w_q.T + b_q))`` (each head with its own hidden size, temperature, logit
scale and soft-cap), optionally the student's entropy, and reduces it. ``divergence(logits_p,
logits_q, ...)`` is the same for callers who already hold both logits (it streams over their
tiles; no further ``[N, V]`` tensor). The divergences (forward / reverse KL, generalized JSD,
total variation, Amari alpha, named f-divergences) are defined in
``alignops/reference/linear_divergence.py`` and streamed as ``alignops/_torch/linear_divergence.py``
explains (passes, zero probabilities, ``+inf`` rows).

Layers of the family: Triton launchers ``alignops.kernels.linear_divergence`` (CUDA), the PyTorch
engine ``alignops._torch.linear_divergence``, custom ops with autograd
``alignops._ops.linear_divergence`` (so ``torch.compile(fullgraph=True)`` traces through), the
float64 reference ``alignops.reference.linear_divergence``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from ._cross_entropy import check_num_items
from ._ops.linear_divergence import (
    linear_divergence_fwd_op,
    logits_divergence_fwd_op,
    sparse_divergence_fwd_op,
)
from ._vocab_parallel import is_dtensor
from ._vocab_parallel_div import linear_divergence_parallel
from .kernels._common import DivergenceOptions, LogitOptions, rows_2d

DivReduction = Literal["none", "sum", "mean", "batchmean"]
DIV_REDUCTIONS = ("none", "sum", "mean", "batchmean")


class DivergenceOutput(NamedTuple):
    """loss: the reduced divergence (a 0-d tensor), or per token with the tokens' leading shape
    for ``reduction="none"`` (0 at masked positions; float32, float64 for float64 inputs).
    entropy: the student's per-token entropy (leading shape, 0 at masked positions, differentiable)
    when ``return_entropy``, else ``None``."""

    loss: torch.Tensor
    entropy: torch.Tensor | None = None


def check_reduction(reduction, num_items) -> None:
    """Clear errors for a bad ``reduction`` / ``num_items``."""
    if reduction not in DIV_REDUCTIONS:
        raise ValueError(f"reduction must be one of {DIV_REDUCTIONS}, got {reduction!r}")
    check_num_items(reduction, num_items)


def token_mask(
    lead: tuple[int, ...], device, mask=None, labels=None, ignore_index: int = -100
) -> torch.Tensor:
    """``[N]`` bool: the tokens that count. ``mask`` (bool or 0/1, the leading shape) and / or
    ``labels != ignore_index``; all tokens when neither is given."""
    valid = torch.ones(lead, dtype=torch.bool, device=device)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != lead:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a tensor with the tokens' leading shape {lead}, got {got}")
        valid = valid & (mask != 0)
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != lead:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must be a tensor with the tokens' leading shape {lead}, got {got}")
        valid = valid & (labels != ignore_index)
    return valid.reshape(-1)


def reduce_divergence(per_token, valid, lead, reduction: DivReduction, num_items) -> torch.Tensor:
    """``"none"``: per token with the leading shape; ``"sum"``; ``"mean"`` over the counted tokens
    (clamped to >= 1: an all-masked batch gives exactly 0); ``"batchmean"``: the sum over the first
    leading dimension's size (``torch.nn.KLDivLoss``'s); ``num_items`` divides the sum by a
    global token count instead (gradient accumulation over micro-batches and ranks)."""
    if reduction == "none":
        return per_token.view(lead)
    total = per_token.sum()
    if num_items is not None:
        return total / num_items
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(1, lead[0] if lead else 1)
    return total / valid.sum().clamp(min=1)


def _div_args(kind, beta, alpha, generator) -> tuple:
    d = DivergenceOptions(kind, beta, alpha, generator)
    return d.kind, d.beta, d.alpha, d.generator


def _head_opts(temperature, softcap, logit_scale) -> tuple:
    return LogitOptions(-100, logit_scale, softcap, temperature).as_args()


def _finish(out, valid, lead, reduction, num_items, return_entropy) -> DivergenceOutput:
    div, _, _, ent = out[:4]
    loss = reduce_divergence(div, valid, lead, reduction, num_items)
    return DivergenceOutput(loss, ent.view(lead) if return_entropy else None)


def linear_divergence(
    h_p: torch.Tensor,
    w_p: torch.Tensor,
    h_q: torch.Tensor,
    w_q: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.5,
    generator: str | None = None,
    b_p: torch.Tensor | None = None,
    b_q: torch.Tensor | None = None,
    temperature_p: float = 1.0,
    temperature_q: float = 1.0,
    softcap_p: float | None = None,
    softcap_q: float | None = None,
    logit_scale_p: float = 1.0,
    logit_scale_q: float = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: DivReduction = "mean",
    num_items: int | float | torch.Tensor | None = None,
    return_entropy: bool = False,
    process_group=None,
    vocab_size: int | None = None,
    reduce_hidden_grad: bool = True,
) -> DivergenceOutput:
    """A per-token divergence between the student head ``(h_p, w_p, b_p)`` and the teacher head
    ``(h_q, w_q, b_q)``, reduced, without the ``[N, V]`` logits of either.

    Args:
        h_p: ``[..., Hp]`` student hidden states; w_p: ``[V, Hp]``; b_p: ``[V]`` or None.
        h_q: ``[..., Hq]`` teacher hidden states (same leading dims, its own hidden size);
            w_q: ``[V, Hq]`` (the same ``V``); b_q: ``[V]`` or None. The teacher is usually
            frozen (``requires_grad=False``); when its tensors require grad they get gradients
            too (mutual / symmetric objectives).
        kind: ``"forward_kl"`` = KL(q || p), ``"reverse_kl"`` = KL(p || q), ``"jsd"``
            (generalized, ``beta``; 0 and 1 are the two KLs as in TRL), ``"tv"``, ``"alpha"``
            (``alpha``) or ``"f"`` with ``generator`` in ``kl, reverse_kl, hellinger, chi2, js, tv``.
        temperature_* / softcap_* / logit_scale_*: each head's logit transform (``LogitOptions``).
        mask: ``[...]`` bool or 0/1, the tokens that count; labels + ignore_index: the same from
            labels; both may be given (their intersection); neither: every token.
        reduction: ``"none"`` (per token, leading shape), ``"sum"``, ``"mean"`` (over counted
            tokens) or ``"batchmean"`` (sum / leading dim 0); num_items: divide the sum by this
            global count instead.
        return_entropy: also return the student's per-token entropy (same pass, differentiable).
        process_group: vocabulary parallelism (docs/distributed.md): ``w_p`` / ``w_q`` (and
            ``b_p`` / ``b_q``) are this rank's rows ``[V_r, H]`` of both heads, the same slice of
            the vocabulary for both, and the result covers the full vocabulary on every rank
            (``alignops/_vocab_parallel_div.py``: forward / reverse KL, alpha and the entropy
            combine in one pass; jsd and tv take a second pass after the global normalizers).
            DTensor heads sharded ``Shard(0)`` on a 1-D mesh need no group. The PyTorch engine
            runs on every device here (the Triton kernels do not take the global statistics).
        vocab_size: with a process group, the true vocabulary size when the slices are padded.
        reduce_hidden_grad: with a process group, all-reduce (sum) the gradients of ``h_p`` /
            ``h_q`` over the group (False: the caller's layer does it).

    Returns:
        :class:`DivergenceOutput` ``(loss, entropy)``. Rows where the divergence is infinite in
        exact arithmetic (student mass on a teacher zero for KL(p || q), ...) give ``+inf`` with a
        zero gradient (documented in ``alignops/_torch/linear_divergence.py``), never NaN.
    """
    check_reduction(reduction, num_items)
    div = _div_args(kind, beta, alpha, generator)
    if not isinstance(h_p, torch.Tensor) or not isinstance(h_q, torch.Tensor):
        raise TypeError("h_p and h_q must be tensors")
    if tuple(h_p.shape[:-1]) != tuple(h_q.shape[:-1]):
        raise ValueError(
            f"token count mismatch: h_p is {tuple(h_p.shape)}, h_q is {tuple(h_q.shape)} "
            "(the leading dims must agree)"
        )
    lead = tuple(h_p.shape[:-1])
    valid = token_mask(lead, h_p.device, mask, labels, ignore_index)
    opts = _head_opts(temperature_p, softcap_p, logit_scale_p) + _head_opts(
        temperature_q, softcap_q, logit_scale_q
    )
    if process_group is not None or any(is_dtensor(t) for t in (w_p, w_q, b_p, b_q)):
        d, ent = linear_divergence_parallel(
            rows_2d(h_p), w_p, b_p, rows_2d(h_q), w_q, b_q, valid,
            LogitOptions(*opts[:4]), LogitOptions(*opts[4:]), DivergenceOptions(*div), return_entropy,
            process_group, vocab_size, reduce_hidden_grad,
        )  # fmt: skip
        return _finish((d, None, None, ent), valid, lead, reduction, num_items, return_entropy)
    out = linear_divergence_fwd_op(
        rows_2d(h_p), w_p, b_p, rows_2d(h_q), w_q, b_q, valid, *opts, *div, return_entropy
    )
    return _finish(out, valid, lead, reduction, num_items, return_entropy)


def divergence(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.5,
    generator: str | None = None,
    temperature_p: float = 1.0,
    temperature_q: float = 1.0,
    softcap_p: float | None = None,
    softcap_q: float | None = None,
    logit_scale_p: float = 1.0,
    logit_scale_q: float = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: DivReduction = "mean",
    num_items: int | float | torch.Tensor | None = None,
    return_entropy: bool = False,
) -> DivergenceOutput:
    """:func:`linear_divergence` for callers who already hold both heads' logits ``[..., V]``
    (same shape). The logits are read tile by tile (no softmax / log-softmax ``[N, V]`` tensor is
    built); the only ``[N, V]`` tensors created are the gradients autograd asks for. Same options,
    masks, reductions and outputs."""
    check_reduction(reduction, num_items)
    div = _div_args(kind, beta, alpha, generator)
    if not isinstance(logits_p, torch.Tensor) or not isinstance(logits_q, torch.Tensor):
        raise TypeError("logits_p and logits_q must be tensors")
    if logits_p.dim() < 1 or tuple(logits_p.shape) != tuple(logits_q.shape):
        raise ValueError(
            f"logits_p {tuple(logits_p.shape)} and logits_q {tuple(logits_q.shape)} must have one shape "
            "[..., V] (vocabulary size mismatch or token count mismatch)"
        )
    lead = tuple(logits_p.shape[:-1])
    valid = token_mask(lead, logits_p.device, mask, labels, ignore_index)
    opts = _head_opts(temperature_p, softcap_p, logit_scale_p) + _head_opts(
        temperature_q, softcap_q, logit_scale_q
    )
    out = logits_divergence_fwd_op(rows_2d(logits_p), rows_2d(logits_q), valid, *opts, *div, return_entropy)
    return _finish(out, valid, lead, reduction, num_items, return_entropy)


def sparse_divergence(
    h_p: torch.Tensor,
    w_p: torch.Tensor,
    q_ids: torch.Tensor,
    q_logps: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.5,
    generator: str | None = None,
    b_p: torch.Tensor | None = None,
    temperature_p: float = 1.0,
    softcap_p: float | None = None,
    logit_scale_p: float = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: DivReduction = "mean",
    num_items: int | float | torch.Tensor | None = None,
    return_entropy: bool = False,
) -> DivergenceOutput:
    """:func:`linear_divergence` against a teacher given only by its top-``K`` per token:
    ``q_ids [..., K]`` (int, in ``[0, V)``, distinct per row) and ``q_logps [..., K]`` (its
    log-probabilities, e.g. read from a cache; ``-inf`` marks an unused slot). The rest of the
    teacher's mass is one tail outcome: the divergence is taken between both distributions
    coarse-grained onto the ``K`` ids plus the tail (``alignops/_torch/sparse_divergence.py``), a
    lower bound of the full divergence, equal to it when ``K = V``. Gradients flow to the student
    only. Same options, masks, reductions and outputs as :func:`linear_divergence`."""
    check_reduction(reduction, num_items)
    div = _div_args(kind, beta, alpha, generator)
    if (
        not isinstance(h_p, torch.Tensor)
        or not isinstance(q_ids, torch.Tensor)
        or not isinstance(q_logps, torch.Tensor)
    ):
        raise TypeError("h_p, q_ids and q_logps must be tensors")
    lead = tuple(h_p.shape[:-1])
    if q_ids.dim() < 1 or tuple(q_ids.shape[:-1]) != lead:
        raise ValueError(
            f"token count mismatch: h_p is {tuple(h_p.shape)}, q_ids {tuple(q_ids.shape)} (want [..., K])"
        )
    if tuple(q_logps.shape) != tuple(q_ids.shape):
        raise ValueError(f"q_logps {tuple(q_logps.shape)} must have q_ids' shape {tuple(q_ids.shape)}")
    k = q_ids.shape[-1]
    valid = token_mask(lead, h_p.device, mask, labels, ignore_index)
    out = sparse_divergence_fwd_op(
        rows_2d(h_p), w_p, b_p, q_ids.reshape(-1, k), q_logps.reshape(-1, k),
        valid, *_head_opts(temperature_p, softcap_p, logit_scale_p), *div, return_entropy,
    )  # fmt: skip
    div_, _, ent = out
    loss = reduce_divergence(div_, valid, lead, reduction, num_items)
    return DivergenceOutput(loss, ent.view(lead) if return_entropy else None)


__all__ = ["DivergenceOutput", "divergence", "linear_divergence", "sparse_divergence"]
