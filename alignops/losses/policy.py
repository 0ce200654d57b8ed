"""Policy-gradient losses on per-token log-probs: the GRPO family, GMPO, RLOO, PPO / PPO-ptx.

Inputs are per-token log-probs ``[B, T]`` of sampled completions (``logps``: current policy, with
gradient; ``old_logps``: the policy that sampled, or ``None`` for on-policy ``logps.detach()``;
``ref_logps``: the reference), a completion mask ``[B, T]`` and advantages ``[B]`` (one per
completion) or ``[B, T]`` (from :mod:`alignops.rl`: :func:`~alignops.rl.group_advantages`,
:func:`~alignops.rl.rloo_advantages`, :func:`~alignops.rl.compute_gae`). All math runs in float32
(float64 if an input is float64); bf16 / fp16 inputs are upcast. Masked positions never leak NaN /
Inf into the loss or its gradient. The KL estimators are :func:`alignops.rl.kl_estimate`'s.

Each loss returns :class:`LossOutput`: ``loss`` (the reduced scalar), ``losses`` (token-level
losses: the per-token loss ``[B, T]`` before aggregation, zero at masked positions; sequence-level
losses: ``[B]``) and ``metrics`` (detached scalars, TRL's names).

Gradient accumulation. Without ``num_items`` / ``num_sequences`` every loss is a micro-batch
quantity and the caller divides by the number of accumulation steps G. With them the loss is
already normalised for the whole accumulated batch (all micro-batches, all ranks): do not divide
again (the ``num_items_in_batch`` fix of transformers' ``Trainer``). ``num_items`` counts scored
tokens, ``num_sequences`` counts completions; each aggregation uses the one that matches its unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .._checks import check_choice, scalar
from ..rl import kl_estimate
from ._common import LossOutput
from ._grpo_types import (
    AGGREGATIONS,
    IMPORTANCE_SAMPLING_LEVELS,
    TOKEN_LOSSES,
    Normaliser,
    SAPOOptions,
    VESPOOptions,
    apply_masks,
    grpo_terms,
)
from ._tokens import (
    Count,
    TokenBatch,
    check_policy_options,
    check_tokens,
    clip_metrics,
    high_entropy_mask,
    masked,
    normalised_sum,
    per_row,
    ratio_stats,
    token_batch,
    token_mean,
)

__all__ = [
    "GRPO_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "SAPOOptions",
    "VESPOOptions",
    "gmpo_loss",
    "grpo_loss",
    "ppo_loss",
    "rloo_loss",
]

GRPO_LOSS_TYPES: tuple[str, ...] = tuple(TOKEN_LOSSES)
GRPOLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"]


def _entropy_mean(entropy: torch.Tensor, tb: TokenBatch) -> torch.Tensor:
    return token_mean(masked(entropy.detach(), tb.mb, tb.dt), tb.m)


def _k3(tb: TokenBatch, ref_logps: torch.Tensor, kl_clamp: float | None) -> torch.Tensor:
    """Per-token k3 of ``log r = ref_logps - logps`` (GRPO / GMPO's KL penalty), 0 where masked."""
    return kl_estimate(tb.lp, ref_logps.to(tb.dt), kind="k3", mask=tb.mb, clamp=kl_clamp)


# --------------------------------------------------------------------------------------------
# GRPO family


def _check_grpo(loss_type: str, level: str, max_completion_length: int | None) -> None:
    hint = " (GMPO: use alignops.losses.gmpo_loss)" if loss_type == "gmpo" else ""
    check_choice("loss_type", loss_type, GRPO_LOSS_TYPES, hint)
    check_choice("importance_sampling_level", level, IMPORTANCE_SAMPLING_LEVELS)
    if loss_type == "vespo" and level != "token":
        raise ValueError(
            "loss_type='vespo' computes its own sequence weight: use importance_sampling_level='token'"
        )
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError(
            "loss_type='dr_grpo' divides by B * max_completion_length: pass max_completion_length"
        )


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
    num_items: Count | None = None,
    num_sequences: Count | None = None,
    max_completion_length: int | None = None,
    mask_truncated: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    top_entropy_quantile: float = 1.0,
    off_policy_mask_threshold: float | None = None,
    sampling_logps: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    sapo: SAPOOptions | None = None,
    vespo: VESPOOptions | None = None,
) -> LossOutput:
    """GRPO-family policy loss on per-token log-probs (TRL ``GRPOTrainer._compute_loss``).

    GRPO: Shao et al. 2024 (DeepSeekMath), arXiv:2402.03300. Variants: ``dapo`` (Yu et al. 2025,
    arXiv:2503.14476), ``dr_grpo`` (Liu et al. 2025, arXiv:2503.20783), ``bnpo``, ``cispo``
    (MiniMax 2025, arXiv:2506.13585), ``sapo`` (Gao et al. 2025, arXiv:2511.20347), ``vespo``
    (Shen et al. 2026, arXiv:2602.10693), ``luspo`` (Liu et al. 2026, arXiv:2602.05261); sequence
    ratio GSPO (Zheng et al. 2025, arXiv:2507.18071); ``delta``: INTELLECT-2 two-sided clipping
    (Prime Intellect 2025, arXiv:2505.07291). The per-type and per-level functions are in
    :mod:`alignops.losses._grpo_types`; the math is in docs/losses.md.

    Shapes: ``logps``, ``old_logps``, ``ref_logps``, ``completion_mask``, ``entropy``,
    ``sampling_logps``: ``[B, T]``; ``advantages``: ``[B]`` or ``[B, T]``; ``mask_truncated``:
    ``[B]`` bool; ``importance_sampling_ratio``: ``[B, T]``, ``[B, 1]`` or ``[B]``.

    Ratio (``importance_sampling_level``), with ``d_t = logps_t - old_logps_t``:
    ``"token"``: ``w_t = exp(d_t)``; ``"sequence"`` (GSPO): ``w = exp(mean_t d_t)`` per sequence;
    ``"sequence_token"`` (GSPO-token): ``w_t = sg(w) * exp(logps_t - sg(logps_t))``.
    ``old_logps=None`` means on-policy: ``old = logps.detach()`` (ratio 1, gradient ``A grad logp``).

    Per-token loss ``L_t`` by ``loss_type`` (``e_lo = epsilon``, ``e_hi = epsilon_high or epsilon``):

    * ``grpo | bnpo | dr_grpo | dapo | luspo``: ``-min(w' A, clip(w, 1 - e_lo, 1 + e_hi) A)`` with
      ``w' = min(w, delta)`` when ``delta`` is set, else ``w``;
    * ``cispo``: ``-sg(min(w, e_hi)) A logps``;
    * ``sapo``: ``-(4 / tau) sigmoid(tau (w - 1)) A``, ``tau`` = ``sapo.temperature_pos`` if
      ``A > 0`` else ``sapo.temperature_neg`` (:class:`SAPOOptions`, TRL's 1.0 / 1.05);
    * ``vespo``: ``-phi A logps`` with the detached gamma weight ``phi`` of the sequence ratio
      (token level only; :class:`VESPOOptions` holds TRL's ``vespo_{k,lambda}_{pos,neg}``).

    Then, in TRL's order: times the off-policy sequence mask (``off_policy_mask_threshold``: keep a
    sequence if ``A >= 0`` or ``mean_t(sampling_logps - logps) <= threshold``; ``sampling_logps``
    defaults to ``old``; DeepSeek-AI 2025, arXiv:2512.02556), times the high-entropy token mask
    (``top_entropy_quantile < 1``, needs ``entropy``), times ``importance_sampling_ratio`` (sampler
    correction, :func:`alignops.rl.sampling_importance_ratio`; for VESPO it enters ``phi``), plus
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
    _check_grpo(loss_type, importance_sampling_level, max_completion_length)
    check_policy_options(
        beta=beta,
        ref_logps=ref_logps,
        entropy=entropy,
        top_entropy_quantile=top_entropy_quantile,
        entropy_coef=entropy_coef,
    )
    check_tokens(
        logps,
        old_logps=old_logps,
        ref_logps=ref_logps,
        completion_mask=completion_mask,
        entropy=entropy,
        sampling_logps=sampling_logps,
    )
    tb = token_batch(
        logps, old_logps, completion_mask, mask_truncated=mask_truncated, dtype_of=(ref_logps, advantages)
    )
    e_hi = epsilon if epsilon_high is None else epsilon_high
    g = grpo_terms(
        tb,
        advantages,
        importance_sampling_level,
        importance_sampling_ratio,
        clip=(epsilon, e_hi, delta),
        sapo=sapo or SAPOOptions(),
        vespo=vespo or VESPOOptions(),
    )
    loss_t = TOKEN_LOSSES[loss_type](g)
    loss_t, entropy_mask = apply_masks(
        g,
        loss_t,
        threshold=off_policy_mask_threshold,
        sampling_logps=sampling_logps,
        entropy=entropy,
        quantile=top_entropy_quantile,
        loss_type=loss_type,
    )
    per_token_kl = None
    if ref_logps is not None:
        per_token_kl = _k3(tb, ref_logps, kl_clamp) * (g.w if use_bias_correction_kl else 1.0)
        if beta != 0.0:
            loss_t = loss_t + beta * per_token_kl
    losses = loss_t * tb.m  # [B, T]
    loss = AGGREGATIONS[loss_type](losses, tb, Normaliser(num_items, num_sequences, max_completion_length))
    metrics = g.metrics
    metrics["policy_loss"] = loss.detach()
    if entropy_coef != 0.0:
        eff = tb.m if entropy_mask is None else tb.m * entropy_mask.to(tb.dt)
        loss = loss - entropy_coef * normalised_sum(masked(entropy, tb.mb, tb.dt), eff, num_items)
    if per_token_kl is not None:
        metrics["kl"] = token_mean(per_token_kl.detach(), tb.m)
    if entropy is not None:
        metrics["entropy"] = _entropy_mean(entropy, tb)
    metrics.update(ratio_stats(g.w, tb.m))
    return LossOutput(loss, losses, metrics)


# --------------------------------------------------------------------------------------------
# GMPO


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
    num_sequences: Count | None = None,
    mask_truncated: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    top_entropy_quantile: float = 1.0,
) -> LossOutput:
    """GMPO: geometric mean of sign-aware log-space-clipped token ratios (Zhao et al. 2025,
    "Geometric-Mean Policy Optimization", arXiv:2507.20673; TRL ``experimental.gmpo.GMPOTrainer``).

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
    check_policy_options(
        beta=beta, ref_logps=ref_logps, entropy=entropy, top_entropy_quantile=top_entropy_quantile
    )
    b, _ = check_tokens(
        logps, old_logps=old_logps, ref_logps=ref_logps, completion_mask=completion_mask, entropy=entropy
    )
    if advantages.shape != (b,):
        raise ValueError(f"advantages must be [B] = ({b},), got {tuple(advantages.shape)}")
    tb = token_batch(
        logps, old_logps, completion_mask, mask_truncated=mask_truncated, dtype_of=(ref_logps, advantages)
    )
    adv = advantages.to(tb.dt).unsqueeze(1)
    e_lo, e_hi = epsilon, (epsilon if epsilon_high is None else epsilon_high)

    d = tb.lp - tb.old
    c = torch.clamp(d, min=-e_lo, max=e_hi)
    c_tilde = torch.where(adv > 0, torch.minimum(d, c), torch.maximum(d, c))
    seq_m = tb.m
    if top_entropy_quantile < 1.0:
        seq_m = tb.m * high_entropy_mask(entropy, tb.mb, top_entropy_quantile, tb.dt).to(tb.dt)
    w = torch.exp((c_tilde * seq_m).sum(-1) / seq_m.sum(-1).clamp(min=1))
    losses = -w * adv.squeeze(1)

    metrics: dict[str, torch.Tensor] = {}
    if ref_logps is not None:
        per_token_kl = _k3(tb, ref_logps, kl_clamp)
        if beta != 0.0:
            losses = losses + beta * (per_token_kl * tb.m).sum(-1) / tb.n_i.squeeze(-1).clamp(min=1)
        metrics["kl"] = token_mean(per_token_kl.detach(), tb.m)
    loss = losses.sum() / (b if num_sequences is None else num_sequences)
    if entropy is not None:
        metrics["entropy"] = _entropy_mean(entropy, tb)
    d_det = d.detach()
    metrics.update(clip_metrics((d_det < -e_lo) & (adv < 0), (d_det > e_hi) & (adv > 0), tb.m))
    metrics.update(ratio_stats(w.unsqueeze(1), tb.m))
    return LossOutput(loss, losses, metrics)


