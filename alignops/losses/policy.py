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

from typing import Literal

import torch

from .._checks import scalar
from ..rl import KLKind, RolloutCorrection
from ._aggregate import LossAggMode, SeqMeanOver, aggregate
from ._clip import ClipCovOptions, ClipRange, KLCovOptions, check_clip, clipped_surrogate
from ._common import LossOutput
from ._grpo_types import (
    DEFAULT_AGGREGATION,
    IMPORTANCE_SAMPLING_LEVELS,
    TOKEN_LOSSES,
    CISPOOptions,
    SAPOOptions,
    VESPOOptions,
    apply_masks,
    check_grpo,
    grpo_terms,
)
from ._policy_terms import (
    KLTerm,
    aggregation_options,
    apply_rollout_correction,
    check_ppo,
    check_variant_options,
    entropy_mean,
    ppo_policy,
    ppo_value,
    sequence_losses,
    sequence_old_logps,
)
from ._tokens import (
    Count,
    check_policy_options,
    check_tokens,
    clip_metrics,
    high_entropy_mask,
    masked,
    per_row,
    ratio_stats,
    token_batch,
    token_mean,
)

__all__ = [
    "GRPO_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "CISPOOptions",
    "ClipCovOptions",
    "KLCovOptions",
    "SAPOOptions",
    "VESPOOptions",
    "gmpo_loss",
    "grpo_loss",
    "ppo_loss",
    "rloo_loss",
]

GRPO_LOSS_TYPES: tuple[str, ...] = tuple(TOKEN_LOSSES)  # the names check_grpo accepts
GRPOLossType = Literal[
    "grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo", "clip_cov", "kl_cov"
]


