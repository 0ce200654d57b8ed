"""Policy-gradient losses on per-token log-probs: PPO / PPO-ptx, the GRPO family, GMPO, RLOO.

Shared SPEC §4 (KL estimators), §5.1-§5.6 (losses), §3.3 (``num_items`` for gradient accumulation).

Inputs are per-token log-probs ``[B, T]`` of sampled completions (``logps``: current policy, with
gradient; ``old_logps``: the policy that sampled, or ``None`` for on-policy ``logps.detach()``;
``ref_logps``: the reference), a completion mask ``[B, T]`` and advantages ``[B]`` (one per
completion) or ``[B, T]``. All math runs in float32 (float64 if an input is float64); bf16 / fp16
inputs are upcast. Masked positions never leak NaN / Inf into the loss or its gradient.

Each loss returns :class:`LossOutput`: ``loss`` (the reduced scalar), ``losses`` (token-level
losses: the per-token loss ``[B, T]`` before aggregation, zero at masked positions; sequence-level
losses: ``[B]``) and ``metrics`` (detached scalars, TRL's names).

Gradient accumulation (SPEC §3.3). Without ``num_items`` / ``num_sequences`` every loss is a
micro-batch quantity and the caller divides by the number of accumulation steps G. With them the
loss is already normalised for the whole accumulated batch (all micro-batches, all ranks): do not
divide again. ``num_items`` counts scored tokens, ``num_sequences`` counts completions; each
aggregation uses the one that matches its unit (see :func:`grpo_loss`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..rl import _check_choice, _compute_dtype, kl_estimate
from ._common import LossOutput

__all__ = ["gmpo_loss", "grpo_loss", "ppo_loss", "rloo_loss"]

GRPOLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"]
GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo")
# Loss types built on the PPO clipped surrogate -min(w A, clip(w) A).
_CLIPPED_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence", "sequence_token")
# VESPO clamps (TRL ``get_gamma_weights``): per-token log-ratio to +-20, the sequence log-weight to
# [log 1e-8, 20] so exp() stays finite and log(w) of a vanishing weight stays bounded.
VESPO_TOKEN_LOG_RATIO_CLAMP = 20.0
VESPO_LOG_W_MIN = math.log(1e-8)
VESPO_LOG_W_MAX = 20.0
# Lower bound on VESPO's lambda (TRL): lambda = 0 would make phi(w) = w^k unnormalised.
VESPO_LAMBDA_MIN = 1e-4

_Count = int | float | torch.Tensor


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_tokens(logps: torch.Tensor, **others: torch.Tensor | None) -> tuple[int, int]:
    if logps.dim() != 2:
        raise ValueError(f"logps must be [B, T], got shape {tuple(logps.shape)}")
    for name, t in others.items():
        if t is not None and tuple(t.shape) != tuple(logps.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [B, T] = {tuple(logps.shape)}")
    return logps.shape[0], logps.shape[1]


def _per_row(name: str, x: torch.Tensor, b: int, t: int, dt: torch.dtype) -> torch.Tensor:
    """``[B]`` -> ``[B, 1]``; ``[B, 1]`` and ``[B, T]`` pass through (broadcast over tokens)."""
    if x.shape == (b,):
        x = x.unsqueeze(1)
    if x.dim() != 2 or x.shape[0] != b or x.shape[1] not in (1, t):
        raise ValueError(f"{name} must be [B], [B, 1] or [B, T] with B={b}, T={t}; got {tuple(x.shape)}")
    return x.to(dt)


def _valid_mask(mask: torch.Tensor, mask_truncated: torch.Tensor | None, b: int) -> torch.Tensor:
    m = mask.bool()
    if mask_truncated is not None:
        if mask_truncated.shape != (b,):
            raise ValueError(f"mask_truncated must be [B] = ({b},), got {tuple(mask_truncated.shape)}")
        m = m & ~mask_truncated.bool().unsqueeze(1)
    return m


def _masked(x: torch.Tensor, m: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``x`` in ``dt`` with masked positions set to 0 (gradient only reaches valid positions)."""
    return torch.where(m, x.to(dt), torch.zeros((), dtype=dt, device=x.device))


