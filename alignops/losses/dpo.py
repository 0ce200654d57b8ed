"""The DPO family: pairwise, reference-based preference losses on sequence log-probs (SPEC §6).

Inputs are per-pair summed log-probs ``S_θ(y_w), S_θ(y_l)`` (policy, differentiable) and
``S_ref(y_w), S_ref(y_l)`` (reference, treated as constants), all ``[B]``. With the log-ratios
``u_w = S_θ(y_w) − S_ref(y_w)``, ``u_l = S_θ(y_l) − S_ref(y_l)`` and ``Δ = u_w − u_l`` (SPEC §1.2),
each loss type is a short elementwise function of ``x = βΔ`` (or of ``βu_w, βu_l``), reduced by a
mean over pairs; a list of types is combined as ``L = Σ_k w_k · mean_b ℓ_k,b`` (SPEC §1.4).
Everything is computed in float32 (float64 if an input is float64) with the stable forms of
SPEC §1.5, so ``|βΔ| ~ 1e3`` gives finite values and gradients.

Names and semantics follow TRL 1.16 ``DPOTrainer`` (``loss_type``, ``loss_weights``,
``label_smoothing``, ``f_divergence_type``, ``f_alpha_divergence_coef``, ``use_weighting``,
``discopop_tau``) for the types TRL has; the others follow the papers as written in SPEC §6.
LD-DPO (SPEC §6.10) is not a loss type: it changes the sequence log-probs fed in, see
:func:`alignops.sequence.ld_dpo_logps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._common import LossOutput, check_finite, log_sigmoid

__all__ = [
    "DPO_LOSS_TYPES",
    "DPO_F_DIVERGENCE_TYPES",
    "GPO_FUNCTIONS",
    "BetaDPOState",
    "dpo_loss",
]

# TRL 1.16 DPOTrainer loss types first, then the SPEC §6 types TRL 1.16 does not have.
TRL_DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
DPO_LOSS_TYPES = TRL_DPO_LOSS_TYPES + ("cdpo", "slic", "gpo", "dpop", "beta_dpo", "rdpo", "sppo_soft")

DPO_F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Types whose loss depends on the pair only through Δ_f = s(u_w) − s(u_l) (SPEC §6.12: the f-DPO
# reparametrisation leaves a β log Z(x) term that cancels only in that difference). TRL 1.16's
# list plus the non-TRL types built on Δ alone.
_F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
    | {"cdpo", "gpo", "rdpo"}
)

GPO_FUNCTIONS = ("logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage")

# Largest exponent fed to exp() by the f-divergence scores and the exponential GPO loss (SPEC §1.5,
# §6.12; TRL 1.16 clamps at these values): exp(80) ~ 5.5e34 stays finite in float32/bfloat16, exp(11)
# ~ 6e4 in float16.
_EXP_CLAMP = {torch.float16: 11.0}
_EXP_CLAMP_DEFAULT = 80.0

_BETA_DPO_MIN_BETA = 1e-3  # β-DPO clamps the batch β from below (official repo)
_BETA_DPO_STD_EPS = 1e-8  # guards the Gaussian filter against a zero EMA spread (SPEC §6.8 "Edge")


@dataclass
class BetaDPOState:
    """Running statistics of β-DPO (SPEC §6.8), updated in place by ``dpo_loss(loss_type="beta_dpo")``.

    gap_mean, gap_std: EMAs of the batch mean and (Bessel) standard deviation of the detached gap
    ``M_b = Δ_b``; start at 0 as in the official repo. gamma: EMA factor (0.9). Keep one state per
    training run; under data parallelism all-gather the gaps yourself if ranks must agree.
    """

    gap_mean: torch.Tensor | None = None
    gap_std: torch.Tensor | None = None
    gamma: float = 0.9


def _as_types(loss_type: str | Sequence[str]) -> list[str]:
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss")
    for t in types:
        if t not in DPO_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {t!r}; valid choices: {list(DPO_LOSS_TYPES)}")
    return types


def _check_pair_tensor(name: str, t: torch.Tensor | None, b: int, *, required_by: str | None = None):
    if t is None:
        if required_by is not None:
            raise ValueError(f"loss_type {required_by!r} needs `{name}` ([B] tensor)")
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != (b,):
        raise ValueError(f"{name} must have shape [B] = ({b},), got {tuple(t.shape)}")
    if t.is_floating_point():
        check_finite(name, t)
    return t


def _exp_clamp(dtype: torch.dtype) -> float:
    return _EXP_CLAMP.get(dtype, _EXP_CLAMP_DEFAULT)


def _f_scores(u: torch.Tensor, f_type: str, alpha: float, clamp_max: float) -> torch.Tensor:
    """``s(u) = f'(e^u)`` of SPEC §6.12 (constants that cancel in ``s_w − s_l`` dropped)."""
    if f_type == "reverse_kl":
        return u
    if f_type == "forward_kl":  # f'(t) = 1 − 1/t
        return -torch.expm1(torch.clamp(-u, max=clamp_max))
    if f_type == "js_divergence":  # f'(t) = log(2t / (1 + t)) = log 2 + log σ(u)
        return math.log(2.0) + log_sigmoid(u)
    # alpha_divergence, TRL 1.16 convention f'(t) = (t^(α−1) − 1) / (α − 1); α → 1 is reverse KL
    if abs(alpha - 1.0) < 1e-6:
        return u
    return torch.expm1(torch.clamp((alpha - 1.0) * u, max=clamp_max)) / (alpha - 1.0)