# --------------------------------------------------------------------------------------------
# GRPO family


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
    clip_ratio_c: float | None = None,
    loss_type: GRPOLossType = "dapo",
    importance_sampling_level: Literal["token", "sequence", "sequence_token"] = "token",
    use_bias_correction_kl: bool = True,
    kl_estimator: KLKind = "k3",
    kl_clamp: float | None = None,
    kl_estimate_clamp: float | None = None,
    loss_agg_mode: LossAggMode | None = None,
    seq_mean_over: SeqMeanOver = "all",
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
    rollout_correction: RolloutCorrection | None = None,
    sapo: SAPOOptions | None = None,
    vespo: VESPOOptions | None = None,
    cispo: CISPOOptions | None = None,
    clip_cov: ClipCovOptions | None = None,
    kl_cov: KLCovOptions | None = None,
) -> LossOutput:
    """GRPO-family policy loss on per-token log-probs (TRL ``GRPOTrainer._compute_loss``; verl's
    policy-loss modes and aggregation names).

    GRPO: Shao et al. 2024 (DeepSeekMath), arXiv:2402.03300. Variants: ``dapo`` (Yu et al. 2025,
    arXiv:2503.14476), ``dr_grpo`` (Liu et al. 2025, arXiv:2503.20783), ``bnpo``, ``cispo``
    (MiniMax 2025, arXiv:2506.13585), ``sapo`` (Gao et al. 2025, arXiv:2511.20347), ``vespo``
    (Shen et al. 2026, arXiv:2602.10693), ``luspo`` (Liu et al. 2026, arXiv:2602.05261),
    ``clip_cov`` / ``kl_cov`` (Cui et al. 2025, arXiv:2505.22617); sequence ratio GSPO (Zheng et
    al. 2025, arXiv:2507.18071); ``delta``: INTELLECT-2 two-sided clipping (Prime Intellect 2025,
    arXiv:2505.07291); ``clip_ratio_c``: dual-clip PPO (Ye et al. 2020, arXiv:1912.09729). The
    per-type and per-level functions are in :mod:`alignops.losses._grpo_types`, the clipping in
    :mod:`alignops.losses._clip`, the aggregations in :mod:`alignops.losses._aggregate`; the math
    is in docs/losses.md.

    Shapes: ``logps``, ``old_logps``, ``ref_logps``, ``completion_mask``, ``entropy``,
    ``sampling_logps``: ``[B, T]``; ``advantages``: ``[B]`` or ``[B, T]``; ``mask_truncated``:
    ``[B]`` bool; ``importance_sampling_ratio``: ``[B, T]``, ``[B, 1]`` or ``[B]``.

    Ratio (``importance_sampling_level``), with ``d_t = logps_t - old_logps_t``:
    ``"token"``: ``w_t = exp(d_t)``; ``"sequence"`` (GSPO): ``w = exp(mean_t d_t)`` per sequence;
    ``"sequence_token"`` (GSPO-token): ``w_t = sg(w) * exp(logps_t - sg(logps_t))``.
    ``old_logps=None`` means on-policy: ``old = logps.detach()`` (ratio 1, gradient ``A grad logp``).

    Per-token loss ``L_t`` by ``loss_type`` (``e_lo = epsilon``, ``e_hi = epsilon_high or epsilon``):

    * ``grpo | bnpo | dr_grpo | dapo | luspo``: ``-min(w' A, clip(w, 1 - e_lo, 1 + e_hi) A)`` with
      ``w' = min(w, delta)`` when ``delta`` is set, else ``w``; with ``clip_ratio_c = c`` (> 1),
      ``min(L_t, -c A)`` where ``A < 0`` (dual-clip);
    * ``cispo``: ``-sg(clip(w, weight_min, weight_max)) A logps`` (:class:`CISPOOptions`; default
      TRL's ``-sg(min(w, e_hi)) A logps``);
    * ``sapo``: ``-(4 / tau) sigmoid(tau (w - 1)) A``, ``tau`` = ``sapo.temperature_pos`` if
      ``A > 0`` else ``sapo.temperature_neg`` (:class:`SAPOOptions`, TRL's 1.0 / 1.05);
    * ``vespo``: ``-phi A logps`` with the detached gamma weight ``phi`` of the sequence ratio
      (token level only; :class:`VESPOOptions` holds TRL's ``vespo_{k,lambda}_{pos,neg}``);
    * ``clip_cov``: the clipped surrogate, 0 on a random ``ratio`` of the tokens with covariance
      ``cov_t = (A_t - mean A)(logps_t - mean logps)`` in ``(lower, upper)`` that PPO did not clip
      (:class:`ClipCovOptions`, verl's defaults 2e-4, 1, 5; one host sync);
    * ``kl_cov``: ``-w A + coef |d_t|`` on the top ``ratio`` of the tokens by ``cov_t``, ``-w A``
      elsewhere (no clipping; :class:`KLCovOptions`, verl's 2e-4, 1; one host sync).

    Then, in TRL's order: times the off-policy sequence mask (``off_policy_mask_threshold``: keep a
    sequence if ``A >= 0`` or ``mean_t(sampling_logps - logps) <= threshold``; ``sampling_logps``
    defaults to ``old``; DeepSeek-AI 2025, arXiv:2512.02556), times the high-entropy token mask
    (``top_entropy_quantile < 1``, needs ``entropy``), times the sampler weights (for VESPO they
    enter ``phi``), plus ``beta * kl_t`` with the ``kl_estimator`` of ``log r = ref_logps - logps``
    (default k3 as TRL; any :func:`alignops.rl.kl_estimate` kind, e.g. verl's ``low_var_kl`` or the
    straight-through ``k3+``), times ``w`` when ``use_bias_correction_kl``; ``kl_clamp`` clamps
    ``log r`` and ``kl_estimate_clamp`` the estimate (both off by default, as TRL).

    Sampler weights: ``importance_sampling_ratio`` (precomputed, e.g.
    :func:`alignops.rl.sampling_importance_ratio`), or ``rollout_correction`` (a
    :class:`~alignops.rl.RolloutCorrection`: truncated IS at token / sequence level and rejection
    of tokens / sequences / geometric-mean outliers, computed here from ``old`` and
    ``sampling_logps``, the rollout engine's log-probs; rejected tokens leave the mask when
    ``drop_rejected``).

    Aggregation: ``loss_agg_mode`` (verl's ``token-mean``, ``seq-mean-token-sum``,
    ``seq-mean-token-mean``, ``seq-mean-token-sum-norm``; :mod:`alignops.losses._aggregate`) over
    the mask ``m`` (``completion_mask``, rows in ``mask_truncated`` zeroed, rejected tokens
    dropped); ``None`` uses the loss type's own (TRL's):

    * ``grpo``, ``sapo``: ``seq-mean-token-mean``: ``sum_i [sum_t m L / max(1, n_i)] / num_sequences``;
    * ``bnpo``, ``dapo``, ``cispo``, ``vespo``, ``clip_cov``, ``kl_cov``: ``token-mean``:
      ``sum m L / num_items`` (TRL's ``dapo`` uses
      ``num_items = num_items_in_batch / num_processes * GA / steps_per_generation``);
    * ``dr_grpo``: ``seq-mean-token-sum-norm``: ``sum m L / (num_sequences * max_completion_length)``
      (required here);
    * ``luspo``: ``seq-mean-token-sum``: ``sum_i sum_t m L / num_sequences``.

    ``num_sequences`` defaults to the rows of the micro-batch, all of them (``seq_mean_over="all"``,
    TRL) or the non-empty ones (``"nonempty"``, verl); ``num_items`` to ``sum m`` (>= 1);
    ``max_completion_length`` (the horizon of ``seq-mean-token-sum-norm``) to ``T``.

    Entropy bonus (``entropy_coef``): ``loss -= entropy_coef * agg(H)`` over ``m' = m`` times the
    high-entropy mask, with ``loss_agg_mode`` (TRL: the token mean). Defaults as TRL 1.16
    ``GRPOConfig``.

    Option -> formula -> test (tests/test_losses_grpo.py, tests/test_losses_policy_variants.py;
    ``tests/test_rl_error_table.py -s`` prints the largest error of each):

    * ``loss_type`` x ``importance_sampling_level``: the per-type losses above ->
      ``test_grpo_types_vs_float64_reference``; ``beta``, ``delta``, entropy, masks, sampler ratio ->
      ``test_grpo_kl_beta_and_options_vs_float64_reference``; TRL itself -> ``test_grpo_matches_trl``;
    * ``clip_ratio_c``: ``min(L, -c A)`` where ``A < 0`` -> ``test_dual_clip_vs_float64``;
    * ``cispo``: ``-sg(clip(w, weight_min, weight_max)) A logps`` -> ``test_cispo_bounds_vs_float64``;
    * ``clip_cov`` / ``kl_cov``: covariance selection -> ``test_clip_cov_vs_float64``,
      ``test_kl_cov_vs_float64``;
    * ``kl_estimator``, ``kl_clamp``, ``kl_estimate_clamp``: ``beta * kl_t`` ->
      ``test_kl_estimators_in_losses_vs_float64``;
    * ``loss_agg_mode``, ``seq_mean_over``: the table of :mod:`alignops.losses._aggregate` ->
      ``test_loss_agg_modes_vs_float64``;
    * ``rollout_correction``: TIS weight times the kept tokens ->
      ``test_rollout_correction_in_losses_vs_float64``;
    * log-ratios of +-50 through every type -> ``test_extreme_log_ratios_vs_float64``.

    Metrics: ``kl`` (mean ``kl_t`` as added to the loss, when ``ref_logps`` is given), ``entropy``,
    ``clip_ratio/{low_mean, high_mean, region_mean, low_min, high_max}`` (clipped types),
    ``clip_ratio/dual_mean``, ``cispo_clip_ratio``, ``vespo/phi_seq_mean``,
    ``clip_cov/detached_frac``, ``kl_cov/penalised_frac``, ``ratio/{mean, min, max}``,
    ``policy_loss`` (before the entropy bonus). Statistics are over this micro-batch.
    """
    check_grpo(loss_type, importance_sampling_level, max_completion_length, loss_agg_mode, clip_ratio_c)
    agg = aggregation_options(
        loss_agg_mode or DEFAULT_AGGREGATION[loss_type],
        seq_mean_over,
        num_items,
        num_sequences,
        max_completion_length,
    )
    options = check_variant_options(
        loss_type, dict(sapo=sapo, vespo=vespo, cispo=cispo, clip_cov=clip_cov, kl_cov=kl_cov)
    )
    kl = KLTerm(kl_estimator, kl_clamp, kl_estimate_clamp)
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
    tb, is_ratio = apply_rollout_correction(tb, sampling_logps, rollout_correction, importance_sampling_ratio)
    clip = ClipRange(epsilon, epsilon if epsilon_high is None else epsilon_high, delta, clip_ratio_c)
    check_clip(clip)
    g = grpo_terms(tb, advantages, importance_sampling_level, is_ratio, clip=clip, options=options)
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
        per_token_kl = kl(tb, ref_logps) * (g.w if use_bias_correction_kl else 1.0)
        if beta != 0.0:
            loss_t = loss_t + beta * per_token_kl
    losses = loss_t * tb.m  # [B, T]
    loss = aggregate(losses, tb.m, **agg)
    metrics = g.metrics
    metrics["policy_loss"] = loss.detach()
    if entropy_coef != 0.0:
        eff = tb.m if entropy_mask is None else tb.m * entropy_mask.to(tb.dt)
        ent_agg = dict(agg, mode=loss_agg_mode or "token-mean")
        loss = loss - entropy_coef * aggregate(masked(entropy, tb.mb, tb.dt) * eff, eff, **ent_agg)
    if per_token_kl is not None:
        metrics["kl"] = token_mean(per_token_kl.detach(), tb.m)
    if entropy is not None:
        metrics["entropy"] = entropy_mean(entropy, tb)
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
    kl_estimator: KLKind = "k3",
    kl_clamp: float | None = None,
    kl_estimate_clamp: float | None = None,
    loss_agg_mode: LossAggMode | None = None,
    seq_mean_over: SeqMeanOver = "all",
    num_items: Count | None = None,
    num_sequences: Count | None = None,
    max_completion_length: int | None = None,
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
    ``top_entropy_quantile < 1``), ``L_i = -w_i A_i + beta * mean_t kl_t`` (``kl_estimator`` of
    ``ref_logps - logps`` over ``m``, k3 by default as TRL), ``loss = sum_i L_i / (num_sequences or
    B)``; with ``loss_agg_mode`` (verl's names, see :func:`grpo_loss`) each ``L_i`` counts on every
    valid token of its row instead (``token-mean``: length-weighted; ``seq-mean-token-mean``: the
    mean over rows, an empty row counting 0).

    ``losses`` is ``[B]``. Metrics: ``kl``, ``entropy``, ``clip_ratio/*`` (fraction of valid tokens
    with ``d < -eps`` and ``A < 0`` / ``d > eps_high`` and ``A > 0``), ``ratio/*`` of ``w_i``.
    Tests: ``test_gmpo_vs_float64_reference_and_trl`` (tests/test_losses_grpo_trl.py), the
    aggregation modes in ``test_loss_agg_modes_vs_float64`` (tests/test_losses_policy_variants.py).
    """
    agg = aggregation_options(loss_agg_mode, seq_mean_over, num_items, num_sequences, max_completion_length)
    kl = KLTerm(kl_estimator, kl_clamp, kl_estimate_clamp)
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
        per_token_kl = kl(tb, ref_logps)
        if beta != 0.0:
            losses = losses + beta * (per_token_kl * tb.m).sum(-1) / tb.n_i.squeeze(-1).clamp(min=1)
        metrics["kl"] = token_mean(per_token_kl.detach(), tb.m)
    loss = sequence_losses(losses, tb, loss_agg_mode, agg)
    if entropy is not None:
        metrics["entropy"] = entropy_mean(entropy, tb)
    d_det = d.detach()
    metrics.update(clip_metrics((d_det < -e_lo) & (adv < 0), (d_det > e_hi) & (adv > 0), tb.m))
    metrics.update(ratio_stats(w.unsqueeze(1), tb.m))
    return LossOutput(loss, losses, metrics)


# --------------------------------------------------------------------------------------------
# RLOO


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    clip_ratio_c: float | None = None,
    loss_agg_mode: LossAggMode | None = None,
    seq_mean_over: SeqMeanOver = "all",
    num_items: Count | None = None,
    num_sequences: Count | None = None,
    max_completion_length: int | None = None,
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
    ``L_i = -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A)`` (dual-clip with ``clip_ratio_c``:
    ``min(L_i, -c A)`` where ``A < 0``, Ye et al. 2020, arXiv:1912.09729),
    ``loss = sum_i L_i / (num_sequences or B)``, or ``loss_agg_mode`` as for :func:`gmpo_loss`.
    On-policy this is the REINFORCE-LOO gradient.

    ``losses`` is ``[B]``. Metrics: ``entropy`` (token mean), ``clip_ratio/*`` (fractions of
    sequences), ``ratio/*``. Tests: ``test_rloo_loss_vs_float64_reference_and_trl`` (TRL file),
    ``test_dual_clip_vs_float64`` and ``test_loss_agg_modes_vs_float64``
    (tests/test_losses_policy_variants.py).
    """
    agg = aggregation_options(loss_agg_mode, seq_mean_over, num_items, num_sequences, max_completion_length)
    b, _ = check_tokens(logps, completion_mask=completion_mask, entropy=entropy)
    if advantages.shape != (b,):
        raise ValueError(f"advantages must be [B] = ({b},), got {tuple(advantages.shape)}")
    tb = token_batch(
        logps, None, completion_mask, mask_truncated=mask_truncated, dtype_of=(old_logps, advantages)
    )
    seq_logps = (tb.lp * tb.m).sum(-1)
    seq_old = sequence_old_logps(old_logps, tb, seq_logps)
    adv = advantages.to(tb.dt)
    clip = ClipRange(epsilon, epsilon if epsilon_high is None else epsilon_high, None, clip_ratio_c)
    check_clip(clip)

    rho = torch.exp(seq_logps - seq_old)
    s = clipped_surrogate(rho, adv, clip)
    losses = s.loss
    loss = sequence_losses(losses, tb, loss_agg_mode, agg)

    metrics: dict[str, torch.Tensor] = {}
    if entropy is not None:
        metrics["entropy"] = entropy_mean(entropy, tb)
    metrics.update(clip_metrics(s.low.unsqueeze(1), s.high.unsqueeze(1), tb.m))
    metrics.update(ratio_stats(rho.detach().unsqueeze(1), tb.m))
    return LossOutput(loss, losses, metrics)


# --------------------------------------------------------------------------------------------
# PPO / PPO-ptx


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
    cliprange_high: float | None = None,
    clip_ratio_c: float | None = None,
    cliprange_value: float | None = 0.2,
    vf_coef: float = 0.1,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: KLKind = "k1",
    kl_clamp: float | None = None,
    kl_estimate_clamp: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    ptx_nll: torch.Tensor | float | None = None,
    ptx_coef: float = 0.0,
    loss_agg_mode: LossAggMode | None = None,
    seq_mean_over: SeqMeanOver = "all",
    num_items: Count | None = None,
    value_num_items: Count | None = None,
    num_sequences: Count | None = None,
    max_completion_length: int | None = None,
    sampling_logps: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    rollout_correction: RolloutCorrection | None = None,
) -> LossOutput:
    """PPO clipped surrogate + clipped value loss + KL / entropy / pretraining terms.

    PPO: Schulman et al. 2017, arXiv:1707.06347; for language models and PPO-ptx: InstructGPT,
    Ouyang et al. 2022, arXiv:2203.02155, Eq. 2; TRL ``experimental.ppo.PPOTrainer``; dual-clip:
    Ye et al. 2020, arXiv:1912.09729 (verl's ``clip_ratio_c``).

    ``logps``, ``old_logps`` (``None``: on-policy), ``mask``, ``ref_logps``, ``entropy``,
    ``sampling_logps``: ``[B, T]``; ``advantages``: ``[B, T]`` (e.g. whitened
    :func:`alignops.rl.compute_gae` output) or ``[B]``; ``values`` (new value-head output, with
    gradient), ``old_values`` (rollout), ``returns``, ``value_mask``: ``[B, T]`` (``value_mask``
    defaults to ``mask``; TRL's covers one more position).

    ``rho_t = exp(logps_t - old_logps_t)``,
    ``pg_t = max(-A rho, -A clip(rho, 1 - cliprange, 1 + (cliprange_high or cliprange)))``, and with
    ``clip_ratio_c = c`` (> 1) ``pg_t = min(pg_t, -c A)`` where ``A < 0``; times the sampler weights
    (``importance_sampling_ratio`` or ``rollout_correction`` with ``sampling_logps``, as in
    :func:`grpo_loss`). ``V^c = clip(values, old_values - cliprange_value, old_values +
    cliprange_value)`` (no clip when ``cliprange_value`` is None), ``vf_t = max((values - R)^2,
    (V^c - R)^2)``; ``loss = agg_m pg + vf_coef * 0.5 * agg_vm vf + beta * agg_m kl - entropy_coef *
    agg_m H + ptx_coef * ptx_nll``.

    ``agg`` is ``loss_agg_mode`` (verl's names, see :func:`grpo_loss`), the same for every term;
    ``None`` is the token mean, ``agg_m x = sum m x / (num_items or sum m)`` (TRL); the value term
    counts ``value_num_items``, else ``num_items`` when no ``value_mask`` is given, else
    ``sum vm``. Counts are clamped to >= 1.

    TRL's PPO puts the KL to the reference into the reward (:func:`alignops.rl.ppo_rewards`,
    ``kl_coef=0.05``), not into the loss, hence ``beta=0`` here by default; ``beta > 0`` adds a
    per-token ``kl_estimator`` penalty of ``log r = ref_logps - logps`` (any
    :func:`alignops.rl.kl_estimate` kind, with ``kl_clamp`` / ``kl_estimate_clamp``) to the loss
    instead. ``entropy_coef`` is an entropy bonus (0 in TRL).

    PPO-ptx: ``ptx_coef`` (InstructGPT's gamma) times ``ptx_nll``, the pretraining NLL as a
    scalar (a differentiable 0-d tensor): the mean negative log-prob of the pretraining tokens,
    e.g. ``alignops.linear_cross_entropy(h, W, labels)`` (what
    :func:`alignops.ppo_loss_from_hidden` computes, fused), or from per-token log-probs
    ``ptx_logps [M, L]`` with their mask, ``-(reduce_padded(ptx_logps, ptx_mask).sums.sum() / n)``
    with ``n`` the token count of the (accumulated) pretraining batch. It is the loss layer's only
    pretraining input: hidden states never enter here.

    Option -> test (tests/test_losses_ppo.py, tests/test_losses_policy_variants.py):
    ``kl_estimator`` k1 / k2 / k3, values, entropy: ``test_ppo_vs_spec_reference``; ``ptx_nll``:
    ``test_ppo_ptx_nll_from_per_token_logps``; ``cliprange_high``:
    ``test_ppo_low_high_clip_vs_float64``; ``clip_ratio_c``: ``test_dual_clip_vs_float64``;
    ``loss_agg_mode``, ``seq_mean_over``: ``test_loss_agg_modes_vs_float64``;
    ``rollout_correction``: ``test_rollout_correction_in_losses_vs_float64``; other
    ``kl_estimator`` kinds: ``test_kl_estimators_in_losses_vs_float64``.

    ``losses``: ``[B, T]`` per-token ``pg + beta kl`` (zero at masked positions). Metrics (TRL
    names): ``loss/policy_avg``, ``loss/value_avg``, ``policy/clipfrac_avg``, ``val/clipfrac_avg``,
    ``policy/approxkl_avg`` (``mean 0.5 (logps - old)^2`` over ``m``), ``val/ratio``,
    ``policy/entropy_avg``, ``entropy``, ``kl``, ``loss/ptx``, ``policy/clipfrac_lower`` (verl's
    name: the dual-clip bound is active), ``clip_ratio/{low,high,region}_mean``,
    ``ratio/{mean,min,max}``.
    """
    agg = aggregation_options(
        loss_agg_mode or "token-mean", seq_mean_over, num_items, num_sequences, max_completion_length
    )
    kl = KLTerm(kl_estimator, kl_clamp, kl_estimate_clamp)
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
        sampling_logps=sampling_logps,
    )
    check_policy_options(beta=beta, ref_logps=ref_logps, entropy=entropy, entropy_coef=entropy_coef)
    check_ppo(
        values=values,
        returns=returns,
        old_values=old_values,
        cliprange_value=cliprange_value,
        ptx_nll=ptx_nll,
        ptx_coef=ptx_coef,
    )
    clip = ClipRange(cliprange, cliprange if cliprange_high is None else cliprange_high, None, clip_ratio_c)
    check_clip(clip)
    tb = token_batch(logps, old_logps, mask, dtype_of=(ref_logps, advantages, values))
    tb, is_ratio = apply_rollout_correction(tb, sampling_logps, rollout_correction, importance_sampling_ratio)
    if is_ratio is not None:
        is_ratio = per_row("importance_sampling_ratio", is_ratio, b, t, tb.dt)
    parts = ppo_policy(tb, per_row("advantages", advantages, b, t, tb.dt), clip, is_ratio, agg)
    loss, loss_t, metrics = parts.loss, parts.per_token, parts.metrics
    if ref_logps is not None:
        kl_t = kl(tb, ref_logps)
        if beta != 0.0:
            loss_t = loss_t + beta * kl_t
            loss = loss + beta * aggregate(kl_t * tb.m, tb.m, **agg)
        metrics["kl"] = token_mean(kl_t.detach(), tb.m)
    if values is not None:
        value = ppo_value(tb, values, old_values, returns, value_mask, cliprange_value, value_num_items, agg)
        loss = loss + vf_coef * value.loss
        metrics.update(value.metrics)
    if entropy is not None:
        ent = masked(entropy, tb.mb, tb.dt)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * aggregate(ent * tb.m, tb.m, **agg)
        metrics["entropy"] = metrics["policy/entropy_avg"] = token_mean(ent.detach(), tb.m)
    if ptx_nll is not None:
        ptx = scalar("ptx_nll", ptx_nll, tb.lp)
        loss = loss + ptx_coef * ptx
        metrics["loss/ptx"] = ptx.detach()
    return LossOutput(loss, loss_t * tb.m, metrics)
