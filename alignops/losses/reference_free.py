"""Reference-free preference losses: SimPO, CPO, AlphaPO, ORPO, TPO (no reference model).

Every function takes per-sequence **summed** completion log-probs ``S_θ(y)`` of shape ``[B]``
(what the sequence reductions return) and, where the loss is length-normalised, the completion
token counts ``n`` of shape ``[B]``; the average ``A(y) = S(y) / max(1, n)`` is taken here, so
zero-length completions give a finite 0. The NLL terms of CPO / TPO / ORPO are the
micro-batch token mean over the completion tokens, ``-Σ_b S_b / max(1, Σ_b n_b)``, which is
exactly ``F.cross_entropy`` over those tokens; pass ``nll_loss=`` to use another one (e.g. TRL's
ORPO NLL over prompt + completion tokens, computed with ``alignops.cross_entropy``).

All arithmetic is float32 (float64 stays float64) whatever the input dtype. Each function returns
``LossOutput(loss, losses, metrics)``; ``losses`` is ``[B]`` with any batch-level NLL term broadcast
to every pair, so ``loss == losses.mean()``.
"""

from __future__ import annotations

from typing import Literal

import torch

from .._checks import check_choice, scalar, vec
from ._common import (
    LossOutput,
    average,
    ipo,
    lengths,
    log1mexp,
    logistic,
    max_exp,
    pair_metrics,
    token_mean_nll,
)

__all__ = ["simpo_loss", "cpo_loss", "alphapo_loss", "orpo_loss", "tpo_loss"]

# ORPO: log1mexp(a) -> -inf as the average log-prob a -> 0 (p -> 1); a is clamped to <= -1e-6.
_ORPO_MAX_AVG_LOGP = -1e-6


def _check_label_smoothing(label_smoothing: float, loss_type: str, smoothed: tuple[str, ...]) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type not in smoothed:
        raise ValueError(f"label_smoothing is only defined for loss_type in {smoothed}, not {loss_type!r}")


def _contrastive(
    margin: torch.Tensor, *, beta: float, loss_type: str, label_smoothing: float, gamma: float
) -> torch.Tensor:
    """Per-pair contrastive loss on a policy margin ``x``.

    sigmoid: ``(1-ε) softplus(-βx) + ε softplus(βx)``; margin types (simpo, tpo-l) use ``βx - γ``;
    hinge: ``relu(1 - βx)``; simpo_hinge: ``relu(1 - (βx - γ))``; ipo: ``(x - 1/(2β))²``.
    """
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * margin)
    if loss_type == "simpo_hinge":
        return torch.relu(1.0 - (beta * margin - gamma))
    if loss_type == "ipo":
        return ipo(margin, beta)
    return logistic(beta * margin - (gamma if loss_type != "sigmoid" else 0.0), label_smoothing)


