"""Terms shared by the policy losses of :mod:`alignops.losses.policy`: the KL penalty, the rollout
correction, the checks of the options one variant reads, and PPO's policy and value terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._checks import check_choice
from ..rl import KL_KINDS, RolloutCorrection, kl_estimate, rollout_correction
from ._aggregate import aggregate, broadcast, check_aggregation
from ._clip import ClipRange, clipped_surrogate
from ._grpo_types import VARIANT_OPTIONS
from ._tokens import Count, TokenBatch, clip_metrics, masked, ratio_stats, restrict, token_mean


@dataclass(frozen=True)
class KLTerm:
    """The KL penalty's estimator (:func:`alignops.rl.kl_estimate` ``kind``) and its two clamps."""

    kind: str = "k3"
    log_ratio_clamp: float | None = None
    estimate_clamp: float | None = None

    def __post_init__(self) -> None:
        check_choice("kl_estimator", self.kind, KL_KINDS)

    def __call__(self, tb: TokenBatch, ref_logps: torch.Tensor) -> torch.Tensor:
        """Per-token estimate of ``log r = ref_logps - logps`` ``[B, T]``, 0 where masked."""
        return kl_estimate(
            tb.lp,
            ref_logps.to(tb.dt),
            kind=self.kind,
            mask=tb.mb,
            clamp=self.log_ratio_clamp,
            estimate_clamp=self.estimate_clamp,
        )


def apply_rollout_correction(
    tb: TokenBatch,
    sampling_logps: torch.Tensor | None,
    correction: RolloutCorrection | None,
    is_ratio: torch.Tensor | None,
) -> tuple[TokenBatch, torch.Tensor | None]:
    """The batch (rejected tokens dropped when the correction says so) and the sampler weights
    ``[B, T]`` / ``[B, 1]`` to multiply the per-token policy loss by (``is_ratio`` when no
    correction is given)."""
    if correction is None:
        return tb, is_ratio
    if not isinstance(correction, RolloutCorrection):
        raise TypeError(f"rollout_correction must be a RolloutCorrection, got {type(correction).__name__}")
    if is_ratio is not None:
        raise ValueError("pass either importance_sampling_ratio or rollout_correction, not both")
    if sampling_logps is None:
        raise ValueError("rollout_correction needs sampling_logps (the rollout engine's log-probs [B, T])")
    weights, keep = rollout_correction(tb.old, sampling_logps, tb.mb, correction)
    return restrict(tb, keep), weights


def check_variant_options(loss_type: str, given: dict[str, object]) -> dict[str, object]:
    """Each given option object has its class and belongs to ``loss_type``; returns every
    variant's options (defaults where not given)."""
    out = {}
    for name, cls in VARIANT_OPTIONS.items():
        o = given.get(name)
        if o is not None and not isinstance(o, cls):
            raise TypeError(f"{name} must be a {cls.__name__}, got {type(o).__name__}")
        if o is not None and name != loss_type:
            raise ValueError(
                f"{name}={cls.__name__}(...) is read by loss_type={name!r} only, not {loss_type!r}"
            )
        out[name] = cls() if o is None else o
    return out


def entropy_mean(entropy: torch.Tensor, tb: TokenBatch) -> torch.Tensor:
    """The logged token mean of the detached entropy."""
    return token_mean(masked(entropy.detach(), tb.mb, tb.dt), tb.m)


def aggregation_options(mode, seq_mean_over, num_items, num_sequences, max_completion_length) -> dict:
    """The keyword arguments of :func:`aggregate`, checked."""
    check_aggregation(mode, seq_mean_over, max_completion_length)
    return dict(
        mode=mode,
        seq_mean_over=seq_mean_over,
        num_items=num_items,
        num_sequences=num_sequences,
        max_completion_length=max_completion_length,
    )


def sequence_losses(losses: torch.Tensor, tb: TokenBatch, loss_agg_mode, agg: dict) -> torch.Tensor:
    """The reduced loss of sequence-level ``losses [B]``: ``sum / (num_sequences or B)`` (TRL) when
    ``loss_agg_mode`` is ``None``, else the mode with each loss on its row's valid tokens."""
    if loss_agg_mode is None:
        return losses.sum() / (tb.shape[0] if agg["num_sequences"] is None else agg["num_sequences"])
    return aggregate(broadcast(losses, tb.m), tb.m, **agg)


