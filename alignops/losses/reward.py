"""Reward-model losses on scalar rewards: Bradley–Terry (pairs, margins, soft labels,
K-way rankings, centering) and Plackett–Luce.

Rewards come from a score head, one scalar per (prompt, response); no log-probs are involved.
Arithmetic is float32 (float64 stays float64). Metric names follow TRL's ``RewardTrainer``:
``accuracy``, ``margin``, ``min_reward``, ``mean_reward``, ``max_reward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import vec
from ._common import LossOutput
from .listwise import ListLike, _as_list, _labels, _list_mask, _pairs, _plackett_luce_nll

__all__ = ["bradley_terry_loss", "plackett_luce_loss"]


def _reward_stats(rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    r = rewards.detach()
    return {"min_reward": r.min(), "mean_reward": r.mean(), "max_reward": r.max()}


def bradley_terry_loss(
    rewards_chosen: torch.Tensor | None = None,
    rewards_rejected: torch.Tensor | None = None,
    *,
    rewards: ListLike | None = None,
    labels: ListLike | None = None,
    mask: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
    soft_labels: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> LossOutput:
    """Bradley–Terry reward-model loss (InstructGPT: Ouyang et al. 2022, arXiv:2203.02155, Eq. 1;
    TRL ``RewardTrainer``).

    Pair mode: ``rewards_chosen`` / ``rewards_rejected`` ``[B]``, ``d = r_c - r_r``:
    ``ℓ = softplus(-(d - m))`` with an optional ``margin`` m ``[B]`` (Llama 2, Touvron et al. 2023,
    arXiv:2307.09288), or with AI ``soft_labels`` p = P(chosen ≻ rejected) ``[B]`` (RLAIF, Lee et
    al. 2023, arXiv:2309.00267): ``ℓ = p·softplus(-d) + (1-p)·softplus(d)``.
    Ranking mode (InstructGPT): ``rewards`` ``[B, K]`` with ``labels`` ψ ``[B, K]`` (higher is
    better; ``mask`` for unequal K): every pair ``ψ_i > ψ_j`` of a prompt is used,
    ``ℓ_b = mean over its C(K,2) pairs of softplus(-(r_i - r_j))`` (tied labels give no pair).
    ``center_rewards_coefficient`` η adds ``η·(r_c + r_r)²`` per pair (Eisenstein et al. 2023,
    arXiv:2312.09244; TRL default None, recommended 0.01). ``losses`` ``[B]``; ``loss`` = mean over
    prompts (that have a pair). Metrics: ``accuracy`` (``r_c > r_r`` over pairs), ``margin`` (mean
    ``r_c - r_r``), ``min_reward`` / ``mean_reward`` / ``max_reward``.
    """
    pair_mode = rewards_chosen is not None or rewards_rejected is not None
    if pair_mode == (rewards is not None):
        raise ValueError("pass rewards_chosen and rewards_rejected ([B]), or rewards and labels ([B, K])")
    if pair_mode:
        if labels is not None or mask is not None:
            raise ValueError("labels / mask belong to ranking mode (rewards=[B, K])")
        return _bt_pairs(rewards_chosen, rewards_rejected, margin, soft_labels, center_rewards_coefficient)
    if margin is not None or soft_labels is not None:
        raise ValueError("margin / soft_labels apply to pair mode only")
    return _bt_ranking(rewards, labels, mask, center_rewards_coefficient)


def _bt_pairs(rewards_chosen, rewards_rejected, margin, soft_labels, eta: float | None) -> LossOutput:
    if rewards_chosen is None or rewards_rejected is None:
        raise ValueError("pair mode needs both rewards_chosen and rewards_rejected")
    rc = vec("rewards_chosen", rewards_chosen)
    rr = vec("rewards_rejected", rewards_rejected, rc.shape[0])
    d = rc - rr
    if margin is not None and soft_labels is not None:
        raise ValueError("margin and soft_labels cannot be combined")
    if margin is not None:
        d = d - vec("margin", margin, rc.shape[0])
    if soft_labels is not None:
        p = vec("soft_labels", soft_labels, rc.shape[0])
        if bool(((p < 0) | (p > 1)).any()):
            raise ValueError("soft_labels must lie in [0, 1]")
        losses = p * F.softplus(-d) + (1.0 - p) * F.softplus(d)
    else:
        losses = F.softplus(-d)
    if eta is not None:
        losses = losses + eta * (rc + rr) ** 2
    diff = (rc - rr).detach()
    metrics = {"accuracy": (diff > 0).to(diff.dtype).mean(), "margin": diff.mean()}
    metrics.update(_reward_stats(torch.cat((rc, rr))))
    return LossOutput(losses.mean(), losses, metrics)


def _bt_ranking(rewards, labels, mask, eta: float | None) -> LossOutput:
    if labels is None:
        raise ValueError("ranking mode needs labels [B, K] (higher is better)")
    r, y, m = _reward_lists(rewards, labels, mask)
    pairs = _pairs(y, m)
    d = r.unsqueeze(2) - r.unsqueeze(1)
    per_pair = F.softplus(-d)
    if eta is not None:
        per_pair = per_pair + eta * (r.unsqueeze(2) + r.unsqueeze(1)) ** 2
    n_pairs = pairs.sum((1, 2))
    losses = torch.where(pairs, per_pair, torch.zeros_like(per_pair)).sum((1, 2)) / n_pairs.clamp_min(1)
    has = n_pairs > 0
    loss = (losses * has).sum() / has.sum().clamp_min(1)
    return LossOutput(loss, losses, _pair_stats(d.detach(), pairs, r, m))


def _reward_lists(rewards, labels, mask):
    """``rewards`` and ``labels`` as ``[B, K]`` (labels in the rewards' float dtype) and the mask."""
    r = _as_list("rewards", rewards, mask)
    y = _as_list("labels", labels, mask, floating=False)
    if y.shape != r.shape:
        raise ValueError(f"labels has shape {tuple(y.shape)}, rewards has {tuple(r.shape)}")
    return r, _labels(y, r), _list_mask(mask, tuple(r.shape), r.device)


def _pair_stats(dd: torch.Tensor, pairs: torch.Tensor, r: torch.Tensor, m: torch.Tensor):
    """``accuracy`` / ``margin`` over the labelled pairs ``[B, K, K]`` and the reward stats."""
    total = pairs.sum().clamp_min(1).to(r.dtype)
    metrics = {
        "accuracy": (pairs & (dd > 0)).sum().to(r.dtype) / total,
        "margin": torch.where(pairs, dd, torch.zeros_like(dd)).sum() / total,
    }
    metrics.update(_reward_stats(r[m]))
    return metrics


def plackett_luce_loss(
    rewards: ListLike,
    labels: ListLike,
    *,
    mask: torch.Tensor | None = None,
    top_k: int | None = None,
) -> LossOutput:
    """Plackett–Luce listwise reward-model loss (Rafailov et al. 2023, arXiv:2305.18290, App. A.3);
    K = 2 is Bradley–Terry.

    ``ℓ_b = -Σ_k [r_τ(k) - LSE_{j≥k} r_τ(j)]`` with τ the ranking by ``labels`` ψ ``[B, K]``
    (higher is better, ties by position), ``rewards`` ``[B, K]``; ``mask`` ``[B, K]`` for unequal K,
    ``top_k`` keeps the first ``top_k`` terms (partial rankings). Suffix log-sum-exps never see a
    padded entry. Metrics: ``accuracy`` and ``margin`` (mean ``r_i - r_j``) over labelled pairs,
    reward stats.
    """
    r, y, m = _reward_lists(rewards, labels, mask)
    losses = _plackett_luce_nll(r, y, m, top_k)
    dd = (r.unsqueeze(2) - r.unsqueeze(1)).detach()
    return LossOutput(losses.mean(), losses, _pair_stats(dd, _pairs(y, m), r, m))
