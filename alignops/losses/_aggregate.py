"""How a ``[B, T]`` matrix of per-token losses becomes the scalar loss: verl's ``loss_agg_mode``
names, shared by every policy and value loss (:mod:`alignops.losses.policy`).

With the mask ``m``, ``n_i = sum_t m_{i,t}`` and ``L`` zero at masked positions:

==============================  ==================================================  =====================
``loss_agg_mode``               loss                                                TRL ``loss_type``
==============================  ==================================================  =====================
``"token-mean"``                ``sum_{i,t} L / N_tok``                             bnpo, dapo (global)
``"seq-mean-token-sum"``        ``sum_i (sum_t L) / N_seq``                         luspo
``"seq-mean-token-mean"``       ``sum_i (sum_t L / max(1, n_i)) / N_seq``           grpo
``"seq-mean-token-sum-norm"``   ``sum_{i,t} L / (N_seq * H)``                       dr_grpo
==============================  ==================================================  =====================

``N_tok`` = ``num_items`` (the accumulated batch's token count, for gradient accumulation) or
``sum m`` of this micro-batch (clamped to >= 1). ``N_seq`` = ``num_sequences``, else the rows of
this micro-batch as ``seq_mean_over`` says: ``"all"`` (``B``; TRL, verl before 0.5) or
``"nonempty"`` (rows with ``n_i > 0``; verl's current ``agg_loss`` leaves fully-masked rows out),
clamped to >= 1. ``H`` (the horizon) = ``max_completion_length``, else the padded length ``T``
(verl divides by ``loss_mask.shape[-1]``).

``seq-mean-token-sum-norm`` is Dr. GRPO's sum over tokens divided by a constant budget
(Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783), which keeps the
paper's ``1 / G`` over sequences; verl's implementation divides by ``H`` only ("turns off the
sequence-dim averaging"): ``num_sequences=1`` reproduces that scale.

Sequence-level losses ``[B]`` (GMPO, RLOO) aggregate the same way with each row's loss on every
one of its valid tokens: ``token-mean`` weights a completion by its length, ``seq-mean-token-mean``
is the plain mean of the non-empty rows' losses.
"""

from __future__ import annotations

from typing import Literal

import torch

from .._checks import check_choice
from ._tokens import Count

LossAggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSS_AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
SeqMeanOver = Literal["all", "nonempty"]
SEQ_MEAN_OVER: tuple[str, ...] = ("all", "nonempty")


def check_aggregation(mode: str | None, seq_mean_over: str, max_completion_length: int | None) -> None:
    """Valid ``loss_agg_mode`` (or ``None``), ``seq_mean_over`` and horizon."""
    if mode is not None:
        check_choice("loss_agg_mode", mode, LOSS_AGG_MODES)
    check_choice("seq_mean_over", seq_mean_over, SEQ_MEAN_OVER)
    if max_completion_length is not None and (
        isinstance(max_completion_length, bool)
        or not isinstance(max_completion_length, int)
        or max_completion_length < 1
    ):
        raise ValueError(f"max_completion_length must be an int >= 1, got {max_completion_length!r}")


def _rows(m: torch.Tensor, seq_mean_over: str, num_sequences: Count | None):
    if num_sequences is not None:
        return num_sequences
    if seq_mean_over == "all":
        return max(m.shape[0], 1)
    return (m.sum(-1) > 0).sum().clamp(min=1).to(m.dtype)


def aggregate(
    losses: torch.Tensor,
    m: torch.Tensor,
    mode: str,
    *,
    seq_mean_over: str = "all",
    num_items: Count | None = None,
    num_sequences: Count | None = None,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """The scalar loss of ``losses [B, T]`` (zero where masked) under ``mode`` with the mask
    ``m [B, T]`` (compute dtype); the counts are described in the module docstring."""
    if mode == "token-mean":
        return losses.sum() / (m.sum().clamp(min=1) if num_items is None else num_items)
    rows = _rows(m, seq_mean_over, num_sequences)
    if mode == "seq-mean-token-sum":
        return losses.sum() / rows
    if mode == "seq-mean-token-mean":
        return (losses.sum(-1) / m.sum(-1).clamp(min=1)).sum() / rows
    horizon = losses.shape[-1] if max_completion_length is None else max_completion_length
    return losses.sum() / (rows * horizon)


def broadcast(losses: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Sequence-level losses ``[B]`` on every valid token of their row: ``[B, T]``."""
    return losses.unsqueeze(1) * m