def _token_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Masked token mean; 0 (not NaN) without valid tokens (SPEC §3.2)."""
    return (x * m).sum() / m.sum().clamp(min=1)


def _global_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """TRL's logging mean: per-sequence values ``[B, 1]`` average over sequences, ``[B, T]`` over tokens."""
    if x.shape[1] == 1:
        return x.sum() / x.shape[0]
    return _token_mean(x, m)


def _seq_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean ``[B]``, NaN for sequences without tokens (skipped by the nan-min / max)."""
    if x.shape[1] == 1:
        return x.squeeze(1)
    return (x * m).sum(-1) / m.sum(-1)


def _nanmin(x: torch.Tensor) -> torch.Tensor:
    nan = torch.isnan(x)
    out = torch.where(nan, torch.full_like(x, float("inf")), x).min()
    return torch.where(nan.all(), torch.full_like(out, float("nan")), out)


def _nanmax(x: torch.Tensor) -> torch.Tensor:
    return -_nanmin(-x)


def _ratio_stats(w: torch.Tensor, m: torch.Tensor, prefix: str = "ratio") -> dict[str, torch.Tensor]:
    """Mean / min / max of the importance ratio over valid tokens (or sequences, for ``[B, 1]``)."""
    w = w.detach()
    valid = torch.ones_like(w, dtype=torch.bool) if w.shape[1] == 1 else m.bool()
    inf = torch.full_like(w, float("inf"))
    lo = torch.where(valid, w, inf).min()
    hi = torch.where(valid, w, -inf).max()
    nan = torch.full_like(lo, float("nan"))
    return {
        f"{prefix}/mean": _global_mean(w, m),
        f"{prefix}/min": torch.where(torch.isinf(lo), nan, lo),
        f"{prefix}/max": torch.where(torch.isinf(hi), nan, hi),
    }


def _clip_metrics(
    is_low: torch.Tensor, is_high: torch.Tensor, m: torch.Tensor, dt
) -> dict[str, torch.Tensor]:
    low, high = is_low.to(dt), is_high.to(dt)
    region = (is_low | is_high).to(dt)
    return {
        "clip_ratio/low_mean": _global_mean(low, m),
        "clip_ratio/high_mean": _global_mean(high, m),
        "clip_ratio/region_mean": _global_mean(region, m),
        "clip_ratio/low_min": _nanmin(_seq_mean(low, m)),
        "clip_ratio/high_max": _nanmax(_seq_mean(high, m)),
    }


def _high_entropy_mask(entropy: torch.Tensor, m: torch.Tensor, quantile: float, dt) -> torch.Tensor:
    """Tokens whose entropy is >= the ``1 - top_entropy_quantile`` quantile of the valid tokens of
    this micro-batch (TRL gathers all ranks first). Selecting the valid tokens syncs with the host."""
    ent = _masked(entropy.detach(), m, dt)
    vals = ent[m]
    if vals.numel() == 0:
        return torch.zeros_like(m)
    thr = torch.quantile(vals, 1.0 - quantile)
    return (ent >= thr) & m


def _vespo_phi(log_ratio, m, adv, is_ratio, k_pos, lambda_pos, k_neg, lambda_neg) -> torch.Tensor:
    """VESPO's detached gamma weight phi(w) = exp(lambda + k log w - lambda w) (SPEC §5.3)."""
    with torch.no_grad():
        seq = (log_ratio.clamp(-VESPO_TOKEN_LOG_RATIO_CLAMP, VESPO_TOKEN_LOG_RATIO_CLAMP) * m).sum(
            -1, keepdim=True
        )
        if is_ratio is not None:
            log_is = torch.log(is_ratio).clamp(VESPO_LOG_W_MIN, VESPO_LOG_W_MAX)
            seq = seq + (log_is * m).sum(-1, keepdim=True)
        log_w = seq.clamp(VESPO_LOG_W_MIN, VESPO_LOG_W_MAX)
        nonneg = adv >= 0
        k = torch.where(nonneg, adv.new_tensor(k_pos), adv.new_tensor(k_neg))
        lam = torch.where(nonneg, adv.new_tensor(lambda_pos), adv.new_tensor(lambda_neg)).clamp(
            min=VESPO_LAMBDA_MIN
        )
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