# --------------------------------------------------------------------------------------------
# RLOO


def _sequence_old_logps(old_logps: torch.Tensor | None, tb: TokenBatch, seq_logps: torch.Tensor):
    b, t = tb.shape
    if old_logps is None:
        return seq_logps.detach()
    if old_logps.shape == (b,):
        return old_logps.to(tb.dt)
    if old_logps.shape == (b, t):
        return (masked(old_logps, tb.mb, tb.dt) * tb.m).sum(-1)
    raise ValueError(f"old_logps must be [B] or [B, T] = ({b}, {t}), got {tuple(old_logps.shape)}")


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    num_sequences: Count | None = None,
    mask_truncated: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> LossOutput:
    """RLOO / REINFORCE-LOO clipped loss on sequence log-probs (Ahmadian et al. 2024, "Back to
    Basics", arXiv:2402.14740; TRL ``RLOOTrainer``).

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
    b, _ = check_tokens(logps, completion_mask=completion_mask, entropy=entropy)
    if advantages.shape != (b,):
        raise ValueError(f"advantages must be [B] = ({b},), got {tuple(advantages.shape)}")
    tb = token_batch(
        logps, None, completion_mask, mask_truncated=mask_truncated, dtype_of=(old_logps, advantages)
    )
    seq_logps = (tb.lp * tb.m).sum(-1)
    seq_old = _sequence_old_logps(old_logps, tb, seq_logps)
    adv = advantages.to(tb.dt)
    e_lo, e_hi = epsilon, (epsilon if epsilon_high is None else epsilon_high)

    rho = torch.exp(seq_logps - seq_old)
    losses = -torch.minimum(rho * adv, torch.clamp(rho, 1.0 - e_lo, 1.0 + e_hi) * adv)
    loss = losses.sum() / (b if num_sequences is None else num_sequences)

    metrics: dict[str, torch.Tensor] = {}
    if entropy is not None:
        metrics["entropy"] = _entropy_mean(entropy, tb)
    r = rho.detach().unsqueeze(1)
    a = adv.unsqueeze(1)
    metrics.update(clip_metrics((r < 1 - e_lo) & (a < 0), (r > 1 + e_hi) & (a > 0), tb.m))
    metrics.update(ratio_stats(r, tb.m))
    return LossOutput(loss, losses, metrics)


# --------------------------------------------------------------------------------------------
# PPO / PPO-ptx


@dataclass
class _PPOParts:
    """The terms of one PPO loss as they are added up, and the metrics they log."""

    loss: torch.Tensor
    per_token: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _ppo_policy(tb: TokenBatch, adv: torch.Tensor, cliprange: float, num_items: Count | None) -> _PPOParts:
    """PPO's clipped surrogate ``pg_t = max(-A rho, -A clip(rho, 1 - eps, 1 + eps))``."""
    d = tb.lp - tb.old
    rho = torch.exp(d)
    pg1 = -adv * rho
    pg2 = -adv * torch.clamp(rho, 1.0 - cliprange, 1.0 + cliprange)
    pg_t = torch.maximum(pg1, pg2)
    pg_loss = normalised_sum(pg_t, tb.m, num_items)
    r = rho.detach()
    metrics = {
        "loss/policy_avg": pg_loss.detach(),
        "policy/clipfrac_avg": token_mean((pg2 > pg1).to(tb.dt), tb.m),
        "policy/approxkl_avg": token_mean(0.5 * d.detach() ** 2, tb.m),
        "val/ratio": token_mean(r, tb.m),
    }
    metrics.update(clip_metrics((r < 1 - cliprange) & (adv < 0), (r > 1 + cliprange) & (adv > 0), tb.m))
    metrics.update(ratio_stats(rho, tb.m))
    return _PPOParts(pg_loss, pg_t, metrics)


