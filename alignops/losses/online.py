"""Online / self-play preference losses: online DPO / IPO, XPO, Nash-MD.

These take the log-probs of freshly sampled completions plus their scores and do the pairing the
TRL trainers do (higher score = chosen). SPPO (hard / soft), APO and iterative DPO / DNO are
offline pair losses covered by ``dpo_loss``; nothing for them here. Reference log-probs are
treated as constants (detached). Arithmetic is float32 (float64 stays float64).
"""

from __future__ import annotations

from typing import Literal

import torch

from .._checks import as_float, check_choice, vec
from ._common import LossOutput, ipo, logistic, pair_metrics

__all__ = ["online_dpo_loss", "xpo_loss", "nash_md_loss"]

_ONLINE_LOSS_TYPES = ("sigmoid", "ipo")


def _pair_loss(logits: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    """DPO ``softplus(-βΔ)`` or (not length-normalised) IPO ``(Δ - 1/(2β))²``."""
    return logistic(beta * logits) if loss_type == "sigmoid" else ipo(logits, beta)


def _two(name: str, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    x = as_float(name, x)
    if x.dim() != 2 or x.shape[1] != 2 or (batch is not None and x.shape[0] != batch):
        want = f"[{batch}, 2]" if batch is not None else "[B, 2]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    return x


def online_dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    scores: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    contain_eos: torch.Tensor | None = None,
    missing_eos_penalty: float | None = None,
) -> LossOutput:
    """Online DPO / online IPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI
    Feedback", arXiv:2402.04792; TRL ``experimental.online_dpo``).

    Two sampled completions per prompt: ``policy_logps``, ``ref_logps``, ``scores`` are ``[B, 2]``
    (summed completion log-probs; rewards). If ``missing_eos_penalty`` is set, it is subtracted
    from the scores of completions with ``contain_eos`` ``[B, 2]`` False. Chosen = completion 0
    when ``score_0 >= score_1`` (ties go to the first), then DPO (``sigmoid``) or IPO on summed
    log-probs. β=0.1 (TRL default). ``losses`` ``[B]``.
    Metrics (TRL names): ``rewards/*``, ``logps/chosen|rejected``, ``objective/kl`` (mean
    ``S_θ - S_ref`` over the 2B completions), ``objective/entropy`` (``-mean S_θ``),
    ``objective/non_score_reward`` (``-β·kl``), ``objective/rlhf_reward``, ``objective/scores``,
    ``objective/scores_margin``, ``val/contain_eos_token``, ``beta``.
    """
    check_choice("loss_type", loss_type, _ONLINE_LOSS_TYPES)
    p = _two("policy_logps", policy_logps)
    r = _two("ref_logps", ref_logps, p.shape[0]).detach()
    sc = _two("scores", scores, p.shape[0]).detach()
    if missing_eos_penalty is not None:
        if contain_eos is None:
            raise ValueError("missing_eos_penalty needs contain_eos ([B, 2] bool)")
        if contain_eos.shape != sc.shape:
            raise ValueError(f"contain_eos must have shape {list(sc.shape)}, got {tuple(contain_eos.shape)}")
        sc = sc - missing_eos_penalty * (~contain_eos.to(device=sc.device, dtype=torch.bool)).to(sc.dtype)

    first = sc[:, 0] >= sc[:, 1]
    idx_w = (~first).long().unsqueeze(1)
    idx_l = first.long().unsqueeze(1)
    u = p - r
    u_w, u_l = u.gather(1, idx_w).squeeze(1), u.gather(1, idx_l).squeeze(1)
    losses = _pair_loss(u_w - u_l, beta, loss_type)

    u_det = u.detach()
    metrics = pair_metrics(beta * u_w, beta * u_l, p.gather(1, idx_w), p.gather(1, idx_l))
    metrics.update(
        {
            "objective/kl": u_det.mean(),
            "objective/entropy": -p.detach().mean(),
            "objective/non_score_reward": (-beta * u_det).mean(),
            "objective/rlhf_reward": (sc - beta * u_det).mean(),
            "objective/scores": sc.mean(),
            "objective/scores_margin": (sc.gather(1, idx_w) - sc.gather(1, idx_l)).mean(),
            "beta": torch.tensor(float(beta), dtype=p.dtype, device=p.device),
        }
    )
    if contain_eos is not None:
        metrics["val/contain_eos_token"] = contain_eos.float().mean()
    return LossOutput(losses.mean(), losses, metrics)


def xpo_loss(
    model_logps_model_data: torch.Tensor,
    model_logps_ref_data: torch.Tensor,
    ref_logps_model_data: torch.Tensor,
    ref_logps_ref_data: torch.Tensor,
    *,
    model_scores: torch.Tensor | None = None,
    ref_scores: torch.Tensor | None = None,
    chosen_mask: torch.Tensor | None = None,
    beta: float = 0.1,
    alpha: float = 1e-5,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
) -> LossOutput:
    """XPO, exploratory preference optimisation (Xie et al. 2024, arXiv:2405.21046; TRL
    ``experimental.xpo``).

    One policy sample and one reference-model sample per prompt; all inputs ``[B]`` summed
    completion log-probs: ``model_logps_model_data`` = ``S_θ(y_θ)``, ``model_logps_ref_data`` =
    ``S_θ(y_ref)``, ``ref_logps_model_data`` = ``S_ref(y_θ)``, ``ref_logps_ref_data`` = ``S_ref(y_ref)``.
    The policy sample is chosen where ``chosen_mask`` ``[B]`` is True, or where
    ``model_scores >= ref_scores``. ``ℓ = ℓ_DPO|IPO(Δ) + α·S_θ(y_ref)``; defaults TRL's
    (β=0.1, α=1e-5). Metrics: ``loss/dpo``, ``loss/xpo``, ``rewards/*``, ``logps/*``,
    ``objective/kl``, ``objective/entropy``, ``alpha``, ``beta``.
    """
    check_choice("loss_type", loss_type, _ONLINE_LOSS_TYPES)
    mm = vec("model_logps_model_data", model_logps_model_data)
    b = mm.shape[0]
    mr = vec("model_logps_ref_data", model_logps_ref_data, b)
    rm = vec("ref_logps_model_data", ref_logps_model_data, b).detach()
    rr = vec("ref_logps_ref_data", ref_logps_ref_data, b).detach()
    if chosen_mask is None:
        if model_scores is None or ref_scores is None:
            raise ValueError("xpo_loss needs chosen_mask, or model_scores and ref_scores")
        chosen_mask = vec("model_scores", model_scores, b) >= vec("ref_scores", ref_scores, b)
    elif model_scores is not None or ref_scores is not None:
        raise ValueError("pass either chosen_mask or model_scores/ref_scores, not both")
    if chosen_mask.shape != (b,):
        raise ValueError(f"chosen_mask must have shape [{b}], got {tuple(chosen_mask.shape)}")
    c = chosen_mask.to(device=mm.device, dtype=torch.bool)

    u_model, u_ref = mm - rm, mr - rr
    u_w = torch.where(c, u_model, u_ref)
    u_l = torch.where(c, u_ref, u_model)
    dpo = _pair_loss(u_w - u_l, beta, loss_type)
    xpo = alpha * mr
    losses = dpo + xpo

    metrics = pair_metrics(beta * u_w, beta * u_l, torch.where(c, mm, mr), torch.where(c, mr, mm))
    metrics.update(
        {
            "loss/dpo": dpo.detach().mean(),
            "loss/xpo": xpo.detach().mean(),
            "objective/kl": ((u_model + u_ref) / 2).detach().mean(),
            "objective/entropy": (-(mm + mr) / 2).detach().mean(),
            "alpha": torch.tensor(float(alpha), dtype=mm.dtype, device=mm.device),
            "beta": torch.tensor(float(beta), dtype=mm.dtype, device=mm.device),
        }
    )
    return LossOutput(losses.mean(), losses, metrics)


def nash_md_loss(
    policy_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    *,
    mask: torch.Tensor,
    model_scores: torch.Tensor | None = None,
    mixture_scores: torch.Tensor | None = None,
    probability: torch.Tensor | None = None,
    beta: float = 0.1,
) -> LossOutput:
    """Nash-MD's policy loss (Munos et al. 2023, "Nash Learning from Human Feedback",
    arXiv:2312.00886; TRL ``experimental.nash_md``) on per-token log-probs.

    ``policy_token_logps`` / ``ref_token_logps`` ``[B, T]`` are ``ℓ_θ`` / ``ℓ_ref`` of completions
    sampled from π_θ, ``mask`` ``[B, T]`` their completion tokens. ``P = σ(s(y_θ) - s(y_mix))`` from
    ``model_scores`` / ``mixture_scores`` ``[B]`` (the mixture policy's sample), or ``probability``
    ``[B]`` from a judge; no gradient. Per sample:
    ``score = (P - ½)·S_θ`` (REINFORCE, ½ a control variate),
    ``kl = Σ_t m·sg(ℓ_θ - ℓ_ref)·ℓ_θ`` (REINFORCE estimator of ∇KL), ``ℓ = β·kl - score``.
    β=0.1 (TRL default). Generating the mixture sample (``log_softmax(μ z_ref + (1-μ) z_θ)``) is
    the trainer's job. Metrics: ``loss/score``, ``loss/kl`` (mean ``Σ_t(ℓ_θ - ℓ_ref)``),
    ``rewards/probabilities``, ``rewards/chosen|rejected`` (model / mixture scores), ``rewards/margins``
    and ``rewards/accuracies`` (on the log-ratio, as TRL), ``objective/entropy``, ``beta``.
    """
    lp = as_float("policy_token_logps", policy_token_logps)
    if lp.dim() != 2:
        raise ValueError(f"policy_token_logps must have shape [B, T], got {tuple(lp.shape)}")
    lr = as_float("ref_token_logps", ref_token_logps).detach()
    if lr.shape != lp.shape or mask.shape != lp.shape:
        raise ValueError(
            f"ref_token_logps {tuple(lr.shape)} and mask {tuple(mask.shape)} must match "
            f"policy_token_logps {tuple(lp.shape)}"
        )
    b = lp.shape[0]
    m = mask.to(device=lp.device, dtype=torch.bool)
    if probability is None:
        if model_scores is None or mixture_scores is None:
            raise ValueError("nash_md_loss needs probability, or model_scores and mixture_scores")
        ms, xs = vec("model_scores", model_scores, b), vec("mixture_scores", mixture_scores, b)
        prob = torch.sigmoid(ms - xs).detach()
    else:
        if model_scores is not None or mixture_scores is not None:
            raise ValueError("pass either probability or model_scores/mixture_scores, not both")
        prob = vec("probability", probability, b).detach()
        ms = xs = None

    lp = torch.where(m, lp, torch.zeros_like(lp))
    lr = torch.where(m, lr, torch.zeros_like(lr))
    seq = lp.sum(1)
    score = (prob - 0.5) * seq
    log_ratio = (lp - lr).detach()
    kl_term = (log_ratio * lp).sum(1)
    losses = beta * kl_term - score

    margin = seq.detach() - lr.sum(1)
    metrics = {
        "loss/score": score.detach().mean(),
        "loss/kl": log_ratio.sum(1).mean(),
        "rewards/probabilities": prob.mean(),
        "rewards/margins": margin.mean(),
        "rewards/accuracies": (margin > 0).to(margin.dtype).mean(),
        "objective/entropy": -seq.detach().mean(),
        "beta": torch.tensor(float(beta), dtype=lp.dtype, device=lp.device),
    }
    if ms is not None:
        metrics["rewards/chosen"] = ms.detach().mean()
        metrics["rewards/rejected"] = xs.detach().mean()
    return LossOutput(losses.mean(), losses, metrics)
