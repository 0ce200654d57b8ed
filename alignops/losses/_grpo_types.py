"""The GRPO loss types and importance-sampling levels, one small function each, and their
registries (``name -> function``) that :func:`alignops.losses.grpo_loss` dispatches on.

A level maps the per-token log-ratio ``d = logps - old_logps`` to ``log w``; a loss type maps the
:class:`GRPOTerms` of a batch to the per-token loss ``L [B, T]`` (before masks, KL and
aggregation, which ``grpo_loss`` applies); :data:`DEFAULT_AGGREGATION` names the verl
aggregation mode each type uses unless ``loss_agg_mode`` says otherwise. Papers and math:
docs/losses.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .._checks import check_choice
from ._clip import (
    ClipCovOptions,
    ClipRange,
    KLCovOptions,
    clip_cov_selection,
    clipped_surrogate,
    kl_cov_selection,
    token_covariance,
)
from ._tokens import TokenBatch, clip_metrics, global_mean, high_entropy_mask, masked, per_row, token_mean

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
class CISPOOptions:
    """``loss_type="cispo"`` (MiniMax 2025, arXiv:2506.13585): both bounds of the detached importance
    weight, ``sg(clip(w, weight_min, weight_max))``. ``weight_max=None`` uses ``epsilon_high`` as
    the absolute cap (TRL's convention, ScaleRL recommends 5); ``weight_min=None``: no lower bound
    (the paper sets ``eps_low`` large). The paper's ``clip(w, 1 - eps_low, 1 + eps_high)`` is
    ``weight_min = 1 - eps_low``, ``weight_max = 1 + eps_high``."""

    weight_min: float | None = None
    weight_max: float | None = None

    def __post_init__(self) -> None:
        lo, hi = self.weight_min, self.weight_max
        if lo is not None and hi is not None and not lo <= hi:
            raise ValueError(f"CISPOOptions needs weight_min <= weight_max, got {lo}, {hi}")


#: The per-variant option classes ``grpo_loss`` accepts, by the keyword (and loss type) that reads them.
VARIANT_OPTIONS: dict[str, type] = {
    "sapo": SAPOOptions,
    "vespo": VESPOOptions,
    "cispo": CISPOOptions,
    "clip_cov": ClipCovOptions,
    "kl_cov": KLCovOptions,
}


@dataclass(frozen=True)
class GRPOTerms:
    """What the loss types read: the batch ``tb``, advantages ``adv`` (``[B, 1]`` or ``[B, T]``),
    the token log-ratio ``log_ratio``, the importance ratio ``w`` of the chosen level, the sampler
    ratio ``is_ratio`` (1 at masked positions, or ``None``), the :class:`ClipRange` and the
    variant options by name (:data:`VARIANT_OPTIONS`); ``metrics`` collects what a type logs."""

    tb: TokenBatch
    adv: torch.Tensor
    log_ratio: torch.Tensor
    w: torch.Tensor
    is_ratio: torch.Tensor | None
    clip: ClipRange
    options: Mapping[str, Any]
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


def grpo_terms(tb: TokenBatch, advantages, level: str, is_ratio, *, clip, options) -> GRPOTerms:
    """Builds :class:`GRPOTerms`: advantages per row, the ratio of ``level``, the sampler ratio."""
    b, t = tb.shape
    log_ratio = tb.lp - tb.old
    if is_ratio is not None:
        is_ratio = per_row("importance_sampling_ratio", is_ratio, b, t, tb.dt)
        is_ratio = torch.where(tb.mb, is_ratio, torch.ones((), dtype=tb.dt, device=is_ratio.device))
    w = torch.exp(LEVELS[level](tb, log_ratio))
    adv = per_row("advantages", advantages, b, t, tb.dt)
    return GRPOTerms(tb, adv, log_ratio, w, is_ratio, clip, options)


# --------------------------------------------------------------------------------------------
# loss types: GRPOTerms -> per-token loss [B, T]


def clipped(g: GRPOTerms) -> torch.Tensor:
    """PPO's clipped surrogate ``-min(w' A, clip(w, 1 - e_lo, 1 + e_hi) A)``, ``w' = min(w, delta)``
    when ``delta`` is set (INTELLECT-2, arXiv:2505.07291), bounded by ``-c A`` for ``A < 0`` with
    the dual-clip ``c`` (Ye et al. 2020, arXiv:1912.09729). ``grpo``, ``bnpo``, ``dr_grpo``,
    ``dapo``, ``luspo`` share it and differ in the aggregation."""
    s = clipped_surrogate(g.w, g.adv, g.clip)
    g.metrics.update(clip_metrics(s.low, s.high, g.tb.m))
    if g.clip.dual is not None:
        g.metrics["clip_ratio/dual_mean"] = global_mean(s.dual.to(g.tb.dt), g.tb.m)
    return s.loss


def cispo(g: GRPOTerms) -> torch.Tensor:
    """CISPO (MiniMax 2025, arXiv:2506.13585): ``-sg(clip(w, weight_min, weight_max)) A logps``
    (:class:`CISPOOptions`; by default TRL's ``-sg(min(w, e_hi)) A logps``)."""
    o: CISPOOptions = g.options["cispo"]
    hi = g.clip.high if o.weight_max is None else o.weight_max
    g.metrics["cispo_clip_ratio"] = global_mean(((g.w > hi) & (g.adv > 0)).to(g.tb.dt), g.tb.m)
    return -torch.clamp(g.w, min=o.weight_min, max=hi).detach() * g.adv * g.tb.lp


def clip_cov(g: GRPOTerms) -> torch.Tensor:
    """Clip-Cov (Cui et al. 2025, arXiv:2505.22617): the clipped surrogate with a random
    ``ratio`` of the tokens whose covariance lies in ``(lower, upper)`` detached (loss 0 there)."""
    s = clipped_surrogate(g.w, g.adv, g.clip)
    cov = token_covariance(g.tb.lp, g.adv, g.tb.mb)
    chosen = clip_cov_selection(cov, g.tb.mb, s.clipped, g.options["clip_cov"])
    g.metrics["clip_cov/detached_frac"] = token_mean(chosen.to(g.tb.dt), g.tb.m)
    g.metrics.update(clip_metrics(s.low, s.high, g.tb.m))
    return torch.where(chosen, torch.zeros_like(s.loss), s.loss)


def kl_cov(g: GRPOTerms) -> torch.Tensor:
    """KL-Cov (Cui et al. 2025, arXiv:2505.22617): the unclipped ``-w A`` plus
    ``coef * |logps - old_logps|`` on the top ``ratio`` of the tokens by covariance."""
    o: KLCovOptions = g.options["kl_cov"]
    chosen = kl_cov_selection(token_covariance(g.tb.lp, g.adv, g.tb.mb), g.tb.mb, o)
    g.metrics["kl_cov/penalised_frac"] = token_mean(chosen.to(g.tb.dt), g.tb.m)
    penalty = torch.where(chosen, o.coef * g.log_ratio.abs(), torch.zeros_like(g.log_ratio))
    return -g.w * g.adv + penalty


def sapo(g: GRPOTerms) -> torch.Tensor:
    """SAPO (Gao et al. 2025, arXiv:2511.20347): the soft gate ``-(4/τ) σ(τ (w - 1)) A``,
    ``τ = temperature_pos`` if ``A > 0`` else ``temperature_neg``."""
    o: SAPOOptions = g.options["sapo"]
    pos, neg = g.adv.new_tensor(o.temperature_pos), g.adv.new_tensor(o.temperature_neg)
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
    m, adv, o = g.tb.m, g.adv, g.options["vespo"]
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
    "clip_cov": clip_cov,
    "kl_cov": kl_cov,
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


#: The loss types built on PPO's clipped surrogate (they accept the dual-clip bound).
CLIPPED_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "clip_cov")


