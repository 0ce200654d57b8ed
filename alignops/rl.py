"""RL helpers on per-token log-probs: KL estimators, advantage estimators, rollout corrections,
PPO rewards.

* KL estimators per token (Schulman 2020, "Approximating KL Divergence",
  joschu.net/blog/kl-approx.html), with the sign conventions of that note: samples come from
  ``q`` = the policy, ``log r = log p - log q = ref_logps - logps``; plus ``abs`` and the
  straight-through ``k1+`` / ``k3+`` forms (value of k1 / k3, gradient of k2) under verl's names.
* Advantage estimators (defined in :mod:`alignops._advantages`, re-exported here): GRPO group
  advantages, RLOO, ReMax, OPO, pass@k, REINFORCE++ with and without baseline, GAE, whitening;
  groups contiguous (``num_generations``) or given by ``group_ids`` of any sizes.
* Rollout helpers: the truncated-completion mask, TRL's sampler importance ratio and the
  truncated / masked importance sampling of :class:`RolloutCorrection` for rollouts sampled by
  another engine (vLLM-style sampler mismatch).
* The PPO per-token reward with the KL folded in and optional reward clipping.

The policy losses that consume these live in :mod:`alignops.losses.policy` (``grpo_loss``,
``gmpo_loss``, ``rloo_loss``, ``ppo_loss``), which imports this module, never the reverse; the
fused hidden-states paths are :func:`alignops.grpo_loss_from_hidden` and
:func:`alignops.ppo_loss_from_hidden` (:mod:`alignops.fused`).

Every function here is written for right- or left-padded ``[B, T]`` batches with a completion
mask ``m`` (``1`` = scored token); masked positions never leak NaN or Inf into values or gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from ._advantages import (
    ADV_STD_EPS,
    WHITEN_VAR_EPS,
    GAEOutput,
    compute_gae,
    group_advantages,
    opo_advantages,
    passk_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    rloo_advantages,
    whiten,
)
from ._checks import check_choice, check_same_shape
from .kernels._common import compute_dtype

__all__ = [
    "ADV_STD_EPS",
    "KL_KINDS",
    "WHITEN_VAR_EPS",
    "GAEOutput",
    "PPORewards",
    "RolloutCorrection",
    "RolloutWeights",
    "compute_gae",
    "group_advantages",
    "kl_estimate",
    "opo_advantages",
    "passk_advantages",
    "ppo_rewards",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "remax_advantages",
    "rloo_advantages",
    "rollout_correction",
    "sampling_importance_ratio",
    "truncated_mask",
    "whiten",
]

KLKind = Literal[
    "k1", "k2", "k3", "abs", "k1+", "k3+", "abs+", "kl", "mse", "low_var_kl", "kl+", "low_var_kl+"
]
# verl's ``kl_penalty`` names for the same estimators
_KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3", "kl+": "k1+", "low_var_kl+": "k3+"}
#: Every accepted ``kind`` of :func:`kl_estimate` (canonical names first, then verl's aliases).
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3", "abs", "k1+", "k3+", "abs+", *_KL_ALIASES)


# --------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------


def _k1(log_r: torch.Tensor) -> torch.Tensor:
    return -log_r


def _k2(log_r: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_r * log_r


def _k3(log_r: torch.Tensor) -> torch.Tensor:
    return torch.expm1(log_r) - log_r


def _abs(log_r: torch.Tensor) -> torch.Tensor:
    return log_r.abs()


_KL_VALUES = {"k1": _k1, "k2": _k2, "k3": _k3, "abs": _abs}


def kl_estimate(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    kind: KLKind = "k1",
    mask: torch.Tensor | None = None,
    clamp: float | None = None,
    estimate_clamp: float | None = None,
) -> torch.Tensor:
    """Per-token estimate of ``KL(q || p)`` from samples of ``q`` (Schulman 2020, "Approximating KL
    Divergence").

    ``q`` is the sampling policy (``logps``, the policy's per-token log-probs ``[...]``) and ``p``
    the reference (``ref_logps``, same shape). With ``log r = ref_logps - logps``:

    =========================  =======================================  ======================================
    ``kind`` (verl's alias)    value                                    gradient w.r.t. ``logps``
    =========================  =======================================  ======================================
    ``k1`` (``kl``)            ``-log r``                               of the value (unbiased, can be < 0)
    ``k2`` (``mse``)           ``(log r)**2 / 2``                       of the value (biased, >= 0)
    ``k3`` (``low_var_kl``)    ``(exp(log r) - 1) - log r``             of the value (unbiased, >= 0)
    ``abs``                    ``|log r|``                              of the value
    ``k1+`` (``kl+``)          k1                                       k2's: ``logps - ref_logps``
    ``k3+`` (``low_var_kl+``)  k3                                       k2's
    ``abs+``                   ``|log r|``                              k2's
    =========================  =======================================  ======================================

    The ``+`` forms are straight-through: ``value.detach() + k2 - k2.detach()``. On samples of the
    current policy, k2's gradient as a loss is the gradient of the reverse KL, which k1 and k3
    used as losses are not (Tang & Munos 2025, "On a few pitfalls in KL divergence gradient
    estimation for RL", arXiv:2506.09477); verl names these ``k1+`` / ``k3+``.

    ``clamp``: if set, ``log r`` is clamped to ``[-clamp, clamp]`` before any estimator is
    evaluated (e.g. 20 for k3, where ``exp`` could overflow; verl's ``low_var_kl`` uses 20); the
    clamp also stops the gradient outside that range. ``estimate_clamp``: if set, the estimate is
    clamped to ``[-estimate_clamp, estimate_clamp]`` (verl's ``low_var_kl`` uses 10); for the
    ``+`` forms it clamps the value only (the gradient stays k2's). Both default to ``None``: no
    clamp, as TRL.
    ``mask`` (same shape, bool / 0-1): masked positions return exactly 0 and get zero gradient,
    even if the inputs hold Inf / NaN there. Computed in float32 (float64 if an input is).
    Returns a tensor of ``logps.shape``.

    Tests (tests/test_rl.py, tests/test_rl_corrections.py): k1 / k2 / k3 ->
    ``test_kl_estimators_expectations_and_signs``, ``test_kl_estimate_per_token_values_grad_mask_clamp_bf16``;
    every kind and both clamps at log-ratios of +-50 -> ``test_kl_kinds_vs_float64``; the ``+`` forms
    and the aliases -> ``test_straight_through_forms_value_and_gradient``.
    """
    check_choice("kind", kind, KL_KINDS)
    check_same_shape("logps", logps, ref_logps=ref_logps, mask=mask)
    for name, c in (("clamp", clamp), ("estimate_clamp", estimate_clamp)):
        if c is not None and not c > 0:
            raise ValueError(f"{name} must be > 0 or None, got {c}")
    kind = _KL_ALIASES.get(kind, kind)
    dt = compute_dtype(logps, ref_logps)
    log_r = ref_logps.to(dt) - logps.to(dt)
    if mask is not None:
        log_r = torch.where(mask.bool(), log_r, torch.zeros((), dtype=dt, device=log_r.device))
    if clamp is not None:
        log_r = log_r.clamp(-clamp, clamp)
    value = _KL_VALUES[kind.removesuffix("+")](log_r)
    if estimate_clamp is not None:
        value = value.clamp(-estimate_clamp, estimate_clamp)
    if not kind.endswith("+"):
        return value
    k2 = _k2(log_r)
    return value.detach() + (k2 - k2.detach())


# --------------------------------------------------------------------------------------------
# Rollout helpers
# --------------------------------------------------------------------------------------------


def truncated_mask(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    eos_token_ids: int | Sequence[int],
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """``[B]`` bool: True where the completion was cut (its last scored token is not EOS / pad).

    For ``grpo_loss(..., mask_truncated=...)`` (TRL ``mask_truncated_completions``, DAPO's
    overlong filtering, Yu et al. 2025, arXiv:2503.14476). Rows with no scored token are not truncated.
    """
    check_same_shape("completion_ids", completion_ids, completion_mask=completion_mask)
    m = completion_mask.bool()
    t = completion_ids.shape[-1]
    pos = torch.arange(1, t + 1, device=m.device).expand_as(m)
    last = (pos * m).argmax(dim=-1, keepdim=True)
    last_tok = completion_ids.gather(-1, last).squeeze(-1)
    stops = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    if pad_token_id is not None:
        stops.append(pad_token_id)
    is_stop = torch.isin(last_tok, torch.tensor(stops, dtype=last_tok.dtype, device=last_tok.device))
    return m.any(dim=-1) & ~is_stop


def _mismatch_log_ratio(old_logps, sampling_logps, mask, level: str) -> torch.Tensor:
    """``log rho`` of the trainer's vs the sampler's log-probs, detached: per token ``[B, T]``
    (``"token"``), summed ``[B, 1]`` (``"sequence"``) or averaged over the valid tokens ``[B, 1]``
    (``"geometric"``: the log of the geometric-mean ratio). Masked positions and NaN sampler
    log-probs count as no mismatch."""
    check_same_shape("old_logps", old_logps, sampling_logps=sampling_logps, mask=mask)
    if old_logps.dim() != 2:
        raise ValueError(f"old_logps must be [B, T], got shape {tuple(old_logps.shape)}")
    dt = compute_dtype(old_logps, sampling_logps)
    m = mask.bool()
    diff = torch.nan_to_num(old_logps.detach().to(dt) - sampling_logps.detach().to(dt), nan=0.0)
    diff = torch.where(m, diff, torch.zeros((), dtype=dt, device=diff.device))
    if level == "token":
        return diff
    total = diff.sum(dim=-1, keepdim=True)
    if level == "sequence":
        return total
    return total / m.sum(dim=-1, keepdim=True).clamp(min=1)


_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampling_importance_ratio(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> torch.Tensor:
    """Sampler-mismatch correction ``rho_IS = exp(old_logps - sampling_logps)`` (TRL ``GRPOTrainer``'s
    vLLM importance-sampling correction).

    ``old_logps`` (trainer's log-probs of the sampled tokens), ``sampling_logps`` (the inference
    engine's), ``mask``: ``[B, T]``. ``token_*`` modes give ``[B, T]`` ratios, ``sequence_*``
    modes ``[B, 1]`` (exp of the summed difference). ``*_truncate`` clamps to
    ``[clip_min, clip_max]``; ``*_mask`` sets ratios outside the range to 0 (drops them). Masked
    positions and NaN sampler log-probs count as no mismatch (ratio 1 before truncation / masking).
    Defaults as TRL ``GRPOConfig``. Pass the result to ``grpo_loss(importance_sampling_ratio=...)``;
    :class:`RolloutCorrection` adds the geometric-mean filter and verl's drop-from-the-mask form.
    """
    check_choice("mode", mode, _IS_MODES)
    level, action = mode.split("_")
    ratio = torch.exp(_mismatch_log_ratio(old_logps, sampling_logps, mask, level))
    if action == "truncate":
        return ratio.clamp(min=clip_min, max=clip_max)
    return ratio.masked_fill(_outside(ratio, clip_min, clip_max), 0.0)


def _outside(ratio: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    lo = -math.inf if lo is None else lo
    hi = math.inf if hi is None else hi
    return (ratio < lo) | (ratio > hi)


@dataclass(frozen=True)
class RolloutCorrection:
    """Correction for completions sampled by another engine than the trainer (vLLM-style sampler
    mismatch), from the rollout engine's own log-probs, as verl's rollout correction names it.

    ``rho = exp(old_logps - sampling_logps)`` at ``is_level`` / ``rs_level``: ``"token"`` (per
    token), ``"sequence"`` (product over the completion, ``exp(sum_t d_t)``) or ``"geometric"``
    (geometric mean, ``exp(mean_t d_t)``; rejection only).

    * Truncated importance sampling (TIS; Yao et al. 2025, "Your Efficient RL Framework Secretly
      Brings You Off-Policy RL Training", blog post): the detached weight
      ``clip(rho, is_threshold_lower, is_threshold)`` (verl ``rollout_is`` /
      ``rollout_is_threshold``, default 2; no lower bound by default). ``is_level=None``: no weight.
    * Masked importance sampling / rejection (MIS; Liu, Li et al. 2025, "When Speed Kills
      Stability: Demystifying RL Collapse from the Training-Inference Mismatch", blog post): tokens,
      or whole completions, whose ``rho`` at ``rs_level`` lies outside
      ``[rs_threshold_lower, rs_threshold]`` are rejected (verl ``rollout_rs`` /
      ``rollout_rs_threshold`` / ``rollout_rs_threshold_lower``; the lower bound defaults to
      ``1 / rs_threshold``, as verl). ``rs_level="geometric"`` is the sequence filter on the
      geometric-mean ratio, which does not grow with the length as the product does.
    * ``drop_rejected=True`` (verl): rejected tokens leave the loss's mask, so they leave the
      token and sequence counts of the aggregation too; ``False`` (TRL's ``*_mask`` modes): they
      stay in the mask with weight 0.

    Tests: ``test_rollout_correction_vs_float64`` (tests/test_rl_corrections.py, the weights and
    mask of each level), ``test_rollout_correction_in_losses_vs_float64``
    (tests/test_losses_policy_variants.py, through ``grpo_loss`` and ``ppo_loss``).
    """

    is_level: Literal["token", "sequence"] | None = "token"
    is_threshold: float | None = 2.0
    is_threshold_lower: float | None = None
    rs_level: Literal["token", "sequence", "geometric"] | None = None
    rs_threshold: float | None = None
    rs_threshold_lower: float | None = None
    drop_rejected: bool = True

    def __post_init__(self) -> None:
        if self.is_level is not None:
            check_choice("is_level", self.is_level, ("token", "sequence"))
        if self.rs_level is not None:
            check_choice("rs_level", self.rs_level, ("token", "sequence", "geometric"))
            if self.rs_threshold is None:
                raise ValueError("rs_level needs rs_threshold (the upper bound of the kept ratios)")
        for name in ("is_threshold", "is_threshold_lower", "rs_threshold", "rs_threshold_lower"):
            v, upper = getattr(self, name), not name.endswith("lower")
            ok = v is None or (
                isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 if upper else v >= 0)
            )
            if not ok:
                raise ValueError(
                    f"{name} must be a finite number {'> 0' if upper else '>= 0'} or None, got {v!r}"
                )
        for lo, hi in (("is_threshold_lower", "is_threshold"), ("rs_threshold_lower", "rs_threshold")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{lo} ({a}) must be <= {hi} ({b})")


class RolloutWeights(NamedTuple):
    """``weights``: detached per-token ``[B, T]`` or per-sequence ``[B, 1]`` factors of the policy
    loss (the TIS weight; 0 on rejected tokens kept in the mask); ``mask``: ``[B, T]`` bool, the
    loss's mask without the dropped tokens."""

    weights: torch.Tensor
    mask: torch.Tensor


def rollout_correction(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    mask: torch.Tensor,
    correction: RolloutCorrection | None = None,
) -> RolloutWeights:
    """The weights and mask of :class:`RolloutCorrection` (default: token-level TIS at 2).

    ``old_logps``: the trainer's log-probs of the sampled tokens ``[B, T]`` (at rollout time; the
    current ones on-policy), ``sampling_logps``: the rollout engine's, ``mask``: ``[B, T]``.
    Rejection happens first; the TIS weight multiplies the kept tokens. ``grpo_loss`` and
    ``ppo_loss`` take ``rollout_correction=`` with ``sampling_logps=`` and apply it themselves.
    """
    c = RolloutCorrection() if correction is None else correction
    m = mask.bool()
    dt = compute_dtype(old_logps, sampling_logps)
    weights = torch.ones(m.shape[0], 1, dtype=dt, device=m.device)
    if c.is_level is not None:
        rho = torch.exp(_mismatch_log_ratio(old_logps, sampling_logps, m, c.is_level))
        weights = rho.clamp(min=c.is_threshold_lower, max=c.is_threshold)
    if c.rs_level is None:
        return RolloutWeights(weights, m)
    rho = torch.exp(_mismatch_log_ratio(old_logps, sampling_logps, m, c.rs_level))
    lower = 1.0 / c.rs_threshold if c.rs_threshold_lower is None else c.rs_threshold_lower
    keep = ~_outside(rho, lower, c.rs_threshold)
    if c.drop_rejected:
        return RolloutWeights(weights, m & keep)
    return RolloutWeights(weights * keep.to(dt), m)


# --------------------------------------------------------------------------------------------
# PPO helpers
# --------------------------------------------------------------------------------------------


class PPORewards(NamedTuple):
    """``rewards [B, T]``: ``-kl_coef * kl`` per token plus the score; ``kl [B, T]`` per-token
    estimator; ``non_score_reward [B, T] = -kl_coef * kl``. All zero at masked positions."""

    rewards: torch.Tensor
    kl: torch.Tensor
    non_score_reward: torch.Tensor


def ppo_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float = 0.05,
    kl_estimator: KLKind = "k1",
    score_index: torch.Tensor | None = None,
    reward_clip_range: tuple[float, float] | None = None,
) -> PPORewards:
    """PPO per-token reward with the KL folded in (InstructGPT, Ouyang et al. 2022,
    arXiv:2203.02155; TRL ``experimental.ppo.PPOTrainer``).

    ``r_t = -kl_coef * kl_t`` with ``kl_t`` the ``kl_estimator`` of ``log r = ref_logps - logps``
    (:func:`kl_estimate`; TRL k1 or k3; ``logps`` are the rollout / old log-probs ``[B, T]``), and
    the scalar ``scores [B]``, clamped to ``reward_clip_range = (lo, hi)`` when given (OpenRLHF's
    ``reward_clip_range``; default ``None``: no clip, as TRL), added at
    ``score_index [B]`` (default: the last scored token of each row; rows with no scored token get
    no score). TRL adds the score one position later (``seq_len + 1``, or ``seq_len`` when that is
    past the end) and runs GAE over that extra position: pass that ``score_index`` and the value
    mask (``mask`` plus that position) to :func:`compute_gae` to reproduce it.

    Tests: ``test_ppo_rollout_pipeline_matches_trl_transcription``,
    ``test_ppo_rewards_default_index_and_kl`` (tests/test_rl.py), ``reward_clip_range`` and another
    estimator: ``test_ppo_rewards_reward_clip_vs_float64`` (tests/test_rl_corrections.py).
    """
    check_choice("kl_estimator", kl_estimator, KL_KINDS)
    check_same_shape("logps", logps, ref_logps=ref_logps, mask=mask)
    if logps.dim() != 2 or scores.shape != (logps.shape[0],):
        raise ValueError(f"need logps [B, T] and scores [B]; got {tuple(logps.shape)}, {tuple(scores.shape)}")
    m = mask.bool()
    kl = kl_estimate(logps, ref_logps, kind=kl_estimator, mask=m)
    non_score = -kl_coef * kl
    dt = non_score.dtype
    if score_index is None:
        pos = torch.arange(1, logps.shape[1] + 1, device=m.device).expand_as(m)
        score_index = (pos * m).argmax(dim=-1)
        has_token = m.any(dim=-1)
    else:
        has_token = torch.ones_like(m[:, 0])
    score = scores.to(dt)
    if reward_clip_range is not None:
        lo, hi = reward_clip_range
        if lo > hi:
            raise ValueError(f"reward_clip_range must be (lo, hi) with lo <= hi, got {reward_clip_range}")
        score = score.clamp(min=lo, max=hi)
    add = torch.where(has_token, score, torch.zeros((), dtype=dt, device=scores.device))
    rewards = non_score.scatter_add(1, score_index.long().view(-1, 1), add.view(-1, 1))
    return PPORewards(rewards, kl, non_score)
