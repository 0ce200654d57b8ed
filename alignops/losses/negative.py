"""Negative-only / unlearning losses: NPO, SimNPO, D2O.

Inputs are per-sequence summed completion log-probs ``[B]`` of the responses to push down (the
"forget" set) and, for SimNPO, their token counts. An optional ``retain_loss`` (a scalar computed
on the retain set, e.g. ``alignops.cross_entropy`` for NPO-RT) is added with weight
``retain_weight`` and broadcast into ``losses``. Reference log-probs are treated as constants
(detached). Arithmetic is float32 (float64 stays float64).

CRINGE / pairwise CRINGE (Adolphs et al. 2022, arXiv:2211.05826; Xu et al. 2023,
arXiv:2312.16682) is not here: its positive token ``s*`` is sampled from the
model's top-k next-token candidates, which the log-prob kernels do not return.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import scalar, vec
from ..kernels._common import check_number
from ._common import LossOutput, average, lengths, pair_metrics
from .listwise import _as_list, _list_mask

__all__ = ["npo_loss", "simnpo_loss", "d2o_loss"]


def _npo_output(z, reward, logps, *, beta: float, retain_loss, retain_weight: float) -> LossOutput:
    """``(2/β) softplus(z)`` per sequence, plus ``retain_weight · retain_loss`` when given (shared by
    NPO, ``z = βu``, and SimNPO, ``z = βA + γ``); ``reward`` and ``logps`` are logged."""
    losses = (2.0 / beta) * F.softplus(z)
    metrics = {"rewards/rejected": reward.detach().mean(), "logps/rejected": logps.detach().mean()}
    if retain_loss is not None:
        retain = scalar("retain_loss", retain_loss, losses)
        losses = losses + retain_weight * retain
        metrics["retain_loss"] = retain.detach()
    return LossOutput(losses.mean(), losses, metrics)


def npo_loss(
    policy_rejected_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    retain_loss: torch.Tensor | None = None,
    retain_weight: float = 1.0,
) -> LossOutput:
    """NPO (Zhang et al. 2024, "Negative Preference Optimization", arXiv:2404.05868):
    ``ℓ = -(2/β) logσ(-βu) = (2/β) softplus(βu)``, ``u = S_θ - S_ref`` ``[B]``.

    As β → 0, ``ℓ - (2/β) ln 2 → u`` (gradient ascent on the forget set). β=0.1 is the paper's
    TOFU value as we read it (not confirmed). ``retain_loss`` gives NPO-RT.
    Metrics: ``rewards/rejected`` (mean βu), ``logps/rejected``, ``retain_loss``.
    """
    check_number("beta", beta, lo=0.0, lo_open=True)
    p = vec("policy_rejected_logps", policy_rejected_logps)
    u = p - vec("ref_rejected_logps", ref_rejected_logps, p.shape[0]).detach()
    return _npo_output(beta * u, beta * u, p, beta=beta, retain_loss=retain_loss, retain_weight=retain_weight)


def simnpo_loss(
    policy_rejected_logps: torch.Tensor,
    *,
    rejected_lengths: torch.Tensor,
    beta: float = 2.5,
    gamma: float = 0.0,
    retain_loss: torch.Tensor | None = None,
    retain_weight: float = 1.0,
) -> LossOutput:
    """SimNPO (Fan et al. 2024, arXiv:2410.07163), reference-free:
    ``ℓ = -(2/β) logσ(-βA - γ) = (2/β) softplus(βA + γ)``.

    ``A = S/max(1, n)`` from summed log-probs ``[B]`` and counts ``[B]``. Defaults not
    confirmed from the paper: β = 2.5, γ = 0 (its TOFU setting as we read it; γ is often 0).
    Metrics: ``rewards/rejected`` (mean βA), ``logps/rejected`` (mean A), ``retain_loss``.
    """
    check_number("beta", beta, lo=0.0, lo_open=True)
    s = vec("policy_rejected_logps", policy_rejected_logps)
    a = average(s, lengths("rejected_lengths", rejected_lengths, s.shape[0], s, "SimNPO averages log-probs"))
    z = beta * a + gamma
    return _npo_output(z, beta * a, a, beta=beta, retain_loss=retain_loss, retain_weight=retain_weight)


def d2o_loss(
    policy_sampled_logps: torch.Tensor,
    ref_sampled_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 0.1,
    mask: torch.Tensor | None = None,
) -> LossOutput:
    """D2O, distributional dispreference optimisation (Duan et al. 2024, "Negating Negatives",
    arXiv:2403.03419).

    Only a human negative ``y_l`` ``[B]``; K self-generated samples ``y_i`` ``[B, K]`` act as
    positives: ``ℓ = softplus(-((β/K) Σ_i u(y_i) - α u(y_l)))`` with ``u = S_θ - S_ref``. The two
    terms may use different reference models: pass each term's reference log-probs.
    ``mask`` ``[B, K]`` marks real samples (K then counts them per prompt). The exact form and the
    defaults are not confirmed from the paper: β = α = 0.1 are placeholders, not the paper's values.
    Metrics: ``rewards/chosen`` (mean ``(β/K)Σu(y_i)``), ``rewards/rejected`` (mean ``α u(y_l)``),
    ``rewards/margins``, ``rewards/accuracies``.
    """
    p_s = _as_list("policy_sampled_logps", policy_sampled_logps, mask)
    r_s = _as_list("ref_sampled_logps", ref_sampled_logps, mask).detach()
    if r_s.shape != p_s.shape:
        raise ValueError(f"ref_sampled_logps has shape {tuple(r_s.shape)}, expected {tuple(p_s.shape)}")
    m = _list_mask(mask, tuple(p_s.shape), p_s.device)
    p_l = vec("policy_rejected_logps", policy_rejected_logps, p_s.shape[0])
    u_l = p_l - vec("ref_rejected_logps", ref_rejected_logps, p_s.shape[0]).detach()
    u_s = torch.where(m, p_s - r_s, torch.zeros_like(p_s))
    k = m.sum(1).clamp_min(1).to(u_s.dtype)
    pos = beta * u_s.sum(1) / k
    neg = alpha * u_l
    losses = F.softplus(-(pos - neg))
    return LossOutput(losses.mean(), losses, pair_metrics(pos, neg))
