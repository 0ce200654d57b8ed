"""Listwise preference losses: listwise DPO (Plackett–Luce), LiPO, RRHF, PRO.

A prompt has K responses. Inputs are ``[B, K]`` tensors (per-sequence summed log-probs, token
counts, labels ψ where higher is better) and an optional boolean ``mask`` ``[B, K]`` marking the
real responses when prompts have different K. A list of ``B`` 1-D tensors is accepted too: equal
lengths are stacked; unequal lengths need ``mask`` (the lists are then right-padded to its K).
Ties in ψ are broken by position (stable sort). Per-prompt losses ``[B]`` are sums over the list
(pairs, or ranking positions); ``loss`` is their mean over prompts. Reference log-probs are
treated as constants (detached). Arithmetic is float32 (float64 stays float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from .._checks import as_float, check_choice, check_finite
from ._common import LossOutput

__all__ = ["listwise_dpo_loss", "lipo_loss", "rrhf_loss", "pro_loss"]

# Stand-in score for padded list entries: exp(_PAD - anything finite) is exactly 0 in fp32/fp64,
# and unlike -inf it keeps log-sum-exp backward free of (-inf) - (-inf) = NaN.
_PAD = -1e30

ListLike = torch.Tensor | Sequence[torch.Tensor]


def _list_mask(mask: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.shape != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a [B, K] = {list(shape)} tensor, got {got}")
    return mask.to(device=device, dtype=torch.bool)


def _as_list(name: str, x: ListLike, mask: torch.Tensor | None, *, floating: bool = True) -> torch.Tensor:
    """``[B, K]`` tensor from a tensor or a list of 1-D tensors (see module docstring)."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, Sequence) and len(x) and all(isinstance(v, torch.Tensor) for v in x):
        if any(v.dim() != 1 for v in x):
            raise ValueError(f"{name}: every list entry must be 1-D [K_b]")
        sizes = [v.shape[0] for v in x]
        if len(set(sizes)) == 1:
            t = torch.stack(list(x))
        elif mask is None:
            raise ValueError(
                f"{name}: lists of unequal K {sizes} need mask= ([B, K_max] bool, True on real responses)"
            )
        else:
            k = mask.shape[-1]
            if max(sizes) > k:
                raise ValueError(f"{name}: a list has {max(sizes)} entries but mask has K={k}")
            t = torch.stack([F.pad(v, (0, k - v.shape[0])) for v in x])
            counts = mask.to(torch.bool).sum(-1).tolist()
            if counts != sizes:
                raise ValueError(f"{name}: list lengths {sizes} disagree with mask row counts {counts}")
    else:
        raise ValueError(f"{name} must be a [B, K] tensor or a list of 1-D tensors")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape [B, K], got {tuple(t.shape)}")
    if floating:
        return as_float(name, t)
    if t.is_floating_point():
        check_finite(name, t)
    return t


