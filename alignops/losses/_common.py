"""Helpers shared by the loss catalog (SPEC §1.4, §1.5)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossOutput(NamedTuple):
    """What every catalog loss returns.

    loss:    the reduced scalar loss (differentiable).
    losses:  the per-example losses, shape ``[B]`` (or ``[B, K]`` where a section says so).
    metrics: ``dict[str, Tensor]`` of detached values people log (rewards, margins,
             accuracies, KL terms, ...), names as in TRL's logs where TRL has them.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    metrics: dict[str, torch.Tensor]


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``log σ(x) = -softplus(-x)`` (SPEC §1.5), stable for any ``x``."""
    return -F.softplus(-x)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a < 0`` (SPEC §1.5, Mächler's split at ``-ln 2``)."""
    return torch.where(a < -0.6931471805599453, torch.log1p(-torch.exp(a)), torch.log(-torch.expm1(a)))


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ValueError when a log-prob tensor holds NaN (a silent NaN loss is worse).

    CPU: a host check. CUDA: an asynchronous device-side assert (no host sync). Under
    ``torch.compile`` the check is skipped (it would be a data-dependent branch).
    """
    if torch.compiler.is_compiling():
        return
    if t.is_cuda:
        torch._assert_async(~torch.isnan(t).any(), f"alignops: {name} contains NaN")
        return
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN")
