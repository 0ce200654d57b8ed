"""Binary / unpaired feedback losses: KTO, BCO, DRO.

Desirable ("chosen") and undesirable ("rejected") samples are *unpaired*: their batches may differ
in size, either may be empty. Inputs are per-sequence summed completion log-probs ``[N_D]`` /
``[N_U]`` for the policy and the reference. ``losses`` is ``[N_D + N_U]``, desirable first (TRL's
order), and ``loss`` is its mean (TRL's ``nanmean``; an empty batch gives a differentiable 0).
Reference log-probs are treated as constants (detached). Arithmetic is float32, float64 when an
input is float64; a Python number (``kl=``, ``delta=``) is taken in that dtype directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .._checks import as_float, check_choice, scalar, vec
from ..distributed import global_count, global_mean, global_sum
from ._common import LossOutput

__all__ = ["kto_loss", "bco_loss", "dro_loss", "RewardRunningMean", "VanillaKTOOptions", "udm_weights"]


def _unpaired(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    p_w = vec("policy_chosen_logps", policy_chosen_logps)
    p_l = vec("policy_rejected_logps", policy_rejected_logps)
    r_w = vec("ref_chosen_logps", ref_chosen_logps, p_w.shape[0]).detach()
    r_l = vec("ref_rejected_logps", ref_rejected_logps, p_l.shape[0]).detach()
    return p_w, p_l, r_w, r_l


def _unpaired_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """TRL KTO/BCO logs: means per side, margins only when both sides are present."""
    metrics: dict[str, torch.Tensor] = {}
    if chosen_rewards.numel():
        metrics["rewards/chosen"] = chosen_rewards.detach().mean()
        metrics["logps/chosen"] = chosen_logps.detach().mean()
    if rejected_rewards.numel():
        metrics["rewards/rejected"] = rejected_rewards.detach().mean()
        metrics["logps/rejected"] = rejected_logps.detach().mean()
    if chosen_rewards.numel() and rejected_rewards.numel():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def _mean_or_zero(losses: torch.Tensor, anchor: torch.Tensor, process_group=None) -> torch.Tensor:
    """The mean of ``losses``; with a ``process_group``, this rank's share ``sum / N_global`` of the
    mean over every rank's losses (``alignops.distributed``)."""
    if process_group is not None:
        n = global_count(losses.numel(), process_group).to(losses.dtype)
        return (losses.sum() + anchor.sum() * 0.0) / n
    return losses.mean() if losses.numel() else anchor.sum() * 0.0


def _batch_mean(x: torch.Tensor, process_group) -> torch.Tensor:
    """Mean of ``x`` over the batch: this rank's, or every rank's (detached) with a group."""
    if process_group is None:
        return x.mean()
    return global_mean(x, process_group).to(x.dtype)


_KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired", "vanilla")


@dataclass(frozen=True)
class VanillaKTOOptions:
    """``loss_type="vanilla"`` (OpenRLHF's ``VanillaKTOLoss``): ``detach_reference_point=True``
    treats the in-batch reference points as constants, as the KTO paper does with ``z_ref``;
    ``False`` lets the gradient flow through them, as OpenRLHF's code does."""

    detach_reference_point: bool = True


def _vanilla_reference_points(u_w: torch.Tensor, u_l: torch.Tensor, detach: bool, process_group=None):
    """``(z for the desirable side, z for the undesirable side)``: the other side's mean log-ratio
    clamped at 0; 0 when that side is empty (on every rank, with a ``process_group``)."""
    if process_group is not None and not detach:
        raise ValueError(
            "vanilla KTO with detach_reference_point=False cannot take a process_group: the "
            "reference points are then detached means over every rank"
        )

    def point(u: torch.Tensor) -> torch.Tensor:
        if process_group is not None:
            if global_sum(u.numel(), process_group) == 0:
                return u.new_zeros(())
            return _batch_mean(u, process_group).clamp_min(0.0)
        z = u.mean().clamp_min(0.0) if u.numel() else u.new_zeros(())
        return z.detach() if detach else z

    return point(u_l), point(u_w)


def _kto_reference_point(kl, policy_kl_logps, ref_kl_logps, like: torch.Tensor, group) -> torch.Tensor:
    """KTO's detached ``z0 = clamp_min(kl, 0)``: ``kl`` as given (in ``like``'s dtype when it is a
    Python number), else the mean log-ratio of the mismatched pairs."""
    if kl is not None:
        z0 = scalar("kl", kl, like)
    elif policy_kl_logps is not None and ref_kl_logps is not None:
        pk = vec("policy_kl_logps", policy_kl_logps)
        rk = vec("ref_kl_logps", ref_kl_logps, pk.shape[0])
        if group is not None:
            z0 = _batch_mean(pk - rk, group)  # every rank's pairs (raises if none)
        elif pk.numel() == 0:
            raise ValueError("policy_kl_logps is empty: z0 needs at least one mismatched pair")
        else:
            z0 = (pk - rk).mean()
    else:
        raise ValueError(
            "loss_type='kto' needs the reference point: policy_kl_logps and ref_kl_logps "
            "(log-probs of the mismatched pairs), or kl="
        )
    return z0.detach().clamp_min(0.0)