def _list_inputs(
    mask: torch.Tensor | None, first: tuple[str, ListLike], *others: tuple[str, ListLike, bool]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Convert ``first`` and ``others`` to ``[B, K]`` and check they share one shape; return mask."""
    x0 = _as_list(first[0], first[1], mask)
    out = [x0]
    for name, x, floating in others:
        t = _as_list(name, x, mask, floating=floating)
        if t.shape != x0.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, {first[0]} has {tuple(x0.shape)}")
        out.append(t)
    return _list_mask(mask, tuple(x0.shape), x0.device), out


def _labels(labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return labels.to(
        device=like.device, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32
    )


def _pairs(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``P[b, i, j] = valid_i & valid_j & (ψ_i > ψ_j)``, ``[B, K, K]`` (ties give no pair)."""
    valid = mask.unsqueeze(2) & mask.unsqueeze(1)
    return valid & (labels.unsqueeze(2) > labels.unsqueeze(1))


def _sort_by_labels(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Permutation ``[B, K]``: valid responses by ψ descending (stable), padding last."""
    key = labels.masked_fill(~mask, -math.inf)
    return torch.argsort(key, dim=1, descending=True, stable=True)


def _suffix_logsumexp(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``LSE_{j ≥ k, valid j} s_j`` for every k of an already-sorted ``[B, K]`` list."""
    k = scores.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=scores.device).triu()
    keep = upper.unsqueeze(0) & mask.unsqueeze(1)
    return torch.where(keep, scores.unsqueeze(1), scores.new_full((), _PAD)).logsumexp(-1)


def _plackett_luce_nll(
    scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, top_k: int | None
) -> torch.Tensor:
    """Plackett–Luce NLL ``-Σ_k [s_τ(k) - LSE_{j≥k} s_τ(j)]`` per list ``[B]``, τ = label order."""
    order = _sort_by_labels(labels, mask)
    s = scores.gather(1, order)
    m = mask.gather(1, order)
    terms = s - _suffix_logsumexp(s, m)
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        m = m & (torch.arange(s.shape[1], device=s.device) < top_k)
    return -torch.where(m, terms, torch.zeros_like(terms)).sum(1)


def _best_worst(
    values: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value of the top-labelled and of the bottom-labelled valid response per list ``[B]``."""
    order = _sort_by_labels(labels, mask)
    last = (mask.sum(1) - 1).clamp_min(0)
    return values.gather(1, order[:, :1]).squeeze(1), values.gather(
        1, order.gather(1, last[:, None])
    ).squeeze(1)


def _list_metrics(
    scores: torch.Tensor, logps: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``rewards/chosen`` / ``rewards/rejected``: score of the best / worst-labelled response;
    ``rewards/accuracies``: fraction of labelled pairs the scores order correctly."""
    s = scores.detach()
    best, worst = _best_worst(s, labels, mask)
    lp_best, lp_worst = _best_worst(logps.detach(), labels, mask)
    pairs = _pairs(labels, mask)
    correct = (pairs & (s.unsqueeze(2) > s.unsqueeze(1))).sum()
    return {
        "rewards/chosen": best.mean(),
        "rewards/rejected": worst.mean(),
        "rewards/margins": (best - worst).mean(),
        "rewards/accuracies": correct.to(s.dtype) / pairs.sum().clamp_min(1).to(s.dtype),
        "logps/chosen": lp_best.mean(),
        "logps/rejected": lp_worst.mean(),
    }


def listwise_dpo_loss(
    policy_logps: ListLike,
    ref_logps: ListLike,
    labels: ListLike,
    *,
    beta: float = 0.1,
    mask: torch.Tensor | None = None,
    top_k: int | None = None,
) -> LossOutput:
    """Listwise DPO / DPO-PL (Rafailov et al. 2023, arXiv:2305.18290, App. A.3): the Plackett–Luce
    NLL of the label ranking on ``s = β(S_θ - S_ref)``.

    ``ℓ_b = -Σ_k [s_τ(k) - LSE_{j≥k} s_τ(j)]`` with τ = responses by ψ descending; all inputs
    ``[B, K]``. K = 2 is DPO. ``top_k`` keeps only the first ``top_k`` ranking terms (partial
    rankings). β=0.1 (DPO default). Metrics: ``rewards/chosen|rejected|margins`` = β·u of the
    best / worst-labelled response, ``rewards/accuracies`` = fraction of labelled pairs ordered
    correctly by ``s``, ``logps/chosen|rejected``.
    """
    mask, (p, r, y) = _list_inputs(
        mask, ("policy_logps", policy_logps), ("ref_logps", ref_logps, True), ("labels", labels, False)
    )
    y = _labels(y, p)
    s = beta * (p - r.detach())
    losses = _plackett_luce_nll(s, y, mask, top_k)
    return LossOutput(losses.mean(), losses, _list_metrics(s, p, y, mask))


_LIPO_LOSS_TYPES = ("lambda", "softmax", "pair_logistic", "pair_hinge", "list_mle")


def _lambda_weights(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Δ_ij = |G_i - G_j| · |1/D(τ_i) - 1/D(τ_j)|``, ``G = 2^ψ - 1``, ``D(τ) = ln(1 + τ)`` (no grad)."""
    with torch.no_grad():
        key = scores.masked_fill(~mask, -math.inf)
        order = torch.argsort(key, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order))
        inv_discount = 1.0 / torch.log1p(rank.to(torch.float64))
        gain = torch.exp2(labels.to(torch.float64)) - 1.0
        delta = (gain.unsqueeze(2) - gain.unsqueeze(1)).abs() * (
            inv_discount.unsqueeze(2) - inv_discount.unsqueeze(1)
        ).abs()
    return delta.to(scores.dtype)


def lipo_loss(
    policy_logps: ListLike,
    ref_logps: ListLike,
    labels: ListLike,
    *,
    beta: float = 0.05,
    loss_type: Literal["lambda", "softmax", "pair_logistic", "pair_hinge", "list_mle"] = "lambda",
    mask: torch.Tensor | None = None,
) -> LossOutput:
    """LiPO learning-to-rank losses on ``s = β(S_θ - S_ref)`` ``[B, K]`` (Liu et al. 2024, "LiPO:
    Listwise Preference Optimization through Learning-to-Rank", arXiv:2402.01878).

    Sums over the labelled pairs ``ψ_i > ψ_j`` of a list:
    ``pair_logistic``: ``softplus(-(s_i - s_j))``; ``pair_hinge``: ``relu(1 - (s_i - s_j))``;
    ``lambda`` (LiPO-λ): ``Δ_ij · softplus(-(s_i - s_j))`` with ``Δ_ij = |G_i - G_j|·|1/D(τ_i) - 1/D(τ_j)|``,
    ``G = 2^ψ - 1``, ``D(τ) = ln(1 + τ)``, τ the 1-based rank of ``s`` (current model, no grad).
    ``softmax``: ``-Σ_i (ψ_i/Σψ) log softmax(s)_i`` (ψ ≥ 0). ``list_mle``: :func:`listwise_dpo_loss`.
    Defaults not pinned down by the paper: β = 0.05 (the SLiC/RSO-style small β the paper follows); the
    discount uses the natural log as the paper writes it (log2 would scale Δ by ln 2).
    """
    check_choice("loss_type", loss_type, _LIPO_LOSS_TYPES)
    mask, (p, r, y) = _list_inputs(
        mask, ("policy_logps", policy_logps), ("ref_logps", ref_logps, True), ("labels", labels, False)
    )
    y = _labels(y, p)
    s = beta * (p - r.detach())
    if loss_type == "list_mle":
        losses = _plackett_luce_nll(s, y, mask, None)
    elif loss_type == "softmax":
        if bool((y.masked_fill(~mask, 0.0) < 0).any()):
            raise ValueError("lipo softmax loss needs labels >= 0")
        w = y.masked_fill(~mask, 0.0)
        w = w / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        logp = torch.log_softmax(torch.where(mask, s, s.new_full((), _PAD)), dim=1)
        losses = -(w * torch.where(mask, logp, torch.zeros_like(logp))).sum(1)
    else:
        pairs = _pairs(y, mask)
        d = s.unsqueeze(2) - s.unsqueeze(1)
        if loss_type == "pair_hinge":
            per_pair = torch.relu(1.0 - d)
        else:
            per_pair = F.softplus(-d)
            if loss_type == "lambda":
                per_pair = per_pair * _lambda_weights(s, y, mask)
        losses = torch.where(pairs, per_pair, torch.zeros_like(per_pair)).sum((1, 2))
    return LossOutput(losses.mean(), losses, _list_metrics(s, p, y, mask))


def rrhf_loss(
    policy_logps: ListLike,
    labels: ListLike,
    *,
    lengths: ListLike,
    length_penalty: float = 1.0,
    rrhf_weight: float = 100.0,
    mask: torch.Tensor | None = None,
) -> LossOutput:
    """RRHF (Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human Feedback
    without tears", arXiv:2304.05302; official repo ``GanjinZero/RRHF``), reference-free ranking
    + SFT on the best response; inputs ``[B, K]``.

    ``p_i = S_i / max(1, n_i)^length_penalty``; ``L_rank = Σ_{ψ_i < ψ_j} max(0, p_i - p_j)``;
    ``L_ft = -S_best / max(1, n_best)`` for the top-labelled response (first on ties).
    ``ℓ_b = rrhf_weight · L_rank + L_ft``; defaults are the official repo's (100.0, 1.0).
    Deliberate difference: the repo divides ``L_ft`` by the padded length; here it is the token
    mean over the best response's real tokens. Metrics: ``rewards/*`` on ``p``, ``rank_loss``, ``sft_loss``.
    """
    mask, (s, y, n) = _list_inputs(
        mask, ("policy_logps", policy_logps), ("labels", labels, False), ("lengths", lengths, False)
    )
    y = _labels(y, s)
    n = n.to(s.dtype).clamp_min(1.0)
    p = s / n**length_penalty
    d = p.unsqueeze(2) - p.unsqueeze(1)  # d[i, j] = p_i - p_j; pair (i, j) has ψ_i > ψ_j
    rank = torch.where(_pairs(y, mask), torch.relu(-d), torch.zeros_like(d)).sum((1, 2))
    best = _sort_by_labels(y, mask)[:, :1]
    sft = -(s.gather(1, best) / n.gather(1, best)).squeeze(1)
    losses = rrhf_weight * rank + sft
    metrics = _list_metrics(p, s, y, mask)
    metrics["rank_loss"] = rank.detach().mean()
    metrics["sft_loss"] = sft.detach().mean()
    return LossOutput(losses.mean(), losses, metrics)


def pro_loss(
    policy_logps: ListLike,
    labels: ListLike,
    *,
    lengths: ListLike,
    sft_weight: float = 0.05,
    mask: torch.Tensor | None = None,
) -> LossOutput:
    """PRO, preference ranking optimisation (Song et al. 2023, "Preference Ranking Optimization for
    Human Alignment", arXiv:2306.17492); inputs ``[B, K]``, labels = RM scores.

    Responses sorted by score ``r`` descending (y¹ best); ``ρ_i = A_θ(y^i) = S_i / max(1, n_i)``.
    With ``1/T_k^i = r_k - r_i`` (i > k) and ``1/T_k^k = max_{i>k}(r_k - r_i)``:
    ``L_PRO = -Σ_{k<n} [ρ_k/T_k^k - LSE_{i≥k}(ρ_i/T_k^i)]``. The temperatures are applied as
    products with score differences (the official code's form), so tied scores give a finite 0
    factor instead of a division by zero.
    SFT term: ``sft_weight · (n - 1)² · (-S(y¹))`` with n the list length, the official code's
    scaling of the summed log-prob of the best response. Not pinned down by the paper: the default
    0.05 is the paper's β from memory (the official script's ``--sft_weight`` default is 2).
    Metrics: ``rewards/*`` on ``ρ``, ``pro_loss``, ``sft_loss``.
    """
    mask, (s, y, n) = _list_inputs(
        mask, ("policy_logps", policy_logps), ("labels", labels, False), ("lengths", lengths, False)
    )
    y = _labels(y, s)
    rho = s / n.to(s.dtype).clamp_min(1.0)
    order = _sort_by_labels(y, mask)
    rho_s, r_s, m_s = rho.gather(1, order), y.gather(1, order), mask.gather(1, order)
    kk = rho.shape[1]
    later = torch.ones(kk, kk, dtype=torch.bool, device=s.device).triu(1)  # i > k
    neg = later.unsqueeze(0) & m_s.unsqueeze(1) & m_s.unsqueeze(2)  # [B, k, i]
    diff = (r_s.unsqueeze(2) - r_s.unsqueeze(1)).detach()  # r_k - r_i
    has_neg = neg.any(2)
    pos_scale = torch.where(neg, diff, diff.new_full((), -math.inf)).amax(2)
    pos_scale = torch.where(has_neg, pos_scale, torch.zeros_like(pos_scale))
    pos_logit = rho_s * pos_scale  # [B, k]
    neg_logit = torch.where(neg, rho_s.unsqueeze(1) * diff, rho_s.new_full((), _PAD))  # [B, k, i]
    lse = torch.cat((pos_logit.unsqueeze(2), neg_logit), 2).logsumexp(2)
    terms = torch.where(has_neg, lse - pos_logit, torch.zeros_like(lse))
    rank = terms.sum(1)
    list_len = mask.sum(1).to(s.dtype)
    sft = sft_weight * (list_len - 1.0).clamp_min(0.0) ** 2 * -s.gather(1, order[:, :1]).squeeze(1)
    losses = rank + sft
    metrics = _list_metrics(rho, s, y, mask)
    metrics["pro_loss"] = rank.detach().mean()
    metrics["sft_loss"] = sft.detach().mean()
    return LossOutput(losses.mean(), losses, metrics)
