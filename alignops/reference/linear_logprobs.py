"""Reference for the linear log-probs / cross-entropy family (SPEC §1.1, §3.1).

Written straight from the math with full ``[N, V]`` logits, in the precision of the inputs
promoted to at least float32 (pass float64 tensors for a float64 ground truth).

Logit transform order (SPEC §1.1): ``z = h @ W.T + b`` -> soft-cap ``c * tanh(z / c)`` ->
temperature ``z / T``.

Per token ``n`` with target ``y_n``:

    lse_n     = log sum_v exp(z_nv)
    logp_n    = z_n[y_n] - lse_n
    entropy_n = lse_n - sum_v softmax(z_n)_v * z_nv
    ce_n      = (1 - eps) * (-logp_n) + eps * (lse_n - mean_v z_nv) + c_z * lse_n**2

Ignored positions (``targets == ignore_index``) give exactly 0 in every output.
"""

from __future__ import annotations

import torch


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def logits_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Full transformed logits ``[..., V]`` in float32 (float64 if any input is float64)."""
    dt = _compute_dtype(hidden, weight, bias)
    z = hidden.to(dt) @ weight.to(dt).T
    if bias is not None:
        z = z + bias.to(dt)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _stats_from_logits(
    z: torch.Tensor, targets: torch.Tensor, ignore_index: int, *, entropy: bool = True, zmean: bool = True
):
    """Per-token (logp, entropy | None, lse, zmean | None, valid); the optional statistics
    are only computed when asked for, so the eager baseline does no extra full-logit work."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(z, dim=-1)
    z_y = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    ent = zbar = None
    if entropy:
        logsm = z - lse.unsqueeze(-1)
        p = logsm.exp()
        # x log x with x = 0 is 0 (SPEC §1.5): -inf logits must not turn into 0 * inf = NaN
        ent = torch.where(valid, -torch.where(p > 0, p * logsm, torch.zeros_like(p)).sum(-1), zero)
    if zmean:
        zbar = torch.where(valid, z.mean(-1), zero)
    return torch.where(valid, z_y - lse, zero), ent, torch.where(valid, lse, zero), zbar, valid


def linear_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logps, entropy, lse)`` per token, shape ``targets.shape``; zeros where ignored."""
    z = logits_ref(hidden, weight, bias, temperature=temperature, softcap=softcap)
    logp, ent, lse, _, _ = _stats_from_logits(z, targets, ignore_index)
    return logp, ent, lse


def _reduce(per_token, valid, reduction, num_items):
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if num_items is not None:
        return total / num_items
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / valid.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}")


def cross_entropy_ref(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of SPEC §3.1 on given logits ``[..., V]``.

    ``reduction="mean"`` divides by the number of non-ignored tokens (clamped to >= 1, so
    an all-ignored batch gives 0); ``num_items`` overrides the divisor (SPEC §3.3).
    """
    dt = _compute_dtype(logits)
    z = logits.to(dt)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp, _, lse, zmean, valid = _stats_from_logits(
        z, targets, ignore_index, entropy=False, zmean=label_smoothing != 0.0
    )
    ce = -(1.0 - label_smoothing) * logp
    if label_smoothing != 0.0:  # (a -inf logit makes zmean -inf; 0 * inf must not appear)
        ce = ce + label_smoothing * (lse - zmean)
    if z_loss != 0.0:
        ce = ce + z_loss * lse * lse
    ce = torch.where(valid, ce, torch.zeros((), dtype=ce.dtype, device=ce.device))
    return _reduce(ce, valid, reduction, num_items)


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``cross_entropy_ref(hidden @ weight.T + bias, targets, ...)``."""
    dt = _compute_dtype(hidden, weight, bias)
    z = hidden.to(dt) @ weight.to(dt).T
    if bias is not None:
        z = z + bias.to(dt)
    return cross_entropy_ref(
        z,
        targets,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        temperature=temperature,
        softcap=softcap,
        num_items=num_items,
    )
