"""Policy-gradient RL helpers on per-token log-probs (shared SPEC §4, §5).

* KL estimators k1 / k2 / k3 per token (SPEC §4), with the sign conventions of Schulman's note:
  samples come from ``q`` = the policy, ``log r = log p - log q = ref_logps - logps``.
* Advantage helpers: GRPO group advantages (SPEC §5.3: group / batch / none scaling, Bessel and
  NaN-aware std, GDPO ``normalize_then_sum``), RLOO leave-one-out advantages (SPEC §5.6), the PPO
  per-token reward with the KL folded in, masked whitening and the GAE reverse scan (SPEC §5.2).
* The fused path: :func:`grpo_loss_from_hidden` and :func:`ppo_loss_from_hidden` compute the
  policy's per-token log-probs (and entropy) straight from ``hidden`` and the LM-head ``weight``
  with :func:`alignops.linear_logprobs`, so the ``[tokens, vocab]`` logits never exist, then call
  :func:`alignops.losses.grpo_loss` / :func:`alignops.losses.ppo_loss`.

Every function here is written for right- or left-padded ``[B, T]`` batches with a completion
mask ``m`` (``1`` = scored token); masked positions never leak NaN or Inf into values or gradients.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch

if TYPE_CHECKING:
    from .losses._common import LossOutput

__all__ = [
    "GAEOutput",
    "PPORewards",
    "compute_gae",
    "group_advantages",
    "grpo_loss_from_hidden",
    "kl_estimate",
    "ppo_loss_from_hidden",
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


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (tests), else float32 (bf16 / fp16 inputs are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _check_choice(name: str, value: str, choices: Sequence[str], hint: str = "") -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(map(repr, choices))}{hint}")


def _check_same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and tuple(t.shape) != tuple(ref.shape):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} (the shape of {ref_name})"
            )


# --------------------------------------------------------------------------------------------
# KL estimators (SPEC §4)
# --------------------------------------------------------------------------------------------


def kl_estimate(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    kind: KLKind = "k1",
    mask: torch.Tensor | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """Per-token estimate of ``KL(q || p)`` from samples of ``q`` (SPEC §4).

    ``q`` is the sampling policy (``logps``, the policy's per-token log-probs ``[...]``) and ``p``
    the reference (``ref_logps``, same shape). With ``log r = ref_logps - logps``:

    * ``k1 = -log r``                 unbiased, can be negative per token;
    * ``k2 = (log r)**2 / 2``         biased, always >= 0;
    * ``k3 = (exp(log r) - 1) - log r`` unbiased, always >= 0 (GRPO / GMPO use it with
      ``r = pi_ref / pi_theta``).

    ``clamp``: if set, ``log r`` is clamped to ``[-clamp, clamp]`` before any estimator is
    evaluated (SPEC §4 suggests 20 for k3, where ``exp`` could overflow); the clamp also stops the
    gradient outside that range. Default ``None``: no clamp, as TRL.
    ``mask`` (same shape, bool / 0-1): masked positions return exactly 0 and get zero gradient,
    even if the inputs hold Inf / NaN there. Computed in float32 (float64 if an input is).
    Returns a tensor of ``logps.shape``.
    """
    _check_choice("kind", kind, _KL_KINDS)
    _check_same_shape("logps", logps, ref_logps=ref_logps, mask=mask)
    if clamp is not None and not clamp > 0:
        raise ValueError(f"clamp must be > 0 or None, got {clamp}")
    dt = _compute_dtype(logps, ref_logps)
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
# Group statistics (SPEC §5.3, §5.6)
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


def group_advantages(
    rewards: torch.Tensor,
    *,
    num_generations: int,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    reward_weights: torch.Tensor | Sequence[float] | None = None,
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize",
    eps: float = ADV_STD_EPS,
) -> torch.Tensor:
    """GRPO group-relative advantages ``[N]`` (SPEC §5.3, TRL ``GRPOTrainer``).

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
    _check_choice("scale_rewards", scale_rewards, _SCALE_MODES)
    _check_choice("multi_objective_aggregation", multi_objective_aggregation, _AGGREGATIONS)
    r = rewards.to(_compute_dtype(rewards))
    if multi_objective_aggregation == "sum_then_normalize":
        total = _combine_rewards(r, reward_weights)
        grouped = _grouped(total, num_generations)
        adv = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).reshape(-1)
        if scale_rewards == "group":
            std = _nanstd(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1)
            if num_generations == 1:
                std = torch.zeros_like(std)
            adv = adv / (std + eps)
        elif scale_rewards == "batch":
            std = _nanstd(total) if total.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
            adv = adv / (std + eps)
    else:
        per_func = r if r.dim() == 2 else r.unsqueeze(1)
        grouped = _grouped(per_func, num_generations)  # [P, G, K]
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = _nanstd(grouped, dim=1, keepdim=True)
        if num_generations == 1:
            std_k = torch.zeros_like(std_k)
        normed = ((grouped - mean_k) / (std_k + eps)).reshape(per_func.shape)
        w = _reward_weights(per_func, reward_weights)
        total = (normed * w).nansum(dim=1)
        total = torch.where(torch.isnan(per_func).all(dim=1), torch.full_like(total, float("nan")), total)
        std = _nanstd(total) if total.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
        adv = (total - torch.nanmean(total)) / (std + eps)
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
    """RLOO leave-one-out advantages ``[N]`` (SPEC §5.6, TRL ``RLOOTrainer``).

    ``R_i = clip(r_i) - beta * sequence_kl_i``, then ``A_i = R_i - (sum_j R_j - R_i) / (k_s - 1)``
    over the ``k_s`` scorable completions of the prompt; optional batch normalisation
    ``(A - mean) / (std + eps)`` (REINFORCE++ style, Bessel std). Unscorable completions (NaN
    reward; with ``[N, K]`` rewards: all K NaN) and groups with a single scorable completion get 0.

    ``sequence_kl``: ``[N]`` per-sequence KL folded into the reward, RLOO's summed k1
    ``sum_t m_t (old_logps - ref_logps)``, e.g.
    ``(kl_estimate(old_logps, ref_logps, kind="k1", mask=m)).sum(-1)``; ``None`` = no KL term.
    """
    r = _combine_rewards(rewards.to(_compute_dtype(rewards, sequence_kl)), reward_weights)
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
    overlong filtering, SPEC §5.3). Rows with no scored token are not truncated.
    """
    _check_same_shape("completion_ids", completion_ids, completion_mask=completion_mask)
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
    """Sampler-mismatch correction ``rho_IS = exp(old_logps - sampling_logps)`` (SPEC §5.3; TRL vLLM IS).

    ``old_logps`` (trainer's log-probs of the sampled tokens), ``sampling_logps`` (the inference
    engine's), ``mask``: ``[B, T]``. ``token_*`` modes give ``[B, T]`` ratios, ``sequence_*``
    modes ``[B, 1]`` (exp of the summed difference). ``*_truncate`` clamps to
    ``[clip_min, clip_max]``; ``*_mask`` sets ratios outside the range to 0 (drops them). Masked
    positions and NaN sampler log-probs count as no mismatch (ratio 1 before truncation / masking).
    Defaults as TRL ``GRPOConfig``. Pass the result to ``grpo_loss(importance_sampling_ratio=...)``.
    """
    _check_choice("mode", mode, _IS_MODES)
    _check_same_shape("old_logps", old_logps, sampling_logps=sampling_logps, mask=mask)
    dt = _compute_dtype(old_logps, sampling_logps)
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
# PPO helpers (SPEC §5.1, §5.2)
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
    """PPO per-token reward with the KL folded in (SPEC §5.1-§5.2 step 1; TRL ``PPOTrainer``).

    ``r_t = -kl_coef * kl_t`` with ``kl_t`` = k1 or k3 of ``log r = ref_logps - logps`` (``logps``
    are the rollout / old log-probs ``[B, T]``), and the scalar ``scores [B]`` added at
    ``score_index [B]`` (default: the last scored token of each row; rows with no scored token get
    no score). TRL adds the score one position later (``seq_len + 1``, or ``seq_len`` when that is
    past the end) and runs GAE over that extra position: pass that ``score_index`` and the value
    mask (``mask`` plus that position) to :func:`compute_gae` to reproduce it.
    """
    _check_choice("kl_estimator", kl_estimator, ("k1", "k3"))
    _check_same_shape("logps", logps, ref_logps=ref_logps, mask=mask)
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
    """Masked whitening ``(x - mean) / sqrt(var + eps)`` (SPEC §5.2 steps 2-3, TRL ``masked_whiten``).

    Mean and unbiased (Bessel) variance over the masked positions of the whole tensor.
    ``shift_mean=False`` adds the mean back (reward whitening: scale only). Masked positions are
    returned as 0. Raises ValueError with fewer than two valid positions (the unbiased variance is
    undefined). Host sync: reads the count once.
    """
    dt = _compute_dtype(values)
    x = values.to(dt)
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    _check_same_shape("values", values, mask=m)
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
    """Generalised advantage estimation, reverse scan over ``T`` (SPEC §5.2 step 3, arXiv 1506.02438).

    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next``,
    ``R_t = A_t + V_t``, with ``V_next = A_next = 0`` after the last valid position.

    ``rewards``, ``values``: ``[B, T]``; ``mask``: ``[B, T]`` valid positions (default: all). A
    masked position is skipped: it gets ``A = R = 0`` and ``V_next`` / ``A_next`` carry across it,
    so for right padding this equals TRL's scan on zero-filled padding, and holes (e.g. tool
    tokens) are bridged. Rewards at masked positions are ignored. Defaults gamma=1.0, lam=0.95 (TRL
    PPOConfig). Computed in float32 (float64 if an input is); no gradient flows (rollout quantity).
    """
    _check_same_shape("rewards", rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {tuple(rewards.shape)}")
    dt = _compute_dtype(rewards, values)
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


# --------------------------------------------------------------------------------------------
# Fused path: hidden states -> per-token log-probs (+ entropy) -> loss, no [N, V] logits
# --------------------------------------------------------------------------------------------


def _check_options(fn, options: dict, reserved: Sequence[str]) -> None:
    params = inspect.signature(fn).parameters
    valid = sorted(
        n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in reserved
    )
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, bad))}; "
            f"valid options of {fn.__name__}: {', '.join(valid)}"
        )


def _policy_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    return_entropy: bool,
):
    from . import linear_logprobs  # the public engine, resolved at call time (no import cycle)

    if hidden.dim() != 3 or ids.shape != hidden.shape[:2]:
        raise ValueError(
            f"need hidden [B, T, H] and ids [B, T]; got {tuple(hidden.shape)} and {tuple(ids.shape)}"
        )
    _check_same_shape("ids", ids, mask=mask)
    valid = mask.bool() & (ids != ignore_index)
    targets = torch.where(valid, ids, torch.full_like(ids, ignore_index))
    out = linear_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        return_entropy=return_entropy,
    )
    return out.logps, out.entropy, valid


def grpo_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = True,
    **grpo_options,
) -> LossOutput:
    """GRPO-family loss straight from hidden states (SPEC §1.1 + §5.3), never building ``[N, V]`` logits.

    ``hidden [B, T, H]`` are the states that predict ``completion_ids [B, T]`` (already shifted:
    ``hidden[:, t]`` scores ``completion_ids[:, t]``); ``weight [V, H]`` (+ ``bias [V]``) is the LM
    head. The policy's per-token log-probs ``log softmax(softcap(h W^T + b) / temperature)[y]``
    and, with ``return_entropy``, the per-token entropy come from one
    :func:`alignops.linear_logprobs` pass; masked positions and ``ignore_index`` ids are not
    scored. ``old_logps [B, T]`` (``None``: on-policy, ``logps.detach()``), ``ref_logps [B, T]``
    and ``advantages [B]`` / ``[B, T]`` are tensors computed elsewhere (e.g. cached reference
    log-probs). ``grpo_options`` are the keyword options of :func:`alignops.losses.grpo_loss`
    (``loss_type``, ``beta``, ``epsilon``, ``num_items``, ...); the entropy is passed on for the
    ``entropy`` metric, ``entropy_coef`` and ``top_entropy_quantile``.

    Gradients reach ``hidden``, ``weight`` and ``bias`` through the fused engine. Returns the
    :class:`~alignops.losses.LossOutput` of ``grpo_loss``.
    """
    from .losses.rl import grpo_loss  # losses import this module; resolve at call time

    _check_options(grpo_loss, grpo_options, reserved=("ref_logps", "entropy"))
    need_entropy = (
        return_entropy
        or grpo_options.get("entropy_coef", 0.0) != 0.0
        or grpo_options.get("top_entropy_quantile", 1.0) < 1.0
    )
    truncated = grpo_options.get("mask_truncated")
    if truncated is not None and truncated.shape == completion_mask.shape[:1]:
        # truncated rows are never scored: leave them out of the vocab projection as well
        completion_mask = completion_mask.bool() & ~truncated.bool().unsqueeze(1)
    logps, entropy, valid = _policy_logps(
        hidden,
        weight,
        completion_ids,
        completion_mask,
        bias=bias,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        return_entropy=need_entropy,
    )
    return grpo_loss(
        logps, old_logps, advantages, valid, ref_logps=ref_logps, entropy=entropy, **grpo_options
    )


def ppo_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = True,
    ptx_hidden: torch.Tensor | None = None,
    ptx_labels: torch.Tensor | None = None,
    **ppo_options,
) -> LossOutput:
    """PPO / PPO-ptx loss straight from hidden states (SPEC §5.1-§5.2), no ``[N, V]`` logits.

    As :func:`grpo_loss_from_hidden` for the policy part: ``hidden [B, T, H]`` scores
    ``response_ids [B, T]`` under ``weight [V, H]`` (+ ``bias``) at ``temperature`` (TRL PPO
    samples at 0.7 and divides logits by ``temperature + 1e-7``: pass the value you sampled with).
    Values, returns and old values come in through ``ppo_options`` (the keyword options of
    :func:`alignops.losses.ppo_loss`).

    PPO-ptx (SPEC §5.1): ``ptx_hidden [M, H]`` (any leading dims) with ``ptx_labels`` (already
    aligned to ``ptx_hidden``, ``ignore_index`` allowed) are scored with the same ``weight`` /
    ``bias`` / ``softcap`` at temperature 1 by :func:`alignops.linear_cross_entropy`, and
    ``ptx_coef * NLL`` is added (``ptx_coef`` in ``ppo_options``; InstructGPT's gamma).
    """
    from .losses.rl import ppo_loss  # losses import this module; resolve at call time

    reserved = (
        "entropy",
        "ptx_hidden",
        "ptx_weight",
        "ptx_labels",
        "ptx_bias",
        "ptx_softcap",
        "ptx_ignore_index",
    )
    _check_options(ppo_loss, ppo_options, reserved=reserved)
    if (ptx_hidden is None) != (ptx_labels is None):
        raise ValueError("pass ptx_hidden and ptx_labels together")
    need_entropy = return_entropy or ppo_options.get("entropy_coef", 0.0) != 0.0
    logps, entropy, valid = _policy_logps(
        hidden,
        weight,
        response_ids,
        response_mask,
        bias=bias,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        return_entropy=need_entropy,
    )
    ptx = {}
    if ptx_hidden is not None:
        ptx = dict(
            ptx_hidden=ptx_hidden,
            ptx_weight=weight,
            ptx_labels=ptx_labels,
            ptx_bias=bias,
            ptx_softcap=softcap,
            ptx_ignore_index=ignore_index,
        )
    return ppo_loss(logps, old_logps, advantages, valid, entropy=entropy, **ptx, **ppo_options)
