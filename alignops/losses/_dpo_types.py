"""The DPO loss types, one small function each, and the registry ``name -> LossType`` that
:func:`alignops.losses.dpo_loss` dispatches on.

Every function maps the shared :class:`PairTerms` of a batch of pairs to the per-pair loss
``ℓ [B]``. Notation: ``u_w = S_θ(y_w) - S_ref(y_w)``, ``u_l`` likewise, ``s(u)`` the f-divergence
score (``s(u) = u`` for the reverse KL of plain DPO), ``Δ = s(u_w) - s(u_l)`` and ``x = βΔ``.
The math of each type, with its paper, is in the function's docstring and in docs/losses.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ._common import ipo, log_sigmoid, logistic

_LN2 = math.log(2.0)
_BETA_DPO_MIN_BETA = 1e-3  # β-DPO clamps the batch β from below (official repo)
_BETA_DPO_STD_EPS = 1e-8  # guards the Gaussian filter against a zero EMA spread at the first step


@dataclass(frozen=True)
class PairTerms:
    """The quantities every loss type reads, built once per call by ``dpo_loss``.

    ``pc, pr`` = S_θ(y_w), S_θ(y_l); ``rc, rr`` = S_ref (zeros when reference-free, detached);
    ``s_w, s_l`` = f-divergence scores of ``u_w, u_l``; ``n_w, n_l`` = completion lengths as
    floats (or ``None``); ``chosen_nll`` = the "sft" term (scalar or ``[B]``, or ``None``);
    ``options`` = the per-variant option objects by family name (``slic``, ``gpo``, ``dpop``,
    ``rdpo``, ``sppo_soft``, ``beta_dpo``) plus ``discopop_tau``; ``metrics`` collects what a
    type adds to the logs (β-DPO).
    """

    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor
    rr: torch.Tensor
    s_w: torch.Tensor
    s_l: torch.Tensor
    beta: float
    label_smoothing: float
    clamp_max: float
    n_w: torch.Tensor | None
    n_l: torch.Tensor | None
    chosen_nll: torch.Tensor | None
    options: dict[str, Any]
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def u_w(self) -> torch.Tensor:
        return self.pc - self.rc

    @property
    def u_l(self) -> torch.Tensor:
        return self.pr - self.rr

    @property
    def delta(self) -> torch.Tensor:
        return self.s_w - self.s_l

    @property
    def x(self) -> torch.Tensor:
        return self.beta * self.delta

    def normalised_delta(self) -> torch.Tensor:
        """``s_w / max(1, n_w) - s_l / max(1, n_l)`` (TRL's length-normalised types)."""
        return self.s_w / self.n_w.clamp(min=1.0) - self.s_l / self.n_l.clamp(min=1.0)


# ------------------------------------------------------------------------------------------------
# f-divergence scores s(u) = f'(e^u) (Wang et al. 2023, "Beyond Reverse KL", arXiv:2309.16240);
# constants that cancel in s_w - s_l are dropped; exponents are clamped at `clamp_max`.


def _reverse_kl(u: torch.Tensor, alpha: float, clamp_max: float) -> torch.Tensor:
    return u


def _forward_kl(u: torch.Tensor, alpha: float, clamp_max: float) -> torch.Tensor:
    return -torch.expm1(torch.clamp(-u, max=clamp_max))  # f'(t) = 1 - 1/t


def _js_divergence(u: torch.Tensor, alpha: float, clamp_max: float) -> torch.Tensor:
    return _LN2 + log_sigmoid(u)  # f'(t) = log(2t / (1 + t))


def _alpha_divergence(u: torch.Tensor, alpha: float, clamp_max: float) -> torch.Tensor:
    """TRL 1.16 convention ``f'(t) = (t^(α-1) - 1) / (α - 1)``; ``α → 1`` is the reverse KL."""
    if abs(alpha - 1.0) < 1e-6:
        return u
    return torch.expm1(torch.clamp((alpha - 1.0) * u, max=clamp_max)) / (alpha - 1.0)


F_SCORES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "reverse_kl": _reverse_kl,
    "forward_kl": _forward_kl,
    "js_divergence": _js_divergence,
    "alpha_divergence": _alpha_divergence,
}

# ------------------------------------------------------------------------------------------------
# GPO convex functions f(x) (Tang et al. 2024, "Generalized Preference Optimization",
# arXiv:2402.05749), on x = βΔ.

