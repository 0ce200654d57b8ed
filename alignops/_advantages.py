"""Advantage estimators on rewards and per-token batches; re-exported by :mod:`alignops.rl`.

Outcome-reward estimators (one scalar reward per completion, ``[N]``; NaN = unscorable), with
the advantage ``A_i`` of completion ``i`` in group ``g``:

* :func:`group_advantages`: ``(r_i - mean_g r) / (std r + eps)``, group or batch std (GRPO, Shao et
  al. 2024, arXiv:2402.03300; TRL ``GRPOTrainer``, verl ``grpo``);
* :func:`rloo_advantages`: ``R_i - mean_{j in g, j != i} R_j`` (Ahmadian et al. 2024,
  arXiv:2402.14740; TRL ``RLOOTrainer``, verl / OpenRLHF ``rloo``);
* :func:`remax_advantages`: ``r_i - r(greedy completion of the prompt)`` (ReMax, Li et al. 2023,
  arXiv:2310.10505; verl ``remax``);
* :func:`opo_advantages`: ``r_i - sum_g n_j r_j / sum_g n_j``, the length-weighted mean (OPO, Hao et
  al. 2025, arXiv:2505.23585; verl ``opo``);
* :func:`passk_advantages`: ``r_max - r_second`` for the best completion of the group, 0 for the
  others (Tang et al. 2025, arXiv:2503.19595; verl ``grpo_passk``);
* :func:`reinforce_pp_baseline_advantages`: ``r_i - mean_g r`` on every token, whitened over the
  batch (REINFORCE++-baseline, Hu 2025, arXiv:2501.03262; verl ``reinforce_plus_plus_baseline``).

Per-token estimators (``[B, T]`` rewards and values with a mask): :func:`compute_gae` (Schulman et
al. 2015, arXiv:1506.02438), :func:`reinforce_pp_advantages` (REINFORCE++: the whitened discounted
return, Hu 2025), :func:`whiten`.

**Groups.** ``num_generations=G``: completions of one prompt are contiguous, ``N = P * G`` (TRL's
layout). ``group_ids=[N]`` integer tensor: any labels, in any order, groups of any size (verl's
``index`` / ``uid``). Pass exactly one.

**Single-completion groups** (one scorable completion; no baseline can be formed from the others):
``single_completion="zero"`` (default, TRL) gives advantage 0; ``"reward"`` takes the baseline as 0
and the group std as 1 (verl's convention: ``A = r`` unscaled, ``r / (1 + eps)`` with the group
std). Unscorable completions (NaN reward) always get 0 and never enter a statistic.

Means skip NaN; stds are unbiased (Bessel), NaN-aware. Everything is float32 (float64 when an
input is float64) and carries no gradient (rollout quantities).

Tests, each against a plain-Python float64 formula (tests/test_rl.py, tests/test_rl_advantages.py):
``group_advantages`` -> ``test_group_advantages_vs_reference`` (TRL's contiguous groups, GDPO),
``test_group_advantages_with_uneven_group_ids`` (``group_ids``, ``single_completion``);
``rloo_advantages`` -> ``test_rloo_advantages_vs_reference``,
``test_rloo_advantages_with_uneven_group_ids``; ``remax_advantages`` -> ``test_remax_advantages``;
``opo_advantages`` -> ``test_opo_advantages_length_weighted_baseline``; ``passk_advantages`` ->
``test_passk_advantages``; ``reinforce_pp_advantages`` -> ``test_reinforce_pp_advantages``;
``reinforce_pp_baseline_advantages`` -> ``test_reinforce_pp_baseline_advantages``; ``compute_gae``,
``whiten`` -> ``test_ppo_rollout_pipeline_matches_trl_transcription``,
``test_gae_with_holes_equals_gae_on_compacted_sequence``, ``test_whiten_vs_formula``.
``tests/test_rl_error_table.py -s`` prints the largest error of each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from ._checks import check_choice, check_same_shape
from .kernels._common import compute_dtype

__all__ = [
    "GAEOutput",
    "compute_gae",
    "group_advantages",
    "opo_advantages",
    "passk_advantages",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "remax_advantages",
    "rloo_advantages",
    "whiten",
]

# Added to the std before dividing (TRL GRPO / RLOO; verl uses 1e-6); keeps an all-equal group at
# advantage 0 instead of 0 / 0.
ADV_STD_EPS = 1e-4
# Added to the variance inside rsqrt when whitening (TRL ``masked_whiten``, verl ``masked_whiten``).
WHITEN_VAR_EPS = 1e-8

_SCALE_MODES = ("group", "batch", "none")
_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
_SINGLE = ("zero", "reward")
SingleCompletion = Literal["zero", "reward"]


# --------------------------------------------------------------------------------------------
# groups and their statistics
# --------------------------------------------------------------------------------------------


class _Groups(NamedTuple):
    """``index [N]``: the group (``0 .. count-1``) of each completion."""

    index: torch.Tensor
    count: int


def _groups(n: int, device, num_generations: int | None, group_ids: torch.Tensor | None) -> _Groups:
    if (num_generations is None) == (group_ids is None):
        raise ValueError(
            "pass exactly one of num_generations (contiguous groups of equal size) and group_ids "
            "([N] integer group labels)"
        )
    if group_ids is None:
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        if n % num_generations != 0:
            raise ValueError(
                f"the number of completions ({n}) is not a multiple of num_generations ({num_generations})"
            )
        return _Groups(torch.arange(n, device=device) // num_generations, n // num_generations)
    if group_ids.shape != (n,):
        raise ValueError(f"group_ids must have shape ({n},), got {tuple(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    labels, index = torch.unique(group_ids.to(device), return_inverse=True)
    return _Groups(index, labels.numel())


def _segment_sum(x: torch.Tensor, g: _Groups) -> torch.Tensor:
    """Per-group sums ``[G, ...]`` of ``x [N, ...]``."""
    return x.new_zeros((g.count, *x.shape[1:])).index_add_(0, g.index, x)


def _group_moments(x: torch.Tensor, g: _Groups):
    """NaN-aware group mean, unbiased std and count of ``x [N]`` or ``[N, K]``, broadcast back to
    ``x``'s shape. The mean is NaN for a group without values, the std for fewer than two."""
    valid = ~torch.isnan(x)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    count = _segment_sum(valid.to(x.dtype), g)
    mean = (_segment_sum(torch.where(valid, x, zero), g) / count)[g.index]
    dev = torch.where(valid, x - mean, zero)
    var = _segment_sum(dev * dev, g) / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    return mean, var.sqrt()[g.index], count[g.index]


