"""Reference of the log-probs family on given logits, written from the math with full ``[N, V]``
tensors in the precision of the inputs promoted to at least float32 (pass float64 tensors for a
float64 ground truth). Ground truth for the tests and the eager provider of the benchmarks;
never a production path.

Logit transform (``LogitOptions``): ``z = c * tanh(a x / c) / T`` (``a x / T`` without a
soft-cap). Per token ``n`` with target ``y_n``::

    lse_n     = log sum_v exp(z_nv)
    logp_n    = z_n[y_n] - lse_n
    entropy_n = -sum_v p_nv log p_nv,       p = softmax(z)
    ce_n      = (1 - eps) (-logp_n) + eps (lse_n - mean_v z_nv) + c_z lse_n^2

Ignored positions (``targets == ignore_index``) give exactly 0 in every output.
"""

from __future__ import annotations

import torch


def transform_ref(
    x: torch.Tensor, *, logit_scale: float = 1.0, softcap: float | None = None, temperature=1.0
):
    """``z`` from raw logits ``x`` (already in the compute dtype)."""
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def stats_ref(z: torch.Tensor, targets: torch.Tensor, ignore_index: int, *, entropy=True, zmean=True):
    """Per-token ``(logp, entropy | None, lse, zmean | None, valid)`` of logits ``z [..., V]``;
    the optional statistics are only computed when asked for (the eager baseline does no extra
    full-logit work)."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(z, dim=-1)
    z_y = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    ent = zbar = None
    if entropy:
        logsm = z - lse.unsqueeze(-1)
        p = logsm.exp()
        # x log x with x = 0 is 0: -inf logits must not turn into 0 * inf = NaN
        ent = torch.where(valid, -torch.where(p > 0, p * logsm, torch.zeros_like(p)).sum(-1), zero)
    if zmean:
        zbar = torch.where(valid, z.mean(-1), zero)
    return torch.where(valid, z_y - lse, zero), ent, torch.where(valid, lse, zero), zbar, valid


def _dtype(*tensors) -> torch.dtype:
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def logprobs_ref(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100, **transform):
    """``(logps, entropy, lse)`` per token, shape ``targets.shape``; zeros where ignored.
    ``transform``: ``logit_scale``, ``softcap``, ``temperature`` (as :func:`transform_ref`)."""
    z = transform_ref(logits.to(_dtype(logits)), **transform)
    logp, ent, lse, _, _ = stats_ref(z, targets, ignore_index)
    return logp, ent, lse


def cross_entropy_ref(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    num_items=None,
    **transform,
) -> torch.Tensor:
    """Cross-entropy on given logits ``[..., V]``. ``reduction="mean"`` divides by the number of
    non-ignored tokens (clamped to >= 1, so an all-ignored batch gives 0); ``num_items``
    overrides the divisor. ``transform`` as in :func:`logprobs_ref`."""
    z = transform_ref(logits.to(_dtype(logits)), **transform)
    logp, _, lse, zmean, valid = stats_ref(
        z, targets, ignore_index, entropy=False, zmean=label_smoothing != 0.0
    )
    ce = -(1.0 - label_smoothing) * logp
    if label_smoothing != 0.0:  # (a -inf logit makes zmean -inf; 0 * inf must not appear)
        ce = ce + label_smoothing * (lse - zmean)
    if z_loss != 0.0:
        ce = ce + z_loss * lse * lse
    ce = torch.where(valid, ce, torch.zeros((), dtype=ce.dtype, device=ce.device))
    if reduction == "none":
        return ce
    if reduction not in ("sum", "mean"):
        raise ValueError(f"unknown reduction {reduction!r}")
    total = ce.sum()
    if num_items is not None:
        return total / num_items
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)
