"""Reference-free preference losses (SPEC §7): SimPO, CPO, AlphaPO, ORPO, TPO.

Every function takes per-sequence **summed** completion log-probs ``S_θ(y)`` of shape ``[B]``
(what the sequence reductions return) and, where the loss is length-normalised, the completion
token counts ``n`` of shape ``[B]``; the average ``A(y) = S(y) / max(1, n)`` (SPEC §1.2) is taken
here, so zero-length completions give a finite 0. The NLL terms of CPO / TPO / ORPO are the
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
import torch.nn.functional as F

from ._common import LossOutput, check_finite, log1mexp

__all__ = ["simpo_loss", "cpo_loss", "alphapo_loss", "orpo_loss", "tpo_loss"]

# Largest exponent fed to exp() in the AlphaPO reward (SPEC §1.5: TRL clamps at 80 in fp32/bf16);
# exp(80) ~ 5.5e34 is finite in float32, exp(89) is not.
_MAX_EXP = 80.0
# ORPO: log1mexp(a) -> -inf as the average log-prob a -> 0 (p -> 1); SPEC §7.4 clamps a <= -1e-6.
_ORPO_MAX_AVG_LOGP = -1e-6

# ---------------------------------------------------------------------------------------------
# Private helpers shared by the catalog modules I own (binary, listwise, negative, online, reward).


def _compute(name: str, x: torch.Tensor) -> torch.Tensor:
    """Validate a floating tensor (no NaN) and upcast it to the compute dtype (fp32, or fp64)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    check_finite(name, x)
    return x if x.dtype == torch.float64 else x.float()


def _vec(name: str, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """A ``[B]`` floating tensor in compute dtype; ``batch`` checks its size."""
    x = _compute(name, x)
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape [B], got {tuple(x.shape)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} has batch size {x.shape[0]}, expected {batch} (mismatched batch sizes)")
    return x


def _counts(name: str, n: torch.Tensor | None, batch: int, like: torch.Tensor, why: str) -> torch.Tensor:
    """Token counts ``[B]`` as floats in ``like``'s dtype (raw, not clamped)."""
    if n is None:
        raise ValueError(f"{name} (completion token counts [B]) is required: {why}")
    if not isinstance(n, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token counts, got {type(n).__name__}")
    if n.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}] to match the log-probs, got {tuple(n.shape)}")
    return n.to(device=like.device, dtype=like.dtype)


def _average(logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``A = S / max(1, n)`` (SPEC §1.2)."""
    return logps / counts.clamp_min(1.0)


def _token_mean_nll(logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Micro-batch token-mean NLL ``-Σ S / max(1, Σ n)`` (SPEC §3.2 (a)); equals cross-entropy(mean)."""
    return -logps.sum() / counts.sum().clamp_min(1.0)


def _scalar_loss(name: str, value: torch.Tensor | float) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    check_finite(name, t)
    return t.reshape(()) if t.dtype == torch.float64 else t.float().reshape(())


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")


def _check_label_smoothing(label_smoothing: float, loss_type: str, smoothed: tuple[str, ...]) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type not in smoothed:
        raise ValueError(f"label_smoothing is only defined for loss_type in {smoothed}, not {loss_type!r}")


def _pair_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """SPEC §1.3 metrics (means over the pairs of the micro-batch, detached)."""
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/margins": (cr - rr).mean(),
        "rewards/accuracies": (cr > rr).to(cr.dtype).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def _contrastive(
    logits: torch.Tensor, *, beta: float, loss_type: str, label_smoothing: float, gamma: float
) -> torch.Tensor:
    """Per-pair contrastive loss on a policy margin ``x`` (SPEC §7.1, §7.2, §7.5).

    sigmoid: ``(1-ε) softplus(-βx) + ε softplus(βx)``; margin types (simpo, tpo-l) use ``βx - γ``;
    hinge: ``relu(1 - βx)``; ipo: ``(x - 1/(2β))²``.
    """
    if loss_type in ("sigmoid", "simpo", "tpo-l"):
        z = beta * logits - (gamma if loss_type != "sigmoid" else 0.0)
        losses = F.softplus(-z)
        if label_smoothing:
            losses = (1.0 - label_smoothing) * losses + label_smoothing * F.softplus(z)
        return losses
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1.0 / (2.0 * beta)) ** 2
    raise AssertionError(loss_type)  # callers validate loss_type


