"""Cross-entropy composed on per-token statistics, shared by ``linear_cross_entropy`` (hidden
states) and ``cross_entropy`` (logits): one definition of the per-token loss, its options and
the reductions, over whichever kernel family produced the statistics.

Per token, with ``logp``, ``lse`` and ``zmean`` of :class:`~alignops.kernels._common.TokenStats`::

    ce = (1 - eps) (-logp) + eps (lse - zmean) + c_z lse^2

``eps`` is label smoothing with PyTorch's semantics (the uniform part covers all ``V`` classes,
the target included; Szegedy et al., 2016, arXiv:1512.00567) and ``c_z`` the z-loss of PaLM
(Chowdhery et al., 2022, arXiv:2204.02311). Reductions: ``"none"`` per token (0 at ignored
positions), ``"sum"``, ``"mean"`` over the non-ignored tokens (clamped to >= 1, so an
all-ignored batch gives exactly 0), or a caller-given ``num_items``: the global token count of
gradient accumulation, which keeps micro-batches of different lengths weighted per token (the
fix transformers made for its gradient-accumulation loss in 2024).
"""

from __future__ import annotations

from typing import Literal

import torch

from .kernels._common import TokenStats, check_number

Reduction = Literal["none", "sum", "mean"]
REDUCTIONS = ("none", "sum", "mean")


def check_ce_options(*, reduction, label_smoothing, z_loss, num_items) -> None:
    """Clear errors for bad cross-entropy options."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_number("label_smoothing", label_smoothing, lo=0.0, lo_open=False, hi=1.0)
    check_number("z_loss", z_loss, lo=0.0, lo_open=False)
    check_num_items(reduction, num_items)


def check_num_items(reduction: str, num_items) -> None:
    """``num_items`` (a global token count dividing a summed loss): ``None``, a number > 0 or a
    scalar tensor, and never with ``reduction="none"``."""
    if num_items is None:
        return
    if reduction == "none":
        raise ValueError("num_items divides a summed loss: use reduction='sum' or 'mean', not 'none'")
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a scalar, got shape {tuple(num_items.shape)}")
    elif isinstance(num_items, bool) or not isinstance(num_items, (int, float)) or not num_items > 0:
        raise ValueError(f"num_items must be a number > 0 or a scalar tensor, got {num_items!r}")


def token_cross_entropy(stats: TokenStats, *, label_smoothing: float, z_loss: float) -> torch.Tensor:
    """Per-token cross-entropy; ignored tokens are already 0 in every statistic, so in the loss."""
    ce = -stats.logp
    if label_smoothing != 0.0:  # kept out when 0, so a -inf logit (zmean = -inf) gives no 0 * inf
        ce = ce * (1.0 - label_smoothing) + label_smoothing * (stats.lse - stats.zmean)
    if z_loss != 0.0:
        ce = ce + z_loss * stats.lse * stats.lse
    return ce


def reduce_tokens(
    per_token: torch.Tensor, valid: torch.Tensor, reduction: Reduction, num_items
) -> torch.Tensor:
    """``per_token`` (0 at ignored positions) reduced as the module docstring says."""
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if num_items is not None:
        return total / num_items
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)