def kto_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    policy_kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: Literal["kto", "apo_zero_unpaired", "vanilla"] = "kto",
    vanilla: VanillaKTOOptions | None = None,
    process_group=None,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    arXiv:2402.01306; TRL ``KTOTrainer``) and its ``apo_zero_unpaired`` variant (D'Oosterlinck
    et al. 2024, arXiv:2408.06266).

    ``u = S_θ - S_ref`` per sample (desirable ``[N_D]``, undesirable ``[N_U]``).
    Reference point ``z0 = clamp_min(mean_j (S_θ(y'_j|x_j) - S_ref(y'_j|x_j)), 0)``, detached, from
    the mismatched pairs (completions rotated by one within the batch): pass their log-probs
    ``policy_kl_logps`` / ``ref_kl_logps`` ``[M]``, or pass ``kl`` directly (e.g. already averaged
    over ranks, as TRL does; it is clamped at 0 too). A float64 ``kl`` (tensor or Python float)
    with float64 log-probs stays float64.
    ``kto``: desirable ``λ_D σ(-β(u - z0))``, undesirable ``λ_U σ(-β(z0 - u))``.
    ``apo_zero_unpaired``: desirable ``λ_D σ(-βu)``, undesirable ``λ_U σ(βu)``, no z0.
    ``vanilla`` (OpenRLHF's ``VanillaKTOLoss``, for batches with both sides; Hu et al. 2024,
    "OpenRLHF", arXiv:2405.11143): no mismatched pairs and no KL reference point; each side is
    measured against the other side's mean log-ratio, ``z_D = clamp_min(mean u_l, 0)``,
    ``z_U = clamp_min(mean u_w, 0)`` (0 when that side is empty): desirable
    ``λ_D σ(-β(u_w - z_D))``, undesirable ``λ_U σ(-β(z_U - u_l))`` (OpenRLHF: λ = 1).
    ``vanilla=VanillaKTOOptions(detach_reference_point=False)`` backpropagates through ``z``.
    Defaults are TRL's (β=0.1, λ_D=λ_U=1). Metrics: ``kl`` (z0; ``vanilla``: ``kl/chosen = z_U``,
    ``kl/rejected = z_D``), ``rewards/chosen`` (mean ``βu`` of desirable), ``rewards/rejected``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.

    ``process_group`` (data parallelism, docs/distributed.md): the batch is split over the ranks;
    ``z0`` (from the mismatched pairs) and the vanilla reference points are means over every
    rank, and ``loss`` is this rank's share ``sum / N_global`` of the full batch's mean.

    Tests (tests/test_losses_binary.py): ``kto`` / ``apo_zero_unpaired`` against float64 and TRL;
    ``vanilla``: ``test_kto_vanilla_vs_float64``; ``process_group``: tests/test_distributed_losses.py.
    """
    check_choice("loss_type", loss_type, _KTO_LOSS_TYPES)
    p_w, p_l, r_w, r_l = _unpaired(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    u_w, u_l = p_w - r_w, p_l - r_l

    if vanilla is not None and (loss_type != "vanilla" or not isinstance(vanilla, VanillaKTOOptions)):
        raise ValueError("vanilla= takes a VanillaKTOOptions and is read by loss_type='vanilla' only")
    metrics: dict[str, torch.Tensor] = {}
    if loss_type == "kto":
        z0 = _kto_reference_point(kl, policy_kl_logps, ref_kl_logps, u_w, process_group)
        chosen_losses = torch.sigmoid(-beta * (u_w - z0))
        rejected_losses = torch.sigmoid(-beta * (z0 - u_l))
    elif loss_type == "vanilla":
        detach = (vanilla or VanillaKTOOptions()).detach_reference_point
        z_d, z_u = _vanilla_reference_points(u_w, u_l, detach, process_group)
        chosen_losses = torch.sigmoid(-beta * (u_w - z_d))
        rejected_losses = torch.sigmoid(-beta * (z_u - u_l))
        metrics = {"kl/chosen": z_u.detach(), "kl/rejected": z_d.detach()}
    else:
        z0 = u_w.new_zeros(())
        chosen_losses = torch.sigmoid(-beta * u_w)
        rejected_losses = torch.sigmoid(beta * u_l)

    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses))
    if loss_type != "vanilla":
        metrics["kl"] = z0.detach()
    metrics.update(_unpaired_metrics(beta * u_w, beta * u_l, p_w, p_l))
    return LossOutput(_mean_or_zero(losses, u_w, process_group), losses, metrics)


class RewardRunningMean:
    """Running mean of every implicit reward seen so far: BCO's ``δ`` (Jung et al. 2024,
    arXiv:2404.04656; TRL ``RunningMoments``).

    ``update(rewards)`` folds a batch in (count-weighted, float64) and returns the new mean. Under
    data parallelism, pass ``process_group`` to ``update`` (or to :func:`bco_loss`) so each rank
    folds in every rank's rewards and keeps the same ``δ``.
    Update in training steps only (TRL does not update during evaluation).
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    def update(self, rewards: torch.Tensor, process_group=None) -> float:
        """Fold ``rewards`` in; with a ``process_group``, every rank's rewards (two all-reduces of
        one float), so all ranks keep the same mean."""
        r = rewards.detach().double().reshape(-1)
        total, n = r.sum(), r.numel()
        if process_group is not None:
            n = int(global_sum(n, process_group).item())
            total = global_sum(r, process_group)
        if n:
            self.count += n
            self.mean += (total.item() / n - self.mean) * n / self.count
        return self.mean