def _ppo_value(tb: TokenBatch, values, old_values, returns, value_mask, cliprange_value, counts) -> _PPOParts:
    """``0.5 * mean_vm max((V - R)^2, (V_clip - R)^2)``, ``V_clip`` within ``cliprange_value`` of
    the rollout values; ``counts = (num_items, value_num_items)``."""
    num_items, value_num_items = counts
    vmb = tb.mb if value_mask is None else value_mask.bool()
    vm = vmb.to(tb.dt)
    v, ret = masked(values, vmb, tb.dt), masked(returns, vmb, tb.dt)
    vf1 = (v - ret) ** 2
    vf2 = vf1
    if cliprange_value is not None:
        v_old = masked(old_values, vmb, tb.dt)
        vf2 = (torch.clamp(v, v_old - cliprange_value, v_old + cliprange_value) - ret) ** 2
    if value_num_items is not None:
        n_val = value_num_items
    elif value_mask is None and num_items is not None:
        n_val = num_items
    else:
        n_val = vm.sum().clamp(min=1)
    vf_loss = 0.5 * (torch.maximum(vf1, vf2) * vm).sum() / n_val
    metrics = {"loss/value_avg": vf_loss.detach(), "val/clipfrac_avg": token_mean((vf2 > vf1).to(tb.dt), vm)}
    return _PPOParts(vf_loss, torch.maximum(vf1, vf2), metrics)