def sequence_old_logps(old_logps: torch.Tensor | None, tb: TokenBatch, seq_logps: torch.Tensor):
    """RLOO's sampler sequence log-probs ``[B]`` from ``[B]``, ``[B, T]`` or ``None`` (on-policy)."""
    b, t = tb.shape
    if old_logps is None:
        return seq_logps.detach()
    if old_logps.shape == (b,):
        return old_logps.to(tb.dt)
    if old_logps.shape == (b, t):
        return (masked(old_logps, tb.mb, tb.dt) * tb.m).sum(-1)
    raise ValueError(f"old_logps must be [B] or [B, T] = ({b}, {t}), got {tuple(old_logps.shape)}")


# --------------------------------------------------------------------------------------------
# PPO


@dataclass
class PPOParts:
    """The terms of one PPO loss as they are added up, and the metrics they log."""

    loss: torch.Tensor
    per_token: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def ppo_policy(tb: TokenBatch, adv: torch.Tensor, clip: ClipRange, is_ratio, agg: dict) -> PPOParts:
    """PPO's clipped surrogate ``pg_t = max(-A rho, -A clip(rho, 1 - lo, 1 + hi))`` (dual-clip:
    ``min(pg_t, -c A)`` where ``A < 0``), times the sampler weights, aggregated by ``agg``."""
    d = tb.lp - tb.old
    rho = torch.exp(d)
    s = clipped_surrogate(rho, adv, clip)
    pg_t = s.loss if is_ratio is None else s.loss * is_ratio
    pg_loss = aggregate(pg_t * tb.m, tb.m, **agg)
    r = rho.detach()
    metrics = {
        "loss/policy_avg": pg_loss.detach(),
        "policy/clipfrac_avg": token_mean(s.clipped.to(tb.dt), tb.m),
        "policy/approxkl_avg": token_mean(0.5 * d.detach() ** 2, tb.m),
        "val/ratio": token_mean(r, tb.m),
    }
    if clip.dual is not None:
        metrics["policy/clipfrac_lower"] = token_mean(s.dual.to(tb.dt), tb.m)
    metrics.update(clip_metrics(s.low, s.high, tb.m))
    metrics.update(ratio_stats(rho, tb.m))
    return PPOParts(pg_loss, pg_t, metrics)


def ppo_value(
    tb: TokenBatch,
    values,
    old_values,
    returns,
    value_mask,
    cliprange_value,
    value_num_items: Count | None,
    agg: dict,
) -> PPOParts:
    """``0.5 * agg_vm max((V - R)^2, (V_clip - R)^2)``, ``V_clip`` within ``cliprange_value`` of
    the rollout values. The token count is ``value_num_items``, else ``num_items`` of ``agg`` when
    no ``value_mask`` is given, else ``sum vm``."""
    vmb = tb.mb if value_mask is None else value_mask.bool()
    vm = vmb.to(tb.dt)
    v, ret = masked(values, vmb, tb.dt), masked(returns, vmb, tb.dt)
    vf1 = (v - ret) ** 2
    vf2 = vf1
    if cliprange_value is not None:
        v_old = masked(old_values, vmb, tb.dt)
        vf2 = (torch.clamp(v, v_old - cliprange_value, v_old + cliprange_value) - ret) ** 2
    agg = dict(agg)
    if value_num_items is not None:
        agg["num_items"] = value_num_items
    elif value_mask is not None:
        agg["num_items"] = None
    vf = torch.maximum(vf1, vf2)
    vf_loss = 0.5 * aggregate(vf * vm, vm, **agg)
    metrics = {"loss/value_avg": vf_loss.detach(), "val/clipfrac_avg": token_mean((vf2 > vf1).to(tb.dt), vm)}
    return PPOParts(vf_loss, vf, metrics)


def check_ppo(*, values, returns, old_values, cliprange_value, ptx_nll, ptx_coef) -> None:
    if values is not None and (returns is None or (old_values is None and cliprange_value is not None)):
        raise ValueError("the value loss needs values, returns and (with cliprange_value) old_values")
    if ptx_nll is not None and ptx_coef == 0.0:
        raise ValueError(
            "a pretraining NLL (ptx_nll) was given but ptx_coef is 0: set ptx_coef (InstructGPT's gamma)"
        )
