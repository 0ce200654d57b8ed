"""Helpers shared by the loss catalog, one definition of each: the output type, the numerically
stable primitives, the length-normalised log-probs and the preference metrics.

Stable forms (docs/losses.md, "Numerics"): ``log σ(x) = -softplus(-x)``; ``log(1 - e^a)`` split
at ``-ln 2`` (Mächler 2012); exponents fed to ``exp`` are clamped at :data:`MAX_EXP`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._checks import as_float

# Largest exponent fed to exp() (TRL 1.16 clamps its f-divergence and AlphaPO exponents at these
# values): exp(80) ~ 5.5e34 stays finite in float32 / bfloat16, exp(11) ~ 6e4 in float16.
MAX_EXP = 80.0
MAX_EXP_FP16 = 11.0
_LN2 = math.log(2.0)


class LossOutput(NamedTuple):
    """What every catalog loss returns.

    loss:    the reduced scalar loss (differentiable).
    losses:  the per-example losses, shape ``[B]`` (token-level losses: ``[B, T]``, listwise: as
             documented by the loss).
    metrics: ``dict[str, Tensor]`` of detached values people log (rewards, margins,
             accuracies, KL terms, ...), names as in TRL's logs where TRL has them.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    metrics: dict[str, torch.Tensor]


def max_exp(dtype: torch.dtype) -> float:
    """The exponent clamp for inputs of ``dtype`` (:data:`MAX_EXP`, or :data:`MAX_EXP_FP16`)."""
    return MAX_EXP_FP16 if dtype == torch.float16 else MAX_EXP


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``log σ(x) = -softplus(-x)``, stable for any ``x``."""
    return -F.softplus(-x)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a < 0`` (Mächler's split at ``-ln 2``)."""
    return torch.where(a < -_LN2, torch.log1p(-torch.exp(a)), torch.log(-torch.expm1(a)))


def logistic(z: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """``(1 - ε) softplus(-z) + ε softplus(z)``: the logistic loss with label smoothing ε
    (cDPO, AOT, CPO, SimPO, TPO); ``ε = 0`` is ``-log σ(z)``."""
    out = F.softplus(-z)
    if label_smoothing:
        out = (1.0 - label_smoothing) * out + label_smoothing * F.softplus(z)
    return out


def ipo(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO's squared loss ``(margin - 1/(2β))²`` (Azar et al. 2023, arXiv:2310.12036)."""
    return (margin - 1.0 / (2.0 * beta)) ** 2


def lengths(name: str, n: torch.Tensor | None, batch: int, like: torch.Tensor, why: str) -> torch.Tensor:
    """Completion token counts ``[B]`` as floats in ``like``'s dtype (raw, not clamped)."""
    if n is None:
        raise ValueError(f"{name} (completion token counts [B]) is required: {why}")
    if not isinstance(n, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token counts, got {type(n).__name__}")
    if n.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}] to match the log-probs, got {tuple(n.shape)}")
    if n.is_floating_point():
        as_float(name, n)
    return n.to(device=like.device, dtype=like.dtype)


def average(logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Length-averaged log-prob ``A = S / max(1, n)`` (an empty completion gives a finite 0)."""
    return logps / counts.clamp_min(1.0)


def token_mean_nll(logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Micro-batch token-mean NLL ``-Σ S / max(1, Σ n)``: ``F.cross_entropy(reduction="mean")``
    over the same tokens."""
    return -logps.sum() / counts.sum().clamp_min(1.0)


def pair_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor | None = None,
    rejected_logps: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """TRL's preference metrics, means over the pairs of the micro-batch (detached):
    ``rewards/{chosen, rejected, margins, accuracies}`` (accuracy: strict ``>``, ties count as
    wrong) and, when given, ``logps/{chosen, rejected}``."""
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    out = {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/margins": (cr - rr).mean(),
        "rewards/accuracies": (cr > rr).to(cr.dtype).mean(),
    }
    if chosen_logps is not None:
        out["logps/chosen"] = chosen_logps.detach().mean()
        out["logps/rejected"] = rejected_logps.detach().mean()
    return out