def check_grpo(loss_type: str, level: str, max_completion_length, loss_agg_mode, clip_ratio_c) -> None:
    """The loss type, level and the options that only some types accept."""
    hint = " (GMPO: use alignops.losses.gmpo_loss)" if loss_type == "gmpo" else ""
    check_choice("loss_type", loss_type, tuple(TOKEN_LOSSES), hint)
    check_choice("importance_sampling_level", level, IMPORTANCE_SAMPLING_LEVELS)
    if loss_type == "vespo" and level != "token":
        raise ValueError(
            "loss_type='vespo' computes its own sequence weight: use importance_sampling_level='token'"
        )
    if loss_type == "dr_grpo" and loss_agg_mode is None and max_completion_length is None:
        raise ValueError(
            "loss_type='dr_grpo' divides by B * max_completion_length: pass max_completion_length"
        )
    if clip_ratio_c is not None and loss_type not in CLIPPED_TYPES:
        raise ValueError(
            f"clip_ratio_c (dual-clip) applies to the clipped loss types {CLIPPED_TYPES}, not {loss_type!r}"
        )


#: verl's aggregation mode of each loss type (TRL's aggregations, :mod:`alignops.losses._aggregate`);
#: ``dr_grpo`` divides by ``max_completion_length``, which it requires.
DEFAULT_AGGREGATION: dict[str, str] = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "vespo": "token-mean",
    "clip_cov": "token-mean",
    "kl_cov": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "luspo": "seq-mean-token-sum",
}