def _gpo(x: torch.Tensor, f: str | Callable[[torch.Tensor], torch.Tensor], clamp_max: float) -> torch.Tensor:
    """GPO convex functions of SPEC §6.6 applied to ``x = βΔ``."""
    if callable(f):
        return f(x)
    if f == "logistic":
        return F.softplus(-x)
    if f == "hinge":
        return torch.relu(1.0 - x)
    if f == "squared":
        return (x - 1.0) ** 2
    if f == "exponential":
        return torch.exp(torch.clamp(-x, max=clamp_max))
    if f == "truncated_quadratic":
        return torch.relu(1.0 - x) ** 2
    if f == "savage":
        return torch.sigmoid(-x) ** 2
    raise ValueError(f"unknown gpo_function {f!r}; valid choices: {list(GPO_FUNCTIONS)} or a callable")


def _smoothed_sigmoid(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``(1 − ε) softplus(−x) + ε softplus(x)`` (cDPO §6.2, AOT §6.18)."""
    return (1.0 - eps) * F.softplus(-x) + eps * F.softplus(x)


def _beta_dpo(
    delta: torch.Tensor,
    beta: float,
    state: BetaDPOState,
    *,
    alpha: float,
    rho: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """β-DPO of SPEC §6.8 (official repo semantics). Returns (per-pair losses, keep mask, β_batch)."""
    gap = delta.detach()
    b = gap.numel()
    with torch.no_grad():
        if state.gap_mean is None:
            state.gap_mean = torch.zeros((), dtype=gap.dtype, device=gap.device)
            state.gap_std = torch.zeros((), dtype=gap.dtype, device=gap.device)
        g = state.gamma
        batch_std = gap.std() if b > 1 else torch.zeros((), dtype=gap.dtype, device=gap.device)
        # EMA updated with this batch before the loss (repo order)
        state.gap_mean = g * state.gap_mean.to(gap) + (1.0 - g) * gap.mean()
        state.gap_std = g * state.gap_std.to(gap) + (1.0 - g) * batch_std
        z2 = ((gap - state.gap_mean) / state.gap_std.clamp(min=_BETA_DPO_STD_EPS)) ** 2
        # q ∝ exp(−z²/2); shifting by the smallest z² keeps the largest weight at 1 (same distribution,
        # never an all-zero weight vector)
        q = torch.exp(-0.5 * (z2 - z2.min()))
        num_kept = max(1, int(b * (1.0 - rho)))
        idx = torch.multinomial(q.float(), num_kept, replacement=False, generator=generator)
        keep = torch.zeros(b, dtype=torch.bool, device=gap.device)
        keep[idx] = True
        beta_batch = (beta * (1.0 + alpha * (gap[idx].mean() - state.gap_mean))).clamp(min=_BETA_DPO_MIN_BETA)
    losses = F.softplus(-beta_batch * delta)
    return losses, keep, beta_batch


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    use_weighting: bool = False,
    chosen_wpo_logw: torch.Tensor | None = None,
    rejected_wpo_logw: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
    dpop_lambda: float = 50.0,
    rdpo_alpha: float = 0.01,
    slic_delta: float = 1.0,
    slic_lambda: float = 0.1,
    sft_target_logps: torch.Tensor | None = None,
    gpo_function: str | Callable[[torch.Tensor], torch.Tensor] = "logistic",
    chosen_win_prob: torch.Tensor | None = None,
    rejected_win_prob: torch.Tensor | None = None,
    beta_dpo_state: BetaDPOState | None = None,
    beta_dpo_alpha: float = 0.0,
    beta_dpo_rho: float = 0.2,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """DPO-family loss on per-pair sequence log-probs (SPEC §6).

    Positional inputs, all ``[B]``: ``policy_chosen_logps`` = S_θ(y_w), ``policy_rejected_logps`` =
    S_θ(y_l), ``ref_chosen_logps`` = S_ref(y_w), ``ref_rejected_logps`` = S_ref(y_l). Reference
    log-probs are detached. They may be ``None`` (S_ref ≡ 0) only when every type ignores the
    reference (``"slic"``, ``"sft"``). Any float dtype; math in float32 (float64 stays float64).

    loss_type (one name or a list, combined as ``Σ_k loss_weights[k] · mean_b ℓ_k``, SPEC §1.4):
      TRL 1.16: "sigmoid" §6.1, "robust" §6.3, "ipo" §6.4 (length-normalised, needs lengths),
      "hinge" §6.5 (= RSO hinge-norm), "sigmoid_norm" §6.11 (needs lengths), "sft" §6.14 (needs
      ``chosen_nll``; ``["sigmoid", "sft"]`` = RPO), "exo_pair" §6.15 (ε > 0), "nca_pair" §6.16,
      "bco_pair" §6.17, "aot" / "aot_unpaired" §6.18, "apo_zero" / "apo_down" §6.19,
      "sppo_hard" §6.20, "discopop" §6.21 (stable form of SPEC §1.5).
      Not in TRL 1.16: "cdpo" §6.2 (label smoothing ε), "slic" §6.5 (original SLiC-HF with its SFT
      term), "gpo" §6.6 (``gpo_function``), "dpop" §6.7, "beta_dpo" §6.8 (stateful), "rdpo" §6.9
      (needs lengths), "sppo_soft" §6.20 (needs win probabilities).

    Options:
      beta: β > 0 (IPO: τ). label_smoothing: ε for robust / cdpo (ε ∈ [0, 0.5)), exo_pair
      (ε ∈ (0, 1)), aot / aot_unpaired. As in TRL 1.16 it is ignored by "sigmoid" (use "cdpo").
      f_divergence_type / f_alpha_divergence_coef: f-DPO scores s(u) of §6.12 replace u in Δ
      (only for types that depend on Δ alone; others raise). Exponents are clamped at 80 (11 for
      float16 inputs), as TRL does for the α-divergence; here for forward KL and the exponential
      GPO loss too (their gradient is 0 beyond the clamp).
      chosen_lengths, rejected_lengths ``[B]``: completion token counts n_w, n_l (ipo,
      sigmoid_norm: divided by max(1, n); rdpo: α (n_w − n_l)).
      chosen_nll: the "sft" term. A scalar gives TRL's token mean over the micro-batch,
      ``−Σ S_θ(y_w) / Σ n_w`` (e.g. ``-(out.sums.sum() / out.counts.sum().clamp(min=1))`` of the
      chosen half of :func:`alignops.sequence.sequence_logprobs`); a ``[B]`` tensor is used per pair.
      use_weighting + chosen_wpo_logw, rejected_wpo_logw ``[B]``: WPO §6.13, every per-pair loss
      (the "sft" term included) is multiplied by ``exp(w̄_w) · exp(w̄_l)`` (no clamp, TRL 1.16;
      w̄ from :func:`alignops.sequence.wpo_log_weights`). Not allowed with aot / aot_unpaired.
      discopop_tau: τ of §6.21 (0.05). dpop_lambda: λ of §6.7 (50). rdpo_alpha: α of §6.9.
      slic_delta, slic_lambda, sft_target_logps ``[B]``: δ, λ and S_θ(y_ref) of §6.5 (y_ref is the
      SFT target; pass ``policy_chosen_logps`` to regularise on the chosen response).
      gpo_function: one of ``GPO_FUNCTIONS`` or a callable ``f(x)`` on ``x = βΔ``.
      chosen_win_prob, rejected_win_prob ``[B]``: P̂(y ≻ π_t | x) of soft SPPO §6.20 (η = 1/β;
      the reference plays the previous iterate π_t).
      beta_dpo_state, beta_dpo_alpha, beta_dpo_rho, generator: β-DPO §6.8; the state is updated in
      place; ``generator`` seeds the data filter's sampling.

    Returns ``LossOutput(loss, losses [B], metrics)``: ``loss = losses.mean()`` where ``losses`` is
    the weighted per-pair sum over types (for "beta_dpo" the per-pair term is rescaled so that its
    mean is the masked mean over kept pairs; for "aot*" entry k belongs to the k-th sorted pair,
    not to pair k). Metrics (detached scalars, TRL names, SPEC §1.3): ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (β·u with the base β, strict
    >), ``logps/chosen``, ``logps/rejected``; β-DPO adds ``beta_dpo/beta``, ``beta_dpo/gap_mean``,
    ``beta_dpo/gap_std``, ``beta_dpo/kept`` and the per-pair keep mask ``beta_dpo/mask [B]``.
    """
    types = _as_types(loss_type)
    # ---- validation -------------------------------------------------------------------------------
    if not isinstance(policy_chosen_logps, torch.Tensor):
        raise TypeError(
            f"policy_chosen_logps must be a torch.Tensor, got {type(policy_chosen_logps).__name__}"
        )
    if policy_chosen_logps.dim() != 1:
        raise ValueError(f"policy_chosen_logps must be [B], got shape {tuple(policy_chosen_logps.shape)}")
    b = policy_chosen_logps.shape[0]
    if b == 0:
        raise ValueError("empty batch (B = 0)")
    ref_free = ref_chosen_logps is None and ref_rejected_logps is None
    if ref_free:
        needs_ref = [t for t in types if t not in ("slic", "sft")]
        if needs_ref:
            raise ValueError(f"loss_type {needs_ref} needs ref_chosen_logps and ref_rejected_logps")
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    named = [("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps)]
    if not ref_free:
        named += [("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)]
    for name, t in named:
        _check_pair_tensor(name, t, b)
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [float(w) for w in loss_weights]
        if len(weights) != len(types):
            raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types")
    if f_divergence_type not in DPO_F_DIVERGENCE_TYPES:
        raise ValueError(
            f"unknown f_divergence_type {f_divergence_type!r}; valid choices: {list(DPO_F_DIVERGENCE_TYPES)}"
        )
    if f_divergence_type != "reverse_kl":
        bad = [t for t in types if t not in _F_DIVERGENCE_LOSS_TYPES]
        if bad:
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} is only valid for loss types depending on Δ alone "
                f"{sorted(_F_DIVERGENCE_LOSS_TYPES)}; got {bad}"
            )
    eps = float(label_smoothing)
    if any(t in ("robust", "cdpo") for t in types) and not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for 'robust' / 'cdpo', got {eps}")
    if "exo_pair" in types and not 0.0 < eps < 1.0:
        raise ValueError(f"'exo_pair' needs label_smoothing in (0, 1) (the EXO paper uses 1e-3), got {eps}")
    if any(t in ("aot", "aot_unpaired") for t in types) and not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1] for 'aot' / 'aot_unpaired', got {eps}")
    need_len = next((t for t in types if t in ("ipo", "sigmoid_norm", "rdpo")), None)
    chosen_lengths = _check_pair_tensor("chosen_lengths", chosen_lengths, b, required_by=need_len)
    rejected_lengths = _check_pair_tensor("rejected_lengths", rejected_lengths, b, required_by=need_len)
    if chosen_nll is not None and not isinstance(chosen_nll, torch.Tensor):
        chosen_nll = torch.tensor(float(chosen_nll), device=policy_chosen_logps.device)
    if "sft" in types:
        if chosen_nll is None:
            raise ValueError(
                "loss_type 'sft' needs `chosen_nll`: a scalar token-mean NLL of the chosen completions "
                "(TRL 1.16) or a [B] per-pair NLL"
            )
        if chosen_nll.dim() == 0:
            check_finite("chosen_nll", chosen_nll)
        else:
            _check_pair_tensor("chosen_nll", chosen_nll, b)
    if use_weighting:
        if any(t in ("aot", "aot_unpaired") for t in types):
            raise ValueError("WPO weighting (use_weighting=True) is not allowed with 'aot' / 'aot_unpaired'")
        _check_pair_tensor("chosen_wpo_logw", chosen_wpo_logw, b, required_by="use_weighting")
        _check_pair_tensor("rejected_wpo_logw", rejected_wpo_logw, b, required_by="use_weighting")
    elif chosen_wpo_logw is not None or rejected_wpo_logw is not None:
        raise ValueError("chosen_wpo_logw / rejected_wpo_logw are given but use_weighting=False")
    if "slic" in types:
        if slic_lambda != 0.0:
            _check_pair_tensor("sft_target_logps", sft_target_logps, b, required_by="slic")
    if "sppo_soft" in types:
        _check_pair_tensor("chosen_win_prob", chosen_win_prob, b, required_by="sppo_soft")
        _check_pair_tensor("rejected_win_prob", rejected_win_prob, b, required_by="sppo_soft")
    if "beta_dpo" in types:
        if beta_dpo_state is None:
            raise ValueError("loss_type 'beta_dpo' needs `beta_dpo_state=BetaDPOState()` (kept across steps)")
        if not 0.0 <= beta_dpo_rho < 1.0:
            raise ValueError(f"beta_dpo_rho must be in [0, 1), got {beta_dpo_rho}")
    if "discopop" in types and not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    if "gpo" in types and not callable(gpo_function) and gpo_function not in GPO_FUNCTIONS:
        raise ValueError(
            f"unknown gpo_function {gpo_function!r}; valid choices: {list(GPO_FUNCTIONS)} or a callable"
        )

    # ---- shared quantities (SPEC §1.2) ------------------------------------------------------------
    dts = [t.dtype for _, t in named]
    dt = torch.float64 if torch.float64 in dts else torch.float32
    clamp_max = _exp_clamp(policy_chosen_logps.dtype)
    pc = policy_chosen_logps.to(dt)
    pr = policy_rejected_logps.to(dt)
    if ref_free:
        rc = torch.zeros_like(pc)
        rr = torch.zeros_like(pr)
    else:
        rc = ref_chosen_logps.detach().to(dt)
        rr = ref_rejected_logps.detach().to(dt)
    u_w = pc - rc  # chosen log-ratio
    u_l = pr - rr  # rejected log-ratio
    s_w = _f_scores(u_w, f_divergence_type, f_alpha_divergence_coef, clamp_max)
    s_l = _f_scores(u_l, f_divergence_type, f_alpha_divergence_coef, clamp_max)
    delta = s_w - s_l  # Δ_f (= Δ for reverse KL)
    x = beta * delta

    def lengths(t: torch.Tensor) -> torch.Tensor:
        return t.to(dt).clamp(min=1.0)

    metrics: dict[str, torch.Tensor] = {}
    total_loss = None
    total_losses = None
    wpo = None
    if use_weighting:
        wpo = torch.exp(chosen_wpo_logw.detach().to(dt)) * torch.exp(rejected_wpo_logw.detach().to(dt))

    for t, w in zip(types, weights):
        if t == "sigmoid":  # §6.1: −log σ(βΔ)
            ell = F.softplus(-x)
        elif t == "cdpo":  # §6.2: (1 − ε) softplus(−βΔ) + ε softplus(βΔ)
            ell = _smoothed_sigmoid(x, eps)
        elif t == "robust":  # §6.3: [(1 − ε) softplus(−βΔ) − ε softplus(βΔ)] / (1 − 2ε)
            ell = ((1.0 - eps) * F.softplus(-x) - eps * F.softplus(x)) / (1.0 - 2.0 * eps)
        elif t == "ipo":  # §6.4 (TRL length-normalised): (s_w/n_w − s_l/n_l − 1/(2β))²
            ell = (s_w / lengths(chosen_lengths) - s_l / lengths(rejected_lengths) - 1.0 / (2.0 * beta)) ** 2
        elif t == "hinge":  # §6.5 (TRL hinge = RSO hinge-norm): max(0, 1 − βΔ)
            ell = torch.relu(1.0 - x)
        elif t == "slic":  # §6.5 SLiC-HF: max(0, δ − S_θ(y_w) + S_θ(y_l)) − λ S_θ(y_ref)
            ell = torch.relu(slic_delta - pc + pr)
            if slic_lambda != 0.0:
                ell = ell - slic_lambda * sft_target_logps.to(dt)
        elif t == "gpo":  # §6.6: f(βΔ)
            ell = _gpo(x, gpo_function, clamp_max)
        elif t == "dpop":  # §6.7: −log σ(β[Δ − λ max(0, S_ref(y_w) − S_θ(y_w))])
            ell = F.softplus(-beta * (delta - dpop_lambda * torch.relu(rc - pc)))
        elif t == "beta_dpo":  # §6.8: softplus(−β_batch Δ) on the kept pairs, masked mean
            raw, keep, beta_batch = _beta_dpo(
                delta, beta, beta_dpo_state, alpha=beta_dpo_alpha, rho=beta_dpo_rho, generator=generator
            )
            kept = keep.sum()
            # rescale so that mean_b(ell) is Σ_kept ℓ / #kept (the repo's masked mean)
            ell = torch.where(keep, raw, torch.zeros_like(raw)) * (b / kept.clamp(min=1).to(dt))
            metrics["beta_dpo/beta"] = beta_batch.detach().float()
            metrics["beta_dpo/gap_mean"] = beta_dpo_state.gap_mean.detach().float()
            metrics["beta_dpo/gap_std"] = beta_dpo_state.gap_std.detach().float()
            metrics["beta_dpo/kept"] = kept.float()
            metrics["beta_dpo/mask"] = keep
        elif t == "rdpo":  # §6.9: −log σ(βΔ + α (n_w − n_l))
            ell = F.softplus(-(x + rdpo_alpha * (chosen_lengths.to(dt) - rejected_lengths.to(dt))))
        elif t == "sigmoid_norm":  # §6.11: softplus(−β (s_w/n_w − s_l/n_l))
            ell = F.softplus(-beta * (s_w / lengths(chosen_lengths) - s_l / lengths(rejected_lengths)))
        elif t == "sft":  # §6.14: NLL of the chosen completions, broadcast per pair when scalar
            ell = chosen_nll.to(dt).expand(b) if chosen_nll.dim() == 0 else chosen_nll.to(dt)
        elif t == "exo_pair":  # §6.15: KL((p, 1 − p) ‖ (1 − ε, ε)), p = σ(βΔ)
            ell = torch.sigmoid(x) * (log_sigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
                log_sigmoid(-x) - math.log(eps)
            )
        elif t == "nca_pair":  # §6.16: −logσ(βu_w) − ½ logσ(−βu_w) − ½ logσ(−βu_l)
            ell = F.softplus(-beta * u_w) + 0.5 * F.softplus(beta * u_w) + 0.5 * F.softplus(beta * u_l)
        elif t == "bco_pair":  # §6.17 (1.16, δ = 0): −logσ(βu_w) − logσ(−βu_l)
            ell = F.softplus(-beta * u_w) + F.softplus(beta * u_l)
        elif t == "aot":  # §6.18: d = sort(S_θ(w) − S_θ(l)) − sort(S_ref(w) − S_ref(l))
            d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
            ell = _smoothed_sigmoid(beta * d, eps)
        elif t == "aot_unpaired":  # §6.18: d = sort(u_w) − sort(u_l)
            d = torch.sort(u_w).values - torch.sort(u_l).values
            ell = _smoothed_sigmoid(beta * d, eps)
        elif t == "apo_zero":  # §6.19: σ(−βu_w) + σ(βu_l)
            ell = torch.sigmoid(-beta * u_w) + torch.sigmoid(beta * u_l)
        elif t == "apo_down":  # §6.19: σ(βu_w) + σ(−βΔ)
            ell = torch.sigmoid(beta * u_w) + torch.sigmoid(-beta * (u_w - u_l))
        elif t == "sppo_hard":  # §6.20: (u_w − 1/(2β))² + (u_l + 1/(2β))²
            ell = (u_w - 0.5 / beta) ** 2 + (u_l + 0.5 / beta) ** 2
        elif t == "sppo_soft":  # §6.20: Σ_y (u(y) − (1/β)(P̂(y) − ½))²
            ell = (u_w - (chosen_win_prob.to(dt) - 0.5) / beta) ** 2 + (
                u_l - (rejected_win_prob.to(dt) - 0.5) / beta
            ) ** 2
        elif t == "discopop":  # §6.21 stable form: (1 − ω) softplus(−x) + exp(logσ(x/τ) − x)
            tau = discopop_tau
            ell = torch.sigmoid(-x / tau) * F.softplus(-x) + torch.exp(log_sigmoid(x / tau) - x)
        else:  # pragma: no cover - _as_types validated the names
            raise AssertionError(t)

        if wpo is not None:  # §6.13
            ell = ell * wpo
        term = ell.mean() * w
        total_loss = term if total_loss is None else total_loss + term
        total_losses = ell * w if total_losses is None else total_losses + ell * w

    # ---- metrics (SPEC §1.3) ----------------------------------------------------------------------
    with torch.no_grad():
        r_w = (beta * u_w).float()
        r_l = (beta * u_l).float()
        metrics["rewards/chosen"] = r_w.mean()
        metrics["rewards/rejected"] = r_l.mean()
        metrics["rewards/margins"] = (r_w - r_l).mean()
        metrics["rewards/accuracies"] = (r_w > r_l).float().mean()
        metrics["logps/chosen"] = pc.detach().float().mean()
        metrics["logps/rejected"] = pr.detach().float().mean()
    return LossOutput(total_loss, total_losses, metrics)
