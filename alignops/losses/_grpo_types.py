"""The GRPO loss types and importance-sampling levels, one small function each, and their
registries (``name -> function``) that :func:`alignops.losses.grpo_loss` dispatches on.

A level maps the per-token log-ratio ``d = logps - old_logps`` to ``log w``; a loss type maps the
:class:`GRPOTerms` of a batch to the per-token loss ``L [B, T]`` (before masks, KL and
aggregation, which ``grpo_loss`` applies). Papers and math: docs/losses.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ._tokens import Count, TokenBatch, clip_metrics, global_mean, high_entropy_mask, masked, per_row

# VESPO clamps (TRL ``get_gamma_weights``): per-token log-ratio to +-20, the sequence log-weight to
# [log 1e-8, 20] so exp() stays finite and log(w) of a vanishing weight stays bounded.
VESPO_TOKEN_LOG_RATIO_CLAMP = 20.0
VESPO_LOG_W_MIN = math.log(1e-8)
VESPO_LOG_W_MAX = 20.0
# Lower bound on VESPO's lambda (TRL): lambda = 0 would make phi(w) = w^k unnormalised.
VESPO_LAMBDA_MIN = 1e-4


@dataclass(frozen=True)
class SAPOOptions:
    """``loss_type="sapo"`` (Gao et al. 2025, arXiv:2511.20347): the gate temperatures for
    positive / negative advantages (TRL ``sapo_temperature_pos`` / ``_neg``, 1.0 / 1.05)."""

    temperature_pos: float = 1.0
    temperature_neg: float = 1.05


@dataclass(frozen=True)
class VESPOOptions:
    """``loss_type="vespo"`` (Shen et al. 2026, arXiv:2602.10693): the gamma kernel's ``(k, λ)``
    for ``A >= 0`` and ``A < 0`` (TRL ``vespo_{k,lambda}_{pos,neg}``, (2, 3) and (3, 2))."""

    k_pos: float = 2.0
    lambda_pos: float = 3.0
    k_neg: float = 3.0
    lambda_neg: float = 2.0


@dataclass(frozen=True)
class GRPOTerms:
    """What the loss types read: the batch ``tb``, advantages ``adv`` (``[B, 1]`` or ``[B, T]``),
    the token log-ratio ``log_ratio``, the importance ratio ``w`` of the chosen level, the sampler
    ratio ``is_ratio`` (1 at masked positions, or ``None``), the clip range ``(e_lo, e_hi, delta)``
    and the variant options; ``metrics`` collects what a type logs."""

    tb: TokenBatch
    adv: torch.Tensor
    log_ratio: torch.Tensor
    w: torch.Tensor
    is_ratio: torch.Tensor | None
    clip: tuple[float, float, float | None]
    sapo: SAPOOptions
    vespo: VESPOOptions
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# importance-sampling levels: d -> log w


def _token_level(tb: TokenBatch, d: torch.Tensor) -> torch.Tensor:
    """``w_t = exp(d_t)`` (GRPO)."""
    return d


def _sequence_level(tb: TokenBatch, d: torch.Tensor) -> torch.Tensor:
    """``w = exp(mean_t d_t)``, one ratio per sequence (GSPO, Zheng et al. 2025, arXiv:2507.18071)."""
    return (d * tb.m).sum(-1, keepdim=True) / tb.n_i.clamp(min=1)


def _sequence_token_level(tb: TokenBatch, d: torch.Tensor) -> torch.Tensor:
    """GSPO-token: the sequence ratio's value with each token's own gradient,
    ``w_t = sg(w) * exp(logps_t - sg(logps_t))``."""
    return tb.lp - tb.lp.detach() + _sequence_level(tb, d).detach()


LEVELS: dict[str, Callable[[TokenBatch, torch.Tensor], torch.Tensor]] = {
    "token": _token_level,
    "sequence": _sequence_level,
    "sequence_token": _sequence_token_level,
}
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = tuple(LEVELS)


def grpo_terms(tb: TokenBatch, advantages, level: str, is_ratio, *, clip, sapo, vespo) -> GRPOTerms:
    """Builds :class:`GRPOTerms`: advantages per row, the ratio of ``level``, the sampler ratio."""
    b, t = tb.shape
    log_ratio = tb.lp - tb.old
    if is_ratio is not None:
        is_ratio = per_row("importance_sampling_ratio", is_ratio, b, t, tb.dt)
        is_ratio = torch.where(tb.mb, is_ratio, torch.ones((), dtype=tb.dt, device=is_ratio.device))
    w = torch.exp(LEVELS[level](tb, log_ratio))
    adv = per_row("advantages", advantages, b, t, tb.dt)
    return GRPOTerms(tb, adv, log_ratio, w, is_ratio, clip, sapo, vespo)


# --------------------------------------------------------------------------------------------
# loss types: GRPOTerms -> per-token loss [B, T]


def clipped(g: GRPOTerms) -> torch.Tensor:
    """PPO's clipped surrogate ``-min(w' A, clip(w, 1 - e_lo, 1 + e_hi) A)``, ``w' = min(w, delta)``
    when ``delta`` is set (INTELLECT-2, arXiv:2505.07291). ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``,
    ``luspo`` share it and differ in the aggregation."""
    e_lo, e_hi, delta = g.clip
    w_unclipped = torch.clamp(g.w, max=delta) if delta is not None else g.w
    loss_t = -torch.minimum(w_unclipped * g.adv, torch.clamp(g.w, 1.0 - e_lo, 1.0 + e_hi) * g.adv)
    w_det = w_unclipped.detach()
    low = (w_det < 1 - e_lo) & (g.adv < 0)
    g.metrics.update(clip_metrics(low, (w_det > 1 + e_hi) & (g.adv > 0), g.tb.m))
    return loss_t


def cispo(g: GRPOTerms) -> torch.Tensor:
    """CISPO (MiniMax 2025, arXiv:2506.13585): ``-sg(min(w, e_hi)) A logps``."""
    e_hi = g.clip[1]
    g.metrics["cispo_clip_ratio"] = global_mean(((g.w > e_hi) & (g.adv > 0)).to(g.tb.dt), g.tb.m)
    return -torch.clamp(g.w, max=e_hi).detach() * g.adv * g.tb.lp


def sapo(g: GRPOTerms) -> torch.Tensor:
    """SAPO (Gao et al. 2025, arXiv:2511.20347): the soft gate ``-(4/τ) σ(τ (w - 1)) A``,
    ``τ = temperature_pos`` if ``A > 0`` else ``temperature_neg``."""
    pos, neg = g.adv.new_tensor(g.sapo.temperature_pos), g.adv.new_tensor(g.sapo.temperature_neg)
    tau = torch.where(g.adv > 0, pos, neg)
    return -torch.sigmoid(tau * (g.w - 1.0)) * 4.0 / tau * g.adv


def vespo(g: GRPOTerms) -> torch.Tensor:
    """VESPO (Shen et al. 2026, arXiv:2602.10693): ``-phi A logps`` with the detached gamma weight
    ``phi = exp(λ + k log w_s - λ w_s)`` of the clamped sequence ratio ``w_s`` (times the sampler
    ratio), ``(k, λ)`` by the sign of ``A``."""
    phi = _vespo_phi(g)
    g.metrics["vespo/phi_seq_mean"] = global_mean(phi, g.tb.m)
    return -phi * g.adv * g.tb.lp


@torch.no_grad()
def _vespo_phi(g: GRPOTerms) -> torch.Tensor:
    m, adv, o = g.tb.m, g.adv, g.vespo
    clamped = g.log_ratio.clamp(-VESPO_TOKEN_LOG_RATIO_CLAMP, VESPO_TOKEN_LOG_RATIO_CLAMP)
    seq = (clamped * m).sum(-1, keepdim=True)
    if g.is_ratio is not None:
        log_is = torch.log(g.is_ratio).clamp(VESPO_LOG_W_MIN, VESPO_LOG_W_MAX)
        seq = seq + (log_is * m).sum(-1, keepdim=True)
    log_w = seq.clamp(VESPO_LOG_W_MIN, VESPO_LOG_W_MAX)
    nonneg = adv >= 0
    k = torch.where(nonneg, adv.new_tensor(o.k_pos), adv.new_tensor(o.k_neg))
    lam = torch.where(nonneg, adv.new_tensor(o.lambda_pos), adv.new_tensor(o.lambda_neg))
    lam = lam.clamp(min=VESPO_LAMBDA_MIN)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


TOKEN_LOSSES: dict[str, Callable[[GRPOTerms], torch.Tensor]] = {
    "grpo": clipped,
    "bnpo": clipped,
    "dr_grpo": clipped,
    "dapo": clipped,
    "cispo": cispo,
    "sapo": sapo,
    "vespo": vespo,
    "luspo": clipped,
}


# --------------------------------------------------------------------------------------------
# masks applied after the per-token loss, and the aggregation of each loss type


def apply_masks(g: GRPOTerms, loss_t, *, threshold, sampling_logps, entropy, quantile, loss_type):
    """In TRL's order: the off-policy sequence mask, the high-entropy token mask and the sampler
    importance ratio (VESPO folds that ratio into its weight instead). Returns the masked per-token
    loss and the entropy mask (``None`` when ``quantile == 1``)."""
    tb = g.tb
    if threshold is not None:
        sampler = tb.old if sampling_logps is None else masked(sampling_logps, tb.mb, tb.dt)
        drift = torch.where(
            tb.mb, torch.nan_to_num(sampler - tb.lp.detach(), nan=0.0), torch.zeros_like(tb.lp)
        )
        mean_drift = (drift * tb.m).sum(-1, keepdim=True) / tb.n_i.clamp(min=1)
        loss_t = loss_t * ((g.adv >= 0) | (mean_drift <= threshold)).to(tb.dt)
    entropy_mask = None
    if quantile < 1.0:
        entropy_mask = high_entropy_mask(entropy, tb.mb, quantile, tb.dt)
        loss_t = loss_t * entropy_mask.to(tb.dt)
    if g.is_ratio is not None and loss_type != "vespo":
        loss_t = loss_t * g.is_ratio
    return loss_t, entropy_mask


class Normaliser(NamedTuple):
    """The counts the aggregations divide by (``None``: this micro-batch's own)."""

    num_items: Count | None
    num_sequences: Count | None
    max_completion_length: int | None


def _sequence_mean(losses: torch.Tensor, tb: TokenBatch, n: Normaliser) -> torch.Tensor:
    """``grpo``, ``sapo``: ``sum_i [sum_t m L / max(1, n_i)] / num_sequences``."""
    seqs = tb.shape[0] if n.num_sequences is None else n.num_sequences
    return (losses.sum(-1) / tb.n_i.squeeze(-1).clamp(min=1)).sum() / seqs


def _token_sum(losses: torch.Tensor, tb: TokenBatch, n: Normaliser) -> torch.Tensor:
    """``bnpo``, ``dapo``, ``cispo``, ``vespo``: ``sum m L / num_items``."""
    return losses.sum() / (tb.m.sum().clamp(min=1) if n.num_items is None else n.num_items)


def _dr_grpo(losses: torch.Tensor, tb: TokenBatch, n: Normaliser) -> torch.Tensor:
    """``dr_grpo``: ``sum m L / (num_sequences * max_completion_length)``."""
    seqs = tb.shape[0] if n.num_sequences is None else n.num_sequences
    return losses.sum() / (seqs * n.max_completion_length)


def _sequence_sum(losses: torch.Tensor, tb: TokenBatch, n: Normaliser) -> torch.Tensor:
    """``luspo``: ``sum_i sum_t m L / num_sequences``."""
    return losses.sum() / (tb.shape[0] if n.num_sequences is None else n.num_sequences)


AGGREGATIONS: dict[str, Callable[[torch.Tensor, TokenBatch, Normaliser], torch.Tensor]] = {
    "grpo": _sequence_mean,
    "sapo": _sequence_mean,
    "bnpo": _token_sum,
    "dapo": _token_sum,
    "cispo": _token_sum,
    "vespo": _token_sum,
    "dr_grpo": _dr_grpo,
    "luspo": _sequence_sum,
}
