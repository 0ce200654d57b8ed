"""Clipping of the importance ratio, shared by the policy losses (:mod:`alignops.losses.policy`):
PPO's clipped surrogate with separate low / high ranges, INTELLECT-2's cap of the unclipped ratio,
dual-clip PPO, and the covariance-based token selection of Clip-Cov / KL-Cov.

* PPO (Schulman et al. 2017, arXiv:1707.06347): ``L = -min(w A, clip(w, 1 - e_lo, 1 + e_hi) A)``.
* ``delta`` (INTELLECT-2, Prime Intellect 2025, arXiv:2505.07291): the unclipped branch uses
  ``min(w, delta)``.
* Dual-clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement
  Learning", arXiv:1912.09729): for ``A < 0`` the loss is also bounded by ``-c A``:
  ``L = min(L, -c A)``, ``c > 1`` (verl ``clip_ratio_c``, default 3), so a huge ratio on a
  negative-advantage token cannot give an unbounded loss.
* Clip-Cov / KL-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
  Reasoning Language Models", arXiv:2505.22617; the authors' verl implementation): the per-token
  covariance ``cov_t = (A_t - mean A)(logp_t - mean logp)`` (means over the valid tokens of the
  micro-batch) picks the tokens that drive the entropy down; Clip-Cov detaches a random
  ``ratio`` fraction of the tokens with ``lower < cov < upper`` (not already clipped by PPO),
  KL-Cov adds ``coef * |logp - old_logp|`` on the top ``ratio`` fraction by covariance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._tokens import token_mean


class ClipRange(NamedTuple):
    """``low`` / ``high``: the ratio is clipped to ``[1 - low, 1 + high]``; ``delta``: cap of the
    unclipped ratio (or ``None``); ``dual``: dual-clip bound ``c`` for ``A < 0`` (or ``None``)."""

    low: float
    high: float
    delta: float | None = None
    dual: float | None = None


def check_clip(clip: ClipRange) -> None:
    """Finite non-negative ranges and a dual-clip ``c > 1`` (Ye et al. 2020's condition)."""
    for name, v in (("low clip range", clip.low), ("high clip range", clip.high)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"the {name} must be a finite number >= 0, got {v!r}")
    if clip.dual is not None and not clip.dual > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual-clip, Ye et al. 2020), got {clip.dual}")


class ClippedSurrogate(NamedTuple):
    """``loss [B, T]`` and the detached masks the metrics count: ``clipped`` (the clipped branch is
    the larger loss), ``low`` / ``high`` (ratio below / above the range with ``A < 0`` / ``A > 0``),
    ``dual`` (the dual-clip bound is active)."""

    loss: torch.Tensor
    clipped: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    dual: torch.Tensor


def clipped_surrogate(w: torch.Tensor, adv: torch.Tensor, clip: ClipRange) -> ClippedSurrogate:
    """``L = -min(w' A, clip(w, 1 - low, 1 + high) A)``, ``w' = min(w, delta)`` when ``delta`` is set,
    then ``min(L, -c A)`` where ``A < 0`` when the dual-clip ``c`` is set."""
    w_u = torch.clamp(w, max=clip.delta) if clip.delta is not None else w
    unclipped = -w_u * adv
    clipped = -torch.clamp(w, 1.0 - clip.low, 1.0 + clip.high) * adv
    loss = torch.maximum(unclipped, clipped)
    negative = adv < 0
    dual = torch.zeros_like(negative)
    if clip.dual is not None:
        bound = -clip.dual * adv
        dual = negative & (loss.detach() > bound)
        loss = torch.where(negative, torch.minimum(loss, bound), loss)
    w_det = w_u.detach()
    return ClippedSurrogate(
        loss,
        (clipped > unclipped).detach(),
        (w_det < 1 - clip.low) & negative,
        (w_det > 1 + clip.high) & (adv > 0),
        dual.expand_as(loss),
    )


@dataclass(frozen=True)
class ClipCovOptions:
    """``loss_type="clip_cov"`` (Cui et al. 2025, arXiv:2505.22617): detach ``ratio`` of the valid
    tokens (at least one), drawn uniformly among those with ``lower < cov < upper`` that PPO did
    not clip; verl's ``clip_cov_ratio`` / ``clip_cov_lb`` / ``clip_cov_ub`` (2e-4, 1, 5).
    ``generator``: the ``torch.Generator`` (CPU) of the draw, for reproducible runs."""

    ratio: float = 2e-4
    lower: float = 1.0
    upper: float = 5.0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ClipCovOptions.ratio must be in (0, 1], got {self.ratio}")
        if not self.lower < self.upper:
            raise ValueError(f"ClipCovOptions needs lower < upper, got {self.lower}, {self.upper}")


@dataclass(frozen=True)
class KLCovOptions:
    """``loss_type="kl_cov"`` (Cui et al. 2025, arXiv:2505.22617): the top ``ratio`` of the valid
    tokens by covariance (at least one) get ``coef * |logp - old_logp|``; verl's ``kl_cov_ratio`` /
    ``ppo_kl_coef`` (2e-4, 1)."""

    ratio: float = 2e-4
    coef: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"KLCovOptions.ratio must be in (0, 1], got {self.ratio}")


@torch.no_grad()
def token_covariance(lp: torch.Tensor, adv: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
    """``cov_t = (A_t - mean A)(logp_t - mean logp)`` ``[B, T]``, means over the valid tokens;
    ``-inf`` at masked positions (never selected)."""
    m = mb.to(lp.dtype)
    a = adv.expand_as(lp)
    cov = (a - token_mean(a, m)) * (lp - token_mean(lp, m))
    return torch.where(mb, cov, torch.full_like(cov, -math.inf))


def _budget(mb: torch.Tensor, ratio: float) -> int:
    """``max(1, floor(ratio * valid tokens))`` (one host sync)."""
    return max(int(ratio * int(mb.sum())), 1)


@torch.no_grad()
def clip_cov_selection(cov: torch.Tensor, mb: torch.Tensor, ppo_clipped: torch.Tensor, o: ClipCovOptions):
    """Bool ``[B, T]``: the tokens Clip-Cov detaches (a uniform draw of the budget among the
    candidates, in row-major order of the candidates, with ``o.generator``)."""
    candidates = mb & ~ppo_clipped & (cov > o.lower) & (cov < o.upper)
    idx = candidates.flatten().nonzero().squeeze(1)
    k = _budget(mb, o.ratio)
    if idx.numel() > k:
        perm = torch.randperm(idx.numel(), generator=o.generator)[:k]
        idx = idx[perm.to(idx.device)]
    chosen = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    chosen[idx] = True
    return chosen.view_as(cov)


@torch.no_grad()
def kl_cov_selection(cov: torch.Tensor, mb: torch.Tensor, o: KLCovOptions) -> torch.Tensor:
    """Bool ``[B, T]``: the top ``max(1, floor(ratio * valid))`` valid tokens by covariance."""
    chosen = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    n_valid = int(mb.sum())
    if n_valid:
        chosen[torch.topk(cov.flatten(), min(_budget(mb, o.ratio), n_valid)).indices] = True
    return chosen.view_as(cov)