GPO_FUNCTIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "logistic": lambda x, c: F.softplus(-x),
    "hinge": lambda x, c: torch.relu(1.0 - x),
    "squared": lambda x, c: (x - 1.0) ** 2,
    "exponential": lambda x, c: torch.exp(torch.clamp(-x, max=c)),
    "truncated_quadratic": lambda x, c: torch.relu(1.0 - x) ** 2,
    "savage": lambda x, c: torch.sigmoid(-x) ** 2,
}


# ------------------------------------------------------------------------------------------------
# the loss types


def sigmoid(t: PairTerms) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7): ``-log σ(βΔ)``."""
    return F.softplus(-t.x)


def cdpo(t: PairTerms) -> torch.Tensor:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"), label smoothing ε:
    ``(1 - ε) softplus(-βΔ) + ε softplus(βΔ)``."""
    return logistic(t.x, t.label_smoothing)


def robust(t: PairTerms) -> torch.Tensor:
    """Robust DPO (Chowdhury, Kini, Natarajan 2024, arXiv:2403.00409):
    ``[(1 - ε) softplus(-βΔ) - ε softplus(βΔ)] / (1 - 2ε)``."""
    eps = t.label_smoothing
    return ((1.0 - eps) * F.softplus(-t.x) - eps * F.softplus(t.x)) / (1.0 - 2.0 * eps)