# --------------------------------------------------------------------------------------------
# GRPO family (SPEC §5.3, §5.4)
# --------------------------------------------------------------------------------------------


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    loss_type: GRPOLossType = "dapo",
    importance_sampling_level: Literal["token", "sequence", "sequence_token"] = "token",
    use_bias_correction_kl: bool = True,
    kl_clamp: float | None = None,
    num_items: _Count | None = None,
    num_sequences: _Count | None = None,
    max_completion_length: int | None = None,
    mask_truncated: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    top_entropy_quantile: float = 1.0,
    off_policy_mask_threshold: float | None = None,
    sampling_logps: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> LossOutput:
    """GRPO-family policy loss on per-token log-probs (SPEC §5.3, §5.4; TRL ``GRPOTrainer._compute_loss``).

    Shapes: ``logps``, ``old_logps``, ``ref_logps``, ``completion_mask``, ``entropy``,
    ``sampling_logps``: ``[B, T]``; ``advantages``: ``[B]`` or ``[B, T]``; ``mask_truncated``:
    ``[B]`` bool; ``importance_sampling_ratio``: ``[B, T]``, ``[B, 1]`` or ``[B]``.

    Ratio (``importance_sampling_level``), with ``d_t = logps_t - old_logps_t``:
    ``"token"``: ``w_t = exp(d_t)``; ``"sequence"`` (GSPO): ``w = exp(mean_t d_t)`` per sequence;
    ``"sequence_token"`` (GSPO-token): ``w_t = sg(w) * exp(logps_t - sg(logps_t))``.
    ``old_logps=None`` means on-policy: ``old = logps.detach()`` (ratio 1, gradient ``A grad logp``).

    Per-token loss ``L_t`` by ``loss_type`` (``e_lo = epsilon``, ``e_hi = epsilon_high or epsilon``):

    * ``grpo | bnpo | dr_grpo | dapo | luspo``: ``-min(w' A, clip(w, 1 - e_lo, 1 + e_hi) A)`` with
      ``w' = min(w, delta)`` when ``delta`` is set (INTELLECT-2 two-sided clipping), else ``w``;
    * ``cispo``: ``-sg(min(w, e_hi)) A logps``;
    * ``sapo``: ``-(4 / tau) sigmoid(tau (w - 1)) A``, ``tau`` = ``sapo_temperature_pos`` if
      ``A > 0`` else ``sapo_temperature_neg``;
    * ``vespo``: ``-phi A logps`` with the detached gamma weight ``phi`` of the sequence ratio
      (token level only).

    Then, in TRL's order: times the off-policy sequence mask (``off_policy_mask_threshold``: keep a
    sequence if ``A >= 0`` or ``mean_t(sampling_logps - logps) <= threshold``; ``sampling_logps``
    defaults to ``old``), times the high-entropy token mask (``top_entropy_quantile < 1``, needs
    ``entropy``), times ``importance_sampling_ratio`` (sampler correction, see
    :func:`alignops.rl.sampling_importance_ratio`; for VESPO it enters ``phi`` instead), plus
    ``beta * k3_t`` with ``k3`` of ``log r = ref_logps - logps`` (times ``w`` when
    ``use_bias_correction_kl``; ``kl_clamp`` clamps ``log r`` first, default off as TRL).

    Aggregation with the mask ``m`` (``completion_mask``, rows in ``mask_truncated`` zeroed),
    ``n_i = sum_t m``; ``num_sequences`` defaults to ``B``, ``num_items`` to ``sum m`` (>= 1):

    * ``grpo``, ``sapo``: ``sum_i [sum_t m L / max(1, n_i)] / num_sequences``;
    * ``bnpo``, ``dapo``, ``cispo``, ``vespo``: ``sum m L / num_items`` (TRL's ``dapo`` uses
      ``num_items = num_items_in_batch / num_processes * GA / steps_per_generation``);
    * ``dr_grpo``: ``sum m L / (num_sequences * max_completion_length)`` (required);
    * ``luspo``: ``sum_i sum_t m L / num_sequences``.

    Entropy bonus (``entropy_coef``): ``loss -= entropy_coef * sum m' H / (num_items or sum m')``
    over ``m' = m`` times the high-entropy mask. Defaults as TRL 1.16 ``GRPOConfig``.

    Metrics: ``kl`` (mean ``k3`` as added to the loss, when ``ref_logps`` is given), ``entropy``,
    ``clip_ratio/{low_mean, high_mean, region_mean, low_min, high_max}`` (clipped types),
    ``cispo_clip_ratio``, ``vespo/phi_seq_mean``, ``ratio/{mean, min, max}``, ``policy_loss``
    (before the entropy bonus). Statistics are over this micro-batch.
    """
    hint = " (GMPO: use alignops.losses.gmpo_loss)" if loss_type == "gmpo" else ""
    _check_choice("loss_type", loss_type, GRPO_LOSS_TYPES, hint)
    _check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    if loss_type == "vespo" and importance_sampling_level != "token":
        raise ValueError(
            "loss_type='vespo' computes its own sequence weight: use importance_sampling_level='token'"
        )
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError(
            "loss_type='dr_grpo' divides by B * max_completion_length: pass max_completion_length"
        )
    if not 0.0 < top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_entropy_quantile}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps (the KL term is taken against the reference)")
    if (entropy_coef != 0.0 or top_entropy_quantile < 1.0) and entropy is None:
        raise ValueError("entropy_coef != 0 or top_entropy_quantile < 1 needs the per-token entropy")
    b, t = _check_tokens(
        logps,
        old_logps=old_logps,
        ref_logps=ref_logps,
        completion_mask=completion_mask,
        entropy=entropy,
        sampling_logps=sampling_logps,
    )
    dt = _compute_dtype(logps, old_logps, ref_logps, advantages)
    mb = _valid_mask(completion_mask, mask_truncated, b)
    m = mb.to(dt)
    n_i = m.sum(-1, keepdim=True)
    lp = _masked(logps, mb, dt)
    old = lp.detach() if old_logps is None else _masked(old_logps, mb, dt)
    adv = _per_row("advantages", advantages, b, t, dt)
    e_lo, e_hi = epsilon, (epsilon if epsilon_high is None else epsilon_high)

    log_ratio = lp - old
    if importance_sampling_level == "token":
        log_w = log_ratio
    elif importance_sampling_level == "sequence":
        log_w = (log_ratio * m).sum(-1, keepdim=True) / n_i.clamp(min=1)
    else:
        seq = ((log_ratio * m).sum(-1, keepdim=True) / n_i.clamp(min=1)).detach()
        log_w = lp - lp.detach() + seq
    w = torch.exp(log_w)

    per_token_kl = None
    if ref_logps is not None:
        per_token_kl = kl_estimate(lp, ref_logps.to(dt), kind="k3", mask=mb, clamp=kl_clamp)
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * w

    metrics: dict[str, torch.Tensor] = {}
    is_ratio = None
    if importance_sampling_ratio is not None:
        is_ratio = _per_row("importance_sampling_ratio", importance_sampling_ratio, b, t, dt)
        is_ratio = torch.where(mb, is_ratio, torch.ones((), dtype=dt, device=is_ratio.device))
    if loss_type == "cispo":
        loss_t = -torch.clamp(w, max=e_hi).detach() * adv * lp
        metrics["cispo_clip_ratio"] = _global_mean(((w > e_hi) & (adv > 0)).to(dt), m)
    elif loss_type in _CLIPPED_TYPES:
        clipped = torch.clamp(w, 1.0 - e_lo, 1.0 + e_hi)
        w_unclipped = torch.clamp(w, max=delta) if delta is not None else w
        loss_t = -torch.minimum(w_unclipped * adv, clipped * adv)
        w_det = w_unclipped.detach()
        metrics.update(_clip_metrics((w_det < 1 - e_lo) & (adv < 0), (w_det > 1 + e_hi) & (adv > 0), m, dt))
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, adv.new_tensor(sapo_temperature_pos), adv.new_tensor(sapo_temperature_neg))
        loss_t = -torch.sigmoid(tau * (w - 1.0)) * 4.0 / tau * adv
    else:  # vespo
        phi = _vespo_phi(
            log_ratio, m, adv, is_ratio, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg
        )
        loss_t = -phi * adv * lp
        metrics["vespo/phi_seq_mean"] = _global_mean(phi, m)

    if off_policy_mask_threshold is not None:
        sampler = old if sampling_logps is None else _masked(sampling_logps, mb, dt)
        drift = torch.where(mb, torch.nan_to_num(sampler - lp.detach(), nan=0.0), torch.zeros_like(lp))
        mean_drift = (drift * m).sum(-1, keepdim=True) / n_i.clamp(min=1)
        loss_t = loss_t * ((adv >= 0) | (mean_drift <= off_policy_mask_threshold)).to(dt)
    entropy_mask = None
    if top_entropy_quantile < 1.0:
        entropy_mask = _high_entropy_mask(entropy, mb, top_entropy_quantile, dt)
        loss_t = loss_t * entropy_mask.to(dt)
    if is_ratio is not None and loss_type != "vespo":
        loss_t = loss_t * is_ratio
    if beta != 0.0:
        loss_t = loss_t + beta * per_token_kl

    losses = loss_t * m  # [B, T]
    seqs = b if num_sequences is None else num_sequences
    if loss_type in ("grpo", "sapo"):
        loss = (losses.sum(-1) / n_i.squeeze(-1).clamp(min=1)).sum() / seqs
    elif loss_type == "dr_grpo":
        loss = losses.sum() / (seqs * max_completion_length)
    elif loss_type == "luspo":
        loss = losses.sum() / seqs
    else:  # bnpo, dapo, cispo, vespo
        loss = losses.sum() / (m.sum().clamp(min=1) if num_items is None else num_items)
    metrics["policy_loss"] = loss.detach()

    if entropy_coef != 0.0:
        eff = m if entropy_mask is None else m * entropy_mask.to(dt)
        ent = _masked(entropy, mb, dt)
        denom = eff.sum().clamp(min=1) if num_items is None else num_items
        loss = loss - entropy_coef * (ent * eff).sum() / denom

    if per_token_kl is not None:
        metrics["kl"] = _global_mean(per_token_kl.detach(), m)
    if entropy is not None:
        metrics["entropy"] = _token_mean(_masked(entropy.detach(), mb, dt), m)
    metrics.update(_ratio_stats(w, m))
    return LossOutput(loss, losses, metrics)


def gmpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.4,
    epsilon_high: float | None = None,
    kl_clamp: float | None = None,
    num_sequences: _Count | None = None,
    mask_truncated: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    top_entropy_quantile: float = 1.0,
) -> LossOutput:
    """GMPO: geometric mean of sign-aware log-space-clipped token ratios (SPEC §5.5; TRL ``GMPOTrainer``).

    ``logps``, ``old_logps``, ``ref_logps``, ``completion_mask``, ``entropy``: ``[B, T]``;
    ``advantages``: ``[B]``. With ``d_t = logps_t - old_logps_t`` and
    ``c_t = clamp(d_t, -epsilon, epsilon_high or epsilon)`` (log space: the ratio range is
    ``(e^-eps, e^eps_high)``, default 0.4 as the paper):
    ``c~_t = min(d_t, c_t)`` if ``A > 0`` else ``max(d_t, c_t)``,
    ``w_i = exp(sum_t m' c~_t / max(1, sum_t m'))`` (``m'`` = mask times the high-entropy mask when
    ``top_entropy_quantile < 1``), ``L_i = -w_i A_i + beta * mean_t k3`` (k3 of
    ``ref_logps - logps`` over ``m``), ``loss = sum_i L_i / (num_sequences or B)``.

    ``losses`` is ``[B]``. Metrics: ``kl``, ``entropy``, ``clip_ratio/*`` (fraction of valid tokens
    with ``d < -eps`` and ``A < 0`` / ``d > eps_high`` and ``A > 0``), ``ratio/*`` of ``w_i``.
    """
    if not 0.0 < top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_entropy_quantile}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps (the KL term is taken against the reference)")
    if top_entropy_quantile < 1.0 and entropy is None:
        raise ValueError("top_entropy_quantile < 1 needs the per-token entropy")
    b, t = _check_tokens(
        logps, old_logps=old_logps, ref_logps=ref_logps, completion_mask=completion_mask, entropy=entropy
    )
    if advantages.shape != (b,):
        raise ValueError(f"advantages must be [B] = ({b},), got {tuple(advantages.shape)}")
    dt = _compute_dtype(logps, old_logps, ref_logps, advantages)
    mb = _valid_mask(completion_mask, mask_truncated, b)
    m = mb.to(dt)
    lp = _masked(logps, mb, dt)
    old = lp.detach() if old_logps is None else _masked(old_logps, mb, dt)
    adv = advantages.to(dt).unsqueeze(1)
    e_lo, e_hi = epsilon, (epsilon if epsilon_high is None else epsilon_high)

    d = lp - old
    c = torch.clamp(d, min=-e_lo, max=e_hi)
    c_tilde = torch.where(adv > 0, torch.minimum(d, c), torch.maximum(d, c))
    seq_m = m
    if top_entropy_quantile < 1.0:
        seq_m = m * _high_entropy_mask(entropy, mb, top_entropy_quantile, dt).to(dt)
    log_w = (c_tilde * seq_m).sum(-1) / seq_m.sum(-1).clamp(min=1)
    w = torch.exp(log_w)
    losses = -w * adv.squeeze(1)

    metrics: dict[str, torch.Tensor] = {}
    if ref_logps is not None:
        per_token_kl = kl_estimate(lp, ref_logps.to(dt), kind="k3", mask=mb, clamp=kl_clamp)
        if beta != 0.0:
            losses = losses + beta * (per_token_kl * m).sum(-1) / m.sum(-1).clamp(min=1)
        metrics["kl"] = _token_mean(per_token_kl.detach(), m)
    loss = losses.sum() / (b if num_sequences is None else num_sequences)

    if entropy is not None:
        metrics["entropy"] = _token_mean(_masked(entropy.detach(), mb, dt), m)
    d_det = d.detach()
    metrics.update(_clip_metrics((d_det < -e_lo) & (adv < 0), (d_det > e_hi) & (adv > 0), m, dt))
    metrics.update(_ratio_stats(w.unsqueeze(1), m))
    return LossOutput(loss, losses, metrics)