def _relative(x, g: _Groups, *, scale: bool, eps: float, single: str) -> torch.Tensor:
    """``x - mean_g x``, divided by ``std_g x + eps`` when ``scale``; single-completion groups as
    ``single`` says (``"zero"`` leaves them at 0 or NaN, mapped to 0 by the caller)."""
    mean, std, count = _group_moments(x, g)
    if single == "reward":
        one = count == 1
        mean = torch.where(one, torch.zeros_like(mean), mean)
        std = torch.where(one, torch.ones_like(std), std)
    centred = x - mean
    return centred / (std + eps) if scale else centred


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel) std of all of ``x`` ignoring NaN; NaN with fewer than two values."""
    x = x.reshape(-1)
    return _group_moments(x, _Groups(torch.zeros_like(x, dtype=torch.long), 1))[1][0]


def _batch_std(x: torch.Tensor) -> torch.Tensor:
    """NaN-aware Bessel std of all of ``x``; 0 for a single value."""
    return _nanstd(x) if x.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)


def _combine_rewards(rewards: torch.Tensor, reward_weights: torch.Tensor | Sequence[float] | None):
    """``[N]`` or ``[N, K]`` per-function rewards -> ``[N]`` weighted nansum; NaN where all K are NaN."""
    if rewards.dim() == 1:
        return rewards
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N] or [N, K], got shape {tuple(rewards.shape)}")
    w = _reward_weights(rewards, reward_weights)
    unscorable = torch.isnan(rewards).all(dim=1)
    total = (rewards * w).nansum(dim=1)
    return torch.where(unscorable, torch.full_like(total, float("nan")), total)


def _reward_weights(rewards: torch.Tensor, reward_weights) -> torch.Tensor:
    k = rewards.shape[1]
    if reward_weights is None:
        return torch.ones(k, dtype=rewards.dtype, device=rewards.device)
    w = torch.as_tensor(reward_weights, dtype=rewards.dtype, device=rewards.device)
    if w.shape != (k,):
        raise ValueError(f"reward_weights must have shape ({k},), got {tuple(w.shape)}")
    return w


def _outcome(name: str, rewards: torch.Tensor, *others: torch.Tensor | None) -> torch.Tensor:
    """``[N]`` floating rewards in the compute dtype."""
    if not rewards.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {rewards.dtype}")
    if rewards.dim() != 1:
        raise ValueError(f"{name} must be [N] (combine reward functions first), got {tuple(rewards.shape)}")
    return rewards.to(compute_dtype(rewards, *others))


# --------------------------------------------------------------------------------------------
# GRPO and RLOO
# --------------------------------------------------------------------------------------------


def _sum_then_normalize(r, g: _Groups, scale_rewards: str, reward_weights, eps: float, single: str):
    """Weighted sum of the reward functions, then ``(r - mean_g r) / (std + eps)``."""
    total = _combine_rewards(r, reward_weights)
    adv = _relative(total, g, scale=scale_rewards == "group", eps=eps, single=single)
    return adv / (_batch_std(total) + eps) if scale_rewards == "batch" else adv


def _normalize_then_sum(r, g: _Groups, scale_rewards: str, reward_weights, eps: float, single: str):
    """GDPO: group-normalise each reward function, weight-sum, normalise the sum over the batch."""
    per_func = r if r.dim() == 2 else r.unsqueeze(1)
    normed = _relative(per_func, g, scale=True, eps=eps, single=single)
    total = (normed * _reward_weights(per_func, reward_weights)).nansum(dim=1)
    total = torch.where(torch.isnan(per_func).all(dim=1), torch.full_like(total, float("nan")), total)
    return (total - torch.nanmean(total)) / (_batch_std(total) + eps)


def group_advantages(
    rewards: torch.Tensor,
    *,
    num_generations: int | None = None,
    group_ids: torch.Tensor | None = None,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    reward_weights: torch.Tensor | Sequence[float] | None = None,
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize",
    single_completion: SingleCompletion = "zero",
    eps: float = ADV_STD_EPS,
) -> torch.Tensor:
    """GRPO group-relative advantages ``[N]`` (Shao et al. 2024, arXiv:2402.03300; TRL
    ``GRPOTrainer``; verl ``grpo`` with ``index``; GDPO's ``normalize_then_sum`` as TRL's
    ``multi_objective_aggregation``).

    ``rewards``: ``[N]`` combined rewards, or ``[N, K]`` one column per reward function (combined
    with ``reward_weights`` by a NaN-skipping sum; a row whose K rewards are all NaN is
    unscorable). Groups: ``num_generations`` (contiguous, equal) or ``group_ids [N]`` (any sizes).

    ``multi_objective_aggregation="sum_then_normalize"`` (default):
    ``A_i = (r_i - mean_g r) / (std r + eps)``, the std taken over the group (``"group"``) or the
    whole batch (``"batch"``); ``"none"`` keeps ``r_i - mean_g r`` (Dr. GRPO; verl
    ``norm_adv_by_std_in_grpo=False``). ``"normalize_then_sum"`` (GDPO): each reward function is
    group-normalised first, the weighted sum is then normalised over the batch (``scale_rewards``
    is not used there). A group whose rewards are all equal gets 0. ``single_completion``: see the
    module docstring. Pass the gathered global batch (statistics are over what you pass).
    """
    check_choice("scale_rewards", scale_rewards, _SCALE_MODES)
    check_choice("multi_objective_aggregation", multi_objective_aggregation, _AGGREGATIONS)
    check_choice("single_completion", single_completion, _SINGLE)
    r = rewards.to(compute_dtype(rewards))
    g = _groups(r.shape[0], r.device, num_generations, group_ids)
    aggregate = (
        _sum_then_normalize if multi_objective_aggregation == "sum_then_normalize" else _normalize_then_sum
    )
    adv = aggregate(r, g, scale_rewards, reward_weights, eps, single_completion)
    return torch.nan_to_num(adv, nan=0.0)


def rloo_advantages(
    rewards: torch.Tensor,
    *,
    num_generations: int | None = None,
    group_ids: torch.Tensor | None = None,
    reward_weights: torch.Tensor | Sequence[float] | None = None,
    sequence_kl: torch.Tensor | None = None,
    beta: float = 0.05,
    normalize_advantages: bool = False,
    reward_clip_range: tuple[float, float] | None = None,
    single_completion: SingleCompletion = "zero",
    eps: float = ADV_STD_EPS,
) -> torch.Tensor:
    """RLOO leave-one-out advantages ``[N]`` (Ahmadian et al. 2024, arXiv:2402.14740; TRL
    ``RLOOTrainer``; ``normalize_advantages``: REINFORCE++-style batch normalisation, Hu 2025,
    arXiv:2501.03262).

    ``R_i = clip(r_i) - beta * sequence_kl_i``, then ``A_i = R_i - (sum_j R_j - R_i) / (k_s - 1)``
    over the ``k_s`` scorable completions of the group (``num_generations`` or ``group_ids``);
    optional batch normalisation ``(A - mean) / (std + eps)`` (Bessel std). Unscorable completions
    (NaN reward; with ``[N, K]`` rewards: all K NaN) get 0; single-completion groups as
    ``single_completion`` says (``"reward"``: ``A = R``).

    ``sequence_kl``: ``[N]`` per-sequence KL folded into the reward, RLOO's summed k1
    ``sum_t m_t (old_logps - ref_logps)``, e.g.
    ``(kl_estimate(old_logps, ref_logps, kind="k1", mask=m)).sum(-1)``; ``None`` = no KL term.
    """
    check_choice("single_completion", single_completion, _SINGLE)
    r = _combine_rewards(rewards.to(compute_dtype(rewards, sequence_kl)), reward_weights)
    if reward_clip_range is not None:
        lo, hi = reward_clip_range
        r = r.clamp(min=lo, max=hi)
    if sequence_kl is not None and beta != 0.0:
        if sequence_kl.shape != r.shape:
            raise ValueError(f"sequence_kl must have shape {tuple(r.shape)}, got {tuple(sequence_kl.shape)}")
        r = r - beta * sequence_kl.to(r.dtype)
    g = _groups(r.shape[0], r.device, num_generations, group_ids)
    valid = ~torch.isnan(r)
    count = _segment_sum(valid.to(r.dtype), g)[g.index]
    total = _segment_sum(torch.where(valid, r, torch.zeros_like(r)), g)[g.index]
    baseline = (total - r) / (count - 1)
    if single_completion == "reward":
        baseline = torch.where(count == 1, torch.zeros_like(baseline), baseline)
    adv = r - baseline
    if normalize_advantages:
        adv = (adv - torch.nanmean(adv)) / (_nanstd(adv) + eps)
    return torch.nan_to_num(adv, nan=0.0)


# --------------------------------------------------------------------------------------------
# ReMax, OPO, pass@k
# --------------------------------------------------------------------------------------------


def remax_advantages(rewards: torch.Tensor, greedy_rewards: torch.Tensor) -> torch.Tensor:
    """ReMax advantages ``[N]``: ``A_i = r_i - r(ŷ_i)`` with ``ŷ_i`` the greedy completion of
    completion ``i``'s prompt (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient
    Reinforcement Learning Method for Aligning Large Language Models", arXiv:2310.10505; verl
    ``remax`` with ``reward_baselines``).

    ``rewards``, ``greedy_rewards``: ``[N]`` (repeat the greedy reward over the completions of a
    prompt). NaN in either gives 0.
    """
    r = _outcome("rewards", rewards, greedy_rewards)
    check_same_shape("rewards", rewards, greedy_rewards=greedy_rewards)
    return torch.nan_to_num(r - greedy_rewards.to(r.dtype), nan=0.0)


def opo_advantages(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    *,
    num_generations: int | None = None,
    group_ids: torch.Tensor | None = None,
    single_completion: SingleCompletion = "zero",
) -> torch.Tensor:
    """OPO advantages ``[N]`` with the length-weighted group baseline
    ``b_g = sum_j n_j r_j / sum_j n_j`` (Hao et al. 2025, "On-Policy RL with Optimal Reward
    Baseline", arXiv:2505.23585; verl ``opo``): ``A_i = r_i - b_g``.

    ``rewards [N]``; ``lengths [N]``: completion token counts (e.g. ``mask.sum(-1)``), ``>= 0``. A
    group whose scorable completions all have length 0 uses the plain mean. Unscorable completions
    get 0 and stay out of the baseline; single-completion groups as ``single_completion`` says.
    """
    check_choice("single_completion", single_completion, _SINGLE)
    r = _outcome("rewards", rewards)
    check_same_shape("rewards", rewards, lengths=lengths)
    n = lengths.to(device=r.device, dtype=r.dtype)
    if bool((n < 0).any()):
        raise ValueError("lengths must be >= 0")
    g = _groups(r.shape[0], r.device, num_generations, group_ids)
    valid = ~torch.isnan(r)
    zero = torch.zeros_like(r)
    weighted = _segment_sum(torch.where(valid, n * r, zero), g)
    total_len = _segment_sum(torch.where(valid, n, zero), g)
    mean = _group_moments(r, g)[0]
    baseline = torch.where(total_len[g.index] > 0, weighted[g.index] / total_len[g.index], mean)
    if single_completion == "reward":
        count = _segment_sum(valid.to(r.dtype), g)[g.index]
        baseline = torch.where(count == 1, zero, baseline)
    return torch.nan_to_num(r - baseline, nan=0.0)


def passk_advantages(
    rewards: torch.Tensor,
    *,
    num_generations: int | None = None,
    group_ids: torch.Tensor | None = None,
    scale_rewards: Literal["group", "none"] = "group",
    single_completion: SingleCompletion = "zero",
    eps: float = ADV_STD_EPS,
) -> torch.Tensor:
    """Pass@k advantages ``[N]`` for ``k`` = the group size: the leave-one-out estimator of the
    gradient of ``E[max_j r_j]`` (Tang et al. 2025, "Optimizing Language Models for Inference Time
    Objectives using Reinforcement Learning", arXiv:2503.19595; verl ``grpo_passk``).

    With the baseline ``max_{j != i} r_j``, only the best completion of a group has a non-zero
    advantage: ``A_best = r_max - r_second`` (0 when the best reward is tied), every other
    completion 0; ``scale_rewards="group"`` divides by the group's unbiased std ``+ eps`` (verl's
    ``norm_adv_by_std_in_grpo``). The best completion of a tie is the first one. Unscorable
    completions get 0 and are not ranked; a single-completion group gets 0 (``"zero"``) or
    ``r`` (``"reward"``: baseline 0, std 1; verl raises instead).
    """
    check_choice("scale_rewards", scale_rewards, ("group", "none"))
    check_choice("single_completion", single_completion, _SINGLE)
    r = _outcome("rewards", rewards)
    g = _groups(r.shape[0], r.device, num_generations, group_ids)
    n = r.shape[0]
    valid = ~torch.isnan(r)
    ninf = torch.full((g.count,), -torch.inf, dtype=r.dtype, device=r.device)
    scores = torch.where(valid, r, torch.full_like(r, -torch.inf))
    best = ninf.scatter_reduce(0, g.index, scores, "amax")[g.index]
    pos = torch.arange(n, device=r.device)
    first = torch.full((g.count,), n, device=r.device).scatter_reduce(
        0, g.index, torch.where(valid & (scores == best), pos, n), "amin"
    )
    top = pos == first[g.index]
    second = ninf.scatter_reduce(0, g.index, torch.where(top, -torch.inf, scores), "amax")[g.index]
    _, std, count = _group_moments(r, g)
    one = count == 1
    if single_completion == "reward":
        second = torch.where(one, torch.zeros_like(second), second)
        std = torch.where(one, torch.ones_like(std), std)
    ranked = top & ((count > 1) | (single_completion == "reward"))
    gap = torch.where(ranked, best - second, torch.zeros_like(r))
    if scale_rewards == "group":
        gap = torch.where(gap != 0, gap / (std + eps), gap)
    return torch.nan_to_num(gap, nan=0.0)


# --------------------------------------------------------------------------------------------
# per-token: whitening, GAE, REINFORCE++
# --------------------------------------------------------------------------------------------


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    shift_mean: bool = True,
    eps: float = WHITEN_VAR_EPS,
) -> torch.Tensor:
    """Masked whitening ``(x - mean) / sqrt(var + eps)`` (TRL ``masked_whiten``).

    Mean and unbiased (Bessel) variance over the masked positions of the whole tensor.
    ``shift_mean=False`` adds the mean back (reward whitening: scale only). Masked positions are
    returned as 0. Raises ValueError with fewer than two valid positions (the unbiased variance is
    undefined). Host sync: reads the count once.
    """
    dt = compute_dtype(values)
    x = values.to(dt)
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    check_same_shape("values", values, mask=m)
    n = m.sum()
    if int(n) < 2:
        raise ValueError(f"whiten needs at least 2 valid positions, got {int(n)}")
    zero = torch.zeros((), dtype=dt, device=x.device)
    xm = torch.where(m, x, zero)
    mean = xm.sum() / n
    var = torch.where(m, (xm - mean) ** 2, zero).sum() / (n - 1)
    out = (xm - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, zero)


class GAEOutput(NamedTuple):
    """``advantages [B, T]`` and ``returns = advantages + values [B, T]``, zero where masked."""

    advantages: torch.Tensor
    returns: torch.Tensor


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> GAEOutput:
    """Generalised advantage estimation, reverse scan over ``T`` (Schulman et al. 2015,
    arXiv:1506.02438; TRL ``PPOTrainer``).

    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next``,
    ``R_t = A_t + V_t``, with ``V_next = A_next = 0`` after the last valid position.

    ``rewards``, ``values``: ``[B, T]``; ``mask``: ``[B, T]`` valid positions (default: all). A
    masked position is skipped: it gets ``A = R = 0`` and ``V_next`` / ``A_next`` carry across it,
    so for right padding this equals TRL's scan on zero-filled padding, and holes (e.g. tool
    tokens) are bridged. Rewards at masked positions are ignored. Defaults gamma=1.0, lam=0.95 (TRL
    PPOConfig). Computed in float32 (float64 if an input is); no gradient flows (rollout quantity).
    """
    check_same_shape("rewards", rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {tuple(rewards.shape)}")
    dt = compute_dtype(rewards, values)
    with torch.no_grad():
        r, v = rewards.to(dt), values.to(dt)
        m = torch.ones_like(r, dtype=torch.bool) if mask is None else mask.bool()
        b, t_len = r.shape
        next_v = torch.zeros(b, dtype=dt, device=r.device)
        next_a = torch.zeros(b, dtype=dt, device=r.device)
        adv = torch.zeros_like(r)
        for t in range(t_len - 1, -1, -1):
            a_t = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
            m_t = m[:, t]
            adv[:, t] = torch.where(m_t, a_t, torch.zeros_like(a_t))
            next_a = torch.where(m_t, a_t, next_a)
            next_v = torch.where(m_t, v[:, t], next_v)
        returns = torch.where(m, adv + v, torch.zeros_like(adv))
    return GAEOutput(adv, returns)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ advantages ``[B, T]``: the discounted return-to-go ``G_t = sum_{s >= t}
    gamma^(s-t) r_s`` over the valid positions, whitened over every valid token of the batch
    (Hu 2025, "REINFORCE++", arXiv:2501.03262; verl ``reinforce_plus_plus``, OpenRLHF
    ``reinforce``).

    ``rewards [B, T]`` per-token rewards, e.g. :func:`alignops.rl.ppo_rewards` (the score at the
    last token plus ``-kl_coef * kl_t``); ``mask [B, T]``. Masked positions are skipped (their
    rewards ignored, the return carried across holes, as :func:`compute_gae` with ``V = 0`` and
    ``lam = 1``) and get 0. Needs at least two valid tokens (see :func:`whiten`).
    """
    returns = compute_gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0).advantages
    return whiten(returns, mask)


