"""The DPO family: pairwise, reference-based preference losses on sequence log-probs.

Inputs are per-pair summed log-probs ``S_θ(y_w), S_θ(y_l)`` (policy, differentiable) and
``S_ref(y_w), S_ref(y_l)`` (reference, treated as constants), all ``[B]``. With the log-ratios
``u_w = S_θ(y_w) − S_ref(y_w)``, ``u_l = S_θ(y_l) − S_ref(y_l)`` and ``Δ = u_w − u_l``, each
loss type is a short elementwise function of ``x = βΔ`` (or of ``βu_w, βu_l``), reduced by a mean
over pairs; a list of types is combined as ``L = Σ_k w_k · mean_b ℓ_k,b`` (TRL's ``loss_type``
list with ``loss_weights``). Everything is computed in float32 (float64 if an input is float64)
with stable forms, so ``|βΔ| ~ 1e3`` gives finite values and gradients.

:func:`dpo_loss` is a dispatcher: each loss type is one small function of
:mod:`alignops.losses._dpo_types` (registry ``name -> LossType``). Names and semantics follow
TRL 1.16 ``DPOTrainer`` (``loss_type``, ``loss_weights``, ``label_smoothing``,
``f_divergence_type``, ``f_alpha_divergence_coef``, ``use_weighting``, ``discopop_tau``) for the
types TRL has; the others follow their papers, and the options only one of them reads come in one
frozen object per variant (:class:`SLiCOptions`, :class:`GPOOptions`, :class:`DPOPOptions`,
:class:`RDPOOptions`, :class:`SPPOSoftOptions`, :class:`BetaDPOOptions`).
LD-DPO (Liu et al. 2024, arXiv:2409.06411) is not a loss type: it changes the sequence log-probs
fed in, see :func:`alignops.sequence.ld_dpo_logps`. The math of every type: docs/losses.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .._checks import check_choice, scalar, vec
from ..kernels._common import check_number, compute_dtype
from ._common import LossOutput, max_exp, pair_metrics
from ._dpo_types import F_SCORES, LOSS_TYPES, PairTerms
from ._dpo_types import GPO_FUNCTIONS as _GPO

__all__ = [
    "DPO_LOSS_TYPES",
    "DPO_F_DIVERGENCE_TYPES",
    "GPO_FUNCTIONS",
    "TRL_DPO_LOSS_TYPES",
    "BetaDPOOptions",
    "BetaDPOState",
    "DPOPOptions",
    "GPOOptions",
    "RDPOOptions",
    "SLiCOptions",
    "SPPOSoftOptions",
    "dpo_loss",
]

DPO_LOSS_TYPES: tuple[str, ...] = tuple(LOSS_TYPES)
TRL_DPO_LOSS_TYPES: tuple[str, ...] = tuple(n for n, s in LOSS_TYPES.items() if s.trl)
DPO_F_DIVERGENCE_TYPES: tuple[str, ...] = tuple(F_SCORES)
GPO_FUNCTIONS: tuple[str, ...] = tuple(_GPO)


@dataclass(frozen=True)
class SLiCOptions:
    """``loss_type="slic"``, SLiC-HF (Zhao et al. 2023, arXiv:2305.10425): margin ``delta`` (δ),
    regulariser weight ``lam`` (λ) and ``sft_target_logps`` ``[B]`` = S_θ(y_ref) of the SFT target
    (pass ``policy_chosen_logps`` to regularise on the chosen response; unused when ``lam = 0``)."""

    delta: float = 1.0
    lam: float = 0.1
    sft_target_logps: torch.Tensor | None = None


@dataclass(frozen=True)
class GPOOptions:
    """``loss_type="gpo"`` (Tang et al. 2024, arXiv:2402.05749): ``function`` is one of
    :data:`GPO_FUNCTIONS` or a callable ``f(x)`` on ``x = βΔ``."""

    function: str | Callable[[torch.Tensor], torch.Tensor] = "logistic"


@dataclass(frozen=True)
class DPOPOptions:
    """``loss_type="dpop"`` (Pal et al. 2024, arXiv:2402.13228): penalty weight ``lam`` (λ, paper 50)."""

    lam: float = 50.0


@dataclass(frozen=True)
class RDPOOptions:
    """``loss_type="rdpo"`` (Park et al. 2024, arXiv:2403.19159): length weight ``alpha`` (α)."""

    alpha: float = 0.01


@dataclass(frozen=True)
class SPPOSoftOptions:
    """``loss_type="sppo_soft"`` (Wu et al. 2024, arXiv:2405.00675): ``P̂(y ≻ π_t | x)`` of the
    chosen and of the rejected response, ``[B]`` each (the reference plays the previous iterate)."""

    chosen_win_prob: torch.Tensor
    rejected_win_prob: torch.Tensor


@dataclass
class BetaDPOState:
    """Running statistics of β-DPO (Wu et al. 2024, arXiv:2407.08639), updated in place by
    ``dpo_loss(loss_type="beta_dpo")``.

    gap_mean, gap_std: EMAs of the batch mean and (Bessel) standard deviation of the detached gap
    ``M_b = Δ_b``; start at 0 as in the official repo. gamma: EMA factor (0.9). Keep one state per
    training run; under data parallelism all-gather the gaps yourself if ranks must agree.
    """

    gap_mean: torch.Tensor | None = None
    gap_std: torch.Tensor | None = None
    gamma: float = 0.9


@dataclass(frozen=True)
class BetaDPOOptions:
    """``loss_type="beta_dpo"``: the carried ``state``, the β scaling ``alpha`` (α, repo default 0),
    the filtered fraction ``rho`` (ρ ∈ [0, 1), 0.2) and a ``generator`` seeding the data filter."""

    state: BetaDPOState
    alpha: float = 0.0
    rho: float = 0.2
    generator: torch.Generator | None = None


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
    use_weighting: bool = False,
    discopop_tau: float = 0.05,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | float | None = None,
    wpo_logw: tuple[torch.Tensor, torch.Tensor] | None = None,
    slic: SLiCOptions | None = None,
    gpo: GPOOptions | None = None,
    dpop: DPOPOptions | None = None,
    rdpo: RDPOOptions | None = None,
    sppo_soft: SPPOSoftOptions | None = None,
    beta_dpo: BetaDPOOptions | None = None,
) -> LossOutput:
    """DPO-family loss on per-pair sequence log-probs (DPO: Rafailov et al. 2023, arXiv:2305.18290).

    Positional inputs, all ``[B]``: ``policy_chosen_logps`` = S_θ(y_w), ``policy_rejected_logps`` =
    S_θ(y_l), ``ref_chosen_logps`` = S_ref(y_w), ``ref_rejected_logps`` = S_ref(y_l). Reference
    log-probs are detached. They may be ``None`` (S_ref ≡ 0) only when every type ignores the
    reference (``"slic"``, ``"sft"``). Any float dtype; math in float32 (float64 stays float64).

    loss_type (one name or a list, combined as ``Σ_k loss_weights[k] · mean_b ℓ_k``):
      TRL 1.16 (:data:`TRL_DPO_LOSS_TYPES`): "sigmoid", "hinge" (RSO hinge-norm), "ipo"
      (length-normalised, needs lengths), "exo_pair" (ε > 0), "nca_pair", "robust", "bco_pair",
      "sppo_hard", "aot" / "aot_unpaired", "apo_zero" / "apo_down", "discopop", "sft" (needs
      ``chosen_nll``; ``["sigmoid", "sft"]`` = RPO), "sigmoid_norm" (needs lengths).
      Not in TRL 1.16: "cdpo" (label smoothing ε), "slic" (original SLiC-HF with its SFT term),
      "gpo", "dpop", "beta_dpo" (stateful), "rdpo" (needs lengths), "sppo_soft".
      The formula and paper of each: :mod:`alignops.losses._dpo_types` and docs/losses.md.

    Options (TRL's names):
      beta: β > 0 (IPO: τ). label_smoothing: ε for robust / cdpo (ε ∈ [0, 0.5)), exo_pair
      (ε ∈ (0, 1)), aot / aot_unpaired. As in TRL 1.16 it is ignored by "sigmoid" (use "cdpo").
      f_divergence_type / f_alpha_divergence_coef: the f-DPO score ``s(u) = f'(e^u)`` (Wang et al.
      2023, arXiv:2309.16240) replaces u in Δ, only for types that depend on Δ alone (others
      raise). Exponents are clamped at 80 (11 for float16 inputs), as TRL does for the
      α-divergence; here for forward KL and the exponential GPO loss too.
      use_weighting: WPO (Zhou et al. 2024, arXiv:2406.11827); needs ``wpo_logw``. discopop_tau: τ.

    Per-pair inputs:
      chosen_lengths, rejected_lengths ``[B]``: completion token counts n_w, n_l (ipo,
      sigmoid_norm: divided by max(1, n); rdpo: α (n_w − n_l)).
      chosen_nll: the "sft" term. A scalar gives TRL's token mean over the micro-batch,
      ``−Σ S_θ(y_w) / Σ n_w``; a ``[B]`` tensor is used per pair.
      wpo_logw: ``(w̄(y_w), w̄(y_l))``, ``[B]`` each, from :func:`alignops.sequence.wpo_log_weights`
      (e.g. ``split_pair(wpo_log_weights(...))``): every per-pair loss (the "sft" term included)
      is multiplied by ``exp(w̄_w) · exp(w̄_l)`` (no clamp, TRL 1.16). Not allowed with aot*.

    Variant options (one frozen object each; ``None`` = that object's defaults): ``slic``,
    ``gpo``, ``dpop``, ``rdpo``, ``sppo_soft`` (required for that type), ``beta_dpo`` (required).

    Returns ``LossOutput(loss, losses [B], metrics)``: ``loss = losses.mean()`` where ``losses`` is
    the weighted per-pair sum over types (for "beta_dpo" the per-pair term is rescaled so that its
    mean is the masked mean over kept pairs; for "aot*" entry k belongs to the k-th sorted pair,
    not to pair k). Metrics (detached, TRL names): ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies`` (β·u with the base β, strict >), ``logps/chosen``,
    ``logps/rejected``; β-DPO adds ``beta_dpo/{beta, gap_mean, gap_std, kept}`` and the per-pair
    keep mask ``beta_dpo/mask [B]``.
    """
    types, weights = _loss_types(loss_type, loss_weights)
    options = dict(
        discopop_tau=discopop_tau,
        slic=slic or SLiCOptions(),
        gpo=gpo or GPOOptions(),
        dpop=dpop or DPOPOptions(),
        rdpo=rdpo or RDPOOptions(),
        sppo_soft=sppo_soft,
        beta_dpo=beta_dpo,
    )
    t = _pair_terms(
        types,
        (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps),
        beta=beta,
        label_smoothing=label_smoothing,
        f_divergence=(f_divergence_type, f_alpha_divergence_coef),
        lengths=(chosen_lengths, rejected_lengths),
        chosen_nll=chosen_nll,
        options=options,
    )
    for name in types:
        _CHECKS.get(name, _no_check)(t)
    wpo = _wpo_weight(use_weighting, wpo_logw, types, t.pc.shape[0])
    losses = None
    for name, w in zip(types, weights):
        ell = LOSS_TYPES[name].loss(t)
        if wpo is not None:
            ell = ell * wpo
        losses = w * ell if losses is None else losses + w * ell
    metrics = pair_metrics(beta * t.u_w, beta * t.u_l, t.pc, t.pr)
    metrics.update(t.metrics)
    return LossOutput(losses.mean(), losses, metrics)


def _loss_types(loss_type: str | Sequence[str], loss_weights) -> tuple[list[str], list[float]]:
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss")
    for name in types:
        check_choice("loss_type", name, DPO_LOSS_TYPES)
    if loss_weights is None:
        return types, [1.0] * len(types)
    weights = [float(w) for w in loss_weights]
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types")
    return types, weights


def _pair_terms(types, logps, *, beta, label_smoothing, f_divergence, lengths, chosen_nll, options):
    """Validates the inputs the chosen types read and builds their :class:`PairTerms`."""
    pc = vec("policy_chosen_logps", logps[0])
    b = pc.shape[0]
    if b == 0:
        raise ValueError("empty batch (B = 0)")
    pr = vec("policy_rejected_logps", logps[1], b)
    rc, rr = _reference(types, logps[2], logps[3], pc)
    check_number("beta", beta, lo=0.0, lo_open=True)
    dt = compute_dtype(pc, pr, rc, rr)
    pc, pr, rc, rr = (v.to(dt) for v in (pc, pr, rc, rr))
    f_type, f_alpha = f_divergence
    check_choice("f_divergence_type", f_type, DPO_F_DIVERGENCE_TYPES)
    if f_type != "reverse_kl" and (bad := [n for n in types if not LOSS_TYPES[n].delta_only]):
        raise ValueError(
            f"f_divergence_type={f_type!r} is only valid for loss types depending on Δ alone "
            f"{sorted(n for n, s in LOSS_TYPES.items() if s.delta_only)}; got {bad}"
        )
    clamp_max = max_exp(logps[0].dtype)
    n_w, n_l = _lengths(types, lengths, b, dt)
    nll = None
    if chosen_nll is not None:
        is_scalar = not isinstance(chosen_nll, torch.Tensor) or chosen_nll.dim() == 0
        nll = scalar("chosen_nll", chosen_nll, pc) if is_scalar else vec("chosen_nll", chosen_nll, b)
    score = F_SCORES[f_type]
    s_w, s_l = score(pc - rc, f_alpha, clamp_max), score(pr - rr, f_alpha, clamp_max)
    return PairTerms(
        pc, pr, rc, rr, s_w, s_l, float(beta), float(label_smoothing), clamp_max, n_w, n_l, nll, options
    )


def _reference(types, ref_chosen, ref_rejected, pc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The detached reference log-probs ``[B]``; zeros (S_ref ≡ 0) when both are ``None``."""
    b = pc.shape[0]
    if ref_chosen is None and ref_rejected is None:
        if needs_ref := [n for n in types if LOSS_TYPES[n].reference]:
            raise ValueError(f"loss_type {needs_ref} needs ref_chosen_logps and ref_rejected_logps")
        return torch.zeros_like(pc), torch.zeros_like(pc)
    if ref_chosen is None or ref_rejected is None:
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    ref_c = vec("ref_chosen_logps", ref_chosen, b).detach()
    ref_r = vec("ref_rejected_logps", ref_rejected, b).detach()
    return ref_c, ref_r


def _lengths(types, lengths, b: int, dt: torch.dtype):
    """``chosen_lengths`` / ``rejected_lengths`` ``[B]`` as ``dt`` (raw counts), required by the
    length-normalised types."""
    need = next((n for n in types if LOSS_TYPES[n].lengths), None)
    out = []
    for name, n in zip(("chosen_lengths", "rejected_lengths"), lengths):
        if n is None:
            if need is not None:
                raise ValueError(f"loss_type {need!r} needs `{name}` ([B] tensor)")
            out.append(None)
            continue
        if not isinstance(n, torch.Tensor) or n.shape != (b,):
            got = tuple(n.shape) if isinstance(n, torch.Tensor) else type(n).__name__
            raise ValueError(f"{name} must have shape [B] = ({b},), got {got}")
        out.append(n.to(dt))
    return out


def _wpo_weight(use_weighting: bool, wpo_logw, types, b: int) -> torch.Tensor | None:
    """WPO's detached per-pair weight ``exp(w̄_w) · exp(w̄_l)`` (TRL 1.16: no clamp)."""
    if not use_weighting:
        if wpo_logw is not None:
            raise ValueError("wpo_logw is given but use_weighting=False")
        return None
    if any(n in ("aot", "aot_unpaired") for n in types):
        raise ValueError("WPO weighting (use_weighting=True) is not allowed with 'aot' / 'aot_unpaired'")
    if wpo_logw is None or len(wpo_logw) != 2:
        raise ValueError("use_weighting=True needs wpo_logw=(chosen [B], rejected [B]) log-weights")
    w_w, w_l = (vec(name, w, b).detach() for name, w in zip(("wpo_logw[0]", "wpo_logw[1]"), wpo_logw))
    return torch.exp(w_w) * torch.exp(w_l)


# ------------------------------------------------------------------------------------------------
# per-type input checks (run on the built PairTerms, before any loss is evaluated)


def _no_check(t: PairTerms) -> None:
    return None


def _check_smoothing(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = True, why: str = ""):
    def check(t: PairTerms) -> None:
        eps = t.label_smoothing
        if (eps <= lo if lo_open else eps < lo) or (eps >= hi if hi_open else eps > hi):
            interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise ValueError(f"label_smoothing must be in {interval}{why}, got {eps}")

    return check


def _check_sft(t: PairTerms) -> None:
    if t.chosen_nll is None:
        raise ValueError(
            "loss_type 'sft' needs `chosen_nll`: a scalar token-mean NLL of the chosen completions "
            "(TRL 1.16) or a [B] per-pair NLL"
        )


def _check_slic(t: PairTerms) -> None:
    o = t.options["slic"]
    if o.lam != 0.0:
        if o.sft_target_logps is None:
            raise ValueError(
                "loss_type 'slic' needs slic=SLiCOptions(sft_target_logps=[B] tensor) when lam != 0"
            )
        vec("SLiCOptions.sft_target_logps", o.sft_target_logps, t.pc.shape[0])


def _check_gpo(t: PairTerms) -> None:
    f = t.options["gpo"].function
    if not callable(f):
        check_choice("GPOOptions.function", f, GPO_FUNCTIONS, " or a callable")


def _check_sppo_soft(t: PairTerms) -> None:
    o = t.options["sppo_soft"]
    if o is None:
        raise ValueError(
            "loss_type 'sppo_soft' needs sppo_soft=SPPOSoftOptions(chosen_win_prob, rejected_win_prob)"
        )
    vec("SPPOSoftOptions.chosen_win_prob", o.chosen_win_prob, t.pc.shape[0])
    vec("SPPOSoftOptions.rejected_win_prob", o.rejected_win_prob, t.pc.shape[0])


def _check_beta_dpo(t: PairTerms) -> None:
    o = t.options["beta_dpo"]
    if o is None:
        raise ValueError(
            "loss_type 'beta_dpo' needs beta_dpo=BetaDPOOptions(state=BetaDPOState()) (kept across steps)"
        )
    if not 0.0 <= o.rho < 1.0:
        raise ValueError(f"BetaDPOOptions.rho must be in [0, 1), got {o.rho}")


def _check_discopop(t: PairTerms) -> None:
    if not t.options["discopop_tau"] > 0:
        raise ValueError(f"discopop_tau must be > 0, got {t.options['discopop_tau']}")


_CHECKS: dict[str, Callable[[PairTerms], None]] = {
    "robust": _check_smoothing(0.0, 0.5, why=" for 'robust'"),
    "cdpo": _check_smoothing(0.0, 0.5, why=" for 'cdpo'"),
    "exo_pair": _check_smoothing(0.0, 1.0, lo_open=True, why=" for 'exo_pair' (the EXO paper uses 1e-3)"),
    "aot": _check_smoothing(0.0, 1.0, hi_open=False, why=" for 'aot'"),
    "aot_unpaired": _check_smoothing(0.0, 1.0, hi_open=False, why=" for 'aot_unpaired'"),
    "sft": _check_sft,
    "slic": _check_slic,
    "gpo": _check_gpo,
    "sppo_soft": _check_sppo_soft,
    "beta_dpo": _check_beta_dpo,
    "discopop": _check_discopop,
}