def _alpha_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO reward ``(1 - p^{-α})/α`` with ``p = e^{x}``, computed as ``-expm1(-α x)/α``.

    The exponent ``-α x`` is clamped at 80 so summed log-probs cannot overflow float32.
    """
    return -torch.expm1((-alpha * logps).clamp(max=max_exp(logps.dtype))) / alpha


# ---------------------------------------------------------------------------------------------

_CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo", "simpo_hinge")


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: Literal["sigmoid", "hinge", "ipo", "simpo", "alphapo", "simpo_hinge"] = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    nll_loss: torch.Tensor | float | None = None,
) -> LossOutput:
    """CPO and its TRL ``CPOTrainer`` variants (``trl.experimental.cpo``).

    CPO: Xu et al. 2024, "Contrastive Preference Optimization", arXiv:2401.08417. ``simpo``:
    Meng, Xia, Chen 2024, arXiv:2405.14734. ``alpha != 0``: AlphaPO, Gupta et al. 2025,
    arXiv:2501.03884.

    Args:
        policy_chosen_logps, policy_rejected_logps: summed completion log-probs ``S_θ`` ``[B]``.
        chosen_lengths, rejected_lengths: completion token counts ``[B]``; needed by the
            length-normalised types (``ipo``, ``simpo``, ``alphapo`` use ``A = S/max(1,n)``) and by the
            NLL term when ``cpo_alpha != 0`` and ``nll_loss`` is not given.
        beta: β (TRL default 0.1). loss_type: ``sigmoid`` (CPO), ``hinge``, ``ipo``, ``simpo``,
            ``alphapo`` (= ``simpo`` with ``cpo_alpha = 0``, as TRL's config does), and
            ``simpo_hinge`` (not in TRL: the SimPO repository's hinge, ``relu(1 - (βΔA - γ))``).
        label_smoothing: ε for ``sigmoid`` / ``simpo`` only. simpo_gamma: γ, margin for ``simpo``.
        cpo_alpha: weight of the NLL on chosen completions (TRL default 1.0).
        alpha: AlphaPO reward shape ``r = (1 - p^{-α})/α``; ``0`` uses the log-probs themselves.
        nll_loss: precomputed scalar NLL replacing the token mean ``-Σ S_w / Σ n_w``.

    Loss per pair: ``ℓ = f(r_w - r_l) + cpo_alpha · NLL`` where ``r`` is ``x`` (or the AlphaPO
    reward of ``x``), ``x = A`` for ipo / simpo / simpo_hinge else ``S``, and ``f`` is the contrastive loss
    (``simpo``: ``(1-ε) softplus(-(βΔr - γ)) + ε softplus(βΔr - γ)``). Metrics: ``rewards/*`` with
    reward ``β·r``, ``logps/*`` (the ``x`` used), ``nll_loss``.
    """
    check_choice("loss_type", loss_type, _CPO_LOSS_TYPES)
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    _check_label_smoothing(label_smoothing, loss_type, ("sigmoid", "simpo"))
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    s_w = vec("policy_chosen_logps", policy_chosen_logps)
    s_l = vec("policy_rejected_logps", policy_rejected_logps, s_w.shape[0])
    batch = s_w.shape[0]

    average_types = loss_type in ("ipo", "simpo", "simpo_hinge")
    n_w = n_l = None
    if average_types or (cpo_alpha != 0 and nll_loss is None):
        why = (
            f"loss_type={loss_type!r} averages log-probs"
            if average_types
            else "it sets the NLL's token count"
        )
        n_w = lengths("chosen_lengths", chosen_lengths, batch, s_w, why)
    if average_types:
        n_l = lengths("rejected_lengths", rejected_lengths, batch, s_l, why)
        x_w, x_l = average(s_w, n_w), average(s_l, n_l)
    else:
        x_w, x_l = s_w, s_l

    r_w, r_l = (_alpha_reward(x_w, alpha), _alpha_reward(x_l, alpha)) if alpha != 0 else (x_w, x_l)
    losses = _contrastive(
        r_w - r_l, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=simpo_gamma
    )
    nll = losses.new_zeros(())
    if cpo_alpha != 0:
        nll = token_mean_nll(s_w, n_w) if nll_loss is None else scalar("nll_loss", nll_loss, losses)
        losses = losses + cpo_alpha * nll

    metrics = pair_metrics(beta * r_w, beta * r_l, x_w, x_l)
    metrics["nll_loss"] = nll.detach()
    return LossOutput(losses.mean(), losses, metrics)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 0.0,
    nll_loss: torch.Tensor | float | None = None,
    loss_type: Literal["sigmoid", "hinge"] = "sigmoid",
) -> LossOutput:
    """SimPO (Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", arXiv:2405.14734) with ``x = β(a_w - a_l) - γ``:

    * ``loss_type="sigmoid"``: ``ℓ = (1-ε) softplus(-x) + ε softplus(x)`` (the paper; TRL
      ``CPOTrainer(loss_type="simpo")``), test ``test_simpo_matches_reference``;
    * ``loss_type="hinge"``: ``ℓ = relu(1 - x)`` (the SimPO repository's ``loss_type="hinge"``; no
      label smoothing), test ``test_simpo_hinge_vs_float64``.

    ``a = S/max(1, n)`` from the summed log-probs ``[B]`` and counts ``[B]``. Defaults are TRL's
    ``CPOConfig`` (β=0.1, γ=0.5), not the paper's (β=2.0–2.5, γ/β=0.25–0.55). ``cpo_alpha > 0``
    adds the chosen NLL (CPO-SimPO). Rewards logged: ``β·a``. Same as
    ``cpo_loss(loss_type="simpo" | "simpo_hinge", cpo_alpha=0.0)``.
    """
    check_choice("loss_type", loss_type, ("sigmoid", "hinge"))
    options = dict(beta=beta, simpo_gamma=simpo_gamma, label_smoothing=label_smoothing, nll_loss=nll_loss)
    n = dict(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    cpo_type = "simpo" if loss_type == "sigmoid" else "simpo_hinge"
    return cpo_loss(
        policy_chosen_logps, policy_rejected_logps, loss_type=cpo_type, cpo_alpha=cpo_alpha, **n, **options
    )


def alphapo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    alpha: float = 0.25,
    beta: float = 2.5,
    simpo_gamma: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """AlphaPO (Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment",
    arXiv:2501.03884): SimPO on the reward ``r = (1 - p^{-α})/α``, ``p = exp(A_θ)``.

    Computed as ``-expm1(-α·A)/α`` (exponent clamped at 80) so ``p^{-α}`` never overflows.
    Defaults are the AlphaPO paper's Mistral setting (α=0.25, β=2.5, γ=0.1); TRL's
    ``loss_type="alphapo"`` keeps ``CPOConfig``'s β=0.1, γ=0.5, α=0 (which is plain SimPO).
    ``alpha → 0`` recovers :func:`simpo_loss`. Rewards logged: ``β·r``.
    """
    if alpha == 0:
        raise ValueError("alphapo_loss needs alpha != 0 (alpha = 0 is simpo_loss)")
    options = dict(beta=beta, simpo_gamma=simpo_gamma, label_smoothing=label_smoothing, alpha=alpha)
    n = dict(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    return cpo_loss(
        policy_chosen_logps, policy_rejected_logps, loss_type="simpo", cpo_alpha=0.0, **n, **options
    )


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
    nll_loss: torch.Tensor | float | None = None,
) -> LossOutput:
    """ORPO (Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", arXiv:2403.07691; TRL ``experimental.orpo``):
    ``L = NLL(y_w) + β · mean_b softplus(-(logodds(y_w) - logodds(y_l)))``.

    ``a = S/max(1, n)`` ``[B]`` clamped to ``≤ -1e-6``; ``logodds(y) = a - log1mexp(a)`` (stable
    ``log p/(1-p)``). The default NLL is the token mean over chosen *completion* tokens (the
    paper's L_SFT); TRL takes it over prompt + completion tokens: pass that as ``nll_loss``.
    λ = ``beta`` = 0.1 (TRL default). Per-pair ``losses = NLL - β·logσ(...)``.
    Metrics: ``rewards/*`` (``β·a``), ``logps/*`` (``a``), ``nll_loss``, ``log_odds_ratio``
    (mean logσ), ``log_odds_chosen`` (mean log-odds difference).
    """
    s_w = vec("policy_chosen_logps", policy_chosen_logps)
    s_l = vec("policy_rejected_logps", policy_rejected_logps, s_w.shape[0])
    why = "ORPO length-averages log-probs"
    n_w = lengths("chosen_lengths", chosen_lengths, s_w.shape[0], s_w, why)
    n_l = lengths("rejected_lengths", rejected_lengths, s_w.shape[0], s_l, why)
    a_w = average(s_w, n_w).clamp(max=_ORPO_MAX_AVG_LOGP)
    a_l = average(s_l, n_l).clamp(max=_ORPO_MAX_AVG_LOGP)

    log_odds = (a_w - log1mexp(a_w)) - (a_l - log1mexp(a_l))
    ratio = -logistic(log_odds)  # log σ(log_odds)
    nll = token_mean_nll(s_w, n_w) if nll_loss is None else scalar("nll_loss", nll_loss, ratio)
    losses = nll - beta * ratio

    metrics = pair_metrics(beta * a_w, beta * a_l, a_w, a_l)
    metrics["nll_loss"] = nll.detach()
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return LossOutput(losses.mean(), losses, metrics)


_TPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "tpo-l")


def tpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    policy_gold_logps: torch.Tensor | None = None,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    gold_lengths: torch.Tensor | None = None,
    beta: float = 0.01,
    loss_type: Literal["sigmoid", "hinge", "ipo", "tpo-l"] = "sigmoid",
    label_smoothing: float = 0.0,
    tpo_l_gamma: float = 0.5,
    tpo_alpha: float = 1.0,
    nll_loss: torch.Tensor | float | None = None,
) -> LossOutput:
    """TPO, triple preference optimisation (Saeidi et al. 2024, "Triple Preferences Optimization",
    arXiv:2405.16681; TRL ``experimental.tpo``).

    Contrastive loss on (chosen, rejected) without a reference model, plus ``tpo_alpha`` times the
    NLL of the gold response (TRL calls it the "reference" response; no reference *model* here).
    ``sigmoid`` / ``hinge`` use summed ``S`` ``[B]``; ``ipo`` and ``tpo-l`` use ``A = S/max(1,n)``
    (``tpo-l``: ``softplus(-(βΔA - γ))`` with γ = ``tpo_l_gamma``). The NLL is the token mean over
    the gold completion tokens, ``-Σ S_gold / Σ n_gold``, or ``nll_loss`` when given.
    Defaults are TRL's (β=0.01, tpo_alpha=1.0, γ=0.5). Rewards logged: ``β·x``.
    """
    check_choice("loss_type", loss_type, _TPO_LOSS_TYPES)
    _check_label_smoothing(label_smoothing, loss_type, ("sigmoid", "tpo-l"))
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    s_w = vec("policy_chosen_logps", policy_chosen_logps)
    s_l = vec("policy_rejected_logps", policy_rejected_logps, s_w.shape[0])
    batch = s_w.shape[0]
    if loss_type in ("ipo", "tpo-l"):
        why = f"loss_type={loss_type!r} averages log-probs"
        x_w = average(s_w, lengths("chosen_lengths", chosen_lengths, batch, s_w, why))
        x_l = average(s_l, lengths("rejected_lengths", rejected_lengths, batch, s_l, why))
    else:
        x_w, x_l = s_w, s_l
    losses = _contrastive(
        x_w - x_l, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=tpo_l_gamma
    )
    nll = losses.new_zeros(())
    if tpo_alpha != 0:
        nll = _gold_nll(policy_gold_logps, gold_lengths, nll_loss, batch, losses)
        losses = losses + tpo_alpha * nll

    metrics = pair_metrics(beta * x_w, beta * x_l, x_w, x_l)
    metrics["nll_loss"] = nll.detach()
    return LossOutput(losses.mean(), losses, metrics)


def _gold_nll(gold_logps, gold_lengths, nll_loss, batch: int, like: torch.Tensor) -> torch.Tensor:
    """TPO's NLL term: the given ``nll_loss``, else the token mean over the gold completions."""
    if nll_loss is not None:
        return scalar("nll_loss", nll_loss, like)
    if gold_logps is None:
        raise ValueError("tpo_alpha != 0 needs policy_gold_logps and gold_lengths (or nll_loss)")
    s_g = vec("policy_gold_logps", gold_logps, batch)
    return token_mean_nll(
        s_g, lengths("gold_lengths", gold_lengths, batch, s_g, "it sets the gold NLL's token count")
    )
