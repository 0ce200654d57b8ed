"""RL helpers on per-token log-probs: KL estimators, advantage estimators, PPO rewards.

* KL estimators k1 / k2 / k3 per token (Schulman 2020, "Approximating KL Divergence",
  joschu.net/blog/kl-approx.html), with the sign conventions of that note: samples come from
  ``q`` = the policy, ``log r = log p - log q = ref_logps - logps``.
* Advantage helpers: GRPO group advantages (Shao et al. 2024, arXiv:2402.03300; TRL
  ``GRPOTrainer``: group / batch / none scaling, Bessel and NaN-aware std, GDPO
  ``normalize_then_sum``), RLOO leave-one-out advantages (Ahmadian et al. 2024,
  arXiv:2402.14740), the PPO per-token reward with the KL folded in, masked whitening and the GAE
  reverse scan (Schulman et al. 2015, arXiv:1506.02438; TRL ``PPOTrainer``).
* Rollout helpers: the truncated-completion mask and the sampler importance ratio.

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
from typing import Literal, NamedTuple

import torch

from ._checks import check_choice, check_same_shape
from .kernels._common import compute_dtype

__all__ = [
    "GAEOutput",
    "PPORewards",
    "compute_gae",
    "group_advantages",
    "kl_estimate",
    "ppo_rewards",
    "rloo_advantages",
    "sampling_importance_ratio",
    "truncated_mask",
    "whiten",
]

KLKind = Literal["k1", "k2", "k3"]
_KL_KINDS = ("k1", "k2", "k3")
_SCALE_MODES = ("group", "batch", "none")
_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")

# Added to the std before dividing (TRL GRPO / RLOO); keeps an all-equal group at advantage 0
# instead of 0 / 0.
ADV_STD_EPS = 1e-4
# Added to the variance inside rsqrt when whitening (TRL ``masked_whiten``).
WHITEN_VAR_EPS = 1e-8


# --------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------


def kl_estimate(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    kind: KLKind = "k1",
    mask: torch.Tensor | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """Per-token estimate of ``KL(q || p)`` from samples of ``q`` (Schulman 2020, "Approximating KL
    Divergence").

    ``q`` is the sampling policy (``logps``, the policy's per-token log-probs ``[...]``) and ``p``
    the reference (``ref_logps``, same shape). With ``log r = ref_logps - logps``:

    * ``k1 = -log r``                 unbiased, can be negative per token;
    * ``k2 = (log r)**2 / 2``         biased, always >= 0;
    * ``k3 = (exp(log r) - 1) - log r`` unbiased, always >= 0 (GRPO / GMPO use it with
      ``r = pi_ref / pi_theta``).

    ``clamp``: if set, ``log r`` is clamped to ``[-clamp, clamp]`` before any estimator is
    evaluated (e.g. 20 for k3, where ``exp`` could overflow); the clamp also stops the
    gradient outside that range. Default ``None``: no clamp, as TRL.
    ``mask`` (same shape, bool / 0-1): masked positions return exactly 0 and get zero gradient,
    even if the inputs hold Inf / NaN there. Computed in float32 (float64 if an input is).
    Returns a tensor of ``logps.shape``.
    """
    check_choice("kind", kind, _KL_KINDS)
    check_same_shape("logps", logps, ref_logps=ref_logps, mask=mask)
    if clamp is not None and not clamp > 0:
        raise ValueError(f"clamp must be > 0 or None, got {clamp}")
    dt = compute_dtype(logps, ref_logps)
    log_r = ref_logps.to(dt) - logps.to(dt)
    if mask is not None:
        log_r = torch.where(mask.bool(), log_r, torch.zeros((), dtype=dt, device=log_r.device))
    if clamp is not None:
        log_r = log_r.clamp(-clamp, clamp)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r * log_r
    return torch.expm1(log_r) - log_r


# --------------------------------------------------------------------------------------------
# Group statistics
# --------------------------------------------------------------------------------------------


def _nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased (Bessel) std ignoring NaN; NaN where fewer than two values are present."""
    valid = ~torch.isnan(x)
    if dim is None:
        x, valid, dim = x.reshape(-1), valid.reshape(-1), 0
    count = valid.sum(dim, keepdim=True).to(x.dtype)
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    sq = torch.where(valid, (x - mean) ** 2, torch.zeros((), dtype=x.dtype, device=x.device))
    var = sq.sum(dim, keepdim=True) / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std if keepdim else std.squeeze(dim)


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


def _grouped(x: torch.Tensor, num_generations: int) -> torch.Tensor:
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if x.shape[0] % num_generations != 0:
        raise ValueError(
            f"the number of completions ({x.shape[0]}) is not a multiple of "
            f"num_generations ({num_generations})"
        )
    return x.view(-1, num_generations, *x.shape[1:])


def _batch_std(x: torch.Tensor) -> torch.Tensor:
    """NaN-aware Bessel std of all of ``x``; 0 for a single value."""
    return _nanstd(x) if x.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)


def _group_std(grouped: torch.Tensor, num_generations: int) -> torch.Tensor:
    """NaN-aware Bessel std over each group (dim 1, kept); 0 for groups of one completion."""
    std = _nanstd(grouped, dim=1, keepdim=True)
    return torch.zeros_like(std) if num_generations == 1 else std


def _sum_then_normalize(r, num_generations: int, scale_rewards: str, reward_weights, eps: float):
    """Weighted sum of the reward functions, then ``(r - mean_g r) / (std + eps)``."""
    total = _combine_rewards(r, reward_weights)
    grouped = _grouped(total, num_generations)
    adv = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        return adv / (_group_std(grouped, num_generations).expand_as(grouped).reshape(-1) + eps)
    if scale_rewards == "batch":
        return adv / (_batch_std(total) + eps)
    return adv


def _normalize_then_sum(r, num_generations: int, scale_rewards: str, reward_weights, eps: float):
    """GDPO: group-normalise each reward function, weight-sum, normalise the sum over the batch."""
    per_func = r if r.dim() == 2 else r.unsqueeze(1)
    grouped = _grouped(per_func, num_generations)  # [P, G, K]
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    normed = ((grouped - mean_k) / (_group_std(grouped, num_generations) + eps)).reshape(per_func.shape)
    total = (normed * _reward_weights(per_func, reward_weights)).nansum(dim=1)
    total = torch.where(torch.isnan(per_func).all(dim=1), torch.full_like(total, float("nan")), total)
    return (total - torch.nanmean(total)) / (_batch_std(total) + eps)


def group_advantages(
    rewards: torch.Tensor,
    *,
    num_generations: int,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    reward_weights: torch.Tensor | Sequence[float] | None = None,
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize",
    eps: float = ADV_STD_EPS,
) -> torch.Tensor:
    """GRPO group-relative advantages ``[N]`` (Shao et al. 2024, arXiv:2402.03300; TRL
    ``GRPOTrainer``; GDPO's ``normalize_then_sum`` as TRL's ``multi_objective_aggregation``).

    ``rewards``: ``[N]`` combined rewards, or ``[N, K]`` one column per reward function (combined
    with ``reward_weights`` by a NaN-skipping sum; a row whose K rewards are all NaN is
    unscorable). Completions of one prompt are contiguous: ``N = P * num_generations``.

    ``multi_objective_aggregation="sum_then_normalize"`` (default):
    ``A_i = (r_i - mean_g r) / (std r + eps)``, the std taken over the group (``"group"``) or the
    whole batch (``"batch"``); ``"none"`` keeps ``r_i - mean_g r``. ``"normalize_then_sum"``
    (GDPO): each reward function is group-normalised first, the weighted sum is then normalised
    over the batch (``scale_rewards`` is not used there).

    Means and stds skip NaN; stds are unbiased (Bessel), and a std over fewer than two values is
    NaN, so a group with a single scorable completion gives advantage 0. Unscorable completions
    get advantage 0. Pass the gathered global batch (statistics are over what you pass).
    """
    check_choice("scale_rewards", scale_rewards, _SCALE_MODES)
    check_choice("multi_objective_aggregation", multi_objective_aggregation, _AGGREGATIONS)
    r = rewards.to(compute_dtype(rewards))
    aggregate = (
        _sum_then_normalize if multi_objective_aggregation == "sum_then_normalize" else _normalize_then_sum
    )
    adv = aggregate(r, num_generations, scale_rewards, reward_weights, eps)
    return torch.nan_to_num(adv, nan=0.0)


def rloo_advantages(
    rewards: torch.Tensor,
    *,
    num_generations: int,
    reward_weights: torch.Tensor | Sequence[float] | None = None,
    sequence_kl: torch.Tensor | None = None,
    beta: float = 0.05,
    normalize_advantages: bool = False,
    reward_clip_range: tuple[float, float] | None = None,
    eps: float = ADV_STD_EPS,
) -> torch.Tensor:
    """RLOO leave-one-out advantages ``[N]`` (Ahmadian et al. 2024, arXiv:2402.14740; TRL
    ``RLOOTrainer``; ``normalize_advantages``: REINFORCE++, Hu 2025, arXiv:2501.03262).

    ``R_i = clip(r_i) - beta * sequence_kl_i``, then ``A_i = R_i - (sum_j R_j - R_i) / (k_s - 1)``
    over the ``k_s`` scorable completions of the prompt; optional batch normalisation
    ``(A - mean) / (std + eps)`` (REINFORCE++ style, Bessel std). Unscorable completions (NaN
    reward; with ``[N, K]`` rewards: all K NaN) and groups with a single scorable completion get 0.

    ``sequence_kl``: ``[N]`` per-sequence KL folded into the reward, RLOO's summed k1
    ``sum_t m_t (old_logps - ref_logps)``, e.g.
    ``(kl_estimate(old_logps, ref_logps, kind="k1", mask=m)).sum(-1)``; ``None`` = no KL term.
    """
    r = _combine_rewards(rewards.to(compute_dtype(rewards, sequence_kl)), reward_weights)
    if reward_clip_range is not None:
        lo, hi = reward_clip_range
        r = r.clamp(min=lo, max=hi)
    if sequence_kl is not None and beta != 0.0:
        if sequence_kl.shape != r.shape:
            raise ValueError(f"sequence_kl must have shape {tuple(r.shape)}, got {tuple(sequence_kl.shape)}")
        r = r - beta * sequence_kl.to(r.dtype)
    grouped = _grouped(r, num_generations)
    if num_generations == 1:
        adv = torch.zeros_like(r)
    else:
        scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True).to(r.dtype)
        baseline = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)
        adv = (grouped - baseline).reshape(-1)
    if normalize_advantages:
        adv = (adv - torch.nanmean(adv)) / (_nanstd(adv) + eps)
    return torch.nan_to_num(adv, nan=0.0)


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
    Defaults as TRL ``GRPOConfig``. Pass the result to ``grpo_loss(importance_sampling_ratio=...)``.
    """
    check_choice("mode", mode, _IS_MODES)
    check_same_shape("old_logps", old_logps, sampling_logps=sampling_logps, mask=mask)
    dt = compute_dtype(old_logps, sampling_logps)
    m = mask.bool()
    diff = torch.nan_to_num(old_logps.to(dt) - sampling_logps.to(dt), nan=0.0)
    diff = torch.where(m, diff, torch.zeros((), dtype=dt, device=diff.device))
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff).detach()
    if mode.endswith("truncate"):
        return ratio.clamp(min=clip_min, max=clip_max)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


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
    kl_estimator: Literal["k1", "k3"] = "k1",
    score_index: torch.Tensor | None = None,
) -> PPORewards:
    """PPO per-token reward with the KL folded in (InstructGPT, Ouyang et al. 2022,
    arXiv:2203.02155; TRL ``experimental.ppo.PPOTrainer``).

    ``r_t = -kl_coef * kl_t`` with ``kl_t`` = k1 or k3 of ``log r = ref_logps - logps`` (``logps``
    are the rollout / old log-probs ``[B, T]``), and the scalar ``scores [B]`` added at
    ``score_index [B]`` (default: the last scored token of each row; rows with no scored token get
    no score). TRL adds the score one position later (``seq_len + 1``, or ``seq_len`` when that is
    past the end) and runs GAE over that extra position: pass that ``score_index`` and the value
    mask (``mask`` plus that position) to :func:`compute_gae` to reproduce it.
    """
    check_choice("kl_estimator", kl_estimator, ("k1", "k3"))
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
    add = torch.where(has_token, scores.to(dt), torch.zeros((), dtype=dt, device=scores.device))
    rewards = non_score.scatter_add(1, score_index.long().view(-1, 1), add.view(-1, 1))
    return PPORewards(rewards, kl, non_score)


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