def ipo_type(t: PairTerms) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036), length-normalised as TRL:
    ``(s_w/n_w - s_l/n_l - 1/(2β))²``."""
    return ipo(t.normalised_delta(), t.beta)


def hinge(t: PairTerms) -> torch.Tensor:
    """RSO hinge-norm (Liu et al. 2023, arXiv:2309.06657; TRL ``hinge``): ``max(0, 1 - βΔ)``."""
    return torch.relu(1.0 - t.x)


def slic(t: PairTerms) -> torch.Tensor:
    """SLiC-HF (Zhao et al. 2023, arXiv:2305.10425), no reference model:
    ``max(0, δ - S_θ(y_w) + S_θ(y_l)) - λ S_θ(y_ref)``."""
    o = t.options["slic"]
    out = torch.relu(o.delta - t.pc + t.pr)
    if o.lam != 0.0:
        out = out - o.lam * o.sft_target_logps.to(out.dtype)
    return out


def gpo(t: PairTerms) -> torch.Tensor:
    """GPO (Tang et al. 2024, arXiv:2402.05749): a convex ``f(βΔ)`` (name or callable)."""
    f = t.options["gpo"].function
    return f(t.x) if callable(f) else GPO_FUNCTIONS[f](t.x, t.clamp_max)


def dpop(t: PairTerms) -> torch.Tensor:
    """DPO-Positive (Pal et al. 2024, "Smaug", arXiv:2402.13228):
    ``-log σ(β[Δ - λ max(0, S_ref(y_w) - S_θ(y_w))])`` (penalty inside the sigmoid, paper v3)."""
    lam = t.options["dpop"].lam
    return F.softplus(-t.beta * (t.delta - lam * torch.relu(t.rc - t.pc)))


def beta_dpo(t: PairTerms) -> torch.Tensor:
    """β-DPO (Wu et al. 2024, arXiv:2407.08639; official repo semantics): batch β from the EMA of
    the gap ``M = Δ``, Gaussian data filter, ``softplus(-β_batch Δ)`` on the kept pairs.

    The per-pair term is rescaled by ``B / #kept`` so that its mean is the masked mean over the
    kept pairs (the repo's loss). Adds ``beta_dpo/{beta, gap_mean, gap_std, kept, mask}``.
    """
    o = t.options["beta_dpo"]
    keep, beta_batch = _beta_dpo_filter(t.delta.detach(), t.beta, o)
    raw = F.softplus(-beta_batch * t.delta)
    kept = keep.sum()
    t.metrics.update(
        {
            "beta_dpo/beta": beta_batch.detach(),
            "beta_dpo/gap_mean": o.state.gap_mean.detach(),
            "beta_dpo/gap_std": o.state.gap_std.detach(),
            "beta_dpo/kept": kept.to(raw.dtype),
            "beta_dpo/mask": keep,
        }
    )
    return torch.where(keep, raw, torch.zeros_like(raw)) * (keep.numel() / kept.clamp(min=1).to(raw.dtype))


@torch.no_grad()
def _beta_dpo_filter(gap: torch.Tensor, beta: float, o) -> tuple[torch.Tensor, torch.Tensor]:
    """Updates the EMA state in place (with this batch, before the loss, as the repo does), then
    draws ``max(1, ⌊B(1 - ρ)⌋)`` pairs without replacement ``∝ exp(-z²/2)``. Returns the keep
    mask and the detached ``β_batch = max(1e-3, β (1 + α (mean_kept M - M̄)))``."""
    state, b = o.state, gap.numel()
    zero = torch.zeros((), dtype=gap.dtype, device=gap.device)
    g = state.gamma
    batch_std = gap.std() if b > 1 else zero
    state.gap_mean = g * (zero if state.gap_mean is None else state.gap_mean.to(gap)) + (1.0 - g) * gap.mean()
    state.gap_std = g * (zero if state.gap_std is None else state.gap_std.to(gap)) + (1.0 - g) * batch_std
    z2 = ((gap - state.gap_mean) / state.gap_std.clamp(min=_BETA_DPO_STD_EPS)) ** 2
    # shifting by the smallest z² keeps the largest weight at 1: same distribution, never all zeros
    q = torch.exp(-0.5 * (z2 - z2.min()))
    idx = torch.multinomial(
        q.float(), max(1, int(b * (1.0 - o.rho))), replacement=False, generator=o.generator
    )
    keep = torch.zeros(b, dtype=torch.bool, device=gap.device)
    keep[idx] = True
    beta_batch = (beta * (1.0 + o.alpha * (gap[idx].mean() - state.gap_mean))).clamp(min=_BETA_DPO_MIN_BETA)
    return keep, beta_batch


def rdpo(t: PairTerms) -> torch.Tensor:
    """R-DPO (Park et al. 2024, arXiv:2403.19159): ``-log σ(βΔ + α (n_w - n_l))``."""
    return F.softplus(-(t.x + t.options["rdpo"].alpha * (t.n_w - t.n_l)))


def sigmoid_norm(t: PairTerms) -> torch.Tensor:
    """Length-normalised DPO (Meng et al. 2024, arXiv:2405.14734 "DPO w/ LN"; Tülu 3, Lambert et
    al. 2024, arXiv:2411.15124): ``softplus(-β (s_w/n_w - s_l/n_l))``."""
    return F.softplus(-t.beta * t.normalised_delta())


def sft(t: PairTerms) -> torch.Tensor:
    """The NLL of the chosen completions (TRL ``"sft"``; with "sigmoid": RPO, Pang et al. 2024,
    arXiv:2404.19733): a scalar (TRL's micro-batch token mean) broadcast per pair, or ``[B]``."""
    nll = t.chosen_nll
    return nll.expand(t.pc.shape[0]) if nll.dim() == 0 else nll


def exo_pair(t: PairTerms) -> torch.Tensor:
    """EXO (Ji et al. 2024, arXiv:2402.00856, Eq. 16): ``KL((p, 1 - p) || (1 - ε, ε))``, ``p = σ(βΔ)``."""
    eps = t.label_smoothing
    x = t.x
    return torch.sigmoid(x) * (log_sigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
        log_sigmoid(-x) - math.log(eps)
    )


def nca_pair(t: PairTerms) -> torch.Tensor:
    """NCA (Chen et al. 2024, arXiv:2402.05369): ``-logσ(βu_w) - ½ logσ(-βu_w) - ½ logσ(-βu_l)``."""
    rw, rl = t.beta * t.u_w, t.beta * t.u_l
    return F.softplus(-rw) + 0.5 * F.softplus(rw) + 0.5 * F.softplus(rl)


def bco_pair(t: PairTerms) -> torch.Tensor:
    """Paired BCO (Jung et al. 2024, arXiv:2404.04656; TRL 1.16, no running shift):
    ``-logσ(βu_w) - logσ(-βu_l)``."""
    return F.softplus(-t.beta * t.u_w) + F.softplus(t.beta * t.u_l)


def aot(t: PairTerms) -> torch.Tensor:
    """AOT (Melnyk et al. 2024, arXiv:2406.05882), batch-coupled:
    ``d = sort(S_θ(w) - S_θ(l)) - sort(S_ref(w) - S_ref(l))``, then the smoothed logistic of ``βd``;
    entry k belongs to the k-th sorted pair."""
    d = torch.sort(t.pc - t.pr).values - torch.sort(t.rc - t.rr).values
    return logistic(t.beta * d, t.label_smoothing)


def aot_unpaired(t: PairTerms) -> torch.Tensor:
    """Unpaired AOT (Melnyk et al. 2024, arXiv:2406.05882): ``d = sort(u_w) - sort(u_l)``."""
    d = torch.sort(t.u_w).values - torch.sort(t.u_l).values
    return logistic(t.beta * d, t.label_smoothing)


def apo_zero(t: PairTerms) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7): ``σ(-βu_w) + σ(βu_l)``."""
    return torch.sigmoid(-t.beta * t.u_w) + torch.sigmoid(t.beta * t.u_l)


def apo_down(t: PairTerms) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8): ``σ(βu_w) + σ(-β(u_w - u_l))``."""
    return torch.sigmoid(t.beta * t.u_w) + torch.sigmoid(-t.beta * (t.u_w - t.u_l))


def sppo_hard(t: PairTerms) -> torch.Tensor:
    """SPPO, hard labels (Wu et al. 2024, arXiv:2405.00675; TRL): ``(u_w - 1/(2β))² + (u_l + 1/(2β))²``."""
    return (t.u_w - 0.5 / t.beta) ** 2 + (t.u_l + 0.5 / t.beta) ** 2


def sppo_soft(t: PairTerms) -> torch.Tensor:
    """SPPO, soft win probabilities (Wu et al. 2024, arXiv:2405.00675), η = 1/β:
    ``Σ_y (u(y) - (P̂(y) - ½)/β)²`` over the chosen and rejected response."""
    o = t.options["sppo_soft"]
    dt = t.u_w.dtype
    return (t.u_w - (o.chosen_win_prob.to(dt) - 0.5) / t.beta) ** 2 + (
        t.u_l - (o.rejected_win_prob.to(dt) - 0.5) / t.beta
    ) ** 2


def discopop(t: PairTerms) -> torch.Tensor:
    """DiscoPOP / LRML (Chris Lu et al. 2024, arXiv:2406.08414, Eq. 5), ``ω = σ(x/τ)``:
    ``(1 - ω) softplus(-x) + ω e^{-x}``, the second term as ``exp(logσ(x/τ) - x)`` (TRL's literal
    ``ω · exp(-x)`` is ``inf · 0 = NaN`` for ``x ≲ -88`` in float32)."""
    x, tau = t.x, t.options["discopop_tau"]
    return torch.sigmoid(-x / tau) * F.softplus(-x) + torch.exp(log_sigmoid(x / tau) - x)


class LossType(NamedTuple):
    """A registry entry: the loss and what it reads.

    reference:  needs the reference log-probs (else ``S_ref ≡ 0`` may be passed as ``None``).
    delta_only: reads the pair only through ``Δ``, so an f-divergence score may replace ``u``.
    lengths:    needs ``chosen_lengths`` / ``rejected_lengths``.
    trl:        a TRL 1.16 ``DPOTrainer`` loss type (same name, same math).
    """

    loss: Callable[[PairTerms], torch.Tensor]
    reference: bool = True
    delta_only: bool = False
    lengths: bool = False
    trl: bool = True


# TRL 1.16 DPOTrainer loss types first (TRL's order), then the ones TRL 1.16 does not have.
LOSS_TYPES: dict[str, LossType] = {
    "sigmoid": LossType(sigmoid, delta_only=True),
    "hinge": LossType(hinge, delta_only=True),
    "ipo": LossType(ipo_type, delta_only=True, lengths=True),
    "exo_pair": LossType(exo_pair, delta_only=True),
    "nca_pair": LossType(nca_pair),
    "robust": LossType(robust, delta_only=True),
    "bco_pair": LossType(bco_pair),
    "sppo_hard": LossType(sppo_hard),
    "aot": LossType(aot),
    "aot_unpaired": LossType(aot_unpaired),
    "apo_zero": LossType(apo_zero),
    "apo_down": LossType(apo_down),
    "discopop": LossType(discopop, delta_only=True),
    "sft": LossType(sft, reference=False, delta_only=True),
    "sigmoid_norm": LossType(sigmoid_norm, delta_only=True, lengths=True),
    "cdpo": LossType(cdpo, delta_only=True, trl=False),
    "slic": LossType(slic, reference=False, trl=False),
    "gpo": LossType(gpo, delta_only=True, trl=False),
    "dpop": LossType(dpop, trl=False),
    "beta_dpo": LossType(beta_dpo, trl=False),
    "rdpo": LossType(rdpo, delta_only=True, lengths=True, trl=False),
    "sppo_soft": LossType(sppo_soft, trl=False),
}