def _alpha_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO reward ``(1 - p^{-α})/α`` with ``p = e^{x}``, as ``-expm1(-α x)/α`` (SPEC §1.5, §7.3).

    The exponent ``-α x`` is clamped at 80 so summed log-probs cannot overflow float32.
    """
    return -torch.expm1((-alpha * logps).clamp(max=_MAX_EXP)) / alpha


# ---------------------------------------------------------------------------------------------

_CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: Literal["sigmoid", "hinge", "ipo", "simpo", "alphapo"] = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    nll_loss: torch.Tensor | None = None,
) -> LossOutput:
    """CPO and its TRL ``CPOTrainer`` variants (SPEC §7.2; also §7.1 simpo, §7.3 alpha).

    Args:
        policy_chosen_logps, policy_rejected_logps: summed completion log-probs ``S_θ`` ``[B]``.
        chosen_lengths, rejected_lengths: completion token counts ``[B]``; needed by the
            length-normalised types (``ipo``, ``simpo``, ``alphapo`` use ``A = S/max(1,n)``) and by the
            NLL term when ``cpo_alpha != 0`` and ``nll_loss`` is not given.
        beta: β (TRL default 0.1). loss_type: ``sigmoid`` (CPO), ``hinge``, ``ipo``, ``simpo``,
            ``alphapo`` (= ``simpo`` with ``cpo_alpha = 0``, as TRL's config does).
        label_smoothing: ε for ``sigmoid`` / ``simpo`` only. simpo_gamma: γ, margin for ``simpo``.
        cpo_alpha: weight of the NLL on chosen completions (TRL default 1.0).
        alpha: AlphaPO reward shape; ``0`` uses the log-probs themselves (SPEC §7.3).
        nll_loss: precomputed scalar NLL replacing the token mean ``-Σ S_w / Σ n_w``.

    Loss per pair: ``ℓ = f(r_w - r_l) + cpo_alpha · NLL`` where ``r`` is ``x`` (or the AlphaPO
    reward of ``x``), ``x = A`` for ipo/simpo else ``S``, and ``f`` is the contrastive loss
    (``simpo``: ``(1-ε) softplus(-(βΔr - γ)) + ε softplus(βΔr - γ)``). Metrics: ``rewards/*`` with
    reward ``β·r``, ``logps/*`` (the ``x`` used), ``nll_loss``.
    """
    _check_choice("loss_type", loss_type, _CPO_LOSS_TYPES)
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    _check_label_smoothing(label_smoothing, loss_type, ("sigmoid", "simpo"))
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    s_w = _vec("policy_chosen_logps", policy_chosen_logps)
    s_l = _vec("policy_rejected_logps", policy_rejected_logps, s_w.shape[0])
    batch = s_w.shape[0]

    average = loss_type in ("ipo", "simpo")
    n_w = n_l = None
    if average or (cpo_alpha != 0 and nll_loss is None):
        why = (
            f"loss_type={loss_type!r} averages log-probs" if average else "it sets the NLL term's token count"
        )
        n_w = _counts("chosen_lengths", chosen_lengths, batch, s_w, why)
    if average:
        n_l = _counts("rejected_lengths", rejected_lengths, batch, s_l, why)
        x_w, x_l = _average(s_w, n_w), _average(s_l, n_l)
    else:
        x_w, x_l = s_w, s_l

    r_w, r_l = (_alpha_reward(x_w, alpha), _alpha_reward(x_l, alpha)) if alpha != 0 else (x_w, x_l)
    losses = _contrastive(
        r_w - r_l, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=simpo_gamma
    )

    if cpo_alpha != 0:
        nll = (
            _scalar_loss("nll_loss", nll_loss).to(losses)
            if nll_loss is not None
            else _token_mean_nll(s_w, n_w)
        )
        losses = losses + cpo_alpha * nll
    else:
        nll = losses.new_zeros(())

    metrics = _pair_metrics(beta * r_w, beta * r_l, x_w, x_l)
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
    nll_loss: torch.Tensor | None = None,
) -> LossOutput:
    """SimPO (SPEC §7.1): ``ℓ = (1-ε) softplus(-(β(a_w - a_l) - γ)) + ε softplus(β(a_w - a_l) - γ)``.

    ``a = S/max(1, n)`` from the summed log-probs ``[B]`` and counts ``[B]``. Defaults are TRL's
    ``CPOConfig`` (β=0.1, γ=0.5), not the paper's (β=2.0–2.5, γ/β=0.25–0.55). ``cpo_alpha > 0``
    adds the chosen NLL (CPO-SimPO). Rewards logged: ``β·a``.
    """
    return cpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        beta=beta,
        loss_type="simpo",
        label_smoothing=label_smoothing,
        cpo_alpha=cpo_alpha,
        simpo_gamma=simpo_gamma,
        nll_loss=nll_loss,
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
    """AlphaPO (SPEC §7.3): SimPO on the reward ``r = (1 - p^{-α})/α``, ``p = exp(A_θ)``.

    Computed as ``-expm1(-α·A)/α`` (exponent clamped at 80) so ``p^{-α}`` never overflows.
    Defaults are the AlphaPO paper's Mistral setting (α=0.25, β=2.5, γ=0.1); TRL's
    ``loss_type="alphapo"`` keeps ``CPOConfig``'s β=0.1, γ=0.5, α=0 (which is plain SimPO).
    ``alpha → 0`` recovers :func:`simpo_loss`. Rewards logged: ``β·r``.
    """
    if alpha == 0:
        raise ValueError("alphapo_loss needs alpha != 0 (alpha = 0 is simpo_loss)")
    return cpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        beta=beta,
        loss_type="simpo",
        label_smoothing=label_smoothing,
        cpo_alpha=0.0,
        simpo_gamma=simpo_gamma,
        alpha=alpha,
    )


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
    nll_loss: torch.Tensor | None = None,
) -> LossOutput:
    """ORPO (SPEC §7.4): ``L = NLL(y_w) + β · mean_b softplus(-(logodds(y_w) - logodds(y_l)))``.

    ``a = S/max(1, n)`` ``[B]`` clamped to ``≤ -1e-6``; ``logodds(y) = a - log1mexp(a)`` (stable
    ``log p/(1-p)``, SPEC §1.5). The default NLL is the token mean over chosen *completion* tokens
    (the paper's L_SFT); TRL takes it over prompt + completion tokens: pass that as ``nll_loss``.
    λ = ``beta`` = 0.1 (TRL default). Per-pair ``losses = NLL - β·logσ(...)``.
    Metrics: ``rewards/*`` (``β·a``), ``logps/*`` (``a``), ``nll_loss``, ``log_odds_ratio``
    (mean logσ), ``log_odds_chosen`` (mean log-odds difference).
    """
    s_w = _vec("policy_chosen_logps", policy_chosen_logps)
    s_l = _vec("policy_rejected_logps", policy_rejected_logps, s_w.shape[0])
    why = "ORPO length-averages log-probs"
    n_w = _counts("chosen_lengths", chosen_lengths, s_w.shape[0], s_w, why)
    n_l = _counts("rejected_lengths", rejected_lengths, s_w.shape[0], s_l, why)
    a_w = _average(s_w, n_w).clamp(max=_ORPO_MAX_AVG_LOGP)
    a_l = _average(s_l, n_l).clamp(max=_ORPO_MAX_AVG_LOGP)

    log_odds = (a_w - log1mexp(a_w)) - (a_l - log1mexp(a_l))
    ratio = -F.softplus(-log_odds)  # log σ(log_odds)
    nll = _scalar_loss("nll_loss", nll_loss).to(ratio) if nll_loss is not None else _token_mean_nll(s_w, n_w)
    losses = nll - beta * ratio

    metrics = _pair_metrics(beta * a_w, beta * a_l, a_w, a_l)
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
    nll_loss: torch.Tensor | None = None,
) -> LossOutput:
    """TPO, triple preference optimisation (SPEC §7.5; TRL ``experimental.tpo``).

    Contrastive loss on (chosen, rejected) without a reference model, plus ``tpo_alpha`` times the
    NLL of the gold response (TRL calls it the "reference" response; no reference *model* here).
    ``sigmoid`` / ``hinge`` use summed ``S`` ``[B]``; ``ipo`` and ``tpo-l`` use ``A = S/max(1,n)``
    (``tpo-l``: ``softplus(-(βΔA - γ))`` with γ = ``tpo_l_gamma``). The NLL is the token mean over
    the gold completion tokens, ``-Σ S_gold / Σ n_gold``, or ``nll_loss`` when given.
    Defaults are TRL's (β=0.01, tpo_alpha=1.0, γ=0.5). Rewards logged: ``β·x``.
    """
    _check_choice("loss_type", loss_type, _TPO_LOSS_TYPES)
    _check_label_smoothing(label_smoothing, loss_type, ("sigmoid", "tpo-l"))
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    s_w = _vec("policy_chosen_logps", policy_chosen_logps)
    s_l = _vec("policy_rejected_logps", policy_rejected_logps, s_w.shape[0])
    batch = s_w.shape[0]
    if loss_type in ("ipo", "tpo-l"):
        why = f"loss_type={loss_type!r} averages log-probs"
        x_w = _average(s_w, _counts("chosen_lengths", chosen_lengths, batch, s_w, why))
        x_l = _average(s_l, _counts("rejected_lengths", rejected_lengths, batch, s_l, why))
    else:
        x_w, x_l = s_w, s_l
    losses = _contrastive(
        x_w - x_l, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=tpo_l_gamma
    )

    nll = losses.new_zeros(())
    if tpo_alpha != 0:
        if nll_loss is not None:
            nll = _scalar_loss("nll_loss", nll_loss).to(losses)
        else:
            if policy_gold_logps is None:
                raise ValueError("tpo_alpha != 0 needs policy_gold_logps and gold_lengths (or nll_loss)")
            s_g = _vec("policy_gold_logps", policy_gold_logps, batch)
            n_g = _counts("gold_lengths", gold_lengths, batch, s_g, "it sets the gold NLL's token count")
            nll = _token_mean_nll(s_g, n_g)
        losses = losses + tpo_alpha * nll

    metrics = _pair_metrics(beta * x_w, beta * x_l, x_w, x_l)
    metrics["nll_loss"] = nll.detach()
    return LossOutput(losses.mean(), losses, metrics)