def _check_ppo(*, values, returns, old_values, cliprange_value, ptx_nll, ptx_coef) -> None:
    if values is not None and (returns is None or (old_values is None and cliprange_value is not None)):
        raise ValueError("the value loss needs values, returns and (with cliprange_value) old_values")
    if ptx_nll is not None and ptx_coef == 0.0:
        raise ValueError(
            "a pretraining NLL (ptx_nll) was given but ptx_coef is 0: set ptx_coef (InstructGPT's gamma)"
        )


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
    ptx_nll: torch.Tensor | float | None = None,
    ptx_coef: float = 0.0,
    num_items: Count | None = None,
    value_num_items: Count | None = None,
) -> LossOutput:
    """PPO clipped surrogate + clipped value loss + KL / entropy / pretraining terms.

    PPO: Schulman et al. 2017, arXiv:1707.06347; for language models and PPO-ptx: InstructGPT,
    Ouyang et al. 2022, arXiv:2203.02155, Eq. 2; TRL ``experimental.ppo.PPOTrainer``.

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
    + ptx_coef * ptx_nll``.

    TRL's PPO puts the KL to the reference into the reward (:func:`alignops.rl.ppo_rewards`,
    ``kl_coef=0.05``), not into the loss, hence ``beta=0`` here by default; ``beta > 0`` adds a
    per-token ``kl_estimator`` penalty of ``log r = ref_logps - logps`` (k1 / k2 / k3, see
    :func:`alignops.rl.kl_estimate`) to the loss instead. ``entropy_coef`` is an entropy bonus
    (0 in TRL).

    PPO-ptx: ``ptx_coef`` (InstructGPT's gamma) times ``ptx_nll``, the pretraining NLL as a
    scalar (a differentiable 0-d tensor): the mean negative log-prob of the pretraining tokens,
    e.g. ``alignops.linear_cross_entropy(h, W, labels)`` (what
    :func:`alignops.ppo_loss_from_hidden` computes, fused), or from per-token log-probs
    ``ptx_logps [M, L]`` with their mask, ``-(reduce_padded(ptx_logps, ptx_mask).sums.sum() / n)``
    with ``n`` the token count of the (accumulated) pretraining batch. It is the loss layer's only
    pretraining input: hidden states never enter here.

    Means: ``mean_m x = sum m x / (num_items or sum m)``; the value term divides by
    ``value_num_items``, else ``num_items`` when no ``value_mask`` is given, else ``sum vm``.
    Counts are clamped to >= 1. ``losses``: ``[B, T]`` per-token ``pg + beta kl`` (zero at masked
    positions). Metrics (TRL names): ``loss/policy_avg``, ``loss/value_avg``, ``policy/clipfrac_avg``,
    ``val/clipfrac_avg``, ``policy/approxkl_avg`` (``mean 0.5 (logps - old)^2`` over ``m``),
    ``val/ratio``, ``policy/entropy_avg``, ``entropy``, ``kl``, ``loss/ptx``,
    ``clip_ratio/{low,high,region}_mean``, ``ratio/{mean,min,max}``.
    """
    check_choice("kl_estimator", kl_estimator, ("k1", "k2", "k3"))
    b, t = check_tokens(
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
    check_policy_options(beta=beta, ref_logps=ref_logps, entropy=entropy, entropy_coef=entropy_coef)
    _check_ppo(
        values=values,
        returns=returns,
        old_values=old_values,
        cliprange_value=cliprange_value,
        ptx_nll=ptx_nll,
        ptx_coef=ptx_coef,
    )
    tb = token_batch(logps, old_logps, mask, dtype_of=(ref_logps, advantages, values))
    parts = _ppo_policy(tb, per_row("advantages", advantages, b, t, tb.dt), cliprange, num_items)
    loss, loss_t, metrics = parts.loss, parts.per_token, parts.metrics
    if ref_logps is not None:
        kl_t = kl_estimate(tb.lp, ref_logps.to(tb.dt), kind=kl_estimator, mask=tb.mb, clamp=kl_clamp)
        if beta != 0.0:
            loss_t = loss_t + beta * kl_t
            loss = loss + beta * normalised_sum(kl_t, tb.m, num_items)
        metrics["kl"] = token_mean(kl_t.detach(), tb.m)
    if values is not None:
        value = _ppo_value(
            tb, values, old_values, returns, value_mask, cliprange_value, (num_items, value_num_items)
        )
        loss = loss + vf_coef * value.loss
        metrics.update(value.metrics)
    if entropy is not None:
        ent = masked(entropy, tb.mb, tb.dt)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * normalised_sum(ent, tb.m, num_items)
        metrics["entropy"] = metrics["policy/entropy_avg"] = token_mean(ent.detach(), tb.m)
    if ptx_nll is not None:
        ptx = scalar("ptx_nll", ptx_nll, tb.lp)
        loss = loss + ptx_coef * ptx
        metrics["loss/ptx"] = ptx.detach()
    return LossOutput(loss, loss_t * tb.m, metrics)