# --------------------------------------------------------------------------------------------
# RLOO (SPEC §5.6)
# --------------------------------------------------------------------------------------------


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    num_sequences: _Count | None = None,
    mask_truncated: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> LossOutput:
    """RLOO / REINFORCE-LOO clipped loss on sequence log-probs (SPEC §5.6; TRL ``RLOOTrainer``).

    ``logps [B, T]`` (policy, per token), ``old_logps``: ``[B]`` summed sequence log-probs of the
    sampler (TRL's ``old_logps``), or ``[B, T]`` per token (summed here over the mask), or ``None``
    (on-policy). ``advantages [B]`` from :func:`alignops.rl.rloo_advantages` (the KL to the
    reference is folded into the reward there, k1 summed over the sequence).

    ``S = sum_t m logps``, ``rho = exp(S - S_old)``,
    ``L_i = -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A)``,
    ``loss = sum_i L_i / (num_sequences or B)``. On-policy this is the REINFORCE-LOO gradient.

    ``losses`` is ``[B]``. Metrics: ``entropy`` (token mean), ``clip_ratio/*`` (fractions of
    sequences), ``ratio/*``.
    """
    b, t = _check_tokens(logps, completion_mask=completion_mask, entropy=entropy)
    if advantages.shape != (b,):
        raise ValueError(f"advantages must be [B] = ({b},), got {tuple(advantages.shape)}")
    dt = _compute_dtype(logps, old_logps, advantages)
    mb = _valid_mask(completion_mask, mask_truncated, b)
    m = mb.to(dt)
    seq_logps = (_masked(logps, mb, dt) * m).sum(-1)
    if old_logps is None:
        seq_old = seq_logps.detach()
    elif old_logps.shape == (b,):
        seq_old = old_logps.to(dt)
    elif old_logps.shape == (b, t):
        seq_old = (_masked(old_logps, mb, dt) * m).sum(-1)
    else:
        raise ValueError(f"old_logps must be [B] or [B, T] = ({b}, {t}), got {tuple(old_logps.shape)}")
    adv = advantages.to(dt)
    e_lo, e_hi = epsilon, (epsilon if epsilon_high is None else epsilon_high)

    rho = torch.exp(seq_logps - seq_old)
    losses = -torch.minimum(rho * adv, torch.clamp(rho, 1.0 - e_lo, 1.0 + e_hi) * adv)
    loss = losses.sum() / (b if num_sequences is None else num_sequences)

    metrics: dict[str, torch.Tensor] = {}
    if entropy is not None:
        metrics["entropy"] = _token_mean(_masked(entropy.detach(), mb, dt), m)
    r = rho.detach().unsqueeze(1)
    a = adv.unsqueeze(1)
    metrics.update(_clip_metrics((r < 1 - e_lo) & (a < 0), (r > 1 + e_hi) & (a > 0), m, dt))
    metrics.update(_ratio_stats(r, m))
    return LossOutput(loss, losses, metrics)