def udm_weights(
    prob_desirable: torch.Tensor, *, min_density_ratio: float = 0.5, max_density_ratio: float = 10.0
) -> torch.Tensor:
    """BCO underlying-distribution-matching weights ``clamp(P/(1 - P + 1e-8), min, max)``.

    ``prob_desirable`` ``[N_U]`` is a classifier's P(desirable | prompt embedding) for the
    undesirable samples; pass the result as ``bco_loss(..., rejected_weights=)``. Defaults TRL's.
    """
    p = as_float("prob_desirable", prob_desirable).detach()
    return (p / (1.0 - p + 1e-8)).clamp(min=min_density_ratio, max=max_density_ratio)


def bco_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    delta: torch.Tensor | float | RewardRunningMean = 0.0,
    rejected_weights: torch.Tensor | None = None,
    process_group=None,
) -> LossOutput:
    """Unpaired BCO, binary classifier optimisation (Jung et al. 2024, "Binary Classifier
    Optimization for Large Language Model Alignment", arXiv:2404.04656; TRL ``experimental.bco``).

    ``r = β(S_θ - S_ref)``; desirable ``-logσ(r - δ)``, undesirable ``-logσ(-(r - δ))·ω``.
    ``delta``: a number, or a :class:`RewardRunningMean` which is first updated with this batch's
    rewards (desirable and undesirable; TRL updates before computing the loss) and then read.
    ``rejected_weights`` ``[N_U]``: optional UDM weights ω (see :func:`udm_weights`).
    β=0.1 (TRL default). Metrics: ``delta``, ``rewards/*``, ``logps/*``.
    ``process_group`` (data parallelism): the running mean folds in every rank's rewards and
    ``loss`` is this rank's share ``sum / N_global`` of the full batch's mean.
    """
    p_w, p_l, r_w, r_l = _unpaired(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    rew_w, rew_l = beta * (p_w - r_w), beta * (p_l - r_l)
    if isinstance(delta, RewardRunningMean):
        delta = delta.update(torch.cat((rew_w, rew_l)), process_group)
    d = scalar("delta", delta, rew_w).detach()
    chosen_losses = F.softplus(-(rew_w - d))
    rejected_losses = F.softplus(rew_l - d)
    if rejected_weights is not None:
        rejected_losses = rejected_losses * vec("rejected_weights", rejected_weights, p_l.shape[0]).detach()
    losses = torch.cat((chosen_losses, rejected_losses))
    metrics = {"delta": d.reshape(())}
    metrics.update(_unpaired_metrics(rew_w, rew_l, p_w, p_l))
    return LossOutput(_mean_or_zero(losses, rew_w, process_group), losses, metrics)


def dro_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor | None = None,
    *,
    tau: float = 1.0,
    value_coef: float = 1.0,
) -> LossOutput:
    """DRO-V, direct reward optimisation on single trajectories (Richemond et al. 2024, "Offline
    Regularised Reinforcement Learning for Large Language Models Alignment", arXiv:2405.19107).

    Per sample, ``u = S_θ - S_ref`` ``[B]``, scalar feedback ``r`` ``[B]``, value ``V(x)`` ``[B]``:
    ``policy = -S_θ · sg(r - V) + (τ/2) u²`` (whose gradient is ``∇_θ ½(r - V - τu)² / τ``) and
    ``value = ½ (r - V - τ·sg(u))²``; ``losses = policy + value_coef · value``. With
    ``values=None`` the baseline is the batch mean of ``r`` and there is no value term (the
    Kimi k1.5 form). ``tau`` default 1.0 is the survey's reported regularisation; the paper's
    exact term scaling is not pinned down by the paper's text. Metrics: ``policy_loss``, ``value_loss``,
    ``advantages`` (mean ``r - V``), ``log_ratio`` (mean ``u``).
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    s = vec("policy_logps", policy_logps)
    u = s - vec("ref_logps", ref_logps, s.shape[0]).detach()
    r = vec("rewards", rewards, s.shape[0])
    if values is None:
        baseline = r.mean().expand_as(r)
        value_losses = torch.zeros_like(r)
    else:
        baseline = vec("values", values, s.shape[0])
        value_losses = 0.5 * (r - baseline - tau * u.detach()) ** 2
    adv = (r - baseline).detach()
    policy_losses = -s * adv + 0.5 * tau * u**2
    losses = policy_losses + value_coef * value_losses
    metrics = {
        "policy_loss": policy_losses.detach().mean(),
        "value_loss": value_losses.detach().mean(),
        "advantages": adv.mean(),
        "log_ratio": u.detach().mean(),
    }
    return LossOutput(losses.mean(), losses, metrics)
