"""Negative-only / unlearning losses (SPEC §10): NPO, SimNPO, D2O.

Inputs are per-sequence summed completion log-probs ``[B]`` of the responses to push down (the
"forget" set) and, for SimNPO, their token counts. An optional ``retain_loss`` (a scalar computed
on the retain set, e.g. ``alignops.cross_entropy`` for NPO-RT, SPEC §10.1) is added with weight
``retain_weight`` and broadcast into ``losses``. Reference log-probs are treated as constants
(detached). Arithmetic is float32 (float64 stays float64).

CRINGE / pairwise CRINGE (SPEC §10.4) is not here: its positive token ``s*`` is sampled from the
model's top-k next-token candidates, which the log-prob kernels do not return.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import LossOutput
from .listwise import _as_list, _list_mask
from .reference_free import _average, _counts, _scalar_loss, _vec

__all__ = ["npo_loss", "simnpo_loss", "d2o_loss"]


def _with_retain(losses: torch.Tensor, retain_loss: torch.Tensor | None, retain_weight: float):
    if retain_loss is None:
        return losses, None
    retain = _scalar_loss("retain_loss", retain_loss).to(losses)
    return losses + retain_weight * retain, retain.detach()


def npo_loss(
    policy_rejected_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    retain_loss: torch.Tensor | None = None,
    retain_weight: float = 1.0,
) -> LossOutput:
    """NPO (SPEC §10.1): ``ℓ = -(2/β) logσ(-βu) = (2/β) softplus(βu)``, ``u = S_θ - S_ref`` ``[B]``.

    As β → 0, ``ℓ - (2/β) ln 2 → u`` (gradient ascent on the forget set). β=0.1 is the paper's
    TOFU value from memory (unverified, SPEC §16.10). ``retain_loss`` gives NPO-RT.
    Metrics: ``rewards/rejected`` (mean βu), ``logps/rejected``, ``retain_loss``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    p = _vec("policy_rejected_logps", policy_rejected_logps)
    u = p - _vec("ref_rejected_logps", ref_rejected_logps, p.shape[0]).detach()
    losses, retain = _with_retain((2.0 / beta) * F.softplus(beta * u), retain_loss, retain_weight)
    metrics = {"rewards/rejected": (beta * u).detach().mean(), "logps/rejected": p.detach().mean()}
    if retain is not None:
        metrics["retain_loss"] = retain
    return LossOutput(losses.mean(), losses, metrics)


def simnpo_loss(
    policy_rejected_logps: torch.Tensor,
    *,
    rejected_lengths: torch.Tensor,
    beta: float = 2.5,
    gamma: float = 0.0,
    retain_loss: torch.Tensor | None = None,
    retain_weight: float = 1.0,
) -> LossOutput:
    """SimNPO (SPEC §10.2), reference-free: ``ℓ = -(2/β) logσ(-βA - γ) = (2/β) softplus(βA + γ)``.

    ``A = S/max(1, n)`` from summed log-probs ``[B]`` and counts ``[B]``. Unverified defaults
    (SPEC §16.10): β = 2.5, γ = 0 (the paper's TOFU setting from memory; γ is often 0).
    Metrics: ``rewards/rejected`` (mean βA), ``logps/rejected`` (mean A), ``retain_loss``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    s = _vec("policy_rejected_logps", policy_rejected_logps)
    a = _average(s, _counts("rejected_lengths", rejected_lengths, s.shape[0], s, "SimNPO averages log-probs"))
    losses, retain = _with_retain((2.0 / beta) * F.softplus(beta * a + gamma), retain_loss, retain_weight)
    metrics = {"rewards/rejected": (beta * a).detach().mean(), "logps/rejected": a.detach().mean()}
    if retain is not None:
        metrics["retain_loss"] = retain
    return LossOutput(losses.mean(), losses, metrics)


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
    """D2O, distributional dispreference optimisation (SPEC §10.3).

    Only a human negative ``y_l`` ``[B]``; K self-generated samples ``y_i`` ``[B, K]`` act as
    positives: ``ℓ = softplus(-((β/K) Σ_i u(y_i) - α u(y_l)))`` with ``u = S_θ - S_ref``. The two
    terms may use different reference models: pass each term's reference log-probs.
    ``mask`` ``[B, K]`` marks real samples (K then counts them per prompt). The exact form and the
    defaults are unverified (SPEC §16.11): β = α = 0.1 are placeholders, not the paper's values.
    Metrics: ``rewards/chosen`` (mean ``(β/K)Σu(y_i)``), ``rewards/rejected`` (mean ``α u(y_l)``),
    ``rewards/margins``, ``rewards/accuracies``.
    """
    p_s = _as_list("policy_sampled_logps", policy_sampled_logps, mask)
    r_s = _as_list("ref_sampled_logps", ref_sampled_logps, mask).detach()
    if r_s.shape != p_s.shape:
        raise ValueError(f"ref_sampled_logps has shape {tuple(r_s.shape)}, expected {tuple(p_s.shape)}")
    m = _list_mask(mask, tuple(p_s.shape), p_s.device)
    p_l = _vec("policy_rejected_logps", policy_rejected_logps, p_s.shape[0])
    u_l = p_l - _vec("ref_rejected_logps", ref_rejected_logps, p_s.shape[0]).detach()
    u_s = torch.where(m, p_s - r_s, torch.zeros_like(p_s))
    k = m.sum(1).clamp_min(1).to(u_s.dtype)
    pos = beta * u_s.sum(1) / k
    neg = alpha * u_l
    losses = F.softplus(-(pos - neg))
    cr, rr = pos.detach(), neg.detach()
    metrics = {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/margins": (cr - rr).mean(),
        "rewards/accuracies": (cr > rr).to(cr.dtype).mean(),
    }
    return LossOutput(losses.mean(), losses, metrics)