# --------------------------------------------------------------------------------------------
# PPO / PPO-ptx (SPEC §5.1, §5.2)
# --------------------------------------------------------------------------------------------


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    value_mask: torch.Tensor | None = None,
    cliprange: float = 0.2,
    cliprange_value: float | None = 0.2,
    vf_coef: float = 0.1,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: Literal["k1", "k2", "k3"] = "k1",
    kl_clamp: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    ptx_nll: torch.Tensor | None = None,
    ptx_hidden: torch.Tensor | None = None,
    ptx_weight: torch.Tensor | None = None,
    ptx_labels: torch.Tensor | None = None,
    ptx_bias: torch.Tensor | None = None,
    ptx_softcap: float | None = None,
    ptx_ignore_index: int = -100,
    ptx_num_items: _Count | None = None,
    ptx_coef: float = 0.0,
    num_items: _Count | None = None,
    value_num_items: _Count | None = None,
) -> LossOutput:
    """PPO clipped surrogate + clipped value loss + KL / entropy / pretraining terms (SPEC §5.1-§5.2).

    ``logps``, ``old_logps`` (``None``: on-policy), ``mask``, ``ref_logps``, ``entropy``: ``[B, T]``;
    ``advantages``: ``[B, T]`` (e.g. whitened :func:`alignops.rl.compute_gae` output) or ``[B]``;
    ``values`` (new value-head output, with gradient), ``old_values`` (rollout), ``returns``,
    ``value_mask``: ``[B, T]`` (``value_mask`` defaults to ``mask``; TRL's covers one more
    position).

    ``rho_t = exp(logps_t - old_logps_t)``,
    ``pg_t = max(-A rho, -A clip(rho, 1 - cliprange, 1 + cliprange))``;
    ``V^c = clip(values, old_values - cliprange_value, old_values + cliprange_value)`` (no clip when
    ``cliprange_value`` is None), ``vf_t = max((values - R)^2, (V^c - R)^2)``;
    ``loss = mean_m pg + vf_coef * 0.5 * mean_vm vf + beta * mean_m kl - entropy_coef * mean_m H
    + ptx_coef * NLL_ptx``.

    TRL's PPO puts the KL to the reference into the reward (:func:`alignops.rl.ppo_rewards`,
    ``kl_coef=0.05``), not into the loss, hence ``beta=0`` here by default; ``beta > 0`` adds a
    per-token ``kl_estimator`` penalty of ``log r = ref_logps - logps`` (k1 / k2 / k3, SPEC §4) to
    the loss instead. ``entropy_coef`` is an entropy bonus (0 in TRL).

    PPO-ptx (InstructGPT, SPEC §5.1 + §3): ``ptx_coef`` (InstructGPT's gamma) times the
    pretraining NLL, either precomputed (``ptx_nll``, a scalar) or computed here by
    :func:`alignops.linear_cross_entropy` from ``ptx_hidden [M, H]``, ``ptx_weight [V, H]``,
    ``ptx_labels [M]`` (aligned to the hidden states, ``ptx_ignore_index`` skipped), token mean or
    ``/ ptx_num_items``.

    Means: ``mean_m x = sum m x / (num_items or sum m)``; the value term divides by
    ``value_num_items``, else ``num_items`` when no ``value_mask`` is given, else ``sum vm``.
    Counts are clamped to >= 1. ``losses``: ``[B, T]`` per-token ``pg + beta kl`` (zero at masked
    positions). Metrics (TRL names): ``loss/policy_avg``, ``loss/value_avg``, ``policy/clipfrac_avg``,
    ``val/clipfrac_avg``, ``policy/approxkl_avg`` (``mean 0.5 (logps - old)^2`` over ``m``),
    ``val/ratio``, ``policy/entropy_avg``, ``entropy``, ``kl``, ``loss/ptx``,
    ``clip_ratio/{low,high,region}_mean``, ``ratio/{mean,min,max}``.
    """
    _check_choice("kl_estimator", kl_estimator, ("k1", "k2", "k3"))
    b, t = _check_tokens(
        logps,
        old_logps=old_logps,
        mask=mask,
        ref_logps=ref_logps,
        entropy=entropy,
        values=values,
        old_values=old_values,
        returns=returns,
        value_mask=value_mask,
    )
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps (the KL term is taken against the reference)")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs the per-token entropy")
    if values is not None and (returns is None or (old_values is None and cliprange_value is not None)):
        raise ValueError("the value loss needs values, returns and (with cliprange_value) old_values")
    ptx_given = ptx_nll is not None or ptx_hidden is not None
    if ptx_nll is not None and ptx_hidden is not None:
        raise ValueError("pass either ptx_nll or ptx_hidden / ptx_weight / ptx_labels, not both")
    if ptx_hidden is not None and (ptx_weight is None or ptx_labels is None):
        raise ValueError("the PPO-ptx term needs ptx_hidden, ptx_weight and ptx_labels")
    if ptx_given and ptx_coef == 0.0:
        raise ValueError(
            "a pretraining batch was given but ptx_coef is 0: set ptx_coef (InstructGPT's gamma)"
        )

    dt = _compute_dtype(logps, old_logps, ref_logps, advantages, values)
    mb = mask.bool()
    m = mb.to(dt)
    lp = _masked(logps, mb, dt)
    old = lp.detach() if old_logps is None else _masked(old_logps, mb, dt)
    adv = _per_row("advantages", advantages, b, t, dt)
    n_pol = m.sum().clamp(min=1) if num_items is None else num_items

    d = lp - old
    rho = torch.exp(d)
    pg1 = -adv * rho
    pg2 = -adv * torch.clamp(rho, 1.0 - cliprange, 1.0 + cliprange)
    pg_t = torch.maximum(pg1, pg2)
    loss_t = pg_t
    pg_loss = (pg_t * m).sum() / n_pol
    loss = pg_loss

    metrics: dict[str, torch.Tensor] = {"loss/policy_avg": pg_loss.detach()}
    if ref_logps is not None:
        kl_t = kl_estimate(lp, ref_logps.to(dt), kind=kl_estimator, mask=mb, clamp=kl_clamp)
        if beta != 0.0:
            loss_t = loss_t + beta * kl_t
            loss = loss + beta * (kl_t * m).sum() / n_pol
        metrics["kl"] = _token_mean(kl_t.detach(), m)

    if values is not None:
        vmb = mb if value_mask is None else value_mask.bool()
        vm = vmb.to(dt)
        v = _masked(values, vmb, dt)
        ret = _masked(returns, vmb, dt)
        vf1 = (v - ret) ** 2
        if cliprange_value is not None:
            v_old = _masked(old_values, vmb, dt)
            v_clip = torch.clamp(v, v_old - cliprange_value, v_old + cliprange_value)
            vf2 = (v_clip - ret) ** 2
        else:
            vf2 = vf1
        vf_t = torch.maximum(vf1, vf2)
        if value_num_items is not None:
            n_val = value_num_items
        elif value_mask is None and num_items is not None:
            n_val = num_items
        else:
            n_val = vm.sum().clamp(min=1)
        vf_loss = 0.5 * (vf_t * vm).sum() / n_val
        loss = loss + vf_coef * vf_loss
        metrics["loss/value_avg"] = vf_loss.detach()
        metrics["val/clipfrac_avg"] = _token_mean((vf2 > vf1).to(dt), vm)

    if entropy is not None:
        ent = _masked(entropy, mb, dt)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * (ent * m).sum() / n_pol
        metrics["entropy"] = metrics["policy/entropy_avg"] = _token_mean(ent.detach(), m)

    if ptx_given:
        if ptx_nll is None:
            from .. import linear_cross_entropy  # public fused engine, resolved at call time

            ptx_nll = linear_cross_entropy(
                ptx_hidden,
                ptx_weight,
                ptx_labels,
                bias=ptx_bias,
                ignore_index=ptx_ignore_index,
                reduction="mean",
                softcap=ptx_softcap,
                num_items=ptx_num_items,
            )
        loss = loss + ptx_coef * ptx_nll.to(dt)
        metrics["loss/ptx"] = ptx_nll.detach().to(dt)

    r = rho.detach()
    metrics["policy/clipfrac_avg"] = _token_mean((pg2 > pg1).to(dt), m)
    metrics["policy/approxkl_avg"] = _token_mean(0.5 * d.detach() ** 2, m)
    metrics["val/ratio"] = _token_mean(r, m)
    metrics.update(_clip_metrics((r < 1 - cliprange) & (adv < 0), (r > 1 + cliprange) & (adv > 0), m, dt))
    metrics.update(_ratio_stats(rho, m))
    return LossOutput(loss, loss_t * m, metrics)