def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_generations: int | None = None,
    group_ids: torch.Tensor | None = None,
    single_completion: SingleCompletion = "zero",
) -> torch.Tensor:
    """REINFORCE++-baseline advantages ``[N, T]`` (Hu 2025, arXiv:2501.03262; verl
    ``reinforce_plus_plus_baseline``, OpenRLHF ``reinforce_baseline``): the group-mean baseline
    ``r_i - mean_g r`` on every token of completion ``i``, then whitened over every valid token of
    the batch (token-weighted mean, Bessel variance).

    ``rewards [N]`` (NaN = unscorable: its tokens get 0 and stay out of the whitening), ``mask
    [N, T]``; groups by ``num_generations`` or ``group_ids``; single-completion groups as
    ``single_completion`` says. Needs at least two valid tokens of scorable completions.
    """
    check_choice("single_completion", single_completion, _SINGLE)
    r = _outcome("rewards", rewards)
    if mask.dim() != 2 or mask.shape[0] != r.shape[0]:
        raise ValueError(f"mask must be [N, T] with N={r.shape[0]}, got {tuple(mask.shape)}")
    g = _groups(r.shape[0], r.device, num_generations, group_ids)
    centred = torch.nan_to_num(_relative(r, g, scale=False, eps=0.0, single=single_completion), nan=0.0)
    keep = mask.bool() & ~torch.isnan(r).unsqueeze(1)
    return whiten(centred.unsqueeze(1).expand(mask.shape), keep)
